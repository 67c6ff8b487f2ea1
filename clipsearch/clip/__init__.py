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
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from clipsearch.clip import heap, registry
from clipsearch.clip.registry import available_models
from clipsearch.errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from clipsearch.clip.loss import clip_loss
    from clipsearch.clip.model import CLIP, ModelConfig, SharedSpace, Towers, build_model
    from clipsearch.clip.preprocess import Preprocess
    from clipsearch.clip.tokenizer import Tokenizer, tokenize

    Mean = tuple[float, float, float]

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
    precision: str | None = None,
) -> tuple[SharedSpace, Preprocess]:
    """A model in eval mode and the preprocessing its images need.

    `name_or_path` is a name from `available_models()` (downloaded and checked against its
    SHA-256 on first use) or a checkpoint file or directory in any format `checkpoints` reads.
    The model is a `CLIP`, a `SigLIP` or an `XlmrCLIP`, as the weights say; all three have
    `encode_image`, `encode_text` and `model(image, text)` giving two logits, which for SigLIP
    are sigmoid logits (see `model.SharedSpace.forward`). The model carries its own tokenizer as
    `model.tokenizer` (None for an image-only model): CLIP's vocabulary or the one saved with
    the checkpoint, and for SigLIP and XLM-R the checkpoint's ``tokenizer.json``. On CUDA the
    weights are float16, as OpenAI's `load` gives them; elsewhere float32. `quick_gelu`
    overrides a CLIP's activation for checkpoint files that do not record it (OpenCLIP models
    trained with exact GELU need False).

    ``precision`` ("fp32", "bf16", "fp16" or "int8", see `clip.cpu`) converts each weight as it
    is read, so the float32 model never stands whole beside the converted one, and then applies
    on every device; "int8" (the image tower's projections, for the CPU) needs ``device="cpu"``.
    """
    from clipsearch.clip.build import build_model

    if jit:
        raise CheckpointError(
            "jit=True is not supported: clipsearch never runs the TorchScript code inside a checkpoint; "
            "call load() without it."
        )
    device = _checked_device(device)
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"int8 runs on the CPU only, not on {device}")
    opened = open_checkpoint(name_or_path, download_root, quick_gelu=quick_gelu)
    info, entry, path = opened.info, opened.entry, opened.path
    model = build_model(opened.state_dict, towers=towers, config=opened.config, conversion=_conversion(precision))
    preprocess = opened.preprocess()
    del opened  # and with it the state dict
    heap.release_free_memory()  # the buffers each weight was read into
    model.tokenizer = _tokenizer(model, info, entry, path) if towers != "image" else None

    model = model.to(device)
    if device.type == "cuda" and precision is None:
        model = model.half()
    return model, preprocess


class Checkpoint(NamedTuple):
    """A checkpoint opened (`open_checkpoint`): its state dict, whose tensors are read as they
    are looked up where its format allows (safetensors, OpenAI's archives), and what it says."""

    state_dict: Mapping[str, torch.Tensor]
    config: Any
    info: Any
    entry: registry.ModelEntry | None
    path: Path

    def preprocess(self) -> Preprocess:
        """The preprocessing the model's images need."""
        from clipsearch.clip.preprocess import Preprocess

        mean, std, resize_mode = _image_settings(self.config, self.info)
        return Preprocess(self.config.image_resolution, mean, std, resize_mode, self.info.interpolation or "bicubic")


def open_checkpoint(
    name_or_path: str | Path, download_root: str | Path | None = None, *, quick_gelu: bool | None = None
) -> Checkpoint:
    """The checkpoint `load` builds a model from (downloaded on a named model's first use),
    configured; for what reads its weights without building the model (`clip.numpy_image`)."""
    from clipsearch.clip.checkpoints import read_checkpoint
    from clipsearch.clip.download import model_path

    entry = registry.find(str(name_or_path))
    if entry is not None:
        path = model_path(entry.name, download_root)
    elif Path(name_or_path).expanduser().exists():
        path = Path(name_or_path).expanduser()
    else:
        raise CheckpointError(registry.unknown(str(name_or_path)))
    state_dict, info = read_checkpoint(path)
    return Checkpoint(state_dict, _configuration(state_dict, info, entry, quick_gelu, path), info, entry, path)


def _conversion(precision: str | None) -> Any:
    from clipsearch.clip.model import FLOAT32

    if precision is None:
        return FLOAT32
    from clipsearch.clip.cpu import conversion

    return conversion(precision)


