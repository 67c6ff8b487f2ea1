"""What `clipsearch index --verify` adds to a re-run: fingerprinting every unchanged file again
(`indexer._as_indexed`), over N files of SIZE random bytes written into DIR (delete it afterwards).
Two passes with the page cache warm; per 100k files by proportion.

    python benchmarks/verify_cost.py 2000 1500000 /tmp/verify-bench
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from clipsearch import indexer
from clipsearch.fingerprint import fingerprint
from clipsearch.walk import FoundFile


def main(count: int, size: int, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    block = os.urandom(size)
    found = []
    for i in range(count):
        path = root / f"photo{i:05d}.jpg"
        if not path.exists():
            path.write_bytes(block[i % 997 :] + block[: i % 997])  # distinct heads
        st = path.stat()
        found.append(FoundFile(os.fsencode(path), st.st_size, st.st_mtime_ns))
    recorded = [(f, fingerprint(f.path)) for f in found]  # what the catalog holds; warms the cache
    for _ in range(2):
        plan = indexer.Plan(to_verify=list(recorded))
        cpu, wall = time.process_time(), time.perf_counter()
        same = indexer._as_indexed(plan, plan.to_verify, lambda: False, None)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert len(same) == count and not plan.todo
        print(
            f"{count} files of {size / 1e6:.2f} MB: {wall:.2f} s wall, {cpu:.2f} s CPU; per 100k files "
            f"{wall * 100_000 / count:.0f} s wall, {cpu * 100_000 / count:.0f} s CPU"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("count", type=int, help="files")
    parser.add_argument("size", type=int, help="bytes a file")
    parser.add_argument("root", type=Path, help="folder to write them into (delete it afterwards)")
    args = parser.parse_args()
    main(args.count, args.size, args.root)
