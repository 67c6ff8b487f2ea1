"""What each request asks of the library, safe to call from many threads at once.

One `Index` answers searches under a lock: a `Catalog` connection is for one thread at a time.
It loads the model's text tower at the start. Started without a model named, the server follows
the index's default model (`clipsearch models default`, or `index --model` of a new one): the
first request to notice a new default loads its text tower, while the others go on with the old
one, and then the new `Index` takes the old one's place. The image tower loads with the first
upload (of each model served), through a second `Index` of its own (its own connection and
lock), so that searches by text go on while it loads and keep the text tower they had.
Thumbnails and originals are looked up on a third, read-only catalog connection with its own
lock, so a page of thumbnails is not queued behind a search; making a thumbnail holds no lock.

Files are found only by catalog id, only when the row is indexed and the file is still the one
indexed: no request can name a path, so there is nothing for "../" or a symlink to act on. "The
one indexed" is checked on the file as opened (its size, modification time and content
fingerprint, not the name's `os.stat`, which a link swapped in after indexing could satisfy), and
what is served, shrunk or read for EXIF is read from that same open file, never opened again by
name: there is no moment when the name can be swapped between the check and the read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from clipsearch.catalog import CATALOG_FILE, Catalog
from clipsearch.errors import ClipsearchError, IndexStateError
from clipsearch.fingerprint import fingerprint, open_regular
from clipsearch.index import Index
from clipsearch.locks import indexing
from clipsearch.records import STATUS_INDEXED, ImageRow, decode_path
from clipsearch.search import Hit, Term, unknown_folder
from clipsearch.serve.errors import NotFound, RequestError
from clipsearch.serve.refine import parse_query
from clipsearch.serve.thumbnails import Thumbnail, Thumbnails
from clipsearch.serve.upload import MAX_PIXELS, open_upload
from clipsearch.walk import stored_mtime_ns

if TYPE_CHECKING:
    from clipsearch.encoder import Encoder, NumpyImageEncoder

log = logging.getLogger(__name__)

MAX_FAILURES_SHOWN = 200
PRUNE_EVERY_S = 60.0


@dataclasses.dataclass(frozen=True)
class Page:
    """Which results a request wants, and the filters they must pass."""

    k: int = 30
    offset: int = 0
    under: str | None = None
    min_score: float | None = None


@dataclasses.dataclass
class Original:
    """An indexed file, open and checked to be the one indexed; read it from ``file`` only."""

    path: Path
    file: BinaryIO
    size: int
    mtime_ns: int
    fingerprint: bytes

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Original:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Service:
    def __init__(
        self, index: Index, files: Catalog, thumbnails: Thumbnails, max_pixels: int = MAX_PIXELS, follow: bool = False
    ):
        self.index = index
        self.follow = follow  # the index's default model, whichever it is at each request
        self.thumbnails = thumbnails
        self.max_pixels = max_pixels
        self._files = files
        self._search_lock = threading.Lock()
        self._files_lock = threading.Lock()
        self._images: Index | None = None  # opened by the first upload, for its image tower
        self._images_lock = threading.Lock()
        self._switching = threading.Lock()  # held by the request that loads a new default model
        self._unloadable: str | None = None  # a default model that failed to load: not tried again
        # One upload decoded and encoded per CPU at a time, the others wait: decoding a
        # 64-megapixel upload takes ~200 MB, and twenty at once had taken 5 GB.
        self._decoding = threading.BoundedSemaphore(os.cpu_count() or 1)
        self._making: dict[bytes, threading.Lock] = {}  # thumbnails being made, by key
        self._making_lock = threading.Lock()
        self._catalog_file = _identity(index.home / CATALOG_FILE)  # the one the connections read
        self._pruned = (files.generation, time.monotonic())  # `open` prunes
        self.pruner: threading.Thread | None = None

    @classmethod
    def open(cls, home: Path, device: str = "auto", model: str | None = None, max_pixels: int = MAX_PIXELS) -> Service:
        """Open the index in ``home`` read-only and load the text tower of the model it searches
        with (``model``, pinned, else the index's default as it changes; its image tower loads
        with the first upload); drop the cached thumbnails of files it no longer holds."""
        index = _loaded(home, model, device)
        try:
            files = Catalog.open(home, readonly=True)
        except BaseException:
            index.close()
            raise
        service = cls(index, files, Thumbnails(index.home), max_pixels, follow=model is None)
        try:
            service.thumbnails.prune(_kept(files))
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

    def search_image(self, data: bytes, text: str, page: Page) -> list[Hit]:
        """By an uploaded image (kept in memory only), refined by ``text`` when given."""
        index = self._current()
        with self._images_lock:  # the first upload loads the tower; the next ones wait for it
            if self._images is None or self._images.model != index.model:
                if self._images is not None:
                    self._images.close()
                self._images = Index.open(
                    index.home, index.model, device=index.device, create=False, readonly=True, warm=True
                )
            # The tower this machine measured to encode `encoder.WARM_IMAGES` images soonest:
            # ONNX Runtime's graph (no torch then) or the model in torch; never a TextEncoder.
            encoder = cast("Encoder | NumpyImageEncoder", self._images.encoder("image"))
        with self._decoding:
            image = open_upload(data, self.max_pixels, target=encoder.resolution)
            vector = encoder.encode_images(encoder.preprocess.array(image)[None])[0]
            del image  # its pixels, before the next upload is let in
        return self._search([(1.0, vector), *parse_query(text, required=False)], page, index.model)

    def similar(self, image_id: int, text: str, page: Page) -> list[Hit]:
        """Nearest to an indexed image's stored vector (nothing re-encoded), itself left out."""
        model = self._current().model
        with self._files_lock:
            stored = self._files.stored_vector(model, image_id=image_id)
            indexed = stored is not None or image_id in self._files.rows([image_id])
        if not indexed:
            raise NotFound(f"No indexed image has id {image_id}.")
        if stored is None:
            with self._files_lock:
                if self._files.model(model) is None:  # a pinned model dropped: as for a search
                    raise _dropped(model)
            raise NotFound(f"Image {image_id} has no vector by {model}, the model served; index it with that model.")
        vector = stored[1]
        # One more than asked for: the image itself is among its own nearest.
        wider = dataclasses.replace(page, k=page.offset + page.k + 1, offset=0)
        hits = self._search([(1.0, vector), *parse_query(text, required=False)], wider, model)
        others = [hit for hit in hits if hit.id != image_id]
        return others[page.offset : page.offset + page.k]

    def search(self, text: str, page: Page) -> list[Hit]:
        return self._search(parse_query(text), page, self._current().model)

    def _search(self, terms: Sequence[tuple[float, Term]], page: Page, model: str) -> list[Hit]:
        """The page of hits by ``model``, the one whose vectors any vector among ``terms`` is."""
        with self._search_lock:
            if self.index.model != model:  # a new default came while its vector was made
                raise IndexStateError(f"The server now searches with {self.index.model}; send the request again.")
            if page.under is not None and unknown_folder(self.index.catalog, page.under):
                raise RequestError(f"under: {page.under} does not exist, and nothing indexed lies under it.")
            try:
                hits = self.index.search(terms, k=page.offset + page.k, under=page.under, min_score=page.min_score)
            except IndexStateError:
                if self.index.catalog.model(model) is not None:
                    raise
                raise _dropped(model) from None
        return hits[page.offset :]

    def _current(self) -> Index:
        """The index to search with now: a new default model's (`follow`) once its text tower is
        loaded, by the first request that notices it; the others meanwhile keep the old one."""
        self._same_home()
        self._prune_after_changes()
        with self._files_lock:
            default = self._files.default_model if self.follow else None
        if default in (None, self.index.model, self._unloadable) or not self._switching.acquire(blocking=False):
            return self.index
        try:
            index = _loaded(self.index.home, None, self.index.device)
        except ClipsearchError as e:  # tried once: every request had failed on it, status too
            log.warning(
                "The index's default model is now %s, which cannot be loaded (%s); still searching with %s",
                default,
                e,
                self.index.model,
            )
            self._unloadable = default
            return self.index
        finally:
            self._switching.release()
        with self._search_lock:
            old, self.index = self.index, index
        old.close()
        return index

    def _prune_after_changes(self) -> None:
        """Once the catalog changed (an index run), delete the thumbnails of files it no longer
        holds: in a thread with a connection of its own, since reading every row's fingerprint
        takes seconds in a large catalog, and at most every `PRUNE_EVERY_S` during a long run."""
        with self._files_lock:
            generation = self._files.generation
        if generation == self._pruned[0] or time.monotonic() - self._pruned[1] < PRUNE_EVERY_S:
            return
        with self._files_lock:  # one request starts it
            if self._pruned[0] == generation:
                return
            self._pruned = (generation, time.monotonic())
        self.pruner = threading.Thread(target=self._prune, name="prune thumbnails", daemon=True)
        self.pruner.start()

    def _prune(self) -> None:
        try:
            with Catalog.open(self.index.home, readonly=True) as catalog:
                self.thumbnails.prune(_kept(catalog))
        except Exception as e:  # the cache only grows meanwhile: no request should fail for it
            log.warning("thumbnails of files no longer indexed are not deleted: %s", e)

    def _same_home(self) -> None:
        """`IndexStateError` once the index's catalog was deleted or replaced (a new index made
        in its place): the open connections go on reading the old file, which nothing updates."""
        if _identity(self.index.home / CATALOG_FILE) != self._catalog_file:
            raise IndexStateError(
                f"The index in {self.index.home} was deleted or replaced since the server started; "
                "restart `clipsearch serve`."
            )

    # --- files ------------------------------------------------------------------------------

    def original(self, image_id: int) -> Original:
        """The indexed file with this id, open, if it is still the one indexed (same size,
        modification time and content fingerprint, checked on the open file): a file swapped
        for a link to something else is not served, whatever size and time it was given. The
        caller closes it."""
        row, key = self._indexed(image_id)
        path = decode_path(row.path)
        try:
            file = open_regular(path)
        except OSError:
            raise NotFound(f"{path} is no longer there.") from None
        try:
            st = os.fstat(file.fileno())
            if (st.st_size, stored_mtime_ns(st)) != (row.size, row.mtime_ns) or fingerprint(file) != key:
                raise NotFound(f"{path} changed since it was indexed; run `clipsearch index` again to see it.")
            file.seek(0)
        except BaseException:
            file.close()
            raise
        return Original(path, file, row.size, row.mtime_ns, key)

    def _indexed(self, image_id: int) -> tuple[ImageRow, bytes]:
        """The indexed row with this id and its content fingerprint."""
        self._same_home()
        with self._files_lock:
            row = self._files.rows([image_id]).get(image_id)
            key = self._files.fingerprint(image_id)
        if row is None or key is None:
            raise NotFound(f"No indexed image has id {image_id}.")
        return row, key

    def thumbnail_key(self, image_id: int, version: str | None = None) -> tuple[bytes, bool]:
        """The fingerprint the thumbnail of this id is cached and tagged by, and whether
        ``version`` ("SIZE-MTIME", a hit's ``size`` and ``mtime``) is the row's as indexed now."""
        row, key = self._indexed(image_id)
        return key, version is not None and _version(version) == (row.size, row.mtime_ns / 1e9)

    def thumbnail(self, image_id: int, key: bytes) -> Thumbnail:
        """The cached thumbnail of fingerprint ``key`` (`thumbnail_key`'s, which tagged the
        answer; no file read), else one made from the checked original."""
        cached = self.thumbnails.cached(key)
        if cached is not None:
            return cached
        # One request makes it, those asking at the same time wait and read it (each had made
        # it: 8 at once for a 24-megapixel PNG took 3.8 s of CPU against 0.55 s for one).
        with self._making_lock:
            making = self._making.setdefault(key, threading.Lock())
        with making:
            try:
                cached = self.thumbnails.cached(key)
                if cached is not None:
                    return cached
                with self.original(image_id) as original:
                    return self.thumbnails.add(original.fingerprint, original.file)
            finally:
                with self._making_lock:
                    if self._making.get(key) is making:
                        del self._making[key]

    def details(self, image_id: int) -> dict[str, Any]:
        """What the preview shows beyond the hit: the date the photo was taken, when its EXIF says."""
        with self.original(image_id) as original:
            return {"id": image_id, "path": str(original.path), "taken": _date_taken(original.file, original.path)}

    # --- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        self._current()
        with self._search_lock:
            status = self.index.status()
            failures = self.index.failures()
        return status.to_json() | {
            "thumbnail_bytes": self.thumbnails.disk_bytes(),
            "indexing": indexing(status.home),
            "failures": [{"path": str(path), "reason": reason} for path, reason in failures[:MAX_FAILURES_SHOWN]],
            "failures_total": len(failures),
        }


