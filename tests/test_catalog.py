import multiprocessing
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import TEST_MODEL, stored

from clipsearch.catalog import Catalog
from clipsearch.errors import IndexStateError
from clipsearch.records import (
    STATUS_FAILED,
    STATUS_INDEXED,
    STATUS_MISSING,
    FailedFile,
    FileState,
    ImageRow,
    IndexedFile,
    decode_path,
)

DIM = 16


def unit(seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def indexed(path: bytes, seed: int = 0, size: int = 100, mtime_ns: int = 1, fingerprint: bytes = b""):
    return IndexedFile(path, size, mtime_ns, fingerprint or b"fp" + path, 640, 480, unit(seed))


def integrity(catalog: Catalog) -> list[str]:
    """SQLite's own full check of the file: ["ok"] when it is sound."""
    with catalog.read() as db:
        return [row[0] for row in db.execute("PRAGMA integrity_check")]


def failed(path: bytes, error: str = "cannot identify image file") -> FailedFile:
    return FailedFile(path, 10, 2, b"bad" + path, error)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def catalog(home: Path):
    with Catalog.open(home, create=True) as c:
        yield c


def test_open_requires_an_index_unless_create(home):
    with pytest.raises(IndexStateError, match="no index"):
        Catalog.open(home)
    assert not home.exists()
    with Catalog.open(home, create=True) as c:
        assert c.generation == 0
        assert c.counts() == {STATUS_INDEXED: 0, STATUS_FAILED: 0, STATUS_MISSING: 0}
        assert c.get_meta("clipsearch_version") is not None
        c.set_meta("model", "ViT-B/32")
        c.commit_batch(TEST_MODEL, [indexed(b"/p/a.jpg")])
    with Catalog.open(home) as c:
        assert c.get_meta("model") == "ViT-B/32"
        assert c.get_meta("absent") is None
        assert c.generation == 1
        assert list(c.file_states()) == [b"/p/a.jpg"]
        assert integrity(c) == ["ok"]


def test_upsert_inserts_then_updates_in_place(catalog):
    catalog.commit_batch(TEST_MODEL, [indexed(b"/p/a.jpg", seed=1, size=100, mtime_ns=5)])
    first = catalog.file_states(TEST_MODEL)[b"/p/a.jpg"]
    assert first == FileState(first.id, 100, 5, STATUS_INDEXED, b"fp/p/a.jpg", encoded=True)
    assert not catalog.file_states("another-model")[b"/p/a.jpg"].encoded

    catalog.commit_batch(TEST_MODEL, [indexed(b"/p/a.jpg", seed=2, size=200, mtime_ns=9, fingerprint=b"new")])
    states = catalog.file_states(TEST_MODEL)
    assert states == {b"/p/a.jpg": FileState(first.id, 200, 9, STATUS_INDEXED, b"new", encoded=True)}
    ids, vectors = catalog.all_vectors(stored(catalog))
    assert ids.tolist() == [first.id]
    np.testing.assert_array_equal(vectors[0], unit(2).astype(np.float16).astype(np.float32))


def test_failed_then_missing_then_indexed_again(catalog):
    catalog.commit_batch(
        TEST_MODEL, [indexed(b"/p/good.jpg"), indexed(b"/p/gone.jpg", seed=1)], [failed(b"/p/bad.jpg")]
    )
    assert catalog.counts() == {STATUS_INDEXED: 2, STATUS_FAILED: 1, STATUS_MISSING: 0}
    assert catalog.failures() == [(b"/p/bad.jpg", "cannot identify image file")]

    catalog.commit_batch(missing=[b"/p/gone.jpg", b"/p/never-seen.jpg"])
    states = catalog.file_states()
    assert states[b"/p/gone.jpg"].status == STATUS_MISSING
    assert b"/p/never-seen.jpg" not in states
    ids, _ = catalog.all_vectors(stored(catalog))
    assert ids.tolist() == [states[b"/p/good.jpg"].id]
    assert catalog.rows([states[b"/p/gone.jpg"].id]) == {}

    # A file that failed and was then fixed, and one that came back.
    catalog.commit_batch(TEST_MODEL, [indexed(b"/p/bad.jpg", seed=3), indexed(b"/p/gone.jpg", seed=4)])
    assert catalog.counts() == {STATUS_INDEXED: 3, STATUS_FAILED: 0, STATUS_MISSING: 0}
    assert catalog.failures() == []
    # A good file that now fails loses its vector.
    catalog.commit_batch(failed=[failed(b"/p/good.jpg", "truncated")])
    assert catalog.failures() == [(b"/p/good.jpg", "truncated")]
    assert sorted(catalog.all_vectors(stored(catalog))[0].tolist()) == sorted(
        states[p].id for p in (b"/p/bad.jpg", b"/p/gone.jpg")
    )


def test_awkward_paths_round_trip(catalog, tmp_path):
    names = [
        b"caf\xe9 latin-1.jpg",
        b"with space.jpg",
        b"new\nline.jpg",
        b'quote\'s "double".png',
        "日本.jpg".encode(),
    ]
    paths = [os.fsencode(tmp_path) + b"/" + name for name in names]
    catalog.commit_batch(TEST_MODEL, [indexed(p, seed=i) for i, p in enumerate(paths)])
    states = catalog.file_states()
    assert sorted(states) == sorted(paths)
    rows = catalog.rows([states[p].id for p in paths])
    assert sorted(row.path for row in rows.values()) == sorted(paths)
    for p in paths:
        assert os.fsencode(decode_path(p)) == p


def test_rows_returns_indexed_rows_only(catalog):
    catalog.commit_batch(TEST_MODEL, [indexed(b"/p/a.jpg", size=7, mtime_ns=8)], [failed(b"/p/b.jpg")])
    states = catalog.file_states()
    a, b = states[b"/p/a.jpg"].id, states[b"/p/b.jpg"].id
    assert catalog.rows([a, b, 999]) == {a: ImageRow(a, b"/p/a.jpg", 7, 8, 640, 480)}


def test_copies_by_fingerprint_reuses_indexed_vectors_only(catalog):
    catalog.commit_batch(TEST_MODEL, [indexed(b"/p/a.jpg", seed=5, fingerprint=b"A")], [failed(b"/p/b.jpg")])
    found = catalog.copies_by_fingerprint(TEST_MODEL, [b"A", b"bad/p/b.jpg", b"unknown"])
    assert list(found) == [b"A"]
    vector, rows = found[b"A"]
    assert vector.dtype == np.float32 and [row.path for row in rows] == [b"/p/a.jpg"]
    np.testing.assert_allclose(vector, unit(5), atol=1e-3)


def test_remove_takes_the_folder_and_its_contents_only(catalog):
    keep = [b"/a/bc", b"/a/bc/x.jpg", b"/a/b.jpg", b"/a/b0.jpg", b"/a/ba.jpg"]
    gone = [b"/a/b", b"/a/b/x.jpg", b"/a/b/deep/er/y.jpg", b"/a/b/\xff.jpg"]
    catalog.commit_batch(TEST_MODEL, [indexed(p, seed=i) for i, p in enumerate(keep + gone)])
    generation = catalog.generation
    assert catalog.remove([b"/a/b/"]) == len(gone)
    assert sorted(catalog.file_states()) == sorted(keep)
    assert len(catalog.all_vectors(stored(catalog))[0]) == len(keep)  # vectors went with their rows
    assert catalog.generation == generation + 1
    assert catalog.remove([b"/nowhere"]) == 0
    assert catalog.generation == generation + 1  # nothing changed, nothing to rebuild
    assert catalog.remove([b"/"]) == len(keep)


def test_generation_counts_writes(catalog):
    assert catalog.generation == 0
    catalog.commit_batch()  # an empty batch is not a write
    assert catalog.generation == 0
    for expected in (1, 2, 3):
        catalog.commit_batch(TEST_MODEL, [indexed(f"/p/{expected}.jpg".encode())])
        assert catalog.generation == expected
    catalog.set_meta("model", "x")  # settings do not change the vectors
    assert catalog.generation == 3


def test_ids_are_never_reused(catalog):
    catalog.commit_batch(TEST_MODEL, [indexed(b"/p/1.jpg"), indexed(b"/p/2.jpg")])
    last = catalog.file_states()[b"/p/2.jpg"].id
    catalog.remove([b"/p/2.jpg"])
    catalog.commit_batch(TEST_MODEL, [indexed(b"/p/3.jpg")])
    assert catalog.file_states()[b"/p/3.jpg"].id > last


def test_vectors_are_stored_as_float16(catalog):
    catalog.commit_batch(TEST_MODEL, [indexed(b"/p/a.jpg", seed=7)])
    raw = sqlite3.connect(catalog.path).execute("SELECT vector FROM vectors").fetchone()[0]
    assert len(raw) == 2 * DIM
    np.testing.assert_array_equal(np.frombuffer(raw, "<f2"), unit(7).astype(np.float16))


def test_all_vectors_in_id_order_and_empty_shape(catalog):
    assert catalog.model(TEST_MODEL) is None  # recorded with its first vector, not before
    catalog.commit_batch(TEST_MODEL, [indexed(f"/p/{i:03}.jpg".encode(), seed=i) for i in range(25)])
    assert catalog.commit_batch(failed=[failed(f"/p/{i:03}.jpg".encode()) for i in range(25)]) is None
    ids, vectors = catalog.all_vectors(stored(catalog))
    assert ids.shape == (0,) and vectors.shape == (0, DIM)  # the model stays, with no vectors
    catalog.commit_batch(TEST_MODEL, [indexed(f"/p/{i:03}.jpg".encode(), seed=i) for i in range(25)])
    ids, vectors = catalog.all_vectors(stored(catalog))
    assert ids.dtype == np.int64 and vectors.dtype == np.float32
    assert ids.tolist() == sorted(ids.tolist()) and len(ids) == 25
    states = {s.id: p for p, s in catalog.file_states().items()}
    for row_id, vector in zip(ids, vectors):
        seed = int(states[row_id][3:6])
        np.testing.assert_array_equal(vector, unit(seed).astype(np.float16).astype(np.float32))


def test_all_vectors_among_reads_those_ids_only(catalog):
    """`duplicates --under` reads a folder's vectors, not the whole catalog's (a 1,000-image
    folder of 150k had read all 150k: 2.6 s); any number of ids, in any order."""
    catalog.commit_batch(TEST_MODEL, [indexed(f"/p/{i:03}.jpg".encode(), seed=i) for i in range(25)])
    all_ids, all_vectors = catalog.all_vectors(stored(catalog))
    wanted = [int(all_ids[20]), int(all_ids[3]), int(all_ids[7]), 10**9, *range(10**6, 10**6 + 40_000)]
    ids, vectors = catalog.all_vectors(stored(catalog), among=wanted)
    assert ids.tolist() == sorted(int(all_ids[i]) for i in (3, 7, 20))
    np.testing.assert_array_equal(vectors, all_vectors[[3, 7, 20]])
    ids, vectors = catalog.all_vectors(stored(catalog), among=[])
    assert ids.shape == (0,) and vectors.shape == (0, DIM)


def _hold_lock(home: Path, held, release) -> None:
    with Catalog.open(home) as c, c.writer_lock():
        held.set()
        release.wait(30)


def test_writer_lock_excludes_a_second_process(catalog, home):
    ctx = multiprocessing.get_context("fork")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(home, held, release))
    holder.start()
    try:
        assert held.wait(30)
        with (
            pytest.raises(IndexStateError, match="Another clipsearch process is indexing"),
            catalog.writer_lock(wait=0.3),
        ):
            pass
        release.set()
        holder.join(30)
        with catalog.writer_lock(wait=5):
            pass
    finally:
        release.set()
        holder.join(30)


