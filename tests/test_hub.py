"""Weights from the Hugging Face hub (a stand-in on 127.0.0.1 via HF_ENDPOINT) and from the
caches people already have: the hub cache, OpenAI's ~/.cache/clip."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hub_stand_in import HubStandIn, refresh_hub_settings
from typer.testing import CliRunner

from clipsearch.cli import app
from clipsearch.clip import download, hub, integrity, registry
from clipsearch.clip.sources import locate, openai_cache_dir
from clipsearch.errors import CheckpointError, DownloadError
from clipsearch.paths import model_cache_dir

LAION = "ViT-B-32/laion2b_s34b_b79k"
LAION_REPO = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
WEIGHTS = "open_clip_pytorch_model.bin"
PAYLOAD = bytes(range(256)) * 4_000  # ~1 MB: several chunks of every reader
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def stand_in(monkeypatch):
    server = HubStandIn()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    refresh_hub_settings(monkeypatch)
    yield server
    server.close()


def _settings(monkeypatch, **env: str | None) -> None:
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    refresh_hub_settings(monkeypatch)


def _hub_cache() -> Path:
    return Path(os.environ["HF_HOME"]) / "hub"


def _pin(monkeypatch, name: str, **changes) -> registry.ModelEntry:
    """The registry's entry `name` (under all its names) with its asset changed."""
    entry = registry.get(name)
    moved = replace(entry, asset=replace(entry.asset, **changes))
    for key in (entry.name, *entry.aliases):
        monkeypatch.setitem(registry._BY_KEY, key.lower(), moved)
    return moved


# --- registry models on the hub ----------------------------------------------------------------


def test_registry_hub_model_is_fetched_into_the_hub_cache_once(stand_in):
    commit = stand_in.push(LAION_REPO, {WEIGHTS: PAYLOAD, "open_clip_config.json": b"{}"})
    assert locate(registry.get(LAION)).describe() == "-"

    path = download.model_path(LAION)
    folder = _hub_cache() / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert path == folder / "snapshots" / commit / WEIGHTS
    assert path.read_bytes() == PAYLOAD and path.resolve() == folder / "blobs" / DIGEST
    assert not model_cache_dir().joinpath("ViT-B-32-laion2b_s34b_b79k.bin").exists()  # used in place, no copy
    assert [(r.server, r.method) for r in stand_in.requests] == [("hub", "HEAD"), ("cdn", "GET")]

    where = locate(registry.get(LAION))
    assert (where.describe(), where.path) == ("cached (huggingface)", path)
    assert download.model_path(LAION) == path
    assert len(stand_in.requests) == 2  # found in the cache before any request


def test_file_other_tools_put_in_the_hub_cache_is_used_without_network(stand_in, monkeypatch):
    """What open_clip (or `hf download`) fetched is found through huggingface_hub's own cache."""
    from huggingface_hub import hf_hub_download

    stand_in.push(LAION_REPO, {WEIGHTS: PAYLOAD})
    theirs = Path(hf_hub_download(LAION_REPO, WEIGHTS))
    before = len(stand_in.requests)
    _settings(monkeypatch, HF_ENDPOINT="http://127.0.0.1:9")
    assert download.model_path(LAION) == theirs
    assert len(stand_in.requests) == before


def test_unchanged_hub_file_is_not_hashed_again(stand_in, monkeypatch):
    stand_in.push(LAION_REPO, {WEIGHTS: PAYLOAD})
    path = download.model_path(LAION)
    monkeypatch.setattr(integrity, "sha256_file", lambda path: pytest.fail("hashed again"))
    assert download.model_path(LAION) == path
    assert not any(p.suffix == ".sha256" for p in _hub_cache().rglob("*"))  # its records live in our cache


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("progress, stderr", [(True, _Terminal), (False, _Terminal), (True, io.StringIO)])
def test_hub_download_progress_on_a_terminal_only_and_when_asked(stand_in, monkeypatch, progress, stderr):
    stand_in.push(LAION_REPO, {WEIGHTS: PAYLOAD})
    fake_out, fake_err = io.StringIO(), stderr()
    monkeypatch.setattr("sys.stdout", fake_out)
    monkeypatch.setattr("sys.stderr", fake_err)
    download.model_path(LAION, progress=progress)
    shown = progress and stderr is _Terminal
    assert ("100%" in fake_err.getvalue()) is shown and (fake_err.getvalue() == "") is not shown
    assert fake_out.getvalue() == ""


