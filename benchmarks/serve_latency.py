"""`clipsearch serve` under load: /api/search latency with 1 and 8 concurrent clients, searches
by an uploaded photo (the first loads the image tower), thumbnail latency first and cached, and
the server's memory.

The server is the real one (`clipsearch serve`, uvicorn on 127.0.0.1, its own process) over the
index `query_latency.py` builds: ``--images`` generated CLIP-like vectors in the catalog, empty
stand-in files for paths, ViT-B/32 at random weights (speed does not depend on weight values).
Each client is a thread with one keep-alive connection, as a browser tab holds one; a "new"
text is one no request asked before (the text tower runs), a "repeated" one is remembered.
Thumbnails need real photos: a second server runs over ``--photos`` generated 12-megapixel
JPEGs indexed with the demo model, and each is asked for twice (made, then from the cache).

    python benchmarks/serve_latency.py                  # 100,000 images
    python benchmarks/serve_latency.py --images 10000
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import signal
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

from common import (
    bench_dir,
    clipsearch_command,
    fmt,
    median,
    ours_env,
    percentile,
    photo_folder,
    print_table,
    random_model,
)
from query_latency import ARCH, QUERY, filled_home

TARGETS_MS = {"new": 50.0, "repeated": 10.0, "thumbnail cached": 5.0}  # p50 at 100k, from the issue
PHOTO_SIZE = (4032, 3024)


class Server:
    """`clipsearch --home HOME serve --port 0` in its own process, for the ``with`` block."""

    def __init__(self, home: Path):
        self.home = home

    def __enter__(self) -> Server:
        command = [*clipsearch_command(), "--home", str(self.home), "serve", "--port", "0"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ours_env())
        ready, _, _ = select.select([self.process.stdout], [], [], 300)
        line = self.process.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("http://"):
            self.process.kill()
            raise SystemExit(f"the server did not start: {self.process.stderr.read().decode()}")
        address = urlsplit(line)
        self.host, self.port = address.hostname, address.port
        return self

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=120)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as status:
            kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        return kb / 1024

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def timed_get(connection: http.client.HTTPConnection, path: str) -> tuple[float, bytes]:
    """Seconds for one GET, the body read to its end; anything but 200 stops the benchmark."""
    start = time.perf_counter()
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read()
    elapsed = time.perf_counter() - start
    if response.status != 200:
        raise SystemExit(f"GET {path}: {response.status} {body[:200]!r}")
    return elapsed, body


def search_path(text: str) -> str:
    return f"/api/search?k=30&q={quote(text)}"


def under_load(server: Server, clients: int, requests: int, text_of) -> list[float]:
    """Latencies of ``requests`` searches per client, ``clients`` at once; ``text_of(client, i)``
    says what each asks."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients)

    def client(n: int) -> None:
        connection = server.connection()
        timed_get(connection, search_path(QUERY))  # connect before the clock starts
        start.wait()
        for i in range(requests):
            latencies[n].append(timed_get(connection, search_path(text_of(n, i)))[0])
        connection.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [t for per_client in latencies for t in per_client]


def timed_upload(connection: http.client.HTTPConnection, photo: bytes) -> float:
    """Seconds for one search by an uploaded photo; anything but 200 stops the benchmark."""
    start = time.perf_counter()
    connection.request("POST", "/api/search/image?k=30", body=photo, headers={"Content-Type": "image/jpeg"})
    response = connection.getresponse()
    body = response.read()
    if response.status != 200:
        raise SystemExit(f"POST /api/search/image: {response.status} {body[:200]!r}")
    return time.perf_counter() - start


def uploads(server: Server, count: int) -> dict[str, float]:
    """The first upload (which loads the image tower), a new text sent 0.05 s into it, and
    ``count`` more uploads of 640x480 JPEGs."""
    photos = [path.read_bytes() for path in sorted(photo_folder(count + 1, 640, 480).glob("*.jpg"))]
    text: list[float] = []
    sender = threading.Timer(
        0.3, lambda: text.append(timed_get(server.connection(), search_path(f"{QUERY} upload"))[0])
    )
    sender.start()
    first = timed_upload(server.connection(), photos[0])
    sender.join()
    connection = server.connection()
    later = [timed_upload(connection, photo) for photo in photos[1:]]
    return {"first": first, "text_meanwhile": text[0], "later": median(later), "rss": server.rss_mb()}