def _configuration(
    state_dict: Mapping[str, Any], info: Any, entry: registry.ModelEntry | None, quick_gelu: bool | None, path: Path
) -> Any:
    """The model's configuration: the checkpoint's own, else what its weights show; for a CLIP
    the activation an explicit argument, else the registry, else the checkpoint names."""
    import dataclasses

    from clipsearch.clip.build import infer_config

    config = info.config if info.config is not None else infer_config(state_dict)
    if getattr(config, "family", "clip") == "clip":
        hints = [hint for hint in (quick_gelu, entry and entry.quick_gelu, info.quick_gelu) if hint is not None]
        if not hints:
            _warn_activation_unknown(path)
        config = dataclasses.replace(config, quick_gelu=hints[0] if hints else True)
    elif entry is not None and entry.image_size and info.config is None:
        # The weights fix the patch grid, not always the image size (14 px patches: 378 or 384).
        config = dataclasses.replace(config, image_resolution=entry.image_size)
    return config


_WARNED_ACTIVATION: set[Path] = set()


def _warn_activation_unknown(path: Path) -> None:
    """Warn, once per file and process (a CLI run opens a checkpoint for each tower it reads),
    that the file is run with QuickGELU on a guess: an OpenCLIP file trained with exact GELU,
    given alone, gave quietly wrong vectors, the one hint an info line shown only with -v."""
    if path not in _WARNED_ACTIVATION:
        _WARNED_ACTIVATION.add(path)
        log.warning(
            "%s does not record its activation, so it runs with QuickGELU, as OpenAI's models do; if it is an "
            "OpenCLIP model trained with exact GELU, give the folder holding its open_clip_config.json instead "
            "(in the library: quick_gelu=False)",
            path,
        )


def _tokenizer(model: Any, info: Any, entry: registry.ModelEntry | None, path: Path) -> Any:
    """CLIP's BPE (or the checkpoint's own vocabulary) for a CLIP; for the other families the
    ``tokenizer.json`` beside the weights, else the one the registry keeps elsewhere."""
    from clipsearch.clip.download import tokenizer_dir, vocab_path
    from clipsearch.clip.text_tokenizers import HFTokenizer
    from clipsearch.clip.tokenizer import Tokenizer

    family = getattr(model.config, "family", "clip")
    if family == "clip":
        tokenizer: Any = Tokenizer(info.vocab_path or vocab_path(), model.context_length)
    else:
        directory = info.tokenizer_dir or (tokenizer_dir(entry) if entry is not None else None)
        if directory is None:
            raise CheckpointError(
                f"{path} has no tokenizer.json beside the weights, which a {family} model needs; "
                "put the tokenizer files of its hub repository there."
            )
        clean = info.text_clean or ("canonicalize" if family == "siglip" else "whitespace")
        tokenizer = HFTokenizer(directory, model.context_length, clean)
    check_vocabulary(path, tokenizer.vocab_size, model.config.vocab_size)
    return tokenizer


def check_vocabulary(path: Any, tokens: int, embedded: int) -> None:
    """`CheckpointError` for a vocabulary with ids the model has no embedding for (a bare weights
    file of a model trained with its own vocabulary, read with CLIP's): they fail in its text tower."""
    if tokens > embedded:
        raise CheckpointError(
            f"The vocabulary of {path} has {tokens} tokens but the model embeds only "
            f"{embedded}; the checkpoint and its vocabulary do not belong together."
        )


def _image_settings(config: Any, info: Any) -> tuple[Mean, Mean, str]:
    """Mean, std and resize mode (`preprocess.RESIZE_MODES`): the checkpoint's, else its family's."""
    from clipsearch.clip.preprocess import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD

    siglip = getattr(config, "family", "clip") == "siglip"
    mean = info.image_mean or (SIGLIP_MEAN if siglip else CLIP_MEAN)
    std = info.image_std or (SIGLIP_STD if siglip else CLIP_STD)
    return mean, std, info.resize_mode or ("squash" if siglip else "shortest")


def _checked_device(device: str | torch.device | int | None) -> torch.device:
    """The device `load` puts the model on, checked before the checkpoint is read: a device this
    machine lacks ("cuda" without a GPU) or a name torch does not know ("gpu") failed in torch
    only once the whole checkpoint had been read, with torch's message."""
    import torch

    if device is None:
        return torch.device(_default_device())
    try:
        chosen: torch.device | None = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        chosen = None
    if chosen is None or not _present(chosen):
        here = ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
        here += ["mps"] if torch.backends.mps.is_available() else []
        raise ValueError(f"device {device!r} is not one this machine has; it has {', '.join(here)}")
    return chosen


def _present(device: torch.device) -> bool:
    """Whether this machine has ``device`` (the meta device, shapes without data, is everywhere)."""
    import torch

    if device.type in ("cpu", "meta"):
        return True
    count = getattr(getattr(torch, device.type, None), "device_count", None)  # torch.cuda, torch.mps, ...
    return count is not None and (device.index or 0) < count()


def _default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"
