import logging
import os
import subprocess

import faiss
import numpy as np
import pytest
from helpers import TEST_MODEL, faiss_file, stored

from clipsearch import vectors as vectors_module
from clipsearch.catalog import Catalog
from clipsearch.errors import IndexStateError
from clipsearch.records import FailedFile, IndexedFile
from clipsearch.reranked import Reranked
from clipsearch.vectors import VectorIndex, choose_index_type

DIM = 32


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_unit(n: int, seed: int = 0) -> np.ndarray:
    return unit_rows(np.random.default_rng(seed).standard_normal((n, DIM)))


def clustered_unit(n: int, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Like real embeddings, which come in topics: what approximate indexes rely on."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng.standard_normal((clusters, DIM)))
    return unit_rows(centres[rng.integers(0, clusters, n)] + 0.15 * rng.standard_normal((n, DIM)))


def brute_force(ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int):
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def recall_at_10(index: VectorIndex, ids, vectors, queries) -> float:
    _, truth = brute_force(ids, vectors, queries, 10)
    _, found = index.search(queries, 10)
    return float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(found, truth)]) / 10)


def test_flat_search_is_exact_against_numpy():
    vectors = random_unit(3000)
    ids = np.arange(3000, dtype=np.int64) * 7 + 3  # catalog ids, not positions
    queries = random_unit(25, seed=1)
    index = VectorIndex.build(ids, vectors)
    assert (index.index_type, index.recall_at_10, index.ntotal) == ("Flat", None, 3000)
    scores, found = index.search(queries, 10)
    expected_scores, expected_ids = brute_force(ids, vectors, queries, 10)
    np.testing.assert_array_equal(found, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)


def test_search_pads_missing_hits():
    index = VectorIndex.build(np.array([5, 9]), random_unit(2))
    scores, ids = index.search(random_unit(1, seed=3)[0], 4)  # one query as a 1-D vector
    assert ids.shape == (1, 4) and sorted(ids[0, :2].tolist()) == [5, 9]
    assert ids[0, 2:].tolist() == [-1, -1] and np.all(np.isneginf(scores[0, 2:]))
    empty = VectorIndex.build(np.zeros(0, np.int64), np.zeros((0, 0), np.float32))
    scores, ids = empty.search(random_unit(2), 3)
    assert ids.tolist() == [[-1] * 3] * 2 and np.all(np.isneginf(scores))


def test_auto_choice_follows_size_and_memory_budget():
    flat_limit = vectors_module.FLAT_LIMIT
    assert choose_index_type(flat_limit, 512) == "Flat"
    assert choose_index_type(100_000, 512, memory_budget=1 << 30) == "IVF256,Flat"
    # From REFINE_FROM: fast-scan codes scanned, a float16 copy (memory-mapped) re-ranks them.
    assert vectors_module.REFINE_FROM == 500_000
    assert choose_index_type(499_999, 512, memory_budget=4 << 30) == "IVF512,Flat"
    assert choose_index_type(1_000_000, 512, memory_budget=4 << 30) == "IVF1024,PQ128x4fs,Refine(SQfp16)"
    assert choose_index_type(1_000_000, 512, memory_budget=1 << 30) == "IVF1024,PQ128x4fs,Refine(SQfp16)"
    # Below it too when full vectors do not fit; full vectors where 4-bit codes cannot split dim.
    assert choose_index_type(300_000, 512, memory_budget=100 << 20) == "IVF512,PQ128x4fs,Refine(SQfp16)"
    assert choose_index_type(1_000_000, 510, memory_budget=4 << 30) == "IVF1024,Flat"
    assert choose_index_type(1_000_000, 510, memory_budget=1 << 30) == "IVF1024,SQ8"
    # 10M vectors in 1 GiB: not even the 4-bit codes with ids fit (1.28 GB); PQ with the most
    # bytes per vector that fits (and divides 512).
    assert choose_index_type(10_000_000, 512, memory_budget=1 << 30) == "IVF4096,PQ32"