def _dropped(model: str) -> IndexStateError:
    return IndexStateError(
        f"The index has no vectors by {model} any more, the model this server was started with "
        "(--model); restart it with another (`clipsearch models` lists them)."
    )


def _kept(catalog: Catalog) -> set[bytes]:
    """The fingerprints whose thumbnails stay: those of the indexed files."""
    states = catalog.file_states().values()
    return {state.fingerprint for state in states if state.status == STATUS_INDEXED and state.fingerprint}


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _loaded(home: Path, model: str | None, device: str) -> Index:
    """The index read-only with ``model`` (None: its default), its FAISS file and text tower
    loaded; `IndexStateError` for a model the index has no vectors by."""
    index = Index.open(home, model, device=device, create=False, readonly=True, warm=True)
    try:
        index.status()  # loads the FAISS file
        index.require_model_if_others()
        # The text tower only: once measured, without torch (0.3 s and ~300 MB against ~3 s
        # and ~1 GB with the image tower). The first upload loads the image tower, once.
        index.encoder("text")
    except BaseException:
        index.close()
        raise
    return index


def _version(text: str) -> tuple[int, float] | None:
    """ "SIZE-MTIME" as (size, mtime), None when it is not that (an mtime is compared as a float,
    which JavaScript and Python print alike only up to their formatting of whole numbers)."""
    size, _, mtime = text.partition("-")
    try:
        return int(size), float(mtime)
    except ValueError:
        return None


def _date_taken(file: BinaryIO, path: Path) -> str | None:
    """EXIF DateTimeOriginal (else DateTime) as ISO 8601, from the header of the open ``file``."""
    from PIL import ExifTags

    from clipsearch.clip.preprocess import open_pillow

    try:
        with open_pillow(file, str(path)) as image:
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
