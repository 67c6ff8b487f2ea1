"""Target 6: the GPU path. fp16 batches, pinned memory, decode workers feeding the GPU.

Indexes a generated folder with ViT-B/32 and ViT-L/14 (random weights) on CUDA through the
library, while `nvidia-smi` samples the GPU's utilisation; prints images/s and the mean and
peak utilisation reached, plus the model alone on a preprocessed batch (the ceiling the
decoders would have to feed). Without CUDA it says so and exits 0.

    python benchmarks/gpu.py
    python benchmarks/gpu.py --count 4000 --size 1024x768 --batch 256
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time

from common import BENCH_DIR, fmt, ours_env, photo_folder, print_table, random_model

ARCHS = ("ViT-B-32", "ViT-L-14")


class Utilisation:
    """Samples `nvidia-smi` every 200 ms in the background."""

    def __enter__(self) -> Utilisation:
        self.process = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
            stdout=subprocess.PIPE,
            text=True,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        output, _ = self.process.communicate()
        self.samples = [float(line) for line in output.split() if line.strip().replace(".", "").isdigit()]


def model_only(arch: str, batch: int) -> float:
    """Images/s of the image tower alone, fp16 on the GPU, input already there."""
    import torch

    from clipsearch.encoder import Encoder

    encoder = Encoder(str(random_model(arch)), device="cuda", towers="image")
    pixels = torch.randn(batch, 3, encoder.resolution, encoder.resolution, device="cuda", dtype=encoder.input_dtype)
    with torch.inference_mode():
        for _ in range(3):
            encoder.model.encode_image(pixels)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            encoder.model.encode_image(pixels)
        torch.cuda.synchronize()
    return 10 * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("skipped: no CUDA")
        return
    os.environ.update(ours_env())
    from clipsearch import Index

    width, height = (int(v) for v in args.size.split("x"))
    folder = photo_folder(args.count, width, height)
    rows = []
    for arch in ARCHS:
        home = tempfile.mkdtemp(prefix="gpu-home-", dir=BENCH_DIR)
        try:
            with Index.open(home, model=str(random_model(arch)), device="cuda") as index:
                index.encoder("image")  # load outside the timed part, as a long run amortises it
                with Utilisation() as gpu:
                    report = index.add([folder], batch_size=args.batch)
            samples = gpu.samples or [0.0]
            rows += [
                (f"images/s, {arch}, {args.count} x {args.size}, end to end", fmt(report.images_per_s), "-", "-"),
                (
                    f"GPU utilisation %, {arch}, mean / peak",
                    f"{sum(samples) / len(samples):.0f} / {max(samples):.0f}",
                    "-",
                    "-",
                ),
                (
                    f"images/s, {arch}, model alone (fp16, batch {args.batch})",
                    fmt(model_only(arch, args.batch)),
                    "-",
                    "-",
                ),
            ]
        finally:
            shutil.rmtree(home)
    print_table(
        "GPU path (target 6)",
        rows,
        [f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores for decoding; random weights."],
    )


if __name__ == "__main__":
    main()
