"""Multilingual CLIP: an XLM-RoBERTa text encoder beside an OpenCLIP ViT, as open_clip's
``xlm-roberta-base-ViT-B-32`` and ``xlm-roberta-large-ViT-H-14`` are built.

The text tower is XLM-RoBERTa (post-LayerNorm BERT layers, learned positions counted from the
padding id, one token type) whose token features are averaged over the text's tokens (padding
excluded) and projected by a two-layer MLP. A query in German, Chinese or Japanese lands near
its English translation because the encoder was trained on a hundred languages and the whole
model on LAION-5B's captions in all of them.

Parameter names are open_clip's: the image tower under ``visual.`` with OpenAI's names (our
`VisionTransformer`), the encoder under ``text.transformer.`` with Hugging Face's names
(``embeddings.word_embeddings``, ``encoder.layer.N.attention.self.query``, ...) and the
projection as ``text.proj.0`` / ``text.proj.2``. Everything but the attention heads (64 wide)
and XLM-RoBERTa's LayerNorm epsilon (1e-5) is read off the shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipsearch.clip.model import (
    HEAD_WIDTH,
    LayerNorm,
    QuickGELU,
    SharedSpace,
    Towers,
    VisionTransformer,
    check_towers,
    count_blocks,
    vision_fields,
)
from clipsearch.errors import CheckpointError

FAMILY = "xlmr"
# open_clip tokenizes for these models with transformers' defaults and its own context length.
CONTEXT_LENGTH = 77


@dataclasses.dataclass
class XlmrConfig:
    """An OpenCLIP ViT (the `ModelConfig` fields of the same names) and an XLM-RoBERTa encoder.
    ``projection_hidden`` is the width of the projection MLP's middle, 0 for a single Linear."""

    embed_dim: int
    image_resolution: int
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    vision_heads: int
    vocab_size: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp_width: int
    max_positions: int
    type_vocab_size: int = 1
    projection_hidden: int = 0
    context_length: int = CONTEXT_LENGTH
    pad_id: int = 1
    eps: float = 1e-5
    quick_gelu: bool = False
    family: str = FAMILY

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> XlmrConfig:
        return cls(**data)


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> XlmrConfig:
    sd = state_dict
    prefix = "text.transformer."
    try:
        vision = vision_fields(sd)
        words = sd[prefix + "embeddings.word_embeddings.weight"]
        if "text.proj.0.weight" in sd:
            projection_hidden, embed_dim = sd["text.proj.0.weight"].shape[0], sd["text.proj.2.weight"].shape[0]
        else:
            projection_hidden, embed_dim = 0, sd["text.proj.weight"].shape[0]
        config = XlmrConfig(
            **vision,
            embed_dim=embed_dim,
            vocab_size=words.shape[0],
            text_width=words.shape[1],
            text_layers=count_blocks(sd, prefix + "encoder.layer."),
            text_heads=words.shape[1] // HEAD_WIDTH,
            text_mlp_width=sd[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_positions=sd[prefix + "embeddings.position_embeddings.weight"].shape[0],
            type_vocab_size=sd[prefix + "embeddings.token_type_embeddings.weight"].shape[0],
            projection_hidden=projection_hidden,
        )
    except KeyError as missing:
        raise CheckpointError(
            f"The weights lack {missing}; they are not open_clip's XLM-RoBERTa CLIP with a ViT image tower."
        ) from None
    if config.vision_patch_size is None:
        raise CheckpointError("clipsearch builds XLM-RoBERTa CLIPs with a ViT image tower only.")
    return config


# --- the encoder (Hugging Face's names) ----------------------------------------------------------


class Embeddings(nn.Module):
    def __init__(self, config: XlmrConfig):
        super().__init__()
        self.pad_id = config.pad_id
        width = config.text_width
        self.word_embeddings = nn.Embedding.from_pretrained(torch.empty(config.vocab_size, width), freeze=False)
        self.position_embeddings = nn.Embedding.from_pretrained(torch.empty(config.max_positions, width), freeze=False)
        self.token_type_embeddings = nn.Embedding.from_pretrained(
            torch.empty(config.type_vocab_size, width), freeze=False
        )
        self.LayerNorm = LayerNorm(width, eps=config.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # RoBERTa numbers the tokens of a text from pad_id + 1; padding keeps position pad_id.
        positions = torch.cumsum(mask, dim=1) * mask + self.pad_id
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class QueryKeyValue(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attend_to: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        # Every position attends to the text's tokens, never to its padding.
        out = F.scaled_dot_product_attention(
            heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), attn_mask=attend_to[:, None, None, :]
        )
        return out.transpose(1, 2).reshape(batch, length, width)


class DenseNorm(nn.Module):
    """A projection added back to the residual stream, then LayerNorm (BERT's post-norm)."""

    def __init__(self, width_in: int, width: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(width_in, width)
        self.LayerNorm = LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dense(x))


class Attention(nn.Module):
    def __init__(self, config: XlmrConfig):
        super().__init__()
        self.self = QueryKeyValue(config.text_width, config.text_heads)
        self.output = DenseNorm(config.text_width, config.text_width, config.eps)

    def forward(self, x: torch.Tensor, attend_to: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, attend_to), x)


class Intermediate(nn.Module):
    def __init__(self, config: XlmrConfig):
        super().__init__()
        self.dense = nn.Linear(config.text_width, config.text_mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    def __init__(self, config: XlmrConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = DenseNorm(config.text_mlp_width, config.text_width, config.eps)

    def forward(self, x: torch.Tensor, attend_to: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, attend_to)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, config: XlmrConfig):
        super().__init__()
        self.layer = nn.ModuleList([Layer(config) for _ in range(config.text_layers)])


class XlmRoberta(nn.Module):
    def __init__(self, config: XlmrConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids, mask)
        attend_to = mask.bool()
        for layer in self.encoder.layer:
            x = layer(x, attend_to)
        return x


class XlmrText(nn.Module):
    """The encoder, mean pooling over the text's tokens, and the projection."""

    def __init__(self, config: XlmrConfig):
        super().__init__()
        self.pad_id = config.pad_id
        self.transformer = XlmRoberta(config)
        width, hidden = config.text_width, config.projection_hidden
        self.proj: nn.Module
        if hidden:
            self.proj = nn.Sequential(
                nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, config.embed_dim, bias=False)
            )
        else:
            self.proj = nn.Linear(width, config.embed_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad_id).long()
        # Padding is masked out of attention and pooling: columns that are padding in every row
        # change nothing and are cut, so a short query costs its own length, not 77 tokens.
        length = int(mask.sum(dim=1).max()) if len(ids) else ids.shape[1]
        ids, mask = ids[:, :length], mask[:, :length]
        x = self.transformer(ids, mask)
        weights = mask.unsqueeze(-1).to(x.dtype)
        return self.proj((x * weights).sum(dim=1) / weights.sum(dim=1))


# --- the model ---------------------------------------------------------------------------------


class XlmrCLIP(SharedSpace):
    """open_clip's ``xlm-roberta-*-ViT-*`` models: CLIP's scoring (softmax over
    ``logit_scale.exp() * cos``), an XLM-RoBERTa text tower."""

    def __init__(self, config: XlmrConfig, towers: Towers = "both"):
        super().__init__()
        check_towers(towers)
        self.config = config
        self.towers = towers
        self.context_length = config.context_length
        self.visual: VisionTransformer | None = None
        if towers != "text":
            self.visual = VisionTransformer.from_config(config, QuickGELU if config.quick_gelu else nn.GELU)
        self.text = XlmrText(config) if towers != "image" else None
        self.logit_scale = nn.Parameter(torch.zeros([]))
        if not self.logit_scale.is_meta:
            self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """Small random values where ``nn.Linear`` and friends leave none (training from scratch)."""
        nn.init.constant_(self.logit_scale, 2.659)  # log(1 / 0.07), CLIP's starting temperature
        if self.visual is not None:
            self.visual.initialize_parameters()
        if self.text is not None:
            embeddings = self.text.transformer.embeddings
            for table in (embeddings.word_embeddings, embeddings.position_embeddings, embeddings.token_type_embeddings):
                nn.init.normal_(table.weight, std=0.02)

    @property
    def dtype(self) -> torch.dtype:
        if self.visual is not None:
            return self.visual.conv1.weight.dtype
        assert self.text is not None
        return self.text.transformer.embeddings.word_embeddings.weight.dtype

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Unnormalised text embeddings, ``[N, embed_dim]``, from token ids padded with ``pad_id``."""
        if self.text is None:
            raise ValueError("this model was built with towers='image' and cannot encode text")
        return self.text(text)