def test_text_tower_cache_sees_a_model_in_the_hub_cache(stand_in):
    """A text query's cached text tower is checked against the model's files wherever they are."""
    from clipsearch.clip import tower_file

    assert tower_file.checkpoint_state(LAION) is None
    stand_in.push(LAION_REPO, {WEIGHTS: PAYLOAD})
    download.model_path(LAION)
    source = tower_file.checkpoint_state(LAION)
    assert source is not None and source["files"][0][:2] == [WEIGHTS, len(PAYLOAD)]


def test_hub_cache_lookup_answers_as_huggingface_hub_does(stand_in, tiny_openclip_repo):
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    files, _ = tiny_openclip_repo
    old = stand_in.push("someone/tiny-clip", files)
    download.model_path("hf-hub:someone/tiny-clip")  # leaves a .no_exist record for the safetensors
    new = stand_in.push("someone/tiny-clip", {"open_clip_config.json": b"{}"})
    hf_hub_download("someone/tiny-clip", "open_clip_config.json")  # main moves on to `new`
    stand_in.push(LAION_REPO, {WEIGHTS: PAYLOAD})
    download.model_path(LAION)
    found = 0
    for repo in ("someone/tiny-clip", LAION_REPO, "someone/unknown"):
        for name in ("open_clip_config.json", WEIGHTS, "open_clip_model.safetensors", "README.md"):
            for revision in ("main", old, new, "v1.0"):
                theirs = try_to_load_from_cache(repo, name, revision=revision)
                expected = Path(theirs) if isinstance(theirs, str) else None
                assert hub.cached(repo, name, revision) == expected, (repo, name, revision)
                found += expected is not None
    assert found == 5  # config at old, new and main (= new); weights at old; LAION's at main


def test_text_query_path_finds_a_hub_model_without_huggingface_hubs_download_code(stand_in, tmp_path):
    stand_in.push(LAION_REPO, {WEIGHTS: PAYLOAD})
    download.model_path(LAION)
    code = (
        "import sys\n"
        "from clipsearch.clip import numpy_text, tower_file\n"
        f"assert tower_file.checkpoint_state({LAION!r}) is not None\n"
        "print(sorted(m for m in sys.modules if m.startswith(('huggingface_hub.file_download', 'httpx'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_offline_setting_uses_the_cached_file_and_makes_no_request(stand_in, monkeypatch):
    stand_in.push(LAION_REPO, {WEIGHTS: PAYLOAD})
    path = download.model_path(LAION)
    requests = len(stand_in.requests)
    _settings(monkeypatch, HF_HUB_OFFLINE="1")
    assert download.model_path(LAION) == path
    assert len(stand_in.requests) == requests


def test_offline_setting_without_the_file_says_what_to_fetch_and_where(stand_in, monkeypatch):
    stand_in.push(LAION_REPO, {WEIGHTS: PAYLOAD})
    _settings(monkeypatch, HF_HUB_OFFLINE="1")
    with pytest.raises(DownloadError) as err:
        download.model_path(LAION)
    message = str(err.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message
    assert f"{stand_in.url}/{LAION_REPO}/resolve/main/{WEIGHTS}" in message  # the mirror's URL
    assert str(model_cache_dir() / "ViT-B-32-laion2b_s34b_b79k.bin") in message
    assert stand_in.requests == []


def test_unreachable_hub_says_what_failed_and_where_to_put_the_file(monkeypatch):
    from huggingface_hub.utils import _http

    # huggingface_hub tries an unreachable hub again for ~23 s (waits of 1, 2, 4, 8, 8 s): not here.
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda seconds: None))
    with pytest.raises(DownloadError) as err:
        download.model_path(LAION)  # HF_ENDPOINT is a closed port (conftest)
    message = str(err.value)
    assert "\n" not in message and "refused" in message.lower()
    assert f"http://127.0.0.1:9/{LAION_REPO}/resolve/main/{WEIGHTS}" in message
    assert str(model_cache_dir() / "ViT-B-32-laion2b_s34b_b79k.bin") in message


