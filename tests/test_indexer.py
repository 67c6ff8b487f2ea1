"""The incremental indexer, driven through `run_add` on a catalog (no FAISS, no CLI)."""

import os
import shutil

import numpy as np
import pytest
from helpers import (
    TEST_MODEL,
    CrashingPreprocess,
    bump_mtime,
    listable_not_enterable,
    make_image,
    make_library,
    stored,
)
from PIL import Image

from clipsearch import indexer
from clipsearch.catalog import Catalog
from clipsearch.decode import DecodePool
from clipsearch.errors import ClipsearchError
from clipsearch.fingerprint import fingerprint
from clipsearch.indexer import run_add
from clipsearch.records import IndexedFile


@pytest.fixture
def catalog(tmp_path):
    with Catalog.open(tmp_path / "home", create=True) as catalog:
        yield catalog


@pytest.fixture
def add(catalog, tiny_encoder):
    """run_add with the session's encoder; records whether the encoder was asked for."""
    loads = []

    def add(*roots, **options):
        def get_encoder(images):
            loads.append(images)
            return tiny_encoder

        options.setdefault("workers", 0)
        return run_add(catalog, TEST_MODEL, get_encoder, roots, **options)

    add.loads = loads
    return add


def counts(report):
    return {k: getattr(report, k) for k in ("new", "changed", "moved", "copied", "removed", "failed", "unchanged")}


def vector_of(catalog, path):
    state = catalog.file_states()[os.fsencode(path)]
    ids, vectors = catalog.all_vectors(stored(catalog))
    return vectors[list(ids).index(state.id)]


def test_first_run_indexes_everything_and_records_a_bad_file(tmp_path, catalog, add, encoded):
    make_library(tmp_path / "lib", 6)
    (tmp_path / "lib" / "bad.jpg").write_text("this is not a JPEG")
    report = add(tmp_path / "lib")
    assert counts(report) == dict(new=6, changed=0, moved=0, copied=0, removed=0, failed=1, unchanged=0)
    assert sum(encoded) == 6
    assert catalog.counts() == {"indexed": 6, "failed": 1, "missing": 0}
    ((path, reason),) = catalog.failures()
    assert path == os.fsencode(tmp_path / "lib" / "bad.jpg") and reason


def test_an_unchanged_rerun_loads_no_model_and_encodes_nothing(tmp_path, catalog, add, encoded):
    make_library(tmp_path / "lib", 5)
    (tmp_path / "lib" / "bad.jpg").write_text("nope")
    add(tmp_path / "lib")
    generation = catalog.generation
    add.loads.clear()
    encoded.clear()
    report = add(tmp_path / "lib")
    assert counts(report) == dict(new=0, changed=0, moved=0, copied=0, removed=0, failed=0, unchanged=6)
    assert add.loads == [] and encoded == []
    assert catalog.generation == generation  # nothing written, so FAISS stays valid


def test_changed_files_are_re_encoded(tmp_path, catalog, add, encoded):
    images = make_library(tmp_path / "lib", 4)
    add(tmp_path / "lib")
    before = vector_of(catalog, images[0])
    make_image(images[0], seed=1000)
    bump_mtime(images[0])
    encoded.clear()
    report = add(tmp_path / "lib")
    assert counts(report) == dict(new=0, changed=1, moved=0, copied=0, removed=0, failed=0, unchanged=3)
    assert sum(encoded) == 1
    assert not np.allclose(vector_of(catalog, images[0]), before)


def test_a_new_mtime_on_the_same_content_is_recorded_without_encoding(tmp_path, catalog, add, encoded):
    """`cp -r` without -p, a restore, a FAT drive's hour at a clock change: every file of a
    library had been encoded again."""
    images = make_library(tmp_path / "lib", 4)
    add(tmp_path / "lib")
    generation = catalog.generation
    for image in images:
        bump_mtime(image)
    data = bytearray(images[0].read_bytes())
    data[-20] ^= 0xFF  # the same size, other content (damaged: it fails to decode)
    images[0].write_bytes(bytes(data))
    encoded.clear()
    report = add(tmp_path / "lib")
    assert counts(report) == dict(new=0, changed=0, moved=0, copied=0, removed=0, failed=1, unchanged=3)
    assert encoded == []
    states = catalog.file_states()
    assert all(states[os.fsencode(i)].mtime_ns == os.stat(i).st_mtime_ns for i in images[1:])
    assert catalog.generation == generation + 1  # the damaged file's write; re-timing writes no vector
    assert counts(add(tmp_path / "lib"))["unchanged"] == 4


