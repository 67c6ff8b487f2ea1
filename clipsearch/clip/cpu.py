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
import logging
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import precision_verdicts
from .model import SelfAttention, SharedSpace, attend

logger = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8")

# The bar for "does not hurt embeddings": cosine to the fp32 result, worst image of a batch.
MIN_COSINE = 0.999

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}
# x86 CPU flags meaning bf16 dot products run in hardware.
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# The flags that decide which precision runs fastest: a remembered verdict holds for them only.
SPEED_FLAGS = frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", *_BF16_FLAGS})
# Images in the batch "auto" times the candidates on, and the timed runs of each (the fastest counts).
TIMING_BATCH = 8
TIMING_RUNS = 3


class Prepared(NamedTuple):
    """A model ready for inference, the precision it runs in, and the dtype its inputs should
    have (decode workers can produce that dtype directly and skip a copy)."""

    model: SharedSpace
    precision: str
    input_dtype: torch.dtype


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports; empty elsewhere (other systems fall back to fp32)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_native_bf16() -> bool:
    return bool(cpu_flags() & _BF16_FLAGS)


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
    when none passes); the returned model may be a converted copy. The verdict for ``model_ref``
    (as `clip.load` was given it) is remembered, so later calls convert without measuring.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    device = torch.device(device)
    model = model.to(device).eval()
    visual = getattr(model, "visual", None)
    candidates = candidate_precisions(device, visual is not None) if precision == "auto" else (precision,)
    if len(candidates) == 1:
        chosen = candidates[0]
        if chosen == "bf16" and device.type == "cpu" and not has_native_bf16():
            logger.warning("this CPU has no bf16 instructions: bf16 will run several times slower than fp32")
        _convert(model, chosen)
        return Prepared(model, chosen, _DTYPES[chosen])

    assert visual is not None  # a text-only model has one candidate
    key = _verdict_key(model_ref, model, device, candidates)
    remembered = precision_verdicts.recall(key) if key is not None else None
    if remembered in candidates:
        assert remembered is not None
        logger.debug("running in %s, as measured before for %s", remembered, model_ref)
        _convert(model, remembered)
        return Prepared(model, remembered, _DTYPES[remembered])

    if sample is None:
        sample = calibration_images(visual.input_resolution, count=TIMING_BATCH)
    started = time.perf_counter()
    chosen, model, report = _fastest_faithful(model, candidates, sample.to(device), timed=device.type == "cpu")
    logger.info("running in %s: %s (measured in %.1f s, once)", chosen, report, time.perf_counter() - started)
    if key is not None:
        precision_verdicts.remember(key, {"precision": chosen, "report": report})
    return Prepared(model, chosen, _DTYPES[chosen])


def _verdict_key(
    model_ref: str | None, model: SharedSpace, device: torch.device, candidates: tuple[str, ...]
) -> dict | None:
    """What a measured verdict depends on; None when the checkpoint cannot be identified."""
    from .numpy_text import checkpoint_state

    checkpoint = checkpoint_state(model_ref) if model_ref is not None and device.type == "cpu" else None
    if checkpoint is None:
        return None
    return {
        "checkpoint": checkpoint,
        "text_tower": getattr(model, "transformer", None) is not None,  # both towers convert
        "candidates": list(candidates),
        "cpu_flags": sorted(cpu_flags() & SPEED_FLAGS),
        "torch": torch.__version__,
    }


def _fastest_faithful(
    model: SharedSpace, candidates: tuple[str, ...], sample: torch.Tensor, timed: bool
) -> tuple[str, SharedSpace, str]:
    """The fastest candidate within `MIN_COSINE` of fp32 (the first passing one when not
    ``timed``), the model converted to it, and a line saying what was measured. Each candidate
    is tried on a copy, so the fp32 model stays intact until one is chosen."""
    with torch.inference_mode():
        reference = model.encode_image(sample).float()
    best, best_model, best_seconds = "fp32", model, _seconds_per_batch(model, sample) if timed else 0.0
    notes = [f"fp32 {best_seconds * 1e3:.0f} ms"] if timed else []
    for candidate in candidates[1:]:
        trial = copy.deepcopy(model)
        _convert(trial, candidate)
        with torch.inference_mode():
            cosine = F.cosine_similarity(trial.encode_image(sample).float(), reference).min().item()
        if cosine < MIN_COSINE:
            notes.append(f"{candidate} drifts (cosine {cosine:.5f} < {MIN_COSINE})")
            continue
        if not timed:  # a GPU's half precision: the fast path wherever it is faithful
            return candidate, trial, f"cosine {cosine:.5f} to fp32"
        seconds = _seconds_per_batch(trial, sample)
        notes.append(f"{candidate} {seconds * 1e3:.0f} ms, cosine {cosine:.5f}")
        if seconds < best_seconds:
            best, best_model, best_seconds = candidate, trial, seconds
    return best, best_model, f"{'; '.join(notes)} per batch of {len(sample)}"


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


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 (per output channel) and whose input is quantised on the
    fly, per tensor, by oneDNN or fbgemm."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
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
            self._packed = _prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: without VNNI, the int8 dot products saturate at 16 bits unless the
        # activations use 7 of their 8 bits.
        return torch.ops.quantized.linear_dynamic(x, self._packed, True)


def _prepack(qweight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Pack for oneDNN where PyTorch has it: on an AVX2 EPYC its int8 GEMM ran the ViT-B/32 tower
    ~8% faster than fbgemm's at the same accuracy. The packing engine is process-wide state, so
    it is restored at once; the packed weight keeps the engine it was packed for."""
    engines = torch.backends.quantized.supported_engines
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "onednn" if "onednn" in engines else previous
    try:
        return torch.ops.quantized.linear_prepack(qweight, bias)
    finally:
        torch.backends.quantized.engine = previous


class Int8SelfAttention(nn.Module):
    """`SelfAttention` with both projections in int8 around the float attention. It keeps no
    float weights, so the module it replaces is freed once nothing may need it back (ViT-B/32:
    85 MB of fp32 q/k/v weights)."""

    def __init__(self, attention: SelfAttention):
        super().__init__()
        self.heads, self.causal = attention.heads, attention.causal
        self.qkv = Int8Linear(attention.in_proj_weight, attention.in_proj_bias)
        self.out_proj = Int8Linear(attention.out_proj.weight, attention.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(attend(self.qkv(x), self.heads, self.causal))


def _quantize_linears(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, Int8Linear(child.weight, child.bias))
        elif type(child) is SelfAttention:
            setattr(module, name, Int8SelfAttention(child))
        else:
            _quantize_linears(child)
