"""Helpers for the reliability tests: a corpus of awkward and broken files, generated at test
time, and ways to look at an index from the outside (a subprocess CLI, raw SQLite).

Every file of the corpus is a `Case` that says what clipsearch must do with it: index it, or
record it as failed with a reason matching a pattern. Good files are built from blocks of a few
colours (as `helpers.make_image` does), so GIF palettes and TIFF pages hold their pixels exactly
and "the first frame was indexed" can be checked by comparing vectors for equality.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
ROOT_SKIP_REASON = (
    "running as root (euid 0): file permissions do not stop root from reading, so this case cannot happen"
)


@dataclass(frozen=True)
class Case:
    name: str  # how docs/reliability.md names the case
    path: bytes  # absolute, as the catalog stores it
    indexed: bool  # True: must be indexed; False: must be recorded as failed
    reason: str | None = None  # regex the failure reason must match (failed cases)


def blocks(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A distinct RGB image per seed: 4x4 blocks of random colour (16 colours at most)."""
    colours = np.random.default_rng(seed).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(colours).resize(size, Image.NEAREST)


def encoded_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
    """A 70-byte PNG whose header declares ``width`` x ``height`` RGB pixels (4.8 GB at the
    default): decoding it would allocate all of that, so it must be refused from the header."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def large_png(width: int, height: int) -> bytes:
    """A valid greyscale PNG of ``width`` x ``height`` black pixels, compressed row by row (a
    9000 x 9000 one is 80 KB, made without holding its 81 MB of pixels)."""
    compressor, row, chunks = zlib.compressobj(9), b"\0" * (width + 1), []
    for _ in range(height):
        chunks.append(compressor.compress(row))
    chunks.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", b"".join(chunks))
        + png_chunk(b"IEND", b"")
    )


def with_broken_header_crc(png: bytes) -> bytes:
    """The PNG with its IHDR checksum flipped: the header can no longer be trusted."""
    crc = png.index(b"IHDR") + 4 + 13
    return png[:crc] + bytes([png[crc] ^ 0xFF]) + png[crc + 1 :]


def with_corrupt_pixel_data(png: bytes) -> bytes:
    """The PNG with zeros written over the middle of its compressed pixel data."""
    start = png.index(b"IDAT")
    length = struct.unpack(">I", png[start - 4 : start])[0]
    middle = start + 4 + length // 2
    return png[:middle] + bytes(64) + png[middle + 64 :]


def with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """The JPEG with an APP1 (EXIF) segment holding ``payload`` right after its SOI marker."""
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:2] + segment + jpeg[2:]


# An EXIF block whose TIFF header points at an IFD of garbage: readers must ignore it.
CORRUPT_EXIF = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08" + b"\xff" * 40

# Orientation 6: the stored pixels must be turned 90 degrees clockwise to be shown upright.
EXIF_ROTATE_CW = 6


def exif_rotated_jpeg(upright: Image.Image) -> bytes:
    """``upright`` stored lying on its side, with the EXIF orientation that stands it up again."""
    exif = Image.Exif()
    exif[0x0112] = EXIF_ROTATE_CW
    return encoded_bytes(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)


def _write(root: bytes, name: bytes, data: bytes) -> bytes:
    path = os.path.join(root, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def write_corpus(root: Path) -> list[Case]:
    """Write the bad-input corpus into ``root`` (created) and say what must happen to each file.

    The unreadable-file case is only made when not running as root (root reads anything).
    """
    os.makedirs(root, exist_ok=True)
    r = os.fsencode(os.path.abspath(root))
    cases: list[Case] = []

    def good(name: str, filename: bytes, data: bytes) -> None:
        cases.append(Case(name, _write(r, filename, data), True))

    def bad(name: str, filename: bytes, data: bytes, reason: str) -> None:
        cases.append(Case(name, _write(r, filename, data), False, reason))

    photo = blocks(0, (128, 96))
    png = encoded_bytes(photo, "PNG")
    jpeg = encoded_bytes(photo, "JPEG", quality=90)
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8))

    good("plain PNG", b"plain.png", png)
    good("PNG content named .jpg", b"png-named.jpg", encoded_bytes(blocks(2), "PNG"))
    good("1x50000 strip", b"strip.png", encoded_bytes(Image.new("RGB", (1, 50_000), (200, 30, 30)), "PNG"))
    good("CMYK JPEG", b"cmyk.jpg", encoded_bytes(blocks(3).convert("CMYK"), "JPEG", quality=90))
    grey16 = np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21
    good("16-bit greyscale PNG", b"grey16.png", encoded_bytes(Image.fromarray(grey16), "PNG"))
    palette = blocks(4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    good("palette PNG with transparency", b"palette.png", encoded_bytes(palette, "PNG", transparency=0))
    good("LA (grey + alpha) PNG", b"la.png", encoded_bytes(blocks(5).convert("LA"), "PNG"))
    frames = [blocks(10 + i) for i in range(3)]
    good("first frame of the animated GIF, as PNG", b"frame0.png", encoded_bytes(frames[0], "PNG"))
    good(
        "animated GIF",
        b"animated.gif",
        encoded_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
    )
    good("multi-page TIFF", b"pages.tiff", encoded_bytes(frames[0], "TIFF", save_all=True, append_images=frames[1:]))
    upright = blocks(6, (64, 96))  # portrait
    good("upright JPEG (reference for the rotated one)", b"upright.jpg", encoded_bytes(upright, "JPEG", quality=95))
    good("EXIF-rotated JPEG", b"exif-rotated.jpg", exif_rotated_jpeg(upright))
    good("corrupt EXIF block", b"corrupt-exif.jpg", with_app1(jpeg, CORRUPT_EXIF))
    good("name with spaces", b"two words here.png", encoded_bytes(blocks(7), "PNG"))
    good("name with quotes", b'it\'s "quoted".png', encoded_bytes(blocks(8), "PNG"))
    good("name with a newline", b"first\nsecond.png", encoded_bytes(blocks(9), "PNG"))
    good("non-UTF-8 name", b"caf\xe9-\xff.png", encoded_bytes(blocks(20), "PNG"))

    bad("zero-byte file", b"empty.jpg", b"", r"cannot be decoded as an image \(the file is empty\)")
    bad("truncated JPEG (first half)", b"truncated.jpg", jpeg[: len(jpeg) // 2], "truncated")
    bad("text file named .jpg", b"notes.jpg", b"shopping list: eggs, milk\n" * 20, "cannot be decoded")
    bad("PNG with a broken header CRC", b"broken-crc.png", with_broken_header_crc(png), "cannot be decoded")
    bad(
        "PNG with corrupt pixel data",
        b"corrupt-data.png",
        with_corrupt_pixel_data(encoded_bytes(noisy, "PNG")),
        "cannot be decoded",
    )
    bad("decompression bomb (40000x40000 declared)", b"bomb.png", decompression_bomb(), "decompression bomb")

    target = os.path.join(r, b"vanished.png")
    os.symlink(target, os.path.join(r, b"broken-link.png"))
    cases.append(Case("broken symlink", os.path.join(r, b"broken-link.png"), False, "No such file"))
    os.symlink(b"loop.jpg", os.path.join(r, b"loop.jpg"))
    cases.append(
        Case(
            "symlink loop (a link to itself)", os.path.join(r, b"loop.jpg"), False, "Too many levels of symbolic links"
        )
    )
    if not IS_ROOT:
        path = _write(r, b"no-permission.png", encoded_bytes(blocks(21), "PNG"))
        os.chmod(path, 0)
        cases.append(Case("file without read permission", path, False, "Permission denied"))
    return cases


# --- a full disk, a read-only folder -------------------------------------------------------


@contextmanager
def mounted(target: Path, *mount_args: str) -> Iterator[Path]:
    """``mount *mount_args target`` for the duration (root only; the test is skipped where
    mounting is not allowed), unmounted afterwards whatever happens."""
    if not IS_ROOT or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to create a real filesystem for this case")
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", *mount_args, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount is not permitted here: {done.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


def remount(target: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(target)], check=True, capture_output=True)


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make ``folder`` read-only for this process: chmod for a normal user; for root, whom
    permissions do not stop, a read-only bind mount of the folder onto itself (writes then fail
    with EROFS, exactly as on a read-only disk)."""
    if not IS_ROOT:
        modes = {p: p.stat().st_mode for p in [folder, *folder.iterdir()]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    with mounted(folder, "--bind", str(folder)):
        remount(folder, "ro,bind")
        yield


# --- looking at an index from outside -------------------------------------------------------


def integrity(home: Path) -> list[str]:
    """SQLite's full check of the catalog, through a separate plain connection."""
    with sqlite3.connect(f"file:{home / 'catalog.db'}?mode=ro", uri=True) as conn:
        return [row[0] for row in conn.execute("PRAGMA integrity_check")]


def catalog_rows(home: Path) -> dict[bytes, tuple[str, str | None]]:
    """path -> (status, error) for every catalog row, read with plain SQLite."""
    with sqlite3.connect(f"file:{home / 'catalog.db'}?mode=ro", uri=True) as conn:
        return {path: (status, error) for path, status, error in conn.execute("SELECT path, status, error FROM images")}


def indexed_count(home: Path) -> int:
    """How many rows are indexed now (0 while the catalog does not exist yet)."""
    if not (home / "catalog.db").exists():
        return 0
    try:
        with sqlite3.connect(f"file:{home / 'catalog.db'}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM images WHERE status = 'indexed'").fetchone()[0]
    except sqlite3.OperationalError:  # schema not created yet
        return 0


# Run as `python -c`: the CLI, optionally with each image batch made to take at least
# ENCODE_DELAY_S seconds, as a real model on a CPU does. The tiny test model encodes a batch in a
# millisecond, so without this a run ends before a signal sent "in the middle" lands.
# RELIABILITY_LOAD_DELAY_S makes loading the model take that long first, as a first download does.
_CLI_MAIN = """
import os, time
delay = float(os.environ.get("RELIABILITY_ENCODE_DELAY_S") or 0)
load_delay = float(os.environ.get("RELIABILITY_LOAD_DELAY_S") or 0)
if delay or load_delay:
    from clipsearch.encoder import Encoder
    real, real_init = Encoder.encode_images, Encoder.__init__
    def encode_images(self, pixels):
        time.sleep(delay)
        return real(self, pixels)
    def init(self, *args, **kwargs):
        time.sleep(load_delay)
        real_init(self, *args, **kwargs)
    Encoder.encode_images, Encoder.__init__ = encode_images, init
from clipsearch.cli import main
main()
"""


HOOKS = Path(__file__).parent / "hooks"


def cli_command(*args: str | os.PathLike) -> list[str]:
    """The `clipsearch` command line, run with this test session's Python."""
    return [sys.executable, "-c", _CLI_MAIN, *map(os.fsdecode, args)]


def start_cli(
    *args: str | os.PathLike, encode_delay_s: float = 0.0, load_delay_s: float = 0.0, env: dict | None = None
) -> subprocess.Popen:
    """Start `clipsearch ...` in its own session (so a signal can go to its whole group, as
    Ctrl-C in a terminal does), with output captured as bytes."""
    delays = {"RELIABILITY_ENCODE_DELAY_S": str(encode_delay_s), "RELIABILITY_LOAD_DELAY_S": str(load_delay_s)}
    env = {**os.environ, **(env or {}), **delays}
    if "RELIABILITY_SWAP_FOR_FIFO" in env:  # hooks/sitecustomize.py, in every process of the run
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HOOKS), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
    )


