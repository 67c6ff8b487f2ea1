"""The README's examples run as written, on stand-ins for what this machine cannot have.

No real CLIP weights can be downloaded here and nobody's ~/photos exists, so each block runs
with those names swapped for a small random CLIP with CLIP's own vocabulary and a generated
library: the code a user copies is what runs, word for word otherwise.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_CONFIG, make_image, make_library

README = Path(__file__).parent.parent / "README.md"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
# Install and test commands: CI runs those itself (.ci/run follows the quick start).
NOT_RUN = ("pip install", "pytest", "python3 -m venv")


def blocks(language: str) -> list[str]:
    return [code for lang, code in BLOCK.findall(README.read_text()) if lang == language]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    """What each name the README uses stands for here."""
    import torch

    from clipsearch.clip import registry
    from clipsearch.clip.checkpoints import write_model_dir
    from clipsearch.clip.model import CLIP, ModelConfig

    root = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    model = CLIP(ModelConfig(**(TINY_CONFIG | {"vocab_size": 49408, "context_length": 77})))
    clip_like = write_model_dir(root / "clip-like", model, registry.VOCAB.bundled, mean=(0.5,) * 3, std=(0.25,) * 3)
    photos = root / "photos"
    make_library(photos, 6)
    make_library(photos / "2024", 2, start_seed=6)  # `--under ~/photos/2024` needs it there
    for name in ("cat.jpg", "query.jpg", "holiday.jpg", "photo.jpg"):
        make_image(root / name, seed=len(name))
    return {
        "ViT-B/32": str(clip_like),
        "~/photos": str(photos),
        "~/.local/share/clipsearch": str(root / "home"),
        "cwd": str(root),
    }


def swap(code: str, stand_ins: dict[str, str]) -> str:
    for name, value in stand_ins.items():
        code = code.replace(name, value)
    return code


def test_the_readme_has_the_examples_this_file_runs():
    assert len(blocks("python")) == 2 and len(blocks("sh")) >= 4


@pytest.mark.parametrize("number", range(2))
def test_python_blocks_run(number, stand_ins):
    code = swap(blocks("python")[number], stand_ins)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=stand_ins["cwd"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr


def test_shell_examples_run(stand_ins):
    lines = [
        line.split("  #")[0]
        for code in blocks("sh")
        for line in code.splitlines()
        if line.startswith("clipsearch") and not any(word in line for word in NOT_RUN)
    ]
    assert len(lines) >= 6
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for line in lines:
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", swap(line, stand_ins)],
            cwd=stand_ins["cwd"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, (line, result.stderr)
