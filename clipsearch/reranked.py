"""An inverted file of compact codes whose shortlist is re-ranked from finer codes, both by catalog id.

At millions of vectors the scan of the probed lists is the cost of a query. Fast-scan 4-bit
product codes (`PQ128x4fs`: 64 bytes for 512 dimensions, compared sixteen at a time in SIMD
registers) scan about ten times faster than 8-bit scalar codes, but rank too coarsely on their
own (recall@10 ~0.68 on clustered CLIP-like vectors). So the scan returns ``k_factor`` x k
candidates, and each is scored again from a finer copy of its vector (`Refine(SQfp16)`: float16,
scores within ~1e-4 of exact). The finer copy is read only for those candidates: the engine
memory-maps it, so it costs page cache, not resident memory.

FAISS's own `IndexRefine` numbers its vectors 0..n-1 in both parts, so catalog ids would need an
`IndexIDMap2` around it, and it cannot remove vectors. Here both parts hold catalog ids: the
inverted lists keep them as the engine's other inverted files do (they take `remove_ids`), and
the finer copy is an `IndexIDMap2` over flat codes, which renumbers correctly when vectors
leave. The re-rank reads candidates by id. An `IndexRefine` holding the two parts is only what
`faiss.write_index` writes and `faiss.read_index` gives back (with ``k_factor``): its own search
is never used.
"""

from __future__ import annotations

import re

import faiss
import numpy as np

# "IVF4096,PQ128x4fs,Refine(SQfp16)": the coarse index, then the codes the shortlist is scored with.
_REFINED = re.compile(r"^(?P<base>.+),(?:Refine\((?P<refine>[^()]+)\)|RFlat)$")
_ROWS_AT_A_TIME = 100_000  # of the finer copy, copied over by `update`
_QUERIES_PER_RERANK = 32  # bounds the candidates' decoded vectors: 32 x 320 x 512 floats = 21 MB


def _code_rows(flat: faiss.IndexFlatCodes, n: int) -> np.ndarray:
    """The first ``n`` codes of ``flat`` as a uint8 array [n, code_size] over its own memory (a
    view: valid while ``flat`` is, and until its codes grow)."""
    if n == 0:
        return np.empty((0, flat.code_size), np.uint8)
    return faiss.rev_swig_ptr(flat.codes.data(), n * flat.code_size).reshape(n, flat.code_size)


def split_type(index_type: str) -> tuple[str, str] | None:
    """(coarse factory string, refine factory string) of a refined type, else None."""
    match = _REFINED.match(index_type)
    return None if match is None else (match["base"], match["refine"] or "Flat")


