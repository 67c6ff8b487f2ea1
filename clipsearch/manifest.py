"""A list of files to index instead of a directory walk: one path a line, or a Parquet file's
``path`` column.

An archive's own inventory (a database export, an object-store listing, ``find`` run once on
the storage host) is often cheaper and more exact than walking a network mount. A manifest
names files, not trees: it says nothing about files it does not list, so only a listed file
that no longer exists is taken for gone. The paths are taken as they are (no extension filter,
no exclusions): whoever wrote the list chose them.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from clipsearch.errors import ClipsearchError
from clipsearch.records import STATUS_MISSING, FileState
from clipsearch.walk import FoundFile, normalise_roots

log = logging.getLogger(__name__)


class Manifest:
    """The files a list names, iterated like a `Walk`: each is stat'ed once, by the driver.

    Relative paths are relative to the current directory, like paths on the command line.
    ``roots`` is empty, so the indexer's diff takes no catalog row for deleted; ``gone``
    (filled while iterating) lists the files that were named but do not exist.
    """

    def __init__(self, path: str | os.PathLike):
        """``path``: a file, or a pipe (``/dev/stdin``, a shell's ``<(find ...)``), read once."""
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise ClipsearchError(
                f"The file list {self.path} is a folder; index a folder by naming it, without --from-list."
            )
        if not self.path.exists():
            raise ClipsearchError(f"The file list {self.path} does not exist; check the path.")
        self.roots: list[bytes] = []
        self.unreadable: list[bytes] = []
        self.gone: list[bytes] = []

    def __iter__(self) -> Iterator[FoundFile]:
        self.gone = []
        for path in normalise_roots(os.fsdecode(listed) for listed in self._listed()):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                self.gone.append(path)
                continue
            except OSError as err:
                log.warning("cannot read %s: %s", os.fsdecode(path), err.strerror)
                continue
            if stat.S_ISDIR(st.st_mode):
                log.warning("%s is a folder; a file list names files (index folders by naming them)", os.fsdecode(path))
                continue
            yield FoundFile.of(path, st)

    def missing(self, states: dict[bytes, FileState]) -> list[bytes]:
        """Catalog rows of listed files that no longer exist (call after iterating)."""
        missing = [path for path in self.gone if path in states and states[path].status != STATUS_MISSING]
        unknown = len(self.gone) - len(missing)
        if unknown:
            example = next(os.fsdecode(p) for p in self.gone if p not in states)
            log.warning("%d listed file(s) do not exist, e.g. %s", unknown, example)
        return missing

    def _listed(self) -> list[bytes | str]:
        if self.path.suffix.lower() == ".parquet":
            return _parquet_paths(self.path)
        with open(self.path, "rb") as f:
            return [line.rstrip(b"\r\n") for line in f if line.strip()]


def _parquet_paths(path: Path) -> list[bytes | str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ClipsearchError(
            f"Reading {path} needs pyarrow: pip install 'clipsearch[ray]', or list the files one a line."
        ) from None
    try:
        table = pq.read_table(path, columns=["path"])
    except (OSError, KeyError, ValueError) as err:
        raise ClipsearchError(f"{path} is not a Parquet file with a `path` column ({err}).") from None
    return [p for p in table.column("path").to_pylist() if p]
