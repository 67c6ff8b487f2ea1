"""Target 5: 10,000,000 vectors of 512-d, p50 <= 50 ms at recall@10 >= 0.95, built on a 24 GB machine.

Generated CLIP-like vectors (clustered, see `common.clustered_vectors`: a shared direction, a
centre per ~100 vectors, per-vector noise) go straight into FAISS with the index type
`clipsearch.vectors` picks for that count under its memory budget (or `--index-type`), trained
as the engine trains it (`vectors.train`, on the first `vectors.train_points` vectors of the
stream, which is i.i.d.), then added in chunks, so that the float32 vectors never exist all at
once (10M x 512 x 4 bytes would be 20 GB). The exact top 10 of two sets of held-out queries
(vectors of the same distribution, none of them indexed, made as far from them as text is by
`vectors.text_like_queries`) is accumulated chunk by chunk on the way, by brute force. The
search is tuned as the engine tunes it (`vectors.tune`) on the first set; recall@10 and latency
are then measured on the second, which the tuning never saw. The index is saved in the engine's
file format to measure its size on disk.

    python benchmarks/scale.py --count 1000000     # a few minutes
    python benchmarks/scale.py                     # 10M: most of an hour on 2 busy cores
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from common import bench_dir, clustered_vectors, clusters_for, fmt, median, percentile, print_table

CHUNK = 100_000
K = 10
TUNE_CHUNK, MEASURE_CHUNK = 2**31, 2**31 + 1  # stream chunks never indexed: the held-out queries


def status_bytes(field: str) -> int:
    """A /proc/self/status figure (VmRSS now, VmHWM the peak so far) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_now() -> np.ndarray:
    """Resident bytes: the process's own (anonymous) and the mapped file's pages (page cache the
    kernel can take back, read ahead around each page a query touches)."""
    return np.array([status_bytes("RssAnon"), status_bytes("RssFile")])


def _gb(grown: np.ndarray) -> str:
    return " / ".join(fmt(value / 1e9) for value in grown)


Top = tuple[np.ndarray, np.ndarray]  # (scores, ids), [queries, K]


def merge_top(best: Top, scores: np.ndarray, ids: np.ndarray) -> Top:
    """Keep the K highest of the running best and a new chunk's candidates, per query."""
    all_scores = np.concatenate([best[0], scores], axis=1)
    all_ids = np.concatenate([best[1], ids], axis=1)
    keep = np.argpartition(-all_scores, K, axis=1)[:, :K]
    return np.take_along_axis(all_scores, keep, 1), np.take_along_axis(all_ids, keep, 1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(found, truth)]) / truth.shape[1])


def time_queries(index, queries: np.ndarray) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each query searched alone. On a busy machine the wall time holds
    the waits for a core; the CPU time does not."""
    wall, cpu = [], []
    for query in queries:
        t0, c0 = time.perf_counter(), time.thread_time()
        index.search(query[None], K)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return wall, cpu


def latency_rows(wall: list[float], cpu: list[float]) -> list[tuple[str, str, str, str]]:
    return [
        ("query p50 ms (one query at a time, one thread)", fmt(median(wall) * 1e3), "-", "-"),
        ("query p99 ms", fmt(percentile(wall, 99) * 1e3), "-", "-"),
        (
            "query CPU ms p50 / p99 (the thread's own time)",
            f"{fmt(median(cpu) * 1e3)} / {fmt(percentile(cpu, 99) * 1e3)}",
            "-",
            "-",
        ),
    ]


def search_setting(index) -> str:
    """The tuned search: nprobe, and a refined index's shortlist."""
    import faiss

    from clipsearch.reranked import Reranked

    ivf = index.ivf if isinstance(index, Reranked) else faiss.try_extract_index_ivf(index)
    setting = "-" if ivf is None else f"nprobe {ivf.nprobe} of {ivf.nlist}"
    return setting + (f", k_factor {index.k_factor:g}" if isinstance(index, Reranked) else "")


