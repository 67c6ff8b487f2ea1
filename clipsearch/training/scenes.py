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
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

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
    where shapes are learned before the model has to tell several objects apart.
    """

    def __init__(self, seed: int = 0, resolution: int = 48, single_objects: bool = False):
        self.seed = seed
        self.resolution = resolution
        self.single_objects = single_objects

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
        return _sample_layout(self._rng("scenes", index), self.single_objects)

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
        return _render(layout, self._rng("render", index), self.resolution)


def write_scenes(directory: str | Path, count: int, seed: int = 0, resolution: int = 48) -> Path:
    """Write ``count`` scenes as PNG files plus ``manifest.jsonl`` (one line per image: ``path``
    relative to the directory, ``caption``, ``objects``, ...). Returns the manifest's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = SceneGenerator(seed, resolution)
    width = len(str(count - 1))
    manifest = directory / "manifest.jsonl"
    with manifest.open("w", encoding="utf-8") as out:
        for index in range(count):
            scene = generator[index]
            name = f"scene_{index:0{width}d}.png"
            scene.image.save(directory / name, optimize=True)
            out.write(json.dumps({"path": name, **scene.to_json()}) + "\n")
    return manifest


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


@dataclass(frozen=True)
class _Layout:
    kind: str  # "single", "pair" (two different objects), "group" (two or three alike), "row" (three different)
    items: tuple[_Item, ...]  # left or top first
    tone: str
    pattern: str

    @property
    def background(self) -> str:
        return self.tone if self.pattern == "plain" else f"{self.pattern} {self.tone}"


def _sample_layout(rng: random.Random, single_objects: bool) -> _Layout:
    tone = rng.choice(list(BACKGROUND_TONES))
    pattern = rng.choice(PATTERNS)
    kind = (
        "single"
        if single_objects
        else rng.choices(("single", "pair", "group", "row"), weights=(0.35, 0.35, 0.2, 0.1))[0]
    )
    items = {"single": _single, "pair": _pair, "group": _group, "row": _row}[kind](rng, tone)
    return _Layout(kind, tuple(items), tone, pattern)


def _single(rng: random.Random, tone: str) -> list[_Item]:
    position = rng.choice(POSITIONS)
    return [_Item(rng.choice(SHAPES), _colour(rng, tone), rng.choice(SIZES), position, _place(rng, *_CENTRE[position]))]


def _pair(rng: random.Random, tone: str) -> list[_Item]:
    first = (rng.choice(SHAPES), _colour(rng, tone), rng.choice(SIZES))
    second = first
    while second[:2] == first[:2]:  # the two must differ in shape or colour, or the caption would be a count
        second = (rng.choice(SHAPES), _colour(rng, tone), rng.choice(SIZES))
    horizontal = rng.random() < 0.5
    across = rng.choice(_CELLS)  # the row (or column) the two share
    ends = (_CELLS[0], _CELLS[2])
    return [
        _Item(shape, colour, size, position, _place(rng, along, across) if horizontal else _place(rng, across, along))
        for (shape, colour, size), position, along in zip((first, second), _ends(horizontal), ends)
    ]


def _group(rng: random.Random, tone: str) -> list[_Item]:
    shape, colour, count = rng.choice(SHAPES), _colour(rng, tone), rng.choice(tuple(COUNT_WORDS))
    size = rng.choice(SIZES) if count == 2 else "small"  # three large ones do not fit side by side
    horizontal = rng.random() < 0.5
    across = rng.choice(_CELLS)
    along = (_CELLS[0], _CELLS[2]) if count == 2 else _CELLS
    names = _ends(horizontal) if count == 2 else (_ends(horizontal)[0], "centre", _ends(horizontal)[1])
    return [
        _Item(shape, colour, size, name, _place(rng, x, across) if horizontal else _place(rng, across, x))
        for x, name in zip(along, names)
    ]


def _row(rng: random.Random, tone: str) -> list[_Item]:
    y = rng.choice(_CELLS)
    return [
        _Item(shape, _colour(rng, tone), "small", position, _place(rng, x, y))
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
        new = rng.choice([c for c in _visible_colours(layout.tone) if c not in taken])
        items = [_replace(item, colour=new) if i in targets else item for i, item in enumerate(items)]
    elif change == "size":
        (i,) = targets
        items[i] = _replace(items[i], size="large" if items[i].size == "small" else "small")
    elif change == "position":
        position = rng.choice([p for p in POSITIONS if p != items[0].position])
        items = [_Item(items[0].shape, items[0].colour, items[0].size, position, _place(rng, *_CENTRE[position]))]
    elif change == "swap colours":
        i, j = rng.choice(
            [(i, j) for i in range(len(items)) for j in range(i + 1, len(items)) if items[i].colour != items[j].colour]
        )
        items[i], items[j] = _replace(items[i], colour=items[j].colour), _replace(items[j], colour=items[i].colour)
    else:  # swap places: the relation between the two objects flips
        first, second = items
        items = [
            _Item(second.shape, second.colour, second.size, first.position, first.centre),
            _Item(first.shape, first.colour, first.size, second.position, second.centre),
        ]
    return _Layout(layout.kind, tuple(items), layout.tone, layout.pattern)


def _replace(item: _Item, **changes: str) -> _Item:
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


def _colour(rng: random.Random, tone: str) -> str:
    return rng.choice(_visible_colours(tone))


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
    draw = ImageDraw.Draw(image)
    step = side // rng.choice((6, 8))
    if pattern == "striped":
        for x in range(0, side, step):
            draw.rectangle((x, 0, x + step // 2 - 1, side), fill=shade)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.ROTATE_90)
    elif pattern == "checked":
        for row, y in enumerate(range(0, side, step)):
            for col, x in enumerate(range(0, side, step)):
                if (row + col) % 2:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=shade)
    elif pattern == "dotted":
        radius = step // 6
        for y in range(step // 2, side, step):
            for x in range(step // 2, side, step):
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=shade)
    return image


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
