"""Which model family a model reference names, told without loading it (and without torch).

The engine needs this before it has a model: a text query takes the NumPy text tower
(`clip.numpy_text`) only for CLIP, whose tower it implements; SigLIP's and XLM-RoBERTa's text
towers run in torch. A registry entry says its family; a checkpoint on disk is recognised by its
configuration files, or a safetensors file by the names in its header.

What a score means, per family (the engine's scores are cosine similarities for every family):

- "clip": softmax family. Cosines of matching pairs sit around 0.25-0.35 for OpenAI's and
  OpenCLIP's models; only their order within one query means something, and zero-shot
  probabilities are a softmax over the candidate labels.
- "siglip": sigmoid family. ``sigmoid(logit_scale.exp() * cosine + logit_bias)`` is the
  probability that the image and the text belong together, judged on its own: a threshold on
  the cosine is a threshold on that probability, and zero-shot labels are independent yes/no
  answers that need not sum to 1. Cosines are smaller than CLIP's.
- "xlmr": CLIP's scoring with a multilingual text tower.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from clipsearch.clip import registry

FAMILIES = ("clip", "siglip", "xlmr")
SIGMOID_FAMILIES = ("siglip",)


def family(model_ref: str | os.PathLike[str]) -> str:
    """ "clip", "siglip" or "xlmr" for a registry name or a checkpoint path; "clip" for what
    cannot be told without loading (a pickled ``.bin``/``.pt`` file), as such files usually are."""
    entry = registry.find(str(model_ref))
    if entry is not None:
        return entry.family
    path = Path(model_ref).expanduser()
    if path.is_dir():
        return _directory_family(path)
    if path.suffix == ".safetensors":
        return _names_family(_safetensors_names(path))
    return "clip"


def _directory_family(path: Path) -> str:
    openclip = _json(path / "open_clip_config.json")
    if openclip is not None:
        model_cfg = openclip.get("model_cfg", {})
        if model_cfg.get("text_cfg", {}).get("hf_model_name"):
            return "xlmr"
        return "siglip" if "siglip" in str(model_cfg.get("vision_cfg", {}).get("timm_model_name", "")) else "clip"
    config = _json(path / "config.json")
    if config is not None:
        return "siglip" if config.get("model_type") in ("siglip", "siglip2") else str(config.get("family", "clip"))
    weights = path / "open_clip_model.safetensors"
    if weights.is_file():
        return _names_family(_safetensors_names(weights))
    # A hub folder with pickled weights: CLIPs come with CLIP's BPE, the others with tokenizer.json.
    return "xlmr" if (path / "tokenizer.json").is_file() else "clip"


def _names_family(names: list[str]) -> str:
    if any(name.startswith(("visual.trunk.", "text.transformer.resblocks.")) for name in names):
        return "siglip"
    if any(name.startswith("text.transformer.embeddings.") for name in names):
        return "xlmr"
    return "clip"


def _safetensors_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file's header (8-byte length, then JSON)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(length, 100_000_000)))
    except (OSError, ValueError, struct.error):
        return []  # not readable here; loading it will say why
    return [name for name in header if name != "__metadata__"] if isinstance(header, dict) else []


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
