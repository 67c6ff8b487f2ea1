"""The fastest precision a CLIP can run in on this machine without moving its embeddings.

fp32 is always right. Whether anything beats it depends on the processor:

- bf16 (weights and inputs converted, no autocast) about doubles fp32 on CPUs with bf16
  instructions (AVX512-BF16, AMX). Where they are missing, PyTorch emulates bf16 and runs
  ~10x *slower* than fp32, so it is only picked when the flags are there.
- int8 dynamic quantization of the image tower's projections (weights int8 once, activations
  quantised per batch) makes those GEMMs ~1.7x faster on an AVX2 CPU without bf16 or VNNI.
  The attention's fused q/k/v projection counts: with it left in fp32 the ViT-B/32 tower ran
  1.44x open_clip's fp32, with it quantised too (and oneDNN's packing) 1.61-1.68x
  (benchmarks/README.md). Trained CLIPs carry activation outlier channels that per-tensor int8
  can flatten, so "auto" keeps int8 only after comparing its embeddings with fp32 on a sample
  batch.
- fp16 on CUDA, where tensor cores make it the fast path and CLIP was trained in it.

Which of bf16 and int8 wins where both run is not knowable from the flags: on one AVX-512
EPYC with bf16 and VNNI, int8 ran ViT-B/32 at 75.0 img/s and bf16 at 70.6. So on a CPU "auto"
times fp32 and every candidate the flags allow on a small batch, drops those whose embeddings
leave cosine ``MIN_COSINE`` of fp32's, and keeps the fastest. That costs about a second, once:
the verdict is remembered in the model cache (`clip.precision_verdicts`), keyed by the
checkpoint files' identity, the CPU flags that matter and the torch version.

"auto" never trades accuracy for speed: every choice it makes stays within cosine
``MIN_COSINE`` of the fp32 embeddings, and ``"fp32"`` is always there to force.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from . import heap, numpy_image, onnx_graph, onnx_image, precision_verdicts
from .cpu_features import BF16_FLAGS, cpu_flags, has_vnni, usable_cores
from .model import (
    Conversion,
    ProjectedAttention,
    Replacements,
    SelfAttention,
    SharedSpace,
    Towers,
    replace_modules,
    replacement_sites,
)
from .precision_verdicts import Costs, cheapest_for

if TYPE_CHECKING:
    from .preprocess import Preprocess

logger = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8")

# The bar for "does not hurt embeddings": cosine to the fp32 result, worst image of a batch.
MIN_COSINE = 0.999

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}
# Images in the batch "auto" times the candidates on, and the timed runs of each (the fastest counts).
TIMING_BATCH = 8
TIMING_RUNS = 3


class Prepared(NamedTuple):
    """A model ready for inference, the precision it runs in, and the dtype its inputs should
    have (decode workers can produce that dtype directly and skip a copy)."""

    model: SharedSpace
    precision: str
    input_dtype: torch.dtype


def has_native_bf16() -> bool:
    return bool(cpu_flags() & BF16_FLAGS)


def has_int8_kernels() -> bool:
    """The x86 int8 GEMMs (fbgemm, oneDNN): x86 only (ARM's qnnpack path was never measured),
    and only while PyTorch still has the quantized tensors they take."""
    quantized = getattr(torch.backends, "quantized", None)
    engines = set(quantized.supported_engines) if quantized is not None else set()
    return bool({"fbgemm", "x86"} & engines) and hasattr(torch, "quantize_per_channel")


def candidate_precisions(device: torch.device | str, image_tower: bool = True) -> tuple[str, ...]:
    """What "auto" chooses among on ``device``, fp32 first.

    A text-only model (the query path) stays fp32: one query costs milliseconds in fp32, and a
    conversion would add to the cold start without a sample of images to check it on.
    """
    device = torch.device(device)
    if device.type == "cuda":  # checked against fp32 where there are images to check it on
        return ("fp32", "fp16") if image_tower else ("fp16",)
    if device.type != "cpu" or not image_tower:
        return ("fp32",)
    return ("fp32", *(["bf16"] if has_native_bf16() else []), *(["int8"] if has_int8_kernels() else []))


def load_prepared(
    model_ref: str,
    precision: str = "auto",
    device: torch.device | str = "cpu",
    towers: Towers = "both",
    images: int | None = None,
    torch_import_s: float | None = None,
) -> tuple[Prepared, Preprocess]:
    """`clip.load` and `prepare_for_inference` in one: where the precision is known before the
    weights are read (named, or remembered from an earlier measurement, which a first run on a
    CPU makes now: `measure`) and the model runs on the CPU, each weight is converted as it is
    read (`conversion`), so the float32 model never stands whole beside the converted one
    (ViT-B-32-256's image tower: 350 MB of float32 beside 88 MB of int8, and the allocator kept
    most of the freed 350 MB). ``images``: how many images the model is loaded to encode, which
    "auto" weighs against each precision's preparation. ``torch_import_s``: what importing torch
    cost this process, when the caller saw it (a first measurement counts it against the image
    towers that run without torch)."""
    from clipsearch.clip import load

    _check_precision(precision)
    device = torch.device(device)
    image_tower, text_tower = towers != "text", towers != "image"
    known = _known_precision(model_ref, precision, device, image_tower, text_tower, images)
    if known is None and device.type == "cpu" and measure(model_ref, towers, torch_import_s):
        known = _known_precision(model_ref, precision, device, image_tower, text_tower, images)
    if known is None or device.type != "cpu":
        model, preprocess = load(model_ref, device="cpu", towers=towers)
        return prepare_for_inference(model, precision, device, model_ref=model_ref), preprocess
    _warn_if_emulated(known, device)
    model, preprocess = load(model_ref, device="cpu", towers=towers, precision=known)
    return Prepared(model, known, _DTYPES[known]), preprocess


def prepare_for_inference(
    model: SharedSpace,
    precision: str = "auto",
    device: torch.device | str = "cpu",
    sample: torch.Tensor | None = None,
    model_ref: str | None = None,
) -> Prepared:
    """``model`` (a float32 `CLIP`) on ``device`` in ``precision``; a precision the caller names
    is applied in place, as is.

    With ``"auto"`` and an image tower, each candidate's embeddings of ``sample`` (preprocessed
    images, ``[N, 3, R, R]``; a synthetic photo-like batch when None) are compared with fp32's,
    those below `MIN_COSINE` are dropped, and on a CPU the fastest of the rest is kept (fp32
    when none passes). Each candidate is a copy of ``model`` (`_trial`), so the float32 model
    and one trial are held at once; `measure`, which loads each from the checkpoint instead,
    holds less. The verdict for ``model_ref`` (as `clip.load` was given it) is remembered, so
    later calls convert without measuring.
    """
    _check_precision(precision)
    device = torch.device(device)
    model = model.to(device).eval()
    visual = getattr(model, "visual", None)
    text_tower = getattr(model, "towers", "both") != "image"
    chosen = _known_precision(model_ref, precision, device, visual is not None, text_tower)
    if chosen is None:
        assert visual is not None  # a text-only model has one candidate
        _announce(model_ref or type(model).__name__, device)
        candidates = candidate_precisions(device, image_tower=True)
        if sample is None:
            sample = calibration_images(visual.input_resolution, count=TIMING_BATCH)
        started, timed = time.perf_counter(), device.type == "cpu"
        sample = sample.to(device)
        fp32 = _reference(model, sample, timed)

        def copied(candidate: str) -> tuple[SharedSpace, float]:
            begun = time.perf_counter()
            return _trial(model, candidate), time.perf_counter() - begun

        chosen, report, costs = _fastest_faithful(fp32, candidates, sample, timed, copied)
        verdict = {"precision": chosen, "report": report, "costs": costs}
        _conclude(_verdict_key(model_ref, device, candidates, text_tower), verdict, started)
    _warn_if_emulated(chosen, device)
    _convert(model, chosen)
    heap.release_free_memory()  # what the float32 weights held
    return Prepared(model, chosen, _DTYPES[chosen])


def measure(model_ref: str, towers: Towers = "both", torch_import_s: float | None = None) -> bool:
    """Measure which precision "auto" runs ``model_ref``'s image tower in on this CPU and
    remember it, unless that is remembered already; True when it measured now. The towers that
    run without torch are exported and timed too: the NumPy tower, and ONNX Runtime's graph
    where the extra is installed, with what starting torch costs a new process
    (`precision_verdicts.torchless_image_tower` weighs them). False where the checkpoint cannot
    be identified (nothing could be remembered: `prepare_for_inference` measures the loaded model).

    One tower is held at a time. For the image tower alone (what `index` loads), the NumPy
    tower is written from the checkpoint a tensor at a time (`numpy_image.export_checkpoint`),
    and float32 is timed, and gives the reference embeddings, on a torch model whose weights
    are views of that file, which holds one block of it in memory at a time (`_on_the_file`):
    ViT-B/32's float32 model is never whole in memory. Elsewhere (both towers; a tower the
    NumPy tower cannot run) the float32 model is loaded, timed and let go. Each torch precision
    is then loaded converted as it is read (`clip.load`), timed and let go, and the graph is
    built from the NumPy tower's file and opened last. A first run of ViT-B/32 that held the
    float32 model beside each trial and the graph peaked at 1.29 GB; 0.98 with the float32
    model loaded whole; now 0.85 (0.90 from OpenAI's archive), of which importing torch (its
    CUDA build) is 0.52 (benchmarks/README.md).
    """
    from clipsearch.clip import load

    device = torch.device("cpu")
    text_tower = towers != "image"
    if towers == "text" or _known_precision(model_ref, "auto", device, True, text_tower) is not None:
        return False
    started = time.perf_counter()
    # A named model is fetched on its first use by either.
    exported = numpy_image.export_checkpoint(model_ref) if towers == "image" else None
    tower: numpy_image.ImageTower | None
    if exported is not None:
        model, tower, load_s = _on_the_file(exported), exported.tower, exported.reading_s
    else:
        model, preprocess = load(model_ref, device="cpu", towers=towers)
        load_s = time.perf_counter() - started
        tower = numpy_image.export(model, model_ref, preprocess)
    # Identified once its files are here (a named model's first use has just fetched them).
    candidates = candidate_precisions(device, image_tower=True)
    key = _verdict_key(model_ref, device, candidates, text_tower)
    if key is None or _known_precision(model_ref, "auto", device, True, text_tower) is not None:
        return False
    _announce(model_ref, device)  # once the model has proved loadable: a bad one's error stands alone
    sample = calibration_images(model.config.image_resolution, count=TIMING_BATCH)
    numpy_costs = None if tower is None else _numpy_costs(tower, model_ref, sample)
    heap.release_free_memory()  # each timing's activations, before the next's (here: 70-80 MB)
    fp32 = _reference(model, sample, timed=True)
    del model, tower
    heap.release_free_memory()

    def loaded(candidate: str) -> tuple[SharedSpace, float]:
        begun = time.perf_counter()
        trial, _ = load(model_ref, device="cpu", towers=towers, precision=candidate)
        return trial, max(0.0, time.perf_counter() - begun - load_s)  # beyond what fp32's load costs

    chosen, report, costs = _fastest_faithful(fp32, candidates, sample, True, loaded)
    verdict: dict[str, Any] = {"precision": chosen, "report": report, "costs": costs}
    if numpy_costs is not None:
        if onnx_graph.available():
            costs.update(_onnx_costs(model_ref, sample.numpy(), fp32.embeddings.numpy()))
        costs.update(numpy_costs)
        verdict["torch_start"] = (torch_import_s if torch_import_s is not None else _import_s("torch")) + load_s
    _conclude(key, verdict, started)
    heap.release_free_memory()  # what the graph's session held, before the run opens its tower
    return True


def _on_the_file(exported: numpy_image.Exported) -> SharedSpace:
    """The float32 image model whose weights are views of ``exported``'s mapped NumPy tower,
    each block's pages let go once it has run (`numpy_image.ImageTower.let_go`): running it
    holds one block of the file in memory. ViT-B-32-256: the loaded model's embeddings exactly,
    and its speed within 1-1.5%, each block read back from the system's page cache."""
    from clipsearch.clip.build import build_model
    from clipsearch.clip.model import Conversion, VisionTransformer

    tower = exported.tower
    model = build_model(tower.state_dict(), towers="image", config=exported.config, conversion=Conversion(shared=True))
    visual = cast(VisionTransformer, model.visual)  # the NumPy tower runs no other
    for i, block in enumerate(visual.transformer.resblocks):
        block.register_forward_hook(lambda *_, i=i: tower.let_go(i))
    return model


