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
    env = os.environ.get("CLIPSEARCH_HOME", "").strip()
    if env:
        return Path(env).expanduser()
    return _xdg("XDG_DATA_HOME", ".local/share") / "clipsearch"


def model_cache_dir() -> Path:
    """Where downloaded checkpoints and vocabularies live."""
    env = os.environ.get("CLIPSEARCH_HOME", "").strip()
    if env:
        return Path(env).expanduser() / "models"
    return _xdg("XDG_CACHE_HOME", ".cache") / "clipsearch" / "models"


def new_file_mode() -> int:
    """The permissions of a file the user creates (0o666 narrowed by their umask), for the files
    that tools create private (mkstemp, safetensors) but that are as much the user's as any."""
    mask = os.umask(0o077)  # read by setting it (there is no other way), to the strictest, and set back
    os.umask(mask)
    return 0o666 & ~mask
