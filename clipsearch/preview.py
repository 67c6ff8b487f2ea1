"""Thumbnails inline in a terminal, for `clipsearch query --preview`.

Three protocols cover the terminals that can show pictures: kitty's graphics protocol (kitty,
Ghostty, WezTerm), iTerm2's inline images (iTerm2, WezTerm, mintty) and sixel (foot, mlterm,
contour, xterm -ti vt340, ...). Which one a terminal speaks is read from the environment it
sets (asking the terminal itself would need a reply on stdin, which a pipeline may own); a
terminal not recognised gets paths only, and ``CLIPSEARCH_PREVIEW=kitty|iterm|sixel|none``
overrides the guess.
"""

from __future__ import annotations

import base64
import io
import itertools
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

PROTOCOLS = ("kitty", "iterm", "sixel")
COLUMNS = 16  # the box a preview fits in, in terminal cells (kitty, iTerm2), narrowed to the terminal's
ROWS = 8  # a cell is about twice as tall as wide: 16 x 8 cells is a square
SIXEL_PIXELS = 160  # sixel has no cell sizing: the long side in pixels
SIXEL_COLOURS = 64
_KITTY_CHUNK = 4096  # the protocol's limit on base64 bytes per escape sequence
_SIXEL_TERMS = ("foot", "mlterm", "yaft", "contour")


def detect(env: Mapping[str, str] | None = None, tty: bool = True) -> str | None:
    """The protocol this terminal speaks, or None (then only paths are printed). Nothing is
    guessed for output that is not a terminal, unless ``CLIPSEARCH_PREVIEW`` asks for one."""
    env = os.environ if env is None else env
    forced = env.get("CLIPSEARCH_PREVIEW", "").lower()
    if forced:
        if forced not in (*PROTOCOLS, "none"):
            log.warning("CLIPSEARCH_PREVIEW=%s is not one of %s, none: paths only", forced, ", ".join(PROTOCOLS))
        return forced if forced in PROTOCOLS else None
    if not tty:
        return None
    term, program = env.get("TERM", ""), env.get("TERM_PROGRAM", "")
    if env.get("KITTY_WINDOW_ID") or term in ("xterm-kitty", "xterm-ghostty") or program == "ghostty":
        return "kitty"
    if program in ("iTerm.app", "WezTerm", "mintty") or env.get("LC_TERMINAL") == "iTerm2":
        return "iterm"
    if "sixel" in term or term.startswith(_SIXEL_TERMS):
        return "sixel"
    return None


def inline_image(path: Path, protocol: str) -> bytes:
    """The escape sequence that shows a small version of the image at ``path``, followed by a
    newline; empty when the image cannot be read (its path is printed anyway)."""
    from clipsearch.errors import ClipsearchError
    from clipsearch.serve.thumbnails import shrunk

    columns = min(COLUMNS, shutil.get_terminal_size().columns)
    try:
        if protocol == "sixel":  # pixels, not cells: a cell is some 10 pixels wide
            side = min(SIXEL_PIXELS, 10 * columns)
            return sixel(shrunk(path, side, side)) + b"\n"
        image = shrunk(path, 256, 256)
    except (ClipsearchError, OSError) as e:
        log.debug("no preview of %s: %s", path, e)
        return b""
    columns, rows = cells(image.size, columns)
    return (kitty if protocol == "kitty" else iterm)(_png(image), columns, rows) + b"\n"


def cells(size: tuple[int, int], columns: int = COLUMNS, rows: int = ROWS) -> tuple[int, int | None]:
    """(columns, None) for an image that fills the box's width, (columns, rows) for one as tall
    as the box: a phone's screenshot fitted to 16 columns had run to some 70 rows."""
    width, height = size
    if columns * height <= 2 * rows * width:
        return max(1, columns), None
    return max(1, min(columns, round(2 * rows * width / height))), rows


def kitty(png: bytes, columns: int = COLUMNS, rows: int | None = None) -> bytes:
    """kitty's graphics protocol: transmit and show a PNG (``a=T,f=100``) scaled to ``columns``
    cells, or to ``rows`` (the aspect kept), in base64 chunks (``m=1`` while more follow), with
    replies turned off (``q=2``) so that none lands on the shell's input."""
    data = base64.standard_b64encode(png)
    chunks = [data[i : i + _KITTY_CHUNK] for i in range(0, len(data), _KITTY_CHUNK)] or [b""]
    scale = f"c={columns}" if rows is None else f"r={rows}"
    out = []
    for i, chunk in enumerate(chunks):
        more = int(i < len(chunks) - 1)
        keys = f"a=T,f=100,q=2,{scale},m={more}" if i == 0 else f"m={more}"
        out.append(b"\x1b_G" + keys.encode() + b";" + chunk + b"\x1b\\")
    return b"".join(out)


def iterm(png: bytes, columns: int = COLUMNS, rows: int | None = None) -> bytes:
    """iTerm2's inline image: an OSC 1337 ``File=`` sequence carrying the file in base64, fitted
    in ``columns`` (and ``rows``) cells."""
    height = "" if rows is None else f"height={rows};"
    header = f"\x1b]1337;File=inline=1;size={len(png)};width={columns};{height}preserveAspectRatio=1:"
    return header.encode() + base64.standard_b64encode(png) + b"\x07"


def sixel(image: Image.Image, colours: int = SIXEL_COLOURS) -> bytes:
    """DEC sixel: the image quantised to a palette, drawn in bands six pixels high, one pass
    per colour present in a band, runs of one column value compressed as ``!<count><char>``."""
    import numpy as np
    from PIL import Image

    paletted = image.convert("RGB").quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
    palette = paletted.getpalette() or []
    indices = np.asarray(paletted, dtype=np.uint8)
    height, width = indices.shape
    out = [f'\x1bP0;1;0q"1;1;{width};{height}'.encode()]
    for i in range(int(indices.max()) + 1):
        r, g, b = (round(c * 100 / 255) for c in palette[3 * i : 3 * i + 3])
        out.append(f"#{i};2;{r};{g};{b}".encode())
    for top in range(0, height, 6):
        band = indices[top : top + 6]
        passes = []
        for colour in np.unique(band):
            bits = np.zeros(width, dtype=np.uint8)
            for row in range(len(band)):
                bits |= (band[row] == colour).astype(np.uint8) << row
            passes.append(f"#{colour}".encode() + _runs((bits + 63).tobytes()))
        out.append(b"$".join(passes) + b"-")
    out.append(b"\x1b\\")
    return b"".join(out)


def _runs(row: bytes) -> bytes:
    """Sixel run-length coding: four or more equal columns as ``!<count><char>``."""
    out = []
    for char, group in itertools.groupby(row):
        count = len(list(group))
        out.append(f"!{count}".encode() + bytes([char]) if count > 3 else bytes([char]) * count)
    return b"".join(out)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()
