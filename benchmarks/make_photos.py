"""Generate a seeded folder of photo-like JPEGs for the indexing benchmarks.

Real photos cost what they cost because of their size and their entropy: a 12-MP phone JPEG is
~3.5 MB, and that is what a decoder has to chew through. So the images here are smooth scenes
(a blurred random colour field plus a few shapes) with sensor-like noise on top, tuned so that a
4032x3024 frame at quality 90 lands near 3.5 MB. Each file depends only on (seed, index), so a
folder can be regenerated or extended bit for bit.

    python benchmarks/make_photos.py DIR --count 200 --size 4032x3024
    python benchmarks/make_photos.py DIR --count 500 --size 640x480
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Noise standard deviation (in 8-bit levels) that puts a 12-MP q90 frame near 3.5 MB; smaller
# frames get the same noise, as a smaller sensor would.
NOISE_SIGMA = 9.0
QUALITY = 90


def make_photo(seed: int, index: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng([seed, index])
    # Low-frequency colour field: a tiny random image scaled up smoothly reads as sky, walls, grass.
    field = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    scale = min(width, height)
    for _ in range(int(rng.integers(4, 10))):
        x, y = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(scale // 20, scale // 3, size=2)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        box = [int(x), int(y), int(x + w), int(y + h)]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    # Soften the shapes' edges the way a lens does, then add per-pixel sensor noise.
    image = image.filter(ImageFilter.GaussianBlur(radius=max(1, scale // 400)))
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0.0, NOISE_SIGMA, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_photo(args: tuple[Path, int, int, int, int]) -> int:
    folder, seed, index, width, height = args
    path = folder / f"IMG_{index:05d}.jpg"
    if not path.exists():
        exif = Image.Exif()
        exif[0x010F] = "clipsearch-bench"  # Make
        exif[0x0112] = 1  # Orientation: upright
        tmp = path.with_suffix(".part")
        make_photo(seed, index, width, height).save(tmp, "JPEG", quality=QUALITY, exif=exif)
        os.replace(tmp, path)
    return path.stat().st_size


def make_folder(folder: Path, count: int, width: int, height: int, seed: int = 0, workers: int | None = None) -> int:
    """Create (or complete) ``folder`` with ``count`` photos; returns the total bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder, seed, i, width, height) for i in range(count)]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return sum(pool.map(write_photo, jobs, chunksize=4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size", default="4032x3024", help="WIDTHxHEIGHT")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    total = make_folder(args.folder, args.count, width, height, args.seed)
    print(f"{args.count} photos, {width}x{height}, {total / args.count / 1e6:.2f} MB each on average, in {args.folder}")


if __name__ == "__main__":
    main()
