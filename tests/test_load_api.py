"""`clip.load` and friends: the API of OpenAI's `clip` package, on small local checkpoints."""

from __future__ import annotations

import gzip
import hashlib
import logging
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipsearch import clip
from clipsearch.clip import registry
from clipsearch.clip.checkpoints import write_model_dir
from clipsearch.clip.model import CLIP, ModelConfig, build_model
from clipsearch.clip.tokenizer import TextTooLongError
from clipsearch.errors import CheckpointError, DownloadError
from clipsearch.paths import model_cache_dir

CLIP_VOCAB = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
# Small towers, but CLIP's full vocabulary, so clip.tokenize's ids fit the model.
CONFIG = ModelConfig(
    embed_dim=32,
    image_resolution=32,
    vision_layers=1,
    vision_width=64,
    vision_patch_size=16,
    vision_heads=1,
    context_length=77,
    vocab_size=49_408,
    text_width=64,
    text_heads=1,
    text_layers=1,
)


@pytest.fixture(autouse=True)
def empty_model_cache():
    """Nothing but the checkpoints a test puts there: CLIP's vocabulary ships with the package."""
    model_cache_dir().mkdir(parents=True)


@pytest.fixture(scope="module")
def model() -> CLIP:
    torch.manual_seed(0)
    return CLIP(CONFIG).eval()


@pytest.fixture
def openclip_file(tmp_path, model) -> Path:
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    return tmp_path / "open_clip_pytorch_model.bin"


