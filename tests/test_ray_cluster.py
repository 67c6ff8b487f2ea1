"""The multi-node path: a head and a second node started with `ray start` on this machine (each
in its own session, ended by killing that session's processes), and `clipsearch index --ray
ADDRESS` run against them as a user would."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import make_library
from reliability_helpers import catalog_vectors, run_cli, wait_until

from clipsearch.index import Index

pytest.importorskip("ray", reason="the Ray tests need the [ray] extra")

RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(temp_dir: Path, *args: str, avoid: int) -> subprocess.Popen:
    """`ray start --block` in a new session: every Ray process of the node stays in it. Its
    ports are free ones, none inside its worker range nor ``avoid`` (the head's): `ray start`
    refuses ports that overlap, and the ephemeral ports the OS hands out often lie side by side."""
    ray = Path(sys.executable).parent / "ray"
    workers = free_port()  # a port range of its own per node (both nodes share one address)
    while avoid in range(workers, workers + 51):
        workers = free_port()
    taken = {avoid, *range(workers, workers + 51)}

    def other_port() -> int:
        while (port := free_port()) in taken:
            pass
        taken.add(port)
        return port

    with open(temp_dir / f"ray-start-{workers}.log", "wb") as log:  # the node keeps its own copy
        return subprocess.Popen(
            [
                str(ray),
                "start",
                *args,
                "--block",
                "--num-cpus=1",
                "--node-ip-address=127.0.0.1",
                "--disable-usage-stats",
                f"--temp-dir={temp_dir}",
                f"--min-worker-port={workers}",
                f"--max-worker-port={workers + 50}",
                f"--dashboard-agent-listen-port={other_port()}",
                f"--metrics-export-port={other_port()}",
            ],
            env=RAY_ENV,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )


def session_pids(session: int) -> list[int]:
    """The processes of one session (Ray's workers change their group, never their session)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def stop_node(node: subprocess.Popen) -> None:
    """SIGKILL to every process of the node's session, until none is left (one that a dying
    parent started meanwhile included)."""

    def killed_all() -> bool:
        pids = session_pids(node.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not pids

    assert wait_until(killed_all, timeout=30, poll=0.1)
    node.wait()


@pytest.fixture
def two_nodes(tmp_path_factory) -> Iterator[str]:
    """A head and a worker node of one CPU each; the head's address. (A short temporary folder:
    Ray's socket paths under it must stay within the 107 bytes a Unix socket name may have.)"""
    port, temp_dir = free_port(), tmp_path_factory.mktemp("nodes")
    nodes = [start_node(temp_dir, "--head", f"--port={port}", "--include-dashboard=false", avoid=port)]
    try:
        started = wait_until(lambda: _listening(port), timeout=60, poll=0.2, process=nodes[0])
        assert started, b"".join(log.read_bytes() for log in temp_dir.glob("ray-start-*.log")).decode()[-3000:]
        nodes.append(start_node(temp_dir, f"--address=127.0.0.1:{port}", avoid=port))
        wait_for_nodes = f"""
import ray, time
ray.init(address="127.0.0.1:{port}", logging_level="ERROR")
deadline = time.monotonic() + 60
while sum(node["Alive"] for node in ray.nodes()) < 2 and time.monotonic() < deadline:
    time.sleep(0.2)
assert sum(node["Alive"] for node in ray.nodes()) == 2
"""
        subprocess.run([sys.executable, "-c", wait_for_nodes], env=RAY_ENV, check=True, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        for node in reversed(nodes):
            stop_node(node)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


@pytest.mark.slow
def test_two_nodes_index_what_one_process_indexes(two_nodes, tmp_path, tiny_model):
    make_library(tmp_path / "lib", 40)
    with Index.open(tmp_path / "local", tiny_model, device="cpu", precision="fp32") as index:
        assert index.add([tmp_path / "lib"], workers=0).new == 40

    home = tmp_path / "home"
    args = ["--home", home, "-v", "--device", "cpu", "index", tmp_path / "lib", "--model", tiny_model]
    result = run_cli(*args, "--precision", "fp32", "--ray", two_nodes, timeout=300)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert result.stdout.startswith(b"new 40, changed 0, moved 0, copied 0, removed 0, failed 0, unchanged 0")
    # One CPU each: the encoder actor takes one node's, decoding the other's.
    assert "Ray cluster: 2 node(s), 2 CPU(s), 0 GPU(s); encoding in 1 actor(s) of 1 CPU(s)" in stderr

    local, distributed = catalog_vectors(tmp_path / "local"), catalog_vectors(home)
    assert local.keys() == distributed.keys()
    for path, vector in local.items():  # equal, but for a float16 rounding the fp32 noise may tip
        assert np.all(np.abs(distributed[path] - vector) <= np.spacing(np.abs(vector).astype(np.float16)))
