"""A stand-in for the Hugging Face hub on 127.0.0.1, reached through HF_ENDPOINT.

It answers `/{repo}/resolve/{revision}/{file}` as the hub does for `huggingface_hub`: the commit
in `X-Repo-Commit`, the git blob id as `ETag` for plain files, and for LFS files a redirect to
another origin (the hub's CDN) carrying `X-Linked-Etag` (the SHA-256) and `X-Linked-Size`;
errors carry the hub's `X-Error-Code`. The CDN honours `Range`, so interrupted downloads resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


def refresh_hub_settings(monkeypatch) -> None:
    """huggingface_hub reads its environment variables once, at import: give its `constants`
    the values the current environment implies, undone with the test's other patches."""
    from huggingface_hub import constants

    spec = importlib.util.find_spec("huggingface_hub.constants")
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    for name, value in vars(fresh).items():
        if name.isupper() and getattr(constants, name, None) != value:
            monkeypatch.setattr(constants, name, value)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # oldest first
    lfs: tuple[str, ...] = (".bin", ".safetensors", ".pt")
    gated: bool = False

    def files_at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision == "main":
            return self.commits[-1]
        return next((commit for commit in self.commits if commit[0] == revision), None)


@dataclass
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    authorization: str | None


class HubStandIn:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.token = "hf_test_token"  # what a gated repository accepts
        self.tampered: dict[str, bytes] = {}  # SHA-256 -> what the CDN serves instead (same size)
        self.blank_after: int | None = None  # the CDN's next response hangs up after this many bytes
        self.busy = 0  # the hub answers this many requests more with 503 (it is overloaded)
        self._blobs: dict[str, bytes] = {}
        self._hub = self._start(self._hub_handler())
        self._cdn = self._start(self._cdn_handler())
        self.url = f"http://127.0.0.1:{self._hub.server_port}"
        self.cdn_url = f"http://127.0.0.1:{self._cdn.server_port}"

    def push(self, repo: str, files: dict[str, bytes], *, gated: bool = False) -> str:
        """A new commit of `repo` (created if new) with `files`, which becomes `main`; its hash."""
        entry = self.repos.setdefault(repo, Repo(gated=gated))
        commit = hashlib.sha1(f"{repo} {len(entry.commits)}".encode()).hexdigest()
        entry.commits.append((commit, dict(files)))
        for data in files.values():
            self._blobs[hashlib.sha256(data).hexdigest()] = data
        return commit

    def hits(self, server: str = "hub") -> int:
        return sum(request.server == server for request in self.requests)

    def close(self) -> None:
        for httpd in (self._hub, self._cdn):
            httpd.shutdown()
            httpd.server_close()

    # --- servers ---------------------------------------------------------------------------

    @staticmethod
    def _start(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
        return httpd

    def _hub_handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(_Quiet):
            def do_HEAD(self) -> None:
                hub._resolve(self, body=False)

            def do_GET(self) -> None:
                hub._resolve(self, body=True)

        return Handler

    def _cdn_handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(_Quiet):
            def do_GET(self) -> None:
                hub._serve_blob(self)

        return Handler

    def _resolve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        if handler.path.startswith("/api/"):  # huggingface_hub's other calls (agent detection): not logged
            return _error(handler, 404, None)
        self.requests.append(Request("hub", handler.command, handler.path, handler.headers.get("authorization")))
        if self.busy:
            self.busy -= 1
            return _error(handler, 503, None)
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", unquote(handler.path.split("?")[0]))
        repo = self.repos.get(match[1]) if match else None
        if match is None or repo is None:
            return _error(handler, 401, "RepoNotFound")
        if repo.gated and handler.headers.get("authorization") != f"Bearer {self.token}":
            return _error(handler, 401, "GatedRepo")
        found = repo.files_at(match[2])
        if found is None:
            return _error(handler, 404, "RevisionNotFound")
        commit, files = found
        data = files.get(match[3])
        if data is None:
            return _error(handler, 404, "EntryNotFound", commit)
        if match[3].endswith(repo.lfs):
            sha256 = hashlib.sha256(data).hexdigest()
            handler.send_response(302)
            handler.send_header("Location", f"{self.cdn_url}/blobs/{sha256}")
            handler.send_header("X-Repo-Commit", commit)
            handler.send_header("X-Linked-Etag", f'"{sha256}"')
            handler.send_header("X-Linked-Size", str(len(data)))
            handler.send_header("ETag", f'"{git_blob_id(b"lfs pointer " + sha256.encode())}"')
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        served = self.tampered.get(hashlib.sha256(data).hexdigest(), data)
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", commit)
        handler.send_header("ETag", f'"{git_blob_id(data)}"')
        handler.send_header("Content-Length", str(len(served)))
        handler.end_headers()
        if body:
            handler.wfile.write(served)

    def _serve_blob(self, handler: BaseHTTPRequestHandler) -> None:
        self.requests.append(Request("cdn", handler.command, handler.path, handler.headers.get("authorization")))
        sha256 = handler.path.split("?")[0].rsplit("/", 1)[-1]
        data = self.tampered.get(sha256, self._blobs.get(sha256))
        if data is None:
            return _error(handler, 404, None)
        start = int(re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range", "bytes=0-"))[1])
        handler.send_response(206 if start else 200)
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.send_header("Content-Length", str(len(data) - start))
        handler.end_headers()
        cut, self.blank_after = self.blank_after, None
        with contextlib.suppress(ConnectionError):
            handler.wfile.write(data[start:] if cut is None else data[start : start + cut])
        handler.close_connection = True


class _Quiet(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _error(handler: BaseHTTPRequestHandler, status: int, code: str | None, commit: str | None = None) -> None:
    handler.send_response(status)
    if code is not None:
        handler.send_header("X-Error-Code", code)
    if commit is not None:
        handler.send_header("X-Repo-Commit", commit)
    handler.send_header("Content-Length", "0")
    handler.end_headers()