@pytest.mark.parametrize("index_type", ["auto", "HNSW16"])
def test_approximate_index_reaches_target_recall(monkeypatch, index_type):
    monkeypatch.setattr(vectors_module, "FLAT_LIMIT", 1000)
    vectors = clustered_unit(4000)
    ids = np.arange(4000, dtype=np.int64) + 100
    index = VectorIndex.build(ids, vectors, index_type)
    assert index.index_type == ("IVF64,Flat" if index_type == "auto" else "HNSW16")
    assert index.recall_at_10 >= vectors_module.TARGET_RECALL
    # Measured again on queries the build never saw.
    fresh = unit_rows(vectors[:200] + 0.05 * np.random.default_rng(9).standard_normal((200, DIM)))
    assert recall_at_10(index, ids, vectors, fresh) >= 0.9


@pytest.mark.parametrize(
    "index_type",
    ["auto", "Flat", "SQ8", "SQfp16", "PQ16x4fs", "HNSW32", "HNSW16,SQ8", "IVF1024,Flat", "IVF64_HNSW32,SQ8",
     "IVF4096,PQ64", "IVF64,PQ8x4fs,RFlat", "IVF1024,PQ128x4fs,Refine(SQfp16)"],
)  # fmt: skip
def test_the_index_types_clipsearch_searches(index_type):
    assert vectors_module.check_index_type(index_type) == index_type


@pytest.mark.parametrize(
    "index_type", ["HNSW1", "PCA64,Flat", "OPQ16,IVF64,PQ16", "SQ0", "IDMap,Flat", "NSG32", "LSH", "IVF0,Flat",
                   "Refine(Flat)", "IVF64,Flat,RFlat,RFlat", "flat"],
)  # fmt: skip
def test_other_factory_strings_are_refused(index_type):
    with pytest.raises(ValueError, match="is not an index type clipsearch searches"):
        vectors_module.check_index_type(index_type)


def test_untrainable_or_unknown_types_are_clear_errors():
    with pytest.raises(IndexStateError, match="cannot be trained on 10 vectors"):
        VectorIndex.build(np.arange(10), random_unit(10), "IVF64,Flat")
    with pytest.raises(IndexStateError, match="not an index type"):
        VectorIndex.build(np.arange(10), random_unit(10), "Bogus")


@pytest.mark.parametrize(
    "index_type",
    ["Flat", "HNSW32", "HNSW16,SQ8", "IVF8,Flat", "IVF8,SQ8", "IVF8_HNSW32,Flat", "IVF8,PQ8x4fs,Refine(SQfp16)"],
)
def test_every_index_type_returns_as_many_hits_as_asked_for_when_that_many_pass(index_type):
    """HNSW had answered at most about what its efSearch reaches (195 of 310 for k=300), an
    inverted file what its tuned probes hold (245), filtered or not: a search for n gets
    min(n, how many pass), as Flat does; and the tuned breadth the common path uses is kept."""
    vectors = clustered_unit(700, clusters=12)
    ids = np.arange(700, dtype=np.int64) * 3 + 1
    index = VectorIndex.build(ids, vectors, index_type)
    breadth = _search_breadth(index)
    queries = random_unit(8, seed=5)
    for k in (300, 700, 1000):
        scores, found = index.search(queries, k)
        assert [len(set(row[row >= 0].tolist())) for row in found] == [min(k, 700)] * 8, k
        assert np.all(np.isfinite(scores[found >= 0]))
    for step in (3, 20, 100):  # 234, 35 and 7 pass
        among = ids[::step]
        for k in (10, len(among), 2 * len(among)):
            found = index.search(queries, k, among)[1]
            assert [len(set(row[row >= 0].tolist())) for row in found] == [min(k, len(among))] * 8, (step, k)
            assert set(found[found >= 0].tolist()) <= set(among.tolist())
    assert _search_breadth(index) == breadth


def _search_breadth(index: VectorIndex) -> tuple:
    """What the build tuned: efSearch, nprobe, a refined index's shortlist."""
    hnsw = getattr(vectors_module._inner(index.index), "hnsw", None)
    ivf = vectors_module._ivf(index.index)
    return (
        None if hnsw is None else hnsw.efSearch,
        None if ivf is None else ivf.nprobe,
        getattr(index.index, "k_factor", None),
    )