def _conclude(key: dict | None, verdict: dict[str, Any], started: float) -> None:
    """Say what a measurement begun at ``started`` chose, and remember it under ``key`` (none: a
    checkpoint that cannot be identified is measured again next time)."""
    logger.info(
        "running in %s: %s (measured in %.1f s, once)",
        verdict["precision"],
        verdict["report"],
        time.perf_counter() - started,
    )
    if key is not None:
        precision_verdicts.remember(key, verdict)


def _announce(model: str, device: torch.device) -> None:
    logger.info(
        "Measuring which precision runs %s fastest on this %s (once per model and machine; about 15 s for ViT-B/32)...",
        model,
        "CPU" if device.type == "cpu" else "GPU",
        extra={"notice": True},  # shown by the CLI without --verbose: a wait it should explain
    )


def _numpy_costs(tower: numpy_image.ImageTower, model_ref: str, sample: torch.Tensor) -> Costs:
    """The NumPy image tower, exported to the cache, timed on ``sample``: its
    `precision_verdicts.Costs` under `NUMPY` (reading its file in, seconds per image)."""
    preparing = _read_s(numpy_image.cache_file(model_ref))
    pixels = sample.float().numpy()
    tower.transient = True  # beside torch, one block of the file at a time
    # Once: NumPy's time per image held within 10% from run to run even on a busy machine
    # (0.10-0.11 s here), and each timed batch of a model's first run costs the person waiting.
    seconds, _ = _timed_tower(tower, pixels)
    logger.info("NumPy image tower: %.0f ms per batch of %d", seconds * 1e3, len(pixels))
    return {precision_verdicts.NUMPY: (preparing, seconds / len(pixels))}