@pytest.fixture
def cat_jpg(tmp_path) -> Path:
    torch.manual_seed(3)
    pixels = (torch.rand(48, 64, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "cat.jpg")
    return tmp_path / "cat.jpg"


def test_the_snippet_from_the_readme_of_openai_clip(openclip_file, cat_jpg, model):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # --- as in OpenAI's README, with a local checkpoint in place of "ViT-B/32" ---
    model_, preprocess = clip.load(str(openclip_file), device=device)
    image = preprocess(Image.open(cat_jpg)).unsqueeze(0).to(device)
    text = clip.tokenize(["a photo of a cat", "a photo of a dog"]).to(device)
    with torch.no_grad():
        image_features = model_.encode_image(image)
        text_features = model_.encode_text(text)
        logits_per_image, logits_per_text = model_(image, text)
    # ---
    assert image.shape == (1, 3, 32, 32) and text.shape == (2, 77)
    assert image_features.shape == (1, 32) and text_features.shape == (2, 32)
    assert logits_per_image.shape == (1, 2) and logits_per_text.shape == (2, 1)
    assert torch.equal(logits_per_text, logits_per_image.t())
    cosines = F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()
    expected = model_.logit_scale.exp() * cosines
    torch.testing.assert_close(logits_per_image, expected, rtol=0, atol=1e-4)
    # The loaded model is the saved one.
    with torch.no_grad():
        reference = model.encode_text(text.cpu())
    assert torch.allclose(text_features.float().cpu(), reference, atol=1e-5 if device == "cpu" else 1e-2)


def test_cpu_model_is_float32_in_eval_mode_with_clip_tokenizer(openclip_file):
    model, preprocess = clip.load(openclip_file, device="cpu")
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.tokenizer.bpe_path == registry.VOCAB.bundled
    assert torch.equal(model.tokenizer(["a diagram"]), clip.tokenize(["a diagram"]))
    assert preprocess.resolution == CONFIG.image_resolution


def test_default_device_is_cpu_here(openclip_file, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    model, _ = clip.load(openclip_file)
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("device", ["cuda:1", 1, "mps", "gpu", "CPU", "", "xla"])
def test_a_device_this_machine_lacks_is_refused_before_the_checkpoint_is_read(openclip_file, monkeypatch, device):
    """Torch refused these only once the whole checkpoint had been read, in its own words."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.mps, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(clip, "open_checkpoint", pytest.fail)
    with pytest.raises(ValueError) as err:
        clip.load(openclip_file, device=device)
    assert str(err.value) == f"device {device!r} is not one this machine has; it has cpu, cuda:0"


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu"), "meta"])
def test_devices_every_machine_has_load(openclip_file, device):
    model, _ = clip.load(openclip_file, device=device, towers="image")
    assert next(model.parameters()).device.type == torch.device(device).type


def test_a_file_without_its_activation_warns_once_that_it_runs_with_quickgelu(openclip_file, monkeypatch, caplog):
    """An exact-GELU OpenCLIP file given alone ran as QuickGELU, said only at -v (an info line)."""
    monkeypatch.setattr(clip, "_WARNED_ACTIVATION", set())
    for _ in range(2):
        model, _ = clip.load(openclip_file, device="cpu", towers="image")
        assert model.config.quick_gelu is True  # the default stays OpenAI's
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith(
        f"{openclip_file} does not record its activation, so it runs with QuickGELU"
    )
    assert "give the folder holding its open_clip_config.json" in warnings[0].getMessage()
    caplog.clear()
    monkeypatch.setattr(clip, "_WARNED_ACTIVATION", set())
    clip.load(openclip_file, device="cpu", towers="image", quick_gelu=False)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_is_float16(openclip_file):
    model, _ = clip.load(openclip_file, device="cuda")
    assert model.visual.conv1.weight.dtype == torch.float16


def test_text_tower_alone(openclip_file, model):
    text_model, _ = clip.load(openclip_file, device="cpu", towers="text")
    assert text_model.visual is None
    tokens = clip.tokenize(["a red square", "two blue circles"])
    with torch.no_grad():
        assert torch.equal(text_model.encode_text(tokens), model.encode_text(tokens))


def test_image_tower_alone_has_no_tokenizer(openclip_file):
    image_model, _preprocess = clip.load(openclip_file, device="cpu", towers="image")
    assert image_model.tokenizer is None and image_model.visual is not None


def test_own_directory_brings_its_vocabulary_and_normalisation(tmp_path):
    """A model trained with its own small vocabulary tokenizes with it, not with CLIP's."""
    merges = ["h e", "l l", "he ll", "o</w>", "hell o</w>"]
    vocab = tmp_path / "small.txt.gz"
    vocab.write_bytes(gzip.compress(("#version: 0.2\n" + "\n".join(merges) + "\n").encode()))
    config = replace(CONFIG, vocab_size=512 + len(merges) + 2)
    torch.manual_seed(0)
    directory = write_model_dir(tmp_path / "mine", CLIP(config), vocab, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))

    model, preprocess = clip.load(directory, device="cpu")
    assert model.tokenizer.bpe_path == directory / "vocab.txt.gz"
    assert model.tokenizer.encode("hello") == [512 + 4]
    gray = preprocess(Image.new("RGB", (40, 40), (51, 51, 51)))  # 51/255 = 0.2
    expected = torch.tensor([(0.2 - 0.5) / 0.25, (0.2 - 0.5) / 0.5, (0.2 - 0.5) / 1.0])
    torch.testing.assert_close(gray[:, 16, 16], expected, rtol=0, atol=1e-6)


def test_vocabulary_larger_than_the_model_is_refused(tmp_path):
    torch.manual_seed(0)
    directory = write_model_dir(
        tmp_path / "mine", CLIP(replace(CONFIG, vocab_size=1000)), CLIP_VOCAB, mean=(0, 0, 0), std=(1, 1, 1)
    )
    with pytest.raises(CheckpointError, match="49408 tokens"):
        clip.load(directory, device="cpu")


def test_jit_is_refused(openclip_file):
    with pytest.raises(CheckpointError, match="jit=True"):
        clip.load(openclip_file, jit=True)


@pytest.mark.parametrize(
    "name, guess",
    [
        ("vit-b/23", " Did you mean 'ViT-B/32' or "),  # a typo, in another letter case: the closest first
        ("ViT-B-16-SigLIP2-25", " Did you mean 'ViT-B-16-SigLIP2-256' or "),
        ("resnet-9000", ""),  # nothing close: no guess, and never the whole list
    ],
)
def test_an_unknown_name_says_what_it_is_close_to(name, guess):
    with pytest.raises(CheckpointError) as err:
        clip.load(name)
    message = str(err.value)
    assert message.startswith(f"{name!r} is neither a known model nor a checkpoint file or directory.{guess}")
    assert message.endswith("`clipsearch models` lists the known models (in Python: clip.available_models()).")
    assert len(message) < 300  # the 40 names took 1,300 characters
    with pytest.raises(CheckpointError) as got:
        clip.registry.get(name)
    assert str(got.value) == message


# --- the registry ----------------------------------------------------------------------------


def test_available_models():
    names = clip.available_models()
    openai = [
        "RN50",
        "RN101",
        "RN50x4",
        "RN50x16",
        "RN50x64",
        "ViT-B/32",
        "ViT-B/16",
        "ViT-L/14",
        "ViT-L/14@336px",
    ]
    assert names[:9] == openai  # OpenAI's own list, in their order
    assert {"ViT-B-32/laion2b_s34b_b79k", "ViT-B-32/datacomp_xl_s13b_b90k", "demo"} <= set(names)
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    "alias, name",
    [
        ("ViT-B/32", "ViT-B/32"),
        ("vit-b/32", "ViT-B/32"),
        ("ViT-B-32", "ViT-B/32"),
        (" ViT-B-32:openai ", "ViT-B/32"),
        ("ViT-L-14-336", "ViT-L/14@336px"),
        ("rn50", "RN50"),
        ("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "ViT-B-32/laion2b_s34b_b79k"),
        ("ViT-B-32:datacomp_xl_s13b_b90k", "ViT-B-32/datacomp_xl_s13b_b90k"),
    ],
)
def test_aliases(alias, name):
    assert registry.get(alias).name == name


def test_registry_entries_are_consistent():
    keys = [key.lower() for entry in registry.MODELS for key in (entry.name, *entry.aliases)]
    assert len(keys) == len(set(keys)), "an alias names two models"
    # A HubDir (SigLIP) lives in the hub cache only: no file of clipsearch's cache to share.
    files = [
        _cache_name(entry.asset)
        for entry in registry.MODELS
        if entry.asset and not isinstance(entry.asset, registry.HubDir)
    ]
    assert len(files) == len(set(files)), "two models would share a cache file"
    for entry in registry.MODELS:
        if isinstance(entry.asset, registry.Asset) and entry.asset.url.startswith("https://openaipublic"):
            assert entry.asset.url.split("/")[-2] == entry.asset.sha256 and entry.quick_gelu is True
    assert registry.get("ViT-B-32/laion2b_s34b_b79k").quick_gelu is False
    assert registry.get("ViT-B-32/laion400m_e32").quick_gelu is True


def _cache_name(asset) -> str:
    """The name a model's file has in clipsearch's cache (hub files: a copy placed by hand)."""
    return asset.filename if isinstance(asset, registry.Asset) else asset.saved_as


def test_importing_the_registry_does_not_import_torch():
    code = "import sys, clipsearch.clip.download, clipsearch.clip; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- loading by name -------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _point(monkeypatch, name: str, url: str, sha256: str | None) -> registry.ModelEntry:
    """Make the registry fetch model `name` (under any of its names) from `url`."""
    entry = registry.get(name)
    moved = replace(entry, asset=replace(entry.asset, url=url, sha256=sha256))
    for key in (entry.name, *entry.aliases):
        monkeypatch.setitem(registry._BY_KEY, key.lower(), moved)
    return moved


def test_offline_load_by_name_says_what_to_fetch_and_where(monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}/ViT-B-32.pt"
    _point(monkeypatch, "ViT-B/32", url, registry.get("ViT-B/32").asset.sha256)
    with pytest.raises(DownloadError) as err:
        clip.load("ViT-B/32", device="cpu")
    message = str(err.value)
    assert "\n" not in message and url in message and str(model_cache_dir() / "ViT-B-32.pt") in message


def test_corrupt_cached_checkpoint_is_refused(monkeypatch):
    (model_cache_dir() / "ViT-B-32.pt").write_bytes(b"not the real weights")
    with pytest.raises(DownloadError, match="corrupt"):
        clip.load("ViT-B/32", device="cpu")


@pytest.fixture
def file_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def test_load_by_name_downloads_verifies_and_uses_registry_settings(monkeypatch, file_server, model):
    root, base = file_server
    torch.save(model.state_dict(), root / "weights.bin")
    digest = hashlib.sha256((root / "weights.bin").read_bytes()).hexdigest()

    # A hub model's file placed by hand in clipsearch's cache (test_hub.py covers the hub itself).
    model_cache_dir().mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / "weights.bin", model_cache_dir() / "ViT-B-32-laion2b_s34b_b79k.bin")
    loaded, _ = clip.load("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", device="cpu", download_root=model_cache_dir())
    assert loaded.config.quick_gelu is False  # the registry knows this OpenCLIP model uses GELU
    assert (
        clip.load(str(model_cache_dir() / "ViT-B-32-laion2b_s34b_b79k.bin"), device="cpu", quick_gelu=False)[
            0
        ].config.quick_gelu
        is False
    )

    _point(monkeypatch, "RN50", f"{base}/weights.bin", "0" * 64)
    with pytest.raises(DownloadError, match="SHA-256"):
        clip.load("RN50", device="cpu")
    assert not (model_cache_dir() / "RN50.pt").exists()

    _point(monkeypatch, "RN50", f"{base}/weights.bin", digest)
    loaded, _ = clip.load("RN50", device="cpu")
    assert loaded.config.quick_gelu is True
    with torch.no_grad():
        tokens = clip.tokenize("a photo")
        assert torch.equal(loaded.encode_text(tokens), build_model(model.state_dict()).encode_text(tokens))


