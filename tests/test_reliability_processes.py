"""The processes of an indexer run (issue 18 item 6): killing the main process, whichever way,
leaves no decode worker, forkserver or resource tracker behind, so a caller capturing the
output sees it end; `kill PID` (SIGTERM) stops the run as Ctrl-C does. Real `clipsearch index`
processes with a decode worker, signalled by process id (not their group), as `kill PID` is."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from reliability_helpers import (
    assert_no_traceback,
    indexed_count,
    kill_group,
    photo_library,
    start_index,
    wait_until,
)

from clipsearch.index import Index

BATCH = 4
LIBRARY_SIZE = 48
GONE_WITHIN_S = 30  # generous for a loaded 2-core machine; before the fix they lived for ever


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` now (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that does not reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def started_with_workers(process: subprocess.Popen, home) -> set[int]:
    """Wait for committed batches (the worker is decoding by then); the run's other processes."""
    assert wait_until(lambda: indexed_count(home) >= 2 * BATCH, timeout=120, process=process)
    others = descendants(process.pid)
    assert len(others) >= 2, others  # at least the forkserver and a worker
    return others


def output_when_all_gone(process: subprocess.Popen, others: set[int]) -> tuple[bytes, bytes]:
    """The output, once every process that held the pipes closed them; fails (after cleaning up)
    if that takes longer than GONE_WITHIN_S."""
    try:
        out, err = process.communicate(timeout=GONE_WITHIN_S)
        assert wait_until(lambda: not any(alive(p) for p in others), timeout=GONE_WITHIN_S)
        return out, err
    except (subprocess.TimeoutExpired, AssertionError):
        left = sorted(p for p in others if alive(p))
        kill_group(process)  # the run's whole group, workers included
        pytest.fail(f"processes of the run still alive {GONE_WITHIN_S} s after the main one ended: {left}", False)


@pytest.mark.slow
def test_sigkill_to_the_main_process_takes_its_workers_with_it(tmp_path, tiny_model):
    photo_library(tmp_path / "lib", LIBRARY_SIZE)
    process = start_index(tmp_path / "home", tmp_path / "lib", tiny_model, "--workers", "1", batch=BATCH)
    others = started_with_workers(process, tmp_path / "home")
    os.kill(process.pid, signal.SIGKILL)
    output_when_all_gone(process, others)
    assert process.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigterm_stops_the_run_as_ctrl_c_does(tmp_path, tiny_model):
    home, lib = tmp_path / "home", tmp_path / "lib"
    photo_library(lib, LIBRARY_SIZE)
    process = start_index(home, lib, tiny_model, "--workers", "1", batch=BATCH)
    others = started_with_workers(process, home)
    os.kill(process.pid, signal.SIGTERM)
    sent = time.monotonic()
    out, err = output_when_all_gone(process, others)
    stderr = err.decode()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Stopping after the current batch (a second SIGTERM to stop at once)" in stderr
    assert "Ctrl-C" not in stderr and "run the same command again" in stderr
    assert_no_traceback(out, err)
    assert time.monotonic() - sent < GONE_WITHIN_S
    committed = indexed_count(home)
    assert 2 * BATCH <= committed < LIBRARY_SIZE and f"new {committed},".encode() in out
    with Index.open(home, model=tiny_model, precision="fp32") as index:
        report = index.add([lib], workers=0)
    assert (report.new, report.unchanged) == (LIBRARY_SIZE - committed, committed)
