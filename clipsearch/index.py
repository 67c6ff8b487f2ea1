"""The library API: one object per index directory.

```python
from clipsearch import Index
with Index.open("~/.local/share/clipsearch", model="ViT-B/32") as idx:
    report = idx.add(["~/photos"])
    hits = idx.search("a dog on a beach", k=10)
```

The model is loaded on first need and with only the towers the call needs, so opening an index
and running a text query never reads the image tower's weights, and an `add` with nothing new
never loads a model at all. Never prints: progress is a callback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from clipsearch.catalog import CATALOG_FILE, Catalog
from clipsearch.encoder import begin_image_tower, model_id, open_encoder
from clipsearch.errors import ClipsearchError, ImageError, IndexStateError
from clipsearch.filters import Filters
from clipsearch.indexer import AddReport, Progress, run_add
from clipsearch.paths import default_home
from clipsearch.records import STATUS_INDEXED, StoredModel, decode_path
from clipsearch.search import Hit, Query, find_hits
from clipsearch.walk import normalise_roots, stored_mtime_ns

if TYPE_CHECKING:
    from clipsearch.clip.model import Towers
    from clipsearch.clip.onnx_image import OnnxImageTower
    from clipsearch.duplicates import Group
    from clipsearch.encoder import Encoder, NumpyImageEncoder, TextEncoder
    from clipsearch.manifest import Manifest
    from clipsearch.ray_index import RayExecutor
    from clipsearch.vectors import VectorIndex

log = logging.getLogger(__name__)

# OpenCLIP's ViT-B/32 at 256 px trained on DataComp: 72.8% ImageNet zero-shot and COCO R@1 39.9
# against OpenAI ViT-B/32's 63.3% and 30.4, at about 1.3x its cost to index, with the same
# 512-d vectors and a text tower that queries run without torch (`clipsearch models`).
DEFAULT_MODEL = "ViT-B-32-256/datacomp_s34b_b86k"


@dataclass
class ModelCoverage:
    """How far one model's vectors cover the catalog's indexed images."""

    name: str
    dim: int
    vectors: int
    default: bool


@dataclass
class Status:
    home: Path
    model: str | None  # the model this status describes: the one named, else the default
    dim: int | None
    counts: dict[str, int]  # catalog rows by status
    catalog_bytes: int
    vectors_bytes: int
    index_type: str
    vectors_in_index: int
    recall_at_10: float | None  # of an approximate index, measured when it was built
    models: list[ModelCoverage] = field(default_factory=list)
    weights_changed: bool = False  # the model's vectors were made by other weights than its own now

    @property
    def consistent(self) -> bool:
        """The FAISS index holds exactly the catalog's vectors by the model."""
        held = next((m.vectors for m in self.models if m.name == self.model), 0)
        return self.vectors_in_index == held

    def to_json(self) -> dict[str, Any]:
        """Every field, and whether it is `consistent`, as `json.dumps` takes them."""
        return asdict(self) | {"home": str(self.home), "consistent": self.consistent}


