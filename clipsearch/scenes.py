"""Synthetic scenes: small images of coloured shapes with captions that say what is in them.

No pretrained weights can be downloaded where clipsearch is built and tested, so the bundled
``demo`` model is trained on these scenes, and the end-to-end tests check search results against
the generator's ground truth instead of trusting the model. Scenes hold one to three objects
(one object, two different objects with their spatial relation, a group of two or three alike,
or a row of three different ones) on plain or textured backgrounds. Each comes with a detailed
caption, looser paraphrases (the kind of short query people type), and the objects themselves.

Scene ``i`` of seed ``s`` depends only on ``(s, i)``: an infinite training stream can be split
across DataLoader workers in any order and still be reproducible.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")

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

# Object sizes and centres as fractions of the image side, so any resolution draws the same scene.
_SIDE = {"small": 0.24, "large": 0.40}
_CENTRE = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "centre": (0.5, 0.5)}
_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "centre": "in the centre"}
_JITTER = 0.04
_SUPERSAMPLE = 4  # drawn this many times larger, then downsampled: anti-aliased edges
_MIN_CONTRAST = 110  # Euclidean RGB distance between an object's colour and its background


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str  # one of POSITIONS: where the object sits in the image
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in pixels

    @property
    def phrase(self) -> str:
        """``"a large red circle"``."""
        return _with_article(f"{self.size} {self.colour} {self.shape}")


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
        return any((colour is None or o.colour == colour) and (shape is None or o.shape == shape)
                   for o in self.objects)

    def to_json(self) -> dict:
        """The ground truth without the pixels, as written to a manifest."""
        return {"caption": self.caption, "paraphrases": list(self.paraphrases), "background": self.background,
                "objects": [asdict(o) for o in self.objects]}


class SceneGenerator:
    """Deterministic scenes: ``generator[i]`` is always the same image and captions for a seed."""

    def __init__(self, seed: int = 0, resolution: int = 64):
        self.seed = seed
        self.resolution = resolution

    def __getitem__(self, index: int) -> Scene:
        # A string seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
        return _make_scene(random.Random(f"scenes:{self.seed}:{index}"), self.resolution)

    def take(self, count: int, start: int = 0) -> list[Scene]:
        return [self[i] for i in range(start, start + count)]

    def __iter__(self) -> Iterator[Scene]:
        index = 0
        while True:
            yield self[index]
            index += 1


def write_scenes(directory: str | Path, count: int, seed: int = 0, resolution: int = 64) -> Path:
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


# --- layouts ---------------------------------------------------------------------------------


def _make_scene(rng: random.Random, resolution: int) -> Scene:
    tone = rng.choice(list(BACKGROUND_TONES))
    pattern = rng.choice(PATTERNS)
    background = tone if pattern == "plain" else f"{pattern} {tone}"
    kind = rng.choices(("single", "pair", "group", "row"), weights=(0.35, 0.35, 0.2, 0.1))[0]
    layout = {"single": _single, "pair": _pair, "group": _group, "row": _row}[kind]
    specs, description, paraphrases = layout(rng, tone)

    image = _background(rng, resolution * _SUPERSAMPLE, tone, pattern)
    draw = ImageDraw.Draw(image)
    objects = []
    for shape, colour, size, position, (cx, cy) in specs:
        box = _draw_shape(draw, shape, _jittered(rng, COLOURS[colour]), cx, cy, _SIDE[size], resolution * _SUPERSAMPLE)
        objects.append(SceneObject(shape, colour, size, position, tuple(round(v / _SUPERSAMPLE) for v in box)))
    image = image.resize((resolution, resolution), Image.Resampling.BOX)

    on_background = f"on a {background} background"
    caption = f"{description} {on_background}"
    paraphrases = tuple(dict.fromkeys(p for p in (*paraphrases, f"{paraphrases[0]} {on_background}") if p != caption))
    return Scene(image, caption, paraphrases, tuple(objects), background)


# A layout returns the objects to draw, (shape, colour, size, position, centre), the detailed
# description without the background, and looser paraphrases, shortest-query-like first.
_Spec = tuple[str, str, str, str, tuple[float, float]]


def _single(rng: random.Random, tone: str) -> tuple[list[_Spec], str, list[str]]:
    shape, colour, size, position = rng.choice(SHAPES), _colour(rng, tone), rng.choice(SIZES), rng.choice(POSITIONS)
    cx, cy = _CENTRE[position]
    spec = (shape, colour, size, position, (cx + rng.uniform(-_JITTER, _JITTER), cy + rng.uniform(-_JITTER, _JITTER)))
    where = _WHERE[position]
    paraphrases = [
        _with_article(f"{colour} {shape}"),
        _with_article(f"{size} {colour} {shape}"),
        f"{_with_article(f'{colour} {shape}')} {where}",
        _with_article(shape),
        f"a photo of {_with_article(shape)}",
        f"a {shape} {where}",
        f"a photo of {_with_article(f'{colour} {shape}')}",
        f"something {colour}",
        f"a single {colour} {shape}",
    ]
    return [spec], f"{_with_article(f'{size} {colour} {shape}')} {where}", paraphrases


def _pair(rng: random.Random, tone: str) -> tuple[list[_Spec], str, list[str]]:
    first = (rng.choice(SHAPES), _colour(rng, tone), rng.choice(SIZES))
    second = first
    while second[:2] == first[:2]:  # the two must differ in shape or colour, or the caption would be a count
        second = (rng.choice(SHAPES), _colour(rng, tone), rng.choice(SIZES))
    horizontal = rng.random() < 0.5
    specs = []
    for (shape, colour, size), position in zip((first, second), ("left", "right") if horizontal else ("top", "bottom")):
        cx, cy = _CENTRE[position]
        offset = rng.uniform(-0.08, 0.08)  # across the line joining the two objects
        specs.append((shape, colour, size, position, (cx, cy + offset) if horizontal else (cx + offset, cy)))
    a, b = (_with_article(f"{size} {colour} {shape}") for shape, colour, size in (first, second))
    short_a, short_b = (_with_article(f"{colour} {shape}") for shape, colour, _ in (first, second))
    relation, inverse = ("to the left of", "to the right of") if horizontal else ("above", "below")
    paraphrases = [
        f"{short_a} and {short_b}",
        short_a,
        short_b,
        f"{b} {inverse} {a}",
        f"{short_a} {relation} {short_b}",
        f"{a} and {b}",
        f"a photo of {short_b} and {short_a}",
    ]
    return specs, f"{a} {relation} {b}", paraphrases


def _group(rng: random.Random, tone: str) -> tuple[list[_Spec], str, list[str]]:
    shape, colour, count = rng.choice(SHAPES), _colour(rng, tone), rng.choice(tuple(COUNT_WORDS))
    size = rng.choice(SIZES) if count == 2 else "small"  # three large ones do not fit side by side
    horizontal = rng.random() < 0.5
    y = rng.uniform(0.35, 0.65)
    xs = (0.27, 0.73) if count == 2 else (0.2, 0.5, 0.8)
    names = ("left", "right") if count == 2 else ("left", "centre", "right")
    if not horizontal:  # the same row, stood up
        names = ("top", "bottom") if count == 2 else ("top", "centre", "bottom")
    specs = [(shape, colour, size, name, (x, y) if horizontal else (y, x)) for x, name in zip(xs, names)]
    word = COUNT_WORDS[count]
    plural = _plural(shape)
    paraphrases = [
        f"{word} {colour} {plural}",
        f"{colour} {plural}",
        _with_article(f"{colour} {shape}"),
        f"{word} {plural}",
        f"{count} {colour} {plural}",
        f"a photo of {word} {colour} {plural}",
    ]
    return specs, f"{word} {size} {colour} {plural}", paraphrases


def _row(rng: random.Random, tone: str) -> tuple[list[_Spec], str, list[str]]:
    shapes = rng.sample(SHAPES, 3)
    colours = [_colour(rng, tone) for _ in shapes]
    y = rng.uniform(0.35, 0.65)
    specs = [(s, c, "small", p, (x, y)) for s, c, p, x in zip(shapes, colours, ("left", "centre", "right"), (0.2, 0.5, 0.8))]
    phrases = [_with_article(f"{c} {s}") for s, c in zip(shapes, colours)]
    listed = f"{phrases[0]}, {phrases[1]} and {phrases[2]}"
    paraphrases = [
        listed,
        *phrases,
        f"three shapes: {listed}",
        f"{phrases[2]}, {phrases[1]} and {phrases[0]}",
    ]
    return specs, f"{listed} in a row", paraphrases


def _colour(rng: random.Random, tone: str) -> str:
    """An object colour that stands out from the background tone."""
    visible = [name for name, rgb in COLOURS.items() if math.dist(rgb, BACKGROUND_TONES[tone]) >= _MIN_CONTRAST]
    return rng.choice(visible)


def _with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _plural(shape: str) -> str:
    return f"{shape}es" if shape.endswith(("s", "x")) else f"{shape}s"


# --- drawing ---------------------------------------------------------------------------------


def _jittered(rng: random.Random, rgb: tuple[int, int, int], amount: int = 12) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)


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


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, rgb: tuple[int, int, int], cx: float, cy: float,
                side: float, canvas: int) -> tuple[float, float, float, float]:
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
    elif shape == "hexagon":
        draw.regular_polygon((x, y, r), 6, fill=rgb)
    elif shape == "cross":
        w = r * 0.36
        draw.rectangle((x - w, y - r, x + w, y + r), fill=rgb)
        draw.rectangle((x - r, y - w, x + r, y + w), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return (x - r, y - r, x + r, y + r)


def _star(x: float, y: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
    return points
