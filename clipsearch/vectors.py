"""The FAISS index over the catalog's vectors: derived data, rebuilt whenever it cannot be trusted.

Vectors are L2-normalised, so inner product is cosine similarity; FAISS ids are catalog row ids,
so a hit joins the catalog without a side table. Inverted files keep those ids in their lists
themselves; other index types get them from an `IndexIDMap2` around them. (An IDMap2 around an
inverted file answers wrong ids once vectors are removed: it assumes the index inside renumbers
what is left, as a flat index does, and an inverted file does not.)

Each model that encoded the catalog has its own file, `vectors-<model id>.faiss`: the FAISS index
as `faiss.write_index` writes it, then a JSON stamp (which catalog and model it belongs to, the
catalog generation it was built from, how many vectors, the index type and its measured recall),
then the stamp's length and a magic tag. A file whose catalog id or model differs from the
catalog's (copied from another home, or left by a catalog that was replaced) is rebuilt. Between
the index and the stamp, one 64-bit key per vector (in id order) says when the catalog wrote it
(`_write_keys`): a file is updated only if every row the catalog has not changed since the
file's generation has the file's key, so the vectors of another history of the same catalog (a
backup of the catalog restored under a newer file, then written to again) are never taken for
its own; the stamp's `generation_id` does the same for a file of the catalog's very generation.
One
file means one atomic rename on save, and FAISS reads the index from the start of the file, so
it can memory-map it instead of copying it.
A file that is missing, truncated or garbage is rebuilt from the catalog with a warning. One
stamped with an older generation is brought up to date (`VectorIndex.refresh`): the catalog
records the generation in which each row's vector last changed, so the file takes in exactly
those rows and drops the ids the catalog no longer holds; a stale index would return the wrong
files, an updated one returns what a rebuild would.

"auto" picks exact search up to `FLAT_LIMIT` vectors. Above, an inverted file (`IVF<nlist>`)
whose codes fit a memory budget: full vectors up to `REFINE_FROM`; from there (or when full
vectors do not fit) 4-bit fast-scan product codes whose shortlist a float16 copy re-ranks
(`reranked.py`: a quarter of the CPU a query at 300k, the copy memory-mapped and read only
for the shortlist); else 8-bit scalar quantised, else product quantised. Its `nprobe` (and a
refined index's shortlist) is raised until recall@10 against exact search, measured at build
time on queries made from a sample of the vectors to be as far from them as text queries are
(`text_like_queries`), reaches `TUNING_RECALL` (a point above the `TARGET_RECALL` promised,
which queries never seen must get too). IVF rather than HNSW
because it builds in seconds instead of minutes (about 2 s vs 120 s for 100k x 512 on two
cores), and an HNSW graph cannot drop vectors, so every change would mean a rebuild.

An inverted file whose nearest lists an HNSW graph of their centroids finds (`IVF65536_HNSW32`,
the usual advice for 10M vectors and more) is a type to ask for, not "auto"'s choice: on the
clustered vectors of `benchmarks/scale.py` its many short lists needed nprobe 512 of 16,384 at
1M (31k vectors scanned, 11.5 ms of CPU a query) where 1,024 lists needed 16 (16k vectors).
Its k-means runs in two levels (`train`): one over all its lists would take hours of two cores.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import faiss
import numpy as np

from clipsearch.catalog import Catalog
from clipsearch.errors import IndexStateError
from clipsearch.records import StoredModel
from clipsearch.reranked import Reranked, split_type

log = logging.getLogger(__name__)

LEGACY_FILE = "vectors.faiss"  # before vectors per model (schema 0004): rebuilt, then removed

# Exact search below this many vectors: one query scans 30k x 512 floats in ~2-4 ms on one core.
FLAT_LIMIT = 30_000
TARGET_RECALL = 0.95
# What the tuning aims at: recall measured on 200 queries is good to about +-0.015, and queries
# it never saw should still see TARGET_RECALL (at 100k, 0.950 on the tuning queries was 0.917 on others).
TUNING_RECALL = 0.96
RECALL_QUERIES = 200
TRAIN_POINTS_PER_LIST = 64  # FAISS asks for at least 39; more only slows k-means down
# An inverted file with an HNSW coarse quantiser (`IVF65536_HNSW32,SQ8`, asked for by name) has
# so many lists that fewer points per list train it: 65,536 lists want a 2.6M sample (5.4 GB).
HNSW_TRAIN_POINTS_PER_LIST = 40
_KMEANS_ITERATIONS = 10  # FAISS's own for an inverted file
_CHUNK = 100_000  # vectors converted to float32 at a time while building (200 MB at 512-d)
_QUANTIZER_EF = 32
# From this many vectors "auto" scans 4-bit fast-scan codes and re-ranks a shortlist from a
# float16 copy (`reranked.py`) rather than scanning float32 vectors: at 300k the scan cost a
# quarter of the CPU time for the same recall (benchmarks/README.md, "10M vectors"); below,
# both take well under a millisecond and full vectors keep exact scores and simpler files.
REFINE_FROM = 500_000
# The re-rank's copy: 8-bit codes capped recall@10 at ~0.96 on clustered vectors (neighbours'
# scores differ by less than their rounding), 6 and 4 bits at 0.88 and 0.62; float16 at 0.99+.
REFINE_CODES = "SQfp16"
K_FACTORS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # shortlists of k_factor x k that `tune` tries
K_FACTOR_MARGIN = 2
_TRAIN_POINTS = 100_000  # for other trained codecs (PQ, SQ without IVF)
_ID_BYTES = 64

_MAGIC = b"CLIPSRCH"
_TRAILER = struct.Struct("<Q8s")  # stamp length, magic
_STAMP_FORMAT = 3
_CRC_CHUNK = 16 << 20
_KEY = np.dtype("<u8")
_MMAP_READ_ONLY = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY


AnyIndex = faiss.Index | Reranked  # what `new_index` makes and `read_index` reads


class StaleIndex(Exception):
    """The file on disk cannot be used; the message says why (for the rebuild warning)."""


class VectorIndex:
    """A searchable FAISS index and what is known about how it was built."""

    def __init__(
        self,
        index: AnyIndex,
        index_type: str,
        recall_at_10: float | None,
        built_count: int | None = None,
        changed_since_build: int = 0,
        keys: np.ndarray | None = None,
    ) -> None:
        self.index = index
        self.index_type = index_type
        inner = _inner(index)  # found once: two downcasts cost a query 15-20 us
        # An HNSW graph's search state (its tuned efSearch), None for other indexes.
        self._graph = inner.hnsw if isinstance(inner, faiss.IndexHNSW) else None
        self.recall_at_10 = recall_at_10  # measured at the last full build
        # How many vectors that build held, and how many were added or dropped by updates since:
        # when the second outgrows the first, trained lists no longer fit the collection.
        self.built_count = index.ntotal if built_count is None else built_count
        self.changed_since_build = changed_since_build
        # When the catalog wrote each vector (`_write_keys`), in the order of the sorted ids;
        # None where unknown (saved as zeros, which match nothing: the next update rebuilds).
        self.keys = keys

    @classmethod
    def _stamped(cls, index: AnyIndex, stamp: dict, keys: np.ndarray | None = None) -> VectorIndex:
        return cls(
            index,
            stamp["index_type"],
            stamp["recall_at_10"],
            stamp.get("built_count", stamp["count"]),
            stamp.get("changed_since_build", 0),
            keys,
        )

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.d

    @classmethod
    def build(
        cls,
        ids: np.ndarray,
        vectors: np.ndarray,
        index_type: str = "auto",
        memory_budget: int | None = None,
    ) -> VectorIndex:
        """Index `vectors` [n, dim] (L2-normalised) under the catalog `ids` [n].

        `index_type` is "auto" or a FAISS factory string such as "Flat", "HNSW32", "IVF1024,SQ8".
        The vectors may be float16, as the catalog stores them: FAISS gets float32 a chunk at a
        time, so a float32 copy of the whole collection (20 GB at 10M) never exists.
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        n, dim = vectors.shape
        if index_type == "auto":
            index_type = choose_index_type(n, dim, memory_budget)
        index = new_index(index_type, dim)
        if isinstance(index, Reranked):
            index.reserve(n)
        return cls._filled(index, index_type, ids, vectors, index.add_with_ids)

    @classmethod
    def _filled(
        cls,
        index: AnyIndex,
        index_type: str,
        ids: np.ndarray,
        vectors: np.ndarray,
        add: Callable[[np.ndarray, np.ndarray], None],
    ) -> VectorIndex:
        """`index` trained on, then given (`add`), `vectors`, and tuned."""
        if not index.is_trained:
            _train(index, vectors, index_type)
        for start in range(0, len(ids), _CHUNK):
            add(_float32(vectors[start : start + _CHUNK]), ids[start : start + _CHUNK])
        recall = None if index_type == "Flat" else _tune(index, ids, vectors)
        return cls(index, index_type, recall)

    @classmethod
    def _from_catalog(cls, catalog: Catalog, model: StoredModel, index_type: str) -> VectorIndex:
        """`build` from ``model``'s vectors in the catalog. A refined index with float16 codes
        reads them into its own storage (`Reranked.float16_rows`) and is built from there."""
        if index_type == "auto":
            index_type = choose_index_type(model.vectors, model.dim)
        index = new_index(index_type, model.dim)
        if isinstance(index, Reranked) and index.float16_codes:
            ids, vectors = catalog.all_vectors(model, into=index.float16_rows)
            index.hold(ids)
            return cls._filled(index, index_type, ids, vectors, index.add_to_inverted_file)
        # Large collections as stored, in float16 (build converts a chunk at a time); small
        # ones in float32, where one copy costs less than the float16 one beside a chunk's.
        ids, vectors = catalog.all_vectors(model, np.float16 if model.vectors > _CHUNK else np.float32)
        return cls.build(ids, vectors, index_type)

    @classmethod
    def load(cls, home: Path, catalog: Catalog, model: StoredModel, *, save: bool = True) -> VectorIndex:
        """``model``'s index in `home` if it matches the catalog; one brought up to date
        (`refresh`) if it is older; one rebuilt from the catalog if it is missing, damaged or not
        this catalog's. Saved if `save` and the home can be written, but for a read-only
        catalog's update, which is its writer's to save."""
        generation = catalog.generation
        path = Path(home) / vectors_file(model)
        try:
            index, stamp = _read(path, catalog, model)
        except StaleIndex as reason:
            if model.vectors or path.exists():
                log.warning("Rebuilding the vector index from the catalog: %s", reason)
            return cls.rebuild(home, catalog, model, save=save)
        if (stamp["generation"], stamp["generation_id"], stamp["count"]) == (
            generation,
            catalog.generation_id,
            model.vectors,
        ):
            return cls._stamped(index, stamp)
        return cls.refresh(home, catalog, model, save=save)

    @classmethod
    def refresh(cls, home: Path, catalog: Catalog, model: StoredModel, *, save: bool = True) -> VectorIndex:
        """Bring the saved index up to the catalog by the rows changed since it was written:
        adding 10 photos to a million costs reading and writing the file, not k-means and a pass
        over every vector. Rebuilt instead when the file cannot be updated (missing, damaged,
        older than the catalog's record of changes, an HNSW graph), when "auto" would now pick
        another index type, or when the vectors changed since its last full build outnumber half
        of those it was trained with (its lists would no longer fit the collection).
        """
        path = Path(home) / vectors_file(model)
        try:
            index, stamp = _read(path, catalog, model, mmap=None)
            keys = _read_keys(path, stamp)
        except StaleIndex:
            return cls.rebuild(home, catalog, model, save=save)
        current = cls._stamped(index, stamp, keys)
        started = time.perf_counter()
        changes = catalog.changes_since(stamp["generation"], model)
        writes = catalog.vector_writes(model)  # read after the changes: never older than them
        if changes is None:
            reason: str | None = "it is older than the catalog's record of changes"
        elif not current._holds_unchanged_rows_of(writes, stamp["generation"]):
            reason = "it holds vectors of another history of this catalog (was catalog.db restored from a backup?)"
        else:
            if (changes.generation, len(changes.held)) == (stamp["generation"], stamp["count"]):
                return current
            gone = np.setdiff1d(held_ids(index), changes.held, assume_unique=True)
            outdated = np.union1d(changes.outdated, gone)
            reason = current._why_not_update(len(outdated) + len(changes.ids), len(changes.held), catalog)
        if reason is not None or changes is None:
            log.info("Rebuilding the vector index: %s", reason)
            return cls.rebuild(home, catalog, model, save=save)
        if isinstance(index, Reranked):
            refined = split_type(current.index_type)
            assert refined is not None  # a Reranked is read from a refined type only
            removed = index.update(outdated, changes.vectors, changes.ids, refined[1])
        else:
            removed = index.remove_ids(faiss.IDSelectorBatch(outdated))
            if len(changes.ids):
                index.add_with_ids(changes.vectors, changes.ids)
        if index.ntotal != len(changes.held):  # the file held what its stamp did not say
            return cls.rebuild(home, catalog, model, save=save)
        current.changed_since_build += len(changes.ids) + removed
        current.keys = current._keys_from(writes)
        log.info(
            "Updated the vector index: %d vectors in, %d out, in %.1f s",
            len(changes.ids),
            removed,
            time.perf_counter() - started,
        )
        # A reader's update (a server's, after an index run beside it) is the writer's to save:
        # it saved its own, and one more copy of the file per batch it commits would double the
        # writes. What a reader rebuilds it saves (`rebuild`), or it would rebuild at every start.
        if save and not catalog.readonly:
            current._save_if_writable(home, catalog, model, changes.generation)
        return current

    def _sorted_ids(self) -> np.ndarray:
        return np.sort(held_ids(self.index))

    def _keys_from(self, writes: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        """The keys of the vectors held, from the catalog's `vector_writes` (0 for ids it lacks)."""
        ids, generations, times = writes
        held = self._sorted_ids()
        at, found = _find(ids, held)
        keys = np.zeros(len(held), _KEY)
        keys[found] = _write_keys(generations[at[found]], times[at[found]])
        return keys

    def _holds_unchanged_rows_of(self, writes: tuple[np.ndarray, np.ndarray, np.ndarray], generation: int) -> bool:
        """Every vector the catalog has not written since ``generation`` is here, with the key
        the catalog gives it: true of a file of the catalog's own history, whatever changed
        since, and false of one from another history, whose rows are other writes."""
        ids, generations, times = writes
        unchanged = generations <= generation
        if not unchanged.any():
            return True
        if self.keys is None:
            return False
        at, found = _find(self._sorted_ids(), ids[unchanged])
        keys = _write_keys(generations[unchanged], times[unchanged])
        return bool(found.all() and np.array_equal(self.keys[at], keys))

    def _why_not_update(self, changes: int, count: int, catalog: Catalog) -> str | None:
        """Why this index must be rebuilt rather than take ``changes`` vectors in and out to hold
        ``count``; None if it need not."""
        if isinstance(_inner(self.index), faiss.IndexHNSW):
            return "an HNSW graph cannot drop vectors"
        if catalog.get_meta("index_type") in (None, "", "auto") and count:
            wanted = choose_index_type(count, self.index.d)
            if wanted != self.index_type:
                return f"{count} vectors call for {wanted}, not {self.index_type}"
        trained = self.index_type != "Flat"
        if trained and self.changed_since_build + changes > self.built_count / 2:
            return "more vectors changed since its last full build than half of those it was trained on"
        return None

    @classmethod
    def rebuild(
        cls, home: Path, catalog: Catalog, model: StoredModel, *, index_type: str | None = None, save: bool = True
    ) -> VectorIndex:
        """Build from the catalog's vectors; a given `index_type` is remembered for later rebuilds.

        A remembered type that no longer fits the collection (too few vectors to train) falls
        back to "auto" with a warning, so that a shrunk collection never stops queries.
        """
        # Read before the vectors: if a write lands in between, the stamp is older than the
        # catalog and the next load catches up, never the reverse.
        generation = catalog.generation
        started = time.perf_counter()
        try:
            built = cls._from_catalog(catalog, model, index_type or catalog.get_meta("index_type") or "auto")
        except IndexStateError as e:
            if index_type is not None:
                raise
            log.warning("%s Using auto instead.", e)
            built = cls._from_catalog(catalog, model, "auto")
        writes = catalog.vector_writes(model)  # after the vectors: never older than them
        built.keys = built._keys_from(writes)
        if index_type is not None:
            catalog.set_meta("index_type", index_type)
        recall = "exact" if built.recall_at_10 is None else f"{built.recall_at_10:.3f}"
        log.info(
            "Built a %s index of %d vectors in %.1f s (recall@10: %s)",
            built.index_type,
            built.ntotal,
            time.perf_counter() - started,
            recall,
        )
        if save and index_type is not None:  # asked for (`clipsearch rebuild`): not saved is not done
            built.save(home, catalog.catalog_id, model, generation, catalog.generation_id)
        elif save:
            built._save_if_writable(home, catalog, model, generation)
        return built

    def _save_if_writable(self, home: Path, catalog: Catalog, model: StoredModel, generation: int) -> None:
        """Saved wherever the home can be written, by a reader of the catalog too (the file is
        derived, and a save never replaces a file half-written); a save that fails (a full disk)
        only warns: the index in memory is correct, and the next open builds or updates it again."""
        if os.access(home, os.W_OK):
            try:
                self.save(home, catalog.catalog_id, model, generation, catalog.generation_id)
            except IndexStateError as e:
                log.warning("%s", e)

    def save(self, home: Path, catalog_id: str, model: StoredModel, generation: int, generation_id: str = "") -> None:
        """Write the model's file atomically: a temporary file, fsync, rename, fsync the folder.
        ``generation_id`` is the catalog's at ``generation`` (`Catalog.generation_id`); one read
        later names a newer generation, which costs the next load an update, never a wrong answer."""
        home = Path(home)
        name = vectors_file(model)
        keys = self.keys if self.keys is not None else np.zeros(self.ntotal, _KEY)
        stamp: dict[str, object] = {
            "format": _STAMP_FORMAT,
            "catalog_id": catalog_id,
            "model": model.name,
            "generation": generation,
            "generation_id": generation_id,
            "count": self.ntotal,
            "dim": self.index.d,
            "index_type": self.index_type,
            "recall_at_10": self.recall_at_10,
            "built_count": self.built_count,
            "changed_since_build": self.changed_since_build,
        }
        # A name of our own (a query process may rebuild while an indexer saves) that says which
        # process wrote it, so that the leftovers of a killed one can be recognised.
        tmp = home / f"{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            faiss.write_index(self.index.storable() if isinstance(self.index, Reranked) else self.index, str(tmp))
            with open(tmp, "r+b") as f:
                payload = _crc(f, os.fstat(f.fileno()).st_size)
                f.seek(0, os.SEEK_END)
                f.write(key_bytes := keys.astype(_KEY).tobytes())
                checksum = {"payload_bytes": f.tell(), "checksum": zlib.crc32(key_bytes, payload)}
                stamped = json.dumps({**stamp, **checksum}).encode()
                f.write(stamped + _TRAILER.pack(len(stamped), _MAGIC))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, home / name)
            _fsync_dir(home)
            _remember_checked(home / name)
        except (OSError, RuntimeError) as e:  # FAISS reports its write errors as RuntimeError
            tmp.unlink(missing_ok=True)
            advice = (
                f"move the folder {home / name} out of the way"
                if (home / name).is_dir()
                else "free some space or fix the folder's permissions"
            )
            raise IndexStateError(f"Could not save the vector index in {home} ({_brief(e)}); {advice}.") from e
        _remove_orphans(home)
        (home / LEGACY_FILE).unlink(missing_ok=True)

    @classmethod
    def read_checked(cls, home: Path, catalog: Catalog, model: StoredModel) -> tuple[VectorIndex, int]:
        """The model's file as it is on disk, its checksum compared whatever was recorded, and
        the catalog generation it was built from; StaleIndex saying why it cannot be used."""
        index, stamp = _read(Path(home) / vectors_file(model), catalog, model, mmap=False, check=True)
        return cls._stamped(index, stamp), stamp["generation"]

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """The vectors held under ``ids`` (all held), as the index stores them: exactly for a
        Flat or IVF-Flat index, approximately for a quantised one (a refined one: its finer copy)."""
        ivf = None if isinstance(self.index, Reranked) else faiss.try_extract_index_ivf(self.index)
        if ivf is not None:  # its lists hold catalog ids: a hash table finds them
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        return self.index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))

    def held_ids(self) -> np.ndarray:
        """The catalog ids held, sorted."""
        return self._sorted_ids()

    def search(self, queries: np.ndarray, k: int, among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [nq, k], ids int64 [nq, k]) for queries [nq, dim], best first.

        With ``among`` (catalog ids, e.g. those a filter passes), only those come back: FAISS
        skips the others as it scans, so a filter that passes few images still gets k of them
        where an over-fetch would have to read most of the index. Fewer than k hits are padded
        with id -1 and score -inf.
        """
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if self.ntotal == 0 or (among is not None and len(among) == 0):  # also: a catalog so new its dim is unknown
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        if among is None:
            scores, ids = self._search_all(queries, k)
        else:
            scores, ids = self._search_among(queries, k, np.asarray(among, dtype=np.int64))
        scores[ids < 0] = -np.inf
        return scores, ids

    def _search_all(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """With the tuned nprobe or efSearch where they can give k hits (the common case: a
        check of the last column is all it adds); else broader (`_widening`): an HNSW graph
        explores at least k candidates, or it returns fewer (195 of 310 at efSearch 16), and an
        inverted file whose probed lists held fewer than k probes more of them."""
        hnsw = self._graph
        if hnsw is not None and k > hnsw.efSearch:
            return self._widening(queries, k, min(k, self.ntotal), None, k)
        scores, ids = self.index.search(queries, k)
        wanted = min(k, self.ntotal)
        if ids[:, -1].min() >= 0 or (ids >= 0).sum(axis=1).min() >= wanted:
            return scores, ids
        ivf = _ivf(self.index)
        breadth = ivf.nprobe if ivf is not None else (hnsw.efSearch if hnsw is not None else 0)
        return self._widening(queries, k, wanted, None, 4 * breadth)

    def _search_among(self, queries: np.ndarray, k: int, among: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Search only ``among``, probing more lists (or exploring more of an HNSW graph) the
        fewer ids pass, and more again (`_widening`) while some query has fewer than k hits and
        more could exist: the lists nearest a query may hold none of the few images a filter
        passes, and an HNSW search with a filter that passes 2% of 5,000 had found none."""
        mask = np.zeros(int(among.max()) + 1, dtype=bool)
        mask[among] = True
        bitmap = np.packbits(mask, bitorder="little")  # referenced until the searches are done
        selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        ivf = _ivf(self.index)
        # Probing n/m times the lists reaches about as many passing vectors as an unfiltered
        # search reaches vectors, for about as much distance arithmetic: recall holds up, and a
        # filter that passes 1% of a million photos costs a scan of ids, not of vectors.
        if ivf is not None:
            breadth = math.ceil(ivf.nprobe * self.ntotal / len(among))
        elif self._graph is not None:
            breadth = max(k, math.ceil(self._graph.efSearch * self.ntotal / len(among)))
        else:
            breadth = 0
        return self._widening(queries, k, min(k, len(among)), selector, breadth)

    def _widening(
        self, queries: np.ndarray, k: int, wanted: int, selector: faiss.IDSelector | None, breadth: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search k with ``breadth`` (an inverted file's nprobe, an HNSW graph's efSearch, at
        least k; nothing for other indexes, which find all), then 4 times broader at a time, up
        to all the lists or the whole graph, while some query has fewer than ``wanted`` hits."""
        ivf = _ivf(self.index)
        quantizer = None if ivf is None else _hnsw_quantizer(ivf)
        if ivf is not None:
            most = ivf.nlist
        elif self._graph is not None:
            most = max(k, self.ntotal)  # efSearch of all the vectors explores the whole graph
        else:
            most = 0
        breadth = max(1, breadth)
        while True:
            breadth = min(most, breadth)
            chosen: dict[str, object] = {} if selector is None else {"sel": selector}
            probes = None
            if ivf is not None:
                chosen["nprobe"] = breadth
                if quantizer is not None:  # its graph must find as many lists as are probed
                    probes = _params("HNSW", efSearch=max(_QUANTIZER_EF, 2 * breadth))
                    chosen["quantizer_params"] = probes
            elif self._graph is not None:
                chosen["efSearch"] = max(k, breadth)
            kind = "IVF" if ivf is not None else "HNSW" if self._graph is not None else ""
            scores, ids = self.index.search(queries, k, params=_params(kind, **chosen))
            del probes  # referenced until the search is done
            if breadth >= most or (ids >= 0).sum(axis=1).min() >= wanted:
                return scores, ids
            breadth *= 4


def _params(kind: str, **values: object) -> faiss.SearchParameters:
    """FAISS's search parameters for an index ``kind`` ("", "IVF", "HNSW"), set one by one (the
    constructors' keyword arguments are missing from FAISS's type stubs)."""
    params = getattr(faiss, f"SearchParameters{kind}")()
    for name, value in values.items():
        setattr(params, name, value)
    return params


def vectors_file(model: StoredModel) -> str:
    """By the model's id in the catalog, which is never reused: a dropped model's leftover file
    can never be taken for a newer model's."""
    return f"vectors-{model.id}.faiss"


