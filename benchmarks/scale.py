"""Target 5: 10,000,000 vectors of 512-d build and query on a 24 GB machine.

Generated CLIP-like vectors (clustered, see `common.clustered_vectors`) go straight into FAISS
with the index type `clipsearch.vectors` picks for that count under its memory budget, in
chunks, so that the float32 vectors never exist all at once (10M x 512 x 4 bytes would be 20 GB).
The exact top 10 of held-out queries is accumulated chunk by chunk on the way, which gives
recall@10 without a second pass. nprobe is raised as the engine does until recall@10 >= 0.95.
The index is saved in the engine's file format to measure its size on disk.

    python benchmarks/scale.py --count 1000000     # a few minutes
    python benchmarks/scale.py                     # 10M: most of an hour on 2 busy cores
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import bench_dir, clustered_vectors, clusters_for, fmt, held_out_queries, median, percentile, print_table

CHUNK = 100_000
K = 10


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


Top = tuple[np.ndarray, np.ndarray]  # (scores, ids), [queries, K]


def merge_top(best: Top, scores: np.ndarray, ids: np.ndarray) -> Top:
    """Keep the K highest of the running best and a new chunk's candidates, per query."""
    all_scores = np.concatenate([best[0], scores], axis=1)
    all_ids = np.concatenate([best[1], ids], axis=1)
    keep = np.argpartition(-all_scores, K, axis=1)[:, :K]
    return np.take_along_axis(all_scores, keep, 1), np.take_along_axis(all_ids, keep, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()

    import faiss

    from clipsearch.vectors import FLAT_LIMIT, TARGET_RECALL, TRAIN_POINTS_PER_LIST, VectorIndex, choose_index_type

    n, dim = args.count, args.dim
    if n <= FLAT_LIMIT:
        parser.error(f"up to {FLAT_LIMIT:,} vectors the engine searches exactly: nothing to measure here")
    index_type = choose_index_type(n, dim)
    index = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)  # ids in its lists, as the engine
    ivf = faiss.extract_index_ivf(index)
    clusters = clusters_for(n)
    queries = held_out_queries(args.queries, clusters, dim)
    best = (np.full((len(queries), K), -np.inf, np.float32), np.full((len(queries), K), -1, np.int64))
    rss_before = rss_bytes()

    # Train on the first chunks (a bounded sample, as the engine does), then add everything.
    wanted = TRAIN_POINTS_PER_LIST * ivf.nlist
    chunks_to_train = -(-min(wanted, n) // CHUNK)
    train = np.concatenate([clustered_vectors(CHUNK, clusters, dim, chunk=c) for c in range(chunks_to_train)])
    started = time.perf_counter()
    index.train(train[:wanted])
    train_s = time.perf_counter() - started
    del train
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
    memory = rss_bytes() - rss_before

    truth = best[1]
    params = faiss.ParameterSpace()
    for nprobe in (2**i for i in range(int(np.log2(ivf.nlist)) + 1)):
        params.set_index_parameter(index, "nprobe", nprobe)
        found = index.search(queries, K)[1]
        recall = float(np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(found, truth)]))
        if recall >= TARGET_RECALL:
            break

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # as clipsearch.search runs one query
    single = []
    for query in queries:
        t0 = time.perf_counter()
        index.search(query[None], K)
        single.append(time.perf_counter() - t0)

    home = bench_dir(f"scale-{n}")
    VectorIndex(index, index_type, recall).save(home, generation=0)
    disk = (home / "vectors.faiss").stat().st_size

    rows = [
        ("vectors", f"{n:,} x {dim}", "-", "-"),
        ("index type (chosen by clipsearch.vectors)", f"{index_type}, nprobe {nprobe}", "-", "-"),
        ("build s (train + add; generation excluded)", fmt(train_s + add_s), "-", "-"),
        ("  of which train s", fmt(train_s), "-", "-"),
        ("bytes per vector on disk", fmt(disk / n), "-", "-"),
        ("bytes per vector in memory (RSS growth)", fmt(memory / n), "-", "-"),
        (f"recall@10 vs exact, {len(queries)} held-out queries (target >= {TARGET_RECALL})", f"{recall:.3f}", "-", "-"),
        ("query p50 ms (one query at a time)", fmt(median(single) * 1e3), "-", "-"),
        ("query p99 ms", fmt(percentile(single, 99) * 1e3), "-", "-"),
    ]
    print_table(
        "Scale and memory (target 5)",
        rows,
        [
            f"generating the vectors took another {generate_s:.0f} s (with the exact search for recall); "
            f"FAISS {faiss.__version__}: {threads} threads to build, 1 per query (as the engine searches)."
        ],
    )


if __name__ == "__main__":
    main()
