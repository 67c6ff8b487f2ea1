"""`clipsearch query --preview`: the escape sequences written for kitty, iTerm2 and sixel
terminals, which terminal gets which, and paths alone everywhere else."""

from __future__ import annotations

import base64
import io
import re

import pytest
from helpers import make_library
from PIL import Image
from reliability_helpers import exif_rotated_jpeg
from typer.testing import CliRunner

from clipsearch import preview
from clipsearch.cli import app
from clipsearch.index import Index


@pytest.mark.parametrize(
    ("env", "tty", "expected"),
    [
        ({"KITTY_WINDOW_ID": "1", "TERM": "xterm-kitty"}, True, "kitty"),
        ({"TERM": "xterm-kitty"}, True, "kitty"),
        ({"TERM": "xterm-ghostty"}, True, "kitty"),
        ({"TERM_PROGRAM": "iTerm.app", "TERM": "xterm-256color"}, True, "iterm"),
        ({"TERM_PROGRAM": "WezTerm"}, True, "iterm"),
        ({"LC_TERMINAL": "iTerm2"}, True, "iterm"),
        ({"TERM": "foot"}, True, "sixel"),
        ({"TERM": "mlterm"}, True, "sixel"),
        ({"TERM": "xterm-sixel"}, True, "sixel"),
        ({"TERM": "xterm-256color"}, True, None),
        ({"TERM": "dumb"}, True, None),
        ({}, True, None),
        ({"KITTY_WINDOW_ID": "1"}, False, None),  # output piped: never escape sequences
        ({"CLIPSEARCH_PREVIEW": "sixel", "TERM": "xterm-kitty"}, False, "sixel"),
        ({"CLIPSEARCH_PREVIEW": "none", "KITTY_WINDOW_ID": "1"}, True, None),
        ({"CLIPSEARCH_PREVIEW": "bogus"}, True, None),
    ],
)
def test_which_terminal_gets_which_protocol(env, tty, expected, caplog):
    assert preview.detect(env, tty=tty) == expected
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == (
        ["CLIPSEARCH_PREVIEW=bogus is not one of kitty, iterm, sixel, none: paths only"] if "bogus" in str(env) else []
    )


@pytest.mark.parametrize(
    ("size", "columns", "box"),
    [
        ((256, 256), 16, (16, None)),  # a square: 16 x 8 cells, as wide as the box
        ((256, 128), 16, (16, None)),
        ((144, 256), 16, (9, 8)),  # a portrait photo: as tall as the box
        ((28, 256), 16, (2, 8)),  # a phone's screenshot had run to ~70 rows
        ((1, 256), 16, (1, 8)),
        ((256, 256), 6, (6, None)),  # a terminal 6 columns wide
    ],
)
def test_a_preview_fits_a_box_of_16_by_8_cells_and_the_terminal(size, columns, box):
    assert preview.cells(size, columns) == box


def test_a_tall_preview_is_scaled_by_its_rows():
    png = png_of((28, 256))
    assert preview.kitty(png, 2, 8).startswith(b"\x1b_Ga=T,f=100,q=2,r=8,m=")
    assert b";width=2;height=8;preserveAspectRatio=1:" in preview.iterm(png, 2, 8)


