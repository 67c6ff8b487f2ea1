"""What the catalog stores and hands out: file statuses and the records that cross module lines.

Standard library and NumPy only, so that every step of the data flow (walk, indexer, vectors,
search, the CLI) can name them without importing SQLite, SQLAlchemy or each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
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
    weights: str | None = None  # fingerprint of the weights that made them (None: unknown)


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


# Which reader filled a row's metadata columns: rows read by an older one (or none, before schema
# 0005) are read again, from the file's header alone, by the next `index` run. 2: EXIF text read
# as UTF-8, offsets like +5:30 and Z, GPS minutes or seconds of 60 or more refused, and a PNG's
# EXIF found after its pixels without decoding them.
METADATA_VERSION = 2


@dataclass(frozen=True)
class PhotoMeta:
    """What a file says about itself (`photo_meta.read`): each field None where it says nothing
    readable. The field names are the catalog's column names."""

    format: str | None = None  # Pillow's name for it: JPEG, PNG, HEIF, ...
    orientation: int | None = None  # EXIF 1-8 (pixels are stored rotated or mirrored by 2-8)
    # Local time as the camera's clock showed it, "YYYY-MM-DDTHH:MM:SS": what people mean by the
    # date of a photo, what filters and sorting compare, lexically.
    taken: str | None = None
    taken_offset: int | None = None  # minutes east of UTC, where the file records it
    camera_make: str | None = None
    camera_model: str | None = None
    lens: str | None = None
    latitude: float | None = None  # degrees, north positive
    longitude: float | None = None  # degrees, east positive

    @property
    def taken_iso(self) -> str | None:
        """ISO 8601, with the UTC offset when the file records one."""
        if self.taken is None or self.taken_offset is None:
            return self.taken
        sign, minutes = ("+" if self.taken_offset >= 0 else "-"), abs(self.taken_offset)
        return f"{self.taken}{sign}{minutes // 60:02d}:{minutes % 60:02d}"

    @property
    def known(self) -> int:
        """How many fields are present: the richer of two copies is the better keeper."""
        return sum(getattr(self, f.name) is not None for f in fields(self))

    def to_json(self) -> dict[str, object]:
        return {
            "taken": self.taken_iso,
            "camera_make": self.camera_make,
            "camera_model": self.camera_model,
            "lens": self.lens,
            "latitude": self.latitude,
            "longitude": self.longitude,
            "orientation": self.orientation,
            "format": self.format,
        }


METADATA_COLUMNS = tuple(f.name for f in fields(PhotoMeta))


def extension_of(path: bytes) -> str | None:
    """A file name's extension as `--ext` compares it: lower case, without the dot; None for a
    name without one (or one too long to be an extension)."""
    ext = os.path.splitext(os.path.basename(path))[1][1:].lower()
    return os.fsdecode(ext) if 0 < len(ext) <= 16 else None


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
    metadata: PhotoMeta | None = None  # None: not read (the next run reads the header)


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
    metadata: PhotoMeta = field(default_factory=PhotoMeta)