def bmp_differing_in_the_middle(path, seed):
    """An uncompressed 800x800 BMP (1.9 MB): pictures that differ only in their middle rows have
    the same size, first MiB and last KiB, so the same fingerprint."""
    pixels = np.full((800, 800, 3), 255, np.uint8)
    pixels[100:300, 200:600] = np.random.default_rng(seed).integers(0, 256, 3, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def test_an_uncompressed_picture_edited_in_its_middle_is_never_taken_for_the_same(tmp_path, catalog, add, encoded):
    from clipsearch.fingerprint import fingerprint

    a = bmp_differing_in_the_middle(tmp_path / "lib" / "a.bmp", 1)
    add(tmp_path / "lib")
    before = vector_of(catalog, a)
    b = bmp_differing_in_the_middle(tmp_path / "lib" / "b.bmp", 2)
    bmp_differing_in_the_middle(a, 3)  # edited in place: same size, new mtime
    bump_mtime(a)
    assert fingerprint(a) == fingerprint(b) == catalog.file_states()[os.fsencode(a)].fingerprint
    encoded.clear()
    report = add(tmp_path / "lib")
    assert (report.new, report.changed, report.copied, report.unchanged) == (1, 1, 0, 0) and sum(encoded) == 2
    assert not np.allclose(vector_of(catalog, a), before)
    encoded.clear()
    assert counts(add(tmp_path / "lib", verify=True))["changed"] == 2  # --verify cannot tell: encoded again


def test_moved_and_copied_files_reuse_their_vector_without_encoding(tmp_path, catalog, add, encoded):
    images = make_library(tmp_path / "lib", 4)
    add(tmp_path / "lib")
    vector = vector_of(catalog, images[0])
    moved = tmp_path / "lib" / "elsewhere" / "renamed.png"
    moved.parent.mkdir()
    os.rename(images[0], moved)
    shutil.copy(images[1], tmp_path / "lib" / "copy.png")
    encoded.clear()
    add.loads.clear()
    report = add(tmp_path / "lib")
    # A rename is a move, not a move and a removal: the old path's row goes.
    assert counts(report) == dict(new=0, changed=0, moved=1, copied=1, removed=0, failed=0, unchanged=3)
    assert encoded == [] and add.loads == [] and report.model_load_s == 0  # the model was never needed
    np.testing.assert_array_equal(vector_of(catalog, moved), vector)
    assert os.fsencode(images[0]) not in catalog.file_states()
    row = catalog.rows([catalog.file_states()[os.fsencode(moved)].id])
    assert (row[next(iter(row))].width, row[next(iter(row))].height) == (48, 40)


def test_a_folder_renamed_and_indexed_under_its_new_name_leaves_no_old_rows(tmp_path, catalog, add, encoded):
    """The old name is not walked, so its rows were never found missing: they had stayed
    "indexed" for ever, counted by status and out of reach of remove --missing."""
    make_library(tmp_path / "lib" / "2019", 3)
    make_library(tmp_path / "lib" / "2020", 2)
    add(tmp_path / "lib" / "2019")
    add(tmp_path / "lib" / "2020")
    os.rename(tmp_path / "lib" / "2019", tmp_path / "lib" / "summer 2019")
    shutil.copy(next((tmp_path / "lib" / "2020").rglob("*.png")), tmp_path / "lib" / "summer 2019" / "copy.png")
    encoded.clear()
    report = add(tmp_path / "lib" / "summer 2019")
    assert counts(report) == dict(new=0, changed=0, moved=3, copied=1, removed=0, failed=0, unchanged=0)
    assert encoded == [] and catalog.counts() == {"indexed": 6, "failed": 0, "missing": 0}
    assert not [p for p in catalog.file_states() if b"/2019/" in p]
    assert len([p for p in catalog.file_states() if b"/2020/" in p]) == 2  # a copy's original stays


def test_a_renamed_folder_s_copies_inside_it_and_a_stopped_run_leave_no_old_rows(
    tmp_path, catalog, add, encoded, monkeypatch
):
    monkeypatch.setattr(indexer, "_CHUNK", 4)  # files probed, and their reuse committed, 4 at a time
    images = make_library(tmp_path / "lib" / "old", 12)
    shutil.copy(images[0], tmp_path / "lib" / "old" / "same as img0.png")
    add(tmp_path / "lib" / "old")
    os.rename(tmp_path / "lib" / "old", tmp_path / "lib" / "new")
    encoded.clear()
    done: list[int] = []
    stop_at_4 = dict(progress=lambda d, t: done.append(d), should_stop=lambda: done[-1:] >= [4])
    stopped = add(tmp_path / "lib" / "new", batch_size=4, **stop_at_4)
    assert stopped.interrupted and 4 <= stopped.moved < 13
    assert len(catalog.file_states()) == 13  # the rows of the files moved so far went with their commit
    report = add(tmp_path / "lib" / "new")
    assert (report.moved + stopped.moved, report.copied + stopped.copied, report.new) == (13, 0, 0)
    assert encoded == [] and not [p for p in catalog.file_states() if b"/old/" in p]


def test_the_rows_of_a_drive_that_is_not_mounted_stay_when_its_photos_are_copied_elsewhere(tmp_path, catalog, add):
    make_library(tmp_path / "usb", 2)
    add(tmp_path / "usb")
    shutil.move(tmp_path / "usb", tmp_path / "unplugged")
    (tmp_path / "usb").mkdir()  # unmounted: the mount point is there, empty
    shutil.copytree(tmp_path / "unplugged", tmp_path / "photos")
    report = add(tmp_path / "photos")
    assert (report.moved, report.copied) == (0, 2)
    assert len([p for p in catalog.file_states() if b"/usb/" in p]) == 2


@pytest.mark.parametrize("workers", [0, None])
def test_the_model_loads_once_a_file_needs_encoding_after_reused_ones(tmp_path, catalog, add, encoded, workers):
    images = make_library(tmp_path / "lib", 3)
    add(tmp_path / "lib")
    shutil.copytree(tmp_path / "lib", tmp_path / "copy")  # the copies come first in the walk
    make_image(tmp_path / "lib" / "zz new.png", seed=99)
    shutil.copy(images[0], tmp_path / "lib" / "zz copy.png")
    encoded.clear()
    add.loads.clear()
    report = add(tmp_path / "copy", tmp_path / "lib", workers=workers)
    assert (report.new, report.moved, report.copied, report.unchanged) == (1, 0, 4, 3)
    assert add.loads == [5] and sum(encoded) == 1
    assert catalog.counts() == {"indexed": 8, "failed": 0, "missing": 0}


def test_a_file_dated_past_2262_is_indexed_and_then_unchanged(tmp_path, catalog, add):
    images = make_library(tmp_path / "lib", 3)
    year_2300 = 10_413_792_000 * 10**9  # nanoseconds: past SQLite's largest integer
    os.utime(images[1], ns=(year_2300, year_2300))
    assert os.stat(images[1]).st_mtime_ns == year_2300
    assert add(tmp_path / "lib").new == 3
    assert catalog.counts() == {"indexed": 3, "failed": 0, "missing": 0}
    assert counts(add(tmp_path / "lib"))["unchanged"] == 3  # the same clamped time, compared alike


def test_deleted_files_are_marked_missing_only_under_the_roots_walked(tmp_path, catalog, add):
    a = make_library(tmp_path / "a", 2)
    b = make_library(tmp_path / "b", 2, start_seed=10)
    add(tmp_path / "a", tmp_path / "b")
    os.unlink(a[0])
    os.unlink(b[0])
    report = add(tmp_path / "a")
    assert report.removed == 1
    states = catalog.file_states()
    assert states[os.fsencode(a[0])].status == "missing"
    assert states[os.fsencode(b[0])].status == "indexed"  # b was not walked this time


def test_files_excluded_in_a_later_run_stay_as_indexed(tmp_path, catalog, add):
    """An excluded file was skipped, not deleted: as rsync leaves excluded files, the run leaves
    its row and vector (`remove` forgets them); a file deleted beside it is still marked missing."""
    images = make_library(tmp_path / "lib", 4)  # part0: 0 and 2, part1: 1 and 3
    add(tmp_path / "lib")
    vector = vector_of(catalog, images[1])
    os.unlink(images[0])
    report = add(tmp_path / "lib", exclude=["part1"])
    assert (report.removed, report.unchanged) == (1, 1)
    states = catalog.file_states()
    assert [states[os.fsencode(p)].status for p in images] == ["missing", "indexed", "indexed", "indexed"]
    np.testing.assert_array_equal(vector_of(catalog, images[1]), vector)


def test_a_file_that_comes_back_is_indexed_again(tmp_path, catalog, add):
    (image,) = make_library(tmp_path / "lib", 1)
    add(tmp_path / "lib")
    data = image.read_bytes()
    image.unlink()
    add(tmp_path / "lib")
    image.write_bytes(data)
    report = add(tmp_path / "lib")
    assert (report.new, report.moved) == (1, 0)  # a missing row's vector is gone: encoded anew
    assert catalog.counts()["indexed"] == 1


def test_failed_files_are_retried_only_when_changed_or_asked(tmp_path, catalog, add):
    bad = tmp_path / "lib" / "bad.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG broken")
    add(tmp_path / "lib")
    skipped = add(tmp_path / "lib")
    assert (skipped.unchanged, skipped.failed_before, skipped.failed) == (1, 1, 0)
    assert add(tmp_path / "lib", retry_failed=True).failed == 1
    make_image(bad, seed=3)
    bump_mtime(bad)
    report = add(tmp_path / "lib")
    assert (report.changed, report.failed) == (1, 0)
    assert catalog.counts() == {"indexed": 1, "failed": 0, "missing": 0}


