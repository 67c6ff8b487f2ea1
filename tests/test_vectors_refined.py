"""The refined index "auto" picks from REFINE_FROM vectors: fast-scan 4-bit codes scanned, a
float16 copy re-ranking the shortlist, catalog ids in both parts (`clipsearch.reranked`)."""

import logging

import faiss
import numpy as np
import pytest
from helpers import faiss_file, stored
from test_vectors import DIM, add_files, assert_answers_like_the_catalog, clustered_unit, recall_at_10, unit_rows

from clipsearch import vectors as vectors_module
from clipsearch.catalog import Catalog
from clipsearch.errors import IndexStateError
from clipsearch.records import FailedFile
from clipsearch.reranked import Reranked, split_type
from clipsearch.vectors import VectorIndex

REFINED = "IVF64,PQ16x4fs,Refine(SQfp16)"  # DIM 32: 16 sub-quantisers of 2 dimensions, 8 bytes a vector


@pytest.fixture
def catalog(tmp_path):
    with Catalog.open(tmp_path / "home", create=True) as c:
        yield c


@pytest.fixture(scope="module")
def collection():
    vectors = clustered_unit(20_000, clusters=200)
    ids = np.arange(20_000, dtype=np.int64) * 7 + 3  # catalog ids, not positions
    return ids, vectors, VectorIndex.build(ids, vectors, REFINED)


def held_out(vectors: np.ndarray, count: int = 200, seed: int = 9) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return unit_rows(vectors[rng.choice(len(vectors), count)] + 0.1 * rng.standard_normal((count, DIM)))


def test_factory_strings_of_a_refined_index():
    assert split_type("IVF4096,PQ128x4fs,Refine(SQfp16)") == ("IVF4096,PQ128x4fs", "SQfp16")
    assert split_type("IVF256,PQ16x4fs,RFlat") == ("IVF256,PQ16x4fs", "Flat")
    assert split_type("IVF256,Flat") is None
    with pytest.raises(IndexStateError, match="not an index type FAISS knows"):
        VectorIndex.build(np.arange(100), clustered_unit(100), "PQ8,Refine(Flat)")  # no inverted file


