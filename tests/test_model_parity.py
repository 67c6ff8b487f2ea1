"""Our CLIP against open_clip 3.3.0 on the same random weights.

A reference model is created at random, its state dict goes through our `build_model`, and the
image features, text features and logits must agree within 1e-5 (fp32, max abs). Every
constant tensor (LayerNorm and BatchNorm affine, biases, BatchNorm statistics) is randomised
first, so a parameter we used wrongly or not at all cannot hide behind a 0 or a 1.

`pytest tests/test_model_parity.py -s -k parity` prints the figure for each architecture.
"""

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP as ReferenceCLIP

from clipsearch.clip.loss import clip_loss
from clipsearch.clip.model import CLIP, ModelConfig, build_model, config_from_state_dict
from clipsearch.errors import CheckpointError

TOLERANCE = 1e-5

SMALL_VIT = dict(
    embed_dim=64,
    vision_cfg=dict(layers=2, width=128, patch_size=8, image_size=32),
    text_cfg=dict(context_length=16, vocab_size=100, width=128, heads=2, layers=2),
)
SMALL_RESNET = dict(
    embed_dim=64,
    vision_cfg=dict(layers=(1, 2, 1, 1), width=16, image_size=64),  # attention pool: 512 wide, 8 heads
    text_cfg=dict(context_length=16, vocab_size=100, width=128, heads=2, layers=2),
)


def randomized(reference: torch.nn.Module) -> torch.nn.Module:
    """The reference model with no tensor left at a constant, in eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for tensor in reference.state_dict().values():
            # Only biases, norms and scalars are ever initialised to a constant.
            if tensor.is_floating_point() and tensor.ndim <= 1 and tensor.min() == tensor.max():
                tensor.add_(0.1 * torch.randn_like(tensor))
        batch_norms = [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        if batch_norms:
            # Statistics of a real forward pass keep activations at a sane scale through the ResNet.
            for bn in batch_norms:
                bn.reset_running_stats()
                bn.momentum = None  # cumulative average: one batch sets the statistics exactly
            reference.train()
            size = reference.visual.image_size
            reference.visual(torch.randn(2, 3, size, size))
    return reference.eval()


def small_reference(cfg: dict, quick_gelu: bool = True) -> ReferenceCLIP:
    torch.manual_seed(0)
    return randomized(ReferenceCLIP(**cfg, quick_gelu=quick_gelu))


def random_inputs(reference: ReferenceCLIP, images: int, texts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and token ids whose end-of-text token (the largest id) sits at varied places,
    the last position included."""
    torch.manual_seed(1)
    size = reference.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    eot, context = reference.vocab_size - 1, reference.context_length
    tokens = torch.randint(1, eot, (texts, context))
    for row, end in enumerate(torch.linspace(1, context - 1, texts).round().long().tolist()):
        tokens[row, end] = eot
        tokens[row, end + 1 :] = 0
    return torch.randn(images, 3, size, size), tokens