def png_of(size: tuple[int, int], seed: int = 0) -> bytes:
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def test_kitty_sends_the_png_in_chunks_with_replies_off():
    png = png_of((80, 60))  # noise: ~14 KB, several chunks
    sequence = preview.kitty(png, columns=12)
    parts = re.findall(rb"\x1b_G([^;]*);([A-Za-z0-9+/=]*)\x1b\\", sequence)
    assert b"".join(re.findall(rb"\x1b_G[^\x1b]*\x1b\\", sequence)) == sequence  # nothing else in between
    assert len(parts) == -(-len(base64.b64encode(png)) // 4096) >= 3
    assert parts[0][0] == b"a=T,f=100,q=2,c=12,m=1"
    assert [keys for keys, _ in parts[1:-1]] == [b"m=1"] * (len(parts) - 2) and parts[-1][0] == b"m=0"
    assert all(len(data) <= 4096 for _, data in parts)
    assert base64.b64decode(b"".join(data for _, data in parts)) == png


def test_a_small_image_is_one_kitty_sequence():
    png = png_of((4, 4))
    assert preview.kitty(png) == b"\x1b_Ga=T,f=100,q=2,c=16,m=0;" + base64.b64encode(png) + b"\x1b\\"


def test_iterm_inline_image():
    png = png_of((20, 10))
    sequence = preview.iterm(png, columns=10)
    header = f"\x1b]1337;File=inline=1;size={len(png)};width=10;preserveAspectRatio=1:".encode()
    assert sequence.startswith(header) and sequence.endswith(b"\x07")
    assert base64.b64decode(sequence[len(header) : -1]) == png


def decode_sixel(sequence: bytes) -> tuple[tuple[int, int], dict[tuple[int, int], tuple[int, int, int]]]:
    """A minimal sixel reader: the raster size and every painted pixel's colour (0-100 RGB)."""
    match = re.fullmatch(rb'\x1bP0;1;0q"1;1;(\d+);(\d+)(.*)\x1b\\', sequence, re.S)
    assert match, sequence[:40]
    width, height, body = int(match[1]), int(match[2]), match[3]
    palette: dict[int, tuple[int, int, int]] = {}
    pixels: dict[tuple[int, int], tuple[int, int, int]] = {}
    colour, x, top = 0, 0, 0
    for token in re.findall(rb"#\d+(?:;2;\d+;\d+;\d+)?|![0-9]+[?-~]|[?-~]|\$|-", body):
        if token.startswith(b"#"):
            numbers = [int(n) for n in re.findall(rb"\d+", token)]
            colour = numbers[0]
            if len(numbers) == 5:
                palette[colour] = tuple(numbers[2:])
        elif token == b"$":
            x = 0
        elif token == b"-":
            x, top = 0, top + 6
        else:
            count, char = (int(token[1:-1]), token[-1]) if token.startswith(b"!") else (1, token[0])
            for column in range(x, x + count):
                for bit in range(6):
                    if (char - 63) >> bit & 1:
                        pixels[(column, top + bit)] = palette[colour]
            x += count
    return (width, height), pixels


def test_sixel_draws_every_pixel_in_its_colour():
    image = Image.new("RGB", (13, 8), (255, 0, 0))
    image.paste((0, 0, 255), (7, 0, 13, 8))
    image.paste((255, 255, 255), (0, 5, 3, 8))
    (width, height), pixels = decode_sixel(preview.sixel(image))
    assert (width, height) == (13, 8)
    assert len(pixels) == 13 * 8
    for (x, y), colour in pixels.items():
        expected = image.getpixel((x, y))
        assert colour == tuple(round(c * 100 / 255) for c in expected), (x, y)


def test_sixel_runs_are_compressed():
    image = Image.new("RGB", (40, 6), (0, 128, 0))
    sequence = preview.sixel(image)
    assert b"!40~" in sequence and len(sequence) < 60


@pytest.fixture
def indexed(tmp_path, tiny_model):
    library = make_library(tmp_path / "lib", 3)
    upright = Image.new("RGB", (300, 150), (200, 0, 0))
    rotated = tmp_path / "lib" / "rotated.jpg"
    rotated.write_bytes(exif_rotated_jpeg(upright))
    with Index.open(tmp_path / "home", model=tiny_model, device="cpu") as index:
        index.add([tmp_path / "lib"], workers=0)
    return tmp_path / "home", [*library, rotated]


def test_inline_images_are_upright_and_small(indexed):
    _, library = indexed
    (width, height), _ = decode_sixel(preview.inline_image(library[-1], "sixel")[:-1])
    assert (width, height) == (preview.SIXEL_PIXELS, preview.SIXEL_PIXELS // 2)  # 300 x 150 as shown
    png = base64.b64decode(re.findall(rb";([A-Za-z0-9+/=]+)\x1b\\", preview.inline_image(library[-1], "kitty"))[0])
    assert Image.open(io.BytesIO(png)).size == (256, 128)  # the terminal scales it to COLUMNS cells


def test_a_narrow_terminal_narrows_the_preview(indexed, monkeypatch):
    _, library = indexed
    monkeypatch.setenv("COLUMNS", "8")
    assert preview.inline_image(library[-1], "kitty").startswith(b"\x1b_Ga=T,f=100,q=2,c=8,m=")
    (width, _), _ = decode_sixel(preview.inline_image(library[-1], "sixel")[:-1])
    assert width == 80  # some 10 pixels a cell, not 160


def test_an_unreadable_image_gets_no_preview(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    assert preview.inline_image(broken, "kitty") == b""
    assert preview.inline_image(tmp_path / "gone.png", "sixel") == b""


def query(home, *args, env=None) -> bytes:
    result = CliRunner().invoke(app, ["--home", str(home), "query", "x", "-k", "3", *args], env=env)
    assert result.exit_code == 0, result.output
    return result.stdout_bytes


@pytest.mark.parametrize(("protocol", "start"), [("kitty", b"\x1b_G"), ("iterm", b"\x1b]1337;"), ("sixel", b"\x1bP")])
def test_query_preview_writes_an_image_before_each_result(indexed, protocol, start):
    home, _ = indexed
    plain = query(home).splitlines()
    shown = query(home, "--preview", env={"CLIPSEARCH_PREVIEW": protocol})
    lines = shown.split(b"\n")
    assert shown.count(start) == 3
    assert [line for line in lines if line and not line.startswith(start)] == plain  # the paths, as ever
    assert lines[0].startswith(start) and lines[1] == plain[0]


def test_query_preview_is_paths_alone_where_no_terminal_shows_images(indexed):
    home, _ = indexed
    assert query(home, "--preview", env={"TERM": "xterm-kitty", "CLIPSEARCH_PREVIEW": ""}) == query(home)
