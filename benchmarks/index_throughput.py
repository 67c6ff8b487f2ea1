"""Target 2: end-to-end indexing, ours against rclip 3.3 on the same folder, architecture and machine.

Each run is a new process timed from outside (/usr/bin/time -v): start-up, model load, walk,
decode, encode, write. rclip runs `rclip QUERY` inside the folder with an empty database (it
indexes, then answers the query); we run `clipsearch --home NEW index FOLDER --model M`. Both
run OpenCLIP ViT-B-32-256 at random weights (rclip through its ONNX files, we through our
OpenCLIP checkpoint path). The two tools alternate, and the files are read once beforehand so
both find them in the page cache.

    python benchmarks/peers.py setup          # once: the peer venv and rclip's model files
    python benchmarks/index_throughput.py     # 200 x 12 MP and 500 x 640x480
    python benchmarks/index_throughput.py --large 50 --small 0 --repeats 1
    python benchmarks/index_throughput.py --large 0 --small 0 --library 5000   # a first run's size
    python benchmarks/index_throughput.py --no-peer    # ours only, where rclip cannot be set up
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import peers
from common import BENCH_DIR, clipsearch_command, fmt, median, ours_env, photo_folder, print_table, random_model, ratio

ARCH = "ViT-B-32-256"  # rclip 3.x's architecture


def warm_page_cache(folder: Path) -> None:
    for path in folder.iterdir():
        path.read_bytes()


def ours(folder: Path, model: Path, extra: list[str]) -> peers.TimedRun:
    home = Path(tempfile.mkdtemp(prefix="home-", dir=BENCH_DIR))
    try:
        return peers.time_command(
            [*clipsearch_command(), "--home", str(home), "index", str(folder), "--model", str(model), *extra],
            env=ours_env(),
        )
    finally:
        shutil.rmtree(home)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", type=int, default=200, help="4032x3024 photos (0 to skip)")
    parser.add_argument("--small", type=int, default=500, help="640x480 photos (0 to skip)")
    parser.add_argument("--library", type=int, default=0, help="640x480 photos of a library-sized row (0 to skip)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each tool per corpus, alternating")
    parser.add_argument("--no-peer", action="store_true", help="time ours only (rclip not set up here)")
    parser.add_argument("--precision", default="auto", help="ours: --precision (auto, bf16, int8, fp32)")
    parser.add_argument("--fp32-too", action="store_true", help="also time ours with --precision fp32")
    args = parser.parse_args()

    if not args.no_peer:
        peers.setup()
    model = random_model(ARCH)
    variants = {"ours": ["--precision", args.precision]}
    if args.fp32_too:
        variants["ours fp32"] = ["--precision", "fp32"]
    rows = []
    corpora = ((args.large, (4032, 3024), 2.0), (args.small, (640, 480), 1.5), (args.library, (640, 480), 1.5))
    for count, (width, height), target in corpora:
        if count == 0:
            continue
        folder = photo_folder(count, width, height)
        warm_page_cache(folder)
        walls: dict[str, list[float]] = {"rclip": [], **{name: [] for name in variants}}
        rss: dict[str, float] = {"rclip": 0.0}
        for _ in range(args.repeats):
            if not args.no_peer:
                run = peers.rclip(folder, fresh=True)
                walls["rclip"].append(run.wall_s)
                rss["rclip"] = run.max_rss_mib
            for name, extra in variants.items():
                run = ours(folder, model, extra)
                walls[name].append(run.wall_s)
                rss[name] = run.max_rss_mib
        label = f"{count} x {width}x{height}"
        peer_speed = count / median(walls["rclip"]) if walls["rclip"] else None
        for name in variants:
            speed = count / median(walls[name])
            rows.append(
                (
                    f"images/s, {label}, {name} vs rclip (target {target}x)",
                    fmt(speed),
                    fmt(peer_speed),
                    ratio(speed, peer_speed),
                )
            )
            rows.append(
                (
                    f"peak RSS MiB, {label}, {name}",
                    fmt(rss[name]),
                    fmt(rss["rclip"] or None),
                    ratio(rss[name], rss["rclip"] or None, higher_is_better=False),
                )
            )
    print_table(
        "End-to-end indexing (target 2)",
        rows,
        [
            f"{ARCH} at random weights on both sides; wall time of a whole new process, median of "
            f"{args.repeats} alternating run(s); files in the page cache. rclip's run includes its one query."
        ],
    )


if __name__ == "__main__":
    main()
