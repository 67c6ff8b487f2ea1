"""Attention head widths come from the checkpoint's configuration, not a fixed 64.

A checkpoint does not store its head count: the same weights split into 16 heads of 80 or 20
heads of 64 give different numbers. Hugging Face configurations say it (``num_attention_heads``),
OpenCLIP's say it for the image tower (``head_width``), and without a configuration the width
does, as in every OpenCLIP model (ViT-H/14's 1280-wide tower: 16 heads of 80).
"""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch
from open_clip.model import CLIP as ReferenceCLIP
from safetensors.torch import save_file
from test_hf_parity import assert_parity, hf_config, randomized
from transformers import CLIPModel

from clipsearch.clip.checkpoints import read_checkpoint
from clipsearch.clip.model import build_model, config_from_state_dict

TOLERANCE = 1e-5


def test_huggingface_clip_with_32_wide_heads(tmp_path):
    torch.manual_seed(0)
    reference = randomized(CLIPModel(hf_config("gelu", text=dict(num_attention_heads=4))))
    reference.save_pretrained(tmp_path / "narrow")
    _, info = read_checkpoint(tmp_path / "narrow")
    assert (info.config.text_heads, info.config.vision_heads) == (4, 2)
    state_dict, _ = read_checkpoint(tmp_path / "narrow")
    ours = build_model(state_dict, config=info.config)
    images, ids = torch.randn(2, 3, 48, 48), torch.randint(0, 58, (2, 12))
    ids[:, -1] = 59
    with torch.no_grad():
        expected = reference.get_text_features(input_ids=ids).pooler_output
        assert (ours.encode_text(ids) - expected).abs().max() <= TOLERANCE
        # Assuming 64-wide heads (2 of them) gives other numbers: the configuration mattered.
        assumed = build_model(state_dict, quick_gelu=False)
        assert assumed.config.text_heads == 2
        assert (assumed.encode_text(ids) - expected).abs().max() > 1e-4
        expected = reference.get_image_features(pixel_values=images).pooler_output
        assert (ours.encode_image(images) - expected).abs().max() <= TOLERANCE


def test_huggingface_parity_helper_still_holds_for_64_wide_heads(tmp_path):
    torch.manual_seed(0)
    reference = randomized(CLIPModel(hf_config("quick_gelu")))
    reference.save_pretrained(tmp_path / "plain")
    assert_parity(reference, tmp_path / "plain", 48, 12, 60)


def test_openclip_folder_head_width(tmp_path):
    """An OpenCLIP ViT whose image heads are 32 wide, as its open_clip_config.json says."""
    cfg = dict(
        embed_dim=64,
        vision_cfg=dict(layers=2, width=128, head_width=32, patch_size=8, image_size=32),
        text_cfg=dict(context_length=16, vocab_size=100, width=128, heads=2, layers=2),
    )
    torch.manual_seed(0)
    reference = ReferenceCLIP(**cfg).eval()
    folder = tmp_path / "hub"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    state_dict, info = read_checkpoint(folder)
    assert info.config.vision_heads == 4
    ours = build_model(state_dict, config=info.config)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours.encode_image(images) - reference.encode_image(images)).abs().max() <= TOLERANCE


@pytest.mark.parametrize(("name", "heads"), [("ViT-H-14", 16), ("ViT-bigG-14", 16), ("ViT-g-14", 16), ("ViT-B-32", 12)])
def test_without_a_configuration_the_width_decides(name, heads):
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    with torch.device("meta"):
        state_dict = ReferenceCLIP(**cfg).state_dict()
    config = config_from_state_dict(state_dict)
    assert config.vision_heads == heads
    assert config.vision_width // config.vision_heads == cfg["vision_cfg"].get("head_width", 64)
