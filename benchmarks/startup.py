"""Target 3 and 4 of issue 16: how long a first `clipsearch index` takes before its first image is
encoded, and where its memory peaks.

Each run is a new process, `clipsearch --home NEW index FOLDER --model M`, started through this
file, which notes (without changing what runs) when the model starts and finishes loading, when
the first batch reaches the model (or an image tower that runs without torch, which "auto" may
take instead: NumPy's, `clip.numpy_image`, for a small run; ONNX Runtime's, `clip.onnx_image`,
with the onnx extra), and when the text tower is exported for later queries, with
the resident memory and its high-water mark at each point. Times count from the moment the
process was launched (the parent's and the child's monotonic clocks are the same clock).

    python benchmarks/startup.py                      # 40 x 640x480, auto and bf16, 3 runs each
    python benchmarks/startup.py --count 200 --size 4032x3024 --repeats 1
    python benchmarks/startup.py --precisions auto --unmeasured   # a machine's first run: auto measures
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BENCH_DIR, fmt, median, ours_env, photo_folder, print_table, random_model

ARCH = "ViT-B-32-256"
_T0 = "CLIPSEARCH_BENCH_T0"
_OUT = "CLIPSEARCH_BENCH_EVENTS"


def _memory() -> tuple[float, float]:
    """(resident MiB now, high-water mark MiB) of this process."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def child(argv: list[str]) -> None:
    """Run the CLI in this process with the events noted."""
    import atexit

    from clipsearch import clip as clip_package
    from clipsearch import encoder as encoder_module
    from clipsearch.clip import numpy_image, numpy_text, onnx_graph, onnx_image  # none imports torch

    started = float(os.environ[_T0])
    events: list[tuple[str, float, float, float]] = []

    def note(name: str) -> None:
        events.append((name, time.perf_counter() - started, *_memory()))

    def noting(owner: object, attribute: str, before: str, after: str | None = None, once: bool = False) -> None:
        """Note ``before`` and ``after`` a call of ``owner.attribute`` (the names formatted with
        ``self``, its first argument)."""
        original = getattr(owner, attribute)
        seen: list[bool] = []

        def wrapper(*args, **kwargs):
            if not (once and seen):
                note(before.format(self=args[0] if args else None))
            result = original(*args, **kwargs)
            if after and not (once and seen):
                note(after.format(self=args[0] if args else None))
            seen.append(True)
            return result

        setattr(owner, attribute, wrapper)

    noting(encoder_module.Encoder, "__init__", "model load starts", "model loaded")
    noting(encoder_module.Encoder, "encode_images", "first batch reaches the model", "first batch encoded", once=True)
    noting(numpy_text, "export", "text tower export starts", "text tower exported")
    # On a CPU a run may encode with an image tower that never imports torch: NumPy's, or ONNX
    # Runtime's graph (`NumpyImageEncoder` holds either; its precision says which).
    noting(encoder_module.NumpyImageEncoder, "__init__", "image tower without torch opened")
    noting(
        encoder_module.NumpyImageEncoder,
        "encode_images",
        "first batch reaches the image tower without torch ({self.precision})",
        "first batch encoded ({self.precision})",
        once=True,
    )
    noting(numpy_image, "export", "NumPy image tower export starts", "NumPy image tower exported")
    noting(numpy_image, "export_checkpoint", "NumPy image tower export starts", "NumPy image tower exported")
    noting(onnx_image, "export", "ONNX image graph build starts", "ONNX image graph built")
    # A machine's first run measures the precisions before it opens its tower: the NumPy
    # tower's export from the checkpoint, float32 timed on its file, each torch trial, the
    # graph's build, its session.
    noting(encoder_module, "_measured_now", "precisions: measurement starts", "precisions: measured")
    noting(clip_package, "load", "a torch model load starts", "a torch model loaded")
    noting(onnx_graph, "session", "ONNX session opens", "ONNX session open")  # on a thread of its own
    # The graph's first batch may reach it before its session is open, and waits: encoding starts
    # here. (On a machine's first run, the first use is the measurement's, not the run's.)
    noting(
        onnx_image.OnnxImageTower,
        "session",
        "graph's session awaited (first use)",
        "graph's session ready (first use)",
        once=True,
    )

    def finish() -> None:
        note("exit")
        # VmHWM, not getrusage's ru_maxrss: Linux carries that over from the parent's memory
        # copied at fork (exec keeps the larger), which this parent, having imported torch, holds
        # ~750 MiB of: a run that never imports torch read as though it had.
        peak = _memory()[1]
        Path(os.environ[_OUT]).write_text(json.dumps({"events": events, "maxrss_mib": peak}))

    atexit.register(finish)
    sys.argv = ["clipsearch", *argv]
    from clipsearch.cli import main

    main()