def time_saved(n: int, dim: int, queries: int) -> None:
    """Time the queries again on the index the last full run at this count saved (``--reuse``),
    read as the engine reads it for queries (memory-mapped where FAISS can): latency without the
    build, for when the machine is quieter than it was, and the memory and time a load costs."""
    import faiss

    from clipsearch.vectors import read_index

    path = bench_dir(f"scale-{n}") / "vectors-1.faiss"
    measuring = clustered_vectors(queries, clusters_for(n), dim, chunk=MEASURE_CHUNK)
    before, started = memory_now(), time.perf_counter()
    index = read_index(str(path))
    load_s, loaded = time.perf_counter() - started, memory_now() - before
    faiss.omp_set_num_threads(1)
    wall, cpu = time_queries(index, measuring)
    queried = memory_now() - before
    rows = [
        ("load s", fmt(load_s), "-", "-"),
        ("RSS growth GB after the load: own memory / file pages mapped", _gb(loaded), "-", "-"),
        ("RSS growth GB after the queries: own memory / file pages mapped", _gb(queried), "-", "-"),
        *latency_rows(wall, cpu),
    ]
    print_table(f"Latency again, {n:,} x {dim} from {path} ({search_setting(index)})", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200, help="per set (one to tune, one to measure)")
    parser.add_argument("--index-type", default="auto", help="a FAISS factory string instead of the engine's choice")
    parser.add_argument("--memory-budget-gb", type=float, help="as `choose_index_type` takes it (default: RAM/4)")
    parser.add_argument("--reuse", action="store_true", help="only time queries on the index the last run saved")
    args = parser.parse_args()
    if args.reuse:
        if not (bench_dir(f"scale-{args.count}") / "vectors-1.faiss").exists():  # had been FAISS's traceback
            parser.error(f"no index of {args.count:,} vectors saved yet: run without --reuse first")
        time_saved(args.count, args.dim, args.queries)
        return

    import faiss

    from clipsearch.records import StoredModel
    from clipsearch.vectors import (
        FLAT_LIMIT,
        TUNING_RECALL,
        VectorIndex,
        choose_index_type,
        new_index,
        text_like_queries,
        train,
        train_points,
        tune,
    )

    n, dim = args.count, args.dim
    if n <= FLAT_LIMIT:
        parser.error(f"up to {FLAT_LIMIT:,} vectors the engine searches exactly: nothing to measure here")
    budget = None if args.memory_budget_gb is None else int(args.memory_budget_gb * 2**30)
    index_type = choose_index_type(n, dim, budget) if args.index_type == "auto" else args.index_type
    index = new_index(index_type, dim)  # catalog ids in its lists, as the engine keeps them
    clusters = clusters_for(n)
    # Held-out vectors made into text-like queries, as the engine tunes (`text_like_queries`).
    queries = np.concatenate(
        [
            text_like_queries(clustered_vectors(args.queries, clusters, dim, chunk=c), np.random.default_rng(c))
            for c in (TUNE_CHUNK, MEASURE_CHUNK)
        ]
    )
    best = (np.full((len(queries), K), -np.inf, np.float32), np.full((len(queries), K), -1, np.int64))
    rss_before = status_bytes("VmRSS")

    # The training sample: the stream's first vectors, written into one array (no second copy).
    sample = np.empty((min(train_points(index), n), dim), np.float32)
    for chunk, start in enumerate(range(0, len(sample), CHUNK)):
        part = clustered_vectors(CHUNK, clusters, dim, chunk=chunk)
        sample[start : start + CHUNK] = part[: len(sample) - start]
    started = time.perf_counter()
    train(index, sample)
    train_s = time.perf_counter() - started
    del sample, part
    add_s = generate_s = 0.0
    for chunk, start in enumerate(range(0, n, CHUNK)):
        t0 = time.perf_counter()
        vectors = clustered_vectors(min(CHUNK, n - start), clusters, dim, chunk=chunk)
        ids = np.arange(start, start + len(vectors), dtype=np.int64)
        scores, rows = faiss.knn(queries, vectors, K, metric=faiss.METRIC_INNER_PRODUCT)
        best = merge_top(best, scores, ids[rows])
        t1 = time.perf_counter()
        index.add_with_ids(vectors, ids)
        t2 = time.perf_counter()
        generate_s, add_s = generate_s + t1 - t0, add_s + t2 - t1
    memory = status_bytes("VmRSS") - rss_before

    tuning, measuring = np.split(queries, 2)
    truth_tuning, truth = np.split(best[1], 2)
    started = time.perf_counter()
    tuned_recall = tune(index, tuning, truth_tuning)
    tune_s = time.perf_counter() - started
    setting = search_setting(index)

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # as clipsearch.search runs one query
    recall = recall_at_k(index.search(measuring, K)[1], truth)
    single, cpu = time_queries(index, measuring)

    home = bench_dir(f"scale-{n}")
    model = StoredModel(id=1, name="benchmark", dim=dim, vectors=n)
    VectorIndex(index, index_type, tuned_recall).save(home, "benchmark", model, generation=0)
    disk = (home / "vectors-1.faiss").stat().st_size

    rows = [
        ("vectors", f"{n:,} x {dim}", "-", "-"),
        ("index type", f"{index_type}, {setting}", "-", "-"),
        ("build s (train + add; generation excluded)", fmt(train_s + add_s), "-", "-"),
        ("  of which train s", fmt(train_s), "-", "-"),
        ("tuning s", fmt(tune_s), "-", "-"),
        ("bytes per vector on disk", fmt(disk / n), "-", "-"),
        ("bytes per vector in memory (RSS growth)", fmt(memory / n), "-", "-"),
        ("peak RSS GB", fmt(status_bytes("VmHWM") / 1e9), "-", "-"),
        (
            f"recall@10 vs exact, {args.queries} tuning queries (tuned to >= {TUNING_RECALL})",
            f"{tuned_recall:.3f}",
            "-",
            "-",
        ),
        (f"recall@10 vs exact, {args.queries} other held-out queries (target >= 0.95)", f"{recall:.3f}", "-", "-"),
        *latency_rows(single, cpu),
    ]
    print_table(
        "Scale and memory (target 5)",
        rows,
        [
            f"generating the vectors took another {generate_s:.0f} s (with the exact search for recall); "
            f"FAISS {faiss.__version__}: {threads} threads to build, 1 per query (as the engine searches); "
            f"load average at the end {os.getloadavg()[0]:.1f}.",
        ],
    )


if __name__ == "__main__":
    main()
