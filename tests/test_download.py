"""download.fetch against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import socket
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from clipsearch.clip import download, integrity, registry
from clipsearch.errors import DownloadError
from clipsearch.paths import model_cache_dir

PAYLOAD = bytes(range(256)) * 12_000  # ~3 MiB: several read chunks
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class _Server:
    """Serves PAYLOAD at any path; `truncate_at` makes it hang up mid-body. `hung_up` counts
    clients that closed the connection mid-body, which the socketserver would print to stderr."""

    def __init__(self) -> None:
        self.hits = 0
        self.hung_up = 0
        self.truncate_at: int | None = None
        self.body = PAYLOAD
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                try:
                    self.wfile.write(server.body[: server.truncate_at])
                except ConnectionError:
                    server.hung_up += 1
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = False  # close() waits for the requests in flight
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/files/model.bin"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/model.bin"


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_fetch_downloads_verifies_and_reuses_cache(server, tmp_path):
    dest = tmp_path / "cache" / "model.bin"
    assert download.fetch(server.url, DIGEST, dest, size=len(PAYLOAD)) == dest
    assert dest.read_bytes() == PAYLOAD
    assert json.loads((tmp_path / "cache" / "model.bin.sha256").read_text())["sha256"] == DIGEST
    assert download.fetch(server.url, DIGEST, dest) == dest
    assert server.hits == 1
    assert _leftovers(dest.parent) == ["model.bin", "model.bin.sha256"]


def test_cached_file_is_not_rehashed_while_unchanged(server, tmp_path, monkeypatch):
    dest = download.fetch(server.url, DIGEST, tmp_path / "model.bin")
    monkeypatch.setattr(integrity, "sha256_file", lambda path: pytest.fail("hashed again"))
    assert download.fetch(server.url, DIGEST, dest) == dest


def test_checksum_mismatch_is_refused_and_leaves_nothing(server, tmp_path):
    dest = tmp_path / "model.bin"
    with pytest.raises(DownloadError, match="SHA-256") as err:
        download.fetch(server.url, "0" * 64, dest)
    assert server.url in str(err.value)
    assert _leftovers(tmp_path) == []


def test_wrong_size_is_refused(server, tmp_path):
    with pytest.raises(DownloadError, match="bytes instead of"):
        download.fetch(server.url, None, tmp_path / "model.bin", size=len(PAYLOAD) + 1)
    assert _leftovers(tmp_path) == []


def test_interrupted_download_leaves_no_file(server, tmp_path):
    server.truncate_at = len(PAYLOAD) // 3
    dest = tmp_path / "model.bin"
    with pytest.raises(DownloadError) as err:
        download.fetch(server.url, DIGEST, dest)
    assert "\n" not in str(err.value) and str(dest) in str(err.value)
    assert _leftovers(tmp_path) == []
    # The next attempt succeeds and is the only thing in the cache.
    server.truncate_at = None
    download.fetch(server.url, DIGEST, dest)
    assert dest.read_bytes() == PAYLOAD


def test_interrupt_by_user_leaves_no_part_file(server, tmp_path, monkeypatch, capfd):
    def interrupted(self, n):
        raise KeyboardInterrupt

    monkeypatch.setattr(download.http.client.HTTPResponse, "read", interrupted)
    server.body = bytes(32 << 20)  # more than the socket buffers take, so the server sees the hang-up
    with pytest.raises(KeyboardInterrupt):
        download.fetch(server.url, DIGEST, tmp_path / "model.bin")
    assert _leftovers(tmp_path) == []
    server.close()
    assert server.hung_up == 1
    assert capfd.readouterr().err == ""


def test_offline_error_is_one_line_naming_url_and_destination(tmp_path):
    url = _closed_port_url()
    dest = tmp_path / "models" / "model.bin"
    with pytest.raises(DownloadError) as err:
        download.fetch(url, DIGEST, dest)
    message = str(err.value)
    assert "\n" not in message
    assert url in message and str(dest) in message
    assert "refused" in message.lower()
    assert _leftovers(dest.parent) == []


def test_http_error_status_is_reported(tmp_path):
    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        with pytest.raises(DownloadError, match="HTTP 404"):
            download.fetch(f"http://127.0.0.1:{httpd.server_port}/x", DIGEST, tmp_path / "x")
    finally:
        httpd.shutdown()
        httpd.server_close()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_goes_to_stderr_only(server, tmp_path, monkeypatch):
    # Not capsys: monkeypatch would put capsys's closed stream back as sys.stderr (seen with -s).
    fake_out, fake_err = io.StringIO(), _Terminal()
    monkeypatch.setattr("sys.stdout", fake_out)
    monkeypatch.setattr("sys.stderr", fake_err)
    download.fetch(server.url, DIGEST, tmp_path / "model.bin")
    assert "model.bin" in fake_err.getvalue() and "100%" in fake_err.getvalue()
    assert fake_out.getvalue() == ""


def test_progress_bar_off_when_asked_or_not_a_terminal(server, tmp_path, monkeypatch):
    fake_err = _Terminal()
    monkeypatch.setattr("sys.stderr", fake_err)
    download.fetch(server.url, DIGEST, tmp_path / "a.bin", progress=False)
    assert fake_err.getvalue() == ""
    quiet_err = io.StringIO()  # isatty() is False
    monkeypatch.setattr("sys.stderr", quiet_err)
    download.fetch(server.url, DIGEST, tmp_path / "b.bin")
    assert quiet_err.getvalue() == ""


def test_tqdm_disable_turns_the_bar_off(server, tmp_path, monkeypatch):
    """tqdm's own switch, which `clipsearch --quiet` sets: its download bar had shown anyway."""
    fake_err = _Terminal()
    monkeypatch.setattr("sys.stderr", fake_err)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    download.fetch(server.url, DIGEST, tmp_path / "a.bin")
    assert fake_err.getvalue() == ""


