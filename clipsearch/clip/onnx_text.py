"""CLIP's text tower as one ONNX Runtime graph with 8-bit weights, for a process that encodes
many texts: `clip.text_fast` measures its `KERNELS` beside torch's and keeps the fastest
faithful one.

A new text of a dozen tokens makes every product a small-M GEMM over all 38 M weights of
ViT-B/32's tower. torch's best int8 kernel took 7 ms for one, about a quarter of it outside
the products: every layer norm, softmax and add is an operator call of its own, and on two
threads an OpenMP region of its own, so a second thread did not help. The graph built here
runs on ONNX Runtime's own thread pool with its fused operators (`SkipLayerNormalization` adds
the residual, and the bias of the MLP before it, then normalises in one pass;
`MultiHeadAttention` does the heads, scaling, causal mask and softmax), and its int8 products:
`DynamicQuantizeMatMul` (the input quantised per tensor, as torch's dynamic int8) or
`MatMulNBits` at accuracy level 4 (weights and inputs quantised per block of inputs, then VNNI
dot products), slower and closer to fp32.

The graph takes one text's ids ``int64 [1, L]``, cut after its end-of-text token (attention is
causal, so nothing after it matters), and returns its unnormalised embedding
``[1, embed_dim]``. It is built from the NumPy tower's arrays (`clip.numpy_text.TextTower`),
which hold the weights ``[in, out]`` as both operators read them.

It needs the ``onnx`` extra (onnxruntime, and onnx to write the graph); without it `available`
is False and the torch kernels are all there are.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np

from clipsearch.clip.numpy_ops import LN_EPS
from clipsearch.clip.numpy_text import TextTower

# The kernels `clip.text_fast` measures, and the inputs per scale each quantises its weights and
# activations with: None for int8 per output channel with the input quantised per tensor
# (`DynamicQuantizeMatMul`), the fastest; a block size for `MatMulNBits`, slower and within a
# third of the distance to fp32 (ViT-B/32, random weights: cosine 0.99946 against 0.99913).
KERNELS: dict[str, int | None] = {"onnx-int8-dynamic": None, "onnx-int8-blocks": 128}
_CONTRIB = "com.microsoft"  # the domain of ONNX Runtime's own operators


def available() -> bool:
    """Whether onnxruntime and onnx are installed (the ``onnx`` extra)."""
    return version() is not None


def version() -> str | None:
    """The installed onnxruntime's version (a remembered measurement depends on it), or None
    without the ``onnx`` extra."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def quantise(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """A ``[in, out]`` weight as `MatMulNBits` reads 8-bit weights: ``uint8 [out, blocks,
    block]`` holding ``round(w / scale) + 128`` (symmetric: 128 is the zero point the operator
    assumes when given none; inputs past the last whole block are zeros), and the scales
    ``float32 [out, blocks]``, one per block of ``block`` inputs of an output: its largest
    magnitude over 127."""
    inputs, outputs = weight.shape
    blocks = -(-inputs // block)
    padded = np.zeros((blocks * block, outputs), dtype=np.float32)
    padded[:inputs] = weight
    grouped = padded.T.reshape(outputs, blocks, block)
    scales = np.abs(grouped).max(axis=-1) / 127
    codes = np.rint(grouped / np.where(scales == 0, 1, scales)[..., None]) + 128
    return codes.astype(np.uint8), scales.astype(np.float32)


class _Graph:
    """The nodes and initializers of a graph under construction, each output named once."""

    def __init__(self, kernel: str) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.block = KERNELS[kernel]
        self.nodes: list = []
        self.initializers: list = []
        self._ids = itertools.count()

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.require(value, requirements="C"), name))
        return name

    def op(self, kind: str, *inputs: str, outputs: int = 1, domain: str = "", **attributes) -> list[str]:
        names = [f"{kind}_{next(self._ids)}" for _ in range(outputs)]
        self.nodes.append(self.helper.make_node(kind, list(inputs), names, name=names[0], domain=domain, **attributes))
        return names

    def linear(self, x: str, weights: Mapping[str, np.ndarray], name: str, *, bias: bool = True) -> str:
        """``x @ W (+ b)`` of the ``[in, out]`` weight ``name + "weight"``, in 8 bits."""
        weight = weights[name + "weight"]
        b = self.constant(name + "bias", weights[name + "bias"]) if bias else ""
        if self.block is None:  # int8 per output channel; the input quantised per tensor as it comes
            scales = np.abs(weight).max(axis=0) / 127
            codes = np.clip(np.rint(weight / np.where(scales == 0, 1, scales)), -127, 127).astype(np.int8)
            codes_name = self.constant(name + "codes", codes)
            scales_name = self.constant(name + "scales", scales.astype(np.float32))
            (y,) = self.op("DynamicQuantizeMatMul", x, codes_name, scales_name, "", b, domain=_CONTRIB)
            return y
        codes, scales = quantise(weight, self.block)
        outputs = len(codes)
        inputs = [x, self.constant(name + "codes", codes), self.constant(name + "scales", scales), "", "", b]
        (y,) = self.op(
            "MatMulNBits", *inputs[: 6 if bias else 3], domain=_CONTRIB, K=len(weight), N=outputs, bits=8,
            block_size=self.block, accuracy_level=4,
        )  # fmt: skip
        return y


def build(tower: TextTower, kernel: str) -> bytes:
    """The serialized ONNX model of ``tower``'s encoder, its products in ``kernel`` (of `KERNELS`)."""
    from onnx import TensorProto, helper

    w = {key: np.asarray(value, dtype=np.float32) for key, value in tower.weights.items()}
    g = _Graph(kernel)
    for key in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"):
        g.constant(key, w[key])
    # The rows of the positional embedding and of the causal mask that a text of L tokens uses.
    (length,) = g.op("Shape", "ids", start=1, end=2)
    zero = g.constant("zero", np.array([0]))
    (positions,) = g.op("Slice", "positional_embedding", zero, length, zero)
    causal = np.triu(np.full((tower.context_length,) * 2, -np.inf, dtype=np.float32), 1)
    (square,) = g.op("Concat", length, length, axis=0)
    (mask,) = g.op("Slice", g.constant("causal", causal), g.constant("origin", np.array([0, 0])), square)
    (mask,) = g.op("Unsqueeze", mask, g.constant("outer", np.array([0, 1])))  # [1, 1, L, L]
    (x,) = g.op("Gather", "token_embedding.weight", "ids")
    (x,) = g.op("Add", x, positions)
    last = g.constant("last", np.array([-1]))
    # The last MLP's output and bias, added to the residual stream by the next norm.
    mlp_out: str | None = None
    mlp_bias = ""
    for i in range(tower.layers):
        b = f"transformer.resblocks.{i}."
        ln_1 = [g.constant(b + "ln_1." + p, w[b + "ln_1." + p]) for p in ("weight", "bias")]
        ln_2 = [g.constant(b + "ln_2." + p, w[b + "ln_2." + p]) for p in ("weight", "bias")]
        if mlp_out is None:
            (y,) = g.op("LayerNormalization", x, *ln_1, axis=-1, epsilon=LN_EPS)
        else:
            y, _, _, x = g.op(
                "SkipLayerNormalization", x, mlp_out, *ln_1, mlp_bias, outputs=4, domain=_CONTRIB, epsilon=LN_EPS
            )
        q, k, v = g.op("Split", g.linear(y, w, b + "attn.in_proj_"), outputs=3, axis=-1, num_outputs=3)
        if i < tower.layers - 1:
            (attended,) = g.op("MultiHeadAttention", q, k, v, "", "", mask, domain=_CONTRIB, num_heads=tower.heads)
        else:  # only the end-of-text token, the last row, is read from here on; it sees every token
            (q,) = g.op("Gather", q, last, axis=1)
            (x,) = g.op("Gather", x, last, axis=1)
            (attended,) = g.op("MultiHeadAttention", q, k, v, domain=_CONTRIB, num_heads=tower.heads)
        attended = g.linear(attended, w, b + "attn.out_proj.")
        y, _, _, x = g.op("SkipLayerNormalization", x, attended, *ln_2, outputs=4, domain=_CONTRIB, epsilon=LN_EPS)
        y = g.linear(y, w, b + "mlp.c_fc.")
        if tower.quick_gelu:
            (y,) = g.op("QuickGelu", y, domain=_CONTRIB, alpha=1.702)
        else:
            (y,) = g.op("Gelu", y, domain=_CONTRIB)
        mlp_out = g.linear(y, w, b + "mlp.c_proj.", bias=False)
        mlp_bias = g.constant(b + "mlp.c_proj.bias", w[b + "mlp.c_proj.bias"])
    assert mlp_out is not None
    pooled, _, _, _ = g.op(
        "SkipLayerNormalization", x, mlp_out, "ln_final.weight", "ln_final.bias", mlp_bias,
        outputs=4, domain=_CONTRIB, epsilon=LN_EPS,
    )  # fmt: skip
    (embedding,) = g.op("MatMul", pooled, g.constant("text_projection", w["text_projection"]))
    (embedding,) = g.op("Squeeze", embedding, g.constant("middle", np.array([1])))
    graph = helper.make_graph(
        g.nodes,
        "clip_text",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "L"])],
        [helper.make_tensor_value_info(embedding, TensorProto.FLOAT, [1, tower.embed_dim])],
        g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(_CONTRIB, 1)])
    return model.SerializeToString()


class OnnxTextTower:
    """An ONNX Runtime session on a `build` graph: ``encode_text`` as `TextTower`'s."""

    def __init__(self, model: bytes, *, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # its warnings are about shapes it infers, not for users
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        """Unnormalised embeddings ``float32 [N, embed_dim]`` of token ids ``[N, context]``,
        each text alone, cut after its end-of-text token (the largest id)."""
        rows = [row[None, : int(row.argmax()) + 1].astype(np.int64) for row in np.asarray(ids)]
        return np.concatenate([self.session.run(None, {"ids": row})[0] for row in rows])
