"""Linear layers whose weights are stored narrower than their activations are computed.

One text query is a few token rows through matrices of millions of weights: each product reads
every weight once for a dozen rows, so its time is the bytes of weights it reads, not its
arithmetic. These layers store the weights in bf16 (half the bytes) or int8 with one scale per
output channel (a quarter), and take and give float32 activations, so layer norms, attention
and the residual stream keep full precision. All but ``int8-dynamic`` multiply the float
activations as they are.

Kernels:

- ``bf16-packed``: bf16 weights reordered once into oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``), multiplied by ``_linear_pointwise``; private
  ops, so each is looked up and tried before it is offered.
- ``bf16``: bf16 weights through ``F.linear``, which reorders them on every call.
- ``int8``: int8 weights, per-channel scales, ``torch.ops.aten._weight_int8pack_mm`` on bf16
  activations (on float32 activations its CPU kernel ran 40x slower here).
- ``int8-dynamic``: the exception to float activations, kept because, unlike ``int8``, its GEMM
  reads int8 weights at a dozen rows at about the rate (~10 GB/s) ``bf16-packed`` reads bf16
  ones, so in about half the time: fbgemm's dynamic int8
  (`clip.cpu.Int8Linear`), each product's input quantised per tensor on the fly, to all 8 bits
  where the CPU has VNNI. On an AVX-512/VNNI EPYC it ran ViT-B/32's text tower 1.5x faster than
  ``bf16-packed`` with a worst cosine of 0.99909 over 300 texts (7 bits: 0.99773), so whether it
  is faithful is for `clip.text_fast`'s measurement to say, model by model.
- ``fp32``: the layer as it was.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cpu import Int8Linear
from .model import ProjectedAttention, SelfAttention, replace_modules

# The row count oneDNN's weight layout is chosen for: a typical query's tokens.
PACKED_FOR_ROWS = 16


class Bf16PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        mkldnn = torch.ops.mkldnn
        self._packed = mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16), PACKED_FOR_ROWS)
        self._bias = None if bias is None else bias.detach().float().clone()
        self._run = mkldnn._linear_pointwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x.to(torch.bfloat16), self._packed, self._bias, "none", [], "").to(x.dtype)


class Bf16Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self._weight = weight.detach().to(torch.bfloat16)
        self._bias = None if bias is None else bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self._weight, self._bias).to(x.dtype)


class Int8WeightLinear(nn.Module):
    """int8 weights, one scale per output channel (its largest magnitude over 127)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        weight = weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self._weight = torch.round(weight / scales[:, None]).to(torch.int8)
        self._scales = scales.to(torch.bfloat16)
        self._bias = None if bias is None else bias.detach().float().clone()
        self._run = torch.ops.aten._weight_int8pack_mm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = self._run(rows, self._weight, self._scales).to(x.dtype)
        if self._bias is not None:
            out = out + self._bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


def _int8_dynamic(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    # fbgemm, not oneDNN: at a dozen rows oneDNN's dynamic int8 ran the text tower 1.5x slower.
    return Int8Linear(weight, bias, engine="fbgemm")


# Kernels that quantise a product's whole input with one scale: a text's error would depend on
# the other texts of its batch, so a tower in one of them encodes each text alone.
PER_TENSOR_INPUT = frozenset({"int8-dynamic"})

_LINEARS: dict[str, Callable[[torch.Tensor, torch.Tensor | None], nn.Module]] = {
    "bf16-packed": Bf16PackedLinear,
    "bf16": Bf16Linear,
    "int8": Int8WeightLinear,
    "int8-dynamic": _int8_dynamic,
}


def usable_kernels() -> tuple[str, ...]:
    """The kernels this PyTorch build has and that run: each is tried on a small product, since
    the private ops may exist and still refuse (a build without oneDNN, a CPU it does not know)."""
    weight, x = torch.ones(8, 16), torch.ones(2, 16)
    usable = ["fp32"]
    for kernel, make in _LINEARS.items():
        try:
            with torch.inference_mode():
                out = make(weight, torch.zeros(8))(x)
        except (AttributeError, RuntimeError, NotImplementedError):
            continue
        if out.shape == (2, 8) and torch.allclose(out, torch.full((2, 8), 16.0)):
            usable.append(kernel)
    return tuple(usable)


def swap_linears(module: nn.Module, kernel: str) -> None:
    """Replace, in place, every ``nn.Linear`` and `SelfAttention` under ``module`` by its
    ``kernel`` version; ``"fp32"`` leaves it as it is. The float weights are released with the
    modules replaced."""
    if kernel == "fp32":
        return
    make = _LINEARS[kernel]
    replace_modules(
        module,
        {
            nn.Linear: lambda linear: make(linear.weight, linear.bias),
            SelfAttention: lambda attention: ProjectedAttention(attention, make),
        },
    )
