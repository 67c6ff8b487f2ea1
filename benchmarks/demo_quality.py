"""How well the bundled `demo` model finds what a query describes, on scenes it never saw.

The model was trained on synthetic scenes of seed 0 (training stream and held-out split); this
script generates 1,000 scenes of another seed and measures, with the generator's ground truth:

- text→image recall@1 and @5 for each scene's full caption, among all 1,000 images;
- precision@10 for single-attribute queries ("a red circle"): the fraction of the ten best
  images that hold an object of that colour and shape, averaged over the 60 colour–shape pairs;
- zero-shot shape classification of the one-object scenes ("a photo of a {shape}"), for scale.

Then the same model on shapes drawn by another program (`tests/drawn_shapes.py`: plain Pillow,
Pillow's colour names, ten styles), against "a {colour} {shape}" queries: top-1 and precision@5
over all drawings, and per style, colour and shape.

Usage: python benchmarks/demo_quality.py [--model demo] [--seed 20250] [--count 1000] [--per-pair 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from clipsearch import clip
from clipsearch.training.scenes import COLOURS, SHAPES, SceneGenerator

HELD_OUT_SEED = 20250  # never used for training: the demo model saw only seed 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo", help="model name or directory (default: demo)")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--per-pair", type=int, default=2, help="drawings of each colour-shape pair per style")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    model, preprocess = clip.load(args.model, device="cpu")
    scenes = SceneGenerator(args.seed, preprocess.resolution).take(args.count)
    with torch.no_grad():
        images = F.normalize(model.encode_image(torch.stack([preprocess(s.image) for s in scenes])), dim=-1)

        def embed(texts: list[str]) -> torch.Tensor:
            tokens = model.tokenizer(texts, context_length=model.context_length)
            return F.normalize(model.encode_text(tokens), dim=-1)

        # Recall: the rank of each caption's own image among all images.
        similarity = embed([s.caption for s in scenes]) @ images.t()
        ranks = (similarity > similarity.diagonal()[:, None]).sum(dim=1)
        recall = {k: (ranks < k).float().mean().item() for k in (1, 5, 10)}

        pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
        top10 = (embed([f"a {colour} {shape}" for colour, shape in pairs]) @ images.t()).topk(10, dim=1).indices
        precisions = [
            sum(scenes[j].contains(colour, shape) for j in top10[i].tolist()) / 10
            for i, (colour, shape) in enumerate(pairs)
        ]
        precision = sum(precisions) / len(precisions)
        worst = min(zip(precisions, pairs))
        # A pair held by fewer than 10 scenes cannot reach 1.0: the ceiling a perfect model gets.
        ceiling = sum(min(10, sum(s.contains(c, sh) for s in scenes)) / 10 for c, sh in pairs) / len(pairs)

        singles = [s for s in scenes if len(s.objects) == 1]
        prompts = embed([f"a photo of a {shape}" for shape in SHAPES])
        single_images = images[[scenes.index(s) for s in singles]]
        guesses = (single_images @ prompts.t()).argmax(dim=1).tolist()
        accuracy = sum(SHAPES[g] == s.objects[0].shape for g, s in zip(guesses, singles)) / len(singles)

    rows = [
        ("text→image recall@1 (full captions)", f"{recall[1]:.3f}", "-"),
        ("text→image recall@5 (full captions)", f"{recall[5]:.3f}", "≥ 0.8"),
        ("text→image recall@10 (full captions)", f"{recall[10]:.3f}", "-"),
        ("precision@10, 'a {colour} {shape}' (mean of 60)", f"{precision:.3f}", "≥ 0.9"),
        ("precision@10 of a perfect model on these scenes", f"{ceiling:.3f}", "-"),
        (f"precision@10, worst query ('a {worst[1][0]} {worst[1][1]}')", f"{worst[0]:.3f}", "-"),
        (f"zero-shot shape accuracy ({len(singles)} one-object scenes)", f"{accuracy:.3f}", "-"),
    ]
    width = max(len(row[0]) for row in rows)
    print(f"\n## demo model quality: {args.count} scenes of seed {args.seed}, model {args.model}\n")
    print(f"| {'metric'.ljust(width)} | value | target |")
    print(f"|{'-' * (width + 2)}|-------|--------|")
    for name, value, target in rows:
        print(f"| {name.ljust(width)} | {value} | {target.ljust(6)} |")
    drawn_table(model, preprocess, args.per_pair)
    print(f"\n({time.perf_counter() - started:.0f} s on CPU, {args.threads} thread(s))")


def drawn_table(model, preprocess, per_pair: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from drawn_shapes import drawings, evaluate

    items = drawings(per_pair=per_pair)
    scores = evaluate(model, preprocess, items)
    overall = scores["all"]["all"]
    print(f"\n## drawn by another renderer: {len(items)} drawings, 60 'a {{colour}} {{shape}}' queries\n")
    print(f"all drawings: top-1 {overall.top1:.3f}, precision@5 {overall.precision:.3f} (targets ≥ 0.9)\n")
    for group, title in (
        ("style", f"style (its {60 * per_pair} drawings only)"),
        ("colour", "colour"),
        ("shape", "shape"),
    ):
        k = next(iter(scores[group].values())).k
        print(f"| {title} | top-1 | precision@{k} |")
        print("|---|---|---|")
        for name, score in scores[group].items():
            print(f"| {name} | {score.top1:.3f} | {score.precision:.3f} |")
        print()


if __name__ == "__main__":
    main()
