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

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clipsearch.catalog import CATALOG_FILE, Catalog
from clipsearch.encoder import model_id, open_encoder
from clipsearch.errors import IndexStateError
from clipsearch.indexer import AddReport, Progress, run_add
from clipsearch.paths import default_home
from clipsearch.records import decode_path
from clipsearch.search import Hit, Query, as_terms, needed_towers, query_vector, top_k
from clipsearch.walk import normalise_roots

if TYPE_CHECKING:
    from clipsearch.encoder import Encoder, TextEncoder
    from clipsearch.vectors import VectorIndex

DEFAULT_MODEL = "ViT-B/32"


@dataclass
class Status:
    home: Path
    model: str | None
    dim: int | None
    counts: dict[str, int]  # catalog rows by status
    catalog_bytes: int
    vectors_bytes: int
    index_type: str
    vectors_in_index: int
    recall_at_10: float | None  # of an approximate index, measured when it was built

    @property
    def consistent(self) -> bool:
        """The FAISS index holds exactly the catalog's indexed vectors."""
        return self.vectors_in_index == self.counts.get("indexed", 0)


class Index:
    """An index directory: its catalog, its FAISS file, and the model it was built with."""

    def __init__(self, catalog: Catalog, model: str, device: str, precision: str, readonly: bool):
        self.catalog = catalog
        self.home = catalog.home
        self.model = model
        self.device = device
        self.precision = precision
        self.readonly = readonly
        self._encoder: Encoder | TextEncoder | None = None
        self._vectors: tuple[int, VectorIndex] | None = None  # (catalog generation, index)

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
    ) -> Index:
        """Open the index in ``home``, creating it if ``create`` (and not ``readonly``).

        ``model`` defaults to the one the index was built with; naming another one is an error,
        since vectors from two models cannot be compared.
        """
        home = Path(home).expanduser() if home is not None else default_home()
        wanted = model_id(model) if model is not None else None
        catalog = Catalog.open(home, create=create and not readonly, readonly=readonly)
        try:
            recorded = catalog.get_meta("model")
            if recorded is not None and wanted is not None and wanted != recorded:
                raise IndexStateError(
                    f"The index in {home} was built with model {recorded}, not {wanted}: leave out --model "
                    f"to use {recorded}, or pass --home with another folder to build an index with {wanted}."
                )
            if recorded is None and not readonly:
                catalog.set_meta("model", wanted or DEFAULT_MODEL)
        except BaseException:
            catalog.close()
            raise
        return cls(catalog, recorded or wanted or DEFAULT_MODEL, device, precision, readonly)

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(
        self,
        paths: Iterable[str | os.PathLike],
        *,
        exclude: Sequence[str] = (),
        follow_symlinks: bool = False,
        retry_failed: bool = False,
        batch_size: int | None = None,
        workers: int | None = None,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> AddReport:
        """Index new and changed images under ``paths``; forget those gone from there.

        ``progress(done, total)`` is called as files are finished; ``should_stop()`` is polled
        and, once true, the run commits what is finished and returns with ``interrupted`` set.
        """
        with self.catalog.writer_lock():
            generation = self.catalog.generation
            report = run_add(
                self.catalog,
                lambda: self.encoder("image"),
                paths,
                exclude=exclude,
                follow_symlinks=follow_symlinks,
                retry_failed=retry_failed,
                batch_size=batch_size,
                workers=workers,
                progress=progress,
                should_stop=should_stop or (lambda: False),
            )
            if self.catalog.generation != generation:
                self._rebuild_vectors()
        return report

    def search(
        self, query: Query, k: int = 10, under: str | os.PathLike | None = None, min_score: float | None = None
    ) -> list[Hit]:
        """Best matches first. A ``str`` is text, a ``Path`` an example image; a list of
        ``(weight, str | Path)`` pairs is their weighted combination (negative weights subtract)."""
        terms = as_terms(query)
        vectors = self._vectors_now()
        if vectors.ntotal == 0:
            return []
        vector = query_vector(self.encoder(needed_towers(terms)), terms)
        return top_k(vectors, self.catalog, vector, k, under, min_score)

    def remove(self, paths: Iterable[str | os.PathLike]) -> int:
        """Forget the files at or under ``paths`` (the files themselves are not touched)."""
        with self.catalog.writer_lock():
            removed = self.catalog.remove(normalise_roots(paths))
            if removed:
                self._rebuild_vectors()
        return removed

    def rebuild(self, index_type: str = "auto") -> Status:
        """Rebuild the FAISS index from the catalog's vectors, e.g. with another ``index_type``
        (a FAISS factory string such as ``"Flat"`` or ``"HNSW32"``), which later rebuilds keep."""
        with self.catalog.writer_lock():
            self._rebuild_vectors(index_type)
        return self.status()

    def status(self) -> Status:
        from clipsearch.vectors import VECTORS_FILE

        vectors = self._vectors_now()
        dim = self.catalog.get_meta("dim")
        return Status(
            home=self.home,
            model=self.catalog.get_meta("model"),
            dim=int(dim) if dim else None,
            counts=self.catalog.counts(),
            catalog_bytes=_size(self.home, CATALOG_FILE),
            vectors_bytes=_size(self.home, VECTORS_FILE),
            index_type=vectors.index_type,
            vectors_in_index=vectors.ntotal,
            recall_at_10=vectors.recall_at_10,
        )

    def failures(self) -> list[tuple[Path, str]]:
        """Files that could not be indexed, with the reason."""
        return [(decode_path(path), error) for path, error in self.catalog.failures()]

    def encoder(self, towers: str = "both") -> Encoder | TextEncoder:
        """The model, loaded once with at least ``towers``; checked against the index's dimension."""
        if self._encoder is None or self._encoder.towers not in ("both", towers):
            if self._encoder is not None:
                towers = "both"  # text and images are both wanted by now
            encoder = open_encoder(self.model, self.device, self.precision, towers)
            dim = self.catalog.get_meta("dim")
            if dim is None and not self.readonly:
                self.catalog.set_meta("dim", str(encoder.dim))
            elif dim is not None and int(dim) != encoder.dim:
                raise IndexStateError(
                    f"The index in {self.home} holds {dim}-dimensional vectors but {self.model} makes "
                    f"{encoder.dim}-dimensional ones; the weights at that path changed, so re-index "
                    "into a new --home."
                )
            self._encoder = encoder
        return self._encoder

    def _rebuild_vectors(self, index_type: str | None = None) -> None:
        """After a write, under the writer lock: the FAISS file follows the catalog, updated by
        the rows that changed, or built anew in ``index_type``."""
        from clipsearch.vectors import VectorIndex

        if index_type is None:
            index = VectorIndex.refresh(self.home, self.catalog)
        else:
            index = VectorIndex.rebuild(self.home, self.catalog, index_type=index_type)
        self._vectors = (self.catalog.generation, index)

    def _vectors_now(self) -> VectorIndex:
        """The FAISS index matching the catalog as it is now (another process may have written)."""
        from clipsearch.vectors import VectorIndex

        generation = self.catalog.generation
        if self._vectors is None or self._vectors[0] != generation:
            self._vectors = (generation, VectorIndex.load(self.home, self.catalog, save=not self.readonly))
        return self._vectors[1]


def _size(home: Path, name: str) -> int:
    """Bytes on disk, counting SQLite's -wal/-shm companions."""
    return sum(p.stat().st_size for p in home.glob(name + "*") if p.is_file())