def test_an_unreadable_folder_is_not_taken_for_deleted(tmp_path, catalog, add, monkeypatch):
    make_library(tmp_path / "lib", 4)
    add(tmp_path / "lib")
    locked = os.fsencode(tmp_path / "lib" / "part0")
    real = os.scandir
    monkeypatch.setattr(
        os, "scandir", lambda p: (_ for _ in ()).throw(PermissionError(13, "denied")) if p == locked else real(p)
    )
    report = add(tmp_path / "lib")
    assert (report.removed, report.unreadable, report.unchanged) == (0, 1, 2)
    assert catalog.counts()["missing"] == 0


def test_a_folder_listed_but_not_entered_keeps_its_files(tmp_path, catalog, add, monkeypatch):
    """``chmod -R 644 photos`` leaves folders that list but whose files cannot be stat'ed: every
    file in them had been counted removed, with exit status 0 and no warning."""
    make_library(tmp_path / "lib", 4)
    add(tmp_path / "lib")
    listable_not_enterable(monkeypatch, tmp_path / "lib" / "part0")
    report = add(tmp_path / "lib")
    assert (report.removed, report.unreadable, report.unchanged) == (0, 1, 2)
    assert catalog.counts() == {"indexed": 4, "failed": 0, "missing": 0}


def test_non_utf8_and_odd_names_are_stored_byte_for_byte(tmp_path, catalog, add):
    folder = os.fsencode(tmp_path / "lib")
    names = [b"caf\xe9.png", b"two words.png", b"new\nline.png"]
    for seed, name in enumerate(names):
        make_image(os.path.join(folder, name), seed)
    assert add(tmp_path / "lib").new == 3
    assert sorted(catalog.file_states()) == sorted(os.path.join(folder, n) for n in names)


