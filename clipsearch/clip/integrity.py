"""Knowing what a weights file hashes to without hashing it on every use.

Hashing a multi-gigabyte file takes seconds, so each verified file gets a record (JSON: digest
and the file's identity) and is hashed again only when its size, mtime, ctime or inode changes.
ctime is in the identity because a write that puts the old mtime back (`touch -d`, `cp -p`,
rsync) still moves ctime, which no user call can set. A file clipsearch downloaded keeps its
record beside it (`<file>.sha256`); a file another tool keeps (OpenAI's cache, the Hugging Face
hub cache) gets its record under clipsearch's cache, so their folders stay as those tools left
them. For files with no published hash, the record made at first use is what later uses are
held to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from clipsearch.paths import model_cache_dir

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_IDENTITY_FIELDS = ("size", "mtime_ns", "ctime_ns", "ino")


class Mismatch(Exception):
    """A file does not hash to what it must; callers word the message for where the file is."""

    def __init__(self, path: Path, digest: str, expected: str, algorithm: str = "SHA-256") -> None:
        super().__init__(f"{path} has {algorithm} {digest}, expected {expected}")
        self.path, self.digest, self.expected, self.algorithm = path, digest, expected, algorithm


def check(path: Path, expected: str | None, record: Path) -> None:
    """Raise `Mismatch` unless `path` hashes to `expected` (or, when None, to what `record` says
    from an earlier use). Hashes only when the record no longer describes the file; a file
    checked against a published hash keeps its record even when it fails, so that listings can
    tell it is damaged without hashing it."""
    marker = _read(record)
    fresh = _describes(marker, path)
    digest = marker["sha256"] if marker is not None and fresh else sha256_file(path)
    wanted = expected or (marker or {}).get("sha256")
    if not fresh and (expected is not None or wanted in (None, digest)):
        write(record, path, digest)  # never over the record a file without a published hash is held to
    if wanted is not None and digest != wanted:
        raise Mismatch(path, digest, wanted)


def known_mismatch(path: Path, expected: str | None, record: Path) -> bool:
    """Whether `record`, still describing `path`, says it does not hash to `expected`: what a
    listing can tell without hashing."""
    marker = _read(record)
    if expected is None or marker is None:
        return False
    try:
        fresh = _describes(marker, path)
    except OSError:
        return False
    return fresh and marker["sha256"] != expected


def sidecar(path: Path) -> Path:
    """The record of a file clipsearch downloaded: beside it."""
    return path.with_name(path.name + ".sha256")


def foreign_record(path: Path) -> Path:
    """The record of a file another tool keeps: under clipsearch's cache, named by where the
    file really is (symbolic links resolved, as the hub cache's snapshot files are)."""
    key = hashlib.sha256(os.fsencode(os.path.realpath(path))).hexdigest()[:32]
    return model_cache_dir() / "verified" / f"{key}.json"


def recorded_sha256(path: Path) -> str:
    """The SHA-256 of `path`, from a record that still describes it where one does (the sidecar
    of a download, the record of a checked foreign file, or one this function wrote), else
    hashed now and recorded: what a model's weights fingerprint costs on every run is a stat.
    Only its own records are written, never those `check` holds files to. Within a process the
    answer is kept beside the file's identity, so a search that checks its model's weights pays a
    stat, not the reading of records."""
    now = identity(path)
    known = _RECORDED.get(path)
    if known is not None and known[0] == now:
        return known[1]
    own = model_cache_dir() / "hashed" / foreign_record(path).name
    for record in (sidecar(path), foreign_record(path), own):
        marker = _read(record)
        if marker is not None and _describes(marker, path):
            digest = str(marker["sha256"])
            break
    else:
        digest = sha256_file(path)
        write(own, path, digest)
    _RECORDED[path] = (now, digest)
    return digest


_RECORDED: dict[Path, tuple[dict[str, int], str]] = {}  # path -> (identity when hashed, SHA-256)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The id git gives the file's content: the hub's ETag for files not stored with LFS."""
    h = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def identity(path: Path) -> dict[str, int]:
    """What changes whenever the file's bytes may have: a match means the recorded hash holds."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def write(record: Path, path: Path, digest: str) -> None:
    """Record `digest` for `path` as it is now. A cache we cannot write to only costs the next
    use a hash."""
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"sha256": digest, "path": os.fspath(path), **identity(path)}) + "\n")
    except OSError as err:
        log.info("Could not record the hash of %s in %s (%s)", path, record, err)


def _describes(marker: dict | None, path: Path) -> bool:
    """Whether a record still describes the file: its hash holds."""
    return marker is not None and all(marker[key] == value for key, value in identity(path).items())


def _read(record: Path) -> dict | None:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    keys = {"sha256", *_IDENTITY_FIELDS}
    return data if isinstance(data, dict) and keys <= data.keys() else None