def test_hub_host_that_cannot_be_resolved_fails_at_once_without_retries(monkeypatch):
    import socket

    import huggingface_hub

    looked_up = []

    def no_dns(host, port, *args, **kwargs):
        looked_up.append((host, port))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def no_request(*args, **kwargs):
        raise AssertionError("a download was tried although the hub's host does not resolve")

    _settings(monkeypatch, HF_ENDPOINT="https://hub.example.org")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_request)
    with pytest.raises(DownloadError) as err:
        download.model_path(LAION)
    message = str(err.value)
    assert looked_up == [("hub.example.org", "https")]
    assert "\n" not in message and "hub.example.org cannot be resolved (Name or service not known" in message
    assert str(model_cache_dir() / "ViT-B-32-laion2b_s34b_b79k.bin") in message


def test_copy_placed_by_hand_in_clipsearchs_cache_is_used_first(stand_in):
    placed = model_cache_dir() / "ViT-B-32-laion2b_s34b_b79k.bin"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(PAYLOAD)
    assert locate(registry.get(LAION)).describe() == "cached"
    assert download.model_path(LAION) == placed
    assert stand_in.requests == []


def test_token_goes_to_the_hub_and_not_to_the_cdn(stand_in, monkeypatch):
    stand_in.push(LAION_REPO, {WEIGHTS: PAYLOAD}, gated=True)
    with pytest.raises(DownloadError) as err:
        download.model_path(LAION)
    assert "\n" not in str(err.value) and "gated" in str(err.value) and "HF_TOKEN" in str(err.value)

    _settings(monkeypatch, HF_TOKEN=stand_in.token)
    assert download.model_path(LAION).read_bytes() == PAYLOAD
    authorization = {(r.server, r.method): r.authorization for r in stand_in.requests[1:]}
    assert authorization == {("hub", "HEAD"): f"Bearer {stand_in.token}", ("cdn", "GET"): None}


def test_download_that_does_not_match_the_hubs_hash_is_discarded(stand_in):
    stand_in.push(LAION_REPO, {WEIGHTS: PAYLOAD})
    stand_in.tampered[DIGEST] = PAYLOAD[:-1] + b"x"  # same size: only the hash tells
    with pytest.raises(DownloadError, match="discarded") as err:
        download.model_path(LAION)
    assert DIGEST in str(err.value) and "\n" not in str(err.value)
    assert hub.cached(LAION_REPO, WEIGHTS) is None
    assert not any(p.is_file() for p in _hub_cache().glob("models--*/blobs/*"))

    del stand_in.tampered[DIGEST]
    assert download.model_path(LAION).read_bytes() == PAYLOAD


def test_pinned_hash_is_checked_for_hub_files(stand_in, monkeypatch):
    stand_in.push(LAION_REPO, {WEIGHTS: PAYLOAD})
    _pin(monkeypatch, LAION, sha256="0" * 64)
    with pytest.raises(DownloadError, match="discarded"):
        download.model_path(LAION)
    _pin(monkeypatch, LAION, sha256=DIGEST)
    assert download.model_path(LAION).read_bytes() == PAYLOAD


def test_damaged_hub_cache_file_is_refused_naming_the_blob_to_delete(stand_in):
    stand_in.push(LAION_REPO, {WEIGHTS: PAYLOAD})
    blob = download.model_path(LAION).resolve()
    blob.write_bytes(PAYLOAD[:-1] + b"x")
    with pytest.raises(DownloadError, match="corrupt") as err:
        download.model_path(LAION)
    assert f"delete {blob} " in str(err.value) and "\n" not in str(err.value)

    blob.unlink()  # as the message says; the next use downloads a fresh copy
    assert download.model_path(LAION).read_bytes() == PAYLOAD


