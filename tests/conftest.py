"""Fixtures every test module can use without importing them."""

import logging
import shutil
import signal
from pathlib import Path

import pytest
from helpers import write_tiny_model
from hub_stand_in import refresh_hub_settings

_HUB_SETTINGS = (
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
)


@pytest.fixture(scope="session", autouse=True)
def _isolated_session(tmp_path_factory):
    """The environment `_isolated_home` gives each test, for the whole session: session and
    module fixtures (a model's verdict and towers, a served index, the browser) run before any
    test's, and wrote to the real ~/.cache and ~/.config without it."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _isolate(monkeypatch, tmp_path_factory.mktemp("session-home"))
        yield


@pytest.fixture(scope="session", autouse=True)
def _interruptible():
    """Tests send Ctrl-C (SIGINT) to the CLIs they start, as a terminal does to its foreground
    job. A shell without job control starts a background command with SIGINT ignored, and a
    child inherits that: `clipsearch serve` then stopped on SIGINT (uvicorn catches it anyway)
    but exited 0, not 130, whenever pytest itself ran as such a command."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own CLIPSEARCH_HOME and XDG dirs: nothing is written outside tmp. The
    caches of other tools are its own too (HOME for OpenAI's ~/.cache/clip, HF_HOME for the hub
    cache), no test reaches the real hub, and none inherits the hub settings of the machine."""
    root = tmp_path_factory.mktemp("home")
    _isolate(monkeypatch, root)
    return root


def _isolate(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    monkeypatch.setenv("CLIPSEARCH_HOME", str(root / "clipsearch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(root / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(root / "config"))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("HOME", str(root / "user"))
    monkeypatch.setenv("HF_HOME", str(root / "huggingface"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    for name in _HUB_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    refresh_hub_settings(monkeypatch)


@pytest.fixture(autouse=True)
def _logging_as_found():
    """The "clipsearch" logger as each test found it: a CLI run (CliRunner) sets its level,
    handler and propagation as the command line does, which would otherwise reach every later
    test (a level of INFO lets a test's caplog see records it did not expect)."""
    logger = logging.getLogger("clipsearch")
    saved = logger.handlers[:], logger.propagate, logger.level
    yield
    logger.handlers, logger.propagate, logger.level = saved


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of the tiny model, written once per test session."""
    return str(write_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory) -> str:
    """A second tiny model (other weights, other path): for model-mismatch tests."""
    return str(write_tiny_model(tmp_path_factory.mktemp("models") / "other", seed=1))


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model):
    """The tiny model loaded once for the session (fp32: exact values in assertions)."""
    from clipsearch.encoder import Encoder

    return Encoder(tiny_model, device="cpu", precision="fp32")


@pytest.fixture
def encoded(monkeypatch) -> list[int]:
    """Counts images sent through the image tower (in this process), one entry per batch:
    torch's (`Encoder`) or one without torch (`NumpyImageEncoder`, which a model's first run on
    this machine takes where its measurement found one faster)."""
    from clipsearch.encoder import Encoder, NumpyImageEncoder

    batches: list[int] = []
    for kind in (Encoder, NumpyImageEncoder):

        def counting(self, pixels, real=kind.encode_images):
            batches.append(len(pixels))
            return real(self, pixels)

        monkeypatch.setattr(kind, "encode_images", counting)
    return batches


@pytest.fixture
def clipsearch_logging():
    """Logging as the library leaves it: an in-process CLI run (CliRunner) points the
    "clipsearch" logger at its own, by then closed, stderr and stops propagation, which hides
    records from caplog. Restored afterwards (`_logging_as_found`)."""
    logger = logging.getLogger("clipsearch")
    logger.handlers, logger.propagate = [], True
    return logger


@pytest.fixture
def model_dir(tiny_model: str, tmp_path: Path) -> str:
    """A copy of the tiny model whose files a test may change."""
    return str(shutil.copytree(tiny_model, tmp_path / "model"))


@pytest.fixture
def measured(model_dir: str) -> Path:
    """The tiny model's verdict, measured as an indexing run's first load on this machine does
    (which ends exporting the text tower for queries, `Index._prepare_text_queries`); its file."""
    from clipsearch.clip import cpu, numpy_text, precision_verdicts

    cpu.load_prepared(model_dir, "auto", towers="image", images=4)
    numpy_text.export(model_dir)
    (path,) = precision_verdicts.verdict_file({}).parent.glob("*.json")
    return path


@pytest.fixture
def one_torch_thread():
    """torch on one thread while a test runs: tiny batches on a loaded two-core machine spend a
    second thread waiting at barriers, and results are bit-identical only for a fixed count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
