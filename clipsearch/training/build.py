"""What a run starts from: the model (a preset or ``config.json`` with new weights and a BPE
vocabulary learned from the run's own captions, or anything ``clip.load`` accepts, to fine-tune),
its frozen towers, and the optimiser with its schedule."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from clipsearch import clip
from clipsearch.clip.bpe_train import train_bpe, write_vocab
from clipsearch.clip.model import CLIP, ModelConfig
from clipsearch.clip.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
from clipsearch.clip.tokenizer import Tokenizer
from clipsearch.training.data import read_text, vocabulary_captions
from clipsearch.training.options import TrainingError, TrainOptions

# Architectures for training from scratch. The vocabulary size comes from the learned BPE, and
# the head counts from the widths: checkpoints do not store them, and every CLIP loader assumes
# 64-dimensional heads.
PRESETS: dict[str, dict[str, Any]] = {
    # The bundled `demo` model: a small ResNet, whose convolutions see a shape alike at any
    # place and (nearly) any size, where a ViT this small trained for minutes on two CPU cores
    # learned shapes only where its patches cut them the same way.
    "demo": dict(
        embed_dim=128,
        image_resolution=64,
        vision_layers=(2, 2, 2, 2),
        vision_width=24,
        vision_patch_size=None,
        context_length=32,
        text_width=128,
        text_layers=2,
    ),
    # For tests: learns something within a few hundred steps of a few seconds each.
    "tiny": dict(
        embed_dim=64,
        image_resolution=48,
        vision_layers=2,
        vision_width=64,
        vision_patch_size=16,
        context_length=32,
        text_width=64,
        text_layers=1,
    ),
}
_HEAD_WIDTH = 64
# OpenAI's token embeddings start at std 0.02, beside positional embeddings at 0.01, so (we
# think) a new text tower first sees a word at each position almost as a different word and has
# to learn what "circle" means once per caption template. Starting them 50 times larger than the
# positional ones lets a word mean the same wherever it stands until order is learned. Measured
# on the demo recipe: loss 0.99 after 500 steps against 2.12 with OpenAI's initialisation, which
# had not learned shapes at all by then.
_TOKEN_EMBEDDING_STD = 0.5


def model_to_train(options: TrainOptions, scratch: Path) -> tuple[CLIP, Preprocess, Tokenizer]:
    """The model to train (in fp32, on the CPU), its preprocessing and its tokenizer. A new
    model's vocabulary is written to ``scratch``, a folder that must outlive the run (its
    checkpoints copy it), not to the output, which holds nothing until an epoch is saved."""
    init = str(options.output) if options.resume else options.init
    if init is not None:
        return _loaded(init)

    config = _config_dict(options.config or "demo")
    captions = vocabulary_captions(options)
    vocab_path = scratch / "vocab.txt.gz"
    write_vocab(train_bpe(captions, options.bpe_merges), vocab_path)
    tokenizer = Tokenizer(vocab_path)
    model = CLIP(ModelConfig.from_dict({**config, "vocab_size": tokenizer.vocab_size}))
    with torch.no_grad():
        torch.nn.init.normal_(model.token_embedding.weight, std=_TOKEN_EMBEDDING_STD)
    return model, Preprocess(model.config.image_resolution, CLIP_MEAN, CLIP_STD), tokenizer


def _loaded(name_or_path: str) -> tuple[CLIP, Preprocess, Tokenizer]:
    """A model to fine-tune or resume, in fp32: one loaded for CUDA inference comes in fp16."""
    model, preprocess = clip.load(name_or_path, device="cpu")
    model.float()
    if not isinstance(model, CLIP):
        raise TrainingError(f"{name_or_path} is not a CLIP (training other families is not supported yet)")
    assert isinstance(model.tokenizer, Tokenizer)  # clip.load gives one with every text tower
    return model, preprocess, model.tokenizer


def _config_dict(name_or_path: str) -> dict[str, Any]:
    """The architecture to build, without vocabulary size."""
    if name_or_path in PRESETS:
        config: dict[str, Any] = dict(PRESETS[name_or_path])
    elif Path(name_or_path).is_file():
        config = _read_config(Path(name_or_path))
        _check_sizes(config, name_or_path)
    else:
        raise TrainingError(f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file.")
    for tower in ("vision", "text"):
        width = config.get(f"{tower}_width", 0)
        if tower == "vision" and isinstance(config.get("vision_layers"), (list, tuple)):
            width *= 32  # a ResNet's attention pool runs on 32 times its stem width
        if width % _HEAD_WIDTH:
            raise TrainingError(
                f"{tower}_width is {width}; use a multiple of {_HEAD_WIDTH}, the width of CLIP's heads."
            )
        config[f"{tower}_heads"] = width // _HEAD_WIDTH
    return config


def _read_config(path: Path) -> dict[str, Any]:
    """The sizes a config.json gives; one that is not JSON or misses a size is refused naming
    it (it had surfaced as a JSONDecodeError or a TypeError, reported as a bug)."""
    try:
        raw = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise TrainingError(f"{path} is not JSON ({err.msg}, line {err.lineno} column {err.colno}).") from None
    if not isinstance(raw, dict):
        raise TrainingError(f"{path} is not a JSON object of a model's sizes.")
    given = {f.name: f for f in dataclasses.fields(ModelConfig)}
    wanted = [name for name in given if name not in ("vocab_size", "vision_heads", "text_heads")]
    required = [n for n in wanted if given[n].default is dataclasses.MISSING]
    missing = [name for name in required if name not in raw]
    if missing:
        raise TrainingError(f"{path} misses {', '.join(missing)}; a config.json gives every size of the model.")
    return {k: v for k, v in raw.items() if k in wanted}


def _check_sizes(config: dict[str, Any], source: str) -> None:
    """Refuse sizes no model can have: a zero ``embed_dim`` had built, trained and scored a
    perfect recall, every feature being the same empty vector."""

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    for name in ("embed_dim", "image_resolution", "vision_width", "context_length", "text_width", "text_layers"):
        if name in config and not whole(config[name]):
            raise TrainingError(f"{source}: {name} must be a whole number above 0, not {config[name]!r}.")
    layers = config.get("vision_layers", 1)
    resnet = isinstance(layers, list | tuple)
    if not (whole(layers) or (resnet and len(layers) == 4 and all(whole(n) for n in layers))):
        raise TrainingError(
            f"{source}: vision_layers must be a whole number above 0 or four of them (a ResNet's stages), "
            f"not {layers!r}."
        )
    if resnet:
        return
    patch: Any = config.get("vision_patch_size")
    if not whole(patch):
        raise TrainingError(f"{source}: vision_patch_size must be a whole number above 0, not {patch!r}.")
    resolution: Any = config.get("image_resolution")
    if whole(resolution) and resolution % patch:
        raise TrainingError(f"{source}: image_resolution is {resolution}, not a multiple of vision_patch_size {patch}.")


def lock_towers(model: CLIP, options: TrainOptions) -> None:
    """Freeze a tower, as LiT does: its weights stay as loaded and it gets no gradients."""
    for name, parameter in model.named_parameters():
        image_part = name.startswith("visual.")
        if (options.lock_image and image_part) or (options.lock_text and not image_part and name != "logit_scale"):
            parameter.requires_grad_(False)


def keep_locked_towers_in_eval(model: CLIP, options: TrainOptions) -> None:
    """Put a locked image tower back in eval mode after ``model.train()``: a locked ResNet's
    batch-norm statistics must not drift either."""
    if options.lock_image and model.visual is not None:
        model.visual.eval()


def optimizer(model: CLIP, options: TrainOptions) -> torch.optim.AdamW:
    """AdamW with weight decay only on weight matrices: decaying gains, biases, embeddings and
    the temperature pulls them towards zero for no benefit (as in CLIP's paper)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_matrix = parameter.ndim >= 2 and "embedding" not in name
        (decay if is_matrix else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": options.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=options.lr, betas=(0.9, 0.98), eps=1e-6)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of a step: linear warmup, then a cosine down to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
