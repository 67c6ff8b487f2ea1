"""Reduced JPEG decoding (Pillow's draft mode) against full decoding, before CLIP's preprocess.

For each generated 12-MP photo (4032x3024, quality 90, see make_photos.py) this times
`open_image` + `Preprocess` on one core, full decode against draft decode (the JPEG decoder
downscales by 1/2, 1/4 or 1/8 while keeping the short side at least twice the model's
resolution), the two taking turns. Then it embeds both inputs with a ViT-B/32 holding
random weights and reports the cosine similarity between the two embeddings of each photo
(issue target: >= 0.999).

    python benchmarks/draft_decode.py                 # 8 photos, 5 timed rounds
    python benchmarks/draft_decode.py --count 16 --repeats 3
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import fmt, interleaved, median, photo_folder, print_table

from clipsearch.clip.model import CLIP, ModelConfig
from clipsearch.clip.preprocess import Preprocess, open_image

VIT_B_32 = ModelConfig(
    embed_dim=512,
    image_resolution=224,
    vision_layers=12,
    vision_width=768,
    vision_patch_size=32,
    vision_heads=12,
    context_length=77,
    vocab_size=49408,
    text_width=512,
    text_heads=8,
    text_layers=12,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=8, help="photos")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds over all photos")
    args = parser.parse_args()
    torch.set_num_threads(1)

    paths = sorted(photo_folder(args.count, 4032, 3024).glob("*.jpg"))[: args.count]
    resolution = VIT_B_32.image_resolution
    preprocess = Preprocess(resolution)

    def full_decode() -> list[torch.Tensor]:
        return [preprocess(open_image(path)) for path in paths]

    def draft_decode() -> list[torch.Tensor]:
        return [preprocess(open_image(path, target=resolution)) for path in paths]

    seconds = interleaved({"full": full_decode, "draft": draft_decode}, args.repeats)
    full_ms = median(seconds["full"]) / len(paths) * 1000
    draft_ms = median(seconds["draft"]) / len(paths) * 1000

    full_inputs, draft_inputs = torch.stack(full_decode()), torch.stack(draft_decode())
    torch.manual_seed(0)
    model = CLIP(VIT_B_32, towers="image").eval()
    with torch.no_grad():
        cosines = F.cosine_similarity(model.encode_image(full_inputs), model.encode_image(draft_inputs), dim=-1)
    pixel_diff = (full_inputs - draft_inputs).abs()

    decoded = open_image(paths[0], target=resolution).size
    print_table(
        f"Draft JPEG decoding, {len(paths)} photos 4032x3024 q90, ViT-B/32 input {resolution}, 1 core",
        [
            (
                "decode + preprocess, ms/image",
                fmt(draft_ms, "ms"),
                fmt(full_ms, "ms"),
                f"{full_ms / draft_ms:.2f}x faster",
            ),
            ("embedding cosine to full decode, min", f"{cosines.min().item():.6f}", "1", "-"),
            ("embedding cosine to full decode, mean", f"{cosines.mean().item():.6f}", "1", "-"),
            (
                "input tensor |diff|, mean / max",
                f"{pixel_diff.mean().item():.4f} / {pixel_diff.max().item():.3f}",
                "0",
                "-",
            ),
        ],
        notes=[
            f"ours = draft decode (decoded at {decoded[0]}x{decoded[1]}), peer = full decode; "
            f"ViT-B/32 with random weights (seed 0); issue target: cosine >= 0.999."
        ],
    )


if __name__ == "__main__":
    main()