def _read(
    path: Path, catalog: Catalog, model: StoredModel, *, mmap: bool | None = True, check: bool = False
) -> tuple[AnyIndex, dict]:
    """The index in ``path`` and its stamp; StaleIndex if it is missing, damaged, or another
    catalog's or model's. Memory-mapped read-only (Flat codes are not copied: a cold query reads
    only the pages it needs) unless it is to be updated in place; ``mmap=None``, for an update:
    mapped only if it is a refined index (`Reranked.update` writes its finer copy anew).

    The checksum of everything before the stamp is compared the first time a version of the file
    is read (a single flipped bit changed a vector while `status` said "consistent"), or always
    with ``check``: it costs reading the whole file, which a query of an IVF index otherwise
    avoids, so a file found intact is recorded as such beside it (`_remember_checked`)."""
    try:
        with open(path, "rb") as f:
            stamp = _read_stamp(f)
            identity = _identity(os.fstat(f.fileno()))
            if check or _checked_identity(path) != identity:
                if _crc(f, stamp["payload_bytes"]) != stamp["checksum"]:
                    raise ValueError("its content does not match its checksum")
                _remember_checked(path, identity)
            if mmap is None:
                mmap = split_type(stamp.get("index_type", "")) is not None
            # FAISS reads the file already open, never one renamed into its place meanwhile.
            index = read_index(f"/dev/fd/{f.fileno()}", mmap=mmap)
    except FileNotFoundError:
        raise StaleIndex(f"{path} is missing") from None
    except StaleIndex as e:
        raise StaleIndex(f"{path} {e}") from None
    except (OSError, ValueError, KeyError) as e:
        raise StaleIndex(f"{path} is damaged ({e})") from None
    except RuntimeError as e:  # FAISS's own checks
        raise StaleIndex(f"{path} is damaged ({_brief(e)})") from None
    if index.ntotal != stamp["count"] or (stamp["count"] and index.d != stamp["dim"]):
        raise StaleIndex(f"{path} does not hold what its stamp says")
    if (stamp["catalog_id"], stamp["model"]) != (catalog.catalog_id, model.name):
        raise StaleIndex(f"{path} was built for another catalog or model")
    return index, stamp


