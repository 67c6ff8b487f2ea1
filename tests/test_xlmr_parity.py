"""Our XLM-RoBERTa CLIP against open_clip 3.3's ``xlm-roberta-base-ViT-B-32`` on the same random
weights: image features, text features and logits within 1e-5 (fp32, max abs).

open_clip builds the text tower with transformers from the Hugging Face configuration of
``xlm-roberta-base``, which cannot be downloaded here: the test saves that configuration
(XLM-RoBERTa's settings, with 2 layers, a 256-wide encoder and a 1,000-token vocabulary) and
points open_clip's model configuration at it. The image tower is open_clip's ViT-B/32 with 2 of
its 12 layers.
"""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from open_clip.model import CustomTextCLIP
from test_siglip_parity import filled

from clipsearch.clip.build import build_model
from clipsearch.clip.model import family_of
from clipsearch.clip.xlmr import XlmrCLIP, config_from_state_dict

TOLERANCE = 1e-5
PAD, BOS, EOS = 1, 0, 2


def encoder_config(**overrides):
    from transformers import XLMRobertaConfig

    settings = dict(  # xlm-roberta-base's config.json, narrower and shallower
        vocab_size=1000,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=80,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        hidden_act="gelu",
    )
    return XLMRobertaConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[CustomTextCLIP, XlmrCLIP]:
    directory = tmp_path_factory.mktemp("xlm-roberta")
    encoder_config().save_pretrained(directory)
    cfg = copy.deepcopy(open_clip.get_model_config("xlm-roberta-base-ViT-B-32"))
    cfg["vision_cfg"]["layers"] = 2
    cfg["text_cfg"].update(hf_model_name=str(directory), hf_model_pretrained=False)
    torch.manual_seed(0)
    reference = filled(CustomTextCLIP(**cfg))
    return reference, build_model(reference.state_dict())


def texts(count: int = 5, context: int = 77) -> torch.Tensor:
    """Token ids as XLM-R's tokenizer gives them: <s> ... </s>, then padding."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.full((count, context), PAD)
    for row, length in enumerate([1, 5, 20, 40, context - 2][:count]):
        ids[row, 0] = BOS
        ids[row, 1 : length + 1] = torch.randint(3, 1000, (length,), generator=generator)
        ids[row, length + 1 if length + 1 < context else context - 1] = EOS
    return ids


def test_parity_with_open_clip(pair):
    reference, ours = pair
    assert family_of(reference.state_dict()) == "xlmr"
    assert (ours.config.text_width, ours.config.text_layers, ours.config.projection_hidden) == (256, 2, 384)
    images, tokens = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(2)), texts()
    with torch.no_grad():
        ref_image, ref_text = reference.encode_image(images), reference.encode_text(tokens)
        ref_logits, _ = reference.get_logits(images, tokens)
        our_image, our_text = ours.encode_image(images), ours.encode_text(tokens)
        our_logits, _ = ours(images, tokens)
    diffs = {
        "image": (ref_image - our_image).abs().max().item(),
        "text": (ref_text - our_text).abs().max().item(),
        "logits": (ref_logits - our_logits).abs().max().item(),
    }
    print("xlm-roberta-base-ViT-B-32 (2 layers per tower): " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_padding_changes_nothing(pair):
    """Padding is masked: the same text in a shorter or longer row embeds the same."""
    _, ours = pair
    tokens = texts()
    with torch.no_grad():
        full = ours.encode_text(tokens)
        short = ours.encode_text(tokens[1:2, :10])
        alone = ours.encode_text(tokens[4:5])
    torch.testing.assert_close(short[0], full[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(alone[0], full[4], rtol=0, atol=1e-5)


def test_positions_count_from_the_padding_id(pair):
    """A model that numbered positions from 0 (as BERT does) would give other features."""
    reference, ours = pair
    tokens = texts()
    state_dict = reference.state_dict()
    key = "text.transformer.embeddings.position_embeddings.weight"
    shifted = dict(state_dict, **{key: torch.roll(state_dict[key], shifts=-(PAD + 1), dims=0)})
    with torch.no_grad():
        assert (build_model(shifted).encode_text(tokens) - ours.encode_text(tokens)).abs().max() > 1e-3


def test_config_is_read_off_the_shapes(pair):
    reference, ours = pair
    config = config_from_state_dict(reference.state_dict())
    assert config == ours.config
    assert (config.embed_dim, config.vision_width, config.vision_patch_size, config.pad_id) == (512, 768, 32, 1)
    text_only = build_model(reference.state_dict(), towers="text")
    assert text_only.visual is None
    with torch.no_grad():
        assert torch.equal(text_only.encode_text(texts()), ours.encode_text(texts()))
