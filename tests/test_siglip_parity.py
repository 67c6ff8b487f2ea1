"""Our SigLIP against open_clip 3.3 (with timm) on the same random weights.

The reference is open_clip's own model for a named configuration, its image tower built by
timm; depth is reduced (timm is asked for 2 blocks, the text tower gets 2 layers) where the
test would otherwise spend seconds on layers that repeat the first. Every tensor is drawn at
random (`filled`), so a bias or LayerNorm used wrongly cannot hide behind 0 or 1.
Image features, text features and sigmoid logits must agree within 1e-5 (fp32, max abs).

`pytest tests/test_siglip_parity.py -s` prints the figures.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CustomTextCLIP

from clipsearch.clip.build import build_model
from clipsearch.clip.model import family_of
from clipsearch.clip.siglip import SigLIP, config_from_openclip, config_from_state_dict
from clipsearch.errors import CheckpointError

TOLERANCE = 1e-5
SIGLIP_NAMES = sorted(name for name in open_clip.list_models() if "SigLIP" in name)


def openclip_config(name: str) -> dict:
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    cfg.pop("custom_text", None)
    return cfg


def filled(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with random values in every parameter and persistent buffer, in eval mode (a
    model built on the meta device is given memory first).

    Drawn here rather than by the reference's own initialisation, which leaves biases and
    norms at 0 and 1 (a misused one could hide) and costs seconds in timm's truncated normals.
    Matrices get 1/sqrt(fan-in), so activations stay near unit scale through every layer;
    norm weights 1 + noise, everything else small noise.
    """
    if any(parameter.is_meta for parameter in model.parameters()):
        model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if tensor.ndim >= 2:
                fan_in = tensor[0].numel() if tensor.ndim > 2 or "embed" not in name else 1
                tensor.copy_(noise * fan_in**-0.5)
            elif name.endswith("weight") and ("norm" in name or "ln_" in name):
                tensor.copy_(1 + 0.1 * noise)
            else:
                tensor.copy_(0.1 * noise)
        if hasattr(model, "logit_scale"):
            model.logit_scale.fill_(2.3)
    return model.eval()


def reference(name: str, depth: int | None = 2, **text_cfg) -> tuple[CustomTextCLIP, dict]:
    """open_clip's model for ``name`` with random weights and ``depth`` blocks in each tower."""
    cfg = openclip_config(name)
    cfg["text_cfg"].update(text_cfg)
    if depth is None:
        with torch.device("meta"):
            model = CustomTextCLIP(**cfg)
        return filled(model), cfg
    cfg["text_cfg"]["layers"] = depth
    import open_clip.timm_model

    timm = open_clip.timm_model.timm
    with pytest.MonkeyPatch.context() as patch, torch.device("meta"):
        patch.setattr(timm, "create_model", functools.partial(timm.create_model, depth=depth))
        model = CustomTextCLIP(**cfg)
    return filled(model), cfg


def ours_for(model: CustomTextCLIP, cfg: dict, depth: int | None = 2) -> SigLIP:
    config = config_from_openclip(cfg)
    if depth is not None:
        config = dataclasses.replace(config, vision_layers=depth, text_layers=depth)
    return build_model(model.state_dict(), config=config)


@pytest.fixture(scope="module")
def b16() -> tuple[CustomTextCLIP, SigLIP]:
    model, cfg = reference("ViT-B-16-SigLIP")
    return model, ours_for(model, cfg)


@pytest.fixture(scope="module")
def siglip2() -> tuple[CustomTextCLIP, SigLIP]:
    """SigLIP 2 with a 1,000-token vocabulary: Gemma's 256k rows would only cost time here
    (the full model is `test_parity_full_depth_siglip2`)."""
    model, cfg = reference("ViT-B-16-SigLIP2-256", vocab_size=1000)
    return model, ours_for(model, cfg)


@pytest.fixture(scope="module")
def so400m() -> tuple[CustomTextCLIP, SigLIP]:
    model, cfg = reference("ViT-SO400M-14-SigLIP")
    return model, ours_for(model, cfg)


