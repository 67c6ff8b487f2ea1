"""clip.cpu: the precision "auto" picks per device, and that what it picks keeps embeddings."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipsearch.clip import cpu
from clipsearch.clip.model import CLIP, ModelConfig, SelfAttention

TINY = ModelConfig(
    embed_dim=32,
    image_resolution=32,
    vision_layers=2,
    vision_width=64,
    vision_patch_size=8,
    vision_heads=1,
    context_length=16,
    vocab_size=100,
    text_width=32,
    text_heads=1,
    text_layers=1,
)

needs_int8 = pytest.mark.skipif(not cpu.has_int8_kernels(), reason="no fbgemm int8 kernels on this CPU")


def tiny(towers: str = "both") -> CLIP:
    torch.manual_seed(0)
    return CLIP(TINY, towers).eval()


def embeddings(model: CLIP, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.encode_image(images).float()


@pytest.fixture
def images() -> torch.Tensor:
    return cpu.calibration_images(TINY.image_resolution, count=8, seed=1)


@pytest.fixture
def no_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))


def test_candidates_follow_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    int8 = ("int8",) if cpu.has_int8_kernels() else ()
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert cpu.candidate_precisions("cpu") == ("fp32", "bf16", *int8)
    assert cpu.candidate_precisions("cpu", image_tower=False) == ("fp32",)  # queries stay fp32
    assert cpu.candidate_precisions("cuda") == ("fp32", "fp16")
    assert cpu.candidate_precisions("cuda", image_tower=False) == ("fp16",)
    assert cpu.candidate_precisions("mps") == ("fp32",)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    assert cpu.candidate_precisions("cpu") == ("fp32", *int8)


def test_fp32_leaves_the_model_as_it_was(images: torch.Tensor) -> None:
    expected = embeddings(tiny(), images)
    prepared = cpu.prepare_for_inference(tiny(), "fp32")
    assert (prepared.precision, prepared.input_dtype) == ("fp32", torch.float32)
    assert torch.equal(embeddings(prepared.model, images), expected)


@needs_int8
def test_int8_quantizes_the_image_tower_only_and_keeps_embeddings(images: torch.Tensor) -> None:
    reference = tiny()
    prepared = cpu.prepare_for_inference(tiny(), "int8")
    model = prepared.model
    assert prepared.precision == "int8"
    assert not any(type(m) is torch.nn.Linear for m in model.visual.modules())
    # per block: q/k/v, out_proj, c_fc, c_proj
    assert sum(isinstance(m, cpu.Int8Linear) for m in model.visual.modules()) == 2 * 4
    assert sum(isinstance(m, cpu.Int8SelfAttention) for m in model.visual.modules()) == 2
    assert not any(isinstance(m, SelfAttention) for m in model.visual.modules())  # its fp32 weights are gone
    cosine = F.cosine_similarity(embeddings(model, images), embeddings(reference, images))
    assert cosine.min().item() >= cpu.MIN_COSINE
    tokens = torch.randint(1, TINY.vocab_size - 1, (3, TINY.context_length))
    with torch.inference_mode():
        assert torch.equal(model.encode_text(tokens), reference.encode_text(tokens))


def precision_of(model: CLIP) -> str:
    """The precision a prepared model runs in, read from its modules."""
    if any(isinstance(m, cpu.Int8Linear) for m in model.modules()):
        return "int8"
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[model.visual.conv1.weight.dtype]


def fake_timings(monkeypatch: pytest.MonkeyPatch, **seconds: float) -> list[str]:
    """Makes "auto" see ``seconds`` per batch for each precision; returns the precisions timed."""
    timed: list[str] = []

    def fake(model: CLIP, sample: torch.Tensor) -> float:
        timed.append(precision_of(model))
        return seconds[timed[-1]]

    monkeypatch.setattr(cpu, "_seconds_per_batch", fake)
    return timed


@needs_int8
def test_auto_keeps_int8_when_it_agrees_with_fp32_and_is_faster(no_bf16: None, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_timings(monkeypatch, fp32=2.0, int8=1.0)
    prepared = cpu.prepare_for_inference(tiny(), "auto")
    assert (prepared.precision, precision_of(prepared.model)) == ("int8", "int8")


@needs_int8
def test_auto_keeps_fp32_when_int8_is_slower(
    no_bf16: None, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_timings(monkeypatch, fp32=1.0, int8=1.5)
    expected = embeddings(tiny(), images)
    prepared = cpu.prepare_for_inference(tiny(), "auto")
    assert prepared.precision == "fp32"
    assert torch.equal(embeddings(prepared.model, images), expected)


@needs_int8
def test_auto_falls_back_to_fp32_when_the_candidate_drifts(
    no_bf16: None, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu, "MIN_COSINE", 1.5)  # no quantised model can reach it
    timed = fake_timings(monkeypatch, fp32=1.0, int8=0.1)
    expected = embeddings(tiny(), images)
    prepared = cpu.prepare_for_inference(tiny(), "auto", sample=images)
    assert prepared.precision == "fp32"
    assert not any(isinstance(m, (cpu.Int8Linear, cpu.Int8SelfAttention)) for m in prepared.model.modules())
    assert torch.equal(embeddings(prepared.model, images), expected)
    assert timed == ["fp32"]  # a drifting candidate is not worth timing


def test_text_only_model_stays_fp32_under_auto(no_bf16: None) -> None:
    prepared = cpu.prepare_for_inference(tiny("text"), "auto")
    assert prepared.precision == "fp32"
    assert prepared.model.token_embedding.weight.dtype == torch.float32


def test_bf16_keeps_embeddings_within_the_bar(images: torch.Tensor) -> None:
    reference = embeddings(tiny(), images)
    prepared = cpu.prepare_for_inference(tiny(), "bf16")
    assert prepared.input_dtype == torch.bfloat16
    assert prepared.model.visual.conv1.weight.dtype == torch.bfloat16
    cosine = F.cosine_similarity(embeddings(prepared.model, images), reference)
    assert cosine.min().item() >= cpu.MIN_COSINE


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        cpu.prepare_for_inference(tiny(), "fp8")


@pytest.mark.parametrize("engine", ["onednn", "fbgemm"])
def test_dynamic_int8_uses_all_8_bits_where_the_cpu_has_vnni(monkeypatch, engine):
    """7-bit inputs only where int8 dot products would saturate (no VNNI); with VNNI, 8 bits
    halve the rounding error of every product (image and text int8 alike). Each CPU is checked
    for its own case: without VNNI, 8-bit inputs do worse there, not better."""
    if not cpu.has_int8_kernels() or engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"no {engine} int8 in this PyTorch build")
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(64, 128, generator=generator), torch.randn(8, 128, generator=generator)
    expected = (x @ weight.T).numpy()
    reduced_here = not cpu.has_vnni()
    errors = {}
    for vnni, reduced in ((True, False), (False, True)):
        monkeypatch.setattr(cpu, "has_vnni", lambda vnni=vnni: vnni)
        linear = cpu.Int8Linear(weight, None, engine=engine)
        assert linear._reduce_range is reduced
        with torch.inference_mode():
            errors[reduced] = np.abs(linear(x).numpy() - expected).mean()
    if reduced_here:
        assert errors[True] < errors[False]
    else:
        assert errors[False] < 0.7 * errors[True]
    assert errors[reduced_here] < 0.02 * np.abs(expected).mean()
