"""ONNX Runtime graphs of CLIP's transformer towers with int8 products (`clip.onnx_text`,
`clip.onnx_image`): what both build them from, and the session that runs one.

A transformer block is pre-LayerNorm: ``x + attention(ln_1(x))``, then ``x + mlp(ln_2(x))``.
`blocks` writes it with plain ``Add`` and ``LayerNormalization`` and two of ONNX Runtime's own
operators: `MultiHeadAttention` does the heads, scaling, mask and softmax, and the products are
int8 (`Graph.linear`). The last block computes its attention output and MLP for the one row the
tower reads (the text's end-of-text token, the image's class token). Tokens that begin every
sequence alike (the text's start token) come as their keys and values, not computed again.

A graph is built once per model and machine and cached as a file (`save`) that records the
checkpoint it was built from, its tower's `LAYOUTS` and its weights' `CODES`; a later process
opens a session on it (`cached_session`) unless one has changed. The image graph keeps its
weights in a second file beside it (`Graph`'s ``weights``), which ONNX Runtime reads without
holding a parsed copy: a session on ViT-B/32's image graph held 165 MB so, 220 with them inside.

It needs the ``onnx`` extra (onnxruntime runs a graph, onnx writes it); without it `available`
is False and the towers run in torch or NumPy.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import logging
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from clipsearch.clip import heap, tower_file
from clipsearch.clip.cpu_features import has_vnni
from clipsearch.clip.numpy_ops import LN_EPS

log = logging.getLogger(__name__)

# The product kernels, and the inputs per scale each quantises its weights and activations
# with: None for int8 per output channel with the input quantised per tensor as it comes
# (`DynamicQuantizeMatMul`), the fastest; a block size for `MatMulNBits` at accuracy level 4,
# slower and closer to fp32 (ViT-B/32's text tower, random weights: cosine 0.99946 against 0.99913).
KERNELS: dict[str, int | None] = {"onnx-int8-dynamic": None, "onnx-int8-blocks": 128}
CONTRIB = "com.microsoft"  # the domain of ONNX Runtime's own operators
# Optimisations a session must not make: ONNX Runtime would fuse each residual ``Add`` with the
# ``LayerNormalization`` after it into a `SkipLayerNormalization`, which on this CPU (1.32,
# AVX-512) takes 29 µs for 11 rows of 512 where the two operators take 4.5 µs.
UNFUSED = ["SkipLayerNormFusion"]
# The version of each tower's graph (`onnx_text.build`, `onnx_image.build`, and the `blocks`
# both write: a change there moves both) and of what its file records: a cached graph or a
# remembered measurement of an older one is rebuilt or measured again, the other tower's kept.
LAYOUTS = {"text": 6, "image": 7}

# How `Graph.linear`'s per-channel kernel stores its weights, and the largest code: ONNX Runtime
# multiplies the unsigned activations by them with a kernel chosen by the weights' type.
# - "s8": signed. Its u8 x s8 kernel sums in int32 where the CPU has VNNI, exactly. Without VNNI
#   (AVX2) it adds each pair of products in saturating int16 (``vpmaddubsw``), which took
#   ViT-B/32's text tower from cosine 0.99922 to 0.99642.
# - "u8": unsigned around 128. Its u8 x u8 kernel widens both to int16 first: exact anywhere.
# - "s7": signed within +-63, so that no pair of products (at most 255 x 63 x 2 = 32,130) leaves
#   int16: the u8 x s8 kernel again, exact on AVX2 too and there 12% faster than "u8" for the
#   image graph, for twice the rounding step (ViT-B/32, random weights: image cosine 0.99987
#   against 0.99992; text 0.99816 against 0.99922, too far; benchmarks/README.md).
CODES = {"s8": 127, "u8": 127, "s7": 63}


def weight_codes(tower: str) -> tuple[str, ...]:
    """The `CODES` a graph of ``tower`` may hold on this CPU, the fastest first: one that drifts
    from fp32 is built again in the next (`clip.cpu`). A graph records which it holds
    (`built_from`), so a cache shared by both kinds of CPU never hands one the other's graph."""
    if has_vnni():
        return ("s8",)
    return ("s7", "u8") if tower == "image" else ("u8",)