def test_a_cache_that_cannot_be_written_is_one_clear_error(server, tmp_path):
    """Each had been an OSError, which the CLI reports as a bug."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(DownloadError, match=r"Cannot write .*file/model\.bin in the model cache \(.*\); make"):
        download.fetch(server.url, DIGEST, tmp_path / "file" / "model.bin")
    (tmp_path / "folder.bin").mkdir()  # where the file should be
    with pytest.raises(DownloadError, match=r"Cannot read the cached file .*folder\.bin \(.*\); remove it"):
        download.fetch(server.url, DIGEST, tmp_path / "folder.bin")
    assert server.hits == 0


def test_a_download_is_readable_as_the_umask_says_and_old_parts_go(server, tmp_path):
    """mkstemp's 0600 had stayed with the checkpoint; a download killed outright (SIGTERM,
    SIGKILL) had left its .part for good."""
    import os
    import time

    stale, fresh = tmp_path / "model.bin.old.part", tmp_path / "model.bin.new.part"
    for part in (stale, fresh):
        part.write_bytes(b"half")
    hour_ago = time.time() - 3700
    os.utime(stale, (hour_ago, hour_ago))
    previous = os.umask(0o022)
    try:
        dest = download.fetch(server.url, DIGEST, tmp_path / "model.bin")
    finally:
        os.umask(previous)
    assert dest.stat().st_mode & 0o777 == 0o644
    assert _leftovers(tmp_path) == ["model.bin", "model.bin.new.part", "model.bin.sha256"]  # another's, live


def test_corrupted_cache_file_is_detected(server, tmp_path):
    dest = download.fetch(server.url, DIGEST, tmp_path / "model.bin")
    dest.write_bytes(b"x" + PAYLOAD[1:])
    with pytest.raises(DownloadError, match="corrupt") as err:
        download.fetch(server.url, DIGEST, dest)
    assert str(dest) in str(err.value) and "delete it" in str(err.value)
    assert server.hits == 1


def test_unpinned_file_is_held_to_its_first_download(server, tmp_path):
    dest = download.fetch(server.url, None, tmp_path / "model.bin")
    assert json.loads((tmp_path / "model.bin.sha256").read_text())["size"] == len(PAYLOAD)
    assert download.fetch(server.url, None, dest) == dest
    dest.write_bytes(PAYLOAD[:-1] + b"x")
    with pytest.raises(DownloadError, match="corrupt"):
        download.fetch(server.url, None, dest)


def test_file_placed_by_hand_is_accepted_when_it_matches(tmp_path):
    dest = tmp_path / "model.bin"
    dest.write_bytes(PAYLOAD)
    assert download.fetch(_closed_port_url(), DIGEST, dest) == dest


def test_vocab_and_model_paths_use_the_cache(monkeypatch, tmp_path, server):
    """A vocabulary we do not ship is downloaded like a checkpoint."""
    monkeypatch.setattr(registry, "VOCAB", registry.Asset(server.url, "vocab.txt.gz", DIGEST, len(PAYLOAD)))
    assert download.vocab_path() == model_cache_dir() / "vocab.txt.gz"
    assert (model_cache_dir() / "vocab.txt.gz").read_bytes() == PAYLOAD

    entry = replace(registry.get("ViT-B/32"), asset=registry.Asset(server.url, "ViT-B-32.pt", DIGEST))
    monkeypatch.setitem(registry._BY_KEY, "vit-b/32", entry)
    assert download.model_path("ViT-B/32") == model_cache_dir() / "ViT-B-32.pt"
    assert download.model_path("vit-b/32", download_root=tmp_path / "root") == tmp_path / "root" / "ViT-B-32.pt"
    assert server.hits == 3


def test_bundled_model_path(monkeypatch, tmp_path):
    monkeypatch.setitem(registry._BY_KEY, "demo", replace(registry.get("demo"), bundled=tmp_path))
    assert download.model_path("demo") == tmp_path
    monkeypatch.setitem(registry._BY_KEY, "demo", replace(registry.get("demo"), bundled=tmp_path / "gone"))
    with pytest.raises(DownloadError, match="reinstall"):
        download.model_path("demo")


def test_shipped_vocabulary_is_clips_and_installed_with_the_package():
    bundled = registry.VOCAB.bundled
    assert bundled is not None and bundled.is_relative_to(Path(download.__file__).parent)
    assert hashlib.sha256(bundled.read_bytes()).hexdigest() == registry.VOCAB.sha256
    assert bundled.stat().st_size == registry.VOCAB.size
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package_data = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    relative = bundled.relative_to(Path(download.__file__).parent).as_posix()
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in package_data["clipsearch.clip"])


def _bundled_vocab(monkeypatch, path: Path) -> None:
    """The registry's vocabulary shipped as `path`, with a URL that cannot be reached."""
    monkeypatch.setattr(registry, "VOCAB", replace(registry.VOCAB, url=_closed_port_url(), sha256=DIGEST, bundled=path))


def test_shipped_vocabulary_is_hashed_once_per_process(monkeypatch, tmp_path):
    shipped = tmp_path / "vocab.txt.gz"
    shipped.write_bytes(PAYLOAD)
    _bundled_vocab(monkeypatch, shipped)
    hashed = []
    monkeypatch.setattr(integrity, "sha256_file", lambda path: hashed.append(path) or DIGEST)
    assert download.vocab_path() == shipped
    assert download.vocab_path() == shipped
    assert hashed == [shipped]
    assert not model_cache_dir().exists()


@pytest.mark.parametrize("damage", ["altered", "missing"])
def test_damaged_shipped_vocabulary_is_refused(monkeypatch, tmp_path, damage):
    shipped = tmp_path / "vocab.txt.gz"
    if damage == "altered":
        shipped.write_bytes(PAYLOAD[:-1] + b"x")
    _bundled_vocab(monkeypatch, shipped)
    with pytest.raises(DownloadError, match="reinstall clipsearch") as err:
        download.vocab_path()
    assert str(shipped) in str(err.value)
