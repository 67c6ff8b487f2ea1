"""The upgrade to vectors per model (schema 0003 -> 0004) on an existing catalog: how long it
takes, and that every vector stays (nothing is re-encoded).

    python benchmarks/migration.py --count 100000
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np


def old_catalog(home: Path, count: int, dim: int) -> Path:
    """A catalog as schema 0003 left it: ``count`` indexed images with float16 vectors."""
    from alembic import command
    from sqlalchemy import create_engine

    from clipsearch.migrate import alembic_config

    db = home / "catalog.db"
    with create_engine(f"sqlite:///{db}").begin() as conn:
        config = alembic_config()
        config.attributes["connection"] = conn
        command.upgrade(config, "0003")
    vectors = np.random.default_rng(0).standard_normal((count, dim)).astype("<f2")
    rows = ((i + 1, b"/photos/%08d.jpg" % i, 1000, 1, b"%016d" % i, 640, 480, "indexed", 1) for i in range(count))
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO images (id, path, size, mtime_ns, fingerprint, width, height, status, vector_generation) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.executemany("INSERT INTO vectors VALUES (?, ?)", ((i + 1, vectors[i].tobytes()) for i in range(count)))
        conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [("model", "ViT-B/32"), ("dim", str(dim))])
    return db


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()

    from clipsearch.catalog import Catalog

    home = Path(tempfile.mkdtemp())
    try:
        size = old_catalog(home, args.count, args.dim).stat().st_size
        wall, cpu = time.perf_counter(), time.process_time()
        with Catalog.open(home) as catalog:
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            (model,) = catalog.models()
        print(
            f"{args.count} images ({size / 1e6:.0f} MB catalog): upgrade to vectors per model in {wall:.1f} s "
            f"({cpu:.1f} s CPU); {model.vectors} vectors kept for {model.name}"
        )
    finally:
        shutil.rmtree(home)


if __name__ == "__main__":
    main()
