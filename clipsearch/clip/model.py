"""The CLIP model: a ViT or modified-ResNet image tower, a causal text Transformer, a shared
embedding space.

Module and parameter names follow OpenAI's CLIP exactly (``visual.conv1.weight``,
``transformer.resblocks.0.attn.in_proj_weight``, ``text_projection``, ...), so OpenAI and
OpenCLIP state dicts load with ``strict=True`` and no renaming table. Everything about a model
is inferred from the shapes in its state dict (`config_from_state_dict`), the way OpenAI's
``build_model`` does it, so any checkpoint of this family loads without a hand-kept list.

A model can be built with only one tower: the search path embeds queries with the text tower
alone and never pays for the image tower's memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import nn

from clipsearch.clip.heap import release_free_memory
from clipsearch.errors import CheckpointError

Towers = Literal["both", "text", "image"]
TOWERS: tuple[str, ...] = get_args(Towers)
# What builds an MLP's activation: a module class or a partial of one (GELU with its tanh approximation).
Activation = Callable[[], nn.Module]

# Scalars OpenAI's TorchScript archives keep next to the weights; they are not parameters.
_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
# The learned temperature (every family) and bias (sigmoid families) of the scores.
_SCORING_KEYS = ("logit_scale", "logit_bias")
# The head count is not stored in a checkpoint. OpenAI's CLIPs all use 64-wide heads, and so do
# OpenCLIP's but for its widest image towers, which have 16 heads whatever their width (ViT-H/14,
# g/14, bigG/14, 1792 wide): a checkpoint's configuration can say so, and without one the width does.
HEAD_WIDTH = 64
_WIDE_VISION_HEAD_WIDTHS = {1280: 80, 1408: 88, 1664: 104, 1792: 112}


@dataclasses.dataclass
class ModelConfig:
    """Everything needed to build a `CLIP` with the right shapes.

    ``vision_layers`` is an int for a ViT and four ints (blocks per stage) for a ModifiedResNet,
    whose ``vision_patch_size`` is None. ``quick_gelu`` is True for OpenAI's weights and for the
    OpenCLIP models trained with it, False for those trained with exact GELU: the checkpoint's
    shapes cannot tell, so it is carried here.
    """

    embed_dim: int
    image_resolution: int
    vision_layers: int | tuple[int, int, int, int]
    vision_width: int
    vision_patch_size: int | None
    vision_heads: int
    context_length: int
    vocab_size: int
    text_width: int
    text_heads: int
    text_layers: int
    quick_gelu: bool = True

    def __post_init__(self) -> None:
        # JSON has no tuples: a ResNet config read back from config.json arrives with a list.
        if isinstance(self.vision_layers, list):
            self.vision_layers = tuple(self.vision_layers)

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.vision_layers, tuple)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        return cls(**data)


def config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    quick_gelu: bool = True,
    vision_head_width: int | None = None,
    text_head_width: int = HEAD_WIDTH,
) -> ModelConfig:
    """Read a model's shape off its weights, as OpenAI's ``build_model`` does.

    A ViT is recognised by ``visual.proj`` (a ResNet projects inside its attention pool). The
    head widths cannot be read off the weights; they come from the checkpoint's configuration,
    else from what every OpenAI and OpenCLIP model of that width uses.
    """
    sd = state_dict
    try:
        text_width = sd["ln_final.weight"].shape[0]
        return ModelConfig(
            **vision_fields(sd, vision_head_width),
            embed_dim=sd["text_projection"].shape[1],
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            text_width=text_width,
            text_heads=text_width // text_head_width,
            text_layers=count_blocks(sd, "transformer.resblocks."),
            quick_gelu=quick_gelu,
        )
    except KeyError as missing:
        raise CheckpointError(
            f"The weights lack {missing}, so they are not a CLIP state dict with OpenAI's key names; "
            "use an OpenAI, OpenCLIP or Hugging Face CLIP checkpoint."
        ) from None


def vision_fields(sd: Mapping[str, torch.Tensor], head_width: int | None = None) -> dict[str, Any]:
    """The `ModelConfig` fields of an OpenAI-named image tower (``visual.*``), which other
    families (XLM-R's OpenCLIP models) share. KeyError when the tower is not there."""
    if "visual.proj" in sd:
        width = sd["visual.conv1.weight"].shape[0]
        head_width = head_width or _WIDE_VISION_HEAD_WIDTHS.get(width, HEAD_WIDTH)
        patch_size = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        return dict(
            image_resolution=patch_size * grid,
            vision_layers=count_blocks(sd, "visual.transformer.resblocks."),
            vision_width=width,
            vision_patch_size=patch_size,
            vision_heads=width // head_width,
        )
    width = sd["visual.layer1.0.conv1.weight"].shape[0]
    grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    return dict(
        image_resolution=grid * 32,  # the ResNet downsamples by 32
        vision_layers=tuple(count_blocks(sd, f"visual.layer{stage}.") for stage in (1, 2, 3, 4)),
        vision_width=width,
        vision_patch_size=None,
        vision_heads=width * 32 // (head_width or HEAD_WIDTH),  # the attention pool runs on width * 32 channels
    )


def count_blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({key[len(prefix) :].split(".")[0] for key in sd if key.startswith(prefix)})


def check_towers(towers: str) -> None:
    if towers not in TOWERS:
        raise ValueError(f"towers must be one of {TOWERS}, not {towers!r}")


# --- building blocks -------------------------------------------------------------------------


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the model's dtype: fp16 statistics overflow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention on batch-first tensors.

    Its parameters carry ``nn.MultiheadAttention``'s names (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj``), which is what CLIP checkpoints hold; the computation goes straight to
    ``scaled_dot_product_attention`` so the causal text mask never has to be materialised.
    """

    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # nn.MultiheadAttention's initialisation, which OpenAI's image tower kept.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        return self.out_proj(attend(qkv, self.heads, self.causal))


class ProjectedAttention(nn.Module):
    """`SelfAttention` whose two projections are other linear layers (``make_linear(weight,
    bias)``: int8 in `clip.cpu`, narrow weights in `clip.weight_only`) around the float
    attention. It keeps no float weights of its own, so the module it replaces is freed once
    nothing needs it (ViT-B/32: 85 MB of fp32 q/k/v weights)."""

    def __init__(self, attention: SelfAttention, make_linear: Callable[[torch.Tensor, torch.Tensor | None], nn.Module]):
        super().__init__()
        self.heads, self.causal = attention.heads, attention.causal
        self.qkv = make_linear(attention.in_proj_weight, attention.in_proj_bias)
        self.out_proj = make_linear(attention.out_proj.weight, attention.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(attend(self.qkv(x), self.heads, self.causal))


def attend(qkv: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    """Multi-head attention from the fused q/k/v projection ``[N, L, 3W]`` to the heads' outputs
    side by side ``[N, L, W]``, before the output projection. A function of its own so that
    quantised projections (`clip.cpu`) can surround it."""
    batch, length, width = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(batch, length, width)


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm attention and MLP. ``mlp_width`` is 4x the width unless the configuration
    says otherwise (SigLIP's SO400M: 4304 for 1152); ``eps`` is 1e-5 in CLIP, 1e-6 in SigLIP."""

    def __init__(
        self,
        width: int,
        heads: int,
        act_layer: Activation,
        causal: bool = False,
        mlp_width: int | None = None,
        eps: float = 1e-5,
    ):
        super().__init__()
        mlp_width = mlp_width or width * 4
        self.attn = SelfAttention(width, heads, causal)
        self.ln_1 = LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, mlp_width)),
                    ("gelu", act_layer()),
                    ("c_proj", nn.Linear(mlp_width, width)),
                ]
            )
        )
        self.ln_2 = LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        act_layer: Activation,
        causal: bool = False,
        mlp_width: int | None = None,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads, act_layer, causal, mlp_width, eps) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