def test_a_missing_root_is_a_clear_error(tmp_path, add):
    with pytest.raises(ClipsearchError, match="does not exist"):
        add(tmp_path / "nowhere")


def test_stopping_commits_finished_batches_and_the_next_run_resumes(tmp_path, catalog, add, encoded):
    make_library(tmp_path / "lib", 10)
    report = add(tmp_path / "lib", batch_size=3, should_stop=lambda: len(encoded) >= 2)
    assert report.interrupted and report.new == 6
    assert catalog.counts()["indexed"] == 6
    encoded.clear()
    report = add(tmp_path / "lib", batch_size=3)
    assert (report.new, report.unchanged, sum(encoded)) == (4, 6, 4)


def test_progress_reports_every_file(tmp_path, add):
    make_library(tmp_path / "lib", 7)
    calls = []
    add(tmp_path / "lib", batch_size=3, progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 7) and calls[-1] == (7, 7)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_verify_reports_the_files_it_fingerprints_before_any_is_encoded(tmp_path, add):
    make_library(tmp_path / "lib", 300)  # two chunks of fingerprinting
    add(tmp_path / "lib")
    calls = []
    report = add(
        tmp_path / "lib",
        verify=True,
        progress=lambda done, total: calls.append(("encode", done, total)),
        verify_progress=lambda done, total: calls.append(("verify", done, total)),
    )
    assert (report.verified, report.unchanged) == (300, 300)
    assert calls == [("verify", 256, 300), ("verify", 300, 300), ("encode", 0, 0)]


