"""Where a model's weights are, or would come from, found without network or hashing.

The order, first match wins: a bundled model's folder; clipsearch's cache (`model_cache_dir()`,
or `download_root`: a file we downloaded, or one placed there by hand, for hub files too under
the registry's `saved_as` name); OpenAI's `~/.cache/clip/<name>.pt` for OpenAI's archives; the
Hugging Face hub cache for hub files. `download.model_path` follows the same order and checks
what it finds. Kept apart from `download` so that a text query, which only asks whether its
model's files changed, imports none of the download machinery.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from clipsearch.clip import hub, integrity, registry
from clipsearch.paths import model_cache_dir


@dataclass(frozen=True)
class Location:
    """Where a model's weights are, or would come from: what `clipsearch models` shows."""

    cache: Literal["bundled", "clipsearch", "openai", "huggingface"]  # who keeps the copy, or would
    path: Path | None  # the file or folder found; None while the weights are not on this machine
    origin: str  # where a download comes from: a URL, or hf-hub:REPO

    @property
    def present(self) -> bool:
        return self.path is not None

    def describe(self) -> str:
        """ "bundled", "cached", "cached (openai)", "cached (huggingface)", or "-" when absent."""
        if self.path is None:
            return "-"
        return {"bundled": "bundled", "clipsearch": "cached"}.get(self.cache, f"cached ({self.cache})")


def openai_cache_dir() -> Path:
    """Where OpenAI's `clip.load` keeps its archives (it reads no setting for it)."""
    return Path.home() / ".cache" / "clip"


def locate(entry: registry.ModelEntry, download_root: Path | str | None = None) -> Location:
    """The first place, in the module's order, that holds `entry`'s weights; without network
    or hashing, so a copy whose damage no check has recorded yet still counts as present."""
    root = download_dir(download_root)
    asset = entry.asset
    if entry.bundled is not None:
        return Location("bundled", entry.bundled if entry.bundled.is_dir() else None, "clipsearch package")
    if isinstance(asset, registry.Asset):
        own = root / asset.filename
        if own.exists():
            return Location("clipsearch", own, asset.url)
        theirs = _openai_copy(asset)
        if theirs is not None and not integrity.known_mismatch(theirs, asset.sha256, integrity.foreign_record(theirs)):
            return Location("openai", theirs, asset.url)  # a copy a check found damaged is skipped
        return Location("clipsearch", None, asset.url)
    if isinstance(asset, registry.HubFile):
        origin = f"{registry.HF_HUB_PREFIX}{asset.repo}"
        if asset.saved_as is not None and (root / asset.saved_as).exists():
            return Location("clipsearch", root / asset.saved_as, origin)
        return Location("huggingface", hub.cached(asset.repo, asset.filename, asset.revision), origin)
    if isinstance(asset, registry.HubDir):
        return Location("huggingface", hub.cached_dir(asset), f"{registry.HF_HUB_PREFIX}{asset.repo}")
    raise AssertionError(f"{entry.name} has no weights to locate")  # every entry is bundled or downloaded


# The files of a checkpoint folder that hold weights; the others (config, vocabulary, notes)
# cannot change what the image tower computes without the weights changing too.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def weights_fingerprint(model: str) -> str | None:
    """``"sha256:<hex>"`` of the weights behind ``model`` (a registry name or a checkpoint path)
    as they are on disk now; None while they are not on this machine.

    The catalog records a model's vectors by name, and the weights behind a name can change (a
    new bundled demo, a checkpoint retrained in place): this tells the vectors of one set of
    weights from another's. One weights file: its SHA-256; several: the SHA-256 of their names
    and hashes. Hashes come from `integrity.recorded_sha256`, so a file is hashed once, not on
    every run."""
    entry = registry.find(model)
    root = Path(model).expanduser() if entry is None else locate(entry).path
    if root is None:
        return None
    try:
        if not root.is_dir():
            return f"sha256:{integrity.recorded_sha256(root)}"
        files = sorted(file for file in root.iterdir() if file.is_file())
        weights = [file for file in files if file.suffix in _WEIGHT_SUFFIXES] or files
        digests = [(file.name, integrity.recorded_sha256(file)) for file in weights]
    except OSError:
        return None
    if len(digests) == 1:
        return f"sha256:{digests[0][1]}"
    return "sha256:" + hashlib.sha256("".join(f"{name} {digest}\n" for name, digest in digests).encode()).hexdigest()


def download_dir(download_root: Path | str | None) -> Path:
    """clipsearch's cache, or the folder a caller named instead (`clip.load(download_root=...)`)."""
    return Path(download_root).expanduser() if download_root is not None else model_cache_dir()


def _openai_copy(asset: registry.Asset) -> Path | None:
    """OpenAI's loader names its cached archive after the URL."""
    if asset.cached_by != "openai":
        return None
    path = openai_cache_dir() / asset.url.rsplit("/", 1)[-1]
    return path if path.is_file() else None
