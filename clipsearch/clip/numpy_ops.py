"""The NumPy operations CLIP's towers are made of (`clip.numpy_text`, `clip.numpy_image`), in
float32 as the torch model computes them, and control over the threads of NumPy's BLAS."""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

LN_EPS = 1e-5  # CLIP's LayerNorm epsilon, in both towers
# The state-dict names of a residual block's linear weights, which the towers store transposed
# (``[in, out]``, ``x @ W``): OpenBLAS ran small-M products 1.6x faster so (benchmarks/README.md).
LINEAR_WEIGHTS = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def stored(key: str, value: np.ndarray) -> np.ndarray:
    """A state-dict array as the towers hold it: linear weights transposed to ``[in, out]`` (a
    view: the file writer makes each contiguous as it writes it)."""
    return value.T if key.endswith(LINEAR_WEIGHTS) else value


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``x @ weight + bias`` with the weight stored ``[in, out]``."""
    return x @ weight + bias


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    variance = np.square(x - mean).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + np.float32(LN_EPS)) * weight + bias


def gelu(x: np.ndarray, quick: bool) -> np.ndarray:
    """QuickGELU (OpenAI's weights) or exact GELU."""
    if quick:  # x * sigmoid(1.702 x), with sigmoid(z) = (1 + tanh(z / 2)) / 2, which cannot overflow
        return x * (0.5 + 0.5 * np.tanh(np.float32(0.851) * x))
    y = erf(x / math.sqrt(2))
    y += 1
    y *= 0.5 * x
    return y.astype(np.float32)


def erf(x: np.ndarray) -> np.ndarray:
    """erf to within 1.5e-7 (Abramowitz & Stegun 7.1.26), in float64: NumPy has no erf.

    In place on three float64 arrays, in the order of ``sign(x) * (1 - t * (a1 + t * (a2 + ...))
    * exp(-x²))`` with ``t = 1 / (1 + p|x|)``, value for value: written as that expression, its
    temporaries held some 80 MB at once for the 8 images a model's first run times the NumPy
    image tower on (ViT-B/32's [8, 65, 3072] activations)."""
    t = np.abs(x, dtype=np.float64)
    decay = np.square(t)
    np.negative(decay, out=decay)
    np.exp(decay, out=decay)
    t *= 0.3275911
    t += 1
    np.divide(1, t, out=t)
    poly = t * 1.061405429
    for a in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly += a
        poly *= t
    poly *= decay
    np.subtract(1, poly, out=poly)
    poly *= np.sign(x)
    return poly


def softmax_rows(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in place (the scores are not needed after)."""
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """NumPy's BLAS on one thread for a moment, in the calling thread. A few tokens make
    matrices too small to share: with a second thread on a busy two-core machine, every product
    waited at a barrier for a thread the OS had not scheduled, and encoding took 5 to 10 times
    the CPU time (`clip.numpy_image` runs a thread of its own per core instead)."""
    set_threads = blas_thread_setter()
    if set_threads is None:
        yield
        return
    previous = set_threads(1)
    try:
        yield
    finally:
        set_threads(previous)


@functools.cache
def blas_thread_setter() -> Callable[[int], int] | None:
    """``openblas_set_num_threads_local`` (sets the count, returns the previous one) of the
    OpenBLAS that NumPy's wheels bundle; None for another BLAS or an OpenBLAS before 0.3.27."""
    package = Path(np.__file__).parent
    for library in [*package.parent.glob("numpy.libs/*openblas*"), *package.glob(".dylibs/*openblas*")]:
        try:
            return ctypes.CDLL(str(library)).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
    return None
