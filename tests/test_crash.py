"""Crashes: an indexer killed at random moments (SIGKILL) or stopped with Ctrl-C (SIGINT).

Each kill lands at a moment drawn from a seeded generator: during start-up, after some batches,
while workers decode. After every kill the catalog must pass SQLite's integrity check, the FAISS
file must match the catalog or be detected as stale and rebuilt, every stored vector must be the
one its path's file gives (no vector attached to the wrong path), queries must return only
files that exist, and the next run must finish the rest without re-encoding what was committed
(a committed row keeps its `indexed_at` and vector; the final run's encodes are counted)."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from helpers import faiss_file
from reliability_helpers import (
    TimedLines,
    assert_no_traceback,
    catalog_vectors,
    expected_vectors,
    indexed_count,
    kill_group,
    photo_library,
    wait_until,
)
from reliability_helpers import (
    start_index as start_cli_index,
)

from clipsearch.index import Index
from clipsearch.vectors import VectorIndex, held_ids

LIBRARY_SIZE = 96
CTRL_C_LIBRARY_SIZE = 48
BATCH = 4


@pytest.fixture
def library(tmp_path):
    return photo_library(tmp_path / "lib", LIBRARY_SIZE)


ENCODE_DELAY_S = 0.1  # per batch of BATCH images: a real model's pace, so kills land mid-run


def start_index(home, lib, model, *extra):
    return start_cli_index(home, lib, model, *extra, batch=BATCH, encode_delay_s=ENCODE_DELAY_S)


def committed_rows(home) -> dict[bytes, tuple[float, bytes]]:
    """path -> (indexed_at, vector blob) of the indexed rows: a re-encode would change both."""
    if not (home / "catalog.db").exists():
        return {}
    with sqlite3.connect(f"file:{home / 'catalog.db'}?mode=ro", uri=True) as conn:
        try:
            return {
                path: (indexed_at, blob)
                for path, indexed_at, blob in conn.execute(
                    "SELECT images.path, images.indexed_at, vectors.vector FROM images "
                    "JOIN vectors ON vectors.image_id = images.id WHERE images.status = 'indexed'"
                )
            }
        except sqlite3.OperationalError:  # killed before the schema existed
            return {}


def faiss_file_ids(home) -> set[int] | None:
    """The catalog ids the FAISS file on disk holds, read with FAISS alone; None if unreadable."""
    try:
        index = faiss.read_index(str(faiss_file(home)))
    except (RuntimeError, ValueError):  # damaged, or not written yet
        return None
    return set(held_ids(index).tolist())


def catalog_ids(home) -> set[int]:
    with sqlite3.connect(f"file:{home / 'catalog.db'}?mode=ro", uri=True) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM images WHERE status = 'indexed'")}


def check_index_after_crash(home, expected: dict[bytes, np.ndarray], caplog) -> None:
    """Everything a crash must leave true, checked from outside the crashed process."""
    if not (home / "catalog.db").exists():
        return  # killed before the catalog was created: nothing to check, nothing lost
    with sqlite3.connect(f"file:{home / 'catalog.db'}?mode=ro", uri=True) as conn:
        assert [row[0] for row in conn.execute("PRAGMA integrity_check")] == ["ok"]
    stored = catalog_vectors(home)
    for path, vector in stored.items():  # every vector belongs to the file at its path
        np.testing.assert_allclose(vector, expected[path], atol=2e-3, err_msg=os.fsdecode(path))
    try:
        index = Index.open(home, readonly=True)
    except Exception as error:  # only acceptable before the first commit: no model recorded yet
        assert not stored, error
        return
    with index:
        model = index.catalog.model(index.model)
        if model is None:  # killed before the first commit: no model recorded yet
            assert not stored
            return
        on_disk = faiss_file_ids(home)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="clipsearch"):
            vectors = VectorIndex.load(home, index.catalog, model, save=False)
        if on_disk is not None and on_disk != catalog_ids(home):
            # A stale file is detected, then brought up to date or rebuilt.
            assert "Updated the vector index" in caplog.text or "Rebuilding the vector index" in caplog.text
        assert vectors.ntotal == len(stored)
        status = index.status()
        assert status.consistent and status.counts["indexed"] == len(stored)
        if not stored:
            return
        hits = index.search("a photo", k=len(stored))
        assert sorted(os.fsencode(h.path) for h in hits) == sorted(stored)
        assert all(h.path.exists() for h in hits)
        for path in sorted(stored)[:: max(1, len(stored) // 4)]:  # query by example finds the file
            (top,) = index.search(Path(os.fsdecode(path)), k=1)
            assert os.fsencode(top.path) == path and top.score > 0.999


def kill_when(process, home, rows: int | None, delay: float) -> None:
    """SIGKILL the indexer (and its workers) ``delay`` seconds after ``rows`` rows are indexed,
    or after start-up began when ``rows`` is None."""
    try:
        if rows is not None:
            assert wait_until(lambda: indexed_count(home) >= rows, timeout=120, process=process)
        time.sleep(delay)
    finally:
        kill_group(process)
        process.wait(30)


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_committed(
    tmp_path, library, tiny_model, tiny_encoder, encoded, caplog, clipsearch_logging
):
    home, lib = tmp_path / "home", tmp_path / "lib"
    expected = expected_vectors(tiny_encoder, library)
    rng = np.random.default_rng(20240601)
    trials = [  # (moment, rows to wait for beyond those committed, extra options)
        ("during start-up", None, []),
        ("after some batches", int(rng.integers(6, 20)), []),
        ("while decode workers run", int(rng.integers(6, 20)), ["--workers", "1"]),
    ]
    history = []
    before: dict[bytes, tuple[float, bytes]] = {}
    for name, more_rows, extra in trials:
        process = start_index(home, lib, tiny_model, *extra)
        delay = float(rng.uniform(0.2, 1.5) if more_rows is None else rng.uniform(0.0, 0.3))
        kill_when(process, home, None if more_rows is None else len(before) + more_rows, delay)
        after = committed_rows(home)
        history.append((name, len(before), len(after), process.returncode))
        assert process.returncode == -signal.SIGKILL, (name, process.stderr.read())
        # Committed rows survive the next run untouched: never re-encoded, never lost.
        assert {p: after[p] for p in before} == before, name
        check_index_after_crash(home, expected, caplog)
        before = after
    assert len(before) < LIBRARY_SIZE, history  # the kills did land before the end

    encoded.clear()
    with Index.open(home, model=tiny_model, precision="fp32") as index:
        report = index.add([lib], workers=0, batch_size=BATCH)
    assert (report.new, report.unchanged, report.failed) == (LIBRARY_SIZE - len(before), len(before), 0), history
    assert sum(encoded) == LIBRARY_SIZE - len(before)
    final = committed_rows(home)
    assert {p: final[p] for p in before} == before and len(final) == LIBRARY_SIZE
    check_index_after_crash(home, expected, caplog)

    # Last, a kill near the end of a run, when the FAISS file is rebuilt and renamed into
    # place: on disk it is the old file or the new one, and a stale one is never trusted.
    extra_images = photo_library(lib / "new", 8, start_seed=1000)
    expected |= expected_vectors(tiny_encoder, extra_images)
    process = start_index(home, lib, tiny_model, "--workers", "0")
    kill_when(process, home, LIBRARY_SIZE + len(extra_images), float(rng.uniform(0.0, 0.4)))
    check_index_after_crash(home, expected, caplog)
    with Index.open(home, model=tiny_model, precision="fp32") as index:
        assert index.add([lib], workers=0).unchanged == LIBRARY_SIZE + len(extra_images)
        assert index.status().consistent


@pytest.mark.slow
def test_ctrl_c_commits_finished_batches_prints_how_to_resume_and_exits_130(tmp_path, tiny_model, encoded):
    """The run stops within a second of Ctrl-C (the "Interrupted" line is printed once the
    finished batches are committed); the process exit that follows also tears down torch and
    FAISS, which on a loaded machine adds a second or two, hence its looser bound."""
    home, lib = tmp_path / "home", tmp_path / "lib"
    photo_library(lib, CTRL_C_LIBRARY_SIZE)
    process = start_index(home, lib, tiny_model, "--workers", "1")
    stderr = TimedLines(process.stderr)
    try:
        assert wait_until(lambda: indexed_count(home) >= 2 * BATCH, timeout=120, process=process)
        kill_group(process, signal.SIGINT)  # a terminal sends Ctrl-C to the whole group
        sent = time.monotonic()
        process.wait(30)
        exited_after = time.monotonic() - sent
    finally:
        kill_group(process)
    stdout, err = process.stdout.read().decode(), stderr.text()
    assert process.returncode == 130, err
    assert stderr.first(b"run the same command again") - sent < 1.0, err
    assert exited_after < 6.0
    assert_no_traceback(stdout, err)
    committed = committed_rows(home)
    assert 2 * BATCH <= len(committed) < CTRL_C_LIBRARY_SIZE
    assert f"new {len(committed)}," in stdout  # the summary counts what was saved

    encoded.clear()
    with Index.open(home, model=tiny_model, precision="fp32") as index:
        report = index.add([lib], workers=0, batch_size=BATCH)
        assert index.status().consistent
    assert (report.new, report.unchanged) == (CTRL_C_LIBRARY_SIZE - len(committed), len(committed))
    assert sum(encoded) == CTRL_C_LIBRARY_SIZE - len(committed)


def test_a_second_ctrl_c_stops_at_once_and_loses_nothing_committed(
    tmp_path, tiny_model, tiny_encoder, caplog, clipsearch_logging
):
    home, lib = tmp_path / "home", tmp_path / "lib"
    library = photo_library(lib, CTRL_C_LIBRARY_SIZE)
    process = start_index(home, lib, tiny_model, "--workers", "0")
    try:
        assert wait_until(lambda: indexed_count(home) >= 2 * BATCH, timeout=120, process=process)
        kill_group(process, signal.SIGINT)
        time.sleep(0.05)
        kill_group(process, signal.SIGINT)
        process.wait(30)
    finally:
        kill_group(process)
    stdout, stderr = process.stdout.read().decode(), process.stderr.read().decode()
    assert process.returncode == 130, stderr
    assert_no_traceback(stdout, stderr)
    check_index_after_crash(home, expected_vectors(tiny_encoder, library), caplog)