def test_a_named_models_first_run_measures_the_towers_without_torch_too(monkeypatch, file_server, tiny_model):
    """A model named from the registry is fetched by the first run's measurement, which then
    knows its checkpoint and times the NumPy tower (and ONNX Runtime's graph) beside torch's
    precisions: a verdict without them would keep every later run in torch."""
    from clipsearch.clip import cpu, precision_verdicts

    if len(cpu.candidate_precisions("cpu")) == 1:
        pytest.skip("one candidate precision: no verdict is measured here")
    root, base = file_server
    tiny, _ = clip.load(tiny_model, device="cpu")
    torch.save(tiny.state_dict(), root / "weights.pt")
    digest = hashlib.sha256((root / "weights.pt").read_bytes()).hexdigest()
    _point(monkeypatch, "ViT-B/32", f"{base}/weights.pt", digest)
    assert not (model_cache_dir() / "ViT-B-32.pt").exists()
    assert cpu.measure("ViT-B/32", "image")
    assert (model_cache_dir() / "ViT-B-32.pt").exists()
    verdict, _ = precision_verdicts.image_verdict("ViT-B/32")
    assert precision_verdicts.NUMPY in verdict["costs"] and verdict["torch_start"] > 0
    assert precision_verdicts.torchless_image_tower("ViT-B/32", 1) is not None  # one image: no torch


