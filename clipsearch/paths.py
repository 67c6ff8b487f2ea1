"""Where clipsearch keeps things on disk.

Two places, because they have different lifetimes: downloaded model weights are a cache
(safe to delete, re-downloaded on demand), an index is user data (never deleted by us).
`CLIPSEARCH_HOME` overrides both, so tests and portable installs stay in one folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def default_home() -> Path:
    """The index directory used when `--home` is not given."""
    env = os.environ.get("CLIPSEARCH_HOME")
    if env:
        return Path(env).expanduser()
    return _xdg("XDG_DATA_HOME", ".local/share") / "clipsearch"


def model_cache_dir() -> Path:
    """Where downloaded checkpoints and vocabularies live."""
    env = os.environ.get("CLIPSEARCH_HOME")
    if env:
        return Path(env).expanduser() / "models"
    return _xdg("XDG_CACHE_HOME", ".cache") / "clipsearch" / "models"
