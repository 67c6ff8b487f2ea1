"""Bad input: a generated corpus of broken, odd and hostile files, and files that change under
the indexer. Whatever the files, the run completes, good images are indexed (upright, first
frame), bad ones are recorded as failed with a reason `status --failed` shows, and no traceback
reaches the user. Timing cases (a file deleted or rewritten mid-run) are made deterministic by
hooking the indexer in-process, where the race would otherwise be luck."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from helpers import bump_mtime, make_image, make_library
from PIL import Image
from reliability_helpers import (
    CORRUPT_EXIF,
    IS_ROOT,
    ROOT_SKIP_REASON,
    assert_no_traceback,
    blocks,
    catalog_rows,
    catalog_vectors,
    decompression_bomb,
    encoded_bytes,
    expected_vectors,
    large_png,
    run_cli,
    with_app1,
    write_corpus,
)
from typer.testing import CliRunner

import clipsearch.decode
import clipsearch.fingerprint
import clipsearch.indexer
from clipsearch.cli import EXIT_SOME_FAILED, app
from clipsearch.decode import decode_file
from clipsearch.index import Index


@pytest.fixture
def cli(tmp_path, tiny_model):
    """Run `clipsearch --home HOME ...` in this process (so hooks apply); `index` gets the tiny
    model, fp32 (exact vectors) and in-process decoding unless the test says otherwise."""
    runner = CliRunner()
    home = tmp_path / "home"

    def run(*args, **kwargs):
        args = [os.fsdecode(a) for a in args]
        if args[0] == "index":
            args += ["--model", tiny_model, "--precision", "fp32"]
            if "--workers" not in args:
                args += ["--workers", "0"]
        return runner.invoke(app, ["--home", str(home), *args], **kwargs)

    run.home = home
    return run


def summary_counts(output: str) -> dict[str, int]:
    """The numbers of the index summary line: {"new": 3, "failed": 1, ...}."""
    return {name: int(n) for name, n in re.findall(r"\b(new|changed|moved|removed|failed|unchanged) (\d+)", output)}


def failures_listed(stdout: bytes) -> dict[bytes, str]:
    """`status --failed` output (``path: reason`` a line) as path -> reason."""
    listed = {}
    for line in stdout.splitlines():
        path, _, reason = line.partition(b": ")
        listed[path] = reason.decode()
    return listed


def check_corpus_outcome(home, cases, stdout: str, stderr: str, exit_code: int) -> None:
    good = [c for c in cases if c.indexed]
    bad = [c for c in cases if not c.indexed]
    assert_no_traceback(stdout, stderr)
    assert exit_code == EXIT_SOME_FAILED, stderr
    counts = summary_counts(stdout)
    assert (counts["new"], counts["failed"]) == (len(good), len(bad)), stdout
    assert "status --failed" in stdout
    rows = catalog_rows(home)
    assert sorted(rows) == sorted(c.path for c in cases)
    for case in cases:
        status, error = rows[case.path]
        if case.indexed:
            assert (case.name, status, error) == (case.name, "indexed", None)
        else:
            assert (case.name, status) == (case.name, "failed")
            assert re.search(case.reason, error, re.IGNORECASE), (case.name, error)
            assert "\n" not in error and "Traceback" not in error, (case.name, error)


def test_corpus_through_the_cli(cli, tmp_path):
    cases = write_corpus(tmp_path / "lib")
    result = cli("index", tmp_path / "lib")
    check_corpus_outcome(cli.home, cases, result.stdout, result.stderr, result.exit_code)

    listed = cli("status", "--failed")
    assert listed.exit_code == 0 and listed.stderr == ""
    bad = {c.path: c for c in cases if not c.indexed}
    reasons = failures_listed(listed.stdout_bytes)
    assert sorted(reasons) == sorted(bad)
    for path, reason in reasons.items():
        assert re.search(bad[path].reason, reason, re.IGNORECASE), (bad[path].name, reason)

    status = cli("status")
    assert f"{len(cases) - len(bad)} indexed, {len(bad)} failed, 0 missing" in status.stdout
    assert "consistent with the catalog" in status.stdout and "NOT" not in status.stdout

    again = cli("index", tmp_path / "lib")  # failures are not retried while unchanged, and it says so
    assert summary_counts(again.stdout)["unchanged"] == len(cases), again.stdout
    assert f"; {len(bad)} unchanged file(s) failed before (`--retry-failed` to try them again)" in again.stdout


@pytest.mark.slow
def test_corpus_through_a_cli_process_with_decode_workers(tmp_path, tiny_model):
    """Worker processes decode the same corpus: their failures come back as reasons, and their
    stderr (which an in-process runner cannot capture) carries no traceback either."""
    cases = write_corpus(tmp_path / "lib")
    home = tmp_path / "home"
    result = run_cli(
        "--home",
        home,
        "index",
        tmp_path / "lib",
        "--model",
        tiny_model,
        "--precision",
        "fp32",
        "--workers",
        "2",
        "--batch-size",
        "4",
    )
    check_corpus_outcome(home, cases, result.stdout.decode(), result.stderr.decode(), result.returncode)


def test_odd_images_are_indexed_as_they_are_shown(cli, tmp_path, tiny_encoder):
    """EXIF rotation is applied (the rotated file's vector is the upright one's, and its size is
    recorded upright); animated GIFs and multi-page TIFFs give their first frame; a 1x50000 strip
    and a corrupt EXIF block are indexed with their true size."""
    cases = write_corpus(tmp_path / "lib")
    cli("index", tmp_path / "lib")
    lib = os.fsencode(tmp_path / "lib") + b"/"
    vectors = catalog_vectors(cli.home)
    np.testing.assert_array_equal(vectors[lib + b"animated.gif"], vectors[lib + b"frame0.png"])
    np.testing.assert_array_equal(vectors[lib + b"pages.tiff"], vectors[lib + b"frame0.png"])

    # The same picture lying on its side, without the EXIF tag, is what a reader that ignores
    # the orientation would have indexed.
    sideways = tmp_path / "sideways.png"
    blocks(6, (64, 96)).transpose(Image.Transpose.ROTATE_90).save(sideways)
    (sideways_vector,) = expected_vectors(tiny_encoder, [sideways]).values()
    rotated, upright = vectors[lib + b"exif-rotated.jpg"], vectors[lib + b"upright.jpg"]
    # A random model puts every picture close together: compare distances, not a threshold.
    assert np.linalg.norm(rotated - upright) * 5 < np.linalg.norm(rotated - sideways_vector)

    sizes = dict(_sizes(cli.home))
    assert sizes[lib + b"exif-rotated.jpg"] == (64, 96)  # stored 96x64, shown 64x96
    assert sizes[lib + b"strip.png"] == (1, 50_000)
    assert sizes[lib + b"corrupt-exif.jpg"] == (128, 96)
    assert sizes[lib + b"grey16.png"] == (64, 48)
    assert len(cases) == len(_sizes(cli.home)) + sum(not c.indexed for c in cases)


def _sizes(home):
    import sqlite3

    with sqlite3.connect(f"file:{home / 'catalog.db'}?mode=ro", uri=True) as conn:
        return [
            (p, (w, h)) for p, w, h in conn.execute("SELECT path, width, height FROM images WHERE status='indexed'")
        ]


# Decodes each file named on its command line in a fresh process, after a warm-up decode, under
# an address-space cap of what it uses then + 512 MB (a larger allocation raises MemoryError);
# prints per file: the error, the upright size, seconds taken and peak memory growth in MB.
_MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys, time
    from clipsearch.clip.preprocess import Preprocess
    from clipsearch.decode import decode_file

    def vm_bytes():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))

    preprocess = Preprocess(224)
    decode_file(preprocess, sys.argv[1].encode())  # imports and first-use costs
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + (512 << 20), resource.RLIM_INFINITY))
    for path in sys.argv[2:]:
        peak, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
        result = decode_file(preprocess, path.encode())
        elapsed = time.perf_counter() - started
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
        print(json.dumps([path, result.error, result.width, result.height, elapsed, grown_mb]))
""")