def test_a_named_models_first_query_caches_the_text_tower_it_writes(monkeypatch, file_server, tiny_model):
    """The first query of a model named from the registry fetches it, then writes its text
    tower: to the cache, for the queries after it, not into its own memory alone."""
    from clipsearch.clip import numpy_text

    root, base = file_server
    tiny, _ = clip.load(tiny_model, device="cpu")
    torch.save(tiny.state_dict(), root / "weights.pt")
    digest = hashlib.sha256((root / "weights.pt").read_bytes()).hexdigest()
    _point(monkeypatch, "ViT-B/32", f"{base}/weights.pt", digest)
    assert numpy_text.load_cached("ViT-B/32") is None
    tower = numpy_text.export("ViT-B/32")
    assert (model_cache_dir() / "ViT-B-32.pt").exists()
    assert all(isinstance(value, np.memmap) for value in tower.weights.values())
    cached = numpy_text.load_cached("ViT-B/32")
    assert cached is not None and cached.weights.keys() == tower.weights.keys()


def test_bundled_demo_model_loads():
    model, preprocess = clip.load("demo", device="cpu")
    assert model.tokenizer.bpe_path == registry.get("demo").bundled / "vocab.txt.gz"
    assert preprocess.resolution == model.config.image_resolution


def test_a_models_own_tokenizer_fits_its_context():
    """The demo's context is 32 tokens: its tokenizer refuses a text that does not fit, or cuts
    it to 32 with truncate=True, which the model then runs (it had made 77-token rows, a
    shape error inside the text tower)."""
    model, preprocess = clip.load("demo", device="cpu")
    assert model.context_length == 32
    with pytest.raises(TextTooLongError, match="at most 30 fit in the context length of 32"):
        model.tokenizer(["red " * 31])
    tokens = model.tokenizer(["red " * 100, "a red circle"], truncate=True)
    assert tokens.shape == (2, 32) and tokens[0, -1].item() == model.tokenizer.eot_id
    image = preprocess(Image.new("RGB", (64, 64), "red"))[None]
    with torch.no_grad():
        logits_per_image, logits_per_text = model(image, tokens)
    assert logits_per_image.shape == (1, 2) and logits_per_text.shape == (2, 1)
    assert clip.tokenize(["a red circle"]).shape == (1, 77)  # OpenAI's default stays
