"""Target 3: re-running `clipsearch index` over 100,000 unchanged files takes at most 3 s.

The files are tiny unique JPEGs in 100 folders, indexed once with a tiny random model (what a
re-run costs does not depend on the model: with nothing changed none is loaded). Then each
re-run is a new process timed from outside: start-up, one walk, one bulk comparison with the
catalog. Files and catalog are in the page cache (the machine is shared, so caches are not
dropped).

With --peer, also the like-for-like against rclip on the 500-photo folder: its second run
(start-up + walk + one query; rclip always answers a query) against our re-run plus a query.

    python benchmarks/rerun.py
    python benchmarks/rerun.py --files 20000 --peer
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import peers
from common import bench_dir, clipsearch_command, fmt, median, ours_env, photo_folder, print_table, random_model, ratio

FOLDERS = 100
TARGET_S = 3.0


def tiny_files(count: int) -> Path:
    """``count`` unique 16x16 JPEGs (a few hundred bytes each) spread over `FOLDERS` folders."""
    from PIL import Image

    root = bench_dir(f"tiny-files-{count}")
    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"{i % FOLDERS:03d}"
        folder.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=75)
        (folder / f"{i:06d}.jpg").write_bytes(buffer.getvalue())
    done.touch()
    return root


def tiny_model() -> Path:
    """A random CLIP small enough that the first (full) index of 100k files takes minutes."""
    from clipsearch.clip.checkpoints import write_model_dir
    from clipsearch.clip.model import CLIP, ModelConfig
    from clipsearch.clip.preprocess import CLIP_MEAN, CLIP_STD

    folder = bench_dir("models") / "tiny-random"
    if not (folder / "model.safetensors").exists():
        config = ModelConfig(
            embed_dim=512,
            image_resolution=32,
            vision_layers=1,
            vision_width=64,
            vision_patch_size=16,
            vision_heads=1,
            context_length=77,
            vocab_size=49408,
            text_width=64,
            text_heads=1,
            text_layers=1,
        )
        vocab = Path(ours_env()["XDG_CACHE_HOME"]) / "clipsearch" / "models"
        write_model_dir(folder, CLIP(config), next(vocab.glob("*.txt.gz")), mean=CLIP_MEAN, std=CLIP_STD)
    return folder


def indexed_home(name: str, folder: Path, model: Path) -> Path:
    """An index of ``folder`` built once and kept between runs of this script."""
    home = bench_dir(name)
    if not (home / ".complete").exists():
        run = peers.time_command(
            [*clipsearch_command(), "--home", str(home), "index", str(folder), "--model", str(model)], env=ours_env()
        )
        print(f"first index of {folder}: {run.wall_s:.1f} s ({run.output.strip()})")
        (home / ".complete").touch()
    return home


def rerun(home: Path, folder: Path) -> peers.TimedRun:
    run = peers.time_command([*clipsearch_command(), "--home", str(home), "index", str(folder)], env=ours_env())
    if "new 0," not in run.output or "changed 0," not in run.output:
        raise RuntimeError(f"the re-run found work to do: {run.output.strip()}")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer", action="store_true", help="also compare with rclip's second run on 500 photos")
    args = parser.parse_args()

    root = tiny_files(args.files)
    home = indexed_home(f"rerun-home-{args.files}", root, tiny_model())
    runs = [rerun(home, root) for _ in range(args.repeats)]
    walls = [run.wall_s for run in runs]
    rows = [
        (
            f"re-run wall s, {args.files:,} unchanged files (target <= {TARGET_S})",
            fmt(median(walls)),
            "-",
            "met" if median(walls) <= TARGET_S else f"{median(walls) / TARGET_S:.2f}x over",
        ),
        (f"re-run peak RSS MiB, {args.files:,} files", fmt(max(run.max_rss_mib for run in runs)), "-", "-"),
    ]

    if args.peer:
        peers.setup()
        photos = photo_folder(500, 640, 480)
        peer_home = indexed_home("rerun-home-photos", photos, random_model("ViT-B-32-256"))
        peers.rclip(photos, fresh=False)  # makes sure rclip has indexed this folder
        ours_walls, peer_walls = [], []
        for _ in range(args.repeats):
            peer_walls.append(peers.rclip(photos, fresh=False).wall_s)
            query = peers.time_command(
                [*clipsearch_command(), "--home", str(peer_home), "query", "a photo of a dog"], env=ours_env()
            )
            ours_walls.append(rerun(peer_home, photos).wall_s + query.wall_s)
        rows.append(
            (
                "re-run + one query wall s, 500 unchanged photos",
                fmt(median(ours_walls)),
                fmt(median(peer_walls)),
                ratio(median(ours_walls), median(peer_walls), higher_is_better=False),
            )
        )
    print_table(
        "Incremental re-run (target 3)",
        rows,
        [f"median of {args.repeats} runs, each a new process timed by /usr/bin/time; warm page cache."],
    )


if __name__ == "__main__":
    main()
