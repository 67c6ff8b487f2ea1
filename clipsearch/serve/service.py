"""What each request asks of the library, safe to call from many threads at once.

One `Index` answers searches under a lock: a `Catalog` connection is for one thread at a time.
It loads the model's text tower at the start; the image tower loads with the first upload, once,
through a second `Index` of its own (its own connection and lock), so that searches by text go
on while it loads and keep the text tower they had. Thumbnails and originals are looked up on a
third, read-only catalog connection with its own lock, so a page of thumbnails is not queued
behind a search; making a thumbnail holds no lock at all.

Files are found only by catalog id, only when the row is indexed and the file is still the one
indexed: no request can name a path, so there is nothing for "../" or a symlink to act on.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from clipsearch.catalog import Catalog
from clipsearch.index import Index
from clipsearch.locks import indexing
from clipsearch.records import STATUS_INDEXED, decode_path
from clipsearch.search import Hit, Term
from clipsearch.serve.errors import NotFound
from clipsearch.serve.refine import parse_query
from clipsearch.serve.thumbnails import Thumbnails
from clipsearch.serve.upload import MAX_PIXELS, open_upload
from clipsearch.walk import stored_mtime_ns

if TYPE_CHECKING:
    from clipsearch.encoder import Encoder, NumpyImageEncoder

MAX_FAILURES_SHOWN = 200


@dataclasses.dataclass(frozen=True)
class Page:
    """Which results a request wants, and the filters they must pass."""

    k: int = 30
    offset: int = 0
    under: str | None = None
    min_score: float | None = None


class Service:
    def __init__(self, index: Index, files: Catalog, thumbnails: Thumbnails, max_pixels: int = MAX_PIXELS):
        self.index = index
        self.thumbnails = thumbnails
        self.max_pixels = max_pixels
        self._files = files
        self._search_lock = threading.Lock()
        self._files_lock = threading.Lock()
        self._images: Index | None = None  # opened by the first upload, for its image tower
        self._images_lock = threading.Lock()

    @classmethod
    def open(cls, home: Path, device: str = "auto", model: str | None = None, max_pixels: int = MAX_PIXELS) -> Service:
        """Open the index in ``home`` read-only and load the text tower of the model it searches
        with (``model``, else the index's default; its image tower loads with the first upload);
        drop the cached thumbnails of files it no longer holds."""
        index = Index.open(home, model, device=device, create=False, readonly=True, warm=True)
        try:
            files = Catalog.open(home, readonly=True)
        except BaseException:
            index.close()
            raise
        service = cls(index, files, Thumbnails(index.home), max_pixels)
        try:
            index.status()  # loads the FAISS file; refuses a model the index has no vectors by
            # The text tower only: once measured, without torch (0.3 s and ~300 MB against ~3 s
            # and ~1 GB with the image tower). The first upload loads the image tower, once.
            index.encoder("text")
            states = files.file_states().values()
            service.thumbnails.prune({s.fingerprint for s in states if s.status == STATUS_INDEXED and s.fingerprint})
        except BaseException:
            service.close()
            raise
        return service

    def close(self) -> None:
        self.index.close()
        self._files.close()
        if self._images is not None:
            self._images.close()

    # --- searches ---------------------------------------------------------------------------

    def search(self, text: str, page: Page) -> list[Hit]:
        return self._search(parse_query(text), page)

    def search_image(self, data: bytes, text: str, page: Page) -> list[Hit]:
        """By an uploaded image (kept in memory only), refined by ``text`` when given."""
        with self._images_lock:  # the first upload loads the tower; the next ones wait for it
            if self._images is None:
                index = self.index
                self._images = Index.open(
                    index.home, index.model, device=index.device, create=False, readonly=True, warm=True
                )
            # The tower this machine measured to encode `encoder.WARM_IMAGES` images soonest:
            # ONNX Runtime's graph (no torch then) or the model in torch; never a TextEncoder.
            encoder = cast("Encoder | NumpyImageEncoder", self._images.encoder("image"))
        image = open_upload(data, self.max_pixels, target=encoder.resolution)
        vector = encoder.encode_images(encoder.preprocess.array(image)[None])[0]
        return self._search([(1.0, vector), *parse_query(text, required=False)], page)

    def similar(self, image_id: int, text: str, page: Page) -> list[Hit]:
        """Nearest to an indexed image's stored vector (nothing re-encoded), itself left out."""
        with self._files_lock:
            stored = self._files.stored_vector(self.index.model, image_id=image_id)
        if stored is None:
            raise NotFound(f"No indexed image has id {image_id}.")
        vector = stored[1]
        # One more than asked for: the image itself is among its own nearest.
        wider = dataclasses.replace(page, k=page.offset + page.k + 1, offset=0)
        hits = self._search([(1.0, vector), *parse_query(text, required=False)], wider)
        others = [hit for hit in hits if hit.id != image_id]
        return others[page.offset : page.offset + page.k]

    def _search(self, terms: Sequence[tuple[float, Term]], page: Page) -> list[Hit]:
        with self._search_lock:
            hits = self.index.search(terms, k=page.offset + page.k, under=page.under, min_score=page.min_score)
        return hits[page.offset :]

    # --- files ------------------------------------------------------------------------------

    def original(self, image_id: int) -> Path:
        """The indexed file with this id, if it is still there as it was indexed (same size and
        modification time): a file swapped for a link to something else is not served."""
        with self._files_lock:
            row = self._files.rows([image_id]).get(image_id)
        if row is None:
            raise NotFound(f"No indexed image has id {image_id}.")
        path = decode_path(row.path)
        try:
            st = os.stat(path)
        except OSError:
            raise NotFound(f"{path} is no longer there.") from None
        if not stat.S_ISREG(st.st_mode) or (st.st_size, stored_mtime_ns(st)) != (row.size, row.mtime_ns):
            raise NotFound(f"{path} changed since it was indexed; run `clipsearch index` again to see it.")
        return path

    def thumbnail_source(self, image_id: int) -> tuple[Path, bytes]:
        """The file behind a thumbnail and its fingerprint, which keys the thumbnail cache."""
        with self._files_lock:
            key = self._files.fingerprint(image_id)
        if key is None:
            raise NotFound(f"No indexed image has id {image_id}.")
        return self.original(image_id), key

    def details(self, image_id: int) -> dict[str, Any]:
        """What the preview shows beyond the hit: the date the photo was taken, when its EXIF says."""
        path = self.original(image_id)
        return {"id": image_id, "path": str(path), "taken": _date_taken(path)}

    # --- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._search_lock:
            status = self.index.status()
            failures = self.index.failures()
        return status.to_json() | {
            "thumbnail_bytes": self.thumbnails.disk_bytes(),
            "indexing": indexing(status.home),
            "failures": [{"path": str(path), "reason": reason} for path, reason in failures[:MAX_FAILURES_SHOWN]],
            "failures_total": len(failures),
        }


def _date_taken(path: Path) -> str | None:
    """EXIF DateTimeOriginal (else DateTime) as ISO 8601, from the header alone."""
    from PIL import ExifTags

    from clipsearch.clip.preprocess import open_pillow

    try:
        with open_pillow(path, str(path)) as image:
            exif = image.getexif()
            value = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.DateTimeOriginal) or exif.get(
                ExifTags.Base.DateTime
            )
    except Exception:  # no EXIF, or EXIF a camera wrote badly: the date is simply unknown
        return None
    if not isinstance(value, str) or len(value) < 19:
        return None
    date, _, time = value.strip("\x00").partition(" ")
    return f"{date.replace(':', '-')}T{time}" if time else None
