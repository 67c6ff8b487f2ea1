"""Synthetic scenes: small images of coloured shapes with captions that say what is in them.

No pretrained weights can be downloaded where clipsearch is built and tested, so the bundled
``demo`` model is trained on these scenes, and the end-to-end tests check search results against
the generator's ground truth instead of trusting the model. Scenes hold one to three objects
(one object, two different objects with their spatial relation, a group of two or three alike,
or a row of three different ones) on plain or textured backgrounds. Each comes with a detailed
caption, looser paraphrases (the kind of short query people type), and the objects themselves.

Scene ``i`` of seed ``s`` depends only on ``(s, i)``: an infinite training stream can be split
across DataLoader workers in any order and still be reproducible.

Random scenes alone teach a model little about shape: two scenes of a random batch almost always
differ in colours, layout or background already, so a contrastive model can tell every pair apart
without looking at shapes, and it does not learn them. `SceneGenerator.hard_negative` gives the
same scene changed in exactly one respect (one object's shape or colour, two objects' colours
swapped, a size, a place), drawn on the identical background, so that only that respect tells
the two apart.

Scenes come in two styles. ``classic`` scenes sit on a 3 x 3 grid at fixed sizes on four grey
or beige tones: easy to learn, and the ground of the held-out figures. ``varied`` scenes are
what a model must also understand to be of use on images it did not draw itself: objects from a
tenth of the frame to nearly all of it, anywhere, rotated, filled or outlined, with or without
anti-aliasing, coloured the way other programs name colours, on plain backgrounds of any colour,
gradients, noise and textures, in frames of any size and aspect, some of them saved as JPEG.
``mixed`` draws each scene in one style or the other.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageDraw

# Silhouettes that stay distinct at 15 pixels (a hexagon that small is a circle).
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 10),
    "yellow": (245, 225, 20),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "purple": (135, 40, 185),
    "pink": (250, 125, 195),
    "brown": (125, 75, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}

# What other programs and people draw for a colour name: ours first, then the CSS/X11 colour
# Pillow draws for the name, then common variants. A varied scene mixes two of them.
PALETTE: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": (COLOURS["red"], (255, 0, 0), (200, 0, 0), (230, 50, 60)),
    "orange": (COLOURS["orange"], (255, 165, 0), (255, 120, 0), (240, 150, 50)),
    "yellow": (COLOURS["yellow"], (255, 255, 0), (255, 215, 0), (250, 235, 80)),
    "green": (COLOURS["green"], (0, 128, 0), (0, 200, 0), (50, 205, 50), (0, 255, 0)),
    "blue": (COLOURS["blue"], (0, 0, 255), (0, 0, 180), (30, 144, 255)),
    "purple": (COLOURS["purple"], (128, 0, 128), (148, 0, 211), (160, 32, 240)),
    "pink": (COLOURS["pink"], (255, 192, 203), (255, 105, 180), (255, 20, 147)),
    "brown": (COLOURS["brown"], (165, 42, 42), (139, 69, 19), (160, 82, 45)),
    "white": (COLOURS["white"], (255, 255, 255), (235, 235, 235)),
    "black": (COLOURS["black"], (0, 0, 0), (40, 40, 40)),
}
STYLES = ("classic", "varied", "mixed")
_CLASSIC_SHARE = 0.3  # of a mixed stream

BACKGROUND_TONES: dict[str, tuple[int, int, int]] = {
    "grey": (135, 135, 135),
    "light grey": (200, 200, 200),
    "dark grey": (70, 70, 70),
    "beige": (215, 200, 165),
}
PATTERNS = ("plain", "striped", "checked", "dotted")

SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
COUNT_WORDS = {2: "two", 3: "three"}
HARD_NEGATIVES = 3  # distinct hard negatives every scene has: its shapes alone allow that many

# Objects are centred in the cells of a 3 x 3 grid (give or take _JITTER), and even a large one
# stays inside its cell. With the demo model's 16-pixel patches at 48 pixels, a cell is a patch:
# a ViT this small, trained for minutes on two CPU cores, learns shapes many times faster when
# each object lies in one patch than when it is cut across four (a supervised probe reached 97%
# shape accuracy in 200 steps on the grid, 51% off it).
# Sizes and centres are fractions of the image side, so any resolution draws the same scene.
_CELLS = (1 / 6, 1 / 2, 5 / 6)
_SIDE = {"small": 0.25, "large": 0.33}
_CENTRE = {
    "left": (_CELLS[0], _CELLS[1]),
    "right": (_CELLS[2], _CELLS[1]),
    "top": (_CELLS[1], _CELLS[0]),
    "bottom": (_CELLS[1], _CELLS[2]),
    "centre": (_CELLS[1], _CELLS[1]),
}
_WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
_JITTER = 0.02
_SUPERSAMPLE = 4  # drawn this many times larger, then downsampled: anti-aliased edges
_MIN_CONTRAST = 110  # Euclidean RGB distance between an object's colour and its background


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str  # one of POSITIONS: where the object sits in the image
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in pixels


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    caption: str  # the detailed description: every object, its size, layout and background
    paraphrases: tuple[str, ...]  # the same scene said more loosely or partially
    objects: tuple[SceneObject, ...]
    background: str  # "striped grey"

    @property
    def captions(self) -> tuple[str, ...]:
        return (self.caption, *self.paraphrases)

    def contains(self, colour: str | None = None, shape: str | None = None) -> bool:
        """Whether some object has this colour and this shape (either may be left open)."""
        return any((colour is None or o.colour == colour) and (shape is None or o.shape == shape) for o in self.objects)

    def to_json(self) -> dict:
        """The ground truth without the pixels, as written to a manifest."""
        return {
            "caption": self.caption,
            "paraphrases": list(self.paraphrases),
            "background": self.background,
            "objects": [asdict(o) for o in self.objects],
        }


class SceneGenerator:
    """Deterministic scenes: ``generator[i]`` is always the same image and captions for a seed.

    ``single_objects`` gives only one-object scenes: the easy start of a training curriculum,
    where shapes are learned before the model has to tell several objects apart. ``style`` is
    one of `STYLES`; a varied scene's frame is ``resolution`` to three times that on its short
    side, for the preprocessing to resize.
    """

    def __init__(self, seed: int = 0, resolution: int = 48, single_objects: bool = False, style: str = "classic"):
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, not {style!r}")
        self.seed = seed
        self.resolution = resolution
        self.single_objects = single_objects
        self.style = style

    def __getitem__(self, index: int) -> Scene:
        return self._render(self._layout(index), index)

    def hard_negative(self, index: int, k: int = 0) -> Scene:
        """Scene ``index`` changed in one respect, on the same background: a negative for it
        that only that respect (most often a shape) tells apart. ``k`` (0 to
        ``HARD_NEGATIVES - 1``) numbers several, all different."""
        return self._render(self._negative_layout(index, k), index)

    def captions(self, index: int, negative: int | None = None) -> tuple[str, ...]:
        """The captions of scene ``index`` (or of its hard negative number ``negative``),
        without the cost of drawing it."""
        layout = self._layout(index) if negative is None else self._negative_layout(index, negative)
        caption, paraphrases = _describe(layout)
        return (caption, *paraphrases)

    def take(self, count: int, start: int = 0) -> list[Scene]:
        return [self[i] for i in range(start, start + count)]

    def _rng(self, purpose: str, index: int) -> random.Random:
        # A string seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
        return random.Random(f"{purpose}:{self.seed}:{index}")

    def _layout(self, index: int) -> _Layout:
        rng = self._rng("scenes", index)
        varied = self.style == "varied" or (self.style == "mixed" and rng.random() >= _CLASSIC_SHARE)
        return (_sample_varied if varied else _sample_layout)(rng, self.single_objects)

    def _negative_layout(self, index: int, k: int) -> _Layout:
        """The ``k``-th of the scene's hard negatives, each different from the scene and from
        the others."""
        layout = self._layout(index)
        seen = {_describe(layout)[0]}
        attempt = 0
        while True:
            negative = _mutate(layout, self._rng(f"negative{attempt}", index))
            attempt += 1
            caption = _describe(negative)[0]
            if caption not in seen:
                if len(seen) == k + 1:
                    return negative
                seen.add(caption)

    def _render(self, layout: _Layout, index: int) -> Scene:
        # Drawn with the scene's own random stream, so a hard negative gets the same texture
        # and colour jitter as the scene it was made from.
        render = _render_varied if layout.backdrop is not None else _render
        return render(layout, self._rng("render", index), self.resolution)


def write_scenes(
    directory: str | Path, count: int, seed: int = 0, resolution: int = 48, style: str = "classic", photos: bool = False
) -> Path:
    """Write ``count`` scenes as PNG files plus ``manifest.jsonl`` (one line per image: ``path``
    relative to the directory, ``caption``, ``objects``, ...). Returns the manifest's path.

    With ``photos``, every third scene is a JPEG with the EXIF a camera writes: a capture date
    (a day apart from one scene to the next), and on some an orientation tag, the pixels stored
    turned the way a camera held sideways stores them, so that only a reader that honours the
    tag sees the scene as its caption says."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = SceneGenerator(seed, resolution, style=style)
    width = len(str(count - 1))
    manifest = directory / "manifest.jsonl"
    with manifest.open("w", encoding="utf-8") as out:
        for index in range(count):
            scene = generator[index]
            if photos and index % 3 == 2:
                name = f"scene_{index:0{width}d}.jpg"
                _save_photo(scene.image, directory / name, index)
            else:
                name = f"scene_{index:0{width}d}.png"
                scene.image.save(directory / name, optimize=True)
            out.write(json.dumps({"path": name, **scene.to_json()}) + "\n")
    return manifest


