"""Model files read before they are trusted (issue 18 items 5, 8 and 10): normalisation settings
are checked when a model loads, what a model folder makes clipsearch read or allocate is bounded,
and nothing outside the folder is read through it or copied out of it."""

from __future__ import annotations

import json
import shutil

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