def test_worker_processes_give_the_same_vectors_as_in_process(tmp_path, catalog, add, tiny_encoder):
    images = make_library(tmp_path / "lib", 6)
    (tmp_path / "lib" / "bad.jpg").write_text("nope")
    report = add(tmp_path / "lib", workers=2)
    assert (report.new, report.failed) == (6, 1)
    expected = tiny_encoder.encode_images(np.stack([tiny_encoder.preprocess(str(p)).numpy() for p in images]))
    for image, vector in zip(images, expected):
        np.testing.assert_allclose(vector_of(catalog, image), vector, atol=2e-3)  # stored as float16


def test_by_default_the_first_batch_decides_the_decode_workers(tmp_path, catalog, add, tiny_encoder, monkeypatch):
    from clipsearch import decode, indexer

    images = make_library(tmp_path / "lib", 7)
    (tmp_path / "lib" / "bad.jpg").write_text("nope")
    probes, pools = [], []
    monkeypatch.setattr(indexer, "best_workers", lambda *probe: probes.append(probe) or 2)
    monkeypatch.setattr(indexer, "DecodePool", lambda *a, **kw: pools.append(a[1]) or decode.DecodePool(*a, **kw))
    report = add(tmp_path / "lib", workers=None, batch_size=3)
    assert (report.new, report.failed) == (7, 1)
    assert pools == [0, 2]  # the first batch in this process, the rest in two workers
    ((decode_s, encode_s, on_cpu, left, batch, shares_cores),) = probes
    assert batch == 3
    assert decode_s > 0 and encode_s > 0 and on_cpu is True  # seconds per image, measured
    assert shares_cores is False  # torch's threads
    assert left == 8 - 3  # eight files to do, the first batch of three done
    expected = tiny_encoder.encode_images(np.stack([tiny_encoder.preprocess(str(p)).numpy() for p in images]))
    for image, vector in zip(images, expected):
        np.testing.assert_allclose(vector_of(catalog, image), vector, atol=2e-3)  # stored as float16


def test_the_first_batch_that_chooses_the_workers_is_small(tmp_path, add, encoded, monkeypatch):
    from clipsearch import indexer

    make_library(tmp_path / "lib", 12)
    probes = []
    monkeypatch.setattr(indexer, "best_workers", lambda *probe: probes.append(probe) or 0)
    report = add(tmp_path / "lib", workers=None, batch_size=32)
    assert report.new == 12
    assert encoded == [8, 4]  # measured on 8 in this process, then the rest in batches of 32
    ((_, _, _, left, batch, _),) = probes
    assert (left, batch) == (4, 32)


@pytest.mark.parametrize("shares_cores, model_threads", [(False, [1]), (True, [])])
def test_decode_workers_take_the_model_s_cores_unless_it_shares_them(
    tmp_path, add, tiny_encoder, monkeypatch, shares_cores, model_threads
):
    from clipsearch import indexer

    make_library(tmp_path / "lib", 3)
    monkeypatch.setattr(indexer, "usable_cores", lambda: 2)
    monkeypatch.setattr(tiny_encoder, "shares_cores", shares_cores)
    calls, real = [], tiny_encoder.threads
    monkeypatch.setattr(tiny_encoder, "threads", lambda count: calls.append(count) or real(count))
    report = add(tmp_path / "lib", workers=1)
    assert report.new == 3
    assert calls == model_threads  # one core left beside the worker, or both kept


