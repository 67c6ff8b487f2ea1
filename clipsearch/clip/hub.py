"""Files on the Hugging Face hub, through `huggingface_hub`: its shared cache and its settings.

Whatever open_clip, transformers or the `hf` command already fetched is used in place, and what
we fetch lands where they will find it. `huggingface_hub` reads the settings people rely on:
`HF_HOME` / `HF_HUB_CACHE` (where the cache is), `HF_ENDPOINT` (a mirror), `HF_TOKEN` (gated or
private repositories), `HF_HUB_OFFLINE` (no network at all).

The hub publishes a hash for every file: its ETag, which names the file's blob in the cache, is
the SHA-256 of files stored with LFS (weights) and the git blob id of the others (configs).
A file is checked against the SHA-256 the registry pins, else against that ETag, before it is
used; a fresh download that fails the check is removed from the cache again. Where the cache
keeps no ETag (no symbolic links, as on some Windows set-ups) the first use is recorded and
later ones held to it.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from clipsearch.clip import integrity
from clipsearch.clip.registry import HF_HUB_PREFIX, HubDir, HubFile
from clipsearch.errors import DownloadError

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")


def cache_dir() -> Path:
    """The hub cache `huggingface_hub` uses (`HF_HUB_CACHE`, else `HF_HOME/hub`)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def file_url(repo: str, filename: str, revision: str = "main") -> str:
    """Where the file is downloaded from, on `HF_ENDPOINT` when it is set."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo, filename, revision=revision)


def cached(repo: str, filename: str, revision: str = "main") -> Path | None:
    """The file in the hub cache, found without the network; None if it is not there.

    The answer of huggingface_hub's `try_to_load_from_cache` (a test holds them to the same),
    read from the cache's documented layout: `refs/<branch>` names a commit, the file is
    `snapshots/<commit>/<filename>`, `.no_exist/<commit>/<filename>` records that the hub has no
    such file. Importing huggingface_hub's download code would cost every text query ~0.25 s (2-core EPYC).
    """
    snapshot = _snapshot(repo, revision)
    if snapshot is None or (snapshot.parent.parent / ".no_exist" / snapshot.name / filename).is_file():
        return None
    path = snapshot / filename
    return path if path.is_file() else None


def _snapshot(repo: str, revision: str) -> Path | None:
    """Where the cache keeps `repo` at `revision` (``snapshots/<commit>``, which may not exist);
    None when its ref cannot be read."""
    folder = cache_dir() / f"models--{repo.replace('/', '--')}"
    ref = folder / "refs" / revision
    try:
        commit = ref.read_text().strip() if ref.is_file() else revision
    except OSError:
        return None
    return folder / "snapshots" / commit


def cached_dir(model: HubDir) -> Path | None:
    """The snapshot folder holding all of `model`'s files at one commit, or None."""
    files = _cached_dir_files(model)
    return files[0].parent if files else None


def fetch_file(file: HubFile, *, progress: bool = True, save_as: Path | None = None) -> Path:
    """`file` from the hub cache, downloaded into it first if needed; checked either way.

    `save_as` is where a copy placed by hand would be looked for: the offline error names it.
    """
    found = cached(file.repo, file.filename, file.revision)
    if found is not None:
        _verify_cached(found, file.sha256)
        return found
    url = file_url(file.repo, file.filename, file.revision)
    advice = f"download {url} yourself and save it as {save_as}" if save_as else f"download {url} where you can"
    _require_online(f"{file.repo}/{file.filename}", advice)
    path = _download(file.repo, file.filename, file.revision, progress, advice)
    _verify_fresh(path, file.sha256, url)
    return path


