"""What every benchmark script shares: where generated data lives, interleaved timing, the table.

The machines these run on are shared and noisy (15-20% run to run), so a ratio is only ever
taken between two things timed in the same process, alternating, on the same inputs.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

BENCH_DIR = Path(os.environ.get("BENCH_DIR", "/tmp/clipsearch-bench"))


def bench_dir(*parts: str) -> Path:
    path = BENCH_DIR.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def photo_folder(count: int, width: int, height: int, seed: int = 0) -> Path:
    """A folder of ``count`` generated photos, made once and reused (files are seeded)."""
    from make_photos import make_folder

    folder = bench_dir(f"photos-{width}x{height}-{count}-s{seed}")
    make_folder(folder, count, width, height, seed)
    return folder


def random_model(arch: str) -> Path:
    """An OpenCLIP model directory holding random weights of ``arch`` (speed does not depend on
    weight values), which ``clipsearch --model PATH`` loads through its OpenCLIP path."""
    folder = BENCH_DIR / "models" / f"{arch}-random"
    if not (folder / "open_clip_model.safetensors").exists():
        import open_clip
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None)
        config = open_clip.get_model_config(arch)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
        weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        save_file(weights, str(folder / "open_clip_model.safetensors"))
    return folder


def ours_env() -> dict[str, str]:
    """The environment our CLI runs in: a model cache under BENCH_DIR that already holds CLIP's
    BPE vocabulary (open_clip ships the same file), so nothing is downloaded."""
    import open_clip

    from clipsearch.clip import registry

    cache = bench_dir("cache")
    vocab = cache / "clipsearch" / "models" / registry.VOCAB.filename
    if not vocab.exists():
        vocab.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", vocab)
    env = {k: v for k, v in os.environ.items() if k != "CLIPSEARCH_HOME"}
    return {**env, "XDG_CACHE_HOME": str(cache)}


def clipsearch_command() -> list[str]:
    """Our CLI as installed beside this interpreter."""
    return [str(Path(sys.executable).parent / "clipsearch")]


def clustered_vectors(count: int, clusters: int, dim: int = 512, chunk: int = 0, seed: int = 0):
    """``count`` L2-normalised float32 vectors shaped like CLIP image embeddings: chunk ``chunk``
    of a seeded stream drawn around ``clusters`` centres.

    Uniform random vectors would be the worst case for an approximate index and nothing like a
    photo library: CLIP embeddings share a common direction (two unrelated photos sit near
    cosine 0.5) and gather in groups (a burst, a trip, a pet: near 0.8). So: one shared
    direction, the centres, and per-vector noise, weighted to give those two cosines. Callers
    use about 100 vectors per centre; far fewer centres would flatter an inverted-file index,
    whose lists would each hold whole groups.
    """
    import numpy as np

    common_direction, centres = _centres(clusters, dim, seed)
    rng = np.random.default_rng([seed, 1, chunk])
    noise = _unit(rng.standard_normal((count, dim), dtype=np.float32))
    picked = centres[rng.integers(0, clusters, count)]
    return _unit(common_direction + 0.8 * picked + 0.6 * noise)


@functools.cache
def _centres(clusters: int, dim: int, seed: int):
    import numpy as np

    rng = np.random.default_rng([seed, 0])
    common_direction = _unit(rng.standard_normal(dim, dtype=np.float32))
    return common_direction, _unit(rng.standard_normal((clusters, dim), dtype=np.float32))


def _unit(x):
    import numpy as np

    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clusters_for(total: int) -> int:
    """About 100 vectors per group, whatever the collection size."""
    return max(1, total // 100)


def held_out_queries(count: int, clusters: int, dim: int = 512):
    """Query vectors from the same distribution as `clustered_vectors` but none of its chunks."""
    return clustered_vectors(count, clusters, dim, chunk=2**31)


def seconds(call: Callable[[], object]) -> float:
    """Wall seconds one call takes."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each candidate, the candidates taking turns so that machine noise
    lands on all of them alike."""
    timings: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            timings[name].append(seconds(run))
    return timings


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def machine() -> str:
    """One line naming the machine, so figures are never quoted without it."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    from clipsearch.clip import cpu

    bf16 = "native bf16" if cpu.has_native_bf16() else "no native bf16"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{model}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}, {bf16}; "
        f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}; load average {load}"
    )


def fmt(value: float | str | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.4g}"
    return f"{text} {unit}".rstrip()


def print_table(
    title: str,
    rows: Sequence[tuple[str, str, str, str]],
    notes: Sequence[str] = (),
    header: tuple[str, str, str, str] = ("metric", "ours", "peer", "ratio"),
) -> None:
    """metric | ours | peer | ratio (or another ``header``), as a Markdown table that pastes into the README."""
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    print(f"\n## {title}\n\n{machine()}\n")
    for i, row in enumerate(table):
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for note in notes:
        print(f"\n{note}")


def ratio(ours: float | None, peer: float | None, higher_is_better: bool = True) -> str:
    """How many times better ours is than the peer (>1 means ours wins)."""
    if not ours or not peer:
        return "-"
    return f"{(ours / peer if higher_is_better else peer / ours):.2f}x"