# EXIF orientation -> how the stored pixels are turned from the upright scene (the inverse of
# what a reader applies to show it).
_STORED_TURN = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _save_photo(image: Image.Image, path: Path, index: int) -> None:
    exif = Image.Exif()
    taken = datetime(2024, 5, 1, 9, 30) + timedelta(days=index, minutes=7 * index)
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = taken.strftime("%Y:%m:%d %H:%M:%S")
    orientation = (1, 6, 3, 8)[(index // 3) % 4]
    if orientation != 1:
        exif[ExifTags.Base.Orientation] = orientation
        image = image.transpose(_STORED_TURN[orientation])
    image.save(path, "JPEG", quality=90, exif=exif)


def read_manifest(path: str | Path) -> list[dict]:
    """The records of a manifest written by `write_scenes`, with ``path`` made absolute."""
    path = Path(path)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for record in records:
        record["path"] = str(path.parent / record["path"])
    return records


# --- layouts: what a scene shows, before it is drawn -------------------------------------------


@dataclass(frozen=True)
class _Item:
    shape: str
    colour: str
    size: str
    position: str
    centre: tuple[float, float]  # fractions of the image side
    side: float = 0.0  # fraction of the image side; 0: the classic side of `size`
    angle: float = 0.0  # degrees, counter-clockwise
    outline: float = 0.0  # line width as a fraction of the side; 0: filled


@dataclass(frozen=True)
class _Backdrop:
    """A varied scene's background: ``colours`` are the plain colour, a gradient's two ends, or
    a texture's two shades."""

    kind: str  # one of _BACKDROPS
    colours: tuple[tuple[int, int, int], ...]
    scale: float  # a texture's period or the noise's strength, as a fraction of the frame / 255
    angle: float  # a gradient's direction, in degrees; textures turn by 90 degrees when >= 180


@dataclass(frozen=True)
class _Layout:
    kind: str  # "single", "pair" (two different objects), "group" (two or three alike), "row" (three different)
    items: tuple[_Item, ...]  # left or top first
    tone: str  # classic scenes: a name of BACKGROUND_TONES; "" in varied ones
    pattern: str
    colours: tuple[str, ...]  # the object colours that stand out from this background
    backdrop: _Backdrop | None = None  # varied scenes only

    @property
    def background(self) -> str:
        """What captions say of the background: a varied scene's is not named."""
        if self.backdrop is not None:
            return ""
        return self.tone if self.pattern == "plain" else f"{self.pattern} {self.tone}"


def _sample_layout(rng: random.Random, single_objects: bool) -> _Layout:
    tone = rng.choice(list(BACKGROUND_TONES))
    pattern = rng.choice(PATTERNS)
    kind = (
        "single"
        if single_objects
        else rng.choices(("single", "pair", "group", "row"), weights=(0.35, 0.35, 0.2, 0.1))[0]
    )
    colours = tuple(_visible_colours(tone))
    items = {"single": _single, "pair": _pair, "group": _group, "row": _row}[kind](rng, colours)
    return _Layout(kind, tuple(items), tone, pattern, colours)


def _single(rng: random.Random, colours: tuple[str, ...]) -> list[_Item]:
    position = rng.choice(POSITIONS)
    return [
        _Item(rng.choice(SHAPES), rng.choice(colours), rng.choice(SIZES), position, _place(rng, *_CENTRE[position]))
    ]


def _pair(rng: random.Random, colours: tuple[str, ...]) -> list[_Item]:
    first = (rng.choice(SHAPES), rng.choice(colours), rng.choice(SIZES))
    second = first
    while second[:2] == first[:2]:  # the two must differ in shape or colour, or the caption would be a count
        second = (rng.choice(SHAPES), rng.choice(colours), rng.choice(SIZES))
    horizontal = rng.random() < 0.5
    across = rng.choice(_CELLS)  # the row (or column) the two share
    ends = (_CELLS[0], _CELLS[2])
    return [
        _Item(shape, colour, size, position, _place(rng, along, across) if horizontal else _place(rng, across, along))
        for (shape, colour, size), position, along in zip((first, second), _ends(horizontal), ends)
    ]


def _group(rng: random.Random, colours: tuple[str, ...]) -> list[_Item]:
    shape, colour, count = rng.choice(SHAPES), rng.choice(colours), rng.choice(tuple(COUNT_WORDS))
    size = rng.choice(SIZES) if count == 2 else "small"  # three large ones do not fit side by side
    horizontal = rng.random() < 0.5
    across = rng.choice(_CELLS)
    along = (_CELLS[0], _CELLS[2]) if count == 2 else _CELLS
    names = _ends(horizontal) if count == 2 else (_ends(horizontal)[0], "centre", _ends(horizontal)[1])
    return [
        _Item(shape, colour, size, name, _place(rng, x, across) if horizontal else _place(rng, across, x))
        for x, name in zip(along, names)
    ]


def _row(rng: random.Random, colours: tuple[str, ...]) -> list[_Item]:
    y = rng.choice(_CELLS)
    return [
        _Item(shape, rng.choice(colours), "small", position, _place(rng, x, y))
        for shape, position, x in zip(rng.sample(SHAPES, 3), ("left", "centre", "right"), _CELLS)
    ]


def _ends(horizontal: bool) -> tuple[str, str]:
    return ("left", "right") if horizontal else ("top", "bottom")


def _place(rng: random.Random, x: float, y: float) -> tuple[float, float]:
    return x + rng.uniform(-_JITTER, _JITTER), y + rng.uniform(-_JITTER, _JITTER)


def _mutate(layout: _Layout, rng: random.Random) -> _Layout:
    """The layout changed in one respect that its description names."""
    items = list(layout.items)
    # Shape is the hardest to learn (and binding colours to shapes the next), so it changes most.
    changes = ["shape"] * 4 + ["colour"]
    if layout.kind == "single":
        changes += ["size", "position"]
    if layout.kind in ("pair", "row") and len({item.colour for item in items}) > 1:
        changes += ["swap colours"] * 2
    if layout.kind == "pair":
        changes += ["size", "swap places"]
    change = rng.choice(changes)
    # A group's objects are alike, so they change together; otherwise one object changes.
    targets = range(len(items)) if layout.kind == "group" else [rng.randrange(len(items))]
    if change == "shape":
        taken = {item.shape for item in items}
        new = rng.choice([s for s in SHAPES if s not in taken])
        items = [_replace(item, shape=new) if i in targets else item for i, item in enumerate(items)]
    elif change == "colour":
        taken = {item.colour for item in items}
        new = rng.choice([c for c in layout.colours if c not in taken])
        items = [_replace(item, colour=new) if i in targets else item for i, item in enumerate(items)]
    elif change == "size":
        (i,) = targets
        size = "large" if items[i].size == "small" else "small"
        if layout.backdrop is None:
            items[i] = _replace(items[i], size=size)
        else:  # the object grows or shrinks about its centre, within the frame
            x, y = items[i].centre
            room = 2 * min(x, y, 1 - x, 1 - y) / _reach(items[i].shape, items[i].angle)
            side = min(_free_side(rng, layout.kind, size), room)
            items[i] = _replace(items[i], size=_size_word(layout.kind, side), side=side)
    elif change == "position":
        position = rng.choice([p for p in POSITIONS if p != items[0].position])
        if layout.backdrop is None:
            centre = _place(rng, *_CENTRE[position])
        else:
            centre = _free_centre(rng, items[0].side * _reach(items[0].shape, items[0].angle), position)
        items = [_replace(items[0], position=position, centre=centre)]
    elif change == "swap colours":
        i, j = rng.choice(
            [(i, j) for i in range(len(items)) for j in range(i + 1, len(items)) if items[i].colour != items[j].colour]
        )
        items[i], items[j] = _replace(items[i], colour=items[j].colour), _replace(items[j], colour=items[i].colour)
    else:  # swap places: the relation between the two objects flips
        first, second = items
        items = [
            _replace(second, position=first.position, centre=first.centre),
            _replace(first, position=second.position, centre=second.centre),
        ]
    return _Layout(layout.kind, tuple(items), layout.tone, layout.pattern, layout.colours, layout.backdrop)


def _replace(item: _Item, **changes: object) -> _Item:
    return _Item(**{**asdict(item), **changes})


# --- captions ----------------------------------------------------------------------------------


def _describe(layout: _Layout) -> tuple[str, tuple[str, ...]]:
    """The detailed caption and looser paraphrases, the shortest, query-like ones first."""
    description, paraphrases = {
        "single": _describe_single,
        "pair": _describe_pair,
        "group": _describe_group,
        "row": _describe_row,
    }[layout.kind](layout.items)
    caption = description
    if layout.background:  # a varied scene's is not named
        on_background = f"on a {layout.background} background"
        caption = f"{description} {on_background}"
        paraphrases = [*paraphrases, f"{paraphrases[0]} {on_background}"]
    return caption, tuple(dict.fromkeys(p for p in paraphrases if p != caption))


def _describe_single(items: tuple[_Item, ...]) -> tuple[str, list[str]]:
    (item,) = items
    shape, colour, size, where = item.shape, item.colour, item.size, _WHERE[item.position]
    paraphrases = [
        _with_article(f"{colour} {shape}"),
        _with_article(f"{size} {colour} {shape}"),
        f"{_with_article(f'{colour} {shape}')} {where}",
        _with_article(shape),
        f"a photo of {_with_article(shape)}",
        f"{_with_article(shape)} {where}",
        f"a photo of {_with_article(f'{colour} {shape}')}",
        f"something {colour}",
        f"a single {colour} {shape}",
    ]
    return f"{_with_article(f'{size} {colour} {shape}')} {where}", paraphrases


def _describe_pair(items: tuple[_Item, ...]) -> tuple[str, list[str]]:
    a, b = (_with_article(f"{item.size} {item.colour} {item.shape}") for item in items)
    short_a, short_b = (_with_article(f"{item.colour} {item.shape}") for item in items)
    relation, inverse = ("to the left of", "to the right of") if items[0].position == "left" else ("above", "below")
    paraphrases = [
        f"{short_a} and {short_b}",
        short_a,
        short_b,
        f"{b} {inverse} {a}",
        f"{short_a} {relation} {short_b}",
        f"{a} and {b}",
        f"a photo of {short_b} and {short_a}",
    ]
    return f"{a} {relation} {b}", paraphrases


def _describe_group(items: tuple[_Item, ...]) -> tuple[str, list[str]]:
    shape, colour, size, count = items[0].shape, items[0].colour, items[0].size, len(items)
    word, plural = COUNT_WORDS[count], _plural(shape)
    paraphrases = [
        f"{word} {colour} {plural}",
        f"{colour} {plural}",
        _with_article(f"{colour} {shape}"),
        f"{word} {plural}",
        f"{count} {colour} {plural}",
        f"a photo of {word} {colour} {plural}",
    ]
    return f"{word} {size} {colour} {plural}", paraphrases


def _describe_row(items: tuple[_Item, ...]) -> tuple[str, list[str]]:
    phrases = [_with_article(f"{item.colour} {item.shape}") for item in items]
    listed = f"{phrases[0]}, {phrases[1]} and {phrases[2]}"
    paraphrases = [
        listed,
        *phrases,
        f"three shapes: {listed}",
        f"{phrases[2]}, {phrases[1]} and {phrases[0]}",
    ]
    return f"{listed} in a row", paraphrases


# --- drawing ---------------------------------------------------------------------------------


def _render(layout: _Layout, rng: random.Random, resolution: int) -> Scene:
    canvas = resolution * _SUPERSAMPLE
    image = _background(rng, canvas, layout.tone, layout.pattern)
    draw = ImageDraw.Draw(image)
    objects = []
    for item in layout.items:
        box = _draw_shape(
            draw, item.shape, _jittered(rng, COLOURS[item.colour]), *item.centre, _SIDE[item.size], canvas
        )
        left, top, right, bottom = (round(v / _SUPERSAMPLE) for v in box)
        objects.append(SceneObject(item.shape, item.colour, item.size, item.position, (left, top, right, bottom)))
    image = image.resize((resolution, resolution), Image.Resampling.BOX)
    caption, paraphrases = _describe(layout)
    return Scene(image, caption, paraphrases, tuple(objects), layout.background)


def _visible_colours(tone: str) -> list[str]:
    """The object colours that stand out from a background tone."""
    return [name for name, rgb in COLOURS.items() if math.dist(rgb, BACKGROUND_TONES[tone]) >= _MIN_CONTRAST]


def _with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _plural(shape: str) -> str:
    return f"{shape}es" if shape.endswith(("s", "x")) else f"{shape}s"


def _jittered(rng: random.Random, rgb: tuple[int, int, int], amount: int = 12) -> tuple[int, int, int]:
    red, green, blue = (min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)
    return red, green, blue


def _background(rng: random.Random, side: int, tone: str, pattern: str) -> Image.Image:
    base = _jittered(rng, BACKGROUND_TONES[tone], 6)
    shade = tuple(v - 28 if sum(base) > 300 else v + 28 for v in base)
    image = Image.new("RGB", (side, side), base)
    step = side // rng.choice((6, 8))
    turned = pattern == "striped" and rng.random() < 0.5
    _texture(image, pattern, shade, step, turned)
    return image


def _texture(image: Image.Image, pattern: str, shade: tuple[int, ...], step: int, turned: bool) -> None:
    """Draw stripes (across when ``turned``), checks or dots of ``shade`` over the image."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    if pattern == "striped":
        for v in range(0, height if turned else width, step):
            box = (0, v, width, v + step // 2 - 1) if turned else (v, 0, v + step // 2 - 1, height)
            draw.rectangle(box, fill=shade)
    elif pattern == "checked":
        for row, y in enumerate(range(0, height, step)):
            for col, x in enumerate(range(0, width, step)):
                if (row + col) % 2:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=shade)
    elif pattern == "dotted":
        radius = step // 6
        for y in range(step // 2, height, step):
            for x in range(step // 2, width, step):
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=shade)


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, rgb: tuple[int, int, int], cx: float, cy: float, side: float, canvas: int
) -> tuple[float, float, float, float]:
    """Draw one shape centred at (cx, cy) (fractions of the canvas); returns its bounding box."""
    r = side * canvas / 2
    x, y = cx * canvas, cy * canvas
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
    elif shape == "square":
        s = r * 0.85  # a square of the same side as the circle looks larger
        draw.rectangle((x - s, y - s, x + s, y + s), fill=rgb)
        r = s
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=rgb)
    elif shape == "star":
        draw.polygon(_star(x, y, r), fill=rgb)
    elif shape == "heart":
        draw.polygon(_heart(x, y, r), fill=rgb)
    elif shape == "cross":
        w = r * 0.36
        draw.rectangle((x - w, y - r, x + w, y + r), fill=rgb)
        draw.rectangle((x - r, y - w, x + r, y + w), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return (x - r, y - r, x + r, y + r)


def _heart(x: float, y: float, r: float) -> list[tuple[float, float]]:
    # The classic heart curve, whose extent is 32 x 29 units around its centre.
    points = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        hx = 16 * math.sin(t) ** 3
        hy = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((x + hx * r / 16, y - (hy + 2.5) * r / 15))
    return points


def _star(x: float, y: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
    return points


# --- varied scenes ---------------------------------------------------------------------------

_BACKDROPS = ("plain", "plain", "gradient", "noise", "striped", "checked", "dotted")  # plain twice as likely
_MIN_VISIBLE = 90  # RGB distance from every background colour to every rendering of an object colour
_SIDES = {"single": (0.1, 0.95), "pair": (0.1, 0.45), "group": (0.1, 0.45), "row": (0.1, 0.3)}
_FREE_SUPERSAMPLE = 3
_LARGE_FROM = {"single": 0.4, "pair": 0.28, "group": 0.28, "row": 1.0}  # a side from which captions say "large"


def _sample_varied(rng: random.Random, single_objects: bool) -> _Layout:
    backdrop, colours = _sample_backdrop(rng)
    kind = (
        "single"
        if single_objects
        else rng.choices(("single", "pair", "group", "row"), weights=(0.45, 0.3, 0.15, 0.1))[0]
    )
    items = {"single": _free_single, "pair": _free_pair, "group": _free_group, "row": _free_row}[kind](rng, colours)
    return _Layout(kind, tuple(items), "", "", colours, backdrop)


def _sample_backdrop(rng: random.Random) -> tuple[_Backdrop, tuple[str, ...]]:
    """A background and the object colours that stand out from all of its colours."""
    while True:
        kind = rng.choice(_BACKDROPS)
        colours = [_any_colour(rng)]
        if kind == "gradient":
            colours.append(_any_colour(rng))
        elif kind in ("striped", "checked", "dotted"):
            step = rng.uniform(20, 55) * (1 if sum(colours[0]) < 380 else -1)
            colours.append(tuple(min(255, max(0, round(v + step))) for v in colours[0]))  # type: ignore[arg-type]
        visible = tuple(
            name
            for name, renderings in PALETTE.items()
            if all(math.dist(rgb, bg) >= _MIN_VISIBLE for rgb in renderings for bg in colours)
        )
        if len(visible) >= 4:
            scale = rng.uniform(0.05, 0.25) if kind != "noise" else rng.uniform(0.03, 0.12)
            return _Backdrop(kind, tuple(colours), scale, rng.uniform(0, 360)), visible


def _any_colour(rng: random.Random) -> tuple[int, int, int]:
    """Greys (as most photos' and drawings' backgrounds are) half the time, else any colour."""
    if rng.random() < 0.5:
        level = rng.randint(0, 255)
        return _jittered(rng, (level, level, level), 8)
    return rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)


def _look(rng: random.Random, shape: str) -> dict[str, float]:
    """How an object is drawn, beyond what captions say: turned, and filled or outlined."""
    # A heart upside down is no longer what people call a heart.
    turn = (-35, 35) if shape == "heart" else (0, 360)
    angle = 0.0 if rng.random() < 0.4 else rng.uniform(*turn)
    return {"angle": angle, "outline": rng.uniform(0.04, 0.1) if rng.random() < 0.3 else 0.0}


def _free_side(rng: random.Random, kind: str, size: str | None = None) -> float:
    """An object's side, log-uniform over what its kind of scene fits (within ``size`` if given)."""
    low, high = _SIDES[kind]
    if size == "small":
        high = min(high, _LARGE_FROM[kind])
    elif size == "large":
        low = _LARGE_FROM[kind]
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _size_word(kind: str, side: float) -> str:
    return "large" if side >= _LARGE_FROM[kind] else "small"


def _region(x: float, y: float) -> str:
    """Where a centre lies, in the words of `POSITIONS`."""
    dx, dy = x - 0.5, y - 0.5
    if max(abs(dx), abs(dy)) < 1 / 6:
        return "centre"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _reach(shape: str, angle: float) -> float:
    """How far a shape of radius 1 turned by ``angle`` reaches along x or y: a square turned by
    45 degrees needs more room than an upright one."""
    if shape == "circle":
        return 1.0
    turn = math.radians(angle)
    cos, sin = math.cos(turn), math.sin(turn)
    return max(max(abs(u * cos + v * sin), abs(v * cos - u * sin)) for u, v in _UNIT_SHAPES[shape])


def _free_centre(rng: random.Random, extent: float, position: str | None = None) -> tuple[float, float]:
    """A centre that keeps an object ``extent`` wide inside the frame (in ``position`` if given)."""
    low, high = extent / 2, 1 - extent / 2
    for _ in range(100):
        centre = (rng.uniform(low, high), rng.uniform(low, high)) if high > low else (0.5, 0.5)
        if position is None or _region(*centre) == position:
            return centre
    return centre  # a large object cannot reach that region: its centre stays where it is


def _fitted(rng: random.Random, kind: str, shape: str) -> tuple[float, dict[str, float], float]:
    """An object's side, look and extent (its side times its reach), the extent within what its
    kind of scene fits."""
    look = _look(rng, shape)
    reach = _reach(shape, look["angle"])
    side = min(_free_side(rng, kind), _SIDES[kind][1] / reach)
    return side, look, side * reach


def _free_single(rng: random.Random, colours: tuple[str, ...]) -> list[_Item]:
    shape = rng.choice(SHAPES)
    side, look, extent = _fitted(rng, "single", shape)
    centre = _free_centre(rng, extent)
    return [_Item(shape, rng.choice(colours), _size_word("single", side), _region(*centre), centre, side, **look)]


def _along(rng: random.Random, sides: list[float], horizontal: bool) -> list[tuple[float, float]]:
    """Centres of objects side by side in equal slots along one axis, near one shared line."""
    slot = 1 / len(sides)
    line = rng.uniform(max(sides) / 2, 1 - max(sides) / 2)
    centres = []
    for i, side in enumerate(sides):
        along = i * slot + rng.uniform(side / 2, slot - side / 2)
        across = min(1 - side / 2, max(side / 2, line + rng.uniform(-0.05, 0.05)))
        centres.append((along, across) if horizontal else (across, along))
    return centres


def _free_pair(rng: random.Random, colours: tuple[str, ...]) -> list[_Item]:
    first = (rng.choice(SHAPES), rng.choice(colours))
    second = first
    while second == first:
        second = (rng.choice(SHAPES), rng.choice(colours))
    fitted = [_fitted(rng, "pair", shape) for shape, _ in (first, second)]
    horizontal = rng.random() < 0.5
    centres = _along(rng, [extent for _, _, extent in fitted], horizontal)
    return [
        _Item(shape, colour, _size_word("pair", side), position, centre, side, **look)
        for (shape, colour), (side, look, _), position, centre in zip(
            (first, second), fitted, _ends(horizontal), centres
        )
    ]


def _free_group(rng: random.Random, colours: tuple[str, ...]) -> list[_Item]:
    shape, colour, count = rng.choice(SHAPES), rng.choice(colours), rng.choice(tuple(COUNT_WORDS))
    side, look, extent = _fitted(rng, "group" if count == 2 else "row", shape)  # alike: drawn alike
    horizontal = rng.random() < 0.5
    ends = _ends(horizontal)
    names = ends if count == 2 else (ends[0], "centre", ends[1])
    return [
        _Item(shape, colour, _size_word("group", side), name, centre, side, **look)
        for name, centre in zip(names, _along(rng, [extent] * count, horizontal))
    ]


def _free_row(rng: random.Random, colours: tuple[str, ...]) -> list[_Item]:
    shapes = rng.sample(SHAPES, 3)
    fitted = [_fitted(rng, "row", shape) for shape in shapes]
    centres = _along(rng, [extent for _, _, extent in fitted], True)
    return [
        _Item(shape, rng.choice(colours), "small", position, centre, side, **look)
        for shape, (side, look, _), position, centre in zip(shapes, fitted, ("left", "centre", "right"), centres)
    ]


def _render_varied(layout: _Layout, rng: random.Random, resolution: int) -> Scene:
    """Draw a varied scene: objects lie in the frame's central square, which is what CLIP's
    preprocessing keeps of a frame of another aspect."""
    assert layout.backdrop is not None
    short = round(resolution * rng.choice((1, 1.5, 2)))
    long = short if rng.random() < 0.5 else round(short * rng.uniform(1.05, 1.6))
    width, height = (long, short) if rng.random() < 0.5 else (short, long)
    # Objects are drawn on a transparent layer, larger when anti-aliased, that is shrunk onto
    # the background: drawing the whole frame larger would cost several times as much.
    supersample = _FREE_SUPERSAMPLE if rng.random() < 0.6 else 1  # else hard, aliased edges
    image = _varied_background(rng, layout.backdrop, width, height)
    layer = Image.new("RGBA", (width * supersample, height * supersample), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    offset = ((width - short) / 2 * supersample, (height - short) / 2 * supersample)
    min_line = 1.3 * supersample * short / resolution  # a line that survives the resize
    objects = []
    for item in layout.items:
        rgb = _rendering(rng, item.colour)
        box = _draw_free(draw, item, rgb, offset, short * supersample, min_line)
        left, top, right, bottom = (round(v / supersample) for v in box)
        objects.append(SceneObject(item.shape, item.colour, item.size, item.position, (left, top, right, bottom)))
    if supersample > 1:
        layer = layer.resize((width, height), Image.Resampling.BOX)
    image.paste(layer, (0, 0), layer)
    image = _degraded(rng, image)
    caption, paraphrases = _describe(layout)
    return Scene(image, caption, paraphrases, tuple(objects), layout.background)


def _rendering(rng: random.Random, colour: str) -> tuple[int, int, int]:
    """One of the ways a colour name gets drawn: a blend of two of its renderings, jittered."""
    a, b = rng.choice(PALETTE[colour]), rng.choice(PALETTE[colour])
    t = rng.random()
    return _jittered(rng, tuple(round(u + t * (v - u)) for u, v in zip(a, b)), 15)  # type: ignore[arg-type]


def _varied_background(rng: random.Random, backdrop: _Backdrop, width: int, height: int) -> Image.Image:
    first = backdrop.colours[0]
    if backdrop.kind == "gradient":
        theta = math.radians(backdrop.angle)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xs * math.cos(theta) + ys * math.sin(theta)
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
        pixels = np.array(first, np.float32) + t[..., None] * (np.subtract(backdrop.colours[1], first))
        return Image.fromarray(pixels.round().astype(np.uint8))
    image = Image.new("RGB", (width, height), first)
    if backdrop.kind == "noise":
        return _with_noise(image, rng.getrandbits(32), 255 * backdrop.scale)
    if backdrop.kind != "plain":
        step = max(2, round(min(width, height) * backdrop.scale))
        _texture(image, backdrop.kind, backdrop.colours[1], step, backdrop.angle >= 180)
    return image


def _with_noise(image: Image.Image, seed: int, sigma: float) -> Image.Image:
    """The image with Gaussian noise of ``sigma`` (in 0-255 levels) added to every channel."""
    noise = np.random.default_rng(seed).normal(0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))


def _degraded(rng: random.Random, image: Image.Image) -> Image.Image:
    """What cameras and files do to a picture: sensor noise, JPEG's blocks."""
    if rng.random() < 0.2:
        image = _with_noise(image, rng.getrandbits(32), rng.uniform(3, 10))
    if rng.random() < 0.25:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=rng.randint(40, 90))
        image = Image.open(buffer).convert("RGB")
    return image


def _draw_free(
    draw: ImageDraw.ImageDraw,
    item: _Item,
    rgb: tuple[int, ...],
    offset: tuple[float, float],
    canvas: float,
    min_line: float,
) -> tuple[float, float, float, float]:
    """Draw a varied scene's object; returns its bounding box in the frame's pixels."""
    r = item.side * canvas / 2
    x, y = offset[0] + item.centre[0] * canvas, offset[1] + item.centre[1] * canvas
    line = 0 if not item.outline else max(round(min_line), round(item.outline * 2 * r))
    ink = (*rgb, 255)
    if item.shape == "circle":
        draw.ellipse(
            (x - r, y - r, x + r, y + r), fill=None if line else ink, outline=ink if line else None, width=line
        )
        return (x - r, y - r, x + r, y + r)
    turn = math.radians(item.angle)
    cos, sin = math.cos(turn), math.sin(turn)
    points = [(x + r * (u * cos + v * sin), y + r * (v * cos - u * sin)) for u, v in _UNIT_SHAPES[item.shape]]
    if line:  # round joints: a polygon's own outline grows spikes at sharp corners
        draw.line([*points, points[0], points[1]], fill=ink, width=line, joint="curve")
    else:
        draw.polygon(points, fill=ink)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return (min(xs), min(ys), max(xs), max(ys))


# Outlines of radius 1 around the origin, as `_draw_shape` draws them (y pointing down).
_UNIT_SHAPES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)],
    "star": _star(0, 0, 1),
    "heart": _heart(0, 0, 1),
    "cross": [
        (u * sx, v * sy)
        for sx, sy in ((1, 1), (-1, 1), (-1, -1), (1, -1))
        for u, v in (
            ((0.36, 1.0), (0.36, 0.36), (1.0, 0.36)) if sx * sy > 0 else ((1.0, 0.36), (0.36, 0.36), (0.36, 1.0))
        )
    ],
}
