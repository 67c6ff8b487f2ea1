"""Corruption and a hostile environment: damaged FAISS and catalog files, a full disk, a
read-only home, corrupted model weights. Derived data (FAISS) is rebuilt with a warning; user
data (the catalog) is never rewritten, emptied or recreated behind the user's back; every
refusal is one line that names the file and says what to do."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable

import numpy as np
import pytest
from helpers import faiss_file, make_library
from reliability_helpers import (
    assert_no_traceback,
    catalog_vectors,
    expected_vectors,
    integrity,
    mounted,
    read_only,
    remount,
)
from typer.testing import CliRunner

import clipsearch.catalog
from clipsearch.catalog import Catalog
from clipsearch.cli import app
from clipsearch.clip import download, registry
from clipsearch.errors import DownloadError
from clipsearch.records import IndexedFile


@pytest.fixture
def cli(tmp_path, tiny_model):
    """`clipsearch --home HOME ...` in this process; `index` gets the tiny model in fp32."""
    runner = CliRunner()
    home = tmp_path / "home"

    def run(*args, home=None):
        home = home or run.home
        args = [os.fsdecode(a) for a in args]
        if args[0] == "index":
            defaults = {"--model": tiny_model, "--precision": "fp32", "--workers": "0"}
            args += [item for option, value in defaults.items() if option not in args for item in (option, value)]
        result = runner.invoke(app, ["--home", str(home), *args])
        assert_no_traceback(result.stdout, result.stderr)
        return result

    run.home = home
    return run


@pytest.fixture
def indexed(cli, tmp_path):
    """A small index of 6 images; returns their paths."""
    images = make_library(tmp_path / "lib", 6)
    assert cli("index", tmp_path / "lib").exit_code == 0
    return images


def top_path(cli, image) -> bytes:
    result = cli("query", image, "-k", "1", "--paths-only")
    assert result.exit_code == 0, result.output
    return result.stdout_bytes.rstrip(b"\n")


# --- the FAISS file ---------------------------------------------------------------------------


def _damage_faiss(path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "zero bytes": b"",
            "garbage": np.random.default_rng(0).bytes(len(data)),
            "garbage body, intact stamp": np.random.default_rng(1).bytes(len(data) - 200) + data[-200:],
        }[how]
    )


@pytest.mark.parametrize("how", ["truncated", "zero bytes", "garbage", "garbage body, intact stamp"])
def test_damaged_faiss_file_is_rebuilt_from_the_catalog_with_a_warning(cli, indexed, how):
    _damage_faiss(faiss_file(cli.home), how)
    result = cli("query", indexed[3], "-k", "1", "--paths-only")
    assert result.exit_code == 0
    assert result.stdout_bytes == os.fsencode(indexed[3]) + b"\n"
    assert "Rebuilding the vector index" in result.stderr and "vectors-1.faiss" in result.stderr
    again = cli("query", indexed[3], "-k", "1", "--paths-only")  # repaired once, not every time
    assert again.stderr == "" and again.stdout_bytes == result.stdout_bytes
    assert "consistent with the catalog" in cli("status").stdout


def test_a_faiss_file_from_an_older_catalog_is_never_trusted(cli, indexed, tmp_path):
    """An out-of-date FAISS file (restored from a backup, or left by a crash) would name ids the
    catalog has since dropped or miss new ones: its stamp gives it away, and the rows changed
    since its generation bring it up to date (rows deleted since: the ids the catalog lacks)."""
    old = (faiss_file(cli.home)).read_bytes()
    make_library(tmp_path / "lib2", 3, start_seed=40)
    assert cli("index", tmp_path / "lib2").exit_code == 0
    assert cli("remove", indexed[0]).exit_code == 0
    (faiss_file(cli.home)).write_bytes(old)
    result = cli("--verbose", "query", "anything", "-k", "100", "--paths-only")
    assert "Updated the vector index: 3 vectors in, 1 out" in result.stderr
    found = set(result.stdout_bytes.splitlines())
    assert os.fsencode(indexed[0]) not in found and len(found) == 8


def _flip_vector_bits(path, vectors: dict[bytes, np.ndarray], flips: int, seed: int) -> None:
    """Flip one exponent bit in ``flips`` stored floats of the FAISS file (found by searching
    the file for each vector's float32 bytes): a bit that changes a vector, not a header."""
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    for vector in rng.choice(list(vectors.values()), flips, replace=False):
        at = data.index(vector.astype("<f4").tobytes())
        data[at + 4 * int(rng.integers(len(vector))) + 3] ^= 0x40
    with open(path, "r+b") as f:  # in place, as a disk error or a stray write would
        f.write(data)


def test_a_flipped_bit_in_the_faiss_file_is_caught_by_its_checksum(cli, indexed, tiny_encoder):
    """Before, 14 of 40 single-bit flips changed a vector while `status` said "consistent". Now
    the file's checksum is compared when a changed file is first read: rebuilt, with a warning."""
    stored = catalog_vectors(cli.home)
    for trial in range(3):
        _flip_vector_bits(faiss_file(cli.home), stored, flips=1, seed=trial)
        result = cli("query", indexed[trial], "-k", "1", "--paths-only")
        assert "does not match its checksum" in result.stderr, result.stderr
        assert result.stdout_bytes == os.fsencode(indexed[trial]) + b"\n"
        assert cli("status", "--check").exit_code == 0


def test_status_check_compares_the_faiss_file_with_the_catalog_row_by_row(cli, indexed):
    result = cli("status", "--check")
    assert result.exit_code == 0 and "matches the catalog's 6 vectors row by row" in result.stdout
    # Damage after the file was checked and recorded intact, that leaves its identity as it was
    # (bit rot): a load trusts the record; --check reads the whole file again.
    record = faiss_file(cli.home).with_suffix(".checked")
    _flip_vector_bits(faiss_file(cli.home), catalog_vectors(cli.home), flips=1, seed=5)
    st = faiss_file(cli.home).stat()
    record.write_text(json.dumps([st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]))
    result = cli("status", "--check")
    assert result.exit_code == 1 and "does not match its checksum); run `clipsearch rebuild`" in result.stdout
    # The cheap comparison passes; the Vectors line had said "consistent" above the check's finding.
    (vectors,) = [line for line in result.stdout.splitlines() if line.startswith("Vectors:")]
    assert vectors.endswith("NOT consistent with the catalog (see the check below)"), vectors
    as_json = cli("status", "--check", "--json")
    said = json.loads(as_json.stdout)
    (found,) = said["checks"]
    assert as_json.exit_code == 1 and "does not match its checksum" in found["problems"][0]
    assert said["consistent"] is False
    assert json.loads(cli("status", "--json").stdout)["consistent"] is True  # without --check: fooled


def test_status_check_fails_on_damage_that_its_own_load_repairs(cli, indexed):
    """The default model's damaged file had been rebuilt by status's own load before the check
    read it: a warning, then "matches", exit 0, and `status --check || alert` stayed silent."""
    path = faiss_file(cli.home)
    path.write_bytes(path.read_bytes()[:100])
    result = cli("status", "--check")
    assert result.exit_code == 1, result.stdout
    assert "its vector file cannot be used" in result.stdout and "run `clipsearch rebuild`" in result.stdout
    assert cli("status", "--check").exit_code == 0  # repaired by then, as the warning said


def test_status_check_names_the_model_to_rebuild_unless_it_is_the_default(
    cli, indexed, tiny_model, other_tiny_model, tmp_path
):
    """A plain `rebuild` rebuilds the default model's file only: the advice had looped."""
    assert cli("index", tmp_path / "lib", "--model", other_tiny_model).exit_code == 0  # the default now
    (cli.home / "vectors-1.faiss").unlink()  # the first model's
    result = cli("status", "--check")
    assert result.exit_code == 1
    (said,) = [line for line in result.stdout.splitlines() if "cannot be used" in line]
    assert said.startswith(f"Check:    {tiny_model}: ")
    assert said.endswith(f"run `clipsearch rebuild --model {tiny_model}`"), said
    assert cli("rebuild", "--model", tiny_model).exit_code == 0
    assert cli("status", "--check").exit_code == 0


def test_status_check_passes_a_vector_file_that_only_lags_the_catalog(cli, indexed, other_tiny_model, tmp_path):
    """A run with another model moves the catalog's generation on: the first model's file lags
    it, as every load expects (a load updates it by the rows changed since). --check had exited
    1 ("built from catalog generation 2, not 4 (any query updates it)") on a healthy index until
    someone queried that model; now it brings the file up to date as a query would and compares
    it row by row. Damage to a lagging file still fails it."""
    first = cli.home / "vectors-1.faiss"
    assert cli("index", tmp_path / "lib", "--model", other_tiny_model).exit_code == 0
    make_library(tmp_path / "more", 2, start_seed=30)
    assert cli("index", tmp_path / "more", "--model", other_tiny_model).exit_code == 0  # rows the first lacks
    result = cli("status", "--check")
    assert result.exit_code == 0, result.stdout
    assert result.stdout.count("matches the catalog's") == 2, result.stdout
    # The lagging file damaged (bit rot, its record of a good checksum left as it was).
    assert cli("index", tmp_path / "more", "--model", other_tiny_model).exit_code == 0
    import sqlite3

    with sqlite3.connect(f"file:{cli.home / 'catalog.db'}?mode=ro", uri=True) as db:
        first_vectors = {
            bytes([n]): np.frombuffer(blob, "<f2").astype(np.float32)
            for n, (blob,) in enumerate(db.execute("SELECT vector FROM vectors WHERE model_id = 1"))
        }
    make_library(tmp_path / "later", 1, start_seed=50)
    assert cli("index", tmp_path / "later", "--model", other_tiny_model).exit_code == 0  # it lags again
    _flip_vector_bits(first, first_vectors, flips=1, seed=2)
    st = first.stat()
    first.with_suffix(".checked").write_text(
        json.dumps([st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    )
    result = cli("status", "--check")
    assert result.exit_code == 1 and "does not match its checksum" in result.stdout, result.stdout


def test_status_check_reads_an_inverted_file_index_row_by_row(cli, tmp_path, monkeypatch):
    """An IVF index keeps catalog ids in its own lists (no id map): --check finds them there."""
    import clipsearch.vectors

    monkeypatch.setattr(clipsearch.vectors, "FLAT_LIMIT", 10)
    make_library(tmp_path / "lib", 40)
    assert cli("index", tmp_path / "lib").exit_code == 0
    result = cli("status", "--check")
    assert "in the index (IVF" in result.stdout and "matches the catalog's 40 vectors row by row" in result.stdout
    assert result.exit_code == 0, result.stdout


def test_status_check_finds_a_vector_altered_inside_the_catalog(cli, indexed):
    """Bytes of a vector overwritten inside catalog.db: SQLite's integrity check passes."""
    import sqlite3

    victim = os.fsencode(indexed[3])
    db = sqlite3.connect(cli.home / "catalog.db")
    with db:
        (blob,) = db.execute(
            "SELECT vector FROM vectors WHERE image_id = (SELECT id FROM images WHERE path = ?)", (victim,)
        ).fetchone()
        damaged = bytes(blob[:8]) + bytes(np.random.default_rng(0).bytes(8)) + bytes(blob[16:])
        db.execute(
            "UPDATE vectors SET vector = ? WHERE image_id = (SELECT id FROM images WHERE path = ?)", (damaged, victim)
        )
    db.close()
    assert integrity(cli.home) == ["ok"]
    result = cli("status", "--check")
    assert result.exit_code == 1
    assert f"1 of its vectors in the catalog are damaged (not of unit length), of {indexed[3]}" in result.stdout
    assert f"1 vector(s) in its vector file differ from the catalog's, of {indexed[3]}" in result.stdout


# --- the catalog ------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncated", "zeroed header"])
def test_a_corrupt_catalog_is_refused_by_every_command_and_left_untouched(cli, indexed, tmp_path, damage):
    db = cli.home / "catalog.db"
    data = db.read_bytes()
    damaged = {
        "garbage": np.random.default_rng(0).bytes(len(data)),
        "truncated": data[: len(data) // 3],
        "zeroed header": bytes(100) + data[100:],
    }[damage]
    db.write_bytes(damaged)
    listing = sorted(os.listdir(cli.home))
    for args in (
        ["query", "anything"],
        ["status"],
        ["status", "--failed"],
        ["index", tmp_path / "lib"],
        ["rebuild"],
        ["remove", indexed[0]],
    ):
        result = cli(*args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.count("\n") == 1 and str(db) in result.stderr, (args, result.stderr)
        assert "damaged" in result.stderr or "not a clipsearch catalog" in result.stderr, result.stderr
        if "damaged" in result.stderr:  # a backup copied over it alone would have the old journal played into it
            assert "delete catalog.db-wal and catalog.db-shm beside it" in result.stderr, result.stderr
        assert db.read_bytes() == damaged, args  # never repaired, emptied or recreated
        assert sorted(os.listdir(cli.home)) == listing, args


def test_a_garbage_wal_file_does_not_lose_committed_rows(cli, indexed):
    """A write-ahead log with garbage in it (a torn write) fails its checksums and is ignored:
    everything checkpointed into the catalog is still there."""
    before = catalog_vectors(cli.home)
    (cli.home / "catalog.db-wal").write_bytes(np.random.default_rng(0).bytes(64 * 1024))
    assert top_path(cli, indexed[2]) == os.fsencode(indexed[2])
    assert catalog_vectors(cli.home).keys() == before.keys()
    assert integrity(cli.home) == ["ok"]


# --- a full disk ------------------------------------------------------------------------------


def _limit_catalog_growth(monkeypatch, extra_pages: int) -> Callable:
    """Every catalog connection may grow the file by ``extra_pages`` pages at most: past that,
    SQLite fails the write with SQLITE_FULL, exactly as a full disk does. Returns the real
    connect function, to put back when space is "freed"."""
    real = clipsearch.catalog._connect

    def limited(db, **kwargs):
        conn = real(db, **kwargs)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + extra_pages}")
        return conn

    monkeypatch.setattr(clipsearch.catalog, "_connect", limited)
    return real


def check_full_disk_outcome(cli, result, expected, before: dict) -> dict:
    assert result.exit_code == 1, result.output
    assert "is full" in result.stderr and "free some space" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1
    assert integrity(cli.home) == ["ok"]
    kept = catalog_vectors(cli.home)
    assert before.keys() <= kept.keys() < expected.keys()  # earlier rows kept, the rest not done
    for path, vector in kept.items():
        np.testing.assert_allclose(vector, expected[path], atol=2e-3)
    return kept


def test_disk_full_while_indexing_is_a_clear_error_and_resumable(cli, tmp_path, tiny_encoder, monkeypatch, encoded):
    make_library(tmp_path / "lib", 4)
    assert cli("index", tmp_path / "lib").exit_code == 0
    before = catalog_vectors(cli.home)
    more = make_library(tmp_path / "lib" / "more", 300, start_seed=100)
    expected = expected_vectors(tiny_encoder, [os.fsdecode(p) for p in before] + more)
    real_connect = _limit_catalog_growth(monkeypatch, extra_pages=6)
    kept = check_full_disk_outcome(cli, cli("index", tmp_path / "lib", "--batch-size", "8"), expected, before)

    monkeypatch.setattr(clipsearch.catalog, "_connect", real_connect)  # space freed
    encoded.clear()
    result = cli("index", tmp_path / "lib")
    assert result.exit_code == 0, result.output
    assert f"new {304 - len(kept)}," in result.stdout and f"unchanged {len(kept)} " in result.stdout
    assert sum(encoded) == 304 - len(kept)
    assert catalog_vectors(cli.home).keys() == expected.keys()


def test_disk_full_on_a_real_filesystem(cli, tmp_path, tiny_encoder, encoded):
    """The home on a 256 KB tmpfs: SQLite's own writes hit ENOSPC; then the filesystem grows
    (space freed) and the same command finishes the job."""
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=256k", "tmpfs") as small:
        home = small / "home"
        images = make_library(tmp_path / "lib", 200)
        expected = expected_vectors(tiny_encoder, images)
        cli.home = home
        result = cli("index", tmp_path / "lib", "--batch-size", "8")
        kept = check_full_disk_outcome(cli, result, expected, {})
        assert not [name for name in os.listdir(home) if name.endswith(".tmp")]

        remount(small, "size=8m")
        encoded.clear()
        result = cli("index", tmp_path / "lib")
        assert result.exit_code == 0, result.output
        assert sum(encoded) == 200 - len(kept)
        assert catalog_vectors(home).keys() == expected.keys()
        assert top_path(cli, images[7]) == os.fsencode(images[7])


def test_disk_full_while_saving_the_faiss_file(cli, tmp_path, monkeypatch):
    """The catalog is committed; only the derived FAISS file cannot be written. The run warns,
    leaves no temporary file behind, and the next command rebuilds it."""
    images = make_library(tmp_path / "lib", 5)

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    result = cli("index", tmp_path / "lib")
    assert result.exit_code == 0, result.output
    assert "Could not save the vector index" in result.stderr and "free some space" in result.stderr
    assert sorted(os.listdir(cli.home)) == ["catalog.db", "index.lock"]
    monkeypatch.undo()
    assert top_path(cli, images[1]) == os.fsencode(images[1])
    assert (faiss_file(cli.home)).exists()


# --- a read-only home -------------------------------------------------------------------------


def test_read_only_home_refuses_index_and_still_answers_queries(cli, indexed, tmp_path):
    """As root, a read-only bind mount of the home onto itself (writes fail with EROFS, as on a
    read-only disk); as a normal user, chmod."""
    make_library(tmp_path / "more", 2, start_seed=30)
    with read_only(cli.home):
        listing = sorted(os.listdir(cli.home))
        for args in (["index", tmp_path / "more"], ["remove", indexed[0]], ["rebuild"]):
            result = cli(*args)
            assert result.exit_code == 1, (args, result.output)
            assert result.stderr.count("\n") == 1 and str(cli.home) in result.stderr, result.stderr
        assert top_path(cli, indexed[4]) == os.fsencode(indexed[4])
        assert "6 indexed" in cli("status").stdout
        assert sorted(os.listdir(cli.home)) == listing
    assert len(catalog_vectors(cli.home)) == 6


def test_read_only_home_error_says_it_cannot_be_written(cli, indexed, tmp_path):
    make_library(tmp_path / "more", 2, start_seed=30)
    with read_only(cli.home):
        result = cli("index", tmp_path / "more")
    assert "cannot be written" in result.stderr or "Cannot write" in result.stderr, result.stderr


def test_read_only_home_with_a_stale_faiss_file_still_answers(cli, indexed):
    """Rebuilt in memory (it cannot be saved), with a warning, and correct."""
    _damage_faiss(faiss_file(cli.home), "truncated")
    with read_only(cli.home):
        result = cli("query", indexed[1], "-k", "1", "--paths-only")
        assert result.exit_code == 0
        assert result.stdout_bytes == os.fsencode(indexed[1]) + b"\n"
        assert "Rebuilding the vector index" in result.stderr


def test_a_read_only_copy_of_a_home_is_used_as_it_is(cli, indexed, tmp_path):
    """A copy of a home (`cp -a`: every file gets a new ctime, so the record that its vector file
    matched its checksum no longer names it) on a read-only disk. The checksum matches; that the
    record cannot be rewritten is no damage. Before: every command warned "vectors-1.faiss is
    damaged ([Errno 30] Read-only file system ...)" and rebuilt the index in memory."""
    copy = tmp_path / "copy"
    shutil.copytree(cli.home, copy)
    with read_only(copy):
        listing = sorted(os.listdir(copy))
        for args in (["status"], ["query", indexed[3], "-k", "1", "--paths-only"], ["status", "--check"]):
            result = cli(*args, home=copy)
            assert result.exit_code == 0, (args, result.output)
            assert "Rebuilding" not in result.stderr and "damaged" not in result.stderr, (args, result.stderr)
            if args[0] == "query":
                assert result.stdout_bytes == os.fsencode(indexed[3]) + b"\n"
        assert sorted(os.listdir(copy)) == listing


def _commit_then_die(home, indexed_file, model) -> None:
    """In a forked child: commit one row and vanish without closing, as a killed indexer does,
    leaving catalog.db-wal (holding the commit) and catalog.db-shm behind."""
    catalog = Catalog.open(home)
    catalog.commit_batch(model, [indexed_file])
    os._exit(0)


def _a_writer_dies_after_a_commit(home, tmp_path, encoder, model):
    """A new image committed by a forked writer that then dies (`_commit_then_die`); its path."""
    late = make_library(tmp_path / "late", 1, start_seed=70)[0]
    vector = expected_vectors(encoder, [late])[os.fsencode(late)]
    st = late.stat()
    row = IndexedFile(os.fsencode(late), st.st_size, st.st_mtime_ns, b"f" * 16, 48, 40, vector)
    child = multiprocessing.get_context("fork").Process(target=_commit_then_die, args=(home, row, model))
    child.start()
    child.join(60)
    return late


def test_a_crashed_writer_then_a_read_only_disk_still_answers(cli, indexed, tmp_path, tiny_encoder, tiny_model):
    """An indexer dies, then the disk comes back read-only (a drive remounted after errors):
    the commit that lives only in the write-ahead log is still found by queries."""
    late = _a_writer_dies_after_a_commit(cli.home, tmp_path, tiny_encoder, tiny_model)
    assert {"catalog.db-wal", "catalog.db-shm"} <= set(os.listdir(cli.home))
    with read_only(cli.home):
        assert top_path(cli, late) == os.fsencode(late)
        assert "7 indexed" in cli("status").stdout


def test_a_read_only_home_with_a_write_ahead_log_but_no_shm_file_still_answers(
    cli, indexed, tmp_path, tiny_encoder, tiny_model
):
    """A leftover catalog.db-wal without its catalog.db-shm (deleted, or not copied with the
    folder): SQLite cannot read the log without creating the -shm file, which a read-only folder
    forbids. Before: "cannot be opened ... check that it is readable", though it is. Now the
    catalog is read as it was before the log, with a warning that says so."""
    _a_writer_dies_after_a_commit(cli.home, tmp_path, tiny_encoder, tiny_model)
    (cli.home / "catalog.db-shm").unlink()
    with read_only(cli.home):
        for args in (["status"], ["query", indexed[2], "-k", "1", "--paths-only"]):
            result = cli(*args)
            assert result.exit_code == 0, (args, result.stderr)
            assert "catalog.db-wal holds changes that cannot be read" in result.stderr, result.stderr
        assert "6 indexed" in cli("status").stdout  # the row committed in the log is not seen
        assert top_path(cli, indexed[2]) == os.fsencode(indexed[2])
    assert "7 indexed" in cli("status").stdout  # writable again: the log is read


def _set_revision(home, revision: str) -> None:
    """Closed at once: the last connection to close folds the log into catalog.db."""
    import sqlite3

    db = sqlite3.connect(home / "catalog.db")
    with db:
        db.execute("UPDATE alembic_version SET version_num = ?", (revision,))
    db.close()


@pytest.mark.parametrize(
    "revision, message",
    [
        ("", "records no schema revision clipsearch knows"),
        ("0003", "records schema 0003, but its tables do not match it"),
    ],
    ids=["empty", "older-than-its-tables"],
)
def test_a_catalog_whose_recorded_schema_is_wrong_is_refused_in_one_line(cli, indexed, tmp_path, revision, message):
    """Before: "AssertionError (this is a bug ...)" for '', a 12-line OperationalError with the
    CREATE TABLE statement for 0003. Now one line naming the file, and the file is untouched."""
    _set_revision(cli.home, revision)
    before = (cli.home / "catalog.db").read_bytes()
    for args in (["status"], ["query", "x"], ["index", tmp_path / "lib"]):
        result = cli(*args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
        assert "bug" not in result.stderr and str(cli.home / "catalog.db") in result.stderr
    assert (cli.home / "catalog.db").read_bytes() == before


# --- model weights ----------------------------------------------------------------------------


def test_corrupt_cached_weights_are_refused_with_the_path_and_how_to_re_download(cli, tmp_path):
    """A pinned model (ViT-B/32: its SHA-256 is in the registry) whose cached file is damaged
    is refused before anything reads it; no network is needed to find out."""
    entry = registry.get("ViT-B/32")
    cached = download.model_cache_dir() / entry.asset.filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"PK\x03\x04" + np.random.default_rng(0).bytes(4096))
    make_library(tmp_path / "lib", 2)
    result = cli("index", tmp_path / "lib", "--model", "ViT-B/32", home=tmp_path / "vit-home")
    assert result.exit_code == 1, result.output
    message = result.stderr
    assert str(cached) in message and "corrupt" in message and "delete it" in message, message
    assert message.count("\n") == 1
    assert cached.exists()  # the user decides: nothing is deleted behind their back


def test_corrupt_weights_refused_by_models_download(cli):
    entry = registry.get("ViT-B/32")
    cached = download.model_cache_dir() / entry.asset.filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the weights")
    result = cli("models", "download", "ViT-B/32")
    assert result.exit_code == 1 and str(cached) in result.stderr and "corrupt" in result.stderr


def _cache_verified_file(tmp_path, content: bytes):
    """A cached file as a verified download leaves it: the file and its hash record."""
    dest = tmp_path / "cache" / "weights.bin"
    dest.parent.mkdir()
    dest.write_bytes(content)
    sha = hashlib.sha256(content).hexdigest()
    assert download.fetch("http://127.0.0.1:9/never-used", sha, dest) == dest  # verifies, records
    return dest, sha


def test_weights_corrupted_after_verification_are_refused(tmp_path):
    dest, sha = _cache_verified_file(tmp_path, np.random.default_rng(0).bytes(100_000))
    data = bytearray(dest.read_bytes())
    data[50_000] ^= 0xFF
    dest.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match="corrupt") as error:
        download.fetch("http://127.0.0.1:9/never-used", sha, dest)
    assert str(dest) in str(error.value)


def test_weights_corrupted_with_their_mtime_kept_are_refused(tmp_path):
    dest, sha = _cache_verified_file(tmp_path, np.random.default_rng(0).bytes(100_000))
    stat = dest.stat()
    data = bytearray(dest.read_bytes())
    data[50_000] ^= 0xFF
    dest.write_bytes(bytes(data))
    os.utime(dest, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DownloadError, match="corrupt"):
        download.fetch("http://127.0.0.1:9/never-used", sha, dest)