class Reranked:
    """The part of `faiss.Index` the engine calls, over an inverted file and a finer copy by id."""

    def __init__(self, base: faiss.Index, refine: faiss.IndexIDMap2, k_factor: float, keeper: object = None) -> None:
        self.base = base
        self.refine = refine
        self.k_factor = k_factor
        self._keeper = keeper  # what owns the two parts when they were read from a file

    @classmethod
    def new(cls, dim: int, base_type: str, refine_type: str) -> Reranked:
        base = faiss.index_factory(dim, base_type, faiss.METRIC_INNER_PRODUCT)
        if faiss.try_extract_index_ivf(base) is None:
            raise RuntimeError(f"Error: a refined index needs an inverted file first, not {base_type}")
        refine = faiss.IndexIDMap2(faiss.index_factory(dim, refine_type, faiss.METRIC_INNER_PRODUCT))
        return cls(base, refine, k_factor=1.0)

    @classmethod
    def from_stored(cls, stored: faiss.IndexRefine) -> Reranked:
        """The two parts of an `IndexRefine` that `storable` wrote (it keeps owning them)."""
        base = faiss.downcast_index(stored.base_index)
        refine = faiss.downcast_index(stored.refine_index)
        if not isinstance(refine, faiss.IndexIDMap2) or faiss.try_extract_index_ivf(base) is None:
            raise RuntimeError("Error: a refined index whose parts are not an inverted file and an id map")
        return cls(base, refine, stored.k_factor, keeper=stored)

    def storable(self) -> faiss.IndexRefine:
        """An `IndexRefine` over the two parts (not owning them), for `faiss.write_index`."""
        stored = faiss.IndexRefine(self.base, self.refine)
        stored.k_factor = self.k_factor
        return stored

    @property
    def d(self) -> int:
        return self.base.d

    @property
    def ntotal(self) -> int:
        return self.base.ntotal

    @property
    def is_trained(self) -> bool:
        return bool(self.base.is_trained and self.refine.is_trained)

    @property
    def ivf(self) -> faiss.IndexIVF:
        return faiss.extract_index_ivf(self.base)

    def train(self, sample: np.ndarray) -> None:
        self.base.train(sample)
        self.refine.train(sample)

    def reserve(self, n: int) -> None:
        """Room for ``n`` vectors in the finer copy before they are added a chunk at a time.
        Without it each chunk grows the codes as a std::vector grows, to twice their size, and
        copies them over: 10 GB of float16 codes at 10M would pass through 30 GB of memory.
        (Growing the codes and shrinking them back keeps the capacity.)"""
        flat = self._flat()
        if flat.codes.size() == 0:
            flat.codes.resize(n * flat.code_size)
            flat.codes.resize(0)

    def _flat(self) -> faiss.IndexFlatCodes:
        flat = faiss.downcast_index(self.refine.index)
        assert isinstance(flat, faiss.IndexFlatCodes), "Reranked.new makes the finer copy flat codes"
        return flat

    @property
    def float16_codes(self) -> bool:
        """Whether the finer copy stores plain float16 vectors (`SQfp16`), the catalog's format."""
        flat = self._flat()
        return isinstance(flat, faiss.IndexScalarQuantizer) and flat.sq.qtype == faiss.ScalarQuantizer.QT_fp16

    def float16_rows(self, n: int) -> np.ndarray:
        """The empty finer copy's own storage, sized for ``n`` vectors, as a float16 array [n, d]
        to write them into (`float16_codes` only): a rebuild reads the catalog straight into the
        index, and never holds a second copy of the collection (10 GB at 10M). `hold` then says
        whose they are."""
        flat = self._flat()
        if not self.float16_codes or flat.ntotal:
            raise RuntimeError("Error: only an empty float16 copy takes vectors written in place")
        flat.codes.resize(n * flat.code_size)
        return _code_rows(flat, n).view(np.float16)

    def hold(self, ids: np.ndarray) -> None:
        """Take the vectors written into `float16_rows` as those of ``ids`` (in that order)."""
        flat = self._flat()
        if flat.codes.size() != len(ids) * flat.code_size:
            raise RuntimeError("Error: the vectors written into a refined index do not match their ids")
        flat.ntotal = self.refine.ntotal = len(ids)
        faiss.copy_array_to_vector(np.ascontiguousarray(ids, dtype=np.int64), self.refine.id_map)
        self.refine.construct_rev_map()

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.base.add_with_ids(vectors, ids)
        self.refine.add_with_ids(vectors, ids)

    def add_to_inverted_file(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add to the coarse part alone, the finer copy already holding them (`hold`)."""
        self.base.add_with_ids(vectors, ids)

    def update(self, outdated: np.ndarray, vectors: np.ndarray, ids: np.ndarray, refine_type: str) -> int:
        """Remove the ``outdated`` ids and add ``vectors`` under ``ids``; how many were removed.

        The inverted file changes in place. The finer copy (of ``refine_type`` codes) is written
        anew, the kept rows a chunk at a time, because it is the read-only mapping of the file
        (`vectors.VectorIndex.refresh` maps it): the old copy stays page cache, which the
        system can drop, where changing it in memory held it twice at the peak, reading the file
        and then growing it (2.4 GB for a 1M collection taking 10 photos, ~24 GB at 10M)."""
        removed = self.base.remove_ids(faiss.IDSelectorBatch(np.asarray(outdated, dtype=np.int64)))
        held = faiss.vector_to_array(self.refine.id_map)
        keep = ~np.isin(held, outdated)
        kept = int(keep.sum())
        if len(held) - kept != removed:
            raise RuntimeError("Error: the two parts of a refined index held different ids")
        old = _code_rows(self._flat(), len(held))
        refine = faiss.IndexIDMap2(faiss.index_factory(self.d, refine_type, faiss.METRIC_INNER_PRODUCT))
        fresh = Reranked(self.base, refine, self.k_factor)
        flat = fresh._flat()
        flat.codes.resize((kept + len(ids)) * flat.code_size)
        rows = _code_rows(flat, kept + len(ids))
        at = 0
        for start in range(0, len(held), _ROWS_AT_A_TIME):
            part = keep[start : start + _ROWS_AT_A_TIME]
            count = int(part.sum())
            np.compress(part, old[start : start + _ROWS_AT_A_TIME], axis=0, out=rows[at : at + count])
            at += count
        if len(ids):
            rows[kept:] = flat.sa_encode(np.ascontiguousarray(vectors, dtype=np.float32))
            self.base.add_with_ids(vectors, ids)
        fresh.hold(np.concatenate([held[keep], np.asarray(ids, dtype=np.int64)]))
        self.refine = refine
        return removed

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        """The finer copy's vectors (float16 for `SQfp16`) of ``ids``, all held."""
        return self.refine.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))

    def search(
        self, queries: np.ndarray, k: int, *, params: faiss.SearchParameters | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The best k of the ``k_factor`` x k that the inverted file finds (``params``: its nprobe,
        an id selector), by their scores from the finer copy. Padded with -1 / -inf."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        shortlist = max(k, round(k * self.k_factor))
        _, candidates = self.base.search(queries, shortlist, params=params)
        scores = np.full(candidates.shape, -np.inf, np.float32)
        for start in range(0, len(queries), _QUERIES_PER_RERANK):
            rows = slice(start, start + _QUERIES_PER_RERANK)
            found = candidates[rows] >= 0
            vectors = self.reconstruct_batch(candidates[rows][found])
            owner = np.nonzero(found)[0]  # the query (within the slice) each candidate is for
            scores[rows][found] = np.einsum("ij,ij->i", vectors, queries[rows][owner])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(scores, order, 1)
        best_ids = np.take_along_axis(candidates, order, 1)
        best_ids[~np.isfinite(best_scores)] = -1
        return best_scores, best_ids
