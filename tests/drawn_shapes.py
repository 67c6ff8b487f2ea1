"""Coloured shapes drawn the way a person would draw them with Pillow, to judge the demo model.

The demo model is trained on `clipsearch.training.scenes`; judged on that generator's pictures it
would be judged on its own handwriting. This renderer shares nothing with it: its own geometry (a
heart from two discs and a triangle, a thinner star, a plus sign of thirds), Pillow's own colour
names (``fill="brown"`` is CSS brown, a dark red), and styles chosen as a person testing the model
would: a big shape on light grey, a small one in a corner of a large photo, outlines, rotations,
coloured and graded backgrounds, sensor noise with JPEG, a second object beside the first.

`evaluate` answers ``a {colour} {shape}`` queries over all the drawings at once and reports top-1
and precision@5, per style, colour and shape. `benchmarks/demo_quality.py` prints the table.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageColor, ImageDraw

SHAPE_NAMES = ("circle", "square", "triangle", "star", "heart", "cross")
COLOUR_NAMES = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "white", "black")
# Plain backgrounds for the coloured-background style, by Pillow's names.
BACKGROUND_NAMES = ("navy", "teal", "khaki", "lavender", "slategray", "wheat", "darkolivegreen", "skyblue", "tan")


@dataclass(frozen=True)
class Drawing:
    image: Image.Image
    colour: str
    shape: str
    style: str


def _rgb(name: str) -> tuple[int, int, int]:
    red, green, blue = ImageColor.getrgb(name)[:3]
    return red, green, blue


def _far_from(colour: str, candidates: tuple[str, ...], rng: random.Random) -> str:
    """A background name whose colour stands clear of the object's."""
    return rng.choice([c for c in candidates if math.dist(_rgb(c), _rgb(colour)) > 150])


