"""Target 1: CLIP image-tower throughput on CPU, ours against open_clip fp32 eager.

Both models hold the same random weights (speed does not depend on their values); ours is
built from open_clip's state dict, so their fp32 outputs agree and every cosine below is
against our fp32 embeddings of the same batch. The batch is generated photos preprocessed the
usual way, not Gaussian noise. Candidates take turns, batch after batch, so machine noise
lands on all of them alike; the ratio is of medians.

    python benchmarks/model_throughput.py                      # ViT-B-32, batch 32, 2 threads
    python benchmarks/model_throughput.py --threads 1 --compile
    python benchmarks/model_throughput.py --arch ViT-B-16-SigLIP --batch 8   # the SigLIP B/16 row
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import torch
import torch.nn.functional as F
from common import fmt, interleaved, median, photo_folder, print_table, ratio

warnings.filterwarnings("ignore", category=UserWarning)


def photo_batch(count: int, resolution: int, siglip: bool = False) -> torch.Tensor:
    """Generated photos, preprocessed as the model's family does (SigLIP: squashed, mean = std = 0.5)."""
    import open_clip
    from PIL import Image

    settings = dict(mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash") if siglip else {}
    transform = open_clip.image_transform(resolution, is_train=False, **settings)
    folder = photo_folder(count, 640, 480)
    return torch.stack([transform(Image.open(path)) for path in sorted(folder.glob("*.jpg"))[:count]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-32", help="an open_clip architecture name")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (its compile time is printed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("clipsearch").setLevel(logging.INFO)
    torch.set_num_threads(args.threads)

    import open_clip

    from clipsearch.clip import cpu
    from clipsearch.clip.build import build_model

    torch.manual_seed(0)
    peer = open_clip.create_model(args.arch, pretrained=None).eval()
    siglip = hasattr(peer.visual, "trunk")  # a timm image tower: SigLIP, whose shapes say the rest
    quick_gelu = not siglip and peer.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"
    state = peer.state_dict()

    def ours() -> torch.nn.Module:
        return build_model(state, towers="image", quick_gelu=quick_gelu)

    batch = photo_batch(args.batch, peer.visual.image_size[0], siglip)
    fp32 = ours()
    with torch.inference_mode():
        reference = fp32.encode_image(batch)

    auto = cpu.prepare_for_inference(ours(), "auto")
    candidates = {
        "peer fp32": peer.encode_image,
        "ours fp32": fp32.encode_image,
        f"ours auto ({auto.precision})": auto.model.encode_image,
    }
    if auto.precision != "int8" and cpu.has_int8_kernels():
        candidates["ours int8"] = cpu.prepare_for_inference(ours(), "int8").model.encode_image
    if auto.precision != "bf16" and cpu.has_native_bf16():
        candidates["ours bf16"] = cpu.prepare_for_inference(ours(), "bf16").model.encode_image
    compile_seconds = None
    if args.compile:
        compiled = torch.compile(ours())
        start = time.perf_counter()
        with torch.inference_mode():
            compiled.encode_image(batch)
        compile_seconds = time.perf_counter() - start
        candidates["ours fp32 compiled"] = compiled.encode_image

    with torch.inference_mode():
        cosines = {
            name: F.cosine_similarity(run(batch).float(), reference).min().item() for name, run in candidates.items()
        }
        for run in candidates.values():  # warm-up: first calls pay for allocation and packing
            run(batch)
        seconds = interleaved({name: (lambda run=run: run(batch)) for name, run in candidates.items()}, args.repeats)

    speed = {name: args.batch / median(times) for name, times in seconds.items()}
    best = {name: args.batch / min(times) for name, times in seconds.items()}
    rows = []
    for name in candidates:
        if name != "peer fp32":
            rows.append(
                (
                    f"images/s, {name} (median)",
                    fmt(speed[name]),
                    fmt(speed["peer fp32"]),
                    ratio(speed[name], speed["peer fp32"]),
                )
            )
            rows.append(
                (
                    f"images/s, {name} (best)",
                    fmt(best[name]),
                    fmt(best["peer fp32"]),
                    ratio(best[name], best["peer fp32"]),
                )
            )
    for name in candidates:
        if name != "peer fp32":
            rows.append((f"min cosine to our fp32, {name}", f"{cosines[name]:.5f}", "-", "-"))
    notes = [
        f"{args.arch}, batch {args.batch}, {args.threads} threads, {args.repeats} interleaved repeats "
        f"(median and best); peer = open_clip fp32 eager; {len(batch)} generated photos at "
        f"{batch.shape[-1]} px; target: auto >= 1.6x peer, "
        f"cosine >= {cpu.MIN_COSINE}."
    ]
    if not cpu.has_native_bf16():
        notes.append("bf16 not timed: this CPU has no bf16 instructions (emulated bf16 runs ~10x slower than fp32).")
    if compile_seconds is not None:
        notes.append(f"torch.compile: first call took {compile_seconds:.1f} s (compile time, not in the images/s).")
    print_table("Model throughput (target 1)", rows, notes)


if __name__ == "__main__":
    main()
