"""CLIP's ViT image tower as one ONNX Runtime graph with int8 products (`clip.onnx_graph`), so
that a new index of any size encodes without importing torch.

Importing torch costs a process 1.2-1.3 s before its first image; the NumPy tower
(`clip.numpy_image`) skips that but encodes an image about three times as slowly as torch's
int8, so it pays only for a few dozen images. ONNX Runtime imports in about a tenth of a second
and runs this graph about as fast as torch's int8 (ViT-B/32 at 256 px on a two-core AVX-512
EPYC: 19 ms an image at a batch of 32, cosine 0.9999 to fp32; on an AVX2-only one, with 7-bit
weights, 60 ms against torch int8's 72 in the same verdict; benchmarks/README.md).
`clip.precision_verdicts.torchless_image_tower` weighs the three by what this machine measured.

The graph is built from the NumPy tower's arrays, when "auto" measures the precisions on a
model's first run (`clip.cpu`), and cached beside the NumPy tower's file, with the checkpoint
state it was built from in its metadata: a later process reads that from the file
(`onnx_graph.current`) and opens ONNX Runtime's session on it while it decodes (`load_cached`).
It takes the images' patches ``float32 [N, grid * grid, 3 * patch * patch]``
(`numpy_image.ImageTower.patches`), so the patch convolution is one product.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from clipsearch.clip import numpy_image, onnx_graph
from clipsearch.clip.cpu_features import usable_cores
from clipsearch.clip.numpy_ops import LN_EPS
from clipsearch.clip.precision_verdicts import ONNX

log = logging.getLogger(__name__)

KERNEL = "onnx-int8-dynamic"  # per-tensor activations: as close to fp32 as torch's int8 (cosine 0.9999)


def build(
    tower: numpy_image.ImageTower,
    codes: str,
    out: BinaryIO,
    metadata: Mapping[str, str] | None = None,
    weights: BinaryIO | None = None,
    weights_name: str = "",
) -> None:
    """Write the ONNX model of ``tower``'s encoder to ``out``, its weights in ``codes`` (of
    `onnx_graph.weight_codes`), recording ``metadata`` (`onnx_graph.built_from`, for the cache);
    with ``weights``, the weights' values there (`onnx_graph.Graph`)."""
    from onnx import TensorProto, helper

    w = {key: np.asarray(value, dtype=np.float32) for key, value in tower.weights.items()}
    w["final.weight"], w["final.bias"] = w["ln_post.weight"], w["ln_post.bias"]
    width = w["class_embedding"].shape[0]
    g = onnx_graph.Graph(KERNEL, codes, out, weights, weights_name)
    (x,) = g.op("MatMul", "patches", g.constant("conv1.weight", w["conv1.weight"]))  # the patch convolution
    (count,) = g.op("Shape", "patches", start=0, end=1)
    (shape,) = g.op("Concat", count, g.constant("one_row", np.array([1, width])), axis=0)
    (cls,) = g.op("Expand", g.constant("class_embedding", w["class_embedding"][None, None]), shape)
    (x,) = g.op("Concat", cls, x, axis=1)
    (x,) = g.op("Add", x, g.constant("positional_embedding", w["positional_embedding"]))
    ln_pre = [g.constant(f"ln_pre.{p}", w[f"ln_pre.{p}"]) for p in ("weight", "bias")]
    (x,) = g.op("LayerNormalization", x, *ln_pre, axis=-1, epsilon=LN_EPS)
    # Bidirectional attention; only the class token, the first row, is read from the last block on.
    pooled = onnx_graph.blocks(
        g, w, x, layers=tower.layers, heads=tower.heads, quick_gelu=tower.quick_gelu, mask="", keep=0
    )
    (embedding,) = g.op("MatMul", pooled, g.constant("proj", w["proj"]))
    (embedding,) = g.op("Squeeze", embedding, g.constant("middle", np.array([1])))
    patches = helper.make_tensor_value_info(
        "patches", TensorProto.FLOAT, ["N", tower.grid**2, w["conv1.weight"].shape[0]]
    )
    onnx_graph.model(g, "clip_image", [patches], embedding, ["N", tower.embed_dim], metadata)