def available() -> bool:
    """Whether onnxruntime and onnx are installed (the ``onnx`` extra), known without importing them."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def quantise(weight: np.ndarray, block: int, top: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """A ``[in, out]`` weight as `MatMulNBits` reads 8-bit weights: ``uint8 [out, blocks,
    block]`` holding ``round(w / scale) + 128`` (symmetric: 128 is the zero point the operator
    assumes when given none; inputs past the last whole block are zeros), and the scales
    ``float32 [out, blocks]``, one per block of ``block`` inputs of an output: its largest
    magnitude over ``top``, the largest code."""
    inputs, outputs = weight.shape
    blocks = -(-inputs // block)
    padded = np.zeros((blocks * block, outputs), dtype=np.float32)
    padded[:inputs] = weight
    grouped = padded.T.reshape(outputs, blocks, block)
    scales = np.abs(grouped).max(axis=-1) / top
    codes = np.rint(grouped / np.where(scales == 0, 1, scales)[..., None]) + 128
    return codes.astype(np.uint8), scales.astype(np.float32)


class Graph:
    """The nodes of a graph under construction, each output named once, and its model written to
    ``out`` as it is built.

    Each initializer is written out as it comes, in a message of its own: protobuf merges the
    repeats of a message field (`model` writes the graph field once per weight and once more for
    the nodes), so the file is one model, and the weights are never held together in memory. A
    first run building ViT-B/32's image graph added 340 MB to its peak while the graph was held
    as one message and then serialized whole (`onnx.helper`'s `make_graph` and `make_model`,
    before that, copied every weight twice more).

    With ``weights`` (a file `save` names ``weights_name``, beside the graph's), the values of
    all but the smallest initializers go there instead, as ONNX's external data: ONNX Runtime
    parsed the ones inside the graph into a copy it kept beside the packed weights it runs."""

    def __init__(self, kernel: str, codes: str, out: BinaryIO, weights: BinaryIO | None = None, weights_name: str = ""):
        """``codes``: of `CODES`, for ``kernel``'s per-channel products."""
        from onnx import GraphProto, ModelProto, TensorProto, helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self._model, self._graph, self._external = ModelProto, GraphProto, TensorProto.EXTERNAL
        self.block = KERNELS[kernel]
        self.codes = codes
        self.out = out
        self.weights, self.weights_name = weights, weights_name
        self.nodes: list = []
        self._ids = itertools.count()

    def constant(self, name: str, value: np.ndarray) -> str:
        tensor = self.numpy_helper.from_array(np.require(value, requirements="C"), name)
        if self.weights is not None and len(tensor.raw_data) >= _EXTERNAL_BYTES:
            offset = self.weights.seek(-self.weights.tell() % _ALIGN, os.SEEK_CUR)
            self.weights.write(tensor.raw_data)
            tensor.ClearField("raw_data")
            tensor.data_location = self._external
            length = self.weights.tell() - offset
            for key, text in (("location", self.weights_name), ("offset", offset), ("length", length)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(text)
        self.out.write(self._model(graph=self._graph(initializer=[tensor])).SerializeToString())
        return name

    def op(self, kind: str, *inputs: str, outputs: int = 1, domain: str = "", **attributes) -> list[str]:
        names = [f"{kind}_{next(self._ids)}" for _ in range(outputs)]
        self.nodes.append(self.helper.make_node(kind, list(inputs), names, name=names[0], domain=domain, **attributes))
        return names

    def linear(self, x: str, weights: Mapping[str, np.ndarray], name: str) -> str:
        """``x @ W + b`` of the ``[in, out]`` weight ``name + "weight"``, in 8-bit products (per
        output channel in the graph's `CODES`, or per block)."""
        weight = weights[name + "weight"]
        b = self.constant(name + "bias", weights[name + "bias"])
        if self.block is None:  # int8 per output channel (one block of every input), [in, out]
            codes, scales = quantise(weight, len(weight), CODES[self.codes])
            heap.release_mapped(weight)  # a tower file's pages, read: only the codes are kept
            codes, scales = codes[:, 0].T, scales[:, 0]
            if self.codes == "u8":
                zero = self.constant(name + "zero", np.full(len(scales), 128, dtype=np.uint8))
                inputs = [x, self.constant(name + "codes", codes), self.constant(name + "scales", scales), zero, b]
            else:
                signed = (codes.astype(np.int16) - 128).astype(np.int8)
                inputs = [x, self.constant(name + "codes", signed), self.constant(name + "scales", scales), "", b]
            (y,) = self.op("DynamicQuantizeMatMul", *inputs, domain=CONTRIB)
            return y
        codes, scales = quantise(weight, self.block)
        heap.release_mapped(weight)
        inputs = [x, self.constant(name + "codes", codes), self.constant(name + "scales", scales), "", "", b]
        (y,) = self.op(
            "MatMulNBits", *inputs, domain=CONTRIB, K=len(weight), N=len(codes), bits=8, block_size=self.block,
            accuracy_level=4,
        )  # fmt: skip
        return y

    def norm(self, x: str, weights: Mapping[str, np.ndarray], name: str) -> str:
        """The LayerNorm of ``x`` with ``name + "weight"`` and ``name + "bias"``."""
        scale, shift = (self.constant(name + p, weights[name + p]) for p in ("weight", "bias"))
        (y,) = self.op("LayerNormalization", x, scale, shift, axis=-1, epsilon=LN_EPS)
        return y


_EXTERNAL_BYTES = 4096  # smaller initializers (LayerNorms' and biases) stay inside the graph
_ALIGN = 64  # each value in a weights file starts on a 64-byte boundary


def blocks(
    g: Graph,
    w: Mapping[str, np.ndarray],
    x: str,
    *,
    layers: int,
    heads: int,
    quick_gelu: bool,
    mask: str,
    keep: int,
    before: Sequence[tuple[np.ndarray, np.ndarray]] = (),
) -> str:
    """The residual stream after ``layers`` blocks of the weights ``w`` (state-dict names under
    ``transformer.resblocks.``, linear weights ``[in, out]``), for row ``keep`` of each sequence
    alone in the last block (its output: ``[N, 1, width]``), normalised by ``ln_final`` or
    ``ln_post``'s weights, which the caller passes as ``w["final.weight"]``, ``w["final.bias"]``.
    ``mask``: an additive attention bias ``[1, 1, L, P + L]`` for every block but the last
    (whose one row sees every token), or "" for none. ``before``: each block's attention keys
    and values ``[P, width]`` of P tokens that come before every sequence (the same for all),
    which its rows attend to first."""
    kept = g.constant("kept", np.array([keep]))
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        qkv = g.linear(g.norm(x, w, b + "ln_1."), w, b + "attn.in_proj_")
        q, k, v = g.op("Split", qkv, outputs=3, axis=-1, num_outputs=3)
        past = [g.constant(f"{b}before.{j}", _per_head(a, heads)) for j, a in enumerate(before[i])] if before else []
        if i == layers - 1:
            (q,) = g.op("Gather", q, kept, axis=1)
            (x,) = g.op("Gather", x, kept, axis=1)
            mask = ""
        # ONNX Runtime's CPU kernel reads a past key and value only when asked for the present
        # ones too (1.32: without them it attended to what was left in memory).
        attended = g.op(
            "MultiHeadAttention", q, k, v, "", "", mask, *past, outputs=3 if past else 1, domain=CONTRIB,
            num_heads=heads,
        )[0]  # fmt: skip
        (x,) = g.op("Add", x, g.linear(attended, w, b + "attn.out_proj."))
        y = g.linear(g.norm(x, w, b + "ln_2."), w, b + "mlp.c_fc.")
        if quick_gelu:
            (y,) = g.op("QuickGelu", y, domain=CONTRIB, alpha=1.702)
        else:
            (y,) = g.op("Gelu", y, domain=CONTRIB)
        (x,) = g.op("Add", x, g.linear(y, w, b + "mlp.c_proj."))
    return g.norm(x, w, "final.")


def _per_head(rows: np.ndarray, heads: int) -> np.ndarray:
    """Keys or values ``[P, width]`` as `MultiHeadAttention` takes a past's: ``[1, heads, P, head width]``."""
    count, width = rows.shape
    return rows.reshape(1, count, heads, width // heads).transpose(0, 2, 1, 3).astype(np.float32)


def model(
    g: Graph, name: str, inputs: list, output: str, output_shape: list, metadata: Mapping[str, str] | None = None
) -> None:
    """Write the rest of ``g``'s model to its ``out``: its ``inputs`` (value infos), ``output``
    float32, and ``metadata`` (what a session's ``get_modelmeta().custom_metadata_map`` reads back)."""
    from onnx import IR_VERSION, ModelProto, TensorProto, helper

    built = ModelProto(ir_version=IR_VERSION)
    built.opset_import.extend([helper.make_opsetid("", 18), helper.make_opsetid(CONTRIB, 1)])
    built.graph.name = name
    built.graph.node.extend(g.nodes)
    built.graph.input.extend(inputs)
    built.graph.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape))
    if g.weights is not None:  # what `current` checks the weights file against
        metadata = {**(metadata or {}), "weights": g.weights_name, "weights_bytes": str(g.weights.tell())}
    if metadata:
        helper.set_model_props(built, dict(metadata))
    g.out.write(built.SerializeToString())


def session(graph: bytes | str, threads: int):
    """An ONNX Runtime session on ``graph`` (the model, or its file) with ``threads`` threads of its own."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # its warnings are about shapes it infers, not for users
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"], disabled_optimizers=UNFUSED)


# --- the cache ----------------------------------------------------------------------------------


def built_from(model_ref: str, tower: str, codes: str) -> dict[str, str] | None:
    """What a cached graph of ``model_ref``'s ``tower`` with weights in ``codes`` records
    (`model`'s metadata): the checkpoint as it is now, the tower's `LAYOUTS` and the codes; None
    when the checkpoint cannot be identified (nothing is cached then)."""
    source = tower_file.checkpoint_state(model_ref)
    return None if source is None else {"built_from": _built_from(source, tower, codes)}


def _built_from(source: dict, tower: str, codes: str) -> str:
    """`built_from`'s record for the checkpoint state ``source``."""
    return json.dumps({"checkpoint": source, "layout": LAYOUTS[tower], "codes": codes}, sort_keys=True)


def save(path: Path, write: Callable[[BinaryIO], object]) -> bool:
    """Write the graph ``write`` writes to the file it is given into the cache at ``path`` (whole
    or not at all); False, logged, when it cannot be written, which only costs later processes
    the time to build it again."""

    def store(path: Path) -> None:
        with tower_file.replaced(path) as tmp, open(tmp, "wb") as out:
            write(out)

    return tower_file.store(path, store)


def save_with_weights(path: Path, write: Callable[[BinaryIO, BinaryIO, str], object]) -> bool:
    """`save` for a graph whose weights ``write(out, weights, weights_name)`` writes to a file
    of their own (`Graph`): named anew for each build, in place before the graph that names
    it, so that no graph is ever read with another build's weights; the weights of graphs
    replaced are removed."""
    name = f"{path.name}.{secrets.token_hex(8)}.weights"

    def store(path: Path) -> None:
        with ExitStack() as stack:  # left in reverse: the weights renamed into place first
            graph = stack.enter_context(tower_file.replaced(path))
            weights = stack.enter_context(tower_file.replaced(path.with_name(name)))
            with open(graph, "wb") as out, open(weights, "wb") as data:
                write(out, data, name)
        kept = (recorded(path) or {}).get("weights")  # the last build's, where two ran at once
        for old in path.parent.glob(f"{path.name}.*.weights"):
            if old.name != kept:
                old.unlink(missing_ok=True)

    return tower_file.store(path, store)


def cached_session(path: Path, model_ref: str, tower: str, threads: int) -> Any | None:
    """A session on the graph of ``tower`` cached at ``path`` when it is `current`; None when
    it is not, or ONNX Runtime cannot read it."""
    if not current(path, model_ref, tower):
        return None
    try:
        return session(str(path), threads)
    except Exception as err:  # onnxruntime raises its own exception types for a damaged file
        log.info("Ignoring the damaged graph %s (%s)", path, err)
        return None


def current(path: Path, model_ref: str, tower: str) -> bool:
    """Whether the graph of ``tower`` cached at ``path`` was built from ``model_ref``'s
    checkpoint as it is now, in the tower's `LAYOUTS`, with `weight_codes` of this CPU
    (`built_from`), as its file says (`recorded`, which needs no session); False when there is
    none, it is stale or not whole, or the ``onnx`` extra is missing."""
    source = tower_file.checkpoint_state(model_ref)  # once, for each codes this CPU may hold
    if source is None or not path.is_file() or not available():
        return False
    found = recorded(path)
    if found is None:
        log.info("Ignoring the damaged graph %s", path)
        return False
    if found.get("built_from") not in {_built_from(source, tower, codes) for codes in weight_codes(tower)}:
        log.info("The graph %s is stale: %s has changed, or it was built by an older clipsearch", path, model_ref)
        return False
    if "weights" in found and not _whole(path.with_name(found["weights"]), found.get("weights_bytes")):
        log.info("Ignoring the graph %s: its weights file %s is missing or cut short", path, found["weights"])
        return False
    return True


def _whole(weights: Path, size: str | None) -> bool:
    try:
        return str(weights.stat().st_size) == size
    except OSError:
        return False


# The field of an ONNX ModelProto that holds its metadata, and those of each entry's key and value.
_METADATA_PROPS, _KEY, _VALUE = 14, 1, 2


def recorded(path: Path) -> dict[str, str] | None:
    """The metadata a graph file records (`model`'s ``metadata``), read without ONNX Runtime:
    the file's top-level protobuf fields are stepped over by their lengths, so the graph and its
    weights (nearly all of the file) are never read. None for a file that is not a whole model:
    cut short, or not protobuf."""
    try:
        with open(path, "rb") as f:
            fields = _fields(f, os.fstat(f.fileno()).st_size, {_METADATA_PROPS})
        if fields is None:
            return None
        entries = {}
        for _, entry in fields:
            parts = _fields(io.BytesIO(entry), len(entry), {_KEY, _VALUE})
            if parts is None:
                return None
            named = dict(parts)
            entries[named.get(_KEY, b"").decode()] = named.get(_VALUE, b"").decode()
        return entries
    except (OSError, ValueError):  # ValueError: a varint past the end, or text that is not UTF-8
        return None


def _fields(f: BinaryIO, size: int, wanted: set[int]) -> list[tuple[int, bytes]] | None:
    """The ``wanted`` length-delimited fields of the protobuf message in the first ``size``
    bytes of ``f``, as (field, value) pairs; the others are stepped over unread. None where the
    bytes do not parse as a message of exactly that size."""
    found: list[tuple[int, bytes]] = []
    while f.tell() < size:
        field, wire = divmod(_varint(f), 8)
        if wire == 0:  # a number (ModelProto's versions)
            _varint(f)
            continue
        if wire != 2:  # no fixed-width or group fields in what `model` writes
            return None
        length = _varint(f)
        if length > size - f.tell():
            return None
        if field in wanted:
            found.append((field, f.read(length)))
        else:
            f.seek(length, os.SEEK_CUR)
    return found if f.tell() == size else None


def _varint(f: BinaryIO) -> int:
    value = shift = 0
    while True:
        byte = f.read(1)
        if not byte or shift > 63:
            raise ValueError("not a protobuf varint")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
