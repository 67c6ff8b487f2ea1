"""Bundled CLIP with the API of OpenAI's `clip` package, so their snippets run unchanged::

    from clipsearch import clip
    model, preprocess = clip.load("ViT-B/32", device=device)
    text = clip.tokenize(["a photo of a cat"]).to(device)

Importing this package does not import torch: the registry and downloads (what `clipsearch
models` needs) stay light, and the model, tokenizer and loss are imported on first use.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipsearch.clip import registry
from clipsearch.clip.registry import available_models
from clipsearch.errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from clipsearch.clip.loss import clip_loss
    from clipsearch.clip.model import CLIP, ModelConfig, Towers, build_model
    from clipsearch.clip.preprocess import Preprocess
    from clipsearch.clip.tokenizer import Tokenizer, tokenize

__all__ = [
    "CLIP",
    "ModelConfig",
    "Preprocess",
    "Tokenizer",
    "available_models",
    "build_model",
    "clip_loss",
    "load",
    "tokenize",
]

log = logging.getLogger(__name__)

_LAZY = {
    "CLIP": "model",
    "ModelConfig": "model",
    "build_model": "model",
    "clip_loss": "loss",
    "Preprocess": "preprocess",
    "Tokenizer": "tokenizer",
    "tokenize": "tokenizer",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def load(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    jit: bool = False,
    towers: Towers = "both",
    download_root: str | Path | None = None,
    *,
    quick_gelu: bool | None = None,
) -> tuple[CLIP, Preprocess]:
    """A model in eval mode and the preprocessing its images need.

    `name_or_path` is a name from `available_models()` (downloaded and checked against its
    SHA-256 on first use) or a checkpoint file or directory in any format `checkpoints` reads.
    The model carries its own tokenizer as `model.tokenizer` (None for an image-only model):
    CLIP's vocabulary, or the one saved with the checkpoint. On CUDA the weights are float16, as
    OpenAI's `load` gives them; elsewhere float32. `quick_gelu` overrides the activation for
    checkpoint files that do not record it (OpenCLIP models trained with exact GELU need False).
    """
    import torch

    from clipsearch.clip.checkpoints import read_checkpoint
    from clipsearch.clip.download import model_path, vocab_path
    from clipsearch.clip.model import build_model
    from clipsearch.clip.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
    from clipsearch.clip.tokenizer import Tokenizer

    if jit:
        raise CheckpointError(
            "jit=True is not supported: clipsearch never runs the TorchScript code inside a checkpoint; "
            "call load() without it."
        )
    entry = registry.find(str(name_or_path))
    if entry is not None:
        path = model_path(entry.name, download_root)
    elif Path(name_or_path).expanduser().exists():
        path = Path(name_or_path).expanduser()
    else:
        raise CheckpointError(
            f"{str(name_or_path)!r} is neither a known model name nor an existing file or directory; "
            f"known models: {', '.join(available_models())}."
        )
    state_dict, info = read_checkpoint(path)

    # An explicit argument wins over the registry, which wins over what the checkpoint says.
    hints = [hint for hint in (quick_gelu, entry and entry.quick_gelu, info.quick_gelu) if hint is not None]
    if not hints:
        log.info("%s does not record its activation; using QuickGELU (pass quick_gelu=False for GELU)", path)
    model = build_model(state_dict, towers=towers, quick_gelu=hints[0] if hints else None)

    model.tokenizer = None
    if towers != "image":
        model.tokenizer = Tokenizer(info.vocab_path or vocab_path())
        if model.tokenizer.vocab_size > model.config.vocab_size:
            raise CheckpointError(
                f"The vocabulary of {path} has {model.tokenizer.vocab_size} tokens but the model embeds only "
                f"{model.config.vocab_size}; the checkpoint and its vocabulary do not belong together."
            )

    device = torch.device(device if device is not None else _default_device())
    model = model.to(device)
    if device.type == "cuda":
        model = model.half()
    mean, std = info.image_mean or CLIP_MEAN, info.image_std or CLIP_STD
    preprocess = Preprocess(model.config.image_resolution, mean, std)
    return model, preprocess


def _default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"