def test_interrupted_hub_download_resumes(stand_in):
    stand_in.push(LAION_REPO, {WEIGHTS: PAYLOAD})
    stand_in.blank_after = len(PAYLOAD) // 3
    assert download.model_path(LAION).read_bytes() == PAYLOAD
    ranges = [r.method for r in stand_in.requests if r.server == "cdn"]
    assert ranges == ["GET", "GET"]


def test_missing_repository_and_file_are_one_line_errors(stand_in, monkeypatch):
    with pytest.raises(DownloadError, match="no such repository") as err:
        download.model_path(LAION)
    assert "\n" not in str(err.value)
    stand_in.push(LAION_REPO, {"README.md": b"moved"})
    with pytest.raises(DownloadError, match="no such file"):
        download.model_path(LAION)


# --- hf-hub:ORG/NAME -----------------------------------------------------------------------------


TINY = dict(
    embed_dim=16,
    image_resolution=32,
    vision_layers=1,
    vision_width=64,
    vision_patch_size=16,
    vision_heads=1,
    context_length=8,
    vocab_size=50,
    text_width=64,
    text_heads=1,
    text_layers=1,
)
OPENCLIP_CONFIG = {
    "model_cfg": {"embed_dim": 16, "quick_gelu": True},
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
}


@pytest.fixture(scope="module")
def tiny_openclip_repo() -> tuple[dict[str, bytes], dict[str, torch.Tensor]]:
    """An OpenCLIP repository as the hub holds one (config + .bin weights, no safetensors)."""
    from clipsearch.clip.model import CLIP, ModelConfig

    torch.manual_seed(0)
    state_dict = CLIP(ModelConfig(**TINY)).state_dict()
    weights = io.BytesIO()
    torch.save(state_dict, weights)
    files = {"open_clip_config.json": json.dumps(OPENCLIP_CONFIG).encode(), WEIGHTS: weights.getvalue()}
    return files, state_dict


def test_hf_hub_name_loads_an_openclip_repository(stand_in, monkeypatch, tiny_openclip_repo):
    from clipsearch import clip
    from clipsearch.encoder import model_id

    files, state_dict = tiny_openclip_repo
    commit = stand_in.push("someone/tiny-clip", files)
    model, preprocess = clip.load("hf-hub:someone/tiny-clip", device="cpu", towers="image")
    assert model.config.quick_gelu is True  # from open_clip_config.json
    assert preprocess.mean == (0.5, 0.5, 0.5) and preprocess.std == (0.25, 0.25, 0.25)
    assert torch.equal(model.state_dict()["visual.proj"], state_dict["visual.proj"])
    assert model_id("hf-hub:someone/tiny-clip") == "hf-hub:someone/tiny-clip"
    # open_clip's order: safetensors first, then the .bin this repository has.
    asked = [r.path.rsplit("/", 1)[-1] for r in stand_in.requests if r.method == "HEAD"]
    assert asked == ["open_clip_config.json", "open_clip_model.safetensors", WEIGHTS]

    snapshot = _hub_cache() / "models--someone--tiny-clip" / "snapshots" / commit
    entry = registry.get("hf-hub:someone/tiny-clip")
    assert locate(entry).describe() == "cached (huggingface)" and locate(entry).path == snapshot
    _settings(monkeypatch, HF_HUB_OFFLINE="1")
    assert download.model_path("hf-hub:someone/tiny-clip") == snapshot


def test_hf_hub_folder_comes_from_one_commit(stand_in, tiny_openclip_repo):
    files, _ = tiny_openclip_repo
    first = stand_in.push("someone/tiny-clip", files)
    download.model_path("hf-hub:someone/tiny-clip")
    stand_in.push("someone/tiny-clip", {**files, WEIGHTS: PAYLOAD})  # main moves on
    assert download.model_path("hf-hub:someone/tiny-clip").name == first


