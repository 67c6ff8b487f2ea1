"""CLIP's ViT image tower in NumPy, so that indexing a handful of new photos never imports torch.

The everyday re-run of `clipsearch index` finds a few new photos. With torch it spends over a
second importing torch and another loading and converting the image tower before the first
image is encoded; in NumPy the tower is a memory-mapped file, ready in milliseconds, that
encodes an image about twice as slowly as torch's bf16 or int8 (ViT-B/32 on a two-core
AVX-512 EPYC: 72-82 ms against 38 and 26). So for a run of up to a few dozen images it finishes
sooner; `clip.precision_verdicts.torchless_image_tower` decides from what this machine measured
(against torch, and against ONNX Runtime's int8 graph of this tower, `clip.onnx_image`).

`ImageTower.encode_images` repeats `model.VisionTransformer` operation for operation: the
patch convolution (stride = kernel) as a reshape and one product, the class token and
positional embedding, ln_pre, pre-LayerNorm blocks with bidirectional attention and QuickGELU
or GELU, ln_post on the class token, the projection; it matches the torch tower to float32
rounding. The last block computes its attention output and MLP for the class token alone, the
only row read.

A batch is split into chunks of a few images, which one thread per core encodes with one BLAS
thread each, rather than handed whole to OpenBLAS's threads: LayerNorm, GELU and softmax then
run on every core too, and no product waits at a barrier for a thread the OS has not scheduled.
ViT-B/32 at 256 px on the two-core EPYC at load ~2: 85-95 ms an image so, 191-626 ms with
OpenBLAS's two threads on the whole batch, 207-278 ms on one thread (benchmarks/README.md).

Written when "auto" measures the precisions on a model's first run on a machine (`clip.cpu`),
which times this tower too: from the checkpoint a tensor at a time (`export_checkpoint`), or from
the float32 model where one is loaded anyway (`export`). The linear weights are stored
``[in, out]`` as the text tower's: at 16 images x 50 tokens OpenBLAS ran ``x @ W`` and
``x @ W.T`` within noise of each other (benchmarks/README.md).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np

from clipsearch.clip import tower_file
from clipsearch.clip.cpu_features import usable_cores
from clipsearch.clip.heap import release_mapped
from clipsearch.clip.numpy_ops import gelu, layer_norm, linear, one_blas_thread, softmax_rows, stored
from clipsearch.clip.precision_verdicts import NUMPY
from clipsearch.clip.preprocess import Preprocess

if TYPE_CHECKING:
    import torch

    from clipsearch.clip.model import SharedSpace

log = logging.getLogger(__name__)

_MAGIC = b"CLIPIMAG"
_FORMAT = 2  # 2: the resize mode and interpolation, not whether to crop
_PREFIX = "visual."
_SETTINGS = ("quick_gelu", "heads", "patch_size", "logit_scale")  # ImageTower's, besides its preprocessing
# Images one thread encodes at a time. ViT-B/32 at 256 px, 2 threads, taking turns in one
# process: 8 images in 1.31 s in chunks of 2 against 1.39 s in chunks of 4, holding 14 MiB of
# activations against 60 (a model's first run times 8 beside its float32 model: its peak);
# 32 images in 4.72 s against 5.18 (AVX2 EPYC).
CHUNK = 2


class ImageTower:
    """A ViT image tower: float32 arrays under the state-dict names of `model.VisionTransformer`
    (without ``visual.``), the patch convolution as a ``[3 * patch * patch, width]`` matrix and
    the blocks' linear weights ``[in, out]``; and the preprocessing its images need."""

    precision = "fp32-numpy"
    kind = NUMPY  # its name among the costs a verdict compares
    shares_cores = False  # see `onnx_image.OnnxImageTower`: NumPy's BLAS threads were not measured so
    # Whether each block's weights are let go once it has run (`let_go`), so that the tower
    # holds one block of its mapped file at a time: ViT-B/32's 28 MB rather than 350. A model's
    # first run sets it while it measures, beside torch; every chunk of images reads the file
    # again then, which cost 9% of the time of 16 images (benchmarks/README.md).
    transient = False

    def __init__(
        self,
        weights: Mapping[str, np.ndarray],
        *,
        quick_gelu: bool,
        heads: int,
        patch_size: int,
        preprocess: Preprocess,
        logit_scale: float,
    ):
        self.weights = dict(weights)
        self.quick_gelu = quick_gelu
        self.heads = heads
        self.patch_size = patch_size
        self.preprocess = preprocess
        self.logit_scale = logit_scale  # exp() already applied, as Encoder.logit_scale
        self.grid = math.isqrt(self.weights["positional_embedding"].shape[0] - 1)
        self.layers = len({key.split(".")[2] for key in self.weights if key.startswith("transformer.resblocks.")})
        self.embed_dim = self.weights["proj"].shape[1]
        self._blocks = [
            [value for key, value in self.weights.items() if key.startswith(f"transformer.resblocks.{i}.")]
            for i in range(self.layers)
        ]

    def encode_images(self, pixels: np.ndarray, threads: int | None = None) -> np.ndarray:
        """Unnormalised image embeddings ``float32 [N, embed_dim]`` of preprocessed images
        ``[N, 3, R, R]`` (what `Preprocess.array` gives, stacked), `CHUNK` images at a time on
        ``threads`` threads (by default one per core this process may use), each with one BLAS
        thread."""
        pixels = np.asarray(pixels, dtype=np.float32)
        chunks = [pixels[i : i + CHUNK] for i in range(0, len(pixels), CHUNK)] or [pixels]
        threads = min(threads or usable_cores(), len(chunks))
        if threads == 1:
            return self._encoded(pixels)
        with ThreadPoolExecutor(threads, thread_name_prefix="numpy-image") as pool:
            return np.concatenate(list(pool.map(self._encoded, chunks)))

    def _encoded(self, pixels: np.ndarray) -> np.ndarray:
        with one_blas_thread():  # per thread: OpenBLAS's setting is the calling thread's
            return self._encode(pixels)

    def _encode(self, pixels: np.ndarray) -> np.ndarray:
        w = self.weights
        x = self.patches(pixels) @ w["conv1.weight"]
        cls = np.broadcast_to(w["class_embedding"], (len(x), 1, x.shape[2]))
        x = np.concatenate([cls, x], axis=1) + w["positional_embedding"]
        x = layer_norm(x, w["ln_pre.weight"], w["ln_pre.bias"])
        for i in range(self.layers):
            block = f"transformer.resblocks.{i}."
            last = i == self.layers - 1  # from its attention output on only the class token is read
            attended = self._attention(layer_norm(x, w[block + "ln_1.weight"], w[block + "ln_1.bias"]), block, last)
            x = (x[:, :1] if last else x) + attended
            h = layer_norm(x, w[block + "ln_2.weight"], w[block + "ln_2.bias"])
            h = gelu(linear(h, w[block + "mlp.c_fc.weight"], w[block + "mlp.c_fc.bias"]), self.quick_gelu)
            x = x + linear(h, w[block + "mlp.c_proj.weight"], w[block + "mlp.c_proj.bias"])
            if self.transient:
                self.let_go(i)
        return (layer_norm(x[:, 0], w["ln_post.weight"], w["ln_post.bias"]) @ w["proj"]).astype(np.float32)

    def let_go(self, block: int) -> None:
        """Drop block ``block``'s weights from this process's memory, where they are mapped
        from the tower's file (`heap.release_mapped`; views of a model's tensors are left
        alone): read again, they come back from the system's page cache."""
        for array in self._blocks[block]:
            release_mapped(array)

    def patches(self, pixels: np.ndarray) -> np.ndarray:
        """``[N, grid * grid, 3 * patch * patch]``: each patch's pixels in the order of the
        convolution kernel's (channel, row, column); as the convolution, what a grid of whole
        patches does not cover is left out."""
        n, p, g = len(pixels), self.patch_size, self.grid
        patches = pixels[:, :, : g * p, : g * p].reshape(n, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
        return patches.reshape(n, g * g, 3 * p * p)

    def _attention(self, x: np.ndarray, block: str, class_only: bool) -> np.ndarray:
        """Bidirectional self-attention of every row of ``x``, or of the class token's alone."""
        w = self.weights
        batch, length, width = x.shape
        qkv = linear(x, w[block + "attn.in_proj_weight"], w[block + "attn.in_proj_bias"])
        q, k, v = qkv.reshape(batch, length, 3, self.heads, width // self.heads).transpose(2, 0, 3, 1, 4)
        if class_only:
            q = q[:, :, :1]
        scores = (q @ k.transpose(0, 1, 3, 2)) * np.float32(1 / math.sqrt(width // self.heads))
        out = softmax_rows(scores) @ v  # [N, heads, queries, head width]
        out = out.transpose(0, 2, 1, 3).reshape(batch, -1, width)
        return linear(out, w[block + "attn.out_proj.weight"], w[block + "attn.out_proj.bias"])

    @classmethod
    def from_model(cls, model: SharedSpace, preprocess: Preprocess, copy: bool = True) -> ImageTower | None:
        """The image tower of a float32 ``model`` in memory, or None when the NumPy tower cannot
        run it (`export` writes it to the cache instead, without copying it whole first).
        ``copy=False``: views of the model's weights, some transposed (as fast, measured)."""
        settings = _settings(model)
        if settings is None:
            return None
        weights = _weights(model)
        if copy:
            weights = {key: np.ascontiguousarray(value) for key, value in weights.items()}
        return cls(weights, preprocess=preprocess, **settings)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The image model's state dict (``towers="image"``), its tensors views of this tower's
        arrays: a float32 model built on it (`clip.model.Conversion`'s ``shared``) holds no copy
        of its weights, and running it reads the mapped file (`clip.cpu.measure`)."""
        import torch

        weights = {}
        with warnings.catch_warnings():  # the mapped file is read-only; the model never writes it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for key, value in self.weights.items():
                if key == "conv1.weight":  # [3 * patch * patch, width] -> [width, 3, patch, patch]
                    value = value.T.reshape(value.shape[1], 3, self.patch_size, self.patch_size)
                weights[_PREFIX + key] = torch.from_numpy(stored(key, value))  # stored: its own inverse
        weights["logit_scale"] = torch.tensor(math.log(self.logit_scale))
        return weights

    @classmethod
    def load(cls, path: Path) -> tuple[ImageTower, dict]:
        """The tower in `path`, memory-mapped, and its ``source``; ValueError if the file is not one."""
        header, weights = tower_file.load(path, _MAGIC, _FORMAT)
        mean, std = tuple(header["mean"]), tuple(header["std"])
        preprocess = Preprocess(header["resolution"], mean, std, header["resize_mode"], header["interpolation"])
        settings = {name: header[name] for name in _SETTINGS}
        return cls(weights, preprocess=preprocess, **settings), header["source"]


def _settings(model: SharedSpace, logit_scale: torch.Tensor | None = None) -> dict | None:
    """What the file records besides the arrays, read off ``model``'s modules (and its
    ``logit_scale``, unless given: that of a model without weights); None unless its image
    tower is exactly `model.VisionTransformer` in float32, with QuickGELU or exact GELU (not a
    ResNet, not SigLIP's tower)."""
    import torch
    from torch import nn

    from clipsearch.clip.model import QuickGELU, ResidualAttentionBlock, VisionTransformer

    visual = model.visual
    if type(visual) is not VisionTransformer or visual.proj.dtype != torch.float32:
        return None
    first = cast(ResidualAttentionBlock, visual.transformer.resblocks[0])
    activation = first.mlp.get_submodule("gelu")
    if not isinstance(activation, QuickGELU) and not (type(activation) is nn.GELU and activation.approximate == "none"):
        return None
    return {
        "quick_gelu": isinstance(activation, QuickGELU),
        "heads": first.attn.heads,
        "patch_size": visual.conv1.kernel_size[0],
        "logit_scale": float((model.logit_scale if logit_scale is None else logit_scale).detach().float().exp()),
    }


def _weights(model: SharedSpace) -> dict[str, np.ndarray]:
    """The image tower's arrays as the file holds them, views of ``model``'s tensors."""
    return {
        key[len(_PREFIX) :]: _as_stored(key, value.detach().cpu().numpy())
        for key, value in model.state_dict().items()
        if key.startswith(_PREFIX)
    }


def _as_stored(key: str, value: np.ndarray) -> np.ndarray:
    """A state dict's array of the image tower as the file holds it (a view)."""
    if key == _PREFIX + "conv1.weight":  # [width, 3, patch, patch] -> [3 * patch * patch, width]
        return value.reshape(value.shape[0], -1).T
    return stored(key, value)


# --- the cache ----------------------------------------------------------------------------------


def cache_file(model_ref: str) -> Path:
    """Where the image tower of ``model_ref`` (as `clip.load` is given it) is cached."""
    return tower_file.cache_file("image-towers", model_ref)


def load_cached(model_ref: str) -> ImageTower | None:
    """The cached image tower of ``model_ref``, or None when there is none or it is stale."""
    return tower_file.load_cached(cache_file(model_ref), model_ref, ImageTower.load)


class Exported(NamedTuple):
    """`export_checkpoint`'s tower, mapped; the checkpoint's configuration; and the seconds its
    weights took to read. That stands for a float32 load in the verdict (`clip.cpu.measure`),
    though `clip.load` took longer (ViT-B-32-256 from the page cache: 0.07-0.10 s read, 0.35-0.37
    s loaded): each converted precision's start is counted whole either way (the verdict's
    ``torch_start`` plus its preparation beyond that figure), and only fp32's comes out short."""

    tower: ImageTower
    config: Any
    reading_s: float


def export_checkpoint(model_ref: str) -> Exported | None:
    """Write the image tower of ``model_ref``'s checkpoint to the cache a tensor at a time, as
    read, and map it: the float32 model is never built whole (where the checkpoint's format
    reads a tensor when it is looked up: safetensors, OpenAI's archives), so a model's first
    run measures its precisions holding one block of it at a time (`clip.cpu.measure`). None
    where `export` would give none, or the weights do not fit the model they imply (`clip.load`
    says why)."""
    from clipsearch.clip import open_checkpoint
    from clipsearch.clip.build import skeleton

    checkpoint = open_checkpoint(model_ref)  # a named model: downloaded on its first use
    source = tower_file.checkpoint_state(model_ref)
    if "logit_scale" not in checkpoint.state_dict or source is None:
        return None
    model = skeleton(checkpoint.config, "image")
    settings = _settings(model, checkpoint.state_dict["logit_scale"])
    if settings is None:
        return None
    shapes = {key[len(_PREFIX) :]: value.shape for key, value in model.state_dict().items() if key.startswith(_PREFIX)}
    weights = tower_file.Checkpointed(checkpoint.state_dict, shapes, _as_stored, _PREFIX)
    path = cache_file(model_ref)
    header = _header(source, settings, checkpoint.preprocess())
    try:
        saved = tower_file.store(path, lambda path: tower_file.save(path, _MAGIC, header, weights, weights.shapes))
    except (ValueError, KeyError):  # a weight missing or of another shape
        return None
    if not saved:
        return None
    return Exported(ImageTower.load(path)[0], checkpoint.config, weights.reading_s)


def _header(source: dict, settings: dict, preprocess: Preprocess) -> dict:
    return {
        "format": _FORMAT,
        "source": source,
        **settings,
        "resolution": preprocess.resolution,
        "mean": list(preprocess.mean),
        "std": list(preprocess.std),
        "resize_mode": preprocess.resize_mode,
        "interpolation": preprocess.interpolation,
    }


def export(model: SharedSpace, model_ref: str, preprocess: Preprocess) -> ImageTower | None:
    """Write the image tower of ``model`` (float32, loaded from ``model_ref``, whose images
    ``preprocess`` prepares) to the cache, and map it back; None when the NumPy tower cannot
    run it, its checkpoint cannot be identified, or the cache cannot be written."""
    settings = _settings(model)
    source = tower_file.checkpoint_state(model_ref)
    if settings is None or source is None:
        return None
    weights = _weights(model)
    header = _header(source, settings, preprocess)
    path = cache_file(model_ref)
    if not tower_file.store(path, lambda path: tower_file.save(path, _MAGIC, header, weights)):
        return None
    return ImageTower.load(path)[0]