def max_abs_diffs(reference: ReferenceCLIP, ours: CLIP, images: torch.Tensor, texts: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        ref_image, ref_text = reference.encode_image(images), reference.encode_text(texts)
        ref_logits = reference.logit_scale.exp() * F.normalize(ref_image, dim=-1) @ F.normalize(ref_text, dim=-1).t()
        our_image, our_text = ours.encode_image(images), ours.encode_text(texts)
        our_logits, our_logits_per_text = ours(images, texts)
    # Features of order one: an absolute tolerance on them means something.
    assert ref_image.abs().max() > 0.5 and ref_text.abs().max() > 0.5
    assert torch.equal(our_logits_per_text, our_logits.t())
    return {
        "image": (ref_image - our_image).abs().max().item(),
        "text": (ref_text - our_text).abs().max().item(),
        "logits": (ref_logits - our_logits).abs().max().item(),
    }


def assert_parity(name: str, reference: ReferenceCLIP, ours: CLIP, images: int = 2, texts: int = 3) -> None:
    diffs = max_abs_diffs(reference, ours, *random_inputs(reference, images, texts))
    print(f"\n{name}: max abs diff " + ", ".join(f"{key} {value:.2e}" for key, value in diffs.items()))
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.fixture(scope="module")
def small_vit() -> ReferenceCLIP:
    return small_reference(SMALL_VIT)


@pytest.fixture(scope="module")
def small_resnet() -> ReferenceCLIP:
    return small_reference(SMALL_RESNET)


# --- parity --------------------------------------------------------------------------------


def test_parity_small_vit(small_vit):
    assert_parity("small ViT (QuickGELU)", small_vit, build_model(small_vit.state_dict()), images=4, texts=5)


def test_parity_small_resnet(small_resnet):
    assert_parity("small ResNet (QuickGELU)", small_resnet, build_model(small_resnet.state_dict()), images=4, texts=5)


def test_parity_small_vit_gelu_and_the_activation_matters():
    reference = small_reference(SMALL_VIT, quick_gelu=False)
    assert_parity("small ViT (GELU)", reference, build_model(reference.state_dict(), quick_gelu=False))

    wrong = build_model(reference.state_dict(), quick_gelu=True)
    diffs = max_abs_diffs(reference, wrong, *random_inputs(reference, 2, 3))
    assert diffs["image"] > 1e-3 and diffs["text"] > 1e-3


@pytest.mark.parametrize(
    ("name", "quick_gelu"),
    [("ViT-B-32-quickgelu", True), ("RN50-quickgelu", True), ("ViT-B-32", False)],
)
def test_parity_real_configs(name: str, quick_gelu: bool):
    """OpenAI's ViT-B/32 and RN50 shapes, and OpenCLIP's native-GELU ViT-B-32."""
    torch.manual_seed(0)
    reference = randomized(open_clip.create_model(name, pretrained=None))
    ours = build_model(reference.state_dict(), quick_gelu=quick_gelu)
    assert_parity(name, reference, ours, images=2, texts=2)


def test_parity_short_texts_skip_the_padding(small_vit):
    """Ours cuts the padding after the last end-of-text token; the reference runs all of it."""
    _, tokens = random_inputs(small_vit, 0, 3)
    tokens[:, 4:] = 0
    tokens[:, 3] = small_vit.vocab_size - 1
    tokens[0, 3], tokens[0, 1] = 7, small_vit.vocab_size - 1  # ends differ within the batch
    ours = build_model(small_vit.state_dict())

    with torch.no_grad():
        diff = (small_vit.encode_text(tokens) - ours.encode_text(tokens)).abs().max().item()
        # Input already cut to the longest text gives the very same features.
        assert torch.equal(ours.encode_text(tokens), ours.encode_text(tokens[:, :4]))
    assert diff <= TOLERANCE


# --- shapes and names ----------------------------------------------------------------------


def test_state_dict_has_openai_key_names(small_vit, small_resnet):
    keys = set(build_model(small_vit.state_dict()).state_dict()) | set(
        build_model(small_resnet.state_dict()).state_dict()
    )

    for key in [
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.ln_pre.weight",
        "visual.transformer.resblocks.1.mlp.c_fc.weight",
        "visual.ln_post.bias",
        "visual.proj",
        "visual.layer2.0.downsample.0.weight",
        "visual.layer2.0.downsample.1.running_var",
        "visual.attnpool.q_proj.weight",
        "visual.attnpool.c_proj.bias",
        "visual.attnpool.positional_embedding",
        "transformer.resblocks.0.attn.in_proj_weight",
        "transformer.resblocks.0.attn.in_proj_bias",
        "transformer.resblocks.0.attn.out_proj.weight",
        "transformer.resblocks.1.ln_2.bias",
        "token_embedding.weight",
        "positional_embedding",
        "ln_final.weight",
        "text_projection",
        "logit_scale",
    ]:
        assert key in keys


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(
            embed_dim=32,
            image_resolution=48,
            vision_layers=3,
            vision_width=128,
            vision_patch_size=16,
            vision_heads=2,
            context_length=12,
            vocab_size=50,
            text_width=64,
            text_heads=1,
            text_layers=2,
        ),
        ModelConfig(
            embed_dim=32,
            image_resolution=64,
            vision_layers=(1, 1, 2, 1),
            vision_width=16,
            vision_patch_size=None,
            vision_heads=8,
            context_length=12,
            vocab_size=50,
            text_width=192,
            text_heads=3,
            text_layers=1,
            quick_gelu=False,
        ),
    ],
    ids=["vit", "resnet"],
)
def test_config_round_trips(config: ModelConfig):
    state_dict = CLIP(config).state_dict()
    assert config_from_state_dict(state_dict, quick_gelu=config.quick_gelu) == config

    restored = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config and restored.is_resnet == config.is_resnet


