"""What the catalog stores and hands out: file statuses and the records that cross module lines.

Standard library and NumPy only, so that every step of the data flow (walk, indexer, vectors,
search, the CLI) can name them without importing SQLite, SQLAlchemy or each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

# A catalog row's status. Plain strings: they are what SQLite stores and what `counts()` is keyed by.
STATUS_INDEXED, STATUS_FAILED, STATUS_MISSING = "indexed", "failed", "missing"
STATUSES = (STATUS_INDEXED, STATUS_FAILED, STATUS_MISSING)


def decode_path(path: bytes) -> Path:
    """A catalog key (a path as bytes, `os.fsencode`) as a Path."""
    return Path(os.fsdecode(path))


class Changes(NamedTuple):
    """How one model's vectors moved on since some generation (`Catalog.changes_since`)."""

    generation: int  # the catalog's, now
    outdated: np.ndarray  # int64 ids whose vector was set or dropped since
    ids: np.ndarray  # int64: those of them indexed now...
    vectors: np.ndarray  # ...and their vectors, float32 [len(ids), dim]
    # int64, every id with a vector by the model now, ordered: rows deleted outright left no
    # record, and are the ids a FAISS file holds that this lacks.
    held: np.ndarray


@dataclass(frozen=True)
class StoredModel:
    """A model as the catalog records it, once it has encoded something."""

    id: int
    name: str  # registry name or checkpoint path (`encoder.model_id`)
    dim: int
    vectors: int  # how many images it has a vector for


class FileState(NamedTuple):
    """What the indexer's diff needs to know about one catalog row.

    A NamedTuple rather than a frozen dataclass: `file_states` builds one per file, and at 100k
    files that is half the cost of the call.
    """

    id: int
    size: int
    mtime_ns: int
    status: str
    fingerprint: bytes | None
    encoded: bool  # holds a vector by the model the run encodes with


@dataclass
class IndexedFile:
    """A successfully encoded (or vector-reused) file to upsert."""

    path: bytes
    size: int
    mtime_ns: int
    fingerprint: bytes
    width: int
    height: int
    vector: np.ndarray  # float32 [dim], L2-normalised


@dataclass
class FailedFile:
    path: bytes
    size: int
    mtime_ns: int
    fingerprint: bytes | None
    error: str


@dataclass(frozen=True)
class ImageRow:
    """What a search hit is joined with."""

    id: int
    path: bytes
    size: int
    mtime_ns: int
    width: int | None
    height: int | None