def test_hf_hub_config_not_matching_its_git_id_is_discarded(stand_in, tiny_openclip_repo):
    files, _ = tiny_openclip_repo
    stand_in.push("someone/tiny-clip", files)
    config = files["open_clip_config.json"]
    stand_in.tampered[hashlib.sha256(config).hexdigest()] = config.replace(b"true", b"True")
    with pytest.raises(DownloadError, match="git blob id") as err:
        download.model_path("hf-hub:someone/tiny-clip")
    assert "discarded" in str(err.value)
    assert hub.cached("someone/tiny-clip", "open_clip_config.json") is None


def test_hf_hub_offline_without_the_files_names_the_command_to_run(stand_in, monkeypatch):
    _settings(monkeypatch, HF_HUB_OFFLINE="1")
    with pytest.raises(DownloadError) as err:
        download.model_path("hf-hub:someone/tiny-clip")
    message = str(err.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message
    assert "clipsearch models download hf-hub:someone/tiny-clip" in message and str(_hub_cache()) in message


def test_hf_hub_transformers_repository_in_the_cache_offline_names_its_snapshot_folder(stand_in, monkeypatch):
    """It was said not to be in the Hugging Face cache, where it was."""
    snapshot = _hub_cache() / "models--someone--transformers-clip" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "clip"}')
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    _settings(monkeypatch, HF_HUB_OFFLINE="1")
    with pytest.raises(DownloadError) as err:
        download.model_path("hf-hub:someone/transformers-clip")
    assert str(err.value) == (
        "hf-hub:someone/transformers-clip is in the Hugging Face cache but is not an OpenCLIP repository (it has no "
        f"open_clip_config.json); to load it as a Hugging Face model, pass its snapshot folder {snapshot}."
    )


def test_hf_hub_repository_that_is_not_an_openclip_model(stand_in):
    stand_in.push("someone/not-a-model", {"open_clip_config.json": b"{}"})
    names = "has none of open_clip_model.safetensors, open_clip_pytorch_model.bin"
    with pytest.raises(DownloadError, match=re.escape(names)):
        download.model_path("hf-hub:someone/not-a-model")
    stand_in.push("someone/transformers-clip", {"config.json": b"{}", "model.safetensors": PAYLOAD})
    with pytest.raises(DownloadError, match=re.escape("has no open_clip_config.json, so clipsearch cannot load it")):
        download.model_path("hf-hub:someone/transformers-clip")


def test_hf_hub_names():
    assert registry.get(f"hf-hub:{LAION_REPO}").name == LAION  # a repository the table knows keeps its settings
    assert registry.get(" HF-HUB:org/name ").name == "hf-hub:org/name"
    with pytest.raises(CheckpointError, match="hf-hub:ORG/NAME"):
        registry.get("hf-hub:no-slash")


# --- OpenAI's cache --------------------------------------------------------------------------------


def _openai_file(monkeypatch, content: bytes) -> Path:
    """ViT-B/32 pinned to PAYLOAD's hash, with `content` in OpenAI's cache; its URL unreachable."""
    _pin(monkeypatch, "ViT-B/32", sha256=DIGEST, url=f"http://127.0.0.1:9/{DIGEST}/ViT-B-32.pt")
    path = openai_cache_dir() / "ViT-B-32.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_openai_cache_archive_is_used_in_place_once_its_hash_matches(monkeypatch):
    theirs = _openai_file(monkeypatch, PAYLOAD)
    assert openai_cache_dir() == Path(os.environ["HOME"]) / ".cache" / "clip"
    assert locate(registry.get("ViT-B/32")).describe() == "cached (openai)"
    assert download.model_path("ViT-B/32") == theirs
    assert sorted(p.name for p in theirs.parent.iterdir()) == ["ViT-B-32.pt"]  # nothing written there
    assert not (model_cache_dir() / "ViT-B-32.pt").exists()
    monkeypatch.setattr(integrity, "sha256_file", lambda path: pytest.fail("hashed again"))
    assert download.model_path("ViT-B/32") == theirs


