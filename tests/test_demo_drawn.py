"""The bundled demo model on shapes drawn by another program (`drawn_shapes`), not its generator.

The issue's bar: over all drawings, top-1 and precision@5 of ``a {colour} {shape}`` queries at
least 0.9. `benchmarks/demo_quality.py` prints the full table (per style, colour and shape).
"""

import math
import random

import numpy as np
import pytest
import torch
from drawn_shapes import COLOUR_NAMES, SHAPE_NAMES, STYLES, drawings, evaluate
from PIL import ImageColor

from clipsearch import clip


@pytest.fixture(scope="module")
def drawn():
    return drawings(per_pair=2, seed=0)


def test_every_style_draws_the_named_colour_over_a_clear_part_of_the_image():
    rng = random.Random(1)
    for style, draw in STYLES.items():
        for colour in COLOUR_NAMES:
            image = draw(colour, "circle", rng)
            pixels = np.asarray(image.convert("RGB"), dtype=float)
            target = np.array(ImageColor.getrgb(colour)[:3], dtype=float)
            near = (np.linalg.norm(pixels - target, axis=-1) < 40).mean()
            assert near > 0.004, (style, colour, near)  # at least a thin outline's worth


def test_the_renderer_covers_every_pair_in_every_style(drawn):
    assert len(drawn) == len(STYLES) * len(COLOUR_NAMES) * len(SHAPE_NAMES) * 2
    assert {(d.colour, d.shape, d.style) for d in drawn} == {
        (c, s, style) for c in COLOUR_NAMES for s in SHAPE_NAMES for style in STYLES
    }


def test_demo_finds_drawn_shapes_by_colour_and_shape(drawn):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, preprocess = clip.load("demo", device="cpu")
        scores = evaluate(model, preprocess, drawn)
    finally:
        torch.set_num_threads(before)
    overall = scores["all"]["all"]
    assert overall.k == 5
    assert overall.top1 >= 0.9 and overall.precision >= 0.9, overall
    # No style of one object is a blind spot (measured: 0.77 for shapes filling the frame, at
    # least 0.88 for the others). Two objects side by side are the known weakness: 0.20, where
    # chance is 2 right drawings in 120.
    for style, score in scores["style"].items():
        floor = 0.15 if style == "with another" else 0.7
        assert score.top1 >= floor and not math.isnan(score.top1), (style, score)