class OnnxImageTower:
    """A `build` graph's session beside the NumPy tower it was built from, which lends it its
    preprocessing and settings and cuts images into patches: what `encoder.NumpyImageEncoder`
    reads of a tower, ``encode_images`` as `numpy_image.ImageTower`'s."""

    precision = "int8-onnx"
    kind = ONNX  # its name among the costs a verdict compares
    # ONNX Runtime's threads take their work in small pieces, so one that loses its core to a
    # decode worker for a while holds the others up little: 12-MP photos went 1.4x faster with two
    # workers beside the graph on both cores of two than with one beside it on one
    # (`decode.best_workers`; torch's OpenMP threads stall at every barrier instead).
    shares_cores = True

    def __init__(self, graph: bytes | str, tower: numpy_image.ImageTower, sessions: dict[int, Any] | None = None):
        """``sessions``: those already open on ``graph`` (or opening: a `Future`), by thread count."""
        self.graph, self.tower = graph, tower
        self.preprocess, self.embed_dim, self.logit_scale = tower.preprocess, tower.embed_dim, tower.logit_scale
        self._sessions = sessions or {}
        self._unreadable = False

    def session(self, threads: int):
        """The session on ``threads`` threads, opened on first use (a tenth of a second), or the
        one `load_cached` began to open, once it is; None once the graph proved unreadable
        (damaged past what `onnx_graph.recorded` reads), when the NumPy tower encodes instead."""
        if self._unreadable:
            return None
        if threads not in self._sessions:
            self._sessions[threads] = onnx_graph.session(self.graph, threads)
        opened = self._sessions[threads]
        if isinstance(opened, Future):
            try:
                opened = self._sessions[threads] = opened.result()
            except Exception as err:  # onnxruntime's own exception types
                log.warning("Cannot read the cached graph %s (%s): encoding with the NumPy tower", self.graph, err)
                self._unreadable = True
                return None
        return opened

    def encode_images(self, pixels: np.ndarray, threads: int | None = None) -> np.ndarray:
        """Unnormalised image embeddings ``float32 [N, embed_dim]`` of preprocessed images
        ``[N, 3, R, R]``, on ``threads`` threads (by default one per core this process may use)."""
        pixels = np.asarray(pixels, dtype=np.float32)
        session = self.session(threads or usable_cores())
        if session is None:
            return self.tower.encode_images(pixels)
        return session.run(None, {"patches": self.tower.patches(pixels)})[0]


# --- the cache ----------------------------------------------------------------------------------


def cache_file(model_ref: str) -> Path:
    """Where the graph of ``model_ref``'s image tower is cached: beside its NumPy tower."""
    return numpy_image.cache_file(model_ref).with_suffix(".onnx")


def export(tower: numpy_image.ImageTower, model_ref: str, codes: str) -> Path | None:
    """Build ``tower``'s graph with weights in ``codes`` and write it to the cache; its path, or
    None when the checkpoint cannot be identified or the cache cannot be written."""
    metadata = onnx_graph.built_from(model_ref, "image", codes)
    path = cache_file(model_ref)
    if metadata is None or not onnx_graph.save_with_weights(
        path, lambda out, weights, name: build(tower, codes, out, metadata, weights, name)
    ):
        return None
    return path


def load_cached(model_ref: str) -> OnnxImageTower | None:
    """The cached graph of ``model_ref``'s image tower when it was built from the checkpoint as
    it is now (`onnx_graph.current`), beside its NumPy tower; None otherwise.

    Its session opens on another thread: ONNX Runtime lets go of the GIL while it reads and
    packs the weights (0.35-0.45 s for ViT-B/32 in a new process on a two-core AVX2 EPYC), and
    an index run decodes its first batch meanwhile (0.24 s for 32 photos of 640x480; both
    together took 0.32 s). Its first batch waits for the session (`OnnxImageTower.session`)."""
    tower = numpy_image.load_cached(model_ref)
    path = cache_file(model_ref)
    if tower is None or not onnx_graph.current(path, model_ref, "image"):
        return None
    threads = usable_cores()
    opener = ThreadPoolExecutor(1, thread_name_prefix="clipsearch-onnx-session")
    opening = opener.submit(onnx_graph.session, str(path), threads)
    opener.shutdown(wait=False)  # its one thread ends once the session is open
    return OnnxImageTower(str(path), tower, {threads: opening})
