"""Model weights and the vocabulary, from where `sources.locate` finds them, checked; else downloaded.

What another tool keeps is used in place, never copied: OpenAI's cached archive once its SHA-256
matches (a damaged one is skipped with a warning, as OpenAI's loader would fetch it again), a
hub cache file once it matches its pinned hash or the hub's own (`hub`). Downloads go to one
place each: OpenAI's archives into clipsearch's cache (`fetch`), hub files through
`huggingface_hub` into its cache.

`fetch` streams into a temporary `.part` file next to its destination and renames it into
place only after its hash matches, so an interrupted or corrupted transfer never leaves a file
that a later run would trust; `integrity` keeps the hashes, so a file is not hashed again on
every use. For unpinned assets (no published hash) the record made at the first download is
what later uses are held to.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import logging
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from clipsearch.clip import hub, integrity, registry
from clipsearch.clip.sources import download_dir, locate
from clipsearch.errors import DownloadError
from clipsearch.paths import model_cache_dir, new_file_mode

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_TIMEOUT_S = 30
_STALE_PART_S = 3600


def fetch(url: str, sha256: str | None, dest: Path, *, size: int | None = None, progress: bool = True) -> Path:
    """Return `dest`, downloading it from `url` first unless a verified copy is already there.

    `sha256=None` means the file has no published hash: the first download is trusted and
    recorded, and the cached copy must keep matching that record.
    """
    dest = Path(dest)
    if dest.exists():
        _check_cached(dest, sha256)
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(dest, exc) from None
    _remove_stale_parts(dest)
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
    integrity.write(integrity.sidecar(dest), dest, digest)
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
        digest = integrity.sha256_file(path)
    except OSError as exc:
        raise DownloadError(f"The bundled file {path} is missing or unreadable; reinstall clipsearch.") from exc
    if sha256 is not None and digest != sha256:
        raise DownloadError(
            f"The bundled file {path} is damaged (SHA-256 {digest}, expected {sha256}); reinstall clipsearch."
        )
    return path


def model_path(name: str, download_root: Path | str | None = None, *, progress: bool = True) -> Path:
    """The checkpoint file (or folder) of a registry model, from the first place that has it,
    checked; downloaded if no place has it."""
    entry = registry.get(name)
    where = locate(entry, download_root)
    asset = entry.asset
    if where.cache == "bundled":
        if where.path is None:
            raise DownloadError(
                f"The bundled model {entry.name!r} is missing from {entry.bundled}; reinstall clipsearch."
            )
        return where.path
    if where.cache == "clipsearch" and where.path is not None:
        _check_cached(where.path, asset.sha256 if isinstance(asset, registry.Asset | registry.HubFile) else None)
        return where.path
    if isinstance(asset, registry.Asset):
        if where.cache == "openai" and where.path is not None and _openai_copy_is_intact(where.path, asset):
            return where.path
        return fetch(
            asset.url, asset.sha256, download_dir(download_root) / asset.filename, size=asset.size, progress=progress
        )
    if isinstance(asset, registry.HubFile):
        save_as = download_dir(download_root) / asset.saved_as if asset.saved_as else None
        return hub.fetch_file(asset, progress=progress, save_as=save_as)
    assert isinstance(asset, registry.HubDir)
    return hub.fetch_dir(asset, progress=progress)


def tokenizer_dir(entry: registry.ModelEntry, *, progress: bool = True) -> Path | None:
    """The folder of the ``tokenizer.json`` a registry model keeps in another repository than its
    weights (XLM-RoBERTa CLIPs: XLM-RoBERTa's own), downloaded if needed; None for the others."""
    if entry.tokenizer is None:
        return None
    return hub.fetch_file(entry.tokenizer, progress=progress).parent


def _openai_copy_is_intact(path: Path, asset: registry.Asset) -> bool:
    """Check OpenAI's copy as OpenAI's loader does, before every use; a damaged one is not ours to
    delete, so it is skipped with a warning and a fresh copy goes to clipsearch's cache."""
    try:
        integrity.check(path, asset.sha256, integrity.foreign_record(path))
    except integrity.Mismatch as bad:
        log.warning(
            "Not using %s from OpenAI's cache: its SHA-256 is %s, not %s (damaged or incomplete)",
            path,
            bad.digest,
            bad.expected,
        )
        return False
    return True


def _download(url: str, dest: Path, progress: bool) -> tuple[Path, str]:
    """Stream `url` into a fresh `.part` file beside `dest`, hashing on the way; the caller
    verifies the hash and renames the file."""
    try:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
        os.fchmod(fd, new_file_mode())  # as any file the user makes: mkstemp's is theirs alone
    except OSError as exc:
        raise _unwritable(dest, exc) from None
    part = Path(name)
    hasher = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None else None
            show = hub.shows_progress(progress)
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


def _unwritable(dest: Path, exc: OSError) -> DownloadError:
    return DownloadError(
        f"Cannot write {dest} in the model cache ({exc.strerror or exc}); make {dest.parent} a writable "
        "folder, or point CLIPSEARCH_HOME elsewhere."
    )


def _remove_stale_parts(dest: Path) -> None:
    """Remove what downloads of ``dest`` killed without a chance to clean up (SIGKILL, SIGTERM, a
    power cut) left: `.part` files nothing has written to for an hour. A download going on in
    another process writes to its own every second."""
    for part in dest.parent.glob(f"{dest.name}.*.part"):
        try:
            if time.time() - part.stat().st_mtime > _STALE_PART_S:
                part.unlink()
        except OSError:  # gone already, or not ours to remove: it costs only disk
            pass


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
    """Accept a file in clipsearch's cache only if it hashes to `sha256` (or to its own first-download record)."""
    try:
        integrity.check(path, sha256, integrity.sidecar(path))
    except OSError as exc:  # a folder where the file should be, or unreadable
        raise DownloadError(
            f"Cannot read the cached file {path} ({exc.strerror or exc}); remove it and try again."
        ) from None
    except integrity.Mismatch as bad:
        raise DownloadError(
            f"The cached file {path} is corrupt (SHA-256 {bad.digest}, expected {bad.expected}); "
            "delete it and try again to download a fresh copy."
        ) from None
