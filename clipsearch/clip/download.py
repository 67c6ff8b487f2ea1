"""Fetching checkpoints and the vocabulary into the local cache, verified by SHA-256.

A download streams into a temporary `.part` file next to its destination and is renamed into
place only after its hash matches, so an interrupted or corrupted transfer never leaves a file
that a later run would trust. Hashing a multi-gigabyte file takes seconds, so each verified file
gets a sidecar `<file>.sha256` (JSON: digest and the file's identity) and is hashed again when
its size, mtime, ctime or inode changes. ctime is in the identity because a write that puts the
old mtime back (`touch -d`, `cp -p`, rsync) still moves ctime, which no user call can set. For
unpinned assets (no published hash) the same sidecar is the record made at the first download
that later uses are held to.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from clipsearch.clip import registry
from clipsearch.errors import DownloadError
from clipsearch.paths import model_cache_dir

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_TIMEOUT_S = 30


def fetch(url: str, sha256: str | None, dest: Path, *, size: int | None = None, progress: bool = True) -> Path:
    """Return `dest`, downloading it from `url` first unless a verified copy is already there.

    `sha256=None` means the file has no published hash: the first download is trusted and
    recorded, and the cached copy must keep matching that record.
    """
    dest = Path(dest)
    if dest.exists():
        _check_cached(dest, sha256)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("Downloading %s to %s", url, dest)
    part, digest = _download(url, dest, progress)
    try:
        actual_size = part.stat().st_size
        if size is not None and actual_size != size:
            raise DownloadError(
                f"Downloaded {url} has {actual_size} bytes instead of {size} and was discarded; try again."
            )
        if sha256 is not None and digest != sha256:
            raise DownloadError(
                f"Downloaded {url} has SHA-256 {digest} instead of {sha256} and was discarded; "
                "try again, or fetch it yourself from a trusted source."
            )
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    _write_marker(dest, digest)
    return dest


def vocab_path() -> Path:
    """CLIP's BPE vocabulary: the copy shipped in the package, or the cached download of one we do not ship."""
    asset = registry.VOCAB
    if asset.bundled is not None:
        return _verified_bundle(asset.bundled, asset.sha256)
    return fetch(asset.url, asset.sha256, model_cache_dir() / asset.filename, size=asset.size)


@functools.cache
def _verified_bundle(path: Path, sha256: str | None) -> Path:
    """`path`, once per process after its hash matched: a damaged install would otherwise give
    wrong token ids without any error. Hashing the 1.3 MB vocabulary takes ~1 ms, reading it ~40."""
    try:
        digest = _hash_file(path)
    except OSError as exc:
        raise DownloadError(f"The bundled file {path} is missing or unreadable; reinstall clipsearch.") from exc
    if sha256 is not None and digest != sha256:
        raise DownloadError(
            f"The bundled file {path} is damaged (SHA-256 {digest}, expected {sha256}); reinstall clipsearch."
        )
    return path


def model_path(name: str, download_root: Path | str | None = None) -> Path:
    """The checkpoint file (or directory) of a registry model, downloaded if needed. A model
    whose entry lists further files (a tokenizer) is the directory holding them all."""
    entry = registry.get(name)
    if entry.bundled is not None:
        if not entry.bundled.is_dir():
            raise DownloadError(
                f"The bundled model {entry.name!r} is missing from {entry.bundled}; reinstall clipsearch."
            )
        return entry.bundled
    assert entry.asset is not None  # every entry is bundled or downloaded
    root = Path(download_root).expanduser() if download_root is not None else model_cache_dir()
    for asset in entry.files:  # the small files first: a failure there costs no large download
        fetch(asset.url, asset.sha256, root / asset.filename, size=asset.size)
    asset = entry.asset
    path = fetch(asset.url, asset.sha256, root / asset.filename, size=asset.size)
    return path.parent if entry.files else path


def _download(url: str, dest: Path, progress: bool) -> tuple[Path, str]:
    """Stream `url` into a fresh `.part` file beside `dest`, hashing on the way; the caller
    verifies the hash and renames the file."""
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    part = Path(name)
    hasher = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None else None
            show = progress and sys.stderr.isatty()
            with tqdm(
                total=expected,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                file=sys.stderr,
                disable=not show,
            ) as bar:
                received = 0
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    hasher.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if expected is not None and received != expected:
            raise DownloadError(
                f"The download of {url} stopped after {received} of {expected} bytes; "
                f"try again, or fetch it yourself and save it as {dest}."
            )
    except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"Could not download {url} ({_reason(exc)}); fetch it yourself and save it as {dest}."
        ) from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return part, hasher.hexdigest()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        text = f"HTTP {exc.code} {exc.reason}"
    elif isinstance(exc, urllib.error.URLError):
        text = str(exc.reason)
    elif isinstance(exc, http.client.IncompleteRead):
        text = "connection closed early"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _check_cached(path: Path, sha256: str | None) -> None:
    """Accept a cached file only if it hashes to `sha256` (or to its own first-download record)."""
    marker = _read_marker(path)
    unchanged = marker is not None and all(marker[k] == v for k, v in _identity(path).items())
    digest = marker["sha256"] if marker is not None and unchanged else _hash_file(path)
    expected = sha256 or (marker or {}).get("sha256")
    if expected is not None and digest != expected:
        raise DownloadError(
            f"The cached file {path} is corrupt (SHA-256 {digest}, expected {expected}); "
            "delete it and try again to download a fresh copy."
        )
    if not unchanged:
        _write_marker(path, digest)


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_marker(path: Path) -> dict | None:
    try:
        record = json.loads(_marker_path(path).read_text())
    except (OSError, ValueError):
        return None
    keys = {"sha256", *_IDENTITY_FIELDS}
    return record if isinstance(record, dict) and keys <= record.keys() else None


_IDENTITY_FIELDS = ("size", "mtime_ns", "ctime_ns", "ino")


def _identity(path: Path) -> dict[str, int]:
    """What changes whenever the file's bytes may have: a match means the recorded hash holds."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def _write_marker(path: Path, digest: str) -> None:
    record = {"sha256": digest, **_identity(path)}
    _marker_path(path).write_text(json.dumps(record) + "\n")
