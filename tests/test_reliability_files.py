"""Files that change under the indexer, seen from outside (real `clipsearch` processes), and the
indexer's own reading of files: each file is opened once, without ever blocking, and
fingerprinted once (issue 18 item 3, issue 10 item 6)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import numpy as np
import pytest
from helpers import make_image, make_library
from reliability_helpers import assert_no_traceback, catalog_rows, start_cli

import clipsearch.decode
import clipsearch.fingerprint
import clipsearch.indexer
from clipsearch.index import Index

RUN_TIMEOUT_S = 60  # a run over a few tiny images takes seconds; a hung one never ends


def run_to_the_end(process: subprocess.Popen, fifo: str) -> tuple[int | None, bytes, bytes]:
    """The process's exit status and output, or None as status if it was still running after
    RUN_TIMEOUT_S: then the FIFO is opened for writing (ending any read blocked on it) and the
    process group killed, so that nothing outlives the test."""
    try:
        out, err = process.communicate(timeout=RUN_TIMEOUT_S)
        return process.returncode, out, err
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):  # no reader at this instant
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        os.killpg(process.pid, 9)
        out, err = process.communicate()
        return None, out, err


def index_with_swap(home, lib, tiny_model, victim: str, at: str, *extra: str) -> tuple[int | None, bytes, bytes]:
    process = start_cli(
        "--home",
        home,
        "index",
        lib,
        "--model",
        tiny_model,
        "--precision",
        "fp32",
        *extra,
        env={"RELIABILITY_SWAP_FOR_FIFO": victim, "RELIABILITY_SWAP_AT": at},
    )
    return run_to_the_end(process, os.path.join(lib, victim))


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_file_swapped_for_a_fifo_as_its_decode_starts_does_not_hang_the_decoder(tmp_path, tiny_model, workers):
    """The file is replaced by a FIFO as the image decoder starts on it: a decoder that opened
    the name again would block for ever (in the main process with --workers 0)."""
    lib = tmp_path / "lib"
    make_library(lib, 4)
    make_image(lib / "victim.png", seed=99)
    code, out, err = index_with_swap(tmp_path / "home", lib, tiny_model, "victim.png", "decode", "--workers", workers)
    assert code is not None, f"the run hung on a FIFO (stderr: {err.decode(errors='replace')})"
    assert_no_traceback(out, err)
    assert code == 0, err
    rows = catalog_rows(tmp_path / "home")
    assert [status for status, _ in rows.values()] == ["indexed"] * 5  # read from the file it opened


@pytest.mark.slow
def test_a_moved_file_swapped_for_a_fifo_after_its_fingerprint_does_not_hang_the_run(tmp_path, tiny_model):
    """A copy of an indexed file takes that file's vector without being decoded: the header that
    gives its size is read from the file already open, not by opening the name again."""
    lib = tmp_path / "lib"
    make_library(lib, 4)
    home = tmp_path / "home"
    with Index.open(home, model=tiny_model, precision="fp32") as index:
        index.add([lib], workers=0)
    shutil.copy(lib / "part0" / "img0000.png", lib / "copy.png")
    code, out, err = index_with_swap(home, lib, tiny_model, "copy.png", "fingerprint", "--workers", "0")
    assert code is not None, f"the run hung on a FIFO (stderr: {err.decode(errors='replace')})"
    assert_no_traceback(out, err)
    assert code == 0 and b"moved 0, copied 1" in out, (out, err)


# --- each file opened once, fingerprinted once ---------------------------------------------


@pytest.fixture
def reads(monkeypatch):
    """Counts, per path, the fingerprints computed and the opens of the file, in this process."""
    counts: dict[str, dict[bytes, int]] = {"fingerprint": {}, "open": {}}
    real_fingerprint, real_open = clipsearch.fingerprint.fingerprint, os.open

    def counting_fingerprint(source):
        path = os.fsencode(os.readlink(f"/proc/self/fd/{source.fileno()}")) if hasattr(source, "fileno") else source
        counts["fingerprint"][os.fsencode(path)] = counts["fingerprint"].get(os.fsencode(path), 0) + 1
        return real_fingerprint(source)

    def counting_open(path, *args, **kwargs):
        if isinstance(path, (str, bytes)) and os.fsencode(path).endswith(b".png"):
            counts["open"][os.fsencode(path)] = counts["open"].get(os.fsencode(path), 0) + 1
        return real_open(path, *args, **kwargs)

    for module in (clipsearch.decode, clipsearch.indexer):
        if hasattr(module, "fingerprint"):
            monkeypatch.setattr(module, "fingerprint", counting_fingerprint)
    monkeypatch.setattr(os, "open", counting_open)
    return counts


def test_a_new_file_is_opened_and_fingerprinted_once(tmp_path, tiny_model, reads):
    images = [os.fsencode(p) for p in make_library(tmp_path / "lib", 6)]
    with Index.open(tmp_path / "home", model=tiny_model, precision="fp32") as index:
        report = index.add([tmp_path / "lib"], workers=0)
    assert report.new == 6
    assert reads["fingerprint"] == dict.fromkeys(images, 1)
    assert reads["open"] == dict.fromkeys(images, 1)


def test_a_moved_file_is_opened_and_fingerprinted_once_and_never_decoded(tmp_path, tiny_model, reads, monkeypatch):
    images = make_library(tmp_path / "lib", 4)
    with Index.open(tmp_path / "home", model=tiny_model, precision="fp32") as index:
        index.add([tmp_path / "lib"], workers=0)
        moved = tmp_path / "lib" / "moved.png"
        images[0].rename(moved)
        reads["fingerprint"].clear()
        reads["open"].clear()
        decoded = []
        real_decode = clipsearch.decode.decode_file
        monkeypatch.setattr(clipsearch.decode, "decode_file", lambda *a, **k: decoded.append(a) or real_decode(*a, **k))
        report = index.add([tmp_path / "lib"], workers=0)
    assert (report.moved, report.new) == (1, 0)  # a rename: the old row goes, nothing counted removed
    assert decoded == []
    assert reads["fingerprint"] == {os.fsencode(moved): 1}
    assert reads["open"] == {os.fsencode(moved): 1}


def test_a_new_file_the_size_of_an_indexed_one_is_fingerprinted_once(tmp_path, tiny_model, reads):
    """Only a file the size of one already indexed can be a copy of it: that one is fingerprinted
    before decoding, to look for a vector to reuse, and the decoder takes that fingerprint."""
    lib = tmp_path / "lib"
    first = make_library(lib, 1)[0]
    with Index.open(tmp_path / "home", model=tiny_model, precision="fp32") as index:
        index.add([lib], workers=0)
        same_size = lib / "same-size.png"
        data = bytearray(first.read_bytes())
        data[-20] ^= 0xFF  # same size, other content (a damaged copy: it fails to decode)
        same_size.write_bytes(bytes(data))
        reads["fingerprint"].clear()
        report = index.add([lib], workers=0)
    assert (report.moved, report.new + report.failed) == (0, 1)
    assert reads["fingerprint"] == {os.fsencode(same_size): 1}
    assert catalog_rows(tmp_path / "home")[os.fsencode(same_size)][0] in ("indexed", "failed")


# --- content changed with size and mtime kept ----------------------------------------------


def rewrite_keeping_size_and_mtime(path, seed: int) -> None:
    """New pixels in a BMP of the same dimensions (so the same size), the mtime put back, as an
    editor that preserves timestamps or `cp -p` over a same-size file does."""
    st = os.stat(path)
    make_image(path, seed)
    assert os.stat(path).st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_index_verify_finds_content_changed_with_size_and_mtime_kept(tmp_path, tiny_model, tiny_encoder):
    """A plain run cannot see such a change (documented); --verify fingerprints every file and
    re-encodes the ones whose content is not what was indexed."""
    from reliability_helpers import catalog_vectors, expected_vectors, run_cli

    images = [make_image(tmp_path / "lib" / f"photo{i}.bmp", i) for i in range(4)]
    home = tmp_path / "home"
    base = ["--home", home, "index", tmp_path / "lib", "--model", tiny_model, "--precision", "fp32", "--workers", "0"]
    assert run_cli(*base).returncode == 0
    rewrite_keeping_size_and_mtime(images[1], seed=50)
    plain = run_cli(*base)
    assert b"changed 0" in plain.stdout and b"unchanged 4" in plain.stdout  # the limit --verify is for
    verified = run_cli(*base, "--verify")
    assert verified.returncode == 0, verified.stderr
    assert b"changed 1," in verified.stdout and b"unchanged 3" in verified.stdout
    assert b"4 unchanged-looking file(s) verified" in verified.stdout
    stored = catalog_vectors(home)[os.fsencode(images[1])]
    truth = expected_vectors(tiny_encoder, [images[1]])[os.fsencode(images[1])]
    np.testing.assert_allclose(stored, truth, atol=2e-3)
    again = run_cli(*base, "--verify")
    assert b"changed 0" in again.stdout and b"unchanged 4" in again.stdout