@pytest.fixture(scope="module")
def decoded_in_bounded_memory(tmp_path_factory) -> dict[str, tuple]:
    """Files that would take gigabytes if handled naively, decoded by `_MEMORY_PROBE` in one
    process: name -> (error, width, height, seconds, MB grown). The 2 GB files are sparse, so
    the test writes almost nothing to disk."""
    root = tmp_path_factory.mktemp("memory")
    warm = make_image(root / "warm.png", 0)
    (root / "bomb.png").write_bytes(decompression_bomb())
    (root / "81-megapixels.png").write_bytes(large_png(9000, 9000))
    with open(root / "jpeg-then-2GB.jpg", "wb") as f:
        f.write(encoded_bytes(blocks(1, (64, 48)), "JPEG"))
        f.truncate(2 << 30)
    with open(root / "2GB-of-zeros.jpg", "wb") as f:
        f.truncate(2 << 30)
    os.symlink("/dev/zero", root / "dev-zero.jpg")
    os.symlink("/dev/urandom", root / "dev-urandom.png")
    names = ["bomb.png", "81-megapixels.png", "jpeg-then-2GB.jpg", "2GB-of-zeros.jpg"]
    names += ["dev-zero.jpg", "dev-urandom.png"]
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, warm, *(str(root / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in out.stdout.splitlines()]
    return {os.path.basename(path): tuple(rest) for path, *rest in results}


def test_decompression_bomb_is_refused_from_its_header_without_allocating(decoded_in_bounded_memory):
    """A 70-byte file declaring 40000x40000 pixels (4.8 GB decoded) is refused at once, with
    the process's peak memory growing by less than 50 MB."""
    error, _, _, seconds, grown_mb = decoded_in_bounded_memory["bomb.png"]
    assert "decompression bomb" in error and "bomb.png" in error
    assert seconds < 1.0 and grown_mb < 50


def test_an_image_over_the_pixel_budget_is_refused_from_its_header(decoded_in_bounded_memory):
    """9000 x 9000, under Pillow's bomb limit: decoding it took 81 MB, then 243 MB as RGB, in
    each worker (a 13000 x 13000 WebP took 3.1 GB). Refused before its pixels are read."""
    error, _, _, seconds, grown_mb = decoded_in_bounded_memory["81-megapixels.png"]
    assert "is 81 megapixels, more than the 48 allowed" in error and "CLIPSEARCH_MAX_MEGAPIXELS" in error
    assert seconds < 1.0 and grown_mb < 50


def test_the_pixel_budget_is_configurable_and_counts_pixels_as_decoded(tmp_path, monkeypatch):
    """With a budget of 0.05 megapixels, a 400 x 300 PNG is refused, while a JPEG or JPEG 2000 of
    the same size passes: they are decoded at 1/8 and 1/4 of it for a 32-pixel model."""
    from clipsearch.clip.preprocess import Preprocess

    picture = blocks(3, (400, 300))
    for fmt in ("PNG", "JPEG", "JPEG2000"):
        (tmp_path / f"picture.{fmt.lower()}").write_bytes(encoded_bytes(picture, fmt))
    monkeypatch.setenv("CLIPSEARCH_MAX_MEGAPIXELS", "0.05")
    formats = ("PNG", "JPEG", "JPEG2000")
    decoded = {fmt: decode_file(Preprocess(32), os.fsencode(tmp_path / f"picture.{fmt.lower()}")) for fmt in formats}
    assert "0 megapixels, more than the 0.05 allowed" in decoded["PNG"].error
    assert (decoded["JPEG"].error, decoded["JPEG"].width, decoded["JPEG"].height) == (None, 400, 300)
    assert (decoded["JPEG2000"].error, decoded["JPEG2000"].width, decoded["JPEG2000"].height) == (None, 400, 300)
    monkeypatch.setenv("CLIPSEARCH_MAX_MEGAPIXELS", "0.2")
    assert decode_file(Preprocess(32), os.fsencode(tmp_path / "picture.png")).error is None


def test_a_huge_file_costs_what_its_image_costs(decoded_in_bounded_memory):
    """A 2 GB file named .jpg (a JPEG with a huge tail, a renamed disk image) is not read whole:
    three workers doing that would take 6 GB."""
    assert decoded_in_bounded_memory["jpeg-then-2GB.jpg"][:3] == (None, 64, 48)  # readers stop at its end
    error = decoded_in_bounded_memory["2GB-of-zeros.jpg"][0]
    assert "cannot be decoded" in error and "MemoryError" not in error


def test_links_to_endless_devices_fail_in_bounded_memory(decoded_in_bounded_memory):
    """/dev/zero and /dev/urandom behind image names: reading them to the end would never end."""
    for name in ("dev-zero.jpg", "dev-urandom.png"):
        error, _, _, seconds, grown_mb = decoded_in_bounded_memory[name]
        assert "not a regular file" in error, (name, error)
        assert seconds < 5 and grown_mb < 100, name


def test_a_fifo_named_like_an_image_does_not_hang_the_run(tmp_path, tiny_model):
    """Run in a thread with a watchdog: if the run is still going after 10 s, the FIFO is opened
    for writing and closed (which ends any read blocked on it) and the test fails."""
    make_library(tmp_path / "lib", 2)
    fifo = tmp_path / "lib" / "pipe.jpg"
    os.mkfifo(fifo)
    outcome = {}

    def index():
        with Index.open(tmp_path / "home", model=tiny_model, precision="fp32") as idx:
            outcome["report"] = idx.add([tmp_path / "lib"], workers=0)

    worker = threading.Thread(target=index, daemon=True)
    worker.start()
    worker.join(10)
    hung = worker.is_alive()
    while worker.is_alive():  # unblock it, so it does not outlive the test
        with contextlib.suppress(OSError):  # no reader at this instant
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(0.1)
    assert not hung, "the run hung on a FIFO named pipe.jpg"
    assert (outcome["report"].new, outcome["report"].failed) == (2, 1)


# --- files that change under the indexer ------------------------------------------------------


def _hook_decode(monkeypatch, before_decode):
    """Call ``before_decode(path)`` just before each in-process decode (after the walk and any
    probe), making a race that is otherwise luck happen every time."""
    real = clipsearch.decode.decode_file

    def hooked(preprocess, path, probe=None):
        before_decode(path)
        return real(preprocess, path, probe)

    monkeypatch.setattr(clipsearch.decode, "decode_file", hooked)


def test_a_file_deleted_between_the_walk_and_its_decode(cli, tmp_path, monkeypatch):
    images = make_library(tmp_path / "lib", 4)
    victim = os.fsencode(images[1])
    _hook_decode(monkeypatch, lambda path: os.unlink(path) if path == victim else None)
    result = cli("index", tmp_path / "lib")
    assert_no_traceback(result.stdout, result.stderr)
    assert (summary_counts(result.stdout)["new"], summary_counts(result.stdout)["failed"]) == (3, 1)
    rows = catalog_rows(cli.home)
    assert rows[victim][0] == "failed" and re.search("No such file|does not exist", rows[victim][1])
    assert [r[0] for p, r in rows.items() if p != victim] == ["indexed"] * 3
    monkeypatch.undo()
    assert summary_counts(cli("index", tmp_path / "lib").stdout)["removed"] == 1  # next run: gone
    assert catalog_rows(cli.home)[victim][0] == "missing"
    assert cli("status", "--failed").stdout == ""


def test_a_file_deleted_between_the_walk_and_its_probe(cli, tmp_path, monkeypatch):
    """A new file the size of an indexed one is probed (fingerprinted) for a vector to reuse
    before any decoder sees it: deleted just before that."""
    images = make_library(tmp_path / "lib", 4)
    cli("index", tmp_path / "lib")
    victim = os.fsencode(tmp_path / "lib" / "copy.png")
    shutil.copy(images[2], os.fsdecode(victim))
    real = clipsearch.decode.probe_file

    def vanishing(path):
        if path == victim:
            os.unlink(path)
        return real(path)

    monkeypatch.setattr(clipsearch.indexer, "probe_file", vanishing)
    result = cli("index", tmp_path / "lib")
    assert_no_traceback(result.stdout, result.stderr)
    assert summary_counts(result.stdout)["failed"] == 1
    assert catalog_rows(cli.home)[victim] == ("failed", "No such file or directory")


def test_a_file_caught_half_written_fails_then_indexes_once_complete(cli, tmp_path, monkeypatch):
    images = make_library(tmp_path / "lib", 3, ext=".jpg")
    target = os.fsencode(images[0])
    complete = encoded_bytes(blocks(501, (200, 150)), "JPEG")

    def half_written(path):
        if path == target:
            with open(path, "wb") as f:
                f.write(complete[: len(complete) // 2])

    _hook_decode(monkeypatch, half_written)
    first = cli("index", tmp_path / "lib")
    assert summary_counts(first.stdout)["failed"] == 1
    assert catalog_rows(cli.home)[target][0] == "failed"
    monkeypatch.undo()
    with open(target, "wb") as f:  # the writer finishes
        f.write(complete)
    bump_mtime(target)
    again = cli("index", tmp_path / "lib")
    assert (summary_counts(again.stdout)["changed"], summary_counts(again.stdout)["failed"]) == (1, 0)
    assert catalog_rows(cli.home)[target] == ("indexed", None)


def _hook_after_fingerprint(monkeypatch, after):
    """Call ``after(path)`` inside the decoder, between its fingerprint of the file and its
    reading of the pixels: the moment a rewrite could pair one content's fingerprint with
    another's vector."""
    real = clipsearch.decode.fingerprint

    def hooked(file):
        digest = real(file)
        after(os.fsencode(os.readlink(f"/proc/self/fd/{file.fileno()}")))
        return digest

    monkeypatch.setattr(clipsearch.decode, "fingerprint", hooked)


@pytest.mark.parametrize("moment", ["before its decode", "between its fingerprint and its pixels"])
def test_a_rewrite_during_indexing_never_gives_any_file_a_wrong_vector(
    cli, tmp_path, monkeypatch, tiny_encoder, moment
):
    """Whenever the rewrite lands, the run after it stores the new content's vector for the file,
    and a copy of the old content (restored from a backup) gets the old content's vector, not
    one read from the rewritten file."""
    images = make_library(tmp_path / "lib", 3)
    target = os.fsencode(images[0])
    original = images[0].read_bytes()

    def rewrite(path):
        if path == target and images[0].read_bytes() == original:
            make_image(path, seed=500)
            bump_mtime(path)

    (_hook_decode if moment == "before its decode" else _hook_after_fingerprint)(monkeypatch, rewrite)
    first = cli("index", tmp_path / "lib")
    if moment != "before its decode":  # caught in the act: failed now, retried next run
        assert summary_counts(first.stdout)["failed"] == 1
        assert "changed while it was being read" in catalog_rows(cli.home)[target][1]
    monkeypatch.undo()
    backup = tmp_path / "lib" / "backup-of-the-original.png"
    backup.write_bytes(original)
    again = cli("index", tmp_path / "lib")
    assert summary_counts(again.stdout)["changed"] == 1
    stored = catalog_vectors(cli.home)
    truth = expected_vectors(tiny_encoder, [target, backup])
    for path in (target, os.fsencode(backup)):
        np.testing.assert_allclose(stored[path], truth[path], atol=2e-3, err_msg=os.fsdecode(path))


# --- permissions, links, names ---------------------------------------------------------------


@pytest.mark.skipif(IS_ROOT, reason=ROOT_SKIP_REASON + "; test_unreadable_file_simulated covers the code path")
def test_unreadable_file(cli, tmp_path):
    make_library(tmp_path / "lib", 2)
    locked = tmp_path / "lib" / "locked.png"
    make_image(locked, 9)
    locked.chmod(0)
    try:
        result = cli("index", tmp_path / "lib")
        assert summary_counts(result.stdout)["failed"] == 1
        status, reason = catalog_rows(cli.home)[os.fsencode(locked)]
        assert status == "failed" and "Permission denied" in reason
    finally:
        locked.chmod(0o644)


@pytest.mark.parametrize("when", ["from the start", "once the decoder has it"])
def test_unreadable_file_simulated(cli, tmp_path, monkeypatch, when):
    """What a file without read permission does to a non-root user, made to happen as root:
    opening it raises PermissionError, either from the start or only once the decoder opens it
    (its permissions changed during the run)."""
    make_library(tmp_path / "lib", 2)
    locked = tmp_path / "lib" / "locked.png"
    make_image(locked, 9)
    denied = {os.fsencode(locked)} if when == "from the start" else set()
    real_open = os.open

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and os.fsencode(file) in denied:
            raise PermissionError(13, "Permission denied", os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    _hook_decode(monkeypatch, lambda path: denied.add(path) if path == os.fsencode(locked) else None)
    result = cli("index", tmp_path / "lib")
    assert_no_traceback(result.stdout, result.stderr)
    assert (summary_counts(result.stdout)["new"], summary_counts(result.stdout)["failed"]) == (2, 1)
    status, reason = catalog_rows(cli.home)[os.fsencode(locked)]
    assert status == "failed" and "Permission denied" in reason


@pytest.mark.parametrize("follow", [False, True])
def test_folder_symlink_loops_end_and_index_each_file_once(cli, tmp_path, follow):
    make_library(tmp_path / "lib", 4)
    os.symlink(tmp_path / "lib", tmp_path / "lib" / "part0" / "back-to-top")
    os.symlink("..", tmp_path / "lib" / "part1" / "up")
    args = ["index", tmp_path / "lib"] + (["--follow-symlinks"] if follow else [])
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert summary_counts(result.stdout)["new"] == 4
    assert len(catalog_rows(cli.home)) == 4


def test_a_symlink_to_an_image_is_indexed_under_the_links_name(cli, tmp_path):
    (image,) = make_library(tmp_path / "lib", 1)
    os.symlink(image, tmp_path / "lib" / "alias.png")
    assert cli("index", tmp_path / "lib").exit_code == 0
    assert catalog_rows(cli.home)[os.fsencode(tmp_path / "lib" / "alias.png")] == ("indexed", None)


def test_awkward_names_come_back_byte_for_byte_from_queries(cli, tmp_path):
    """Names with spaces, quotes, newlines and invalid UTF-8 are stored and returned exactly:
    `--paths-only --null` output is the bytes on disk."""
    lib = os.fsencode(tmp_path / "lib")
    names = [b"two words.png", b'it\'s "quoted".png', b"line\nbreak.png", b"caf\xe9.png", b"tab\there.png"]
    for seed, name in enumerate(names):
        make_image(os.path.join(lib, name), seed)
    assert summary_counts(cli("index", tmp_path / "lib").stdout)["new"] == len(names)
    for name in names:
        query = os.path.join(lib, name)
        result = cli("query", os.fsdecode(query), "-k", "1", "--paths-only", "--null")
        assert result.exit_code == 0, result.output
        assert result.stdout_bytes == query + b"\0"


def test_summary_and_status_say_how_many_failed(cli, tmp_path):
    make_library(tmp_path / "lib", 3)
    (tmp_path / "lib" / "a.jpg").write_bytes(b"")
    (tmp_path / "lib" / "b.png").write_bytes(b"not a png")
    result = cli("index", tmp_path / "lib")
    assert re.search(r"\bfailed 2\b", result.stdout), result.stdout
    assert "clipsearch status --failed" in result.stdout
    assert "3 indexed, 2 failed" in cli("status").stdout


def test_exit_status_says_that_files_failed(cli, tmp_path):
    make_library(tmp_path / "lib", 3)
    (tmp_path / "lib" / "a.jpg").write_bytes(b"")
    assert cli("index", tmp_path / "lib").exit_code == EXIT_SOME_FAILED
    assert cli("index", tmp_path / "lib").exit_code == 0  # nothing failed in this run
    make_library(tmp_path / "clean", 2, start_seed=10)
    assert cli("index", tmp_path / "clean").exit_code == 0


def test_decoder_warnings_do_not_reach_the_terminal(cli, tmp_path):
    (tmp_path / "lib").mkdir()
    jpeg = encoded_bytes(blocks(0, (128, 96)), "JPEG")
    (tmp_path / "lib" / "corrupt-exif.jpg").write_bytes(with_app1(jpeg, CORRUPT_EXIF))
    result = cli("index", tmp_path / "lib")
    assert result.exit_code == 0
    assert "Warning" not in result.stderr and "warnings.warn" not in result.stderr, result.stderr


def test_a_file_named_like_sql_is_indexed_and_found(cli, tmp_path):
    lib = tmp_path / "lib"
    names = ["'; DROP TABLE images; --.jpg", '" OR 1=1 --.png', "100%_off.png", "x'); DELETE FROM vectors; --.png"]
    for seed, name in enumerate(names):
        make_image(lib / name, seed, fmt="PNG")
    make_library(lib, 2, start_seed=50)
    assert summary_counts(cli("index", lib).stdout)["new"] == len(names) + 2
    for name in names:
        result = cli("query", str(lib / name), "-k", "1", "--paths-only")
        assert result.stdout_bytes == os.fsencode(lib / name) + b"\n", result.output
    assert "6 indexed" in cli("status").stdout
    # LIKE wildcards in a folder name match only that folder
    shutil.copytree(lib, tmp_path / "a_%")
    shutil.copytree(lib, tmp_path / "ab%x")
    cli("index", tmp_path / "a_%", tmp_path / "ab%x")
    assert cli("remove", tmp_path / "a_%").stdout.startswith("Removed 6 file(s)")
    assert "12 indexed" in cli("status").stdout
