"""CLIP's text tower as one ONNX Runtime graph with int8 products (`clip.onnx_graph`), for a
process that encodes many texts: `clip.text_fast` measures its `onnx_graph.KERNELS` beside
torch's and keeps the fastest faithful one.

A new text of a dozen tokens makes every product a small-M GEMM over all 38 M weights of
ViT-B/32's tower. torch's best int8 kernel took 7 ms for one, about a quarter of it outside
the products: every layer norm, softmax and add is an operator call of its own, and on two
threads an OpenMP region of its own, so a second thread did not help. The graph runs on ONNX
Runtime's own thread pool with fused operators: 4.1 ms at two threads (benchmarks/README.md).

The graph takes one text's ids ``int64 [1, L]`` after its start-of-text token, cut after its
end-of-text token (attention is causal, so nothing after it matters), and returns its
unnormalised embedding ``[1, embed_dim]``. The start token's keys and values are the same for
every text: the graph holds them, computed in float32 (`TextTower.start_keys_values`). That
saves a median query (11 tokens) a row of products, 1-3% of its time, and with that token's
activations left out of the products' one scale, the worst cosine of 300 texts went from
0.99919 to 0.99928 (ViT-B/32, random weights, AVX2; on the demo's trained weights the error fell
from 2.4e-4 to 1.3e-4).

The graph is built from the NumPy tower's arrays (`clip.numpy_text.TextTower`), which hold the
weights ``[in, out]`` as the products read them; building ViT-B/32's takes about 2 s, so the
graph of the kernel a model's verdict chose is cached beside the NumPy tower's file and a warm
process's later starts open it (`load_cached`, `remembered`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.clip import numpy_text, onnx_graph, precision_verdicts
from clipsearch.clip.numpy_text import TextTower


def build(tower: TextTower, kernel: str, metadata: Mapping[str, str] | None = None) -> bytes:
    """The serialized ONNX model of ``tower``'s encoder, its products in ``kernel`` (of
    `onnx_graph.KERNELS`), recording ``metadata`` (`onnx_graph.built_from`, for the cache)."""
    from onnx import TensorProto, helper

    w = {key: np.asarray(value, dtype=np.float32) for key, value in tower.weights.items()}
    w["final.weight"], w["final.bias"] = w["ln_final.weight"], w["ln_final.bias"]
    out = io.BytesIO()  # measured before it is cached (`clip.text_fast`)
    g = onnx_graph.Graph(kernel, onnx_graph.weight_codes("text")[0], out)  # one choice: 7 bits drift
    # The rows of the positional embedding and of the causal mask that the L tokens after the
    # start token use: positions 1 to L, seeing positions 0 to L.
    (length,) = g.op("Shape", "ids", start=1, end=2)
    (end,) = g.op("Add", length, g.constant("one", np.array([1])))
    table = g.constant("positional_embedding", w["positional_embedding"])
    (positions,) = g.op("Slice", table, "one", end, g.constant("rows", np.array([0])))
    causal = np.triu(np.full((tower.context_length,) * 2, -np.inf, dtype=np.float32), 1)
    (corner,) = g.op("Concat", end, end, axis=0)
    (mask,) = g.op("Slice", g.constant("causal", causal), g.constant("origin", np.array([1, 0])), corner)
    (mask,) = g.op("Unsqueeze", mask, g.constant("outer", np.array([0, 1])))  # [1, 1, L, L + 1]
    # The table is two thirds of the graph's bytes, of which a text reads a dozen rows: in
    # float16 it costs every process that opens the graph 50 MB less (ViT-B/32), for an error
    # (a 2^-11 relative rounding of each value) far below that of the products' 8 bits.
    table = g.constant("token_embedding.weight", w["token_embedding.weight"].astype(np.float16))
    (x,) = g.op("Cast", g.op("Gather", table, "ids")[0], to=TensorProto.FLOAT)
    (x,) = g.op("Add", x, positions)
    # Only the end-of-text token, the last row, is read from the last block on.
    pooled = onnx_graph.blocks(
        g, w, x, layers=tower.layers, heads=tower.heads, quick_gelu=tower.quick_gelu, mask=mask, keep=-1,
        before=tower.start_keys_values(),
    )  # fmt: skip
    (embedding,) = g.op("MatMul", pooled, g.constant("text_projection", w["text_projection"]))
    (embedding,) = g.op("Squeeze", embedding, g.constant("middle", np.array([1])))
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "L"])
    onnx_graph.model(g, "clip_text", [ids], embedding, [1, tower.embed_dim], metadata)
    return out.getvalue()


class OnnxTextTower:
    """An ONNX Runtime session on a `build` graph: ``encode_text`` as `TextTower`'s."""

    def __init__(self, session: Any):
        self.session = session

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        """Unnormalised embeddings ``float32 [N, embed_dim]`` of token ids ``[N, context]``,
        each text alone, cut after its end-of-text token (the largest id)."""
        rows = [row[None, 1 : int(row.argmax()) + 1].astype(np.int64) for row in np.asarray(ids)]
        return np.concatenate([self.session.run(None, {"ids": row})[0] for row in rows])


