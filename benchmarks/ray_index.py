"""Indexing on Ray against indexing in one process, on this machine, and the driver's commit rate.

Two questions for `docs/scale.md`:

1. What Ray costs on one node: the same folder indexed by `Index.add` locally and with
   ``ray="auto"`` on a local cluster of all the machine's CPUs (each run into a new index,
   taking turns; the cluster is started once, before, and its start timed apart). "steady" is the rate between the
   first and the last committed batch, without start-up (model loads, actor start).
2. The ceiling of any cluster feeding one catalog: rows/s that `Catalog.commit_batch` takes in,
   512-d vectors included, one transaction per batch, as the Ray driver commits them; and what
   each catalog row costs on disk and in the driver's diff (`Catalog.file_states`).

    python benchmarks/ray_index.py                          # 200 x 640x480, ViT-B/32 at random weights
    python benchmarks/ray_index.py --count 100 --model demo --commit-rows 20000
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from common import fmt, ours_env, photo_folder, print_table, random_model, seconds


class Timeline:
    """The progress callback: when each batch was committed."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.points: list[tuple[float, int]] = []

    def __call__(self, done: int, total: int) -> None:
        if done:
            self.points.append((time.perf_counter(), done))

    def first(self) -> str:
        """Seconds from the call to the first committed batch."""
        return f"{self.points[0][0] - self.started:.1f}" if self.points else "-"

    def steady(self) -> float | None:
        """Images/s from the first committed batch to the last."""
        if len(self.points) < 2:
            return None
        (t0, d0), (t1, d1) = self.points[0], self.points[-1]
        return (d1 - d0) / (t1 - t0)


def index_once(folder: Path, model: str, ray: str | None) -> tuple[float, Timeline, int]:
    from clipsearch.index import Index

    with tempfile.TemporaryDirectory(prefix="ray-bench-") as home, Index.open(home, model) as index:
        timeline = Timeline()
        report = index.add([folder], progress=timeline, ray=ray)
        wall = time.perf_counter() - timeline.started
    return wall, timeline, report.new


def commit_rate(rows: int, batch: int, dim: int = 512) -> tuple[float, float, float, float]:
    """Rows/s into a new catalog, ``batch`` rows with their vectors per transaction; the
    catalog's bytes per row once they are in (WAL checkpointed); and what the driver's diff then
    costs per row: reading the file states (µs) and holding them (bytes of Python objects)."""
    from clipsearch.catalog import CATALOG_FILE, Catalog
    from clipsearch.records import IndexedFile

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((batch, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory(prefix="commit-bench-") as home:
        with Catalog.open(home, create=True) as catalog:

            def commit_all() -> None:
                for start in range(0, rows, batch):
                    files = [
                        # a path as long as an archive's (~60 bytes), a random-looking fingerprint
                        IndexedFile(
                            b"/mnt/archive/2024/11/27/camera-07/IMG_%09d.jpg" % i,
                            2_000_000 + i,
                            1_700_000_000_000_000_000 + i,
                            rng.bytes(16),
                            4032,
                            3024,
                            v,
                        )
                        for i, v in zip(range(start, min(start + batch, rows)), vectors)
                    ]
                    catalog.commit_batch("bench-model", indexed=files)

            rate = rows / seconds(commit_all)
            read_s = seconds(lambda: catalog.file_states("bench-model"))
            tracemalloc.start()
            states = catalog.file_states("bench-model")
            held = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            assert len(states) == rows
        size = (Path(home) / CATALOG_FILE).stat().st_size  # closing checkpointed the WAL into it
    return rate, size / rows, read_s / rows * 1e6, held / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="photos to index")
    parser.add_argument("--size", default="640x480", help="photo size, WxH")
    parser.add_argument("--model", default="vit", help="vit (ViT-B/32, random weights) or a model name/path")
    parser.add_argument("--commit-rows", type=int, default=50_000, help="rows committed per batch size")
    parser.add_argument("--batches", default="32,256,1024", help="commit batch sizes")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, taking turns; the fastest is shown")
    args = parser.parse_args()
    os.environ.update(ours_env())
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    width, height = (int(x) for x in args.size.split("x"))
    folder = photo_folder(args.count, width, height)
    model = str(random_model("ViT-B-32")) if args.model == "vit" else args.model

    cpus = os.cpu_count()
    ray_start = seconds(lambda: ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING))
    runs: dict[str | None, list[tuple[float, Timeline]]] = {None: [], "auto": []}
    try:
        for _ in range(args.repeats):  # taking turns, so that the machine's noise lands on both alike
            for where, timings in runs.items():
                wall, timeline, new = index_once(folder, model, where)
                assert new == args.count
                timings.append((wall, timeline))
    finally:
        ray.shutdown()

    def best(where: str | None) -> tuple[float, Timeline]:
        return min(runs[where], key=lambda run: run[0])

    (local_wall, local), (ray_wall, on_ray) = best(None), best("auto")
    rows = [
        (f"images/s end to end, {args.count} x {args.size}, local", fmt(args.count / local_wall), "-", "-"),
        ("images/s end to end, Ray on this machine", fmt(args.count / ray_wall), "-", "-"),
        ("images/s steady (first to last batch), local", fmt(local.steady()), "-", "-"),
        ("images/s steady, Ray on this machine", fmt(on_ray.steady()), "-", "-"),
        (
            "wall s, local / Ray (every run)",
            " ".join(f"{w:.1f}" for w, _ in runs[None]) + " / " + " ".join(f"{w:.1f}" for w, _ in runs["auto"]),
            "-",
            "-",
        ),
        ("s to the first committed batch, local / Ray", f"{local.first()} / {on_ray.first()}", "-", "-"),
        ("s to start the local Ray cluster (not in the above)", fmt(ray_start), "-", "-"),
    ]
    for batch in (int(b) for b in args.batches.split(",")):
        rate, row_bytes, state_us, state_bytes = commit_rate(args.commit_rows, batch)
        rows.append((f"driver commit rows/s, 512-d, {batch} a transaction", fmt(rate), "-", "-"))
    rows += [
        ("catalog bytes per row (path, stat, fingerprint, float16 512-d vector)", fmt(row_bytes), "-", "-"),
        ("driver's diff: µs per catalog row to read its state", fmt(state_us), "-", "-"),
        ("driver's diff: bytes per catalog row held in memory", fmt(state_bytes), "-", "-"),
    ]
    print_table(
        "Ray on one node, and the driver's commit ceiling",
        rows,
        [f"model: {model}; Ray {ray.__version__}; commit rows: {args.commit_rows:,} into a new catalog per size."],
    )


if __name__ == "__main__":
    main()