def _onnx_costs(model_ref: str, pixels: Any, reference: Any) -> Costs:
    """ONNX Runtime's graph of the cached NumPy tower (`_faithful_graph`), timed: importing
    onnxruntime and opening a session on the graph, seconds per image; nothing where it cannot
    be cached or drifts."""
    found = _faithful_graph(model_ref, pixels, reference)
    if found is None:
        return {}
    graph, opening, seconds = found
    # The fastest of as many batches as a torch precision gets (`_seconds_per_batch`): timed
    # once, a batch caught in a busy moment put the graph at 28 ms an image against torch int8's
    # 20 (it runs 19-20), and a run of 500 photos went to torch, with 400 MiB more.
    seconds = min([seconds, *(_timed_tower(graph, pixels)[0] for _ in range(TIMING_RUNS - 1))])
    logger.info("ONNX Runtime's image graph: %.0f ms per batch of %d", seconds * 1e3, len(pixels))
    return {precision_verdicts.ONNX: (_import_s("onnxruntime") + opening, seconds / len(pixels))}


def _faithful_graph(
    model_ref: str, pixels: Any, reference: Any
) -> tuple[onnx_image.OnnxImageTower, float, float] | None:
    """The graph of ``model_ref``'s cached NumPy tower with its weights in the first of
    `onnx_graph.weight_codes` whose embeddings of ``pixels`` stay within `MIN_COSINE` of
    ``reference`` (fp32's), written to the cache; what opening its session took, and its seconds
    for ``pixels`` (after a first image that pays for its allocations). None where it cannot be
    cached or each drifts."""
    for codes in onnx_graph.weight_codes("image"):
        heap.release_free_memory()  # the graph that drifted
        tower = numpy_image.load_cached(model_ref)
        started = time.perf_counter()
        if tower is None or onnx_image.export(tower, model_ref, codes) is None:
            return None
        exported = time.perf_counter()
        del tower  # its file's pages, read in for the build, before the session reads the graph
        heap.release_free_memory()  # what building the graph held
        graph = onnx_image.load_cached(model_ref)
        # Opening on another thread: counted whole, as if nothing overlapped it.
        if graph is None or graph.session(usable_cores()) is None:
            return None
        opened = time.perf_counter()
        graph.encode_images(pixels[:1])
        seconds, found = _timed_tower(graph, pixels)
        cosine = F.cosine_similarity(torch.from_numpy(found), torch.from_numpy(reference)).min().item()
        if cosine >= MIN_COSINE:
            logger.info(
                "ONNX Runtime image graph built with %s weights in %.2f s, cosine %.5f",
                codes,
                exported - started,
                cosine,
            )
            return graph, opened - exported, seconds
        logger.info("ONNX Runtime's image graph drifts with %s weights (cosine %.5f < %s)", codes, cosine, MIN_COSINE)
        del graph  # before the next is built
    return None