def read_index(path: str, *, mmap: bool = True) -> AnyIndex:
    """The index in a file `save` wrote (FAISS stops reading before the keys and the stamp),
    memory-mapped read-only if ``mmap``; no checks (`_read` makes them)."""
    index = faiss.read_index(path, _MMAP_READ_ONLY if mmap else 0)
    return Reranked.from_stored(index) if isinstance(index, faiss.IndexRefine) else index


def _read_keys(path: Path, stamp: dict) -> np.ndarray:
    """The keys stored between the index and the stamp (`save`); StaleIndex if unreadable."""
    count = stamp["count"]
    try:
        with open(path, "rb") as f:
            f.seek(stamp["payload_bytes"] - count * _KEY.itemsize)
            keys = np.frombuffer(f.read(count * _KEY.itemsize), _KEY)
    except OSError as e:
        raise StaleIndex(f"{path} is damaged ({e})") from None
    if len(keys) != count:
        raise StaleIndex(f"{path} is damaged (truncated)")
    return keys


def _find(sorted_ids: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``wanted`` is in ``sorted_ids``, and whether it is there at all."""
    if not len(sorted_ids):
        return np.zeros(len(wanted), np.int64), np.zeros(len(wanted), bool)
    at = np.minimum(np.searchsorted(sorted_ids, wanted), len(sorted_ids) - 1)
    return at, sorted_ids[at] == wanted


def _write_keys(generations: np.ndarray, times: np.ndarray) -> np.ndarray:
    """One 64-bit number per vector from the generation and the time of the catalog's write of
    it: a vector rewritten, or written by another history of the catalog, gets another."""
    mixed = generations.astype(np.int64).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return (mixed ^ times.astype(np.float64).view(np.uint64)).astype(_KEY)


def _read_stamp(f: BinaryIO) -> dict:
    size = os.fstat(f.fileno()).st_size
    if size < _TRAILER.size:
        raise ValueError("truncated")
    f.seek(size - _TRAILER.size)
    stamp_size, magic = _TRAILER.unpack(f.read(_TRAILER.size))
    if magic != _MAGIC or stamp_size > size - _TRAILER.size:
        raise ValueError("no stamp at its end: truncated or overwritten")
    f.seek(size - _TRAILER.size - stamp_size)
    stamp = json.loads(f.read(stamp_size))
    if isinstance(stamp.get("format"), int) and stamp["format"] < _STAMP_FORMAT:
        raise StaleIndex("was written by an older clipsearch")
    if stamp.get("format") != _STAMP_FORMAT:
        raise ValueError(f"unknown format {stamp.get('format')}")
    if not 0 <= stamp["payload_bytes"] <= size - _TRAILER.size - stamp_size:
        raise ValueError("its stamp does not fit it")
    return stamp


def _crc(f: BinaryIO, size: int) -> int:
    """CRC-32 of the first ``size`` bytes of ``f`` (2.7 GB/s: 75 ms for 100k x 512 float32)."""
    f.seek(0)
    crc = 0
    while size > 0 and (chunk := f.read(min(size, _CRC_CHUNK))):
        crc = zlib.crc32(chunk, crc)
        size -= len(chunk)
    return crc


def _identity(st: os.stat_result) -> list[int]:
    """Any write to the file, even one that restores its mtime, moves its ctime."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def file_identity(path: Path) -> list[int] | None:
    """`_identity` of the file at ``path`` (None while it is missing): an open index compares it
    to tell that another process rewrote the file."""
    try:
        return _identity(os.stat(path))
    except FileNotFoundError:
        return None


def remove_vectors_file(home: Path, model: StoredModel) -> None:
    """Delete a model's vector file and the record of its last check (its vectors were dropped;
    the record had stayed behind until the next run's clean-up)."""
    path = Path(home) / vectors_file(model)
    path.unlink(missing_ok=True)
    _checked_record(path).unlink(missing_ok=True)


def _checked_record(path: Path) -> Path:
    return path.with_suffix(".checked")  # vectors-1.faiss: vectors-1.checked


def _checked_identity(path: Path) -> list[int] | None:
    try:
        return json.loads(_checked_record(path).read_bytes()[:1024])
    except (OSError, ValueError):
        return None


def _remember_checked(path: Path, identity: list[int] | None = None) -> None:
    """Record beside the file that this version of it matched its checksum. Best effort: in a
    read-only home (EROFS, EACCES, EPERM) every load checks the file again, and uses it."""
    record = _checked_record(path)
    tmp = record.with_name(f"{record.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(json.dumps(identity or _identity(os.stat(path))))
        os.replace(tmp, record)
    except OSError as e:
        log.debug("Could not record that %s matched its checksum (%s)", path, e)
        with contextlib.suppress(OSError):  # on a read-only disk, unlinking even no file fails (EROFS)
            tmp.unlink(missing_ok=True)


# The FAISS factory strings clipsearch builds and searches by cosine: exact, scalar or product
# quantised codes, alone, in an HNSW graph or in an inverted file (refined or not). FAISS's
# factory takes many more, which broke here: HNSW1 crashed the process, PCA64,Flat changed the
# scores (a cosine of 1.08), SQ0 kept nothing of the vectors, IDMap and NSG failed to build.
_CODES = r"Flat|SQ(?:4|6|8|fp16|bf16)|PQ[1-9]\d*(?:x[1-9]\d*)?(?:fs)?"
_HNSW = r"HNSW(?:[2-9]|[1-9]\d+)"
_INDEX_TYPE = re.compile(
    rf"auto|{_CODES}|{_HNSW}(?:,(?:{_CODES}))?|IVF[1-9]\d*(?:_{_HNSW})?,(?:{_CODES})(?:,RFlat|,Refine\((?:{_CODES})\))?"
)


def check_index_type(index_type: str) -> str:
    """``index_type``, or ValueError when it is not one of the kinds clipsearch searches."""
    if _INDEX_TYPE.fullmatch(index_type) is None:
        raise ValueError(
            f"{index_type!r} is not an index type clipsearch searches; use auto, or a FAISS factory string "
            "of these kinds: Flat, SQ8, HNSW32, IVF1024,Flat, IVF1024,SQ8, IVF1024,PQ128x4fs,Refine(SQfp16)"
        )
    return index_type


def new_index(index_type: str, dim: int) -> AnyIndex:
    """An empty index of ``index_type`` that keeps catalog ids: in its inverted lists, in both
    parts of a refined one (`Reranked`), else in an `IndexIDMap2` around it."""
    refined = split_type(index_type)
    try:
        if refined is not None:
            return Reranked.new(dim, *refined)
        index = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise IndexStateError(
            f"{index_type!r} is not an index type FAISS knows; use auto, Flat, HNSW32, IVF1024,Flat "
            "or IVF1024,PQ128x4fs,Refine(SQfp16)."
        ) from None
    return index if faiss.try_extract_index_ivf(index) is not None else faiss.IndexIDMap2(index)


def choose_index_type(n: int, dim: int, memory_budget: int | None = None) -> str:
    """The FAISS factory string "auto" means for `n` vectors of `dim` under a memory budget
    (what stays in memory: a refined index's float16 copy is memory-mapped, read only for the
    shortlist, so it costs page cache and disk, not the budget)."""
    if n <= FLAT_LIMIT:
        return "Flat"
    # About sqrt(n) lists of about sqrt(n) vectors: the probes cost about what the list search
    # does. (Many more lists behind an HNSW coarse quantiser, `IVF16384_HNSW32` at 1M, were
    # measured and lost: clustered vectors spread over more lists, and twice the vectors were
    # scanned for the same recall. They remain a type to ask for, trained in two levels.)
    nlist = 2 ** round(np.log2(np.sqrt(n)))
    # Besides its codes, each vector costs ids in the inverted list and both IDMap2 maps.
    budget = (memory_budget or _default_memory_budget()) - n * _ID_BYTES
    flat_fits = n * dim * 4 <= budget
    if flat_fits and n < REFINE_FROM:
        return f"IVF{nlist},Flat"
    if dim % 4 == 0 and n * dim // 8 <= budget:
        return f"IVF{nlist},PQ{dim // 4}x4fs,Refine({REFINE_CODES})"
    if flat_fits:
        return f"IVF{nlist},Flat"
    if n * dim <= budget:
        return f"IVF{nlist},SQ8"
    # Product quantisation: the most sub-quantisers (bytes per vector) that divide dim and fit.
    fitting = [m for m in range(1, dim // 2 + 1) if dim % m == 0 and n * m <= budget]
    return f"IVF{nlist},PQ{max(fitting, default=1)}"


def _default_memory_budget() -> int:
    """A quarter of physical memory: the index shares the machine with everything else."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def _train(index: AnyIndex, vectors: np.ndarray, index_type: str) -> None:
    """Train on a bounded random sample, so that k-means time does not grow with the collection."""
    rng = np.random.default_rng(0)
    wanted = train_points(index)
    sample = _float32(vectors[np.sort(rng.choice(len(vectors), min(wanted, len(vectors)), replace=False))])
    try:
        train(index, sample)
    except RuntimeError as e:
        raise IndexStateError(
            f"{index_type} cannot be trained on {len(vectors)} vectors ({_brief(e)}); use Flat or a smaller index type."
        ) from None


def train_points(index: AnyIndex) -> int:
    """How many sample vectors `train` wants for ``index``."""
    ivf = _ivf(index)
    if ivf is None:
        return _TRAIN_POINTS
    if _hnsw_quantizer(ivf) is not None:
        return HNSW_TRAIN_POINTS_PER_LIST * ivf.nlist
    return TRAIN_POINTS_PER_LIST * ivf.nlist


def train(index: AnyIndex, sample: np.ndarray) -> None:
    """Train ``index`` on ``sample`` (float32, L2-normalised; `train_points` of them is enough).

    An inverted file with an HNSW coarse quantiser has tens of thousands of lists: one k-means
    over all of them compares every sample vector with every centroid at each step (hours of
    two cores at 10M vectors). Two levels instead: a k-means into sqrt(nlist) groups, then one
    into lists within each group, as many as its share of the sample; each sample vector meets
    about 2 sqrt(nlist) centroids a step, not nlist.
    """
    ivf = _ivf(index)
    quantizer = None if ivf is None else _hnsw_quantizer(ivf)
    if ivf is not None and quantizer is not None and quantizer.ntotal == 0:
        quantizer.add(_two_level_centroids(np.ascontiguousarray(sample, dtype=np.float32), ivf.nlist))
    index.train(sample)  # with the lists in place, FAISS trains only the codes (SQ8, PQ)


def _two_level_centroids(sample: np.ndarray, nlist: int) -> np.ndarray:
    if len(sample) < nlist:
        raise RuntimeError(f"Error: {nlist} lists need at least {nlist} training points")
    dim = sample.shape[1]
    groups = max(1, round(math.sqrt(nlist)))
    top = faiss.Kmeans(dim, groups, niter=_KMEANS_ITERATIONS, seed=1, max_points_per_centroid=1000)
    top.train(sample)
    assigned = top.index.search(sample, 1)[1][:, 0]
    order = np.argsort(assigned, kind="stable")
    counts = np.bincount(assigned, minlength=groups)
    # Lists per group in proportion to its points, summing to nlist.
    shares = np.diff(np.round(np.cumsum(counts) * (nlist / len(sample))).astype(np.int64), prepend=0)
    centroids = []
    for members, share in zip(np.split(order, np.cumsum(counts)[:-1]), shares):
        share = min(int(share), len(members))
        if share == len(members):  # as many lists as points: the points are the centroids
            centroids.append(sample[members])
        elif share:
            kmeans = faiss.Kmeans(
                dim, share, niter=_KMEANS_ITERATIONS, seed=1, max_points_per_centroid=256, min_points_per_centroid=16
            )
            kmeans.train(sample[members])
            centroids.append(np.asarray(kmeans.centroids))
    found = np.concatenate(centroids)
    if len(found) < nlist:  # a group had fewer points than lists: sample points make up the rest
        found = np.concatenate([found, sample[: nlist - len(found)]])
    return np.ascontiguousarray(found, dtype=np.float32)


def _hnsw_quantizer(ivf: faiss.IndexIVF) -> faiss.IndexHNSW | None:
    quantizer = faiss.downcast_index(ivf.quantizer)
    return quantizer if isinstance(quantizer, faiss.IndexHNSW) else None


def _tune(index: AnyIndex, ids: np.ndarray, vectors: np.ndarray) -> float:
    """Tune the search (`tune`) with queries shaped like text queries (`text_like_queries`, from
    a sample of the indexed vectors), against exact search over all the vectors.

    Users search with text, which sits across CLIP's modality gap from every image: its nearest
    images are less alike than an image's and spread over more lists, so the probes that suit
    image vectors as queries find fewer of them (50k vectors near 200 `demo` scenes: nprobe 2
    gave image queries 0.98, the model's own text queries 0.91, the worst of them 0.3). Each
    query's source id is dropped from both result lists: finding it is easier than finding the
    rest, and would flatter the index.
    """
    k = min(10, len(ids) - 1)
    if k < 1:
        return 1.0
    rng = np.random.default_rng(0)
    picked = rng.choice(len(ids), min(RECALL_QUERIES, len(ids)), replace=False)
    queries, own = text_like_queries(_float32(vectors[picked]), rng), ids[picked]
    truth = np.stack(_others(ids[_exact_top(queries, vectors, k + 1)], own, k))
    return tune(index, queries, truth, lambda found: np.stack(_others(found, own, k)))


def text_like_queries(sample: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each vector of ``sample`` (float32, L2-normalised, a random sample of the collection) plus
    the difference of two others of it, re-normalised: a query as loosely tied to its nearest
    images as text is (over 50k vectors near 200 `demo` scenes, a cosine of 0.68 with its
    nearest image, where the model's text has 0.69), without a text tower (index runs do not
    load one).

    Noise drawn from the collection itself lies along the directions its vectors differ in, the
    ones that decide which lists hold a query's neighbours, and has their scale at any dimension.
    Isotropic noise does neither: as far from the source, it left the text queries of `demo` at
    0.95; as hard for them, it sent nprobe to 192 of 512 lists on 512-d clustered vectors.
    """
    moved = sample + sample[rng.permutation(len(sample))] - sample[rng.permutation(len(sample))]
    norms = np.linalg.norm(moved, axis=1, keepdims=True)
    return moved / np.where(norms > 0, norms, 1)


def _exact_top(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """Rows of ``vectors`` (float16 or float32) with the k highest inner products per query,
    best first, from one float32 chunk at a time."""
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_rows = np.empty((len(queries), 0), np.int64)
    for start in range(0, len(vectors), _CHUNK):
        scores, rows = faiss.knn(queries, _float32(vectors[start : start + _CHUNK]), k, faiss.METRIC_INNER_PRODUCT)
        missing = rows < 0  # a last chunk shorter than k
        best_scores = np.concatenate([best_scores, np.where(missing, -np.inf, scores)], axis=1)
        best_rows = np.concatenate([best_rows, np.where(missing, -1, rows + start)], axis=1)
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores, best_rows = np.take_along_axis(best_scores, keep, 1), np.take_along_axis(best_rows, keep, 1)
    return best_rows


def _float32(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.float32)


def tune(
    index: AnyIndex,
    queries: np.ndarray,
    truth: np.ndarray,
    keep: Callable[[np.ndarray], np.ndarray] | None = None,
) -> float:
    """Raise nprobe (IVF) or efSearch (HNSW) until recall@k of ``queries`` against ``truth``
    (the exact top k ids, [queries, k]) reaches TUNING_RECALL; return the recall reached.

    With ``keep``, k + 1 are searched and ``keep`` picks k of each row (for queries made from
    indexed vectors, whose own ids it drops). nprobe climbs by steps of 1.5x and 4/3x in turn, not doublings: a search
    costs about its nprobe, and 96 probes may reach the target where 64 do not and 128 cost a
    third more. An HNSW coarse quantiser explores twice nprobe candidates, so that the lists
    probed are the nearest ones. A refined index (`Reranked`) gets the fewest probes that
    reach the target with the largest shortlist, then the smallest shortlist (``k_factor``)
    that still does at those probes: the scan of the lists costs more than the re-rank. Tuned
    on queries made from indexed vectors (``keep``), that shortlist is doubled: on 20k clustered vectors the one
    that gave them 0.96 gave unseen queries 0.93, twice as long 0.96 (the probes alone allow
    0.967), for a re-rank that costs far less than the scan.
    """
    k = truth.shape[1]
    ivf = _ivf(index)
    reranked = index if isinstance(index, Reranked) else None
    quantizer = None if ivf is None else _hnsw_quantizer(ivf)
    inner = _inner(index)
    values: list[int]
    if ivf is not None:
        values = sorted({min(ivf.nlist, s << i) for i in range(int(np.log2(ivf.nlist)) + 1) for s in (2, 3)} | {1})
    elif isinstance(inner, faiss.IndexHNSW):
        values = [16, 32, 64, 128, 256, 512, 1024]
    else:
        values = [0]  # nothing to tune

    def measured() -> float:
        found = index.search(queries, k if keep is None else k + 1)[1]
        found = found if keep is None else keep(found)
        return float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(found, truth)]) / k)

    for value in values:
        if ivf is not None:
            ivf.nprobe = value
            if quantizer is not None:
                quantizer.hnsw.efSearch = max(_QUANTIZER_EF, 2 * value)
        elif isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = value
        if reranked is not None:
            reranked.k_factor = K_FACTORS[-1]
        if (recall := measured()) >= TUNING_RECALL:
            break
    if reranked is not None and recall >= TUNING_RECALL:
        for factor in K_FACTORS:  # the last one reached it
            reranked.k_factor = factor
            if (recall := measured()) >= TUNING_RECALL:
                break
        if keep is not None:  # queries made from indexed vectors: a shortlist that suits them is too short for others
            reranked.k_factor = min(K_FACTORS[-1], K_FACTOR_MARGIN * reranked.k_factor)
            recall = measured()
    if recall < TARGET_RECALL:
        log.warning(
            "The vector index reaches only %.2f recall@10 at its widest search; a finer index type finds more "
            "(rebuild it with auto or Flat)",
            recall,
        )
    return recall


def held_ids(index: AnyIndex) -> np.ndarray:
    """The catalog ids an index holds, from its inverted lists or its id map."""
    ivf = _ivf(index)
    if ivf is None:
        assert not isinstance(index, Reranked)  # which always has its inverted file
        id_map = faiss.downcast_index(index).id_map  # type: ignore[attr-defined]  # an IndexIDMap2
        return faiss.vector_to_array(id_map)
    lists = ivf.invlists
    assert lists is not None  # an IVF index always has its lists
    held = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)) for i in range(ivf.nlist)]
    return np.sort(np.concatenate([np.zeros(0, np.int64), *held]))


