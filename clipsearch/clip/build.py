"""A model of any family from a state dict: `CLIP`, `SigLIP` or `XlmrCLIP`, as the weights'
names say (`model.family_of`), configured by the checkpoint where it states its configuration
and by the shapes where it does not."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from clipsearch.clip import siglip, xlmr
from clipsearch.clip.model import (
    CLIP,
    FLOAT32,
    Conversion,
    SharedSpace,
    Towers,
    config_from_state_dict,
    family_of,
    with_weights,
)

_MODELS: dict[str, Any] = {"clip": CLIP, "siglip": siglip.SigLIP, "xlmr": xlmr.XlmrCLIP}


def infer_config(state_dict: Mapping[str, torch.Tensor], quick_gelu: bool | None = None) -> Any:
    """The configuration of a state dict of any family, from its names and shapes alone; for a
    CLIP, ``quick_gelu=None`` means OpenAI's QuickGELU."""
    family = family_of(state_dict)
    if family == "siglip":
        return siglip.config_from_state_dict(state_dict)
    if family == "xlmr":
        return xlmr.config_from_state_dict(state_dict)
    return config_from_state_dict(state_dict, quick_gelu=True if quick_gelu is None else quick_gelu)


def skeleton(config: Any, towers: Towers = "both") -> SharedSpace:
    """The model ``config`` describes, without weights (on the meta device): its modules and the
    shapes of its weights, for what reads a checkpoint without building it (`clip.numpy_image`)."""
    with torch.device("meta"):
        return _MODELS[getattr(config, "family", "clip")](config, towers)


def build_model(
    state_dict: Mapping[str, torch.Tensor],
    towers: Towers = "both",
    quick_gelu: bool | None = None,
    config: Any = None,
    conversion: Conversion = FLOAT32,
) -> SharedSpace:
    """A model in eval mode holding ``state_dict``'s weights, of the family ``config`` (or,
    without one, the state dict's names) says; float32 unless ``conversion`` (`clip.cpu.conversion`)
    converts them as they are read."""
    if config is None:
        config = infer_config(state_dict, quick_gelu)
    return with_weights(_MODELS[getattr(config, "family", "clip")], config, state_dict, towers, conversion)