# --- on disk, derived from a catalog -------------------------------------------------------------


@pytest.fixture
def catalog(tmp_path):
    with Catalog.open(tmp_path / "home", create=True) as c:
        yield c


def add_files(catalog: Catalog, vectors: np.ndarray, start: int = 0) -> None:
    catalog.commit_batch(
        TEST_MODEL,
        [IndexedFile(f"/p/{i}.jpg".encode(), 1, 1, b"f%d" % i, 1, 1, v) for i, v in enumerate(vectors, start)],
    )


def assert_answers_like_the_catalog(index: VectorIndex, catalog: Catalog) -> None:
    """Exact search's answers: an inverted file is made to probe every list for the comparison
    (and a refined one to re-rank every vector)."""
    inner = index.index
    if isinstance(inner, Reranked):
        inner.k_factor = inner.ntotal
        inner = inner.base
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        ivf.nprobe = ivf.nlist
    ids, vectors = catalog.all_vectors(stored(catalog))
    queries = random_unit(10, seed=5)
    np.testing.assert_array_equal(index.search(queries, 5)[1], brute_force(ids, vectors, queries, 5)[1])


def test_ids_are_catalog_ids(catalog):
    vectors = random_unit(300)
    add_files(catalog, vectors)
    index = VectorIndex.load(catalog.home, catalog, stored(catalog))
    _, top = index.search(vectors[[0, 17, 299]], 1)
    rows = catalog.rows(top[:, 0].tolist())
    assert [rows[i].path for i in top[:, 0]] == [b"/p/0.jpg", b"/p/17.jpg", b"/p/299.jpg"]


def test_save_load_round_trip_without_rebuild(catalog, caplog):
    add_files(catalog, clustered_unit(2000))
    built = VectorIndex.rebuild(catalog.home, catalog, stored(catalog), index_type="IVF16,Flat")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded = VectorIndex.load(catalog.home, catalog, stored(catalog))
    assert caplog.records == []
    assert (loaded.index_type, loaded.recall_at_10, loaded.ntotal) == ("IVF16,Flat", built.recall_at_10, 2000)
    queries = random_unit(10, seed=4)
    for a, b in zip(loaded.search(queries, 10), built.search(queries, 10)):
        np.testing.assert_array_equal(a, b)


def test_a_model_with_no_vectors_left_loads_quietly(catalog, caplog):
    add_files(catalog, random_unit(3))
    catalog.commit_batch(failed=[FailedFile(f"/p/{i}.jpg".encode(), 1, 1, None, "gone bad") for i in range(3)])
    with caplog.at_level(logging.WARNING):
        index = VectorIndex.load(catalog.home, catalog, stored(catalog))
    assert index.ntotal == 0 and index.index.d == DIM and caplog.records == []


def test_a_stale_file_is_updated_by_the_rows_that_changed_and_resaved(catalog, caplog):
    add_files(catalog, random_unit(500))
    VectorIndex.load(catalog.home, catalog, stored(catalog))  # builds and saves generation 1
    add_files(catalog, random_unit(100, seed=2), start=500)  # generation 2: the file is now stale
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipsearch.vectors"):
        index = VectorIndex.load(catalog.home, catalog, stored(catalog))
    assert "Updated the vector index: 100 vectors in, 0 out" in caplog.text and "Built" not in caplog.text
    assert index.ntotal == 600
    assert_answers_like_the_catalog(index, catalog)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipsearch.vectors"):
        VectorIndex.load(catalog.home, catalog, stored(catalog))
    assert caplog.records == []  # the updated index was saved with the new stamp


