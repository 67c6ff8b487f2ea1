"""What the FAISS file's checksum costs a load at 100k x 512 (Flat, and the IVF type "auto" picks):
the load that reads and CRCs the whole file, against the one that finds this version of the file
recorded as checked (what a query pays after the first). Warm page cache, median of 5.

    python benchmarks/vector_checksum.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from clipsearch import vectors
from clipsearch.records import StoredModel

COUNT, DIM = 100_000, 512


def median_ms(load, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        load()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main(count: int = COUNT) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((count, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(1, count + 1, dtype=np.int64)
    catalog = SimpleNamespace(catalog_id="bench", readonly=False)
    model = StoredModel(1, "bench", DIM, count)
    for kind in ("Flat", "auto"):
        with tempfile.TemporaryDirectory() as folder:  # each run had left two ~200 MB files in /tmp
            home = Path(folder)
            index = vectors.VectorIndex.build(ids, x, kind)
            started = time.perf_counter()
            index.save(home, "bench", model, 1)
            save_s = time.perf_counter() - started
            path = home / vectors.vectors_file(model)
            full = median_ms(lambda path=path: vectors._read(path, catalog, model, check=True))
            recorded = median_ms(lambda path=path: vectors._read(path, catalog, model))
            print(
                f"{index.index_type}: file {path.stat().st_size / 1e6:.0f} MB, save {save_s:.2f} s; "
                f"load with the checksum {full:.0f} ms, load with the record {recorded:.1f} ms"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=COUNT, help="vectors of 512 (default: 100,000)")
    main(parser.parse_args().count)
