"""Photo metadata at scale: filling it in for an index from before it was recorded, filtered
queries, and duplicate groups over a whole catalog.

Backfill. ``--backfill N`` camera-like JPEGs (640x480, EXIF with date and offset, make, model,
lens, GPS, and a 16 KB maker note, as phones write) are recorded in a catalog without metadata,
as schema 0005 finds an older index; then `indexer.fill_metadata` reads their headers, as the
next `clipsearch index` does. Warm page cache: on a cold disk add one random read per file.

Filters. A catalog of ``--sizes`` rows with generated CLIP-like vectors and generated metadata
(ten years of dates, 20 cameras, GPS around five cities for 60%, a mix of extensions and
widths); empty files stand in for the photos. For filters passing from 0.1% to 70% of the rows:
the catalog's matching ids, the FAISS search restricted to them (`VectorIndex.search(among=)`),
the same ten hits by over-fetching unfiltered results until ten pass, and `Index.search` end to
end with a stored vector as the query (no model: the text encoder's time is the same filtered or
not). Then `Index.duplicates()` over the whole catalog, reading every vector from it.

    python benchmarks/metadata.py --backfill 3000 --sizes 100000
    python benchmarks/metadata.py --backfill 0 --sizes 1000000
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from common import bench_dir, clustered_vectors, clusters_for, held_out_queries, machine, median, seconds

MODEL = "ViT-B/32"  # only recorded: the queries are vectors, no model is loaded
CHUNK = 50_000
CITIES = [(48.8566, 2.3522), (40.7128, -74.0060), (35.6762, 139.6503), (-33.8688, 151.2093), (51.5074, -0.1278)]
CAMERAS = [
    (make, f"{make} {i}") for make in ("Google Pixel", "Apple iPhone", "Canon EOS", "Sony ILCE") for i in range(5)
]
EXTENSIONS = ["jpg"] * 7 + ["heic", "png", "jpeg"]


# --- backfill ---------------------------------------------------------------------------------


def camera_jpegs(count: int) -> Path:
    """``count`` 640x480 JPEGs with phone-sized EXIF, made once."""
    from PIL import Image

    folder = bench_dir(f"exif-photos-{count}")
    if (folder / ".complete").exists():
        return folder
    rng = np.random.default_rng(0)
    for i in range(count):
        field = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(field).resize((640, 480), Image.Resampling.BICUBIC)
        exif = Image.Exif()
        exif[0x010F], exif[0x0110], exif[0x0112] = "Google", "Pixel 7", 1
        sub = exif.get_ifd(0x8769)
        sub[0x9003], sub[0x9011], sub[0xA434] = f"2021:05:{1 + i % 28:02d} 10:00:00", "+02:00", "Pixel 7 back camera"
        sub[0x927C] = rng.integers(0, 256, 16_384, dtype=np.uint8).tobytes()  # maker note
        gps = exif.get_ifd(0x8825)
        gps[1], gps[2], gps[3], gps[4] = "N", (48.0, 51.0, 29.6), "E", (2.0, 21.0, 8.0)
        image.save(folder / f"IMG_{i:05d}.jpg", quality=85, exif=exif)
    (folder / ".complete").touch()
    return folder


def backfill(count: int) -> tuple[float, int]:
    """Seconds to fill in the metadata of ``count`` rows recorded without it, and how many."""
    import shutil

    from clipsearch.catalog import Catalog
    from clipsearch.indexer import fill_metadata
    from clipsearch.records import IndexedFile
    from clipsearch.walk import normalise_roots

    folder = camera_jpegs(count)
    home = bench_dir("backfill-home")
    shutil.rmtree(home)
    vector = np.ones(8, np.float32) / np.sqrt(8)
    with Catalog.open(home, create=True) as catalog:
        paths = sorted(folder.glob("*.jpg"))
        catalog.commit_batch(
            MODEL, [IndexedFile(os.fsencode(p), 1, 1, b"%d" % i, 640, 480, vector) for i, p in enumerate(paths)]
        )
        started = time.perf_counter()
        done = fill_metadata(catalog, normalise_roots([folder]), [], lambda: False)
        return time.perf_counter() - started, done


# --- filters ----------------------------------------------------------------------------------


def generated_metadata(rng: np.random.Generator, count: int):
    from clipsearch.records import PhotoMeta

    start = np.datetime64("2015-01-01T00:00:00")
    seconds_ = rng.integers(0, 10 * 365 * 86400, count)
    cameras = rng.integers(0, len(CAMERAS), count)
    placed = rng.random(count) < 0.6
    city = rng.integers(0, len(CITIES), count)
    spread = rng.normal(0, 0.1, (count, 2))
    for i in range(count):
        make, model = CAMERAS[cameras[i]]
        lat, lon = (np.array(CITIES[city[i]]) + spread[i]).tolist() if placed[i] else (None, None)
        taken = str(start + np.timedelta64(int(seconds_[i]), "s"))
        yield PhotoMeta("JPEG", 1, taken, 60, make, model, None, lat, lon)


def filled_home(count: int) -> tuple[Path, Path]:
    """(home, stand-in files' root) of an index of ``count`` generated rows, built once."""
    from clipsearch import Index
    from clipsearch.records import IndexedFile

    home, root = bench_dir(f"metadata-home-{count}"), bench_dir(f"metadata-files-{count}")
    if (home / ".complete").exists():
        return home, root
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    with Index.open(home, model=MODEL) as index:
        for chunk, first in enumerate(range(0, count, CHUNK)):
            size = min(CHUNK, count - first)
            vectors = clustered_vectors(size, clusters_for(count), chunk=chunk)
            widths = rng.choice([640, 1024, 2048, 4032], size)
            exts = rng.choice(EXTENSIONS, size)
            files = []
            for i, (vector, metadata) in enumerate(zip(vectors, generated_metadata(rng, size))):
                path = root / f"{(first + i) % 1000:03d}" / f"{first + i:08d}.{exts[i]}"
                path.parent.mkdir(exist_ok=True)
                path.touch()
                n = first + i
                files.append(
                    IndexedFile(bytes(path), 0, 0, n.to_bytes(16, "little"), int(widths[i]), 480, vector, metadata)
                )
            index.catalog.commit_batch(MODEL, files)
        status = index.rebuild()
    print(f"filled {count:,} rows in {time.perf_counter() - started:.0f} s: {status.index_type}")
    (home / ".complete").touch()
    return home, root


FILTERS = {
    "--after 2021-03-01 --before 2021-03-08": dict(after="2021-03-01", before="2021-03-08"),
    "--camera 'pixel 3'": dict(camera="Pixel 3"),
    "--near 48.8566,2.3522,5": dict(near=(48.8566, 2.3522, 5)),
    "--after 2019 --before 2020 --camera pixel": dict(after="2019", before="2020", camera="pixel"),
    "--ext jpg": dict(extensions=("jpg",)),
    "--after 2021-03-01T10:00 --before 2021-03-01T11:00": dict(after="2021-03-01T10:00", before="2021-03-01T11:00"),
}


def filtered_latency(count: int, repeats: int) -> list[tuple[str, int, float, float, float, float]]:
    """Per filter: (name, ids passing, matching-ids ms, selector search ms, over-fetch ms,
    Index.search ms), medians over ``repeats`` held-out query vectors."""
    from clipsearch import Filters, Index

    home, _ = filled_home(count)
    queries = held_out_queries(repeats, clusters_for(count))
    with Index.open(home, readonly=True) as index:
        index.search(queries[0], k=10)  # the FAISS file is read
        baseline = median([seconds(lambda q=q: index.search(q, k=10)) for q in queries])
        rows = [("no filter", count, 0.0, 0.0, 0.0, baseline * 1e3)]
        rows += [(name, *time_filter(index, queries, Filters(**spec))) for name, spec in FILTERS.items()]
    return rows


def time_filter(index, queries: np.ndarray, filters) -> tuple[int, float, float, float, float]:
    from clipsearch.search import _one_faiss_thread

    vectors = index._vectors_now()
    among = index.catalog.matching_ids(filters)
    matching = median([seconds(lambda: index.catalog.matching_ids(filters)) for _ in range(max(3, len(queries) // 5))])
    with _one_faiss_thread():
        selector = median([seconds(lambda q=q: vectors.search(q, 10, among)) for q in queries])
        overfetch = median([seconds(lambda q=q: over_fetch(vectors, q, among, 10)) for q in queries])
    full = median([seconds(lambda q=q: index.search(q, k=10, filters=filters)) for q in queries])
    return len(among), matching * 1e3, selector * 1e3, overfetch * 1e3, full * 1e3


def over_fetch(vectors, query: np.ndarray, among: np.ndarray, k: int) -> np.ndarray:
    """The alternative to a selector: unfiltered results, 4x more each round, until k pass."""
    fetch = 4 * k
    while True:
        fetch = min(fetch, vectors.ntotal)
        _, ids = vectors.search(query, fetch)
        passing = ids[0][np.isin(ids[0], among)]
        if len(passing) >= k or fetch == vectors.ntotal:
            return passing[:k]
        fetch *= 4


def duplicates_time(count: int) -> tuple[float, int]:
    from clipsearch import Index

    home, _ = filled_home(count)
    with Index.open(home, readonly=True) as index:
        import torch  # noqa: F401  (once per process)

        started = time.perf_counter()
        groups = index.duplicates()
        return time.perf_counter() - started, len(groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backfill", type=int, default=3000, help="files whose headers are read (0: skip)")
    parser.add_argument("--sizes", default="100000", help="comma-separated catalog sizes for filtered queries")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(machine())
    if args.backfill:
        elapsed, done = backfill(args.backfill)
        print(
            f"\nbackfill: {done:,} headers in {elapsed:.2f} s = {elapsed / done * 1e3:.2f} ms a file; "
            f"100,000 files: {elapsed / done * 1e5:.0f} s"
        )
    for count in (int(c) for c in filter(None, args.sizes.split(","))):
        filled_home(count)  # its line printed before the table, not inside it
        print(f"\n## filtered queries, {count:,} rows (k=10, median of {args.repeats}, ms)\n")
        print("| filter | rows passing | matching ids | FAISS, selector | FAISS, over-fetch | Index.search |")
        print("|---|---|---|---|---|---|")
        for name, passing, matching, selector, overfetch, full in filtered_latency(count, args.repeats):
            print(f"| {name} | {passing:,} | {matching:.1f} | {selector:.2f} | {overfetch:.2f} | {full:.1f} |")
        elapsed, groups = duplicates_time(count)
        print(f"\nIndex.duplicates() over {count:,} rows: {elapsed:.1f} s ({groups} groups)")


if __name__ == "__main__":
    main()