@pytest.mark.parametrize("flat_limit", [1000, vectors_module.FLAT_LIMIT])
def test_changed_failed_and_removed_rows_reach_the_file_by_update(catalog, caplog, monkeypatch, flat_limit):
    monkeypatch.setattr(vectors_module, "FLAT_LIMIT", flat_limit)  # 1000: IVF, whose remove_ids path differs
    vectors = clustered_unit(2000)
    add_files(catalog, vectors)
    built = VectorIndex.load(catalog.home, catalog, stored(catalog))
    assert built.index_type == ("IVF32,Flat" if flat_limit == 1000 else "Flat")
    replaced = random_unit(3, seed=9)
    add_files(catalog, replaced, start=10)  # /p/10..12.jpg changed: same rows, new vectors
    catalog.commit_batch(failed=[FailedFile(b"/p/20.jpg", 1, 1, None, "now unreadable")])
    catalog.commit_batch(missing=[b"/p/21.jpg"])
    catalog.remove([b"/p/22.jpg"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipsearch.vectors"):
        index = VectorIndex.load(catalog.home, catalog, stored(catalog))
    assert "Updated the vector index: 3 vectors in, 6 out" in caplog.text
    assert index.ntotal == 1997
    assert_answers_like_the_catalog(index, catalog)
    scores, top = index.search(replaced, 1)
    ids_by_path = {path: state.id for path, state in catalog.file_states().items()}
    assert top[:, 0].tolist() == [ids_by_path[b"/p/%d.jpg" % i] for i in (10, 11, 12)]
    assert np.all(scores[:, 0] > 0.99)  # the new vectors, not the old ones


def test_an_update_gives_way_to_a_rebuild_when_it_should(catalog, caplog, monkeypatch):
    add_files(catalog, clustered_unit(1500))
    VectorIndex.rebuild(catalog.home, catalog, stored(catalog), index_type="IVF8,Flat")
    add_files(catalog, clustered_unit(700, seed=4), start=1500)  # more than half of the 1500 trained on
    with caplog.at_level(logging.INFO, logger="clipsearch.vectors"):
        index = VectorIndex.load(catalog.home, catalog, stored(catalog))
    assert "more vectors changed since its last full build" in caplog.text and index.built_count == 2200
    monkeypatch.setattr(vectors_module, "FLAT_LIMIT", 2202)
    assert VectorIndex.rebuild(catalog.home, catalog, stored(catalog), index_type="auto").index_type == "Flat"
    add_files(catalog, random_unit(5, seed=6), start=2200)  # past FLAT_LIMIT: auto wants IVF now
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipsearch.vectors"):
        index = VectorIndex.load(catalog.home, catalog, stored(catalog))
    assert "2205 vectors call for IVF" in caplog.text and index.index_type.startswith("IVF")
    assert index.ntotal == 2205 and index.built_count == 2205
    VectorIndex.rebuild(catalog.home, catalog, stored(catalog), index_type="HNSW32")
    add_files(catalog, random_unit(1, seed=7), start=2205)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipsearch.vectors"):
        index = VectorIndex.load(catalog.home, catalog, stored(catalog))
    assert "an HNSW graph cannot drop vectors" in caplog.text and index.ntotal == 2206


def test_removed_rows_never_come_back_from_a_stale_file(catalog):
    vectors = random_unit(200)
    add_files(catalog, vectors)
    VectorIndex.load(catalog.home, catalog, stored(catalog))
    catalog.remove([b"/p/0.jpg"])
    index = VectorIndex.load(catalog.home, catalog, stored(catalog))
    _, top = index.search(vectors[:1], 1)
    assert catalog.rows(top[0].tolist()) != {} and top[0, 0] != 1  # row 1 was /p/0.jpg


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "payload only", "payload corrupted"])
def test_damaged_file_is_rebuilt_with_a_warning(catalog, caplog, damage):
    add_files(catalog, random_unit(1000))
    VectorIndex.load(catalog.home, catalog, stored(catalog))
    path = faiss_file(catalog.home)
    data = path.read_bytes()
    trailer = data[-200:]
    path.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "garbage": np.random.default_rng(0).bytes(len(data)),
            "empty": b"",
            "payload only": data[: len(data) - 120],
            "payload corrupted": b"\xff" * (len(data) - len(trailer)) + trailer,  # stamp intact
        }[damage]
    )
    with caplog.at_level(logging.WARNING):
        index = VectorIndex.load(catalog.home, catalog, stored(catalog))
    assert "Rebuilding the vector index" in caplog.text and "damaged" in caplog.text
    assert_answers_like_the_catalog(index, catalog)
    saved, stamp = vectors_module._read(path, catalog, stored(catalog))  # saved again, valid
    assert saved.ntotal == stamp["count"] == 1000 and stamp["generation"] == catalog.generation