def start_index(home, lib, model: str, *extra: str, batch: int = 4, encode_delay_s: float = 0.1) -> subprocess.Popen:
    """`clipsearch index LIB` with the model in fp32, ``batch`` images a batch, each batch made to
    take ``encode_delay_s`` (a real model's pace, so that a signal lands mid-run)."""
    options = ["--model", model, "--precision", "fp32", "--batch-size", str(batch), *extra]
    return start_cli("--home", home, "index", lib, *options, encode_delay_s=encode_delay_s)


def run_cli(*args: str | os.PathLike, timeout: float = 120, **options: Any) -> subprocess.CompletedProcess:
    """The CLI in a process of its own; ``options`` are `subprocess.run`'s."""
    return subprocess.run(cli_command(*args), capture_output=True, timeout=timeout, **options)


def wait_until(condition, timeout: float, poll: float = 0.02, process: subprocess.Popen | None = None) -> bool:
    """Poll ``condition`` until it holds (True), ``timeout`` passes or ``process`` exits (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process is not None and process.poll() is not None:
            return condition()
        time.sleep(poll)
    return False


def kill_group(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the process and its decode workers (its whole process group)."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


class TimedLines:
    """Reads a stream in a thread, recording when each line arrived, so a test can tell when a
    process said something apart from when it exited."""

    def __init__(self, stream):
        self.lines: list[tuple[float, bytes]] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append((time.monotonic(), line))

    def text(self, timeout: float = 30) -> str:
        self._thread.join(timeout)
        return b"".join(line for _, line in self.lines).decode("utf-8", "replace")

    def first(self, fragment: bytes) -> float | None:
        """When the first line holding ``fragment`` arrived."""
        return next((t for t, line in self.lines if fragment in line), None)


def assert_no_traceback(*outputs: bytes | str) -> None:
    for output in outputs:
        text = output.decode("utf-8", "replace") if isinstance(output, bytes) else output
        assert "Traceback" not in text, text


def photo_library(root: Path, count: int, size: tuple[int, int] = (320, 240), start_seed: int = 0) -> list[Path]:
    """``count`` distinct JPEGs with noise in them, big enough that decoding takes a moment:
    indexing them runs long enough for a signal to land in the middle."""
    paths = []
    for i in range(count):
        rng = np.random.default_rng(start_seed + i)
        base = np.asarray(blocks(start_seed + i, size), dtype=np.int16)
        noise = rng.integers(-20, 21, size=base.shape, dtype=np.int16)
        image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        path = root / f"roll{i % 3}" / f"photo{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
        paths.append(path)
    return paths


def catalog_vectors(home: Path) -> dict[bytes, np.ndarray]:
    """path -> stored vector (float32 from the float16 blob) of every indexed row; empty while
    the catalog's tables do not exist yet (a process killed while creating them)."""
    with sqlite3.connect(f"file:{home / 'catalog.db'}?mode=ro", uri=True) as conn:
        try:
            rows = conn.execute(
                "SELECT images.path, vectors.vector FROM images JOIN vectors ON vectors.image_id = images.id "
                "WHERE images.status = 'indexed'"
            ).fetchall()
        except sqlite3.OperationalError as error:
            if "no such table" not in str(error):
                raise
            return {}
    return {path: np.frombuffer(blob, dtype="<f2").astype(np.float32) for path, blob in rows}


def expected_vectors(encoder, paths: Sequence[bytes | str | os.PathLike]) -> dict[bytes, np.ndarray]:
    """What the encoder makes of each file, computed here, independently of any index."""
    from clipsearch.decode import decode_file

    pixels = [decode_file(encoder.preprocess, os.fsencode(p)).pixels for p in paths]
    vectors = encoder.encode_images(np.stack(pixels))
    return {os.fsencode(p): v for p, v in zip(paths, vectors)}
