"""The text tower of warm processes (`clip.text_fast`): narrow-weight kernels that stay within
cosine 0.999 of fp32 for every family, a verdict measured once, a clean fallback when PyTorch's
private kernels are missing, and the searcher and the server actually running it."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from helpers import make_library

from clipsearch import Index, clip
from clipsearch.clip import onnx_graph, precision_verdicts, text_fast, weight_only
from clipsearch.clip.cpu import MIN_COSINE
from clipsearch.clip.siglip import SigLIP, SiglipConfig
from clipsearch.clip.xlmr import XlmrCLIP, XlmrConfig
from clipsearch.encoder import Encoder, TextEncoder, open_encoder

# Unit vectors from narrow weights differ from fp32's by bf16 rounding, not more.
BF16_ATOL = 2e-2


@pytest.fixture(scope="module")
def text_model(tiny_model):
    model, _ = clip.load(tiny_model, device="cpu", towers="text")
    return model


def unit(features: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(features.float(), dim=-1).numpy()


def encoded(model, tokens: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return unit(model.encode_text(tokens))


def assert_faithful(model, fast, tokens: torch.Tensor) -> None:
    ours, reference = encoded(fast, tokens), encoded(model, tokens)
    assert np.sum(ours * reference, axis=1).min() >= MIN_COSINE
    np.testing.assert_allclose(ours, reference, atol=BF16_ATOL)


def kernel_copy(model, kernel: str):
    copy = text_fast.text_only_copy(model)
    weight_only.swap_linears(copy, kernel)
    return copy


# The kernels that multiply float activations; int8-dynamic quantises them, and whether that is
# faithful is measured per model.
FLOAT_ACTIVATIONS = [kernel for kernel in weight_only.usable_kernels() if kernel != "int8-dynamic"]


@pytest.mark.parametrize("kernel", FLOAT_ACTIVATIONS)
def test_every_usable_kernel_is_faithful_to_fp32(text_model, kernel):
    tokens = text_fast.calibration_tokens(text_model)
    fast = kernel_copy(text_model, kernel)
    assert_faithful(text_model, fast, tokens)
    linears = [type(m).__name__ for m in fast.modules() if "Linear" in type(m).__name__]
    assert linears and all((name == "Linear") == (kernel == "fp32") for name in linears)


def test_the_fp32_copy_is_the_model_exactly(text_model):
    tokens = text_fast.calibration_tokens(text_model)
    np.testing.assert_allclose(
        encoded(text_fast.text_only_copy(text_model), tokens), encoded(text_model, tokens), atol=1e-5
    )


def test_this_cpu_offers_bf16_packed_and_int8():
    # The machine these figures come from has AVX512-BF16; a CPU without it must not see bf16.
    if not text_fast.has_native_bf16():
        pytest.skip("no bf16 dot products here")
    assert {"bf16-packed", "int8"} <= set(text_fast.candidate_kernels())


def test_the_verdict_is_measured_once_and_faithful(text_model, tiny_model):
    first = text_fast.fast_text_tower(text_model, tiny_model)
    assert first is not None and first.kernel in text_fast.candidate_kernels()
    assert "fp32" in first.report and "calibration texts" in first.report
    assert_faithful(text_model, first.model, text_fast.calibration_tokens(text_model))
    again = text_fast.fast_text_tower(text_model, tiny_model)
    assert again is not None and again.kernel == first.kernel and again.report.endswith("as measured before")
    files = list(precision_verdicts.verdict_file({}).parent.glob("*.json"))
    assert len(files) == 1


def test_a_drifting_kernel_is_never_chosen(text_model, monkeypatch):
    monkeypatch.setattr(text_fast, "MIN_COSINE", 1.0 + 1e-9)  # nothing but fp32 passes
    fast = text_fast.fast_text_tower(text_model)
    assert fast is not None and fast.kernel == "fp32" and "drifts" in fast.report


def test_a_kernel_is_timed_in_the_same_moments_as_the_one_it_must_beat(text_model, monkeypatch):
    """On a shared machine a busy stretch slows whatever runs in it: "fast" (4 units a text)
    first runs when one begins, lasting 40 encodings, which doubles every encoding in it. Timed
    alone it would measure 8 against "slow"'s 5 from before; timed in turns with "slow", both
    are doubled and "fast" wins, as it would on a quiet machine."""
    clock, busy = [0.0], {"from": None, "calls": 0}

    class Timed:
        tokenizer, context_length = text_model.tokenizer, text_model.context_length

        def __init__(self, kernel: str, cost: float):
            self.kernel, self.cost = kernel, cost

        def encode_text(self, tokens):
            busy["calls"] += 1
            if self.kernel == "fast" and busy["from"] is None:
                busy["from"] = busy["calls"]
            slowed = busy["from"] is not None and busy["calls"] < busy["from"] + 40
            clock[0] += self.cost * (2 if slowed else 1)
            return text_model.encode_text(tokens)

    costs = {"fp32": 0.020, "slow": 0.005, "fast": 0.004}  # seconds a text
    monkeypatch.setattr(text_fast, "time", types.SimpleNamespace(thread_time=lambda: clock[0]))
    monkeypatch.setattr(text_fast, "with_kernel", lambda source, kernel, *rest: Timed(kernel, costs[kernel]))
    chosen = text_fast._fastest_faithful(text_model, Timed("fp32", costs["fp32"]), ("fp32", "slow", "fast"))
    assert chosen.kernel == "fast"
    assert "slow 5.00 ms CPU" in chosen.report and "fast 8.00 ms CPU" in chosen.report


def test_dynamic_int8_is_kept_only_where_it_measures_faithful(text_model):
    """The tiny model's activations lose too much at 8 bits (worst cosine about 0.9986 on the
    calibration texts): the measurement says so and keeps a float-activation kernel."""
    if "int8-dynamic" not in text_fast.candidate_kernels():
        pytest.skip("no fbgemm int8 in this PyTorch build")
    tokens = text_fast.calibration_tokens(text_model)
    dynamic = text_fast.FastText(kernel_copy(text_model, "int8-dynamic"), "int8-dynamic", "")
    cosines = np.sum(encoded(dynamic, tokens) * encoded(text_model, tokens), axis=1)
    assert 0.99 < cosines.min() < MIN_COSINE  # close, but under the bar
    fast = text_fast.fast_text_tower(text_model)
    assert fast is not None and fast.kernel != "int8-dynamic" and "int8-dynamic drifts" in fast.report


def test_dynamic_int8_encodes_each_text_of_a_batch_alone(text_model):
    """One scale per product input: in a batch, a short text's activations would be quantised
    on the scale of the longest; each is encoded as it was measured, alone."""
    if "int8-dynamic" not in text_fast.candidate_kernels():
        pytest.skip("no fbgemm int8 in this PyTorch build")
    tokens = text_fast.calibration_tokens(text_model)
    dynamic = text_fast.FastText(kernel_copy(text_model, "int8-dynamic"), "int8-dynamic", "")
    alone = np.concatenate([encoded(dynamic, row[None]) for row in tokens])
    np.testing.assert_array_equal(encoded(dynamic, tokens), alone)
    assert not np.array_equal(encoded(dynamic.model, tokens), alone)  # what a batch would have given


def test_missing_private_ops_fall_back(text_model, monkeypatch):
    """oneDNN's linear ops and the int8 weight-only product are private, and PyTorch plans to
    remove the quantized ops that dynamic int8 uses: where a build lacks them (and the ``onnx``
    extra is not installed), bf16 through F.linear or fp32 runs instead, as faithful."""
    monkeypatch.setattr(onnx_graph, "available", lambda: False)

    def gone(*args, **kwargs):
        raise RuntimeError("no such op in this build")

    monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())
    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", gone)
    monkeypatch.setattr(torch.ops, "quantized", types.SimpleNamespace())  # quantized tensors removed
    assert weight_only.usable_kernels() == ("fp32", "bf16")
    fast = text_fast.fast_text_tower(text_model)
    assert fast is not None and fast.kernel in ("fp32", "bf16")
    assert_faithful(text_model, fast.model, text_fast.calibration_tokens(text_model))

    monkeypatch.setattr(text_fast, "has_native_bf16", lambda: False)  # an AVX2 CPU: bf16 is emulated there
    assert text_fast.candidate_kernels() == ("fp32",)
    fast = text_fast.fast_text_tower(text_model)
    assert fast is not None and fast.kernel == "fp32"


def test_a_tower_it_cannot_copy_stays_as_loaded(tiny_model):
    encoder = Encoder(tiny_model, "cpu", towers="text")
    encoder.model.tokenizer, tokenizer = None, encoder.model.tokenizer
    assert encoder.prepare_texts() == "model"
    encoder.model.tokenizer = tokenizer
    assert encoder.encode_texts(["a red circle"]).shape == (1, encoder.dim)


class StubTokenizer:
    """Fixed random ids per text, shaped as each family's tokenizer shapes them."""

    def __init__(self, vocab: int, pad: int | None):
        self.vocab, self.pad = vocab, pad

    def __call__(self, texts, context_length, truncate):
        generator = torch.Generator().manual_seed(len(texts))
        ids = torch.randint(3, self.vocab, (len(texts), context_length), generator=generator)
        if self.pad is not None:  # XLM-R: <s> text </s> then padding
            for row, text in enumerate(texts):
                length = min(len(text.split()) + 2, context_length)
                ids[row, 0], ids[row, length - 1], ids[row, length:] = 0, 2, self.pad
        return ids