# --- the cache ----------------------------------------------------------------------------------


def cache_file(model_ref: str, kernel: str) -> Path:
    """Where the graph of ``model_ref``'s text tower in ``kernel`` is cached: beside its NumPy tower."""
    return numpy_text.cache_file(model_ref).with_suffix(f".{kernel}.onnx")


def provenance(model_ref: str, chosen_by: dict) -> dict[str, str] | None:
    """What a graph of ``model_ref``'s text tower records for the cache: `onnx_graph.built_from`,
    and ``chosen_by``, the key of the text verdict that chose (or is measuring) its kernel; None
    where the checkpoint cannot be identified."""
    built_from = onnx_graph.built_from(model_ref, "text", onnx_graph.weight_codes("text")[0])
    return {**built_from, "chosen_by": json.dumps(chosen_by)} if built_from is not None else None


def save(model_ref: str, kernel: str, graph: bytes) -> None:
    """Cache ``graph``, built with `provenance`, as ``model_ref``'s text tower in ``kernel``."""
    onnx_graph.save(cache_file(model_ref, kernel), lambda out: out.write(graph))


def load_cached(model_ref: str, chosen_by: dict, kernel: str, threads: int) -> OnnxTextTower | None:
    """The cached graph of ``model_ref``'s text tower in ``kernel`` on ``threads`` threads, when it
    was built from the checkpoint as it is now (`onnx_graph.cached_session`) and chosen by the
    verdict of key ``chosen_by``; None otherwise (one a verdict of an older torch chose is built
    again: it would never be `remembered`)."""
    opened = onnx_graph.cached_session(cache_file(model_ref, kernel), model_ref, "text", threads)
    if opened is None or _chosen_by(opened) != json.loads(json.dumps(chosen_by)):
        return None
    return OnnxTextTower(opened)


def remembered(model_ref: str, threads: int) -> tuple[str, OnnxTextTower] | None:
    """The kernel this machine's text verdict chose for ``model_ref`` and its cached graph on
    ``threads`` threads, found without importing torch: a warm text-only process then starts
    in a fraction of a second. None unless a graph is cached and current, and the verdict that
    chose it stands (`precision_verdicts.standing_text_kernel`)."""
    for kernel in onnx_graph.KERNELS:
        opened = onnx_graph.cached_session(cache_file(model_ref, kernel), model_ref, "text", threads)
        if opened is not None and precision_verdicts.standing_text_kernel(_chosen_by(opened), model_ref) == kernel:
            return kernel, OnnxTextTower(opened)
    return None


def _chosen_by(session: Any) -> object:
    """The key of the verdict that chose a cached graph, as `provenance` recorded it."""
    return json.loads(session.get_modelmeta().custom_metadata_map.get("chosen_by", "null"))
