"""Concurrency: queries while an indexer writes, a second indexer on the same home, two
queries at once. SQLite's WAL lets readers see committed batches without waiting; the writer
lock (flock on home/index.lock) keeps a second writer out with a clear error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import faiss_file, make_library
from reliability_helpers import (
    assert_no_traceback,
    catalog_vectors,
    expected_vectors,
    indexed_count,
    integrity,
    kill_group,
    photo_library,
    start_cli,
    wait_until,
)
from typer.testing import CliRunner

from clipsearch.catalog import Catalog
from clipsearch.cli import app
from clipsearch.index import Index

LOCKED = "Another clipsearch process is indexing"


def start_index(home, lib, model, encode_delay_s: float = 0.0):
    return start_cli(
        "--home",
        home,
        "index",
        lib,
        "--model",
        model,
        "--precision",
        "fp32",
        "--workers",
        "0",
        "--batch-size",
        "4",
        encode_delay_s=encode_delay_s,
    )


@pytest.mark.slow
def test_queries_during_an_index_run_succeed_and_see_committed_images(tmp_path, tiny_model, tiny_encoder):
    home, lib = tmp_path / "home", tmp_path / "lib"
    library = photo_library(lib, 96)
    expected = expected_vectors(tiny_encoder, library)
    process = start_index(home, lib, tiny_model, encode_delay_s=0.1)  # a real model's pace: 24 batches, 2.4 s+
    queried_while_running = 0
    cli_query = None
    try:
        assert wait_until(lambda: indexed_count(home) >= 4, timeout=120, process=process)
        with Index.open(home, readonly=True) as index:
            while process.poll() is None:
                committed = set(catalog_vectors(home))  # read before the query: a floor
                hits = index.search("anything", k=1000)
                found = {os.fsencode(h.path) for h in hits}
                assert committed <= found, "a committed image is missing from the results"
                assert found <= set(expected) and all(h.path.exists() for h in hits)
                probe = sorted(committed)[len(committed) // 2]
                (top,) = index.search(Path(os.fsdecode(probe)), k=1)
                assert os.fsencode(top.path) == probe and top.score > 0.999
                if process.poll() is None:
                    queried_while_running += 1
                if cli_query is None:  # and one from another process, through the CLI
                    cli_probe = probe
                    cli_query = start_cli("--home", home, "query", os.fsdecode(probe), "-k", "1", "--paths-only")
        process.wait(120)
        assert cli_query is not None
        out, err = cli_query.communicate(timeout=120)
    finally:
        kill_group(process)
        if cli_query is not None:
            kill_group(cli_query)
    assert process.returncode == 0, process.stderr.read()
    assert queried_while_running >= 3
    assert cli_query.returncode == 0, err
    assert out == cli_probe + b"\n"
    assert_no_traceback(err)
    assert integrity(home) == ["ok"] and len(catalog_vectors(home)) == 96


@pytest.fixture
def cli(tmp_path, tiny_model):
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, ["--home", str(tmp_path / "home"), *map(os.fsdecode, args)])

    return run


def test_writers_meet_a_held_lock_with_a_clear_error_and_change_nothing(tmp_path, cli, tiny_model):
    """While an indexer holds the home's writer lock, `index`, `remove` and `rebuild` fail at
    once with one line saying why and what to do, and leave the catalog as it was."""
    home = tmp_path / "home"
    make_library(tmp_path / "lib", 4)
    make_library(tmp_path / "more", 3, start_seed=10)
    assert cli("index", tmp_path / "lib", "--model", tiny_model, "--workers", "0").exit_code == 0
    before = catalog_vectors(home)
    with Catalog.open(home) as catalog, catalog.writer_lock():  # what a running indexer holds
        for args in (["index", tmp_path / "more"], ["remove", tmp_path / "lib"], ["rebuild"]):
            result = cli(*args)
            assert result.exit_code == 1, (args, result.output)
            assert result.stderr.count("\n") == 1 and LOCKED in result.stderr, result.stderr
            assert str(home) in result.stderr
        assert cli("query", "anything", "--paths-only").exit_code == 0  # readers are not blocked
        assert cli("status").exit_code == 0
    after = catalog_vectors(home)
    assert after.keys() == before.keys() and all(np.array_equal(after[p], before[p]) for p in before)
    assert integrity(home) == ["ok"]
    assert cli("index", tmp_path / "more", "--workers", "0").exit_code == 0  # lock released: works
    assert len(catalog_vectors(home)) == 7


@pytest.mark.slow
def test_two_indexers_started_together_on_one_home(tmp_path, tiny_model, tiny_encoder):
    """Both processes race for a new home: one indexes, the other either fails with the clear
    error or (if it got the lock after the first finished) finds everything unchanged. The
    catalog ends up complete and every vector is the right one."""
    home, lib = tmp_path / "home", tmp_path / "lib"
    library = photo_library(lib, 40)
    first, second = start_index(home, lib, tiny_model), start_index(home, lib, tiny_model)
    try:
        outcomes = []
        for process in (first, second):
            out, err = process.communicate(timeout=180)
            assert_no_traceback(out, err)
            outcomes.append((process.returncode, out.decode(), err.decode()))
    finally:
        kill_group(first)
        kill_group(second)
    codes = sorted(code for code, _, _ in outcomes)
    assert codes in ([0, 0], [0, 1]), outcomes
    for code, out, err in outcomes:
        if code == 1:
            assert LOCKED in err and err.count("\n") == 1, err
        else:
            assert "new 40," in out or "unchanged 40 " in out, out
    assert integrity(home) == ["ok"]
    stored, expected = catalog_vectors(home), expected_vectors(tiny_encoder, library)
    assert stored.keys() == expected.keys()
    for path in stored:
        np.testing.assert_allclose(stored[path], expected[path], atol=2e-3)


def test_switching_a_new_catalog_to_wal_waits_out_a_racing_opener(monkeypatch):
    """The race above, made certain: SQLite refuses the WAL switch at once ("database is
    locked", no busy wait) to the second of two processes creating a catalog together."""
    import sqlite3

    from clipsearch import catalog as catalog_module

    class Racing:
        def __init__(self, refusals):
            self.refusals, self.statements = refusals, []

        def execute(self, sql):
            self.statements.append(sql)
            if self.refusals:
                self.refusals -= 1
                raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(catalog_module, "_LOCK_POLL_S", 0.001)
    conn = Racing(refusals=3)
    catalog_module._use_wal(conn)
    assert conn.statements == ["PRAGMA journal_mode = WAL"] * 4
    monkeypatch.setattr(catalog_module, "_BUSY_TIMEOUT_MS", 0)  # a lock that outlasts the timeout
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        catalog_module._use_wal(Racing(refusals=1))


@pytest.mark.slow
def test_two_queries_at_once(tmp_path, cli, tiny_model):
    """Two query processes (and a status) at the same moment, on an index whose FAISS file has
    to be rebuilt by each of them: all succeed with the same answer, nothing is damaged."""
    home = tmp_path / "home"
    images = make_library(tmp_path / "lib", 12)
    assert cli("index", tmp_path / "lib", "--model", tiny_model, "--workers", "0").exit_code == 0
    faiss_file(home).unlink()
    probe = os.fsdecode(images[5])
    processes = [start_cli("--home", home, "query", probe, "-k", "3", "--paths-only") for _ in range(2)]
    processes.append(start_cli("--home", home, "status"))
    results = [(p.wait(120), *p.communicate()) for p in processes]
    for code, out, err in results:
        assert code == 0, err
        assert_no_traceback(out, err)
    assert results[0][1] == results[1][1] and results[0][1].splitlines()[0] == os.fsencode(probe)
    assert b"12 indexed" in results[2][1]
    assert integrity(home) == ["ok"]
    assert cli("query", probe, "-k", "1", "--paths-only").stdout_bytes == os.fsencode(probe) + b"\n"