def test_writer_lock_is_freed_when_its_holder_is_killed(catalog, home):
    ctx = multiprocessing.get_context("fork")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(home, held, release))
    holder.start()
    assert held.wait(30)
    holder.kill()
    holder.join(30)
    with catalog.writer_lock(wait=5):
        pass


@pytest.mark.parametrize("damage", ["garbage", "truncated", "zeroed header"])
def test_corrupt_catalog_is_refused_and_left_untouched(catalog, home, damage):
    catalog.commit_batch(TEST_MODEL, [indexed(f"/p/{i}.jpg".encode(), seed=i) for i in range(2000)])
    catalog.close()
    db = home / "catalog.db"
    data = db.read_bytes()
    damaged = {
        "garbage": np.random.default_rng(0).bytes(len(data)),
        "truncated": data[: len(data) // 2],
        "zeroed header": bytes(100) + data[100:],
    }[damage]
    db.write_bytes(damaged)
    listing = sorted(os.listdir(home))
    with pytest.raises(IndexStateError) as error, Catalog.open(home) as c:
        c.file_states()
        c.all_vectors(stored(c))
    assert str(db) in str(error.value)
    assert "untouched" in str(error.value)
    assert db.read_bytes() == damaged
    assert sorted(os.listdir(home)) == listing


def test_foreign_sqlite_file_is_refused(home):
    home.mkdir()
    with sqlite3.connect(home / "catalog.db") as conn:
        conn.executescript("CREATE TABLE notes (body); INSERT INTO notes VALUES ('x');")
    with pytest.raises(IndexStateError, match="not a clipsearch catalog"):
        Catalog.open(home, create=True)
    assert sqlite3.connect(home / "catalog.db").execute("SELECT body FROM notes").fetchall() == [("x",)]


def test_disk_full_rolls_back_the_batch_and_keeps_the_catalog(catalog):
    catalog.commit_batch(TEST_MODEL, [indexed(f"/p/{i}.jpg".encode(), seed=i) for i in range(50)])
    before = catalog.file_states(), catalog.generation
    # SQLite's own page limit fails a write exactly as a full disk does (SQLITE_FULL).
    pages = catalog._conn.exec_driver_sql("PRAGMA page_count").scalar()
    catalog._conn.exec_driver_sql(f"PRAGMA max_page_count = {pages + 1}")
    with pytest.raises(IndexStateError, match=r"disk holding .* is full"):
        catalog.commit_batch(TEST_MODEL, [indexed(f"/q/{i}.jpg".encode(), seed=i) for i in range(2000)])
    assert (catalog.file_states(), catalog.generation) == before
    assert integrity(catalog) == ["ok"]
    catalog._conn.exec_driver_sql("PRAGMA max_page_count = 1000000")  # space freed: resume
    catalog.commit_batch(TEST_MODEL, [indexed(f"/q/{i}.jpg".encode(), seed=i) for i in range(2000)])
    assert catalog.counts()[STATUS_INDEXED] == 2050


def test_readonly_catalog_reads_but_refuses_writes(catalog, home):
    catalog.commit_batch(TEST_MODEL, [indexed(b"/p/a.jpg")])
    with Catalog.open(home, readonly=True) as ro:
        assert list(ro.file_states()) == [b"/p/a.jpg"]
        assert ro.all_vectors(stored(ro))[1].shape == (1, DIM)
        for write in (
            lambda: ro.commit_batch(TEST_MODEL, [indexed(b"/p/b.jpg")]),
            lambda: ro.set_meta("k", "v"),
            lambda: ro.remove([b"/p"]),
        ):
            with pytest.raises(IndexStateError, match="read-only"):
                write()
        with pytest.raises(IndexStateError, match="read-only"), ro.writer_lock():
            pass
    with pytest.raises(IndexStateError, match="no index"):
        Catalog.open(home.parent / "elsewhere", readonly=True, create=True)


def _query_readonly_home(home: Path, results, as_uid: int | None) -> None:
    if as_uid is not None:
        os.setgid(as_uid)
        os.setuid(as_uid)
    try:
        with Catalog.open(home, readonly=True) as c:
            results.put(("ok", sorted(c.file_states()), c.all_vectors(stored(c))[1].shape))
    except Exception as e:  # reported to the parent, which asserts on it
        results.put(("error", repr(e), None))
    try:
        Catalog.open(home).close()
        results.put("a writable open succeeded")
    except IndexStateError as e:
        results.put(str(e))


def test_catalog_in_a_read_only_folder_still_answers_queries(tmp_path):
    """chmod 555 stops writes only for non-root users: as root the check runs as `nobody`.

    A WAL database normally needs its -shm file even to read; here none can be created.
    """
    as_uid = 65534 if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp()) if as_uid is not None else tmp_path  # pytest's tmp is root-only
    home = root / "home"
    try:
        with Catalog.open(home, create=True) as c:
            c.commit_batch(TEST_MODEL, [indexed(b"/p/a.jpg"), indexed(b"/p/b.jpg", seed=1)])
        assert not (home / "catalog.db-wal").exists()  # a clean close checkpoints the WAL away
        root.chmod(0o755)
        home.chmod(0o555)
        ctx = multiprocessing.get_context("fork")
        results = ctx.Queue()
        reader = ctx.Process(target=_query_readonly_home, args=(home, results, as_uid))
        reader.start()
        outcome = results.get(timeout=60)
        reader.join(30)
        assert outcome == ("ok", [b"/p/a.jpg", b"/p/b.jpg"], (2, DIM))
        assert "cannot be written" in results.get(timeout=60)  # what `clipsearch index` would say
        assert sorted(os.listdir(home)) == ["catalog.db"]
    finally:
        home.chmod(0o755)
        if as_uid is not None:
            shutil.rmtree(root)
