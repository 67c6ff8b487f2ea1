"""SigLIP and SigLIP 2: a ViT without class token pooled by attention, a bidirectional text
Transformer pooled at its last position, and pairwise sigmoid scoring.

Parameter names follow open_clip's, whose hub files are where these weights are published:
the image tower is timm's ViT under ``visual.trunk.`` (``patch_embed.proj``, ``pos_embed``,
``blocks.N.attn.qkv``, ``attn_pool.latent``, ...), the text tower open_clip's own under
``text.`` (``transformer.resblocks.N.attn.in_proj_weight``, ``text_projection`` with a bias),
so an OpenCLIP state dict loads with ``strict=True`` and no renaming.

What sets them apart from CLIP, all carried by `SiglipConfig` since the weights cannot tell:
LayerNorm epsilon 1e-6, head counts that are not always ``width // 64`` (SO400M: 16 heads of
72), MLPs that are not always 4x wide (SO400M: 4304 for 1152), and GELU with or without its
tanh approximation per tower (SigLIP 2's text tower and some image towers use it).

Scores: ``logit_scale.exp() * cos + logit_bias`` is a logit of the probability that an image
and a text belong together, judged pair by pair; `torch.sigmoid` of it is that probability.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipsearch.clip.model import (
    Activation,
    LayerNorm,
    SharedSpace,
    Towers,
    Transformer,
    attend,
    check_towers,
    count_blocks,
)
from clipsearch.errors import CheckpointError

FAMILY = "siglip"


@dataclasses.dataclass
class SiglipConfig:
    """The shape and settings of a `SigLIP`; ``*_gelu`` is `nn.GELU`'s ``approximate``
    ("none" or "tanh"). ``text_projection`` is False for the rare model whose text features
    are used as they come (ViT-SO400M-16-SigLIP-i18n-256)."""

    embed_dim: int
    image_resolution: int
    vision_patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp_width: int
    context_length: int
    vocab_size: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp_width: int
    vision_gelu: str = "none"
    text_gelu: str = "none"
    text_projection: bool = True
    eps: float = 1e-6
    family: str = FAMILY

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SiglipConfig:
        return cls(**data)


def gelu(approximate: str) -> Activation:
    return functools.partial(nn.GELU, approximate=approximate)


# timm's SigLIP image towers, which open_clip's configurations name (timm 1.0.x): name ->
# (patch size, width, layers, heads, MLP width, GELU approximation). The resolution is the
# name's suffix. Which towers use the tanh approximation follows no pattern a name shows.
TIMM_TOWERS: dict[str, tuple[int, int, int, int, int, str]] = {
    **{f"vit_base_patch16_siglip_{r}": (16, 768, 12, 12, 3072, "none") for r in (224, 256, 384, 512)},
    "vit_base_patch32_siglip_256": (32, 768, 12, 12, 3072, "tanh"),
    **{f"vit_large_patch16_siglip_{r}": (16, 1024, 24, 16, 4096, "none") for r in (256, 384)},
    "vit_large_patch16_siglip_512": (16, 1024, 24, 16, 4096, "tanh"),
    **{f"vit_so400m_patch14_siglip_{r}": (14, 1152, 27, 16, 4304, "none") for r in (224, 378, 384)},
    **{f"vit_so400m_patch16_siglip_{r}": (16, 1152, 27, 16, 4304, "tanh") for r in (256, 384, 512)},
    **{f"vit_giantopt_patch16_siglip_{r}": (16, 1536, 40, 16, 6144, "tanh") for r in (256, 384)},
}
# open_clip's SigLIP text towers: heads by width (768 wide: 12 heads; wider: 16). The tanh GELU
# goes with SigLIP 2, whose text tower alone uses Gemma's 256,000-token vocabulary.
_TEXT_HEADS = {768: 12, 1024: 16, 1152: 16}
_GEMMA_VOCAB = 256_000


def config_from_openclip(
    model_cfg: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None
) -> SiglipConfig:
    """The configuration an ``open_clip_config.json`` (its ``model_cfg``) describes. With the
    ``state_dict`` it comes with, the image tower's depth is the weights' (a timm name fixes it
    only for the published models)."""
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    name = vision.get("timm_model_name")
    if name not in TIMM_TOWERS or vision.get("timm_pool") != "map" or vision.get("timm_proj") not in (None, "none"):
        raise CheckpointError(
            f"The image tower {name!r} (pool {vision.get('timm_pool')!r}) is not one of the SigLIP towers "
            "clipsearch knows; use a SigLIP or SigLIP 2 model as open_clip 3.3 defines them."
        )
    if not text.get("no_causal_mask") or text.get("pool_type") != "last":
        raise CheckpointError("The text tower is not SigLIP's (bidirectional, pooled at the last position).")
    patch, width, layers, heads, mlp_width, vision_gelu = TIMM_TOWERS[name]
    if state_dict is not None:
        layers = count_blocks(state_dict, "visual.trunk.blocks.")
    text_width = int(text.get("width", 512))
    return SiglipConfig(
        embed_dim=int(model_cfg["embed_dim"]),
        image_resolution=int(vision.get("image_size", 224)),
        vision_patch_size=patch,
        vision_width=width,
        vision_layers=layers,
        vision_heads=heads,
        vision_mlp_width=mlp_width,
        context_length=int(text.get("context_length", 77)),
        vocab_size=int(text.get("vocab_size", 49408)),
        text_width=text_width,
        text_layers=int(text.get("layers", 12)),
        text_heads=int(text.get("heads", 8)),
        text_mlp_width=int(text_width * float(text.get("mlp_ratio", 4.0))),
        vision_gelu=vision_gelu,
        text_gelu=(text.get("act_kwargs") or {}).get("approximate", "none"),
        text_projection=text.get("proj_type", "linear") != "none",
        eps=float((text.get("norm_kwargs") or {}).get("eps", 1e-5)),
    )


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> SiglipConfig:
    """The configuration of an open_clip SigLIP state dict, from its shapes and what every
    SigLIP open_clip 3.3 defines has in common (`TIMM_TOWERS`, `_TEXT_HEADS`): a bare
    ``open_clip_model.safetensors`` then loads without its ``open_clip_config.json``."""
    sd = state_dict
    try:
        patch_weight = sd["visual.trunk.patch_embed.proj.weight"]
        patch, width = patch_weight.shape[-1], patch_weight.shape[0]
        layers = count_blocks(sd, "visual.trunk.blocks.")
        grid = round(sd["visual.trunk.pos_embed"].shape[1] ** 0.5)
        text_width = sd["text.ln_final.weight"].shape[0]
        vocab_size = sd["text.token_embedding.weight"].shape[0]
        projection = sd.get("text.text_projection.weight")
        text_mlp_width = sd["text.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        context_length = sd["text.positional_embedding"].shape[0]
    except KeyError as missing:
        raise CheckpointError(f"The SigLIP weights lack {missing}; use an unmodified open_clip checkpoint.") from None
    # A patch-14 tower sees 384 px images as a 27x27 grid, the last 6 px unused, as it sees 378 px
    # ones: open_clip runs SigLIP's SO400M/14-384 weights at either size, SigLIP 2's at 378. The
    # largest size is taken; the registry says which the published model uses.
    towers = sorted(
        (int(name.rsplit("_", 1)[1]), spec)
        for name, spec in TIMM_TOWERS.items()
        if spec[:3] == (patch, width, layers) and int(name.rsplit("_", 1)[1]) // patch == grid
    )
    if not towers or text_width not in _TEXT_HEADS:
        raise CheckpointError(
            f"These SigLIP weights ({width} wide, {layers} layers, patch {patch}, {grid}x{grid} patches) match "
            "no model open_clip defines, so their head counts and activations are unknown; load the model's "
            "directory with its open_clip_config.json."
        )
    resolution, tower = towers[-1]
    return SiglipConfig(
        embed_dim=projection.shape[0] if projection is not None else text_width,
        image_resolution=resolution,
        vision_patch_size=patch,
        vision_width=width,
        vision_layers=layers,
        vision_heads=tower[3],
        vision_mlp_width=tower[4],
        context_length=context_length,
        vocab_size=vocab_size,
        text_width=text_width,
        text_layers=count_blocks(sd, "text.transformer.resblocks."),
        text_heads=_TEXT_HEADS[text_width],
        text_mlp_width=text_mlp_width,
        vision_gelu=tower[5],
        text_gelu="tanh" if vocab_size == _GEMMA_VOCAB else "none",
        text_projection=projection is not None,
    )


# --- image tower (timm's names) ----------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, grid * grid, width]


class Attention(nn.Module):
    """Bidirectional self-attention with a fused q/k/v ``Linear`` (timm's ``qkv``, ``proj``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(attend(self.qkv(x), self.heads, causal=False))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, act_layer: Activation):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, act_layer: Activation, eps: float):
        super().__init__()
        self.norm1 = LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.norm2 = LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_width, act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttentionPool(nn.Module):
    """The "MAP" head: one learned query (``latent``) attends to every patch, and the result
    goes through a residual MLP. It replaces CLIP's class token."""

    def __init__(self, width: int, heads: int, mlp_width: int, act_layer: Activation, eps: float):
        super().__init__()
        self.heads = heads
        self.latent = nn.Parameter(torch.empty(1, 1, width))
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm = LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_width, act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        head_width = width // self.heads
        # The query is the same for every image: projected once, then broadcast.
        q = self.q(self.latent.to(x.dtype)).view(1, self.heads, 1, head_width).expand(batch, -1, -1, -1)
        k, v = self.kv(x).view(batch, length, 2, self.heads, head_width).permute(2, 0, 3, 1, 4)
        pooled = F.scaled_dot_product_attention(q, k, v).reshape(batch, width)
        pooled = self.proj(pooled)
        return pooled + self.mlp(self.norm(pooled))


class VisionTrunk(nn.Module):
    def __init__(self, config: SiglipConfig):
        super().__init__()
        width, grid = config.vision_width, config.image_resolution // config.vision_patch_size
        act_layer = gelu(config.vision_gelu)
        self.patch_embed = PatchEmbed(config.vision_patch_size, width)
        self.pos_embed = nn.Parameter(torch.empty(1, grid * grid, width))
        self.blocks = nn.Sequential(
            *[
                Block(width, config.vision_heads, config.vision_mlp_width, act_layer, config.eps)
                for _ in range(config.vision_layers)
            ]
        )
        self.norm = LayerNorm(width, eps=config.eps)
        self.attn_pool = AttentionPool(width, config.vision_heads, config.vision_mlp_width, act_layer, config.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed.to(x.dtype)
        return self.attn_pool(self.norm(self.blocks(x)))


class SiglipVision(nn.Module):
    """The image tower; its output is the embedding (no projection: the pool's width is it)."""

    def __init__(self, config: SiglipConfig):
        super().__init__()
        self.input_resolution = config.image_resolution
        self.trunk = VisionTrunk(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


# --- text tower (open_clip's names) ------------------------------------------------------------


class SiglipText(nn.Module):
    def __init__(self, config: SiglipConfig):
        super().__init__()
        width = config.text_width
        self.context_length = config.context_length
        self.token_embedding = nn.Embedding.from_pretrained(torch.empty(config.vocab_size, width), freeze=False)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.transformer = Transformer(
            width,
            config.text_layers,
            config.text_heads,
            gelu(config.text_gelu),
            causal=False,
            mlp_width=config.text_mlp_width,
            eps=config.eps,
        )
        self.ln_final = LayerNorm(width, eps=config.eps)
        self.text_projection = nn.Linear(width, config.embed_dim) if config.text_projection else nn.Identity()

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        if text.shape[1] != self.context_length:
            # Every position, padding included, is attended to and the last one is pooled:
            # a shorter or longer input gives another embedding, not a shorter computation.
            raise ValueError(
                f"SigLIP's text tower takes exactly {self.context_length} token ids per text, "
                f"padded as its tokenizer pads them, not {text.shape[1]}"
            )
        dtype = self.ln_final.weight.dtype
        x = self.token_embedding(text).to(dtype) + self.positional_embedding.to(dtype)
        x = self.transformer(x)
        # LayerNorm works per position, so normalising only the pooled one gives the same result.
        return self.text_projection(self.ln_final(x[:, -1]))


# --- the model ---------------------------------------------------------------------------------


class SigLIP(SharedSpace):
    """Image and text towers into one space, with a learned ``logit_scale`` (log) and
    ``logit_bias``. The API is `CLIP`'s: ``encode_image``, ``encode_text``, and ``forward``
    giving ``(logits_per_image, logits_per_text)``, which here are sigmoid logits."""

    def __init__(self, config: SiglipConfig, towers: Towers = "both"):
        super().__init__()
        check_towers(towers)
        self.config = config
        self.towers = towers
        self.context_length = config.context_length
        self.visual: SiglipVision | None = SiglipVision(config) if towers != "text" else None
        self.text = SiglipText(config) if towers != "image" else None
        self.logit_scale = nn.Parameter(torch.full([], math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.full([], -10.0))
        if not self.logit_scale.is_meta:  # see CLIP.__init__: a meta model is about to be filled
            self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """Small random values for the parameters ``nn.Linear`` and friends do not initialise."""
        if self.visual is not None:
            trunk = self.visual.trunk
            nn.init.normal_(trunk.pos_embed, std=trunk.pos_embed.shape[-1] ** -0.5)
            nn.init.normal_(trunk.attn_pool.latent, std=trunk.attn_pool.latent.shape[-1] ** -0.5)
        if self.text is not None:
            nn.init.normal_(self.text.token_embedding.weight, std=0.02)
            nn.init.normal_(self.text.positional_embedding, std=0.01)

    @property
    def dtype(self) -> torch.dtype:
        if self.visual is not None:
            return self.visual.trunk.patch_embed.proj.weight.dtype
        assert self.text is not None
        return self.text.token_embedding.weight.dtype

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Unnormalised text embeddings, ``[N, embed_dim]``, from token ids ``[N, context_length]``."""
        if self.text is None:
            raise ValueError("this model was built with towers='image' and cannot encode text")
        return self.text(text)
