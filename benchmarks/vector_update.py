"""The FAISS file after an index run that changed a few rows: updated in place against rebuilt.

Uses the catalogs `query_latency.py` fills (generated CLIP-like vectors, kept under
$BENCH_DIR), adds ``--changes`` vectors the way an index run commits them, brings the FAISS file
up to date (`VectorIndex.refresh`, what `clipsearch index` does), then removes them and does it
again; a full rebuild from the catalog is timed beside it. Times include reading and saving
the file. The catalog is left as it was found.

    python benchmarks/vector_update.py                   # 100,000 and 1,000,000 vectors
    python benchmarks/vector_update.py --sizes 100000
"""

from __future__ import annotations

import argparse
import os
from functools import partial

from common import clustered_vectors, fmt, ours_env, print_table, random_model, seconds
from query_latency import ARCH, filled_home


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated catalog sizes")
    parser.add_argument("--changes", type=int, default=10, help="vectors added, then removed")
    args = parser.parse_args()
    os.environ.update(ours_env())

    from clipsearch.catalog import Catalog
    from clipsearch.records import IndexedFile
    from clipsearch.vectors import VectorIndex

    model = random_model(ARCH)
    rows = []
    for count in (int(size) for size in args.sizes.split(",")):
        home = filled_home(count, model)
        extra = clustered_vectors(args.changes, 8, seed=99)
        with Catalog.open(home) as catalog:
            stored = partial(catalog.model, catalog.default_model)  # its vector count changes with the run
            VectorIndex.load(home, catalog, stored())  # the file matches the catalog before the change
            catalog.commit_batch(
                catalog.default_model,
                [
                    IndexedFile(b"/vector-update/%d.jpg" % i, 1, 1, b"vu%d" % i, 1, 1, vector)
                    for i, vector in enumerate(extra)
                ],
            )
            added = seconds(partial(VectorIndex.refresh, home, catalog, stored()))
            catalog.remove([b"/vector-update"])
            removed = seconds(partial(VectorIndex.refresh, home, catalog, stored()))
            rebuilt = seconds(partial(VectorIndex.rebuild, home, catalog, stored()))
            index_type = VectorIndex.load(home, catalog, stored()).index_type
        rows += [
            (f"update s, {count:,} ({index_type}), {args.changes} vectors added", fmt(added), "-", "-"),
            (f"update s, {count:,}, the {args.changes} removed again", fmt(removed), "-", "-"),
            (f"full rebuild s, {count:,}", fmt(rebuilt), "-", "-"),
        ]
    print_table(
        "FAISS file after a small index run",
        rows,
        ["each figure includes reading the catalog's changes and saving the file; warm page cache."],
    )


if __name__ == "__main__":
    main()
