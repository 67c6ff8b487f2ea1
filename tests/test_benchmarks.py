"""The benchmark scripts still run against the code they measure (each at a tiny size): they
are not run in CI otherwise, and a renamed function had left one crashing."""

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their helpers (common, ...) by name
    try:
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_verify_cost_fingerprints_every_file_again(tmp_path, capsys):
    load("verify_cost").main(7, 4096, tmp_path / "files")  # had called indexer._verify, long gone
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("7 files of 0.00 MB: ") for line in lines)
    assert len(list((tmp_path / "files").iterdir())) == 7


def test_scale_reuse_without_a_saved_index_says_to_run_it_first(tmp_path):
    script = BENCHMARKS / "scale.py"
    env = {**os.environ, "BENCH_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(script), "--count", "50000", "--reuse"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2  # had been 1, FAISS's "could not open ... vectors-1.faiss" traceback
    assert result.stderr.splitlines()[-1] == (
        "scale.py: error: no index of 50,000 vectors saved yet: run without --reuse first"
    )


def test_vector_checksum_leaves_no_files_behind(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    load("vector_checksum").main(2000)  # each run had left two ~200 MB FAISS files in /tmp
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["Flat", "Flat"]  # "auto" is Flat at 2,000
    assert list(tmp_path.iterdir()) == []


def test_scripts_without_options_answer_help_instead_of_running():
    for name in ("vector_checksum", "verify_cost"):  # one ran its whole benchmark, one crashed
        result = subprocess.run(
            [sys.executable, str(BENCHMARKS / f"{name}.py"), "--help"], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0 and result.stdout.startswith("usage: "), result.stderr
