"""Hugging Face ``SiglipModel`` and ``Siglip2Model`` checkpoints (``save_pretrained``
directories, ``model_type`` "siglip" or "siglip2") as our `SigLIP`: the configuration
translated, the weights renamed to open_clip's names (`clip.siglip`).

Hugging Face keeps q, k and v as three projections where open_clip fuses them into one, names
the pooling head's query ``probe`` and keeps its q/k/v in an ``nn.MultiheadAttention``; every
other difference is a name. SigLIP 2's fixed-resolution checkpoints are ``SiglipModel``
checkpoints and load as such.

``Siglip2Model`` is SigLIP 2's NaFlex variant: it embeds patches with a ``Linear`` over pixels
flattened row, column, channel (the same weights as a convolution, reordered) and resizes its
square grid of position embeddings to each image's own patch grid, keeping the aspect ratio.
Here it runs at that square grid (``sqrt(num_patches)`` patches a side), where the resize is
the identity: the same numbers as transformers for a square image at that size, the image
resized to the square as for every SigLIP. The aspect-preserving grids are not reproduced.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from clipsearch.clip.hf_names import check_placed, fuse
from clipsearch.clip.siglip import SiglipConfig
from clipsearch.errors import CheckpointError

# Hugging Face's activations as nn.GELU's `approximate`.
_GELUS = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}

# (pattern, replacement) applied in order to every key; q/k/v are fused afterwards.
_RENAMES = (
    (r"^text_model\.embeddings\.token_embedding\.", "text.token_embedding."),
    (r"^text_model\.embeddings\.position_embedding\.weight$", "text.positional_embedding"),
    (r"^text_model\.encoder\.layers\.(\d+)\.", r"text.transformer.resblocks.\1."),
    (r"^text_model\.final_layer_norm\.", "text.ln_final."),
    (r"^text_model\.head\.", "text.text_projection."),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual.trunk.patch_embed.proj."),
    (r"^vision_model\.embeddings\.position_embedding\.weight$", "visual.trunk.pos_embed"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.", r"visual.trunk.blocks.\1."),
    (r"^vision_model\.post_layernorm\.", "visual.trunk.norm."),
    (r"^vision_model\.head\.probe$", "visual.trunk.attn_pool.latent"),
    (r"^vision_model\.head\.attention\.out_proj\.", "visual.trunk.attn_pool.proj."),
    (r"^vision_model\.head\.layernorm\.", "visual.trunk.attn_pool.norm."),
    (r"^vision_model\.head\.mlp\.", "visual.trunk.attn_pool.mlp."),
    # inside the text blocks (open_clip's names) ...
    (r"^(text\.transformer\.resblocks\.\d+)\.layer_norm(\d)\.", r"\1.ln_\2."),
    (r"^(text\.transformer\.resblocks\.\d+)\.self_attn\.out_proj\.", r"\1.attn.out_proj."),
    (r"^(text\.transformer\.resblocks\.\d+)\.mlp\.fc1\.", r"\1.mlp.c_fc."),
    (r"^(text\.transformer\.resblocks\.\d+)\.mlp\.fc2\.", r"\1.mlp.c_proj."),
    # ... and inside the image blocks (timm's names)
    (r"^(visual\.trunk\.blocks\.\d+)\.layer_norm(\d)\.", r"\1.norm\2."),
    (r"^(visual\.trunk\.blocks\.\d+)\.self_attn\.out_proj\.", r"\1.attn.proj."),
)
_QKV = re.compile(r"^(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def config_from_huggingface(config: Mapping[str, Any], path: Path) -> SiglipConfig:
    """Our configuration for a Hugging Face ``SiglipConfig`` (its ``config.json``)."""
    text, vision = config.get("text_config", {}), config.get("vision_config", {})
    acts = {name: tower.get("hidden_act", "gelu_pytorch_tanh") for name, tower in (("text", text), ("vision", vision))}
    unknown = sorted(act for act in acts.values() if act not in _GELUS)
    if unknown:
        raise CheckpointError(f"{path} uses the activation {unknown[0]!r}, which clipsearch's SigLIP does not have.")
    eps = {float(tower.get("layer_norm_eps", 1e-6)) for tower in (text, vision)}
    if len(eps) != 1 or not vision.get("vision_use_head", True):
        raise CheckpointError(
            f"{path} is a SigLIP variant clipsearch does not build (no attention-pool head, or "
            "different LayerNorm epsilons in its two towers)."
        )
    text_width, vision_width = int(text.get("hidden_size", 768)), int(vision.get("hidden_size", 768))
    patch = int(vision.get("patch_size", 16))
    if config.get("model_type") == "siglip2":  # NaFlex: a square grid of num_patches positions
        resolution = math.isqrt(int(vision.get("num_patches", 256))) * patch
    else:
        resolution = int(vision.get("image_size", 224))
    return SiglipConfig(
        embed_dim=int(text.get("projection_size") or text_width),
        image_resolution=resolution,
        vision_patch_size=patch,
        vision_width=vision_width,
        vision_layers=int(vision.get("num_hidden_layers", 12)),
        vision_heads=int(vision.get("num_attention_heads", 12)),
        vision_mlp_width=int(vision.get("intermediate_size", 3072)),
        context_length=int(text.get("max_position_embeddings", 64)),
        vocab_size=int(text.get("vocab_size", 32000)),
        text_width=text_width,
        text_layers=int(text.get("num_hidden_layers", 12)),
        text_heads=int(text.get("num_attention_heads", 12)),
        text_mlp_width=int(text.get("intermediate_size", 3072)),
        vision_gelu=_GELUS[acts["vision"]],
        text_gelu=_GELUS[acts["text"]],
        eps=eps.pop(),
    )


def state_dict_from_huggingface(hf: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """A ``SiglipModel`` state dict under our (open_clip's) names."""
    state_dict: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hf.items():
        if key.endswith("position_ids"):  # an index buffer older versions saved
            continue
        if key in ("logit_scale", "logit_bias"):
            state_dict[key] = value.reshape(())
            continue
        if key.startswith("vision_model.head.attention.in_proj_"):
            # The head's q/k/v: q projects the probe, k and v the patches.
            kind = key.rsplit("_", 1)[1]
            width = value.shape[0] // 3
            state_dict[f"visual.trunk.attn_pool.q.{kind}"] = value[:width]
            state_dict[f"visual.trunk.attn_pool.kv.{kind}"] = value[width:]
            continue
        for pattern, replacement in _RENAMES:
            key = re.sub(pattern, replacement, key)
        if key == "visual.trunk.pos_embed":
            value = value.unsqueeze(0)
        elif key == "visual.trunk.patch_embed.proj.weight" and value.ndim == 2:
            # Siglip2Model's Linear over (row, column, channel)-flattened patches, as a convolution.
            patch = math.isqrt(value.shape[1] // 3)
            value = value.reshape(value.shape[0], patch, patch, 3).permute(0, 3, 1, 2).contiguous()
        match = _QKV.match(key)
        if match:
            block, projection, kind = match.groups()
            target = f"{block}.attn.in_proj_{kind}" if block.startswith("text.") else f"{block}.attn.qkv.{kind}"
            fused.setdefault(target, {})[projection] = value
        else:
            state_dict[key] = value
    state_dict.update(fuse(fused, "q", "k", "v"))
    check_placed(state_dict, path)
    return state_dict