def photo_home(count: int) -> Path:
    """``count`` 12-MP photos indexed with the demo model (made once and kept)."""
    from clipsearch import Index

    home = bench_dir(f"serve-photos-home-{count}")
    if not (home / ".complete").exists():
        with Index.open(home, model="demo") as index:
            index.add([photo_folder(count, *PHOTO_SIZE)])
        (home / ".complete").touch()
    return home


def thumbnail_latencies(count: int) -> tuple[list[float], list[float], int]:
    """(first request, cached request) seconds per thumbnail, and the mean thumbnail size."""
    import shutil

    home = photo_home(count)
    shutil.rmtree(home / "thumbnails", ignore_errors=True)  # every first request makes one
    with Server(home) as server:
        connection = server.connection()
        _, body = timed_get(connection, f"/api/search?k={count}&q={quote('a photo')}")
        ids = [hit["id"] for hit in json.loads(body)["hits"]]
        first = [timed_get(connection, f"/api/thumbnail/{i}") for i in ids]
        cached = [timed_get(connection, f"/api/thumbnail/{i}")[0] for i in ids]
    return [t for t, _ in first], cached, sum(len(b) for _, b in first) // len(first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000, help="collection size (generated vectors)")
    parser.add_argument("--requests", type=int, default=100, help="searches per client per measurement")
    parser.add_argument("--photos", type=int, default=24, help="12-MP photos for the thumbnail timings")
    parser.add_argument("--uploads", type=int, default=10, help="searches by an uploaded photo, after the first")
    args = parser.parse_args()
    os.environ.update(ours_env())
    home = filled_home(args.images, random_model(ARCH))
    rows = []
    with Server(home) as server:
        started_mb = server.rss_mb()
        for clients in (1, 8):
            for kind, text_of in (
                ("new", lambda n, i, c=clients: f"{QUERY} {c} {n} {i}"),  # never asked before
                ("repeated", lambda n, i: QUERY),
            ):
                latencies = under_load(server, clients, args.requests, text_of)
                target = TARGETS_MS.get(kind) if clients == 1 else None
                rows.append(
                    (
                        f"/api/search p50 ms, {kind} text, {clients} client(s)"
                        + (f" (target <= {target:g} at 100k)" if target else ""),
                        fmt(median(latencies) * 1e3),
                        "-",
                        "-",
                    )
                )
                rows.append(
                    (
                        f"/api/search p99 ms, {kind} text, {clients} client(s)",
                        fmt(percentile(latencies, 99) * 1e3),
                        "-",
                        "-",
                    )
                )
        rows.append(("server RSS MB, started", fmt(started_mb), "-", "-"))
        rows.append(("server RSS MB, after the searches", fmt(server.rss_mb()), "-", "-"))
        uploaded = uploads(server, args.uploads)
        rows += [
            ("/api/search/image ms, the first upload (loads the image tower)", fmt(uploaded["first"] * 1e3), "-", "-"),
            (
                "/api/search ms, a new text sent 0.05 s into the first upload",
                fmt(uploaded["text_meanwhile"] * 1e3),
                "-",
                "-",
            ),
            (
                f"/api/search/image p50 ms, {args.uploads} later uploads (640x480 JPEG)",
                fmt(uploaded["later"] * 1e3),
                "-",
                "-",
            ),
            ("server RSS MB, after the uploads", fmt(uploaded["rss"]), "-", "-"),
        ]
    first, cached, size = thumbnail_latencies(args.photos)
    rows += [
        (f"thumbnail p50 ms, first request ({PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEG)", fmt(median(first) * 1e3), "-", "-"),
        ("thumbnail p50 ms, cached (target <= 5)", fmt(median(cached) * 1e3), "-", "-"),
        ("thumbnail p99 ms, cached", fmt(percentile(cached, 99) * 1e3), "-", "-"),
        ("thumbnail bytes, mean", fmt(size), "-", "-"),
    ]
    print_table(
        f"clipsearch serve, {args.images:,} images",
        rows,
        [
            f"uvicorn on 127.0.0.1, one process; {args.requests} searches per client, k=30; {ARCH} random weights; "
            f"clients run on the same machine as the server; thumbnails over {args.photos} generated photos."
        ],
    )


if __name__ == "__main__":
    main()
