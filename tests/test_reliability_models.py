"""Model files read before they are trusted (issue 18 items 5, 8 and 10): normalisation settings
are checked when a model loads, what a model folder makes clipsearch read or allocate is bounded,
and nothing outside the folder is read through it or copied out of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from helpers import make_library
from reliability_helpers import assert_no_traceback
from typer.testing import CliRunner

from clipsearch.cli import app


@pytest.fixture
def model_copy(tmp_path, tiny_model):
    """A copy of the tiny model's folder that a test may spoil."""
    return shutil.copytree(tiny_model, tmp_path / "model")


def set_config(model_dir, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **changes}))


def index_with(tmp_path, model) -> tuple[int, str]:
    make_library(tmp_path / "lib", 2)
    result = CliRunner().invoke(
        app, ["--home", str(tmp_path / "home"), "index", str(tmp_path / "lib"), "--model", str(model), "--workers", "0"]
    )
    assert_no_traceback(result.stdout, result.stderr)
    return result.exit_code, result.stderr


@pytest.mark.parametrize(
    "setting, value",
    [
        ("image_std", [0, 0, 0]),  # before: every vector NaN, exit 0
        ("image_std", [0.2, -0.2, 0.2]),
        ("image_mean", [0.5, 0.5]),  # before: every image failed, and the failures stuck
        ("image_mean", ["a", 0.5, 0.5]),
        ("image_mean", 0.5),
        ("image_std", [0.2, float("nan"), 0.2]),
    ],
)
def test_bad_normalisation_settings_are_refused_when_the_model_loads(tmp_path, model_copy, setting, value):
    set_config(model_copy, **{setting: value})
    code, stderr = index_with(tmp_path, model_copy)
    assert code == 1 and stderr.count("\n") == 1, stderr
    assert f"{model_copy} gives {setting} " in stderr and "3 finite numbers" in stderr, stderr
    assert not (tmp_path / "home" / "catalog.db").exists() or "failed" not in stderr


# --- what a model file may make clipsearch read or allocate ----------------------------------

# Reads each checkpoint named on its command line in a fresh process (torch imported first),
# under an address-space cap of what it uses then + 1 GB; prints per file the error (None if it
# loaded) and the peak memory growth in MB.
_CHECKPOINT_PROBE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from clipsearch.clip.checkpoints import read_checkpoint

    def vm_bytes():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))

    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + (1 << 30), resource.RLIM_INFINITY))
    for path in sys.argv[1:]:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_checkpoint(path)
            error = None
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
        print(json.dumps([path, error, grown_mb]))
""")


def read_in_bounded_memory(*paths) -> dict[str, tuple[str | None, float]]:
    out = subprocess.run(
        [sys.executable, "-c", _CHECKPOINT_PROBE, *map(str, paths)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return {os.path.basename(path): (error, grown) for path, error, grown in map(json.loads, out.stdout.splitlines())}


def zip_bomb_checkpoint(path, unpacked: int = 768 << 20) -> None:
    """A torch.save file whose one storage member is replaced by ``unpacked`` bytes of zeros,
    deflated (under 1 MB on disk): loading it naively inflates all of it."""
    import torch

    plain = path.with_suffix(".plain")
    torch.save({"weight": torch.zeros(4)}, plain)
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(path, "w") as bomb:
        for info in source.infolist():
            if "/data/" not in info.filename:
                bomb.writestr(info, source.read(info))
                continue
            deflated = zipfile.ZipInfo(info.filename)
            deflated.compress_type = zipfile.ZIP_DEFLATED
            with bomb.open(deflated, "w", force_zip64=True) as member:
                chunk = bytes(1 << 20)
                for _ in range(unpacked >> 20):
                    member.write(chunk)
    plain.unlink()


@pytest.mark.slow
def test_model_files_that_would_balloon_are_refused_before_they_are_read(tmp_path, tiny_model):
    zip_bomb_checkpoint(tmp_path / "bomb.pt")
    assert (tmp_path / "bomb.pt").stat().st_size < 2 << 20
    sparse = Path(shutil.copytree(tiny_model, tmp_path / "huge-config"))
    with open(sparse / "config.json", "r+b") as f:
        f.truncate(3 << 30)  # sparse: 3 GiB that take no disk
    results = read_in_bounded_memory(tmp_path / "bomb.pt", sparse)
    error, grown = results["bomb.pt"]
    assert error is not None and "unpacks to 805 MB" in error and grown < 100, (error, grown)
    error, grown = results["huge-config"]
    assert error is not None and "larger than a model's settings file" in error and grown < 100, (error, grown)


# --- links out of a model folder, and what is copied out of it -------------------------------


def hugging_face_dir(directory: Path, merges: bytes = b"#version: 0.2\nh e\n") -> Path:
    """A small Hugging Face CLIPModel folder with a merges.txt."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1, vocab_size=520)
    text |= dict(max_position_embeddings=8, bos_token_id=518, eos_token_id=519, pad_token_id=0)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1)
    vision |= dict(image_size=32, patch_size=16)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(directory)
    (directory / "merges.txt").write_bytes(merges)
    return directory


def cached_vocabularies() -> list[Path]:
    from clipsearch.paths import model_cache_dir

    return sorted((model_cache_dir() / "vocab").glob("merges-*"))


@pytest.mark.slow
def test_a_link_out_of_a_model_folder_is_not_followed(tmp_path):
    """merges.txt links to a private file elsewhere: before, its content was copied into the
    cache, readable by everyone."""
    from clipsearch.clip.checkpoints import read_checkpoint
    from clipsearch.errors import CheckpointError

    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"#version: 0.2\ns ecret\n")
    secret.chmod(0o600)
    directory = hugging_face_dir(tmp_path / "hf")
    (directory / "merges.txt").unlink()
    (directory / "merges.txt").symlink_to(secret)
    with pytest.raises(CheckpointError, match=r"merges.txt links outside the model folder"):
        read_checkpoint(directory)
    assert cached_vocabularies() == []


@pytest.mark.slow
def test_a_hugging_face_cache_snapshot_still_loads_and_a_private_vocabulary_stays_private(tmp_path):
    """The Hugging Face cache links each file of a snapshot to ../../blobs: that layout loads. A
    merges.txt readable by its owner only is cached readable by its owner only."""
    from clipsearch.clip.checkpoints import read_checkpoint

    built = hugging_face_dir(tmp_path / "built", merges=b"#version: 0.2\np rivate\n")
    (built / "merges.txt").chmod(0o600)
    repo = tmp_path / "hub" / "models--someone--tiny-clip"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in built.iterdir():
        blob = repo / "blobs" / f"blob-{file.name}"
        shutil.move(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    _, info = read_checkpoint(snapshot)
    assert info.vocab_path is not None and info.vocab_path.read_bytes()
    assert info.vocab_path.stat().st_mode & 0o077 == 0, oct(info.vocab_path.stat().st_mode)
