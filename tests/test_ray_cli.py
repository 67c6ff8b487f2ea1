"""`clipsearch index --from-list` and `--ray` where no cluster is needed: file lists indexed
locally, usage errors, and the one line a missing Ray extra gets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import make_library
from reliability_helpers import catalog_rows, run_cli
from typer.testing import CliRunner

from clipsearch.cli import app
from clipsearch.errors import ClipsearchError
from clipsearch.manifest import Manifest


@pytest.fixture
def cli(tmp_path):
    runner = CliRunner()

    def run(*args, code=0):
        result = runner.invoke(app, ["--home", str(tmp_path / "home"), *map(str, args)])
        assert result.exit_code == code, (result.exit_code, result.output, result.exception)
        return result

    return run


def test_a_file_list_indexes_what_it_names_and_marks_listed_files_gone_as_missing(
    cli, tmp_path, tiny_model, monkeypatch
):
    images = make_library(tmp_path / "lib", 6)
    listed = tmp_path / "files.txt"
    monkeypatch.chdir(tmp_path)  # relative lines are relative to the current directory
    listed.write_text(f"{images[0]}\n\nlib/{images[1].relative_to(tmp_path / 'lib')}\r\n{images[2]}\n{images[0]}\n")
    out = cli("index", "--from-list", listed, "--model", tiny_model, "--workers", "0").stdout
    assert out.startswith("new 3, changed 0, moved 0, copied 0, removed 0, failed 0, unchanged 0")
    assert sorted(catalog_rows(tmp_path / "home")) == sorted(os.fsencode(p) for p in images[:3])

    # The walk indexes the rest; a list naming one file that is gone now leaves the others alone.
    cli("index", tmp_path / "lib")
    images[0].unlink()
    listed.write_text(f"{images[0]}\n{images[3]}\n")
    out = cli("index", "--from-list", listed).stdout
    assert out.startswith("new 0, changed 0, moved 0, copied 0, removed 1, failed 0, unchanged 1")
    rows = catalog_rows(tmp_path / "home")
    assert rows[os.fsencode(images[0])][0] == "missing"
    assert [status for status, _ in rows.values()].count("indexed") == 5


def test_a_parquet_file_list(tmp_path, tiny_model):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    images = make_library(tmp_path / "lib", 3)
    pq.write_table(pa.table({"path": [str(p) for p in images[:2]]}), tmp_path / "files.parquet")
    assert [os.fsdecode(f.path) for f in Manifest(tmp_path / "files.parquet")] == [str(p) for p in images[:2]]
    pq.write_table(pa.table({"file": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(ClipsearchError, match=r"other.parquet is not a Parquet file with a `path` column"):
        list(Manifest(tmp_path / "other.parquet"))


def test_folders_or_a_file_list_not_both_nor_neither(cli, tmp_path):
    (tmp_path / "files.txt").write_text("")
    for args in [(), (tmp_path, "--from-list", tmp_path / "files.txt")]:
        result = run_cli("--home", tmp_path / "home", "index", *args)
        assert result.returncode == 2 and result.stderr.count(b"\n") == 1, result.stderr
        assert b"Error: Invalid value for PATHS: name folders to index, or list files with --from-list" in result.stderr
    missing = cli("index", "--from-list", tmp_path / "nowhere.txt", code=1)
    assert missing.output.strip() == f"Error: The file list {tmp_path / 'nowhere.txt'} does not exist; check the path."
    folder = cli("index", "--from-list", tmp_path, code=1)
    assert (
        folder.output.strip()
        == f"Error: The file list {tmp_path} is a folder; index a folder by naming it, without --from-list."
    )


def test_a_file_list_read_from_a_pipe(tmp_path, tiny_model):
    """``find ... | clipsearch index --from-list -`` and ``--from-list <(find ...)``: a pipe
    is no regular file, and had been refused as one that "does not exist"."""
    images = make_library(tmp_path / "lib", 3)
    listed = "".join(f"{p}\n" for p in images[:2]).encode()
    home = tmp_path / "home"
    result = run_cli("--home", home, "index", "--from-list", "-", "--model", tiny_model, "--workers", "0", input=listed)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"new 2, changed 0")
    read, write = os.pipe()
    os.write(write, f"{images[2]}\n".encode())
    os.close(write)
    piped = run_cli("--home", home, "index", "--from-list", f"/dev/fd/{read}", "--workers", "0", pass_fds=(read,))
    os.close(read)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith(b"new 1, changed 0")
    assert sorted(catalog_rows(home)) == sorted(os.fsencode(p) for p in images)


def test_without_ray_installed_ray_runs_fail_in_one_line_naming_the_extra(tmp_path):
    make_library(tmp_path / "lib", 1)
    hide_ray = "import sys; sys.modules['ray'] = None; from clipsearch.cli import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", hide_ray, "--home", tmp_path / "home", "index", tmp_path / "lib", "--ray", "auto"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "Error: Indexing on Ray needs Ray Data, which is not installed: pip install 'clipsearch[ray]'.\n"
    )
    assert not (tmp_path / "home").exists()  # refused before anything was created


def test_a_cluster_address_where_nothing_answers_fails_in_seconds(tmp_path, tiny_model):
    """Ray retries such an address for some 14 minutes, deaf to Ctrl-C meanwhile."""
    pytest.importorskip("ray", reason="the Ray tests need the [ray] extra")
    import socket
    import time

    make_library(tmp_path / "lib", 2)
    with socket.socket() as s:  # a port nothing listens on once this closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    result = run_cli(
        "--home", tmp_path / "home", "index", tmp_path / "lib", "--model", tiny_model, "--ray", f"127.0.0.1:{port}"
    )
    assert time.monotonic() - started < 30
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr.decode() == (
        f"Error: Cannot connect to the Ray cluster at 127.0.0.1:{port}: nothing answers there (Connection refused); "
        "is `ray start --head` running, and is the address right?\n"
    )


def test_a_run_waiting_on_the_cluster_stops_when_told_or_when_a_lost_node_left_it_stuck(monkeypatch):
    """`ray_index._watched`: Ctrl-C had waited for a batch that never came (a node lost)."""
    pytest.importorskip("ray", reason="the Ray tests need the [ray] extra")
    import threading
    import time

    from clipsearch import ray_index

    never = threading.Event()

    def stuck():
        yield {"batch": 1}
        never.wait(60)  # the cluster sends nothing more
        yield {"batch": 2}

    asked = time.monotonic() + 0.5
    started = time.monotonic()
    got = list(ray_index._watched(stuck(), lambda: time.monotonic() > asked, lambda: 2))
    assert got == [{"batch": 1}] and time.monotonic() - started < 2.5
    monkeypatch.setattr(ray_index, "STALL_S", 0.5)
    nodes = iter([2, 1, 1, 1, 1, 1])  # one of two nodes left
    with pytest.raises(ray_index._Stalled, match="a node left the cluster and no batch came for 0 s since"):
        list(ray_index._watched(stuck(), lambda: False, lambda: next(nodes)))
    failed = ray_index._run_failed(ray_index._Stalled("a node left"), 32, 410)
    assert str(failed) == (
        "The Ray run stopped after 32 of 410 files, which are saved (run the same command again to go on): a node left"
    )
    never.set()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--ray", ""], "'' is not a Ray cluster's address"),
        (["--ray", "garbage::x"], "'garbage::x' is not a Ray cluster's address"),
        (["--ray", "http://head:6379"], "give auto, local, HOST:PORT"),
        (["--ray", "auto", "--workers", "0"], "0 decodes in this process; a Ray run decodes on the cluster"),
    ],
)
def test_a_ray_address_or_workers_that_cannot_work_are_usage_errors(cli, tmp_path, args, says):
    """They had failed only after the walk and the model's load, as errors of the cluster."""
    pytest.importorskip("ray", reason="the Ray tests need the [ray] extra")
    make_library(tmp_path / "lib", 1)
    result = cli("index", tmp_path / "lib", *args, code=2)
    assert says in " ".join(result.stderr.replace("│", " ").split())
    assert not (tmp_path / "home").exists()
