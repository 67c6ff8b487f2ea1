"""Where a model's weights are, or would come from, found without network or hashing.

The order, first match wins: a bundled model's folder; clipsearch's cache (`model_cache_dir()`,
or `download_root`: a file we downloaded, or one placed there by hand, for hub files too under
the registry's `saved_as` name); OpenAI's `~/.cache/clip/<name>.pt` for OpenAI's archives; the
Hugging Face hub cache for hub files. `download.model_path` follows the same order and checks
what it finds. Kept apart from `download` so that a text query, which only asks whether its
model's files changed, imports none of the download machinery.
"""

from __future__ import annotations

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


def download_dir(download_root: Path | str | None) -> Path:
    """clipsearch's cache, or the folder a caller named instead (`clip.load(download_root=...)`)."""
    return Path(download_root).expanduser() if download_root is not None else model_cache_dir()


def _openai_copy(asset: registry.Asset) -> Path | None:
    """OpenAI's loader names its cached archive after the URL."""
    if asset.cached_by != "openai":
        return None
    path = openai_cache_dir() / asset.url.rsplit("/", 1)[-1]
    return path if path.is_file() else None
