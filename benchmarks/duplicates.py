"""Near-duplicate groups (`clipsearch duplicates`): precision and recall per threshold, and the
time the grouping takes at 100k and 1M images.

Quality. Generated photo-like scenes (a smooth backdrop, a subject of a few shapes, sensor
noise), each saved with seven variants that are the same picture: re-encoded (JPEG q30-95),
resized (25-200%), cropped (up to 10% of each side), retouched (brightness and contrast ±15%),
stored rotated with an EXIF orientation that turns it back, converted PNG<->JPEG, and captioned
with a small date stamp. Beside each scene, two distractors that are different pictures: the
same subject elsewhere, and another subject in the same place. Everything is indexed with the
model, `find_duplicates` groups it, and pairwise precision and recall against the truth are
printed per threshold (exact copies do not occur: every file differs in its bytes).

Scale. Generated CLIP-like vectors (`common.clustered_vectors`) with 5% near-duplicates planted
(cosine ~0.995), grouped by `similar_pairs` + `components`, the part that grows with the
collection; recall of the planted pairs is printed beside the time.

    python benchmarks/duplicates.py                           # demo and random ViT-B/32, 100 scenes
    python benchmarks/duplicates.py --models demo --scenes 300
    python benchmarks/duplicates.py --scale 100000,1000000 --models ''
"""

from __future__ import annotations

import argparse
import io
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

VARIANTS = ("jpeg", "resize", "crop", "tone", "rotated", "format", "caption")
THRESHOLDS = (
    0.85,
    0.9,
    0.92,
    0.93,
    0.94,
    0.945,
    0.95,
    0.955,
    0.96,
    0.97,
    0.98,
    0.985,
    0.988,
    0.99,
    0.991,
    0.992,
    0.994,
    0.996,
)
SIZE = (320, 240)
_SHAPES = ("ellipse", "rectangle", "triangle")


# --- generated photos -------------------------------------------------------------------------


def backdrop(rng: np.random.Generator, size: tuple[int, int] = SIZE) -> Image.Image:
    """A smooth colour field with a horizon: sky, wall, grass."""
    field = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize(size, Image.Resampling.BICUBIC)
    horizon = int(size[1] * rng.uniform(0.3, 0.7))
    ground = tuple(int(c) for c in rng.integers(0, 256, 3))
    ImageDraw.Draw(image).rectangle([0, horizon, size[0], size[1]], fill=ground)
    return image.filter(ImageFilter.GaussianBlur(2))


def subject(rng: np.random.Generator) -> list[tuple[str, tuple[int, int, int], float]]:
    """Two to four shapes: (kind, colour, size as a fraction of the height)."""
    return [
        (str(rng.choice(_SHAPES)), tuple(int(c) for c in rng.integers(0, 256, 3)), float(rng.uniform(0.15, 0.4)))
        for _ in range(int(rng.integers(2, 5)))
    ]