def fetch_dir(model: HubDir, *, progress: bool = True) -> Path:
    """`model`'s snapshot folder, with every file it needs there and checked."""
    files = _cached_dir_files(model)
    if files:
        for path in files:
            _verify_cached(path, None)
        return files[0].parent
    name = f"{HF_HUB_PREFIX}{model.repo}"
    advice = f"run `clipsearch models download {name}` where the hub can be reached, or pass a local folder"
    try:
        _require_online(name, advice)
    except DownloadError:
        _refuse_cached_transformers_repo(model, name)
        raise
    first = _download_one_of(model, (model.files[0],), model.revision, progress, advice)
    commit = first.parent.name  # snapshots/<commit>/<file>: every other file comes from the same commit
    fetched = [first] + [_download_one_of(model, (name,), commit, progress, advice) for name in model.files[1:]]
    fetched.append(_download_one_of(model, model.weights, commit, progress, advice))
    for path in fetched:
        _verify_fresh(path, None, file_url(model.repo, path.name, commit))
    return first.parent


def _cached_dir_files(model: HubDir) -> list[Path] | None:
    first = cached(model.repo, model.files[0], model.revision)
    if first is None:
        return None
    commit = first.parent.name
    found = [first, *(cached(model.repo, name, commit) for name in model.files[1:])]
    weights = next((path for name in model.weights if (path := cached(model.repo, name, commit))), None)
    found.append(weights)
    return [path for path in found if path is not None] if all(found) else None


def _refuse_cached_transformers_repo(model: HubDir, name: str) -> None:
    """A repository cached by transformers (its ``config.json``) and fetched no further is not
    missing from the cache, as the error of one that cannot be fetched said: it is not an OpenCLIP
    repository, and its snapshot folder is what loads it."""
    snapshot = _snapshot(model.repo, model.revision)
    if snapshot is not None and (snapshot / "config.json").is_file():
        raise DownloadError(
            f"{name} is in the Hugging Face cache but is not an OpenCLIP repository (it has no "
            f"{model.files[0]}); to load it as a Hugging Face model, pass its snapshot folder {snapshot}."
        )


