"""The benchmark scripts still run against the code they measure (each at a tiny size): they
are not run in CI otherwise, and a renamed function had left one crashing."""

import importlib.util
import os
import subprocess
import sys
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
