"""Shared test helpers: generated images and a tiny random CLIP saved in our model format.

The tiny model has random weights, so tests check plumbing and exact values (an image found by
itself scores 1, counts of encodes), not meaning; the demo model's tests check meaning.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TINY_CONFIG = dict(
    embed_dim=32,
    image_resolution=32,
    vision_layers=1,
    vision_width=64,
    vision_patch_size=8,
    vision_heads=1,
    context_length=16,
    vocab_size=514,
    text_width=64,
    text_heads=1,
    text_layers=1,
)


def write_tiny_model(directory: Path, seed: int = 0, **config: object) -> Path:
    """A randomly initialised CLIP small enough to load in milliseconds, in clipsearch's own
    model-directory format (``config`` overrides `TINY_CONFIG`). Its vocabulary has no merges
    (every word is spelled in bytes): 512 byte tokens plus start and end = 514."""
    import torch

    from clipsearch.clip.checkpoints import write_model_dir
    from clipsearch.clip.model import CLIP, ModelConfig

    torch.manual_seed(seed)
    model = CLIP(ModelConfig(**{**TINY_CONFIG, **config}))  # type: ignore[arg-type]
    vocab = directory.parent / f"{directory.name}-vocab.txt.gz"
    with gzip.open(vocab, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return write_model_dir(directory, model, vocab, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def make_image(
    path: Path | bytes | str, seed: int, size: tuple[int, int] = (48, 40), fmt: str | None = None
) -> Path | bytes:
    """A distinct image per seed: blocks of random colour, so a random model still tells them
    apart. ``path`` may be bytes (non-UTF-8 names)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(blocks).resize(size, Image.NEAREST)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        image.save(f, format=fmt or _format(path))
    return path


def _format(path: Path | bytes | str) -> str:
    ext = os.path.splitext(os.fsdecode(path))[1].lower()
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".gif": "GIF", ".bmp": "BMP"}.get(
        ext, "PNG"
    )


def make_library(root: Path, count: int, start_seed: int = 0, ext: str = ".png") -> list[Path]:
    """``count`` distinct images in two subfolders."""
    return [make_image(root / f"part{i % 2}" / f"img{i:04d}{ext}", start_seed + i) for i in range(count)]


def bump_mtime(path: Path, seconds: int = 10) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


class CrashingPreprocess:
    """Wraps a real preprocess and kills its process on 13×13 images: a stand-in for a native
    decoder crashing on one malicious file (picklable, so it runs in decode workers)."""

    def __init__(self, inner):
        self.inner = inner
        self.resolution = inner.resolution

    def array(self, image):
        if image.size == (13, 13):
            os._exit(3)
        return self.inner.array(image)


class _EntryWithoutStat:
    """A listing's entry that cannot be stat'ed, as in a folder that can be listed but not
    entered (read without execute permission: ``chmod -R 644 photos``)."""

    def __init__(self, entry: os.DirEntry) -> None:
        self._entry, self.name, self.path = entry, entry.name, entry.path

    def is_dir(self, follow_symlinks: bool = True) -> bool:
        return self._entry.is_dir(follow_symlinks=follow_symlinks)  # from the listing's file type

    def is_symlink(self) -> bool:
        return self._entry.is_symlink()

    def stat(self, follow_symlinks: bool = True) -> os.stat_result:
        raise PermissionError(13, "Permission denied", self.path)


def listable_not_enterable(monkeypatch, folder: Path) -> None:
    """Make ``folder`` (simulated, so it also holds for root) listable but not enterable."""
    locked, real = os.fsencode(folder), os.scandir

    class Listing(list):
        def __enter__(self):
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    def scandir(path):
        if path != locked:
            return real(path)
        with real(path) as entries:
            return Listing(_EntryWithoutStat(entry) for entry in entries)

    monkeypatch.setattr(os, "scandir", scandir)


TEST_MODEL = "test-model"  # the model name catalog-level tests commit vectors under


def faiss_file(home: Path) -> Path:
    """The FAISS file of the one model an index was built with."""
    (path,) = Path(home).glob("vectors-*.faiss")
    return path


def stored(catalog):
    """TEST_MODEL as the catalog records it now (its vector count changes with every commit)."""
    return catalog.model(TEST_MODEL)


def make_photo(
    path: Path,
    seed: int = 0,
    *,
    size: tuple[int, int] = (48, 40),
    taken: str | None = None,
    offset: str | None = None,
    datetime: str | None = None,
    datetime_offset: str | None = None,
    make: str | None = None,
    model: str | None = None,
    lens: str | None = None,
    gps: tuple[float, float] | None = None,
    orientation: int | None = None,
    fmt: str | None = None,
) -> Path:
    """`make_image` with real EXIF, written where cameras write it: DateTimeOriginal and
    OffsetTimeOriginal (``taken``, ``offset``) and the lens in the EXIF IFD, DateTime, make,
    model and orientation in IFD0, ``gps`` (signed degrees) as degree/minute/second rationals
    with N/S and E/W references."""
    from PIL.TiffImagePlugin import IFDRational

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)).resize(size, Image.NEAREST)
    exif = Image.Exif()
    for tag, value in ((0x010F, make), (0x0110, model), (0x0112, orientation), (0x0132, datetime)):
        if value is not None:
            exif[tag] = value
    sub = exif.get_ifd(0x8769)
    for tag, value in ((0x9003, taken), (0x9011, offset), (0x9010, datetime_offset), (0xA434, lens)):
        if value is not None:
            sub[tag] = value
    if gps is not None:
        place = exif.get_ifd(0x8825)
        for (ref_tag, value_tag, refs), degrees in zip(((1, 2, "NS"), (3, 4, "EW")), gps):
            whole, minutes = divmod(abs(degrees) * 60, 60)
            place[ref_tag] = refs[degrees < 0]
            place[value_tag] = (
                IFDRational(int(whole)),
                IFDRational(int(minutes)),
                IFDRational(round(minutes % 1 * 6000), 100),
            )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, format=fmt or _format(path), exif=exif)
    return path


def python_output(code: str) -> str:
    """What ``code`` prints in a fresh interpreter (which imports only what it needs: the
    tests of what a path never imports run there)."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def checkpoint_lookups(monkeypatch) -> list[str]:
    """The keys looked up, in order, in the state dict of every checkpoint `clip.open_checkpoint`
    opens from now on: what a writer that reads each tensor once, as it writes it, read."""
    from clipsearch import clip

    real, looked_up = clip.open_checkpoint, []

    class Counted(dict):
        def __getitem__(self, key):
            looked_up.append(key)
            return super().__getitem__(key)

    def counted(*args, **kwargs):
        opened = real(*args, **kwargs)
        return opened._replace(state_dict=Counted({key: opened.state_dict[key] for key in opened.state_dict}))

    monkeypatch.setattr(clip, "open_checkpoint", counted)
    return looked_up