def siglip_text() -> SigLIP:
    config = SiglipConfig(
        embed_dim=48, image_resolution=32, vision_patch_size=16, vision_width=32, vision_layers=1,
        vision_heads=2, vision_mlp_width=64, context_length=16, vocab_size=300, text_width=64,
        text_layers=2, text_heads=2, text_mlp_width=128, text_gelu="tanh",
    )  # fmt: skip
    torch.manual_seed(0)
    model = SigLIP(config, towers="text").eval()
    model.tokenizer = StubTokenizer(300, pad=None)
    return model


def xlmr_text() -> XlmrCLIP:
    config = XlmrConfig(
        embed_dim=48, image_resolution=32, vision_layers=1, vision_width=32, vision_patch_size=16,
        vision_heads=2, vocab_size=300, text_width=64, text_layers=2, text_heads=2, text_mlp_width=128,
        max_positions=40, projection_hidden=96, context_length=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = XlmrCLIP(config, towers="text").eval()
    model.tokenizer = StubTokenizer(300, pad=1)
    return model


@pytest.mark.parametrize("make", [siglip_text, xlmr_text], ids=["siglip", "xlmr"])
def test_other_families_are_handled(make):
    model = make()
    tokens = text_fast.calibration_tokens(model)
    for kernel in FLOAT_ACTIVATIONS:
        assert_faithful(model, kernel_copy(model, kernel), tokens)
    fast = text_fast.fast_text_tower(model)
    assert fast is not None and type(fast.model) is type(model)
    for kernel in onnx_graph.KERNELS if onnx_graph.available() else ():  # a CLIP's graph only
        assert f"{kernel} cannot run it (the text tower of a {type(model).__name__} runs in torch only)" in fast.report


def test_the_one_shot_path_keeps_the_numpy_tower(tiny_model):
    assert isinstance(open_encoder(tiny_model, "cpu", towers="text"), TextEncoder)
    warm = open_encoder(tiny_model, "cpu", towers="text", warm=True)
    assert isinstance(warm, Encoder) and warm.text_path.startswith("fast ")
    forced = open_encoder(tiny_model, "cpu", "fp32", towers="both", warm=True)  # fp32 asked for: as asked
    assert isinstance(forced, Encoder) and forced.text_path == "model" and forced.precision == "fp32"


def test_a_warm_index_searches_through_the_fast_tower(tmp_path, tiny_model):
    make_library(tmp_path / "lib", 6)
    with Index.open(tmp_path / "home", model=tiny_model, device="cpu") as index:
        index.add([tmp_path / "lib"], workers=0)
    with Index.open(tmp_path / "home", readonly=True) as cold:
        expected = cold.search("a red circle", k=6)
        assert isinstance(cold.encoder("text"), TextEncoder)
    with Index.open(tmp_path / "home", readonly=True, warm=True) as warm:
        hits = warm.search("a red circle", k=6)
        encoder = warm.encoder("text")
    assert isinstance(encoder, Encoder) and encoder.text_path.startswith("fast ")
    assert encoder._fast_text is not None
    assert encoder.model is encoder._fast_text.model  # the loaded fp32 tower was let go
    np.testing.assert_allclose([h.score for h in hits], [h.score for h in expected], atol=BF16_ATOL)


def test_serve_encodes_texts_through_the_fast_tower(tmp_path, tiny_model, monkeypatch):
    from clipsearch.serve.service import Page, Service

    make_library(tmp_path / "lib", 4)
    with Index.open(tmp_path / "home", model=tiny_model, device="cpu") as index:
        index.add([tmp_path / "lib"], workers=0)
    service = Service.open(tmp_path / "home", device="cpu")
    try:
        encoder = service.index.encoder("text")
        assert isinstance(encoder, Encoder) and encoder.towers == "text"  # the image tower waits for an upload
        assert encoder.text_path.startswith("fast ")
        ran = []
        assert encoder._fast_text is not None
        fast = encoder._fast_text.model
        monkeypatch.setattr(fast, "encode_text", lambda ids, real=fast.encode_text: ran.append(1) or real(ids))
        assert len(service.search("a blue square", Page(k=2))) == 2
        assert ran == [1]
    finally:
        service.close()