def test_refined_search_returns_catalog_ids_with_the_float16_scores(collection):
    ids, vectors, index = collection
    assert isinstance(index.index, Reranked) and index.ntotal == 20_000
    queries = held_out(vectors, 20)
    scores, found = index.search(queries, 10)
    assert np.isin(found, ids).all() and found.max() > 20_000  # catalog ids, not 0..n-1
    # Each score is the query against the float16 copy of that id, exactly, best first...
    copies = vectors[(found - 3) // 7].astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", copies, queries), atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)
    # ... so within float16's rounding of the exact cosine.
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", vectors[(found - 3) // 7], queries), atol=2e-3)
    np.testing.assert_allclose(index.vectors_of(found[0]), copies[0], atol=1e-7)


def test_tuning_picks_probes_then_the_smallest_shortlist_and_holds_on_unseen_queries(collection):
    ids, vectors, index = collection
    refined = index.index
    assert index.recall_at_10 >= vectors_module.TUNING_RECALL
    chosen = refined.k_factor
    assert chosen in vectors_module.K_FACTORS and chosen < vectors_module.K_FACTORS[-1]
    assert recall_at_10(index, ids, vectors, held_out(vectors)) >= vectors_module.TARGET_RECALL
    # The 4-bit codes alone rank far worse: the re-rank is what reaches the target.
    refined.k_factor = 1
    try:
        assert recall_at_10(index, ids, vectors, held_out(vectors)) < 0.9
    finally:
        refined.k_factor = chosen


def test_filtered_search_stays_among_the_ids_given(collection):
    ids, vectors, index = collection
    among = ids[::50]  # 400 of 20,000
    scores, found = index.search(held_out(vectors, 5), 10, among=among)
    assert np.isin(found, among).all() and found.shape == (5, 10)
    exact = np.sort(held_out(vectors, 5) @ vectors[::50].T, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(scores, exact, atol=2e-3)


def test_refined_file_round_trips_and_takes_additions_and_removals(catalog, caplog, monkeypatch):
    monkeypatch.setattr(vectors_module, "FLAT_LIMIT", 1000)
    monkeypatch.setattr(vectors_module, "REFINE_FROM", 2000)  # "auto" picks the refined type here
    add_files(catalog, clustered_unit(4000, clusters=40))
    built = VectorIndex.load(catalog.home, catalog, stored(catalog))
    assert built.index_type == "IVF64,PQ8x4fs,Refine(SQfp16)"
    queries = clustered_unit(20, clusters=40, seed=4)
    before = built.search(queries, 10)
    loaded = VectorIndex.load(catalog.home, catalog, stored(catalog))
    assert isinstance(loaded.index, Reranked) and loaded.index_type == built.index_type
    # The tuned search travels in the file (nprobe in the lists, k_factor in the container).
    assert (loaded.index.ivf.nprobe, loaded.index.k_factor) == (built.index.ivf.nprobe, built.index.k_factor)
    for got, expected in zip(loaded.search(queries, 10), before):
        np.testing.assert_array_equal(got, expected)
    assert faiss_file(catalog.home).stat().st_size > 4000 * (4 + 2 * DIM)  # codes and the float16 copy

    add_files(catalog, clustered_unit(3, clusters=40, seed=8), start=10)  # rows of /p/10..12 rewritten
    catalog.commit_batch(failed=[FailedFile(b"/p/20.jpg", 1, 1, None, "now unreadable")])
    catalog.remove([b"/p/22.jpg"])
    add_files(catalog, clustered_unit(50, clusters=40, seed=7), start=4000)
    with caplog.at_level(logging.INFO, logger="clipsearch.vectors"):
        updated = VectorIndex.load(catalog.home, catalog, stored(catalog))
    assert "Updated the vector index: 53 vectors in, 5 out" in caplog.text and "Built" not in caplog.text
    assert updated.ntotal == updated.index.refine.ntotal == 4048
    ids, vectors = catalog.all_vectors(stored(catalog))
    np.testing.assert_array_equal(updated.held_ids(), ids)
    np.testing.assert_allclose(updated.vectors_of(ids), vectors, atol=1e-3)  # each id's own float16 copy
    assert_answers_like_the_catalog(updated, catalog)


def test_a_rebuild_reads_the_catalog_into_the_float16_copy_itself(catalog, monkeypatch):
    """No second copy of the collection while a refined index is rebuilt (10 GB at 10M): the
    catalog's float16 rows are read straight into the re-rank copy's storage, and the index is
    the one `build` makes from those rows."""
    add_files(catalog, clustered_unit(4000, clusters=40))
    catalog.set_meta("index_type", REFINED)
    read = []
    all_vectors = Catalog.all_vectors

    def reading(self, *args, **kwargs):
        ids, vectors = all_vectors(self, *args, **kwargs)
        read.append(vectors)
        return ids, vectors

    monkeypatch.setattr(Catalog, "all_vectors", reading)
    rebuilt = VectorIndex.rebuild(catalog.home, catalog, stored(catalog), save=False)
    monkeypatch.undo()
    codes = faiss.downcast_index(rebuilt.index.refine.index).codes
    assert len(read) == 1 and read[0].dtype == np.float16 and read[0].ctypes.data == int(codes.data())

    ids, vectors = catalog.all_vectors(stored(catalog), np.float16)
    built = VectorIndex.build(ids, vectors, REFINED)
    assert (rebuilt.index_type, rebuilt.recall_at_10) == (built.index_type, built.recall_at_10)
    serialized = [faiss.serialize_index(index.index.storable()) for index in (rebuilt, built)]
    np.testing.assert_array_equal(*serialized)
    np.testing.assert_array_equal(rebuilt.held_ids(), ids)
    queries = clustered_unit(20, clusters=40, seed=4)
    for got, expected in zip(rebuilt.search(queries, 10), built.search(queries, 10)):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("index_type", [REFINED, "IVF64,PQ8x4fs,RFlat"])
def test_an_update_maps_the_old_copy_and_writes_a_new_one(catalog, monkeypatch, index_type):
    """Changing the finer copy in memory held it twice at the peak (read, then grown); an update
    reads the file's copy as a read-only mapping (page cache) and writes the kept and new rows
    into a fresh one, with the same answers as an index built from the catalog."""
    add_files(catalog, clustered_unit(4000, clusters=40))
    catalog.set_meta("index_type", index_type)
    VectorIndex.load(catalog.home, catalog, stored(catalog))
    add_files(catalog, clustered_unit(30, clusters=40, seed=3), start=100)  # 30 rewritten
    add_files(catalog, clustered_unit(20, clusters=40, seed=5), start=4000)  # 20 new
    catalog.remove([b"/p/7.jpg", b"/p/8.jpg"])
    owned = []
    update = Reranked.update

    def updating(self, *args):
        owned.append(faiss.downcast_index(self.refine.index).codes.is_owned)
        return update(self, *args)

    monkeypatch.setattr(Reranked, "update", updating)
    updated = VectorIndex.load(catalog.home, catalog, stored(catalog))
    assert owned == [False]  # the file's copy, mapped
    assert faiss.downcast_index(updated.index.refine.index).codes.is_owned
    ids, vectors = catalog.all_vectors(stored(catalog))
    np.testing.assert_array_equal(updated.held_ids(), ids)
    np.testing.assert_allclose(updated.vectors_of(ids), vectors, atol=1e-3 if index_type == REFINED else 1e-7)
    assert_answers_like_the_catalog(updated, catalog)
    again = VectorIndex.load(catalog.home, catalog, stored(catalog))  # the saved update reads back
    np.testing.assert_array_equal(again.held_ids(), ids)
    assert_answers_like_the_catalog(again, catalog)
