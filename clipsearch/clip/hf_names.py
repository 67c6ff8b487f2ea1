"""What the conversions of Hugging Face checkpoints to our names share: q, k and v projections
fused into one, in that order, and the refusal of any weight left under a Hugging Face name."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from clipsearch.errors import CheckpointError


def fuse(parts: Mapping[str, Mapping[str, torch.Tensor]], q: str, k: str, v: str) -> dict[str, torch.Tensor]:
    """``{target: {q: ..., k: ..., v: ...}}`` → ``{target: cat([q, k, v])}``."""
    return {target: torch.cat([pieces[q], pieces[k], pieces[v]]) for target, pieces in parts.items()}


def check_placed(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    unknown = sorted(key for key in state_dict if key.startswith(("text_model.", "vision_model.")))
    if unknown:
        raise CheckpointError(f"{path} has weights clipsearch cannot place, such as {unknown[0]}.")