def test_damaged_openai_archive_is_refused_with_a_warning_and_not_used(monkeypatch, caplog, clipsearch_logging):
    theirs = _openai_file(monkeypatch, PAYLOAD[:-1] + b"x")
    assert locate(registry.get("ViT-B/32")).describe() == "cached (openai)"  # not hashed by a listing
    with caplog.at_level(logging.WARNING, "clipsearch"), pytest.raises(DownloadError) as err:
        download.model_path("ViT-B/32")
    assert f"Not using {theirs} from OpenAI's cache" in caplog.text and DIGEST in caplog.text
    assert str(model_cache_dir() / "ViT-B-32.pt") in str(err.value)  # downloads its own copy instead
    assert theirs.read_bytes() == PAYLOAD[:-1] + b"x"  # theirs: left alone
    assert locate(registry.get("ViT-B/32")).describe() == "-"  # the check is remembered

    own = model_cache_dir() / "ViT-B-32.pt"
    own.write_bytes(PAYLOAD)
    assert download.model_path("ViT-B/32") == own


# --- the CLI ---------------------------------------------------------------------------------------


def test_models_listing_says_where_each_model_is(stand_in, monkeypatch):
    stand_in.push(LAION_REPO, {WEIGHTS: PAYLOAD})
    download.model_path(LAION)
    _openai_file(monkeypatch, PAYLOAD)
    own = model_cache_dir() / "RN50.pt"
    own.write_bytes(b"placed by hand")
    rows = {cells[0]: cells[-2:] for cells in map(_columns, CliRunner().invoke(app, ["models"]).stdout.splitlines())}
    assert rows[LAION] == ["cached (huggingface)", f"hf-hub:{LAION_REPO}"]
    assert rows["ViT-B/32"] == ["cached (openai)", "openaipublic.azureedge.net"]
    assert rows["RN50"] == ["cached", "openaipublic.azureedge.net"]
    assert rows["RN101"] == ["-", "openaipublic.azureedge.net"]
    assert rows["demo"] == ["bundled", "clipsearch package"]


def _columns(line: str) -> list[str]:
    return re.split(r"\s{2,}", line)


def test_models_download_in_a_process_honours_the_hub_settings(stand_in, tmp_path):
    """The real environment variables, read by huggingface_hub at import in a fresh process."""
    stand_in.push(LAION_REPO, {WEIGHTS: PAYLOAD}, gated=True)
    env = {**os.environ, "HF_ENDPOINT": stand_in.url, "HF_TOKEN": stand_in.token, "HF_HOME": str(tmp_path / "hf")}

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess:
        command = [str(Path(sys.executable).parent / "clipsearch"), *args]
        return subprocess.run(command, env={**env, **extra}, capture_output=True, text=True, timeout=120)

    done = cli("models", "download", LAION)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "hf" / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert done.stdout.startswith(f"{LAION}: {path}/snapshots/") and "(cached (huggingface))" in done.stdout
    listed = cli("models", HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9").stdout
    assert any(line.startswith(LAION) and "cached (huggingface)" in line for line in listed.splitlines())

    offline = cli("models", "download", LAION, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty"))
    assert offline.returncode == 1 and offline.stderr.count("\n") == 1 and "HF_HUB_OFFLINE" in offline.stderr


def test_quiet_silences_huggingface_hubs_retry_lines(stand_in, tmp_path):
    """`-q` prints nothing but results and errors: a hub busy for a moment had put
    huggingface_hub's "HTTP Error 503 ... Retrying in 1s" lines on stderr all the same."""
    stand_in.push(LAION_REPO, {WEIGHTS: PAYLOAD})
    env = {**os.environ, "HF_ENDPOINT": stand_in.url, "HF_HOME": str(tmp_path / "hf")}
    command = [str(Path(sys.executable).parent / "clipsearch"), "-q", "models", "download", LAION]
    stand_in.busy = 2  # huggingface_hub retries the second 503 (after 1 s), and says so
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    (fetched,) = (tmp_path / "hf" / "hub").glob(f"models--laion--*/snapshots/*/{WEIGHTS}")
    assert stand_in.busy == 0 and fetched.read_bytes() == PAYLOAD  # it did retry, and got the file