@pytest.mark.parametrize(
    "cores, decode_s, encode_s, on_cpu, shares, images, workers",
    [
        (2, 0.007, 0.045, True, False, 10_000, 0),  # 640x480 JPEGs, ViT-B/32: the model wants both cores
        (2, 0.052, 0.045, True, False, 168, 1),  # 12 MP: max(52, 83) ms an image with a worker against 97
        (2, 0.052, 0.045, True, False, 20, 0),  # ... which does not pay for starting and filling it on a short run
        (2, 0.030, 0.045, True, False, 1000, 0),  # 83 ms with a worker against 75 in-process
        (8, 0.120, 0.045, True, False, 1000, 2),  # two workers (60 ms an image) keep pace with six cores (60 ms)
        (2, 0.010, 0.002, False, False, 1000, 1),  # a GPU encodes: decoding beside it pays
        (2, 0.010, 0.002, False, True, 1000, 1),  # ... and keeps a core to feed it, whatever its threads
        (1, 0.500, 0.010, True, False, 1000, 0),  # one core: nothing to run beside the model
        # A model whose threads share the cores keeps them all and pays for the decoding's CPU time:
        (2, 0.007, 0.045, True, True, 500, 1),  # 48.5 ms an image against 52 in-process: one keeps pace
        (2, 0.007, 0.045, True, True, 100, 0),  # ... not worth starting for a hundred
        (2, 0.071, 0.051, True, True, 200, 2),  # 12 MP: 86.5 ms against 122
        (4, 0.120, 0.045, True, True, 1000, 4),  # 75 ms (the model's 45 + 30): a worker a core
        (4, 0.010, 0.045, True, True, 1000, 2),  # 47.5 ms against 55; a second halves the first wait
        (16, 0.007, 0.005, True, True, 1000, 3),  # not a worker a core: each one's start costs the model
        (1, 0.500, 0.010, True, True, 1000, 0),  # one core: 510 ms either way, and a worker to start
    ],
)
def test_best_workers_balances_decoding_against_the_model(
    monkeypatch, cores, decode_s, encode_s, on_cpu, shares, images, workers
):
    from clipsearch import decode

    monkeypatch.setattr(decode, "usable_cores", lambda: cores)
    assert decode.best_workers(decode_s, encode_s, on_cpu, images, batch=32, shares_cores=shares) == workers


def test_a_file_that_crashes_a_worker_fails_alone(tmp_path, tiny_encoder):
    images = [make_image(tmp_path / f"ok{i}.png", i) for i in range(5)]
    crasher = make_image(tmp_path / "crash.png", 99, size=(13, 13))
    items = [(i, os.fsencode(p), None) for i, p in enumerate([*images, crasher])]
    with DecodePool(CrashingPreprocess(tiny_encoder.preprocess), workers=2, window=4) as pool:
        results = dict(pool.imap(items))
    assert sorted(results) == list(range(6))
    assert "crashed" in results[5].error
    assert all(results[i].error is None and results[i].pixels.shape == (3, 32, 32) for i in range(5))


def test_a_stop_before_any_encoding_still_reports_interrupted(tmp_path, catalog, add):
    make_library(tmp_path / "lib", 3)
    add(tmp_path / "lib")
    os.unlink(tmp_path / "lib" / "part0" / "img0000.png")
    make_image(tmp_path / "lib" / "new.png", seed=50)
    report = add(tmp_path / "lib", should_stop=lambda: True)
    assert report.interrupted and (report.new, report.removed) == (0, 0)
    assert catalog.counts() == {"indexed": 3, "failed": 0, "missing": 0}  # nothing marked gone


def test_a_file_rewritten_while_it_is_read_is_retried_next_run(tmp_path, catalog, add, monkeypatch):
    import clipsearch.decode

    (_image,) = make_library(tmp_path / "lib", 1)
    real = clipsearch.decode.fingerprint

    def fingerprint_then_rewrite(file):
        digest = real(file)
        path = os.readlink(f"/proc/self/fd/{file.fileno()}")
        make_image(path, seed=77)  # rewritten after its fingerprint, before its pixels are read
        bump_mtime(path)
        return digest

    monkeypatch.setattr(clipsearch.decode, "fingerprint", fingerprint_then_rewrite)
    assert add(tmp_path / "lib").failed == 1
    assert "changed while it was being read" in catalog.failures()[0][1]
    monkeypatch.undo()
    report = add(tmp_path / "lib")
    assert (report.changed, report.failed) == (1, 0)