def _download_one_of(model: HubDir, names: tuple[str, ...], revision: str, progress: bool, advice: str) -> Path:
    """The first of `names` the repository has."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    for name in names:
        try:
            return _download(model.repo, name, revision, progress, advice, missing_ok=True)
        except EntryNotFoundError as err:
            if isinstance(err, LocalEntryNotFoundError):
                raise
    lacks = f"no {names[0]}" if len(names) == 1 else f"none of {', '.join(names)}"
    raise DownloadError(
        f"The hub repository {model.repo} has {lacks}, so clipsearch cannot load it as a model "
        "(hf-hub: names OpenCLIP repositories)."
    )


def _require_online(what: str, advice: str) -> None:
    """Fail at once where no download can work. Without this an unresolvable hub host costs
    `huggingface_hub`'s five retries, 23 s of "Retrying in 8s" lines, for the same error."""
    if offline():
        raise DownloadError(
            f"{what} is not in the Hugging Face cache ({cache_dir()}) and HF_HUB_OFFLINE is set; {advice}."
        )
    from huggingface_hub import constants

    endpoint = urlsplit(constants.ENDPOINT)
    try:
        socket.getaddrinfo(endpoint.hostname, endpoint.port or endpoint.scheme, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise DownloadError(
            f"{what} is not in the Hugging Face cache ({cache_dir()}) and {endpoint.hostname} cannot be "
            f"resolved ({err.args[-1] if err.args else err}: no network?); {advice}."
        ) from None


def _download(repo: str, filename: str, revision: str, progress: bool, advice: str, missing_ok: bool = False) -> Path:
    """`hf_hub_download`, its failures as one-line `DownloadError`s (a missing file is raised
    as is when `missing_ok`, so that the caller can try the next name)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    log.info("Downloading %s from the hub repository %s", filename, repo)
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, tqdm_class=_bar_class(progress)))
    except Exception as err:  # huggingface_hub raises its own errors, OSErrors and its HTTP client's
        if missing_ok and isinstance(err, EntryNotFoundError) and not isinstance(err, LocalEntryNotFoundError):
            raise
        url = file_url(repo, filename, revision)
        raise DownloadError(f"Could not download {url} ({_reason(err)}); {advice}.") from err


def _reason(err: BaseException) -> str:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, GatedRepoError):
        text = "the repository is gated: accept its terms on the hub, then set HF_TOKEN to a token of yours"
    elif isinstance(err, RepositoryNotFoundError):
        text = "no such repository, or a private one: check the name, or set HF_TOKEN to a token that can read it"
    elif isinstance(err, RevisionNotFoundError):
        text = "no such revision"
    elif isinstance(err, EntryNotFoundError) and not isinstance(err, LocalEntryNotFoundError):
        text = "no such file in the repository"
    elif isinstance(err, HfHubHTTPError) and status in (401, 403):
        text = f"HTTP {status}: set HF_TOKEN to a token that can read the repository"
    elif isinstance(err, HfHubHTTPError) and status is not None:
        text = f"HTTP {status}"
    else:
        # LocalEntryNotFoundError says "check your connection" at length; what failed is its cause.
        cause = err.__cause__ if isinstance(err, LocalEntryNotFoundError) and err.__cause__ else err
        text = str(cause).splitlines()[0] if str(cause).strip() else type(cause).__name__
    return " ".join(text.split())


def shows_progress(progress: bool) -> bool:
    """Whether a download (a hub file, or `download.fetch`'s) shows its bar: when asked, on a
    terminal, unless ``TQDM_DISABLE`` (tqdm's own switch, which ``clipsearch --quiet`` sets)
    turns bars off."""
    return progress and sys.stderr.isatty() and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true")


def _bar_class(progress: bool) -> type[tqdm]:
    """A progress bar like `download.fetch`'s: on stderr, only for a terminal and when asked."""
    from tqdm import tqdm

    show = shows_progress(progress)

    class Bar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)  # some huggingface_hub versions pass a name tqdm does not know
            kwargs.update(disable=not show, file=sys.stderr)
            super().__init__(*args, **kwargs)

    return Bar


# --- checks ----------------------------------------------------------------------------------


def _verify_cached(path: Path, sha256: str | None) -> None:
    try:
        _verify(path, sha256)
    except integrity.Mismatch as bad:
        raise DownloadError(
            f"The file {path} in the Hugging Face cache is corrupt ({bad.algorithm} {bad.digest}, expected "
            f"{bad.expected}); delete {bad.path} and try again to download a fresh copy."
        ) from None


def _verify_fresh(path: Path, sha256: str | None, url: str) -> None:
    try:
        _verify(path, sha256)
    except integrity.Mismatch as bad:
        _discard(path)
        raise DownloadError(
            f"Downloaded {url} has {bad.algorithm} {bad.digest} instead of {bad.expected} and was discarded; "
            "try again, or fetch it yourself from a trusted source."
        ) from None


def _verify(path: Path, sha256: str | None) -> None:
    """Raise `integrity.Mismatch` unless the file hashes to `sha256`, else to the hub's ETag."""
    blob = Path(os.path.realpath(path))
    etag = blob.name if blob != path.absolute() else None
    if sha256 is None and etag is not None and _GIT_SHA1.fullmatch(etag):
        digest = integrity.git_blob_sha1(blob)  # small files: hashed on every use
        if digest != etag:
            raise integrity.Mismatch(blob, digest, etag, "git blob id")
        return
    if sha256 is None and etag is not None and _SHA256.fullmatch(etag):
        sha256 = etag
    integrity.check(blob, sha256, integrity.foreign_record(blob))


def _discard(path: Path) -> None:
    """Remove a download that failed its check, blob and snapshot link, so that no tool trusts it."""
    blob = Path(os.path.realpath(path))
    for item in {path, blob}:
        try:
            item.unlink()
        except OSError as err:
            log.info("Could not remove %s (%s)", item, err)