def _read_s(path: Path) -> float:
    """What reading ``path`` from the page cache takes: what a later process's first batch pays
    to fault in the pages of the tower it maps."""
    started = time.perf_counter()
    buffer = bytearray(1 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    return time.perf_counter() - started


def _timed_tower(tower: numpy_image.ImageTower | onnx_image.OnnxImageTower, pixels: Any) -> tuple[float, Any]:
    """Seconds ``tower`` takes to encode ``pixels``, and the embeddings."""
    started = time.perf_counter()
    found = tower.encode_images(pixels)
    return time.perf_counter() - started, found


@functools.cache
def _import_s(module: str) -> float:
    """What importing ``module`` ("torch": torch and this module) costs a new process, timed in
    one, for a process that imported it before anyone could time it."""
    started = time.perf_counter()
    imported = __name__ if module == "torch" else module
    subprocess.run([sys.executable, "-c", f"import {imported}"], check=False, capture_output=True)
    return time.perf_counter() - started


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")


def _known_precision(
    model_ref: str | None,
    precision: str,
    device: torch.device,
    image_tower: bool,
    text_tower: bool,
    images: int | None = None,
) -> str | None:
    """What ``precision`` comes to without measuring: itself when named; for "auto" the only
    candidate, or the one measured before on this machine (for a run of ``images``, the one
    `cheapest_for` it); None when "auto" has to measure."""
    if precision != "auto":
        return precision
    candidates = candidate_precisions(device, image_tower)
    if len(candidates) == 1:
        return candidates[0]
    key = _verdict_key(model_ref, device, candidates, text_tower)
    verdict = precision_verdicts.recall(key) if key is not None else None
    remembered = verdict.get("precision") if verdict is not None else None
    if remembered not in candidates:
        return None
    assert verdict is not None and isinstance(remembered, str)
    costs = precision_verdicts.costs_of(verdict.get("costs"), candidates)
    if images is not None and costs:
        cheapest = cheapest_for(images, costs, remembered)
        if cheapest != remembered:
            logger.info(
                "running in %s, not %s: %d images do not earn back its preparation", cheapest, remembered, images
            )
        return cheapest
    logger.debug("running in %s, as measured before for %s", remembered, model_ref)
    return remembered


def _warn_if_emulated(precision: str, device: torch.device) -> None:
    if precision == "bf16" and device.type == "cpu" and not has_native_bf16():
        logger.warning("this CPU has no bf16 instructions: bf16 will run several times slower than fp32")


def _verdict_key(
    model_ref: str | None, device: torch.device, candidates: tuple[str, ...], text_tower: bool
) -> dict | None:
    """What a measured verdict depends on; None when the checkpoint cannot be identified."""
    from .tower_file import checkpoint_state

    checkpoint = checkpoint_state(model_ref) if model_ref is not None and device.type == "cpu" else None
    if checkpoint is None:
        return None
    return precision_verdicts.key(checkpoint, text_tower, candidates, cpu_flags())


class Reference(NamedTuple):
    """fp32's embeddings of the calibration batch, and its seconds for it (0 where not timed)."""

    embeddings: torch.Tensor
    seconds: float


def _reference(model: SharedSpace, sample: torch.Tensor, timed: bool) -> Reference:
    with torch.inference_mode():
        embeddings = model.encode_image(sample).float()
    return Reference(embeddings, _seconds_per_batch(model, sample) if timed else 0.0)


def _fastest_faithful(
    fp32: Reference,
    candidates: tuple[str, ...],
    sample: torch.Tensor,
    timed: bool,
    trial: Callable[[str], tuple[SharedSpace, float]],
) -> tuple[str, str, Costs]:
    """The fastest candidate within `MIN_COSINE` of fp32 (the first passing one when not
    ``timed``), a line saying what was measured, and each faithful candidate's `Costs`. Each
    candidate is a model of its own, ``trial(candidate)`` with the seconds its preparation took,
    let go once measured: one trial is held at a time."""
    best, best_seconds = "fp32", fp32.seconds
    notes = [f"fp32 {best_seconds * 1e3:.0f} ms"] if timed else []
    costs: Costs = {"fp32": (0.0, best_seconds / len(sample))}
    for candidate in candidates[1:]:
        model, preparing = trial(candidate)
        cosine, seconds, first = _measured(model, sample, fp32.embeddings, timed)
        del model
        heap.release_free_memory()  # else the trials freed stay resident under the graph build
        if cosine < MIN_COSINE:
            notes.append(f"{candidate} drifts (cosine {cosine:.5f} < {MIN_COSINE})")
            continue
        if not timed:  # a GPU's half precision: the fast path wherever it is faithful
            return candidate, f"cosine {cosine:.5f} to fp32", {}
        notes.append(f"{candidate} {seconds * 1e3:.0f} ms, cosine {cosine:.5f}")
        # A new process pays the conversion and, on its first batch, setting up the kernels.
        costs[candidate] = (preparing + max(0.0, first - seconds), seconds / len(sample))
        if seconds < best_seconds:
            best, best_seconds = candidate, seconds
    return best, f"{'; '.join(notes)} per batch of {len(sample)}", costs


def _measured(
    trial: SharedSpace, sample: torch.Tensor, reference: torch.Tensor, timed: bool
) -> tuple[float, float, float]:
    """The worst cosine of ``trial``'s embeddings of ``sample`` to ``reference``, and (when
    ``timed`` and faithful) its seconds per batch, and the seconds of its first batch (the one
    the cosine comes from)."""
    with torch.inference_mode():
        started = time.perf_counter()
        embeddings = trial.encode_image(sample).float()
        first = time.perf_counter() - started
        cosine = F.cosine_similarity(embeddings, reference).min().item()
    faithful = cosine >= MIN_COSINE
    return cosine, _seconds_per_batch(trial, sample) if timed and faithful else 0.0, first


def _trial(model: SharedSpace, precision: str) -> SharedSpace:
    """A copy of ``model`` in ``precision`` that never copies a float32 weight: the copy is
    handed each tensor already cast, and int8 shares them all (its quantised layers replace the
    float ones in the copy alone). Its values are those `_convert` gives ``model`` itself."""
    dtype = _DTYPES[precision]
    memo: dict[int, Any] = {id(t): _cast(t, dtype) for t in itertools.chain(model.parameters(), model.buffers())}
    trial = copy.deepcopy(model, memo)
    if precision == "int8" and trial.visual is not None:
        _quantize_linears(trial.visual)
    return trial


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    cast = tensor.detach().to(dtype)
    return nn.Parameter(cast, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else cast


def _seconds_per_batch(model: SharedSpace, sample: torch.Tensor) -> float:
    """The fastest of `TIMING_RUNS` image batches through ``model`` (after the run that checked
    its embeddings, which paid for allocation and weight packing)."""
    return min(_timed(model.encode_image, sample) for _ in range(TIMING_RUNS))


def _timed(run: Callable[[torch.Tensor], torch.Tensor], sample: torch.Tensor) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        run(sample)
        return time.perf_counter() - start


def calibration_images(resolution: int, count: int = 4, seed: int = 0) -> torch.Tensor:
    """Photo-like normalised images: smooth colour fields with sensor noise.

    Gaussian noise alone is a poor probe: it never excites the activation outliers real images
    do, and it makes quantisation error look uniform when it is not.
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 6, 8, generator=generator) * 4.0 - 1.8  # ~[0, 1] after CLIP's normalisation
    fields = F.interpolate(coarse, size=(resolution, resolution), mode="bicubic", align_corners=False)
    return fields + 0.1 * torch.randn(fields.shape, generator=generator)


# --- conversions -----------------------------------------------------------------------------


def _convert(model: SharedSpace, precision: str) -> None:
    if precision != "int8":
        model.to(_DTYPES[precision])
    elif model.visual is not None:  # int8 is for the image tower; text stays fp32
        _quantize_linears(model.visual)


def conversion(precision: str) -> Conversion:
    """What `clip.load` does to each weight as it reads it for ``precision``: the model that
    comes out is the one `_convert` makes of a float32 model, value for value."""
    _check_precision(precision)
    if precision == "auto":
        raise ValueError("'auto' is decided by measuring (prepare_for_inference, measure), not while loading")
    if precision == "int8":
        return Conversion(torch.float32, _image_tower_int8_sites)
    return Conversion(_DTYPES[precision])


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 (per output channel) and whose input is quantised on the
    fly, per tensor, by oneDNN or fbgemm.

    ``engine``: which library packs and multiplies (None: oneDNN where PyTorch has it, see
    `_prepack`). The input is quantised to 7 bits on a CPU without VNNI, whose int8 dot products
    saturate at 16 bits otherwise, and to all 8 where it has VNNI: on an AVX-512/VNNI EPYC that
    cut ViT-B/32's image embedding error fourfold (worst cosine to fp32 0.99975 -> 0.99993 on 16
    images) at the same speed (26 ms an image)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, engine: str | None = None):
        super().__init__()
        self._reduce_range = not has_vnni()
        weight = weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        bias = None if bias is None else bias.detach().float()
        with warnings.catch_warnings():
            # PyTorch announces the removal of quantized tensors; `has_int8_kernels` turns int8
            # off in the release where that happens.
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(
                weight, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8
            )
            self._packed = _prepack(qweight, bias, engine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed, self._reduce_range)


def _prepack(qweight: torch.Tensor, bias: torch.Tensor | None, engine: str | None) -> torch.Tensor:
    """Pack for ``engine``, by default oneDNN where PyTorch has it: on an AVX2 EPYC its int8 GEMM
    ran the ViT-B/32 image tower ~8% faster than fbgemm's at the same accuracy. The packing
    engine is process-wide state, so it is restored at once; the packed weight keeps the engine
    it was packed for."""
    engines = torch.backends.quantized.supported_engines
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine or ("onednn" if "onednn" in engines else previous)
    try:
        return torch.ops.quantized.linear_prepack(qweight, bias)
    finally:
        torch.backends.quantized.engine = previous


class Int8SelfAttention(ProjectedAttention):
    """`SelfAttention` with both projections in int8 around the float attention."""

    def __init__(self, attention: SelfAttention):
        super().__init__(attention, Int8Linear)


# What int8 replaces: every Linear and `SelfAttention` of the image tower.
_INT8_REPLACEMENTS: Replacements = {
    nn.Linear: lambda linear: Int8Linear(linear.weight, linear.bias),
    SelfAttention: Int8SelfAttention,
}


def _image_tower_int8_sites(model: nn.Module) -> dict[str, Callable]:
    visual = getattr(model, "visual", None)
    return replacement_sites(visual, _INT8_REPLACEMENTS, "visual.") if visual is not None else {}


def _quantize_linears(module: nn.Module) -> None:
    replace_modules(module, _INT8_REPLACEMENTS)