def inputs(config, images: int = 3, texts: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    size = config.image_resolution
    tokens = torch.randint(0, config.vocab_size, (texts, config.context_length))
    tokens[1, 5:] = 1  # a short text padded out, as the tokenizer gives them
    return torch.randn(images, 3, size, size), tokens


def max_abs_diffs(reference: CustomTextCLIP, ours: SigLIP, images: torch.Tensor, texts: torch.Tensor) -> dict:
    with torch.no_grad():
        ref_image, ref_text = reference.encode_image(images), reference.encode_text(texts)
        ref_logits, _ = reference.get_logits(images, texts)
        our_image, our_text = ours.encode_image(images), ours.encode_text(texts)
        our_logits, our_logits_t = ours(images, texts)
    assert torch.equal(our_logits_t, our_logits.t())
    return {
        "image": (ref_image - our_image).abs().max().item(),
        "text": (ref_text - our_text).abs().max().item(),
        "logits": (ref_logits - our_logits).abs().max().item(),
    }


def assert_parity(label: str, reference: CustomTextCLIP, ours: SigLIP) -> None:
    images, texts = inputs(ours.config)
    diffs = max_abs_diffs(reference, ours, images, texts)
    print(f"{label}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.mark.parametrize("pair", ["b16", "siglip2", "so400m"])
def test_parity_with_open_clip(pair, request):
    model, ours = request.getfixturevalue(pair)
    assert_parity(f"{pair} (2 blocks per tower)", model, ours)


def test_so400m_shape_is_what_makes_it_different(so400m):
    """SO400M's heads are 72 wide and its MLPs 4304: with 18 heads of 64 (CLIP's rule) the
    weights load and the numbers are wrong."""
    model, ours = so400m
    assert (ours.config.vision_heads, ours.config.text_heads) == (16, 16)
    assert (ours.config.vision_mlp_width, ours.config.text_mlp_width) == (4304, 4304)
    wrong = build_model(model.state_dict(), config=dataclasses.replace(ours.config, vision_heads=18, text_heads=18))
    images, texts = inputs(ours.config)
    with torch.no_grad():
        assert (wrong.encode_image(images) - model.encode_image(images)).abs().max() > 1e-3
        assert (wrong.encode_text(texts) - model.encode_text(texts)).abs().max() > 1e-3


def test_siglip2_text_tower_needs_the_tanh_gelu(siglip2):
    model, ours = siglip2
    assert ours.config.text_gelu == "tanh"
    exact = build_model(model.state_dict(), config=dataclasses.replace(ours.config, text_gelu="none"))
    _, texts = inputs(ours.config)
    with torch.no_grad():
        assert (exact.encode_text(texts) - model.encode_text(texts)).abs().max() > 1e-4


@pytest.mark.slow
def test_parity_full_depth_siglip2():
    """ViT-B-16-SigLIP2-256 as published: 12 blocks in each tower, Gemma's 256k vocabulary."""
    model, cfg = reference("ViT-B-16-SigLIP2-256", depth=None)
    ours = build_model(model.state_dict())  # no configuration: inferred from the shapes
    assert ours.config == config_from_openclip(cfg)
    assert_parity("ViT-B-16-SigLIP2-256 (full depth)", model, ours)


def test_sigmoid_logits_and_probabilities(b16):
    model, ours = b16
    images, texts = inputs(ours.config)
    with torch.no_grad():
        logits, _ = ours(images, texts)
        cosine = F.normalize(ours.encode_image(images), dim=-1) @ F.normalize(ours.encode_text(texts), dim=-1).t()
    expected = ours.logit_scale.exp() * cosine + ours.logit_bias
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    assert ours.logit_bias.item() == model.logit_bias.item() != 0


def test_text_must_fill_the_context(b16):
    _, ours = b16
    with pytest.raises(ValueError, match="exactly 64 token ids"):
        ours.encode_text(torch.ones(1, 10, dtype=torch.long))


@pytest.mark.parametrize("towers", ["text", "image"])
def test_one_tower_gives_the_same_features(towers, b16):
    model, full = b16
    config = full.config
    part = build_model(model.state_dict(), towers=towers, config=config)
    images, texts = inputs(config)
    with torch.no_grad():
        if towers == "text":
            assert part.visual is None
            assert torch.equal(part.encode_text(texts), full.encode_text(texts))
        else:
            assert part.text is None
            assert torch.equal(part.encode_image(images), full.encode_image(images))
    assert part.logit_bias.item() == full.logit_bias.item()


def test_every_open_clip_siglip_config_is_inferred_from_its_shapes():
    """A bare open_clip_model.safetensors carries no configuration; for every SigLIP open_clip
    3.3 defines, the shapes alone (with the known tower table) give the configuration its
    open_clip_config.json would have given."""
    assert len(SIGLIP_NAMES) >= 20
    for name in SIGLIP_NAMES:
        cfg = openclip_config(name)
        with torch.device("meta"):
            state_dict = CustomTextCLIP(**cfg).state_dict()
        assert family_of(state_dict) == "siglip"
        expected = config_from_openclip(cfg)
        if name.endswith("-378"):  # a 27x27 grid of 14 px patches is 384 px too; the registry says 378
            expected = dataclasses.replace(expected, image_resolution=384)
        assert config_from_state_dict(state_dict) == expected, name


def test_unknown_tower_is_refused(b16):
    model, _ = b16  # 2 blocks: no published model is that shallow
    with pytest.raises(CheckpointError, match=r"open_clip_config\.json"):
        build_model(model.state_dict())
