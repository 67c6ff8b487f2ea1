"""Measured precision verdicts, remembered in the model cache so no run pays for them twice.

One small JSON file per key (a model's checkpoint identity, the CPU flags and torch version
that decide speed), named by the key's digest: two processes never rewrite each other's
verdicts, and each file is written to a temporary name and renamed into place, so a reader sees
a whole verdict or none. The key is stored inside too and compared on reading; a changed
checkpoint changes the key (its files' size, mtime, ctime and inode), so it is measured again.

Nothing here imports torch: before an indexing run imports it (over a second), the verdict says
whether the NumPy image tower (`clip.numpy_image`) or ONNX Runtime's (`clip.onnx_image`) would
finish its images sooner (`torchless_image_tower`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from clipsearch.clip import onnx_graph
from clipsearch.clip.cpu_features import BF16_FLAGS, SPEED_FLAGS, cpu_flags
from clipsearch.clip.tower_file import checkpoint_state, replaced
from clipsearch.paths import model_cache_dir

log = logging.getLogger(__name__)

# Per faithful precision, measured with the verdict: (seconds to prepare the weights from
# float32, seconds to encode one image). Under "numpy", the NumPy image tower's: (mapping its
# file and reading its pages in, seconds per image); under "int8-onnx", ONNX Runtime's graph's
# (importing onnxruntime and opening a session on the cached graph, seconds per image).
Costs = dict[str, tuple[float, float]]
NUMPY = "numpy"
ONNX = "int8-onnx"


def key(checkpoint: dict, text_tower: bool, candidates: Iterable[str], flags: frozenset[str]) -> dict:
    """What a verdict measured on a CPU depends on: the checkpoint files (`tower_file.checkpoint_state`),
    whether the text tower converts too, the precisions measured, the CPU ``flags`` that decide
    speed, and torch's and onnxruntime's versions (read without importing them: installing the
    ``onnx`` extra measures its image graph too)."""
    return {
        "checkpoint": checkpoint,
        "text_tower": text_tower,
        "candidates": list(candidates),
        **_machine(flags, "image"),
    }


def text_key(checkpoint: dict, kernels: Iterable[str]) -> dict:
    """What a text verdict (`clip.text_fast`) depends on: the checkpoint files, the kernels
    measured (which of torch's run, torch had to try), and as `key`, the machine and packages."""
    return {"checkpoint": checkpoint, "text_kernels": list(kernels), **_machine(cpu_flags(), "text")}


def _machine(flags: frozenset[str], tower: str) -> dict:
    """What a verdict on ``tower``'s speed depends on besides the model: the CPU ``flags`` that
    decide it, torch's version, and onnxruntime's with that tower's graph layout."""
    return {
        "cpu_flags": sorted(flags & SPEED_FLAGS),
        "torch": package_version("torch"),
        "onnxruntime": onnx_runtime(tower),
    }


def standing_text_kernel(chosen_by: object, model_ref: str) -> str | None:
    """The text kernel remembered under ``chosen_by`` (the key of the verdict that chose a cached
    graph) while that key still describes this machine and ``model_ref``'s checkpoint, known
    without importing torch (the kernels torch has are taken from the key); None otherwise."""
    checkpoint = checkpoint_state(model_ref)
    if not isinstance(chosen_by, dict) or checkpoint is None:
        return None
    if json.loads(json.dumps(text_key(checkpoint, chosen_by.get("text_kernels", [])))) != chosen_by:
        return None
    verdict = recall(chosen_by)
    return verdict.get("precision") if verdict is not None else None


def onnx_runtime(tower: str) -> str | None:
    """What the speed and output of our ONNX graph of ``tower`` depend on besides the checkpoint:
    onnxruntime's version and the tower's layout (`onnx_graph.LAYOUTS`); None without the ``onnx``
    extra."""
    return f"{package_version('onnxruntime')}, layout {onnx_graph.LAYOUTS[tower]}" if onnx_graph.available() else None


@functools.cache
def package_version(name: str) -> str:
    """An installed package's version, from its metadata: importing torch to ask costs a second,
    onnxruntime a tenth."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def verdict_file(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return model_cache_dir() / "precision" / f"{digest}.json"


def recall(key: dict) -> dict | None:
    """The verdict remembered for ``key`` (its "precision", and what else `remember` was given),
    or None when none was, or the file is unreadable."""
    path = verdict_file(key)
    try:
        verdict = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.info("Ignoring the unreadable precision verdict %s (%s)", path, err)
        return None
    if not isinstance(verdict, dict) or verdict.get("key") != json.loads(json.dumps(key)):
        return None
    return verdict if isinstance(verdict.get("precision"), str) else None


def remember(key: dict, verdict: dict) -> None:
    """Store ``verdict`` (its "precision" and what else explains it) for ``key``; a cache that
    cannot be written only costs the next run the measurement."""
    path = verdict_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced(path) as tmp:
            tmp.write_text(json.dumps({**verdict, "key": key}, indent=1, sort_keys=True))
    except OSError as err:
        log.info("Could not remember the precision verdict in %s (%s)", path, err)


def costs_of(stored: object, names: Iterable[str]) -> Costs:
    """The `Costs` of ``names`` a verdict holds, what is well-formed of them (none in older verdicts)."""
    if not isinstance(stored, dict):
        return {}
    return {
        name: (float(pair[0]), float(pair[1]))
        for name, pair in stored.items()
        if name in names
        and isinstance(pair, list)
        and len(pair) == 2
        and all(isinstance(x, (int, float)) for x in pair)
    }


def cheapest_for(images: int, costs: Costs, fastest: str) -> str:
    """For a run of ``images``, the faithful precision whose preparation plus encoding costs
    least. On a VNNI CPU int8 encodes fastest, but quantising and packing its weights takes
    about a second more than casting them to bf16, which a run of a few dozen images never earns back:
    the everyday re-run that finds a handful of new photos."""
    if fastest not in costs:
        return fastest
    return min(costs, key=lambda precision: _total(costs[precision], images))


def image_verdict(model_ref: str) -> tuple[dict, Costs] | None:
    """The image-tower verdict this machine measured for ``model_ref`` on its CPU, and the
    `Costs` of the torch precisions it chose among, read without importing torch; None where
    there is none."""
    checkpoint = checkpoint_state(model_ref)
    if checkpoint is None:
        return None
    flags = cpu_flags()
    bf16 = ("bf16",) if flags & BF16_FLAGS else ()
    # Whether int8 was a candidate is torch's to say (it may lack the kernels): the one of the
    # two keys this torch version wrote is the verdict.
    for candidates in (("fp32", *bf16, "int8"), ("fp32", *bf16)):
        verdict = recall(key(checkpoint, False, candidates, flags))
        if verdict is not None:
            return verdict, costs_of(verdict.get("costs"), candidates)
    return None


def worth_switching(model_ref: str, loaded: str, images: int) -> bool:
    """Whether a process holding ``model_ref`` in the ``loaded`` precision (on a CPU, chosen by
    "auto" for a smaller run) finishes ``images`` sooner by preparing another, by the costs this
    machine measured: the loaded one costs its encoding alone, another its preparation too."""
    found = image_verdict(model_ref)
    if found is None:
        return False
    verdict, costs = found
    if loaded not in costs:
        return False
    costs[loaded] = (0.0, costs[loaded][1])
    return cheapest_for(images, costs, verdict["precision"]) != loaded


def torchless_image_tower(model_ref: str, images: int) -> str | None:
    """Which image tower that runs without torch (`NUMPY`, `ONNX`) encodes ``images`` of
    ``model_ref`` sooner than torch in any faithful precision would, counting what each costs to
    start: mapping the NumPy tower's file, or importing onnxruntime and opening its graph,
    against importing torch, loading the model and converting it; or that takes at most
    `TORCHLESS_MARGIN` longer. Decided by the costs this machine measured with its verdict
    (`clip.cpu`); None where torch wins, where there is no verdict, or where it is older than
    these towers' costs (torch then runs, as before)."""
    found = image_verdict(model_ref)
    if found is None:
        return None
    verdict, costs = found
    start = verdict.get("torch_start")
    torchless = costs_of(verdict.get("costs"), (NUMPY, ONNX))  # ONNX only where the key says it is installed
    if not costs or not torchless or not isinstance(start, (int, float)):
        return None
    options = {name: (start + preparing, per_image) for name, (preparing, per_image) in costs.items()}
    winner = cheapest_for(images, {**options, **torchless}, verdict["precision"])
    log.info("%d images of %s: %s finishes first", images, model_ref, winner)
    if winner in torchless:
        return winner
    closest = min(torchless, key=lambda name: _total(torchless[name], images))
    if _total(torchless[closest], images) <= (1 + TORCHLESS_MARGIN) * _total(options[winner], images):
        log.info("%s is within %.0f%% of it, without torch's memory", closest, TORCHLESS_MARGIN * 100)
        return closest
    return None


# How much longer a tower without torch may take than torch's fastest and still run: a process
# that imports torch holds its 300-500 MB more (5,000 photos of 640x480: 906 MiB in torch int8,
# ~570 in ONNX Runtime's graph), for timings that were within 3% of each other (47.6 against
# 46.1 ms an image, ViT-B-32-256 on an AVX2 EPYC) and move more than that from one measurement
# to the next.
TORCHLESS_MARGIN = 0.05


def _total(cost: tuple[float, float], images: int) -> float:
    return cost[0] + images * cost[1]