def photo(place: int, thing: int, seed: int = 0, size: tuple[int, int] = SIZE) -> Image.Image:
    """Subject ``thing`` photographed at ``place``: where the shapes stand is the place's and the
    thing's together, so the same subject elsewhere is another picture."""
    image = backdrop(np.random.default_rng([seed, 0, place]), size)
    shapes = subject(np.random.default_rng([seed, 1, thing]))
    layout = np.random.default_rng([seed, 2, place, thing])
    draw = ImageDraw.Draw(image)
    width, height = size
    for kind, colour, fraction in shapes:
        side = fraction * height
        x, y = layout.uniform(0, width - side), layout.uniform(0, height - side)
        box = [x, y, x + side * layout.uniform(0.6, 1.4), y + side]
        if kind == "ellipse":
            draw.ellipse(box, fill=colour)
        elif kind == "rectangle":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(box[0], box[3]), ((box[0] + box[2]) / 2, box[1]), (box[2], box[3])], fill=colour)
    pixels = np.asarray(image, dtype=np.float32) + layout.normal(0, 5, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def variant(image: Image.Image, kind: str, rng: np.random.Generator, base_format: str) -> tuple[bytes, str]:
    """The same picture changed as ``kind`` says: (file bytes, extension)."""
    exif = None
    fmt, quality = "JPEG", 90
    if kind == "jpeg":
        quality = int(rng.integers(30, 96))
    elif kind == "resize":
        factor = rng.uniform(0.25, 2.0)
        image = image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.BICUBIC)
    elif kind == "crop":
        left, right = rng.uniform(0, 0.1, 2) * image.width / 2
        top, bottom = rng.uniform(0, 0.1, 2) * image.height / 2
        image = image.crop((round(left), round(top), round(image.width - right), round(image.height - bottom)))
    elif kind == "tone":
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15))
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.85, 1.15))
    elif kind == "rotated":
        orientation = int(rng.choice([3, 6, 8]))  # stored turned; the tag turns it back
        image = image.transpose(
            {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
        )
        exif = Image.Exif()
        exif[0x0112] = orientation
    elif kind == "format":
        fmt = "PNG" if base_format == "JPEG" else "JPEG"
    elif kind == "caption":
        image = image.copy()
        draw = ImageDraw.Draw(image)
        stamp = f"{int(rng.integers(2000, 2025))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
        draw.text((image.width * 0.7, image.height * 0.9), stamp, fill=(255, 160, 0))
    return encode(image, fmt, quality, exif), ".png" if fmt == "PNG" else ".jpg"


def encode(image: Image.Image, fmt: str, quality: int = 90, exif: Image.Exif | None = None) -> bytes:
    out = io.BytesIO()
    options: dict = {"quality": quality} if fmt == "JPEG" else {}
    if exif is not None:
        options["exif"] = exif
    image.save(out, fmt, **options)
    return out.getvalue()


def write_benchmark(folder: Path, scenes: int, seed: int = 0) -> dict[Path, int]:
    """Scenes with their variants and distractors under ``folder``; the truth: each file's group
    (a scene and its variants share one; every distractor is a group of its own)."""
    truth: dict[Path, int] = {}
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(scenes):
        base_format = "PNG" if i % 4 == 3 else "JPEG"  # both directions of the format change
        image = photo(place=i, thing=i, seed=seed)
        rng = np.random.default_rng([seed, 3, i])
        files = [(f"scene{i:04d}", encode(image, base_format), ".png" if base_format == "PNG" else ".jpg", i)]
        for kind in VARIANTS:
            data, ext = variant(image, kind, rng, base_format)
            files.append((f"scene{i:04d}-{kind}", data, ext, i))
        other = scenes + i  # a place and a subject no scene has
        files.append((f"scene{i:04d}-same-subject", encode(photo(other, i, seed), "JPEG"), ".jpg", 2 * scenes + i))
        files.append((f"scene{i:04d}-same-place", encode(photo(i, other, seed), "JPEG"), ".jpg", 3 * scenes + i))
        for name, data, ext, group in files:
            path = folder / f"{name}{ext}"
            if not path.exists():
                path.write_bytes(data)
            truth[path] = group
    return truth


# --- scoring ----------------------------------------------------------------------------------


def pairwise(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """Pairwise precision and recall of a grouping: of the pairs put together, how many belong
    together, and of those that belong together, how many were put together."""

    def pairs(labels: np.ndarray) -> set[tuple[int, int]]:
        found = set()
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            found |= {(int(a), int(b)) for j, a in enumerate(members) for b in members[j + 1 :]}
        return found

    true, guessed = pairs(truth), pairs(predicted)
    both = len(true & guessed)
    return (both / len(guessed) if guessed else 1.0), (both / len(true) if true else 1.0)


def score_thresholds(
    vectors: np.ndarray, truth: np.ndarray, thresholds: Sequence[float]
) -> list[tuple[float, float, float, int]]:
    """(threshold, precision, recall, groups) of the grouping at each threshold."""
    from clipsearch.duplicates import components, similar_pairs

    first, second, sims = similar_pairs(vectors, min(thresholds))
    rows = []
    for threshold in thresholds:
        keep = sims >= threshold
        labels = components(len(vectors), np.stack([first[keep], second[keep]]))
        precision, recall = pairwise(truth, labels)
        rows.append((threshold, precision, recall, len(set(labels[np.bincount(labels)[labels] > 1].tolist()))))
    return rows


def best_threshold(rows: Sequence[tuple[float, float, float, int]]) -> float:
    """The threshold with the best recall among those with precision >= 0.95 (the highest
    precision when none reaches it), ties to the higher threshold."""
    ok = [row for row in rows if row[1] >= 0.95]
    return max(ok or rows, key=lambda row: (row[2], row[0]) if ok else (row[1], row[0]))[0]


def quality(model: str, scenes: int, seed: int) -> tuple[list, dict[str, np.ndarray]]:
    """Index the benchmark with ``model`` and score it; also the cosine of each scene to each of
    its variants and distractors, by kind."""
    from common import bench_dir

    from clipsearch import Index

    folder = bench_dir(f"duplicates-{scenes}-s{seed}")
    truth = write_benchmark(folder, scenes, seed)
    home = bench_dir(f"duplicates-home-{scenes}-s{seed}-{model.replace('/', '_')[-40:]}")
    with Index.open(home, model=model) as index:
        index.add([folder])
        stored = index.catalog.model(index.model)
        ids, vectors = index.catalog.all_vectors(stored)
        paths = {row.id: Path(os.fsdecode(row.path)) for row in index.catalog.rows(ids.tolist()).values()}
    labels = np.array([truth[paths[i]] for i in ids.tolist()])
    position = {paths[i].name.rsplit(".", 1)[0]: n for n, i in enumerate(ids.tolist())}
    kinds = {}
    for kind in (*VARIANTS, "same-subject", "same-place"):
        kinds[kind] = np.array(
            [
                float(vectors[position[f"scene{i:04d}"]] @ vectors[position[f"scene{i:04d}-{kind}"]])
                for i in range(scenes)
            ]
        )
    return score_thresholds(vectors, labels, THRESHOLDS), kinds


# --- scale ------------------------------------------------------------------------------------


def scale(count: int) -> tuple[float, float, int]:
    """(seconds, recall of the planted pairs, pairs found) for ``count`` generated vectors."""
    from common import clustered_vectors, clusters_for

    from clipsearch.duplicates import components, default_threshold, similar_pairs

    planted = count // 20
    base = clustered_vectors(count - planted, clusters_for(count))
    rng = np.random.default_rng(5)
    source = rng.choice(len(base), planted, replace=False)
    noise = rng.standard_normal((planted, base.shape[1]), dtype=np.float32)
    copies = base[source] + 0.1 * noise / np.linalg.norm(noise, axis=1, keepdims=True)  # cosine ~0.995
    vectors = np.vstack([base, copies / np.linalg.norm(copies, axis=1, keepdims=True)])
    del base, copies, noise
    import torch  # noqa: F401  (imported once per process, not part of the grouping's time)

    started = time.perf_counter()
    first, second, _ = similar_pairs(vectors, default_threshold("ViT-B/32"))
    components(len(vectors), np.stack([first, second]))
    elapsed = time.perf_counter() - started
    found = set(zip(first.tolist(), second.tolist()))
    offset = len(vectors) - planted
    recall = float(np.mean([(int(s), offset + k) in found for k, s in enumerate(source)]))
    return elapsed, recall, len(first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", default="demo,vit-b-32-random", help="comma-separated; vit-b-32-random: random weights"
    )
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scale", default="", help="comma-separated vector counts to time, e.g. 100000,1000000")
    args = parser.parse_args()
    from common import machine, ours_env, random_model

    os.environ.update(ours_env())
    print(machine())
    for name in filter(None, args.models.split(",")):
        model = str(random_model("ViT-B-32")) if name == "vit-b-32-random" else name
        started = time.perf_counter()
        rows, kinds = quality(model, args.scenes, args.seed)
        print(
            f"\n## {name}: {args.scenes} scenes x {len(VARIANTS)} variants + {2 * args.scenes} distractors "
            f"({time.perf_counter() - started:.0f} s)\n"
        )
        print("| threshold | precision | recall | groups |\n|---|---|---|---|")
        for threshold, precision, recall, groups in rows:
            print(f"| {threshold:.3f} | {precision:.3f} | {recall:.3f} | {groups} |")
        best = best_threshold(rows)
        print(f"\nbest threshold (recall at precision >= 0.95): {best:.3f}")
        print(f"cosine to the scene, median and share >= {best:.3f}:")
        print(", ".join(f"{k} {np.median(v):.3f} {np.mean(v >= best):.2f}" for k, v in kinds.items()))
    for count in (int(c) for c in filter(None, args.scale.split(","))):
        elapsed, recall, pairs = scale(count)
        print(f"\nscale {count:,} vectors: {elapsed:.1f} s, planted-pair recall {recall:.4f}, {pairs:,} pairs")


if __name__ == "__main__":
    main()