def test_re_encoding_for_new_weights_is_counted_apart_from_new_files_by_an_executor_too(tmp_path, catalog, add):
    """An `Executor` (Ray) counts each file new to the model as new; those whose vectors were
    dropped for new weights (``stale``) are re-encoded, not new: the report says so."""
    make_library(tmp_path / "lib", 4)
    add(tmp_path / "lib")
    stale = frozenset(catalog.file_states(TEST_MODEL))
    catalog.drop_model(TEST_MODEL, keep_default=True)  # as `Index` does when the weights changed
    make_image(tmp_path / "lib" / "added.png", 40)

    def executor(catalog, model, todo, gone, report, progress, should_stop):
        files = [
            IndexedFile(f.path, f.size, f.mtime_ns, fingerprint(f.path), 8, 8, np.ones(16, np.float32)) for f, _ in todo
        ]
        catalog.commit_batch(model, indexed=files)
        report.new += sum(1 for _, is_new in todo if is_new)
        return set()

    report = run_add(catalog, TEST_MODEL, None, [tmp_path / "lib"], executor=executor, stale=stale)
    assert (report.stale, report.new, report.changed, report.unchanged) == (4, 1, 0, 0)


def test_a_second_root_linked_to_the_first_keeps_its_files(tmp_path, catalog, add):
    """``index lib`` and ``index lib-link`` each index the photos under their own paths; a run
    naming both had marked every file under the link removed (and the next, both again in the
    other order, 'moved' them back)."""
    make_library(tmp_path / "lib", 3)
    (tmp_path / "link").symlink_to(tmp_path / "lib", target_is_directory=True)
    add(tmp_path / "lib")
    add(tmp_path / "link")
    report = add(tmp_path / "lib", tmp_path / "link")
    assert counts(report) == dict(new=0, changed=0, moved=0, copied=0, removed=0, failed=0, unchanged=6)
    assert catalog.counts() == {"indexed": 6, "failed": 0, "missing": 0}
    report = add(tmp_path / "link", tmp_path / "lib")
    assert counts(report) == dict(new=0, changed=0, moved=0, copied=0, removed=0, failed=0, unchanged=6)


def test_the_index_inside_the_folder_indexed_is_not_indexed(tmp_path, catalog, add):
    """``--home ~/photos/index`` then ``index ~/photos``: the web page's thumbnails (WebP files
    in the index's folder) had been indexed as photos, each photo found again as its thumbnail."""
    images = make_library(tmp_path / "lib", 2)
    make_image(tmp_path / "home" / "thumbnails" / "ab" / "ab12.webp", 0)
    report = add(tmp_path)
    assert (report.new, report.failed) == (2, 0)
    assert sorted(catalog.file_states()) == sorted(os.fsencode(p) for p in images)


def test_a_hidden_folder_indexed_by_name_stays_when_its_parent_is_indexed(tmp_path, catalog, add):
    """``index ~/photos/.private`` then ``index ~/photos``: the walk skips hidden folders, and had
    taken their photos for deleted (removed, then encoded again by the next ``index .private``)."""
    hidden = make_library(tmp_path / "lib" / ".private", 3)
    make_image(tmp_path / "lib" / "seen.png", 9)
    make_image(tmp_path / "lib" / ".one.png", 10)
    add(tmp_path / "lib" / ".private")
    add(tmp_path / "lib" / ".one.png")
    report = add(tmp_path / "lib")
    assert (report.new, report.removed) == (1, 0)
    assert catalog.counts() == {"indexed": 5, "failed": 0, "missing": 0}
    hidden[0].unlink()  # gone, in a folder the walk skips: left as indexed, as with --exclude
    assert add(tmp_path / "lib").removed == 0
    assert add(tmp_path / "lib" / ".private").removed == 1


def test_a_linked_folder_indexed_by_name_stays_when_its_parent_is_indexed(tmp_path, catalog, add):
    """``index ~/Pictures/Phone`` (a link to the card) then ``index ~/Pictures``, which does not
    follow links: the card's photos had been counted removed."""
    make_library(tmp_path / "card", 3)
    make_image(tmp_path / "lib" / "seen.png", 9)
    (tmp_path / "lib" / "Phone").symlink_to(tmp_path / "card", target_is_directory=True)
    add(tmp_path / "lib" / "Phone")
    report = add(tmp_path / "lib")
    assert (report.new, report.removed) == (1, 0)
    assert catalog.counts() == {"indexed": 4, "failed": 0, "missing": 0}
    (tmp_path / "lib" / "Phone").unlink()  # the link gone: so are its files, from there
    assert add(tmp_path / "lib").removed == 3