class Index:
    """An index directory: a catalog of files, and per model that encoded them, their vectors."""

    def __init__(self, catalog: Catalog, model: str, device: str, precision: str, warm: bool = False):
        self.catalog = catalog
        self.home = catalog.home
        self.model = model
        self.device = device
        self.precision = precision
        self.warm = warm
        self._encoder: Encoder | TextEncoder | NumpyImageEncoder | None = None
        self._encoder_weights: str | None = None  # the fingerprint of the weights it was loaded from
        # (catalog generation, the vector file, its `vectors.file_identity` when it was read, index)
        self._vectors: tuple[int, Path, list[int] | None, VectorIndex] | None = None
        self._begun: OnnxImageTower | None = None  # `open` began it, for the first image encoder

    @classmethod
    def open(
        cls,
        home: str | os.PathLike | None = None,
        model: str | None = None,
        *,
        device: str = "auto",
        precision: str = "auto",
        create: bool = True,
        readonly: bool = False,
        warm: bool = False,
    ) -> Index:
        """Open the index in ``home``, creating it if ``create`` (and not ``readonly``).

        ``model`` is the one that `add` encodes with and `search` searches; by default the
        index's default model (the first one it was built with), else `DEFAULT_MODEL`. Opening
        records nothing: a model is recorded with the first vector it encodes.

        ``warm``: this process will search many times (a server, an app), so text queries go
        through the torch text tower at its fastest faithful precision (`clip.text_fast`); by
        default they use the NumPy one, which spares a short-lived process importing torch.
        """
        home = Path(home).expanduser() if home is not None else default_home()
        gone: ClipsearchError | None = None
        try:
            wanted = model_id(model) if model is not None else None
        except ClipsearchError as err:  # no such model, or a checkpoint moved or deleted since
            wanted, gone = os.path.abspath(os.path.expanduser(cast(str, model))), err
        creating = create and not readonly
        # A new index is filled next: its image tower opens while the catalog is created.
        new = not (home / CATALOG_FILE).exists()
        if gone is not None and new:
            raise gone
        begun = begin_image_tower(wanted or DEFAULT_MODEL, device, precision) if creating and new else None
        catalog = Catalog.open(home, create=creating, readonly=readonly)
        if gone is not None and catalog.model(cast(str, wanted)) is None:
            catalog.close()
            raise gone  # vectors by a checkpoint gone from its path stay usable by that name: `models drop`
        index = cls(catalog, wanted or catalog.default_model or DEFAULT_MODEL, device, precision, warm)
        index._begun = begun
        return index

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(
        self,
        paths: Iterable[str | os.PathLike] | str | os.PathLike | Manifest,
        *,
        exclude: Sequence[str] = (),
        follow_symlinks: bool = False,
        retry_failed: bool = False,
        verify: bool = False,
        batch_size: int | None = None,
        workers: int | None = None,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
        ray: str | RayExecutor | None = None,
        verify_progress: Progress | None = None,
    ) -> AddReport:
        """Index new and changed images under ``paths`` (or those a `Manifest` lists) with the
        model; forget those gone from there. Files other models indexed already are only
        encoded, never walked twice. ``verify`` fingerprints unchanged files again, to catch
        content rewritten with size and mtime kept.

        ``progress(done, total)`` is called as files are finished, and ``verify_progress(done,
        total)`` as ``verify`` fingerprints them, before any is encoded; ``should_stop()`` is polled
        and, once true, the run commits what is finished and returns with ``interrupted`` set.
        ``ray`` (a cluster address, ``"auto"``, or a `RayExecutor`) decodes and encodes on a
        Ray cluster; this process still plans the run and is the only writer.
        """
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size is {batch_size}; give 1 or more, or None for the default.")
        if workers is not None and workers < 0:
            raise ValueError(f"workers is {workers}; give 0 (decode in this process) or more, or None for auto.")
        with self.catalog.writer_lock():
            weights, stale = self._drop_stale_vectors()
            generation = self.catalog.generation
            report = run_add(
                self.catalog,
                self.model,
                self._image_encoder,
                paths,
                exclude=exclude,
                follow_symlinks=follow_symlinks,
                retry_failed=retry_failed,
                verify=verify,
                batch_size=batch_size,
                workers=workers,
                progress=progress,
                should_stop=should_stop or (lambda: False),
                executor=None if ray is None else self._ray_executor(ray, batch_size, workers),
                weights=weights,
                verify_progress=verify_progress,
                stale=stale,
            )
            # For vectors a Ray executor recorded, or from weights the run downloaded (checked).
            self.catalog.adopt_model_weights(self.model, weights or self._current_weights())
            if self.catalog.generation != generation:
                self._update_vectors()
        if report.encoded:
            self._prepare_text_queries()
        return report

    def _current_weights(self) -> str | None:
        """The fingerprint of the model's weights on disk now (None while not on this machine);
        an encoder loaded from other weights is let go, to be loaded again."""
        from clipsearch.clip.sources import weights_fingerprint

        weights = weights_fingerprint(self.model)
        if self._encoder is not None and weights != self._encoder_weights:
            self._encoder = None
        return weights

    def _drop_stale_vectors(self) -> tuple[str | None, frozenset[bytes]]:
        """Before a run, under the writer lock: the fingerprint of the model's weights now, and
        the paths whose vectors were dropped for having been made by other weights (the model
        was updated or retrained in place), for the run to encode every image again and count
        them as re-encoded. Mixing the two would make searches compare vectors of two embedding
        spaces. Vectors of unknown weights (recorded before schema 0006) are taken to be by these."""
        weights = self._current_weights()
        stored = self.catalog.model(self.model)
        if stored is None or weights is None or stored.weights == weights:
            return weights, frozenset()
        if stored.weights is None:
            self.catalog.adopt_model_weights(self.model, weights)
            return weights, frozenset()
        log.warning(
            "The weights of %s changed since its vectors were made (%s, now %s): encoding its %d images again",
            self.model,
            stored.weights,
            weights,
            stored.vectors,
        )
        stale = frozenset(path for path, state in self.catalog.file_states(self.model).items() if state.encoded)
        self._forget_vectors(stored, keep_default=True)
        return weights, stale

    def weights_changed(self) -> bool:
        """Whether the model's vectors here were made by other weights than those on disk now
        (the model was updated or retrained in place); `add` encodes them again."""
        recorded = self.catalog.model_weights(self.model)
        if recorded is None:
            return False
        weights = self._current_weights()
        return weights is not None and weights != recorded

    def _require_current_weights(self) -> None:
        """A search must not compare a query from these weights with vectors from others."""
        if self.weights_changed():
            raise IndexStateError(stale_weights_message(self.model, self.catalog.default_model == self.model))

    def _ray_executor(self, ray: str | RayExecutor, batch_size: int | None, workers: int | None) -> RayExecutor:
        from dataclasses import replace

        from clipsearch.ray_index import RayExecutor

        if isinstance(ray, str):
            ray = RayExecutor(ray, batch_size=batch_size, workers=workers)
        return replace(ray, device=self.device, precision=self.precision)

    def _prepare_text_queries(self) -> None:
        """Export the model's text tower for queries now, at the end of a run that encoded with
        it, rather than in the user's first query (~3 s for ViT-B/32 there). The image encoder
        is let go first, this once per model: a model's first run then holds one tensor of the
        text tower at a time beside what it still has (`numpy_text.export`)."""
        from clipsearch.clip import numpy_text
        from clipsearch.clip.families import family
        from clipsearch.clip.heap import release_free_memory

        if family(self.model) != "clip" or numpy_text.load_cached(self.model) is not None:
            return  # only a CLIP's text tower runs in NumPy
        self._encoder = None
        release_free_memory()
        try:
            numpy_text.export(self.model)
        except Exception as err:  # only the first query's speed depends on it
            log.info("Could not prepare the text tower of %s for queries (%s)", self.model, err)

    def search(
        self,
        query: Query | None,
        k: int = 10,
        under: str | os.PathLike | None = None,
        min_score: float | None = None,
        filters: Filters | None = None,
        sort: str = "score",
        exclude: Sequence[int] = (),
    ) -> list[Hit]:
        """Best matches first. A ``str`` is text, a ``Path`` an example image, an array a unit
        vector; a list of ``(weight, term)`` pairs is their weighted combination (negative
        weights subtract). ``filters`` (`clipsearch.Filters`) keep only the photos taken when,
        where, with what they say. ``sort`` is "score", "date" (oldest first), "-date" or
        "path". With no query (None or []) but filters, the photos they pass are listed,
        newest first unless ``sort`` says otherwise. Ids in ``exclude`` are never returned."""
        self._require_current_weights()
        return find_hits(
            query, self.encoder, self._searched_vectors, self.catalog, k, under, min_score, filters, sort, exclude
        )

    def similar(
        self,
        example: str | os.PathLike | int,
        k: int = 10,
        *,
        include_self: bool = False,
        **options: Any,
    ) -> list[Hit]:
        """ "More like this": images like ``example``, a path or a catalog id (`Hit.id`). An
        indexed image's stored vector is used, nothing decoded; another file is encoded. The
        image itself is left out unless ``include_self``. ``options`` are `search`'s."""
        term, own = self.example(example)
        return self.search(term, k, exclude=() if include_self or own is None else (own,), **options)

    def example(self, example: str | os.PathLike | int) -> tuple[Path | np.ndarray, int | None]:
        """A query term for an example image and its catalog id: the stored vector when the
        model has one for it and the file is unchanged since, else the path, to be encoded.
        An id must name an image indexed by the model."""
        if isinstance(example, int):
            found = self.catalog.stored_vector(self.model, image_id=example)
            if found is None:
                raise ImageError(f"No image with id {example} is indexed by {self.model} in {self.home}.")
            return found[1], example
        (path,) = normalise_roots([example])
        found = self.catalog.stored_vector(self.model, path=path)
        try:
            st = os.stat(path)
        except OSError as e:
            raise ImageError(f"Cannot use {os.fsdecode(path)} as an example: {e.strerror}.") from None
        if found is not None and (found[2], found[3]) == (st.st_size, stored_mtime_ns(st)):
            return found[1], found[0]
        return Path(os.fsdecode(path)), found[0] if found is not None else None

    def duplicates(self, threshold: float | None = None, under: str | os.PathLike | None = None) -> list[Group]:
        """Groups of the same picture under ``under``: byte-identical copies, and images whose
        stored vectors by the model reach cosine ``threshold`` (default: measured for the
        model's family, `duplicates.default_threshold`). Nothing is encoded, nothing deleted:
        each group suggests a keeper and lists the rest."""
        from clipsearch.duplicates import default_threshold, find_duplicates

        if threshold is None:
            threshold = default_threshold(self.model)
        folder = normalise_roots([under])[0] if under is not None else None
        stored = self.catalog.model(self.model)
        if stored is None:
            self._searched_vectors()  # an error where vectors are wanted; none in an empty index
        else:
            # Vectors by other weights than the threshold was measured for had paired different
            # pictures, which `duplicates --paths-only | xargs rm` then deletes.
            self._require_current_weights()
        return find_duplicates(self.catalog, stored, threshold, folder)

    def remove(self, paths: Iterable[str | os.PathLike] | str | os.PathLike) -> int:
        """Forget the files at or under ``paths`` (the files themselves are not touched)."""
        with self.catalog.writer_lock():
            removed = self.catalog.remove(normalise_roots(paths))
            if removed:
                self._update_vectors()
        return removed

    def forget_missing(self) -> int:
        """Forget the files that were indexed once and are gone from disk now."""
        with self.catalog.writer_lock():
            return self.catalog.forget_missing()

    def rebuild(self, index_type: str = "auto") -> Status:
        """Rebuild the model's FAISS index from the catalog's vectors, e.g. with another
        ``index_type`` (a FAISS factory string such as ``"Flat"`` or ``"HNSW32"``), which later
        rebuilds keep. ValueError for a type it does not search (`vectors.check_index_type`)."""
        from clipsearch.vectors import check_index_type

        check_index_type(index_type)
        with self.catalog.writer_lock():
            self._update_vectors(index_type)
        return self.status()

    def set_default_model(self) -> None:
        """Make the model the one queries use when none is named."""
        self.catalog.set_default_model(self.model)

    def make_default_if_encoded(self) -> bool:
        """Make the model the default if it has vectors here and is not the default yet; True
        if it became the default."""
        if self.catalog.default_model == self.model or self.catalog.model(self.model) is None:
            return False
        self.set_default_model()
        return True

    def drop_model(self) -> bool:
        """Forget the model's vectors and FAISS file; the files stay indexed for other models.
        False if it had none."""
        with self.catalog.writer_lock():
            stored = self.catalog.model(self.model)
            return stored is not None and self._forget_vectors(stored)

    def _forget_vectors(self, stored: StoredModel, keep_default: bool = False) -> bool:
        """Under the writer lock: drop ``stored``'s vectors and FAISS file."""
        from clipsearch.vectors import remove_vectors_file

        if not self.catalog.drop_model(stored.name, keep_default=keep_default):
            return False
        remove_vectors_file(self.home, stored)
        self._vectors = None
        return True

    def status(self) -> Status:
        """A report, also of a model with no vectors here (none in the index then); searching
        with it is the error (`require_model_if_others`)."""
        from clipsearch.vectors import vectors_file

        stored = self.catalog.model(self.model)
        vectors = self._vectors_now() if stored is not None else None
        default = self.catalog.default_model
        return Status(
            home=self.home,
            model=self.model,
            dim=stored.dim if stored else None,
            counts=self.catalog.counts(),
            catalog_bytes=_size(self.home, CATALOG_FILE),
            vectors_bytes=_size(self.home, vectors_file(stored)) if stored else 0,
            index_type=vectors.index_type if vectors else "none",
            vectors_in_index=vectors.ntotal if vectors else 0,
            recall_at_10=vectors.recall_at_10 if vectors else None,
            models=[ModelCoverage(m.name, m.dim, m.vectors, m.name == default) for m in self.catalog.models()],
            weights_changed=self.weights_changed(),
        )

    def failures(self) -> list[tuple[Path, str]]:
        """Files that could not be indexed, with the reason."""
        return [(decode_path(path), error) for path, error in self.catalog.failures()]

    def missing(self) -> list[Path]:
        """Files indexed once and gone from disk since."""
        return [decode_path(path) for path in self.catalog.missing()]

    def encoder(self, towers: Towers = "both", images: int | None = None) -> Encoder | TextEncoder:
        """The model, loaded once with at least ``towers`` (for a first use that encodes
        ``images``); checked against the dimension its vectors in the catalog have. What "auto"
        chose for a few images (the NumPy image tower, bf16) is replaced when a larger run
        would finish sooner with another (`_outgrown`)."""
        if self._encoder is None or self._encoder.towers not in ("both", towers) or self._outgrown(images):
            if os.path.isabs(self.model) and not os.path.exists(self.model):  # `open` let its vectors be named
                raise IndexStateError(
                    f"The checkpoint {self.model}, whose vectors this index holds, is gone (moved or deleted): "
                    f"put it back, or forget its vectors with `clipsearch models drop {self.model}`."
                )
            if self._encoder is not None and self._encoder.towers != towers:
                towers = "both"  # text and images are both wanted by now
            weights = self._current_weights()
            encoder = open_encoder(self.model, self.device, self.precision, towers, self.warm, images, self._begun)
            self._begun = None  # taken up, or let go for another tower
            stored = self.catalog.model(self.model)
            if stored is not None and stored.dim != encoder.dim:
                raise IndexStateError(
                    f"The index in {self.home} holds {stored.dim}-dimensional vectors by {self.model}, which "
                    f"now makes {encoder.dim}-dimensional ones; the weights at that path changed: drop the old "
                    f"vectors with `clipsearch models drop {self.model}`, then index again."
                )
            self._encoder, self._encoder_weights = encoder, weights
        # A NumpyImageEncoder comes only for a count of images to encode (the indexer's call),
        # and does all an Encoder does with images.
        return cast("Encoder | TextEncoder", self._encoder)

    def _outgrown(self, images: int | None) -> bool:
        """Whether the encoder "auto" chose for an earlier, smaller run would now be slower than
        preparing another: a tower without torch that another one (or torch) now beats, or bf16
        where int8 pays for its packing."""
        from clipsearch.clip.precision_verdicts import torchless_image_tower, worth_switching
        from clipsearch.encoder import Encoder, NumpyImageEncoder

        encoder = self._encoder
        if images is None or self.precision != "auto":
            return False
        if isinstance(encoder, NumpyImageEncoder):
            return torchless_image_tower(self.model, images) != encoder.tower.kind
        if not isinstance(encoder, Encoder) or encoder.device.type != "cpu" or encoder.towers == "text":
            return False
        return worth_switching(self.model, encoder.precision, images)

    def _image_encoder(self, images: int) -> Encoder:
        return cast("Encoder", self.encoder("image", images))  # asked for the image tower: never a TextEncoder

    def _update_vectors(self, index_type: str | None = None) -> None:
        """After a write, under the writer lock: the model's FAISS file follows the catalog,
        updated by the rows that changed, or built anew in ``index_type``. Other models' files
        catch up when next used."""
        from clipsearch.vectors import VectorIndex, file_identity, vectors_file

        stored = self.catalog.model(self.model)
        if stored is None:
            self._vectors = None
            return
        if index_type is None:
            index = VectorIndex.refresh(self.home, self.catalog, stored)
        else:
            index = VectorIndex.rebuild(self.home, self.catalog, stored, index_type=index_type)
        path = self.home / vectors_file(stored)
        self._vectors = (self.catalog.generation, path, file_identity(path), index)

    def _vectors_now(self) -> VectorIndex | None:
        """The model's FAISS index matching the catalog as it is now (another process may have
        written); None while the model has no vectors here. A file rebuilt by another process
        (`clipsearch rebuild`, perhaps in another index type) leaves the catalog's generation as
        it was: the file's own identity tells it. Each search asks, so the answer for an index
        unchanged costs a stat, not a read of the models (13 ms at 100k vectors)."""
        from clipsearch.vectors import VectorIndex, file_identity, vectors_file

        generation = self.catalog.generation
        if self._vectors is not None:
            built_from, path, identity, index = self._vectors
            if built_from == generation and file_identity(path) == identity:
                return index
        stored = self.catalog.model(self.model)
        if stored is None:
            self.require_model_if_others()
            return None
        path = self.home / vectors_file(stored)
        identity = file_identity(path)  # before loading: at worst one load too many
        index = VectorIndex.load(self.home, self.catalog, stored)
        self._vectors = (generation, path, identity, index)
        return index

    def require_model_if_others(self) -> None:
        """Searching a model the index has no vectors by is a mistake when others have some."""
        others = [m.name for m in self.catalog.models()]
        if others and self.model not in others:
            raise IndexStateError(
                f"The index in {self.home} has no vectors by {self.model}; index with it first "
                f"(`clipsearch index PATH --model {self.model}`), or use one of: {', '.join(others)}."
            )

    def _searched_vectors(self) -> VectorIndex | None:
        """`_vectors_now` for a search, which is a mistake too in an index that holds images but
        no vectors by any model (each dropped): an index with nothing in it yet has no hits."""
        found = self._vectors_now()
        if found is None and self.catalog.counts()[STATUS_INDEXED]:
            raise IndexStateError(
                f"The index in {self.home} holds images but no vectors by any model; index them with one "
                f"(`clipsearch index PATH --model {self.model}`)."
            )
        return found


def stale_weights_message(model: str, default: bool = True) -> str:
    """The advice names the model unless it is the default, which a plain `index` run encodes with."""
    command = "clipsearch index PATH" if default else f"clipsearch index PATH --model {model}"
    return (
        f"The vectors of {model} were made by other weights (the model was updated or retrained); "
        f"run `{command}` on its folders to re-encode them."
    )


def _size(home: Path, name: str) -> int:
    """Bytes on disk, counting SQLite's -wal/-shm companions."""
    return sum(p.stat().st_size for p in home.glob(name + "*") if p.is_file())