def _ivf(index: AnyIndex) -> faiss.IndexIVF | None:
    """The inverted file of ``index``, if it has one."""
    return index.ivf if isinstance(index, Reranked) else faiss.try_extract_index_ivf(index)


def _inner(index: AnyIndex) -> faiss.Index:
    """The index an IDMap2 wraps (or the index itself; a refined index's inverted file)."""
    if isinstance(index, Reranked):
        return index.base
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index


def _others(results: np.ndarray, own: np.ndarray, k: int) -> list[np.ndarray]:
    return [row[row != own_id][:k] for row, own_id in zip(results, own)]


def _remove_orphans(home: Path) -> None:
    """Delete temporary files left by saves whose process died (killed, or a power cut), and the
    checksum records of files no longer there (a dropped model's)."""
    for tmp in [*home.glob("vectors-*.faiss.*-*.tmp"), *home.glob("vectors-*.checked.*-*.tmp")]:
        pid = tmp.name.rsplit(".", 2)[-2].partition("-")[0]
        if pid.isdigit() and not _is_running(int(pid)):
            tmp.unlink(missing_ok=True)
    for record in home.glob("vectors-*.checked"):
        if not record.with_suffix(".faiss").exists():
            record.unlink(missing_ok=True)


def _is_running(pid: int) -> bool:
    """Whether a process ``pid`` exists (one owned by another user answers PermissionError: alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry lives in the directory's own blocks."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _brief(error: Exception) -> str:
    """FAISS errors start with the C++ function and source line; keep the part after them, and
    of a failed write's assertion ("'ret == (size * 4)' failed: write error in ...: (File too
    large)") the system's reason."""
    text = str(error).strip().splitlines()[0].rpartition("Error: ")[2]
    reason = re.search(r"\(([^()]+)\)\s*$", text)
    return f"write error: {reason[1]}" if "' failed: write error" in text and reason else text
