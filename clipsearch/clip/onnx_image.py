"""CLIP's ViT image tower as one ONNX Runtime graph with int8 products (`clip.onnx_graph`), so
that a new index of any size encodes without importing torch.

Importing torch costs a process 1.2-1.3 s before its first image; the NumPy tower
(`clip.numpy_image`) skips that but encodes an image about three times as slowly as torch's
int8, so it pays only for a few dozen images. ONNX Runtime imports in about a tenth of a second
and runs this graph about as fast as torch's int8 (ViT-B/32 at 256 px on a two-core AVX-512
EPYC: 22 ms an image at a batch of 32, cosine 0.9999 to fp32; benchmarks/README.md).
`clip.precision_verdicts.torchless_image_tower` weighs the three by what this machine measured.

The graph is built from the NumPy tower's arrays, when "auto" measures the precisions on a
model's first run (`clip.cpu`), and cached beside the NumPy tower's file, with the checkpoint
state it was built from in its metadata: a later process checks that and maps the file in
ONNX Runtime's session. It takes the images' patches ``float32 [N, grid * grid, 3 * patch *
patch]`` (`numpy_image.ImageTower.patches`), so the patch convolution is one product.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.clip import numpy_image, onnx_graph, tower_file
from clipsearch.clip.cpu_features import usable_cores
from clipsearch.clip.numpy_ops import LN_EPS
from clipsearch.clip.precision_verdicts import ONNX

log = logging.getLogger(__name__)

KERNEL = "onnx-int8-dynamic"  # per-tensor activations: as close to fp32 as torch's int8 (cosine 0.9999)


def build(tower: numpy_image.ImageTower, source: dict) -> bytes:
    """The serialized ONNX model of ``tower``'s encoder, recording ``source`` (the checkpoint's
    `tower_file.checkpoint_state`)."""
    from onnx import TensorProto, helper

    w = {key: np.asarray(value, dtype=np.float32) for key, value in tower.weights.items()}
    w["final.weight"], w["final.bias"] = w["ln_post.weight"], w["ln_post.bias"]
    width = w["class_embedding"].shape[0]
    g = onnx_graph.Graph(KERNEL)
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
    return onnx_graph.model(
        g, "clip_image", [patches], embedding, ["N", tower.embed_dim], metadata={"source": _encoded(source)}
    )


class OnnxImageTower:
    """A `build` graph's session beside the NumPy tower it was built from, which lends it its
    preprocessing and settings and cuts images into patches: what `encoder.NumpyImageEncoder`
    reads of a tower, ``encode_images`` as `numpy_image.ImageTower`'s."""

    precision = "int8-onnx"
    kind = ONNX  # its name among the costs a verdict compares

    def __init__(self, graph: bytes | str, tower: numpy_image.ImageTower):
        self.graph, self.tower = graph, tower
        self.preprocess, self.embed_dim, self.logit_scale = tower.preprocess, tower.embed_dim, tower.logit_scale
        self._sessions: dict[int, Any] = {}

    def session(self, threads: int):
        """The session on ``threads`` threads, opened on first use (a tenth of a second)."""
        if threads not in self._sessions:
            self._sessions[threads] = onnx_graph.session(self.graph, threads)
        return self._sessions[threads]

    def encode_images(self, pixels: np.ndarray, threads: int | None = None) -> np.ndarray:
        """Unnormalised image embeddings ``float32 [N, embed_dim]`` of preprocessed images
        ``[N, 3, R, R]``, on ``threads`` threads (by default one per core this process may use)."""
        patches = self.tower.patches(np.asarray(pixels, dtype=np.float32))
        return self.session(threads or usable_cores()).run(None, {"patches": patches})[0]


# --- the cache ----------------------------------------------------------------------------------


def cache_file(model_ref: str) -> Path:
    """Where the graph of ``model_ref``'s image tower is cached: beside its NumPy tower."""
    return numpy_image.cache_file(model_ref).with_suffix(".onnx")


def export(tower: numpy_image.ImageTower, model_ref: str) -> Path | None:
    """Build ``tower``'s graph and write it to the cache; its path, or None when the checkpoint
    cannot be identified or the cache cannot be written."""
    source = tower_file.checkpoint_state(model_ref)
    if source is None:
        return None
    graph = build(tower, source)
    path = cache_file(model_ref)
    if not tower_file.store(path, lambda path: _write(path, graph)):
        return None
    return path


def load_cached(model_ref: str) -> OnnxImageTower | None:
    """The cached graph of ``model_ref``'s image tower, its session open, when it was built from
    the checkpoint as it is now; None when there is none, it is stale or damaged, or the
    ``onnx`` extra is missing."""
    path = cache_file(model_ref)
    tower = numpy_image.load_cached(model_ref)
    if tower is None or not path.is_file() or not onnx_graph.available():
        return None
    found = OnnxImageTower(str(path), tower)
    try:
        recorded = found.session(usable_cores()).get_modelmeta().custom_metadata_map.get("source")
    except Exception as err:  # onnxruntime raises its own exception types for a damaged file
        log.info("Ignoring the damaged image graph %s (%s)", path, err)
        return None
    if recorded != _encoded(tower_file.checkpoint_state(model_ref)):
        log.info("The image graph %s is stale: %s has changed, or was built by an older clipsearch", path, model_ref)
        return None
    return found


def _encoded(source: dict | None) -> str:
    """What a graph records of how it was built: the checkpoint state and `onnx_graph.LAYOUT`."""
    return json.dumps({"checkpoint": source, "layout": onnx_graph.LAYOUT}, sort_keys=True)


def _write(path: Path, graph: bytes) -> None:
    with tower_file.replaced(path) as tmp:
        tmp.write_bytes(graph)
