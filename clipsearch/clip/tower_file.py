"""The files NumPy towers (`clip.numpy_text`, `clip.numpy_image`) are cached in, and when one is
stale.

A tower is exported once, from the checkpoint a tensor at a time as it is read (`Checkpointed`)
or from a model loaded with torch, and memory-mapped by later processes, which read only the
pages they use. The file: an 8-byte magic naming the tower, the length of a JSON header (the
tower's settings, what it was exported from, and each array's offset and shape), then the
float32 arrays, each 64-byte aligned, from the first aligned offset on. It is written to a
temporary name and renamed into place (`replaced`), so a reader sees a whole file or none.

A cache file is keyed by the model as the user names it (a registry name or a path) and is
stale once any file of the checkpoint changes size, mtime, ctime or inode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from clipsearch.clip import registry
from clipsearch.clip.sources import locate
from clipsearch.paths import model_cache_dir

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<8sQ")  # magic, JSON length
_ALIGN = 64  # every array starts on a 64-byte boundary of the file

Tower = TypeVar("Tower")


def save(
    path: Path,
    magic: bytes,
    header: Mapping[str, object],
    arrays: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Write ``arrays`` (any layout: each is made contiguous float32 as it is written, one at a
    time) after ``header`` (JSON: its "format", "source" and settings) to ``path``, atomically.
    With ``shapes`` (each array's), each array is looked up once, as it is written: ``arrays``
    may read it then (`Checkpointed`)."""
    shapes = shapes if shapes is not None else {key: value.shape for key, value in arrays.items()}
    offsets: dict[str, dict] = {}
    size = 0
    for key, shape in shapes.items():
        offsets[key] = {"offset": size, "shape": list(shape)}
        size += _aligned(math.prod(shape) * 4)
    encoded = json.dumps({**header, "arrays": offsets}).encode()
    start = _aligned(_HEADER.size + len(encoded))
    with replaced(path) as tmp, open(tmp, "wb") as f:
        f.write(_HEADER.pack(magic, len(encoded)) + encoded)
        for key, shape in shapes.items():
            value = arrays[key]
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"{key} has the shape {tuple(value.shape)}, not {tuple(shape)}")
            f.seek(start + offsets[key]["offset"])
            f.write(np.ascontiguousarray(value, dtype="<f4").tobytes())
        f.truncate(start + size)


class Checkpointed(Mapping[str, np.ndarray]):
    """A tower's arrays as its file holds them, each read from a checkpoint's state dict (one
    that reads a tensor when it is looked up: `clip.open_checkpoint`) when `save` asks for it:
    the float32 tower is never in memory whole. Keys are the file's, the state dict's without
    ``prefix``; ``as_stored(state-dict key, array)`` lays an array out as the file holds it (a
    view). ``shapes``: each array's shape in the file, for `save`, from the ``checkpoint_shapes``
    of a model built without weights (`clip.build.skeleton`). ``reading_s``: the seconds spent
    reading them."""

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor],
        checkpoint_shapes: Mapping[str, tuple[int, ...]],
        as_stored: Callable[[str, np.ndarray], np.ndarray],
        prefix: str = "",
    ):
        self.state_dict, self.as_stored, self.prefix = state_dict, as_stored, prefix
        self.shapes = {
            key: as_stored(prefix + key, np.broadcast_to(np.float32(0), shape)).shape  # no memory
            for key, shape in checkpoint_shapes.items()
        }
        self.reading_s = 0.0

    def __getitem__(self, key: str) -> np.ndarray:
        import torch

        started = time.perf_counter()
        value = self.state_dict[self.prefix + key].to(torch.float32).numpy()
        self.reading_s += time.perf_counter() - started
        return self.as_stored(self.prefix + key, value)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


@contextmanager
def replaced(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write, renamed to ``path`` when the block ends
    (removed if it raises): a reader sees the whole old file or the whole new one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path, magic: bytes, format: int) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and the memory-mapped arrays of the file at ``path``; ValueError if it is not
    a ``magic`` file of ``format``."""
    with open(path, "rb") as f:
        found, length = _HEADER.unpack(f.read(_HEADER.size))
        if found != magic:
            raise ValueError(f"not a {magic.decode(errors='replace')} file")
        header = json.loads(f.read(length))
    if header.get("format") != format:
        raise ValueError(f"format {header.get('format')}, expected {format}")
    data = np.memmap(path, dtype="<f4", mode="r", offset=_aligned(_HEADER.size + length))
    arrays = {}
    for key, spec in header["arrays"].items():
        first, count = spec["offset"] // 4, math.prod(spec["shape"])
        if first + count > len(data):
            raise ValueError("truncated")
        arrays[key] = data[first : first + count].reshape(spec["shape"])
    return header, arrays


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


# --- the cache ----------------------------------------------------------------------------------


def cache_file(folder: str, model_ref: str) -> Path:
    """Where the tower kept in ``folder`` of the model cache is cached for ``model_ref``."""
    digest = hashlib.sha256(canonical(model_ref).encode()).hexdigest()[:16]
    return model_cache_dir() / folder / f"{digest}.bin"


def load_cached(path: Path, model_ref: str, read: Callable[[Path], tuple[Tower, dict]]) -> Tower | None:
    """The tower ``read(path)`` gives (with the ``source`` it records) when it was exported from
    ``model_ref``'s checkpoint as it is now; None when there is none, or it is damaged or stale."""
    source = checkpoint_state(model_ref)
    if source is None or not path.is_file():
        return None
    try:
        tower, recorded = read(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.info("Ignoring the damaged tower cache %s (%s)", path, err)
        return None
    if recorded != source:
        log.info("The tower cache %s is stale: %s has changed", path, model_ref)
        return None
    return tower


def store(path: Path, write: Callable[[Path], None]) -> bool:
    """``write(path)`` into the cache; False (logged) when the cache cannot be written, which only
    costs later processes their speed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as err:
        log.info("Could not cache the tower in %s (%s)", path, err)
        return False
    return True


def canonical(model_ref: str) -> str:
    """The model as a cache key: its registry name, or its checkpoint's absolute path."""
    entry = registry.find(model_ref)
    return entry.name if entry is not None else os.path.abspath(os.path.expanduser(model_ref))


def checkpoint_state(model_ref: str) -> dict | None:
    """What the checkpoint files of ``model_ref`` look like on disk now, or None when they are
    not there (a registry model not downloaded yet)."""
    entry = registry.find(model_ref)
    if entry is None:
        root = Path(model_ref).expanduser()
    elif (found := locate(entry).path) is not None:
        root = found
    else:
        return None
    try:
        files = sorted(root.iterdir()) if root.is_dir() else [root]
        stats = [(file.name, os.stat(file)) for file in files if file.is_file()]
    except OSError:
        return None
    if not stats:
        return None
    return {
        "model": canonical(model_ref),
        # ctime and inode too: no tool sets them back, as `cp -p` or `touch -r` can the mtime.
        "files": [[name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] for name, st in stats],
    }
