"""Measured precision verdicts, remembered in the model cache so no run pays for them twice.

One small JSON file per key (a model's checkpoint identity, the CPU flags and torch version
that decide speed), named by the key's digest: two processes never rewrite each other's
verdicts, and each file is written to a temporary name and renamed into place, so a reader sees
a whole verdict or none. The key is stored inside too and compared on reading; a changed
checkpoint changes the key (its files' size, mtime, ctime and inode), so it is measured again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from clipsearch.paths import model_cache_dir

log = logging.getLogger(__name__)


def verdict_file(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return model_cache_dir() / "precision" / f"{digest}.json"


def recall(key: dict) -> dict | None:
    """The verdict remembered for ``key`` (its "precision", and what else `remember` was given),
    or None when none was, or the file is unreadable."""
    path = verdict_file(key)
    try:
        verdict = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.info("Ignoring the unreadable precision verdict %s (%s)", path, err)
        return None
    if not isinstance(verdict, dict) or verdict.get("key") != json.loads(json.dumps(key)):
        return None
    return verdict if isinstance(verdict.get("precision"), str) else None


def remember(key: dict, verdict: dict) -> None:
    """Store ``verdict`` (its "precision" and what else explains it) for ``key``; a cache that
    cannot be written only costs the next run the measurement."""
    path = verdict_file(key)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({**verdict, "key": key}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as err:
        log.info("Could not remember the precision verdict in %s (%s)", path, err)
    finally:
        tmp.unlink(missing_ok=True)
