"""CLIP's text tower as an ONNX Runtime graph (`clip.onnx_text`): its weights quantised as the
operators read them, embeddings within cosine 0.999 of fp32 through every path of the graph
(masked and last-row attention, QuickGELU and GELU, several heads and layers), measured by
`clip.text_fast` beside torch's kernels and remembered, its graph cached for later starts, and
left out cleanly where the ``onnx`` extra is not installed (or the family is not a CLIP:
test_text_fast)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import bump_mtime, python_output, write_tiny_model

from clipsearch import clip
from clipsearch.clip import onnx_graph, onnx_text, precision_verdicts, text_fast
from clipsearch.clip.cpu import MIN_COSINE
from clipsearch.encoder import Encoder, open_encoder

pytestmark = pytest.mark.skipif(not onnx_graph.available(), reason="the onnx extra is not installed")


def unit(features: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(features.float(), dim=-1).numpy()


def cosines(model, kernel: str) -> np.ndarray:
    """Each calibration text's cosine between ``kernel``'s graph and the torch model in fp32."""
    tokens = text_fast.calibration_tokens(model)
    graph = text_fast.with_kernel(model, kernel, threads=1)
    with torch.inference_mode():
        return np.sum(unit(graph.encode_text(tokens)) * unit(model.encode_text(tokens)), axis=1)


def test_quantise_stores_each_block_within_half_a_step():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((200, 24)).astype(np.float32)  # 200 inputs: the last block of 64 is partial
    weight[:64, 3] = 0  # a block of zeros has scale 0 and codes at the zero point
    codes, scales = onnx_graph.quantise(weight, 64)
    assert codes.shape == (24, 4, 64) and codes.dtype == np.uint8 and scales.shape == (24, 4)
    restored = ((codes.astype(np.float32) - 128) * scales[..., None]).reshape(24, 256).T
    step = np.repeat(scales.T, 64, axis=0)  # [256, 24], each input's scale
    assert np.all(np.abs(restored[:200] - weight) <= step[:200] / 2 + 1e-7)
    assert np.all(codes[:, 3, 8:] == 128)  # the padding past input 200
    assert scales[3, 0] == 0 and np.all(codes[3, 0] == 128)
    np.testing.assert_allclose(np.abs(restored[:200]).max(axis=0), np.abs(weight).max(axis=0), rtol=1e-6)


def one_product(weight: np.ndarray, bias: np.ndarray, codes: str):
    """A session on `Graph.linear` alone: ``x @ weight + bias`` in the per-channel kernel, the
    weights in ``codes``."""
    from onnx import TensorProto, helper

    out = io.BytesIO()
    g = onnx_graph.Graph("onnx-int8-dynamic", codes, out)
    y = g.linear("x", {"p.weight": weight, "p.bias": bias}, "p.")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", weight.shape[0]])
    onnx_graph.model(g, "one", [x], y, ["N", weight.shape[1]])
    return onnx_graph.session(out.getvalue(), threads=1)


def exact_product(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, codes: str) -> np.ndarray:
    """What the per-channel kernel computes, summed exactly: activations quantised per tensor as
    ONNX Runtime's ``DynamicQuantizeLinear`` does (uint8 over [min(0, x), max(0, x)]), weights
    per output channel as `onnx_graph.quantise` does for ``codes``."""
    scale = (max(0.0, x.max()) - min(0.0, x.min())) / 255
    zero = np.clip(np.rint(-min(0.0, x.min()) / scale), 0, 255)
    q = np.clip(np.rint(x / np.float32(scale)) + zero, 0, 255) - zero
    stored, scales = onnx_graph.quantise(weight, len(weight), onnx_graph.CODES[codes])
    integer = q.astype(np.int64) @ (stored[:, 0].T.astype(np.int64) - 128)
    return integer * (np.float64(np.float32(scale)) * scales[:, 0]) + bias


def saturating_product() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations near the top of uint8 times weights near +-127, each pair of inputs of one
    sign: every pair of products (up to 255 x 127 x 2) overflows int16."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0.9, 1.0, (4, 64)).astype(np.float32)
    signs = np.repeat(rng.choice([-1.0, 1.0], (32, 16)), 2, axis=0)  # [64 inputs, 16 outputs]
    weight = (signs * rng.uniform(0.9, 1.0, (64, 16))).astype(np.float32)
    return x, weight, rng.standard_normal(16).astype(np.float32)


@pytest.mark.parametrize("codes", sorted(set(onnx_graph.weight_codes("image") + onnx_graph.weight_codes("text"))))
def test_the_per_channel_kernel_sums_exactly_on_this_cpu(codes):
    """Where the CPU has VNNI the weights are signed, elsewhere unsigned around 128 or signed in
    7 bits (`onnx_graph.CODES`): each way every product is summed in full."""
    x, weight, bias = saturating_product()
    found = one_product(weight, bias, codes).run(None, {"x": x})[0]
    # Within two steps of one input's rounding (x / scale may round a tie the other way where
    # ONNX Runtime multiplies by the reciprocal): saturated pairs miss by whole units.
    step = (x.max() / 255) * np.abs(weight).max()
    np.testing.assert_allclose(found, exact_product(x, weight, bias, codes), rtol=1e-5, atol=2 * step)


@pytest.mark.skipif(onnx_graph.has_vnni(), reason="this CPU has VNNI: signed products are exact here")
def test_signed_weights_would_saturate_on_this_cpu():
    """Why a CPU without VNNI never gets 8-bit signed weights: ONNX Runtime's u8 x s8 kernel adds
    pairs of products in saturating int16 there."""
    x, weight, bias = saturating_product()
    found = one_product(weight, bias, "s8").run(None, {"x": x})[0]
    expected = exact_product(x, weight, bias, "s8")
    assert np.abs(found - expected).max() > 0.1 * np.abs(expected).max()


@pytest.fixture(scope="module")
def demo_model():
    """The bundled demo: trained weights (real activation ranges), 2 layers, 2 heads, QuickGELU."""
    model, _ = clip.load("demo", device="cpu", towers="text")
    return model


@pytest.mark.parametrize("kernel", list(onnx_graph.KERNELS))
def test_each_kernel_is_faithful_on_trained_weights(demo_model, kernel):
    assert cosines(demo_model, kernel).min() >= MIN_COSINE


def test_the_start_tokens_keys_and_values_are_the_models(demo_model):
    """The keys and values a graph holds for the start-of-text token are those the torch model
    computes for it in every block, whatever text follows it."""
    from clipsearch.clip.numpy_text import TextTower

    inputs: list[torch.Tensor] = []
    hooks = [
        block.attn.register_forward_hook(lambda _, args, __: inputs.append(args[0]))
        for block in demo_model.transformer.resblocks
    ]
    with torch.inference_mode():
        demo_model.encode_text(demo_model.tokenizer(["a dog on a beach", "x"]))
    for hook in hooks:
        hook.remove()
    held = TextTower.from_model(demo_model, demo_model.tokenizer.bpe_path).start_keys_values()
    assert len(held) == len(inputs) == len(demo_model.transformer.resblocks)
    for block, (ln_1, (key, value)) in zip(demo_model.transformer.resblocks, zip(inputs, held)):
        with torch.inference_mode():
            qkv = torch.nn.functional.linear(ln_1[:, 0], block.attn.in_proj_weight, block.attn.in_proj_bias).numpy()
        _, keys, values = np.split(qkv, 3, axis=-1)  # both texts' start tokens
        assert key.shape == value.shape == (1, ln_1.shape[-1])
        np.testing.assert_allclose(keys, np.repeat(key, 2, axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(values, np.repeat(value, 2, axis=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_the_graph_is_the_tower_for_gelu_and_quick_gelu(tmp_path, quick_gelu):
    """Three layers of four heads, random weights, texts of many lengths: a wrong mask, head
    split, residual bias or last-row shortcut puts cosines far under 0.999. Random weights
    hardly tell the two activations apart (the demo's trained ones do: the test above), so the
    graph is also read for the one it runs."""
    import onnx

    path = write_tiny_model(
        tmp_path / "model", text_layers=3, text_width=256, text_heads=4, context_length=48, quick_gelu=quick_gelu
    )
    model, _ = clip.load(str(path), device="cpu", towers="text")
    assert len(set(text_fast.calibration_tokens(model).argmax(dim=1).tolist())) > 5
    assert cosines(model, "onnx-int8-blocks").min() >= MIN_COSINE
    graph = text_fast.with_kernel(model, "onnx-int8-blocks", threads=1).graph
    assert graph is not None
    activations = [n for n in onnx.load_from_string(graph).graph.node if n.op_type in ("Gelu", "QuickGelu")]
    assert len(activations) == 3
    assert {n.op_type for n in activations} == {"QuickGelu" if quick_gelu else "Gelu"}
    if quick_gelu:
        assert {round(onnx.helper.get_attribute_value(n.attribute[0]), 6) for n in activations} == {1.702}


def test_the_token_table_is_held_in_half_the_bytes(demo_model):
    """Two thirds of a graph's bytes at ViT-B/32 (49,408 x 512): float16 halves them; the
    rows every calibration text reads stay within its rounding of the float32 table."""
    import onnx
    from onnx import numpy_helper

    graph = text_fast.with_kernel(demo_model, "onnx-int8-dynamic", threads=1).graph
    assert graph is not None
    (table,) = [t for t in onnx.load_from_string(graph).graph.initializer if t.name == "token_embedding.weight"]
    held = numpy_helper.to_array(table)
    expected = demo_model.token_embedding.weight.detach().numpy()
    assert held.dtype == np.float16 and held.shape == expected.shape
    np.testing.assert_allclose(held.astype(np.float32), expected, rtol=2**-11, atol=2**-24)


def test_the_session_keeps_residual_adds_and_layer_norms_apart(demo_model, tmp_path, monkeypatch):
    """ONNX Runtime would fuse them into its SkipLayerNormalization, six times slower here."""
    import onnx
    import onnxruntime

    class Options(onnxruntime.SessionOptions):
        def __init__(self) -> None:
            super().__init__()
            self.optimized_model_filepath = str(tmp_path / "optimized.onnx")  # the graph as the session runs it

    monkeypatch.setattr(onnxruntime, "SessionOptions", Options)
    text_fast.with_kernel(demo_model, "onnx-int8-dynamic", threads=1)
    ops = [node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert "SkipLayerNormalization" not in ops
    assert ops.count("LayerNormalization") == 2 * 2 + 1  # two per block of the demo's two, and the final one


def test_texts_of_a_batch_are_each_encoded_alone(demo_model):
    tokens = text_fast.calibration_tokens(demo_model)
    graph = text_fast.with_kernel(demo_model, "onnx-int8-dynamic", threads=1)
    alone = np.concatenate([graph.encode_text(row[None]).numpy() for row in tokens])
    np.testing.assert_array_equal(graph.encode_text(tokens).numpy(), alone)


def fastest(kernel: str):
    """`text_fast._seconds_per_text` with ``kernel`` measured fastest, the others by their order."""

    def seconds(models, tokens) -> list[float]:
        return [1e-6 if isinstance(model, text_fast.OnnxText) and model.kernel == kernel else 1.0 for model in models]

    return seconds


def test_text_fast_keeps_an_onnx_kernel_that_measures_fastest(demo_model, monkeypatch):
    monkeypatch.setattr(text_fast, "_seconds_per_text", fastest("onnx-int8-blocks"))
    torch_threads = torch.get_num_threads()
    chosen = text_fast.fast_text_tower(demo_model, "demo")
    assert chosen is not None and chosen.kernel == "onnx-int8-blocks"
    assert isinstance(chosen.model, text_fast.OnnxText) and chosen.model.graph is None
    assert chosen.model.tower.session.get_session_options().intra_op_num_threads == torch_threads
    assert "onnx-int8-dynamic" in chosen.report and "onnx-int8-blocks" in chosen.report
    (verdict,) = list(precision_verdicts.verdict_file({}).parent.glob("*.json"))
    assert f'"onnxruntime": "{precision_verdicts.onnx_runtime("text")}"' in verdict.read_text()

    again = text_fast.fast_text_tower(demo_model, "demo")
    assert again is not None and again.kernel == "onnx-int8-blocks" and again.report.endswith("as measured before")
    assert isinstance(again.model, text_fast.OnnxText) and again.model.graph is None  # only the session holds it
    tokens = text_fast.calibration_tokens(demo_model)
    with torch.inference_mode():
        np.testing.assert_array_equal(chosen.encode_text(tokens).numpy(), again.encode_text(tokens).numpy())

    monkeypatch.setitem(onnx_graph.LAYOUTS, "image", onnx_graph.LAYOUTS["image"] + 1)  # another image graph only
    kept = text_fast.fast_text_tower(demo_model, "demo")
    assert kept is not None and kept.report.endswith("as measured before")
    monkeypatch.setitem(onnx_graph.LAYOUTS, "text", onnx_graph.LAYOUTS["text"] + 1)  # other text graphs
    measured = text_fast.fast_text_tower(demo_model, "demo")
    assert measured is not None and not measured.report.endswith("as measured before")


def test_the_chosen_kernels_graph_is_cached_when_measured_and_opened_by_later_starts(tmp_path, monkeypatch):
    """A server's later starts skip the build (about 2 s at ViT-B/32); a graph of another
    checkpoint or layout is never opened."""
    monkeypatch.setattr(text_fast, "_seconds_per_text", fastest("onnx-int8-dynamic"))
    ref = str(write_tiny_model(tmp_path / "model"))
    model, _ = clip.load(ref, device="cpu", towers="text")
    measured = text_fast.fast_text_tower(model, ref)
    assert measured is not None and onnx_text.cache_file(ref, "onnx-int8-dynamic").is_file()

    def no_build(*args, **kwargs):
        raise AssertionError("built again")

    monkeypatch.setattr(onnx_text, "build", no_build)
    opened = text_fast.fast_text_tower(model, ref)
    assert opened is not None and opened.report.endswith("as measured before")
    tokens = text_fast.calibration_tokens(model)
    with torch.inference_mode():
        np.testing.assert_array_equal(opened.encode_text(tokens).numpy(), measured.encode_text(tokens).numpy())

    found = onnx_text.remembered(ref, 1)
    assert found is not None and found[0] == "onnx-int8-dynamic"
    assert not onnx_text.cache_file(ref, "onnx-int8-blocks").exists()  # only the chosen kernel's graph
    with monkeypatch.context() as patched:
        patched.setitem(onnx_graph.LAYOUTS, "image", onnx_graph.LAYOUTS["image"] + 1)
        assert onnx_text.remembered(ref, 1) is not None
        patched.setitem(onnx_graph.LAYOUTS, "text", onnx_graph.LAYOUTS["text"] + 1)
        assert onnx_text.remembered(ref, 1) is None
    with monkeypatch.context() as patched:  # a cache shared with a CPU whose products differ
        other = not onnx_graph.has_vnni()
        patched.setattr(onnx_graph, "has_vnni", lambda: other)
        assert onnx_text.remembered(ref, 1) is None
    bump_mtime(Path(ref) / "model.safetensors")
    assert onnx_text.remembered(ref, 1) is None  # built from the checkpoint as it was


def test_the_graph_of_converted_weights_is_never_cached(tmp_path, monkeypatch):
    """An `Encoder` in bf16 converts its text tower too: a text-only process, or a cold query
    through the NumPy tower, would take those weights for the checkpoint's."""
    from clipsearch.clip import numpy_text

    monkeypatch.setattr(text_fast, "_seconds_per_text", fastest("onnx-int8-blocks"))  # faithful in bf16 too
    ref = str(write_tiny_model(tmp_path / "model"))
    model, _ = clip.load(ref, device="cpu", towers="text")
    for _ in range(2):  # measured, then remembered
        chosen = text_fast.fast_text_tower(model.to(torch.bfloat16), ref)
        assert chosen is not None and chosen.kernel == "onnx-int8-blocks"
    assert not onnx_text.cache_file(ref, "onnx-int8-blocks").exists() and numpy_text.load_cached(ref) is None
    text_fast.fast_text_tower(model.float(), ref)
    assert onnx_text.cache_file(ref, "onnx-int8-blocks").is_file() and numpy_text.load_cached(ref) is not None


def test_a_graph_another_verdict_chose_is_built_again(tmp_path, monkeypatch):
    """After torch is upgraded the verdict is measured again; the graph it chooses must record it,
    or later warm starts would never find it standing and always import torch."""
    monkeypatch.setattr(text_fast, "_seconds_per_text", fastest("onnx-int8-dynamic"))
    ref = str(write_tiny_model(tmp_path / "model"))
    model, _ = clip.load(ref, device="cpu", towers="text")
    text_fast.fast_text_tower(model, ref)  # measured, its graph cached
    assert onnx_text.remembered(ref, 1) is not None
    monkeypatch.setattr(precision_verdicts, "package_version", lambda name: "another")  # torch upgraded
    assert onnx_text.remembered(ref, 1) is None
    text_fast.fast_text_tower(model, ref)  # measured again: the graph records the new verdict
    found = onnx_text.remembered(ref, 1)
    assert found is not None and found[0] == "onnx-int8-dynamic"


def test_a_warm_text_encoder_opens_the_remembered_graph_without_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(text_fast, "_seconds_per_text", fastest("onnx-int8-dynamic"))
    ref = str(write_tiny_model(tmp_path / "model"))
    assert onnx_text.remembered(ref, 1) is None  # nothing measured yet
    encoder = open_encoder(ref, "cpu", "auto", "text", warm=True)  # measures, caches the chosen graph
    assert isinstance(encoder, Encoder) and encoder.text_path == "fast onnx-int8-dynamic"
    texts = ["a red circle", "two blue squares on grass", "x"]
    expected = encoder.encode_texts(texts)
    code = (
        "import json, sys\n"
        "from clipsearch.encoder import open_encoder\n"
        f"encoder = open_encoder({ref!r}, 'cpu', 'auto', 'text', warm=True)\n"
        f"vectors = encoder.encode_texts({texts!r}).tolist()\n"
        "print(json.dumps([type(encoder).__name__, encoder.text_path, 'torch' in sys.modules, vectors]))\n"
    )
    kind, path, imported_torch, vectors = json.loads(python_output(code))
    assert (kind, path, imported_torch) == ("TextEncoder", "fast onnx-int8-dynamic", False)
    np.testing.assert_allclose(np.array(vectors, dtype=np.float32), expected, atol=1e-6)

    monkeypatch.setattr(precision_verdicts, "package_version", lambda name: "another")  # torch upgraded
    assert onnx_text.remembered(ref, 1) is None  # the verdict no longer stands: torch measures again


def test_a_warm_encoder_encodes_through_the_graph(monkeypatch):
    monkeypatch.setattr(text_fast, "_seconds_per_text", fastest("onnx-int8-dynamic"))
    fp32 = Encoder("demo", "cpu", "fp32", towers="text")
    warm = Encoder("demo", "cpu", "fp32", towers="text")
    assert warm.prepare_texts() == "fast onnx-int8-dynamic"
    assert isinstance(warm.model, text_fast.OnnxText)  # the torch tower is let go
    texts = list(text_fast.CALIBRATION_TEXTS)
    ours, reference = warm.encode_texts(texts), fp32.encode_texts(texts)
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-6)
    assert np.sum(ours * reference, axis=1).min() >= MIN_COSINE
    assert np.argmax(ours @ reference.T, axis=1).tolist() == list(range(len(texts)))


def test_without_the_extra_there_are_no_onnx_kernels(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    assert not onnx_graph.available()
    kernels = text_fast.candidate_kernels()
    assert not set(onnx_graph.KERNELS) & set(kernels)
    assert text_fast._verdict_key("demo", kernels)["onnxruntime"] is None  # type: ignore[index]