def run_once(folder: Path, model: Path, extra: list[str], unmeasured: bool = False) -> dict:
    """One run in a new home; ``unmeasured``: with a copy of the model cache that has no precision
    verdicts, so "auto" measures the candidates as on a machine's first run."""
    home = Path(tempfile.mkdtemp(prefix="home-", dir=BENCH_DIR))
    out, cache = home.with_suffix(".json"), home.with_suffix(".cache")
    try:
        command = [sys.executable, __file__, "--child", "--home", str(home), "index", str(folder)]
        command += ["--model", str(model)]
        env = {**ours_env(), _OUT: str(out)}
        if unmeasured:
            shutil.copytree(env["XDG_CACHE_HOME"], cache, ignore=shutil.ignore_patterns("precision"))
            env["XDG_CACHE_HOME"] = str(cache)
        env[_T0] = str(time.perf_counter())
        subprocess.run([*command, *extra], env=env, check=True, capture_output=True)
        return json.loads(out.read_text())
    finally:
        shutil.rmtree(home)
        shutil.rmtree(cache, ignore_errors=True)
        out.unlink(missing_ok=True)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", default="auto,bf16", help="comma-separated --precision values")
    parser.add_argument("--unmeasured", action="store_true", help="no remembered precision verdict (a first run)")
    args = parser.parse_args()

    width, height = (int(side) for side in args.size.split("x"))
    folder = photo_folder(args.count, width, height)
    for path in folder.iterdir():
        path.read_bytes()  # into the page cache
    model = random_model(ARCH)
    runs: dict[str, list[dict]] = {precision: [] for precision in args.precisions.split(",")}
    for _ in range(args.repeats):  # the precisions take turns
        for precision, done in runs.items():
            done.append(run_once(folder, model, ["--precision", precision], args.unmeasured))
    rows = []
    for precision, done in runs.items():
        # By name: runs of one precision may differ in their events (auto: NumPy or torch).
        firsts = [{event[0]: event for event in reversed(run["events"])} for run in done]
        for name in dict.fromkeys(name for run in done for name, *_ in run["events"]):
            seen = [events[name] for events in firsts if name in events]
            at, rss, peak = (median([event[i] for event in seen]) for i in (1, 2, 3))
            runs_seen = "" if len(seen) == len(done) else f" ({len(seen)} of {len(done)} runs)"
            rows.append((f"{precision}: {name}{runs_seen}", fmt(at, "s"), fmt(rss, "MiB"), fmt(peak, "MiB")))
        peak = median([run["maxrss_mib"] for run in done])
        rows.append((f"{precision}: peak RSS (VmHWM at exit)", "", "", fmt(peak, "MiB")))
    print_table(
        f"First index, {args.count} x {args.size}{', precision unmeasured' if args.unmeasured else ''}"
        " (issue 16, targets 3 and 4)",
        rows,
        [
            f"{ARCH} at random weights; new process and new home each run, median of {args.repeats}; "
            "columns: seconds since launch, RSS then, RSS high-water mark then."
        ],
        header=("event", "at", "RSS", "peak so far"),
    )


if __name__ == "__main__":
    main()