def test_openai_archive_scalars_and_fp16_weights_load_as_fp32(small_vit):
    """OpenAI's archives keep input_resolution/context_length/vocab_size beside fp16 weights."""
    state_dict = {key: value.half() for key, value in small_vit.state_dict().items()}
    state_dict.update(input_resolution=torch.tensor(32), context_length=torch.tensor(16), vocab_size=torch.tensor(100))

    model = build_model(state_dict)

    assert model.dtype == torch.float32 and not model.training
    assert torch.equal(model.visual.proj, small_vit.visual.proj.half().float())


def test_not_a_clip_state_dict_is_refused(small_vit):
    with pytest.raises(CheckpointError, match="not a CLIP state dict"):
        build_model({"fc.weight": torch.zeros(2, 2)})

    state_dict = dict(small_vit.state_dict())
    state_dict["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="do not fit"):
        build_model(state_dict)


# --- single towers -------------------------------------------------------------------------


def test_text_tower_alone(small_vit):
    full = build_model(small_vit.state_dict())
    text_only = build_model(small_vit.state_dict(), towers="text")
    _, tokens = random_inputs(small_vit, 0, 4)

    assert text_only.visual is None
    assert not any(key.startswith("visual.") for key in text_only.state_dict())
    with torch.no_grad():
        assert torch.equal(text_only.encode_text(tokens), full.encode_text(tokens))
    with pytest.raises(ValueError, match="cannot encode images"):
        text_only.encode_image(torch.zeros(1, 3, 32, 32))


def test_image_tower_alone(small_vit):
    full = build_model(small_vit.state_dict())
    image_only = build_model(small_vit.state_dict(), towers="image")
    images, _ = random_inputs(small_vit, 2, 0)

    assert set(image_only.state_dict()) == {k for k in full.state_dict() if k.startswith("visual.")} | {"logit_scale"}
    with torch.no_grad():
        assert torch.equal(image_only.encode_image(images), full.encode_image(images))
    with pytest.raises(ValueError, match="cannot encode text"):
        image_only.encode_text(torch.zeros(1, 16, dtype=torch.long))


# --- training ------------------------------------------------------------------------------


@pytest.mark.parametrize("reference", ["small_vit", "small_resnet"])
def test_from_scratch_model_trains(reference: str, request: pytest.FixtureRequest):
    reference = request.getfixturevalue(reference)
    torch.manual_seed(0)
    model = CLIP(config_from_state_dict(reference.state_dict())).train()
    images, tokens = random_inputs(reference, 4, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> float:
        optimizer.zero_grad()
        loss = clip_loss(model.encode_image(images), model.encode_text(tokens), model.logit_scale)
        loss.backward()
        optimizer.step()
        return loss.item()

    first = step()
    for _ in range(3):
        last = step()

    assert last < first
    # (A ResNet block's branch gets gradients from the second step on: its last BatchNorm starts at 0.)
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_initialisation_follows_openai(small_resnet):
    torch.manual_seed(0)
    config = config_from_state_dict(small_resnet.state_dict())
    model = CLIP(config)

    assert model.logit_scale.item() == pytest.approx(2.6593, abs=1e-4)  # log(1 / 0.07)
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.text_projection.std().item() == pytest.approx(config.text_width**-0.5, rel=0.1)
    assert all(block.bn3.weight.abs().sum() == 0 for block in model.visual.layer1)


def test_clamp_logit_scale(small_vit):
    model = CLIP(config_from_state_dict(small_vit.state_dict()), towers="text")
    with torch.no_grad():
        model.logit_scale.fill_(7.0)

    model.clamp_logit_scale()

    assert model.logit_scale.exp().item() == pytest.approx(100.0)
