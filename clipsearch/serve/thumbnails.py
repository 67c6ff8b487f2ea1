"""Thumbnails, made on first request and kept under the index home, keyed by content fingerprint.

The key is the catalog's fingerprint of the file, so a moved or copied photo reuses its
thumbnail, and an edited one (a new fingerprint after the next index run) gets a new one. The
ETag is the key too: a browser that has a thumbnail is answered 304 without a file being read.

Made on request rather than during `index`: opening a 12-megapixel JPEG at reduced scale, then
resizing and encoding, costs ~50 ms per photo on one core (WebP encoding 4 ms of it), paid once
per photo shown, never for the photos nobody looks at.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

SHORT_SIDE = 256
LONG_SIDE = 4 * SHORT_SIDE  # panoramas are cut down to this, not kept at 256 x 10,000
QUALITY = 80
VERSION = "1"  # part of the ETag: bump it when thumbnails are made differently
FOLDER = "thumbnails"


@dataclass(frozen=True)
class Thumbnail:
    data: bytes
    media_type: str
    etag: str  # quoted, as the header carries it


class Thumbnails:
    """The cache in ``home/thumbnails``: two-level folders of ``<fingerprint hex>.<ext>``."""

    def __init__(self, home: Path):
        from PIL import features

        self.folder = home / FOLDER
        # The cache's bytes, walked for once, then kept as this process adds and prunes: the
        # page asks for the status every 15 s, and the walk takes 2.3 s for 100,000 thumbnails.
        self._bytes: int | None = None
        self._bytes_lock = threading.Lock()
        self.format, self.media_type, self.ext = (
            ("WEBP", "image/webp", ".webp") if features.check("webp") else ("JPEG", "image/jpeg", ".jpg")
        )

    def etag(self, key: bytes) -> str:
        return f'"{key.hex()}-{VERSION}"'

    def cached(self, key: bytes) -> Thumbnail | None:
        """The stored thumbnail of the file whose indexed fingerprint is ``key``, if made before."""
        try:
            return Thumbnail(self._file(key).read_bytes(), self.media_type, self.etag(key))
        except FileNotFoundError:
            return None

    def add(self, key: bytes, file: BinaryIO) -> Thumbnail:
        """Make the thumbnail of the open ``file`` (the caller has checked it is still the one
        indexed with fingerprint ``key``) and store it. Raises `ImageError` when it cannot be read."""
        data = self.make(file)
        self._store(self._file(key), data)
        return Thumbnail(data, self.media_type, self.etag(key))

    def make(self, source: BinaryIO) -> bytes:
        """Upright, RGB, about `SHORT_SIDE` pixels on the short side, encoded."""
        out = io.BytesIO()
        shrunk(source, SHORT_SIDE, LONG_SIDE).save(out, self.format, quality=QUALITY)
        return out.getvalue()

    def prune(self, keep: set[bytes]) -> int:
        """Delete the thumbnails of fingerprints the catalog no longer holds; returns how many."""
        wanted = {key.hex() + self.ext for key in keep}
        removed = 0
        for file in self._files():
            if file.name not in wanted:
                with self._bytes_lock:
                    size = _size(file)
                    file.unlink(missing_ok=True)
                    self._count(-size)
                removed += 1
        return removed

    def disk_bytes(self) -> int:
        with self._bytes_lock:
            if self._bytes is None:
                self._bytes = sum(_size(file) for file in self._files())
            return self._bytes

    def _count(self, change: int) -> None:
        if self._bytes is not None:
            self._bytes += change

    def _files(self) -> list[Path]:
        """The thumbnails stored, not the temporary files of those being written (`_store`'s,
        renamed into place any moment)."""
        if not self.folder.is_dir():
            return []
        return [
            file
            for sub in self.folder.iterdir()
            if sub.is_dir()
            for file in sub.iterdir()
            if not file.name.startswith(".") and file.is_file()
        ]

    def _file(self, key: bytes) -> Path:
        name = key.hex()
        return self.folder / name[:2] / (name + self.ext)

    def _store(self, target: Path, data: bytes) -> None:
        """Write atomically (a temporary file renamed): a reader sees all of it or nothing. A
        folder that cannot be written only costs the caching."""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                with self._bytes_lock:
                    change = len(data) - _size(target)
                    os.replace(temporary, target)
                    self._count(change)
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError as e:
            log.warning("thumbnails are not cached: cannot write %s (%s)", target.parent, e.strerror)


def _size(file: Path) -> int:
    """The file's size, 0 when there is none (pruned, or not made yet)."""
    try:
        return file.stat().st_size
    except FileNotFoundError:
        return 0


def shrunk(source: str | os.PathLike[str] | BinaryIO, short_side: int, long_side: int) -> Image.Image:
    """The image at ``source`` (a path or an open file) upright (EXIF orientation applied), in
    RGB, scaled down to at most ``short_side`` on its short side and ``long_side`` on its long
    one; small images keep their size. Raises `ImageError` when it cannot be read."""
    from PIL import Image

    from clipsearch.clip.preprocess import open_image

    image = open_image(source, target=short_side)  # JPEGs decode at a reduced scale
    width, height = image.size
    scale = min(short_side / min(width, height), long_side / max(width, height), 1.0)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image