def test_rebuild_remembers_the_chosen_index_type(catalog, caplog):
    add_files(catalog, clustered_unit(1500))
    with pytest.raises(IndexStateError, match="not an index type"):
        VectorIndex.rebuild(catalog.home, catalog, stored(catalog), index_type="Bogus")
    VectorIndex.rebuild(catalog.home, catalog, stored(catalog), index_type="IVF8,Flat")
    add_files(catalog, clustered_unit(10, seed=3), start=1500)
    index = VectorIndex.load(catalog.home, catalog, stored(catalog))
    assert index.index_type == "IVF8,Flat" and index.ntotal == 1510
    # Shrunk below what IVF8 can train on: queries go on with auto, and say so.
    catalog.remove([b"/p"])
    add_files(catalog, random_unit(5))
    with caplog.at_level(logging.WARNING):
        index = VectorIndex.load(catalog.home, catalog, stored(catalog))
    assert index.index_type == "Flat" and index.ntotal == 5 and "Using auto instead" in caplog.text


def test_failed_save_keeps_the_previous_file_and_leaves_no_temporary(catalog, monkeypatch, caplog):
    add_files(catalog, random_unit(100))
    index = VectorIndex.load(catalog.home, catalog, stored(catalog))
    before = (faiss_file(catalog.home)).read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vectors_module.os, "fsync", disk_full)
    with pytest.raises(IndexStateError, match=r"Could not save the vector index .*No space left"):
        index.save(catalog.home, catalog.catalog_id, stored(catalog), catalog.generation + 1)
    assert (faiss_file(catalog.home)).read_bytes() == before
    assert sorted(p.name for p in catalog.home.iterdir() if "faiss" in p.name) == [faiss_file(catalog.home).name]
    # A load that has to rebuild still answers, and says why it could not save.
    add_files(catalog, random_unit(5, seed=8), start=100)
    with caplog.at_level(logging.WARNING):
        index = VectorIndex.load(catalog.home, catalog, stored(catalog))
    assert index.ntotal == 105 and "No space left" in caplog.text


def test_a_read_only_catalog_saves_what_it_rebuilds_where_the_home_is_writable(catalog, caplog):
    """A reader (a server) would otherwise rebuild at every start; where the home cannot be
    written it rebuilds in memory only (test_corruption's read-only home)."""
    add_files(catalog, random_unit(50))
    with Catalog.open(catalog.home, readonly=True) as ro:
        index = VectorIndex.load(ro.home, ro, stored(ro))
        assert index.ntotal == 50
        assert_answers_like_the_catalog(index, ro)
    assert len(list(catalog.home.glob("vectors-*.faiss"))) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipsearch.vectors"), Catalog.open(catalog.home, readonly=True) as ro:
        assert_answers_like_the_catalog(VectorIndex.load(ro.home, ro, stored(ro)), ro)
    assert "Rebuilding" not in caplog.text and "Built" not in caplog.text


def test_save_clears_temporaries_of_killed_saves_only(catalog):
    add_files(catalog, random_unit(20))
    index = VectorIndex.load(catalog.home, catalog, stored(catalog))
    finished = subprocess.Popen(["true"])
    finished.wait()  # its pid now names no process, like a killed indexer's
    name = faiss_file(catalog.home).name
    dead = catalog.home / f"{name}.{finished.pid}-0badc0de.tmp"
    live = catalog.home / f"{name}.{os.getpid()}-feedf00d.tmp"  # a save in progress
    dead.write_bytes(b"half a file")
    live.write_bytes(b"being written")
    index.save(catalog.home, catalog.catalog_id, stored(catalog), catalog.generation)
    assert not dead.exists() and live.exists()