def _outline(shape: str, x: float, y: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon points of a shape of half-extent ``r`` centred at (x, y), turned by ``angle`` degrees."""
    if shape == "square":
        unit = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "triangle":  # equilateral, pointing up
        unit = [(0, -1), (math.sqrt(3) / 2, 0.5), (-math.sqrt(3) / 2, 0.5)]
    elif shape == "star":
        unit = [
            (
                (1 if k % 2 == 0 else 0.4) * math.sin(k * math.pi / 5),
                -(1 if k % 2 == 0 else 0.4) * math.cos(k * math.pi / 5),
            )
            for k in range(10)
        ]
    elif shape == "cross":  # a plus sign whose arms are a third of its width
        t = 1 / 3
        unit = [
            (-t, -1),
            (t, -1),
            (t, -t),
            (1, -t),
            (1, t),
            (t, t),
            (t, 1),
            (-t, 1),
            (-t, t),
            (-1, t),
            (-1, -t),
            (-t, -t),
        ]
    else:
        raise ValueError(shape)
    turn = math.radians(angle)
    cos, sin = math.cos(turn), math.sin(turn)
    return [(x + r * (u * cos - v * sin), y + r * (u * sin + v * cos)) for u, v in unit]


def draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    colour: str,
    x: float,
    y: float,
    r: float,
    angle: float = 0.0,
    width: int = 0,
    background: str = "white",
) -> None:
    """Draw ``shape`` of half-extent ``r`` at (x, y): filled, or outlined ``width`` pixels wide
    (on ``background``, which an outlined heart needs)."""
    fill, outline = (None, colour) if width else (colour, None)
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=outline, width=width)
    elif shape == "heart":
        # Two discs on the shoulders and a triangle down to the point; an outlined heart is a
        # filled one with a smaller one of the background's colour inside.
        lobe = r * 0.52
        for cx in (x - r + lobe, x + r - lobe):
            draw.ellipse((cx - lobe, y - r, cx + lobe, y - r + 2 * lobe), fill=colour)
        draw.polygon(
            [(x - r * 0.98, y - r + lobe * 1.25), (x + r * 0.98, y - r + lobe * 1.25), (x, y + r)], fill=colour
        )
        if width:
            inner = r - 1.6 * width
            draw_shape(draw, "heart", background, x, y + 0.3 * width, inner)
    else:
        draw.polygon(_outline(shape, x, y, r, angle), fill=fill, outline=outline, width=width)


def _frame(size: tuple[int, int], background: str | tuple[int, int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", size, background)
    return image, ImageDraw.Draw(image)


def _centre_square(size: tuple[int, int]) -> tuple[float, float, float]:
    """Left, top and side of the central square: what CLIP's centre crop keeps."""
    w, h = size
    side = min(w, h)
    return (w - side) / 2, (h - side) / 2, side


def _placed(rng: random.Random, size: tuple[int, int], fraction: float) -> tuple[float, float, float]:
    """Centre and half-extent of a shape ``fraction`` of the kept square wide, anywhere inside it."""
    left, top, side = _centre_square(size)
    r = fraction * side / 2
    return left + rng.uniform(r, side - r), top + rng.uniform(r, side - r), r


# --- styles: each draws one (colour, shape) ----------------------------------------------------


def plain(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """A large shape in the middle of a light-grey frame, as in the report that started this."""
    image, draw = _frame((256, 256), "lightgrey")
    draw_shape(draw, shape, colour, 128, 128, 0.6 * 128)
    return image


def filling(colour: str, shape: str, rng: random.Random) -> Image.Image:
    image, draw = _frame((128, 128), _far_from(colour, ("white", "lightgrey", "gray", "black"), rng))
    draw_shape(draw, shape, colour, 64, 64, 0.92 * 64)
    return image


def small(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """A quarter of the frame wide, anywhere, in a large picture."""
    image, draw = _frame((512, 512), _far_from(colour, ("white", "lightgrey", "gray", "dimgray"), rng))
    draw_shape(draw, shape, colour, *_placed(rng, image.size, 0.25))
    return image


def outlined(colour: str, shape: str, rng: random.Random) -> Image.Image:
    background = _far_from(colour, ("white", "black", "lightgrey"), rng)
    image, draw = _frame((256, 256), background)
    x, y, r = _placed(rng, image.size, rng.uniform(0.45, 0.8))
    draw_shape(draw, shape, colour, x, y, r, width=max(3, round(0.08 * r)), background=background)
    return image


def smooth(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """Anti-aliased: drawn four times larger and shrunk with a Lanczos filter."""
    big, draw = _frame((1024, 1024), _far_from(colour, ("white", "gray", "black", "silver"), rng))
    draw_shape(draw, shape, colour, *_placed(rng, big.size, rng.uniform(0.35, 0.75)))
    return big.resize((256, 256), Image.Resampling.LANCZOS)


def coloured_background(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """A landscape frame of a named colour; the shape in the part the centre crop keeps."""
    image, draw = _frame((320, 240), _far_from(colour, BACKGROUND_NAMES, rng))
    draw_shape(draw, shape, colour, *_placed(rng, image.size, rng.uniform(0.4, 0.7)))
    return image


def gradient(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """A vertical gradient between two clear colours."""
    a, b = rng.sample(
        [
            c
            for c in ("white", "lightgrey", "gray", "black", *BACKGROUND_NAMES)
            if math.dist(_rgb(c), _rgb(colour)) > 150
        ],
        2,
    )
    t = np.linspace(0, 1, 200, dtype=np.float32)[:, None, None]
    pixels = np.array(_rgb(a), np.float32) * (1 - t) + np.array(_rgb(b), np.float32) * t
    image = Image.fromarray(np.repeat(pixels, 200, axis=1).round().astype(np.uint8))
    draw_shape(ImageDraw.Draw(image), shape, colour, *_placed(rng, image.size, rng.uniform(0.4, 0.7)))
    return image


def noisy_photo(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """A portrait frame with sensor noise, saved as a JPEG of quality 75."""
    image, draw = _frame((300, 400), _far_from(colour, ("white", "lightgrey", "gray", "tan", "skyblue"), rng))
    draw_shape(draw, shape, colour, *_placed(rng, image.size, rng.uniform(0.35, 0.7)))
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 12, (400, 300, 3))
    noisy = Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    noisy.save(buffer, "JPEG", quality=75)
    return Image.open(buffer).convert("RGB")


def turned(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """Rotated by any angle (the heart, which is not a heart upside down, is drawn upright)."""
    image, draw = _frame((256, 256), _far_from(colour, ("white", "lightgrey", "gray", "black"), rng))
    x, y, r = _placed(rng, image.size, rng.uniform(0.45, 0.75))
    draw_shape(draw, shape, colour, x, y, r, angle=rng.uniform(0, 360))
    return image


def with_another(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """Beside another object of another colour and shape: the query must find its own."""
    image, draw = _frame((256, 256), "whitesmoke" if colour != "white" else "dimgray")
    other_shape = rng.choice([s for s in SHAPE_NAMES if s != shape])
    other_colour = rng.choice([c for c in COLOUR_NAMES if c != colour and c not in ("white", "black")])
    slots = [(64, 128), (192, 128)]
    rng.shuffle(slots)
    draw_shape(draw, shape, colour, *slots[0], 0.8 * 64)
    draw_shape(draw, other_shape, other_colour, *slots[1], 0.8 * 64)
    return image


STYLES: dict[str, Callable[[str, str, random.Random], Image.Image]] = {
    "plain": plain,
    "filling": filling,
    "small": small,
    "outlined": outlined,
    "smooth": smooth,
    "coloured background": coloured_background,
    "gradient": gradient,
    "noisy photo": noisy_photo,
    "turned": turned,
    "with another": with_another,
}


def drawings(per_pair: int = 2, seed: int = 0) -> list[Drawing]:
    """Every (colour, shape) pair in every style, ``per_pair`` times (different places and sizes)."""
    rng = random.Random(seed)
    return [
        Drawing(draw(colour, shape, rng), colour, shape, style)
        for style, draw in STYLES.items()
        for colour in COLOUR_NAMES
        for shape in SHAPE_NAMES
        for _ in range(per_pair)
    ]


@dataclass
class Scores:
    top1: float  # share of queries whose best image holds the colour and shape asked for
    precision: float  # share of right images among each query's best k, averaged
    k: int  # 5, or fewer where fewer images hold each pair (k = 2 within one style)


def evaluate(model, preprocess, items: list[Drawing]) -> dict[str, dict[str, Scores]]:
    """Answer every ``a {colour} {shape}`` query over ``items``: scores over all of them
    (``["all"]["all"]``), and per style (among that style's drawings only), per colour and per
    shape (the queries of that colour or shape, over all drawings)."""
    with torch.no_grad():
        images = F.normalize(model.encode_image(torch.stack([preprocess(d.image) for d in items])).float(), dim=-1)
        pairs = [(c, s) for c in COLOUR_NAMES for s in SHAPE_NAMES]
        tokens = model.tokenizer([f"a {c} {s}" for c, s in pairs], context_length=model.context_length)
        texts = F.normalize(model.encode_text(tokens).float(), dim=-1)
    similarity = texts @ images.t()  # [60 queries, N images]
    truth = torch.tensor([[d.colour == c and d.shape == s for d in items] for c, s in pairs])

    def scores(queries: list[int], columns: list[int]) -> Scores:
        sims, right = similarity[queries][:, columns], truth[queries][:, columns]
        k = min(5, int(right.sum(dim=1).min()))
        hits = right.gather(1, sims.topk(k, dim=1).indices).float()
        return Scores(hits[:, 0].mean().item(), hits.mean().item(), k)

    everything = list(range(len(items)))
    result: dict[str, dict[str, Scores]] = {"all": {"all": scores(list(range(len(pairs))), everything)}}
    result["style"] = {
        style: scores(list(range(len(pairs))), [i for i, d in enumerate(items) if d.style == style]) for style in STYLES
    }
    result["colour"] = {c: scores([i for i, p in enumerate(pairs) if p[0] == c], everything) for c in COLOUR_NAMES}
    result["shape"] = {s: scores([i for i, p in enumerate(pairs) if p[1] == s], everything) for s in SHAPE_NAMES}
    return result
