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

"auto" never trades accuracy for speed: every choice it makes stays within cosine
``MIN_COSINE`` of the fp32 embeddings, and ``"fp32"`` is always there to force.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .model import SelfAttention, SharedSpace, attend

logger = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8")

# The bar for "does not hurt embeddings": cosine to the fp32 result, worst image of a batch.
MIN_COSINE = 0.999

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}
# x86 CPU flags meaning bf16 dot products run in hardware.
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


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


def candidate_precision(device: torch.device | str, image_tower: bool = True) -> str:
    """What "auto" tries first on ``device``, before checking it against fp32.

    A text-only model (the query path) stays fp32 on CPU: one query costs milliseconds in fp32,
    and a conversion would add to the cold start without a sample of images to check it on.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return "fp16"
    if device.type != "cpu" or not image_tower:
        return "fp32"
    if has_native_bf16():
        return "bf16"
    if has_int8_kernels():
        return "int8"
    return "fp32"


def prepare_for_inference(
    model: SharedSpace, precision: str = "auto", device: torch.device | str = "cpu", sample: torch.Tensor | None = None
) -> Prepared:
    """Move ``model`` (a float32 `CLIP`, modified in place) to ``device`` in ``precision``.

    With ``"auto"`` and an image tower, the candidate's embeddings of ``sample`` (preprocessed
    images, ``[N, 3, R, R]``; a synthetic photo-like batch when None) are compared with fp32's and
    the candidate is dropped for fp32 if the worst cosine is below `MIN_COSINE`. A precision the
    caller names is applied as is.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    device = torch.device(device)
    model = model.to(device).eval()
    visual = getattr(model, "visual", None)
    chosen = candidate_precision(device, visual is not None) if precision == "auto" else precision
    if chosen == "bf16" and device.type == "cpu" and not has_native_bf16():
        logger.warning("this CPU has no bf16 instructions: bf16 will run several times slower than fp32")

    reference = None
    if precision == "auto" and chosen != "fp32" and visual is not None:
        if sample is None:
            sample = calibration_images(visual.input_resolution)
        sample = sample.to(device)
        with torch.inference_mode():
            reference = model.encode_image(sample).float()

    replaced = _convert(model, chosen)

    if reference is not None and sample is not None:
        with torch.inference_mode():
            cosine = F.cosine_similarity(model.encode_image(sample).float(), reference).min().item()
        if cosine < MIN_COSINE:
            logger.warning(
                "%s embeddings drift from fp32 (cosine %.5f < %s) for this model; using fp32",
                chosen,
                cosine,
                MIN_COSINE,
            )
            _revert(model, replaced)
            chosen = "fp32"
        else:
            logger.info("running in %s (worst cosine to fp32 on the sample: %.5f)", chosen, cosine)
    return Prepared(model, chosen, _DTYPES[chosen])


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

# (parent module, attribute, the float module that was there), to undo an int8 conversion.
_Replaced = list[tuple[nn.Module, str, nn.Module]]


def _convert(model: SharedSpace, precision: str) -> _Replaced:
    if precision != "int8":
        model.to(_DTYPES[precision])
        return []
    if model.visual is None:
        return []  # int8 is for the image tower; text stays fp32
    return _quantize_linears(model.visual)


def _revert(model: nn.Module, replaced: _Replaced) -> None:
    for parent, name, linear in replaced:
        setattr(parent, name, linear)
    model.float()


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


def _quantize_linears(module: nn.Module) -> _Replaced:
    replaced: _Replaced = []
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            quantized: nn.Module = Int8Linear(child.weight, child.bias)
        elif type(child) is SelfAttention:
            quantized = Int8SelfAttention(child)
        else:
            replaced += _quantize_linears(child)
            continue
        setattr(module, name, quantized)
        replaced.append((module, name, child))
    return replaced