# --- image towers ----------------------------------------------------------------------------


class VisionTransformer(nn.Module):
    """Patches plus a class token through a Transformer; the class token becomes the embedding."""

    def __init__(
        self,
        resolution: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        act_layer: Activation,
    ):
        super().__init__()
        self.input_resolution = resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty((resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, act_layer)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    @classmethod
    def from_config(cls, config: Any, act_layer: Activation) -> VisionTransformer:
        """The tower a configuration with `ModelConfig`'s ``vision_*`` fields describes."""
        return cls(
            config.image_resolution,
            config.vision_patch_size,
            config.vision_width,
            config.vision_layers,
            config.vision_heads,
            config.embed_dim,
            act_layer,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [N, grid * grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj

    def initialize_parameters(self) -> None:
        std = self.proj.shape[0] ** -0.5
        for parameter in (self.class_embedding, self.positional_embedding, self.proj):
            nn.init.normal_(parameter, std=std)


class Bottleneck(nn.Module):
    """A ResNet bottleneck that downsamples with an average pool instead of a strided conv
    (anti-aliased), on both the main path and the shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Pools a feature map by letting its mean attend to every position (plus itself)."""

    def __init__(self, spatial_dim: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.empty(spatial_dim**2 + 1, embed_dim))
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # [N, H * W, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        batch, _length, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, self.heads, width // self.heads).transpose(1, 2)

        # Only the mean token's output is kept, so only its query is computed.
        out = F.scaled_dot_product_attention(heads(self.q_proj(x[:, :1])), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.c_proj(out.reshape(batch, width))

    def initialize_parameters(self) -> None:
        std = self.c_proj.in_features**-0.5
        nn.init.normal_(self.positional_embedding, std=std)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.c_proj):
            nn.init.normal_(proj.weight, std=std)


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: a three-conv stem with an average pool, anti-aliased bottlenecks, and
    attention pooling in place of the global average pool."""

    def __init__(self, layers: tuple[int, int, int, int], output_dim: int, heads: int, resolution: int, width: int):
        super().__init__()
        self.input_resolution = resolution
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        inplanes = width
        stages = []
        for index, blocks in enumerate(layers):
            planes = width * 2**index
            stage = [Bottleneck(inplanes, planes, stride=1 if index == 0 else 2)]
            stage += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
            inplanes = planes * Bottleneck.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        self.attnpool = AttentionPool2d(resolution // 32, width * 32, heads, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)

    def initialize_parameters(self) -> None:
        self.attnpool.initialize_parameters()
        # Each residual branch starts as the identity.
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in cast("list[Bottleneck]", stage):
                nn.init.zeros_(block.bn3.weight)


# --- the model -------------------------------------------------------------------------------


class SharedSpace(nn.Module):
    """What the models of every family share: an image tower ``visual`` (None in a text-only
    model), a learned log temperature ``logit_scale``, for the sigmoid families a ``logit_bias``,
    and the two logits CLIP's API gives. Subclasses give ``dtype`` and ``encode_text``."""

    visual: nn.Module | None
    logit_scale: nn.Parameter
    config: Any  # the family's configuration dataclass
    context_length: int
    towers: str
    tokenizer: Any = None  # set by `clip.load`

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings, ``[N, embed_dim]``."""
        if self.visual is None:
            raise ValueError("this model was built with towers='text' and cannot encode images")
        return self.visual(image.to(self.dtype))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits_per_image [N_img, N_txt], logits_per_text)``: ``logit_scale.exp()`` times the
        cosine similarities, plus ``logit_bias`` where the model has one. CLIP's are softmax
        logits (compare them within a row); SigLIP's are sigmoid logits (``torch.sigmoid`` of one
        is the probability that that image and that text belong together)."""
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        bias = getattr(self, "logit_bias", None)
        if bias is not None:
            logits_per_image = logits_per_image + bias
        return logits_per_image, logits_per_image.t()

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = 100.0) -> None:
        """Keep the temperature in [1, max_scale], as the paper does after every optimiser step."""
        self.logit_scale.clamp_(0, math.log(max_scale))


class CLIP(SharedSpace):
    """Image and text encoders into one space, plus the learned temperature ``logit_scale``.

    ``towers="text"`` builds no image tower (``visual`` is None) and ``towers="image"`` no text
    tower; the parameters that remain keep the names they have in the full model.
    """

    def __init__(self, config: ModelConfig, towers: Towers = "both"):
        super().__init__()
        check_towers(towers)
        self.config = config
        self.towers = towers
        self.context_length = config.context_length
        act_layer = QuickGELU if config.quick_gelu else nn.GELU

        self.visual: ModifiedResNet | VisionTransformer | None = None
        if towers != "text":
            if isinstance(config.vision_layers, tuple):  # a ResNet's blocks per stage
                self.visual = ModifiedResNet(
                    config.vision_layers,
                    config.embed_dim,
                    config.vision_heads,
                    config.image_resolution,
                    config.vision_width,
                )
            else:
                self.visual = VisionTransformer.from_config(config, act_layer)

        if towers != "image":
            width = config.text_width
            # Allocated, not drawn (nn.Embedding's own init would draw values only to be replaced).
            self.token_embedding = nn.Embedding.from_pretrained(torch.empty(config.vocab_size, width), freeze=False)
            self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
            self.transformer = Transformer(width, config.text_layers, config.text_heads, act_layer, causal=True)
            self.ln_final = LayerNorm(width)
            self.text_projection = nn.Parameter(torch.empty(width, config.embed_dim))

        self.logit_scale = nn.Parameter(torch.full([], math.log(1 / 0.07)))
        # A model built on the meta device is about to be filled from a checkpoint; drawing
        # values there would also import torch._dynamo (PyTorch's meta kernel for normal_
        # needs it), a second or more of start-up for nothing.
        if not self.logit_scale.is_meta:
            self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation, for training from scratch."""
        if self.visual is not None:
            self.visual.initialize_parameters()
        if self.towers == "image":
            return
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in cast("list[ResidualAttentionBlock]", self.transformer.resblocks):
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            fc, proj = cast(nn.Linear, block.mlp.c_fc), cast(nn.Linear, block.mlp.c_proj)
            nn.init.normal_(fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        weight = self.visual.conv1.weight if self.visual is not None else self.token_embedding.weight
        return weight.dtype

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Unnormalised text embeddings, ``[N, embed_dim]``, from token ids ``[N, L <= context_length]``."""
        if self.towers == "image":
            raise ValueError("this model was built with towers='image' and cannot encode text")
        vocab = self.token_embedding.num_embeddings
        if text.numel() and int(text.max()) >= vocab:
            raise ValueError(
                f"token id {int(text.max())} is outside this model's vocabulary of {vocab}: tokenize with the "
                "model's own tokenizer, model.tokenizer(texts), not clip.tokenize"
            )
        # The end-of-text token has the largest id, so argmax finds where each text ends.
        ends = text.argmax(dim=-1)
        # Attention is causal: the padding after the last end-of-text token cannot change the
        # result, so it is cut off. A short query then costs a few tokens instead of 77.
        text = text[:, : int(ends.max()) + 1] if len(text) else text
        x = self.token_embedding(text).to(self.dtype) + self.positional_embedding[: text.shape[1]].to(self.dtype)
        x = self.ln_final(self.transformer(x))
        return x[torch.arange(x.shape[0], device=x.device), ends] @ self.text_projection


def tower_keys(state_dict: Mapping[str, torch.Tensor], towers: Towers) -> list[str]:
    """The keys of a full state dict that a model with only ``towers`` has. Every family keeps
    its image tower under ``visual.``; the scalars of the scoring go with either tower."""
    check_towers(towers)

    def wanted(key: str) -> bool:
        if key in _OPENAI_METADATA_KEYS:
            return False
        if towers == "text":
            return not key.startswith("visual.")
        if towers == "image":
            return key.startswith("visual.") or key in _SCORING_KEYS
        return True

    return [key for key in state_dict if wanted(key)]


def family_of(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Which family's names a state dict uses: "siglip" (timm image tower and open_clip text
    tower), "xlmr" (a Hugging Face XLM-RoBERTa text tower) or "clip" (OpenAI's names)."""
    if "visual.trunk.attn_pool.latent" in state_dict or "text.transformer.resblocks.0.ln_1.weight" in state_dict:
        return "siglip"
    if "text.transformer.embeddings.word_embeddings.weight" in state_dict:
        return "xlmr"
    return "clip"


def build_model(
    state_dict: Mapping[str, torch.Tensor],
    towers: Towers = "both",
    quick_gelu: bool | None = None,
    config: ModelConfig | None = None,
) -> CLIP:
    """A float32 CLIP in eval mode holding ``state_dict``'s weights (`clip.build.build_model`
    builds any family).

    ``quick_gelu=None`` means OpenAI's QuickGELU; OpenCLIP models trained with exact GELU must
    say ``quick_gelu=False``, since the weights cannot tell. A ``config`` (the checkpoint's,
    with head widths the weights cannot show) replaces what the shapes say.
    """
    if config is None:
        config = config_from_state_dict(state_dict, quick_gelu=True if quick_gelu is None else quick_gelu)
    return with_weights(CLIP, config, state_dict, towers)


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What a model's weights become as they are read, so that a float32 copy of the model never
    stands whole beside the converted one (`clip.cpu.conversion`): floating tensors are cast to
    ``dtype`` one at a time, and each module ``sites(model)`` names (its qualified name, with
    what makes its replacement) is swapped for that replacement as soon as its own weights are in.
    """

    dtype: torch.dtype = torch.float32
    sites: Callable[[nn.Module], Mapping[str, Callable[[nn.Module], nn.Module]]] | None = None
    # The model holds the state dict's tensors themselves, not copies: float32 views of a file
    # mapped read-only (`clip.numpy_image.ImageTower.state_dict`), never written.
    shared: bool = False


FLOAT32 = Conversion()


def with_weights(
    model_class: Any,
    config: Any,
    state_dict: Mapping[str, torch.Tensor],
    towers: Towers,
    conversion: Conversion = FLOAT32,
) -> Any:
    """``model_class(config, towers)`` in eval mode, holding the weights of ``state_dict`` for
    those towers, float32 unless ``conversion`` says otherwise."""
    # Built without memory or random initialisation, then handed the checkpoint's tensors
    # (``assign``): materialising the meta tensors first (``to_empty``) would import ~500
    # PyTorch modules, 0.4 s of start-up, only to overwrite them.
    with torch.device("meta"):
        model = model_class(config, towers)
    keys = tower_keys(state_dict, towers)
    trims = _Trims()
    try:
        for name, replacement in (conversion.sites(model) if conversion.sites else {}).items():
            prefix = name + "."
            mine = [key for key in keys if key.startswith(prefix)]
            module = model.get_submodule(name)
            module.load_state_dict(_owned(state_dict, mine, conversion.dtype, trims, len(prefix)), assign=True)
            replace_submodule(model, name, replacement(module))
            keys = [key for key in keys if not key.startswith(prefix)]
        if conversion.shared:
            weights = {key: state_dict[key] for key in keys}
        else:
            weights = _owned(state_dict, keys, conversion.dtype, trims)
        model.load_state_dict(weights, assign=True)
    except RuntimeError as err:
        raise misfit(config) from err
    return model.eval()


def misfit(config: Any) -> CheckpointError:
    """The error of a checkpoint whose weights do not fit the model ``config`` (what they imply)."""
    return CheckpointError(
        f"The weights do not fit a {getattr(config, 'family', 'clip')} model of the shape they imply; "
        "use an unmodified OpenAI, OpenCLIP or Hugging Face checkpoint."
    )


def replace_submodule(model: nn.Module, name: str, replacement: nn.Module) -> None:
    """Put ``replacement`` where the submodule of qualified name ``name`` was."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, replacement)


Replacements = Mapping[type, Callable[[Any], nn.Module]]


def replacement_sites(module: nn.Module, replacements: Replacements, prefix: str = "") -> dict[str, Callable]:
    """The submodules of ``module`` whose exact type ``replacements`` names (qualified names after
    ``prefix``), each with what makes its replacement; none inside another one replaced."""
    sites: dict[str, Callable] = {}
    for name, child in module.named_children():
        make = replacements.get(type(child))
        if make is not None:
            sites[prefix + name] = make
        else:
            sites.update(replacement_sites(child, replacements, f"{prefix}{name}."))
    return sites


def replace_modules(module: nn.Module, replacements: Replacements) -> None:
    """Replace, in place, each submodule `replacement_sites` finds."""
    for name, make in replacement_sites(module, replacements).items():
        replace_submodule(module, name, make(module.get_submodule(name)))


_TRIM_EVERY = 64 << 20  # bytes read between two `heap.release_free_memory` (a few ms each)


class _Trims:
    """Hands freed memory back once every `_TRIM_EVERY` bytes a load has read, counted across
    the calls of `_owned` one load makes (an int8 load makes one per layer it quantises)."""

    def __init__(self) -> None:
        self.since = 0

    def read(self, size: int) -> None:
        self.since += size
        if self.since > _TRIM_EVERY:
            # Each tensor read and let go after its copy leaves a hole glibc rarely fills with
            # the next: loading OpenAI's ViT-B/32 image tower peaked ~100 MB higher without this.
            release_free_memory()
            self.since = 0


def _owned(
    state_dict: Mapping[str, torch.Tensor], keys: list[str], dtype: torch.dtype, trims: _Trims, cut: int = 0
) -> dict:
    """Copies the model owns (a checkpoint's tensors may be read-only maps of the file) of
    ``keys``, floating ones in ``dtype`` by way of float32 (the rounding a float32 model converted
    afterwards gets), named without their first ``cut`` characters. Looked up one at a time, so a
    lazy state dict holds one tensor at a time beside the model."""
    weights = {}
    for key in keys:
        value = state_dict[key]
        floating = value.is_floating_point()
        weights[key[cut:]] = value.to(torch.float32).to(dtype, copy=True) if floating else value.clone()
        trims.read(value.nbytes)
    return weights
