"""What an installation gets: one version everywhere, every subpackage, the type marker, the licence."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import tomllib

import clipsearch

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def test_the_version_is_written_once_and_the_script_prints_it():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert SETUPTOOLS["dynamic"]["version"] == {"attr": "clipsearch.__version__"}
    assert importlib.metadata.version("clipsearch") == clipsearch.__version__

    script = Path(sys.executable).parent / "clipsearch"  # the entry point the installation made
    printed = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60, check=True)

    assert printed.stdout == f"clipsearch {clipsearch.__version__}\n"


def test_every_subpackage_is_installed():
    source = ROOT / "clipsearch"
    on_disk = {
        ".".join(("clipsearch", *init.parent.relative_to(source).parts))
        for init in source.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert on_disk <= set(SETUPTOOLS["packages"])
    assert "clipsearch.training" in on_disk


def test_type_checkers_are_told_the_package_is_typed():
    assert (ROOT / "clipsearch" / "py.typed").is_file()
    assert "py.typed" in SETUPTOOLS["package-data"]["clipsearch"]


def test_the_licence_file_is_the_mit_licence_pyproject_names():
    assert PYPROJECT["project"]["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n") and "Copyright (c) clipsearch authors" in text
    assert "Permission is hereby granted, free of charge" in text


def test_the_source_distribution_holds_every_file_of_the_repository(tmp_path):
    """setuptools alone put only tests/test_*.py in the sdist: its suite could not import its
    helpers, and the sample images and docs the README names were missing."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "source"
    for name in tracked:  # a copy, so the build writes nothing into the checkout
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((ROOT / name).read_bytes())
    build = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path / 'dist')!r}))"
    built = subprocess.run([sys.executable, "-c", build], cwd=source, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    import tarfile

    with tarfile.open(tmp_path / "dist" / built.stdout.split()[-1]) as sdist:
        top = f"clipsearch-{clipsearch.__version__}/"
        held = {member.name.removeprefix(top) for member in sdist.getmembers() if member.isfile()}
    assert set(tracked) - {".gitignore"} <= held, sorted(set(tracked) - held)[:10]
    assert not [name for name in held if "__pycache__" in name or name.endswith(".pyc")]
