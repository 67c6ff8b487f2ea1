"""The `clipsearch serve` command: the URL it prints, the token it requires away from loopback,
and its one-line errors. uvicorn's run loop is replaced, so nothing listens beyond 127.0.0.1,
but for the last tests: real servers on 127.0.0.1, stopped by signals."""

from __future__ import annotations

import re
import select
import signal
import socket
import time

import pytest
from helpers import make_library
from reliability_helpers import assert_no_traceback, kill_group, start_cli
from typer.testing import CliRunner

pytest.importorskip("uvicorn", reason="the serve extra is not installed")

import uvicorn
from starlette.testclient import TestClient

from clipsearch.cli import app
from clipsearch.index import Index
from clipsearch.serve import command
from clipsearch.serve.service import Service


@pytest.fixture
def home(tmp_path, tiny_model):
    make_library(tmp_path / "lib", 3)
    with Index.open(tmp_path / "home", model=tiny_model, device="cpu") as index:
        index.add([tmp_path / "lib"], workers=0)
    return tmp_path / "home"


@pytest.fixture
def served(monkeypatch):
    """Runs of `serve` record uvicorn's config instead of serving (its app stays usable until
    the test ends); sockets bind 127.0.0.1 only."""
    configs, services = [], []
    real_listen, real_close = command._listen, Service.close
    monkeypatch.setattr(command, "_listen", lambda host, port: real_listen("127.0.0.1", port))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: configs.append(self.config))
    monkeypatch.setattr(Service, "close", lambda self: services.append(self))
    yield configs
    for service in services:
        real_close(service)


def serve(home, *args):
    return CliRunner().invoke(app, ["--home", str(home), "--device", "cpu", "serve", "--port", "0", *args])


def test_loopback_needs_no_token(home, served):
    result = serve(home)
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", result.stdout.strip())
    (config,) = served
    assert TestClient(config.app, base_url="http://127.0.0.1").get("/api/status").status_code == 200


def test_the_first_start_says_before_it_measures_this_cpu(home, served, tmp_path, monkeypatch):
    first = serve(home)
    assert first.exit_code == 0, first.output
    # A plain line before the wait (no "info:"), and none of the info records --verbose shows.
    (notice,) = first.stderr.strip().splitlines()[:1]
    assert notice.startswith("Measuring the fastest text kernel for ") and "on this CPU" in notice
    assert "info:" not in first.stderr and "text tower in" not in first.stderr
    again = serve(home)  # the verdict is remembered: nothing to wait for, nothing said
    assert again.exit_code == 0 and "Measuring" not in again.stderr

    def fresh(name: str, *options: str):  # a machine that has measured nothing yet
        monkeypatch.setenv("CLIPSEARCH_HOME", str(tmp_path / name))  # where verdicts are kept (--home is given)
        return CliRunner().invoke(app, ["--home", str(home), *options, "--device", "cpu", "serve", "--port", "0"])

    quiet = fresh("quiet-cache", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""
    assert list((tmp_path / "quiet-cache").rglob("*.json"))  # it measured, silently
    verbose = fresh("verbose-cache", "-v")
    assert verbose.stderr.startswith("Measuring the fastest text kernel") and "\ninfo: text tower in " in verbose.stderr


def test_another_host_gets_a_generated_token(home, served):
    result = serve(home, "--host", "203.0.113.5")
    assert result.exit_code == 0, result.output
    url = result.stdout.strip()
    token = re.fullmatch(r"http://203\.0\.113\.5:\d+/\?token=([\w-]{20,})", url)[1]
    client = TestClient(served[0].app, base_url="http://203.0.113.5")
    assert client.get("/api/status").status_code == 401
    assert client.get("/api/status", params={"token": token}).status_code == 200
    again = serve(home, "--host", "203.0.113.5")
    assert again.stdout.strip() != url  # a new token every start


def test_a_given_token_is_required_on_loopback_too(home, served):
    result = serve(home, "--token", "letmein")
    assert result.stdout.strip().endswith("/?token=letmein")
    client = TestClient(served[0].app, base_url="http://127.0.0.1")
    assert client.get("/api/status").status_code == 401
    assert client.get("/api/status", headers={"Authorization": "Bearer letmein"}).status_code == 200


def test_a_port_in_use_is_one_line(home):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["--home", str(home), "serve", "--port", str(port)])
    assert result.exit_code == 1
    expected = f"Error: Cannot listen on 127.0.0.1:{port} (Address already in use); pass another --port."
    assert result.output.strip() == expected


def test_a_model_the_index_has_no_vectors_by_is_one_line(home, other_tiny_model, served):
    result = serve(home, "--model", other_tiny_model)
    assert result.exit_code == 1 and served == []
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: The index in") and f"has no vectors by {other_tiny_model}" in line


def test_no_index_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["--home", str(tmp_path / "nothing"), "serve", "--port", "0"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "There is no index in" in result.output and not (tmp_path / "nothing").exists()


def test_connections_do_not_wait_for_delayed_acks():
    """TCP_NODELAY on the listening socket reaches every connection: without it, a response
    written in two parts waits ~40 ms for the client's delayed ACK on a kept-alive connection."""
    listener = command._listen("127.0.0.1", 0)
    try:
        with socket.create_connection(listener.getsockname()):
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        listener.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stalled_upload_does_not_hold_the_server_open(home, sig):
    """A phone that stops sending halfway through an upload: Ctrl-C or SIGTERM still ends the
    server within its grace period, with its exit status and no traceback (it had waited for the
    upload for ever, and a second Ctrl-C printed the cancelled request's traceback)."""
    process = start_cli("--home", home, "--device", "cpu", "serve", "--port", "0")
    try:
        assert select.select([process.stdout], [], [], 120)[0], "the server printed no URL within 120 s"
        port = int(process.stdout.readline().decode().strip().rsplit(":", 1)[1].rstrip("/"))
        with socket.create_connection(("127.0.0.1", port)) as client:
            head = b"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 30000000\r\n\r\n"
            client.sendall(head + bytes(1_000_000))
            time.sleep(0.5)  # the request is being read
            started = time.monotonic()
            kill_group(process, sig)
            code = process.wait(60)
            took = time.monotonic() - started
    finally:
        kill_group(process)
    stderr = process.stderr.read()
    assert code == 128 + sig, stderr  # 130 and 143, as every command (SIGTERM had killed it outright)
    assert stderr.decode().splitlines()[-1] == "Interrupted."
    assert took < command.GRACE_S + 15, took
    assert_no_traceback(stderr)
