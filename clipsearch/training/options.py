"""What a training run is asked to do, and the checks that refuse a run before any work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from clipsearch.errors import ClipsearchError
from clipsearch.training.scenes import HARD_NEGATIVES

Precision = Literal["auto", "fp32", "fp16", "bf16"]


class TrainingError(ClipsearchError):
    """Training cannot start as asked (missing data, bad options, nothing to resume)."""


@dataclass
class TrainOptions:
    output: Path
    data: Path | None = None  # None: synthetic scenes
    config: str | None = None  # preset name or config.json path; with neither this nor init: "demo"
    init: str | None = None  # fine-tune from anything clip.load accepts
    epochs: int = 10
    batch_size: int = 128
    samples_per_epoch: int = 20_000  # synthetic scenes only; files are one pass per epoch
    hard_negatives: int = 3  # synthetic scenes only: changed copies of each scene in its batch (0-3)
    single_object_epochs: int = 0  # synthetic scenes only: first epochs with one object per scene
    scene_style: str = "mixed"  # synthetic scenes only: one of scenes.STYLES
    val_size: int = 1_000  # held-out pairs
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100
    grad_clip: float = 1.0
    max_logit_scale: float = 100.0
    bpe_merges: int = 400
    seed: int = 0
    workers: int = 0
    device: str | None = None  # None: CUDA when present
    precision: Precision = "auto"
    lock_image: bool = False
    lock_text: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        self.data = None if self.data is None else Path(self.data)


def check(options: TrainOptions) -> None:
    """Raise `TrainingError` for options that contradict each other or name missing data."""
    if options.config and options.init:
        raise TrainingError("Give either --config (train from scratch) or --init (fine-tune), not both.")
    # A negative clip norm had turned every step uphill, and NaN or a negative rate trained nothing.
    for flag, value in (("--lr", options.lr), ("--grad-clip", options.grad_clip)):
        if not (math.isfinite(value) and value > 0):
            raise TrainingError(f"{flag} must be a number above 0, not {value}.")
    if not (math.isfinite(options.weight_decay) and options.weight_decay >= 0):
        raise TrainingError(f"--weight-decay must be a number of 0 or more, not {options.weight_decay}.")
    if options.lock_image and options.lock_text:
        raise TrainingError("Locking both towers leaves nothing to train; drop --lock-image or --lock-text.")
    if options.data is not None and not options.data.exists():
        raise TrainingError(f"There is no training data at {options.data}; give a CSV, JSONL or image folder.")
    if options.data is None and not 0 <= options.hard_negatives <= HARD_NEGATIVES:
        raise TrainingError(f"--hard-negatives must be between 0 and {HARD_NEGATIVES}.")
    if options.data is None and options.samples_per_epoch < options.hard_negatives + 1:
        raise TrainingError(
            f"--samples-per-epoch must be at least {options.hard_negatives + 1} (hard negatives + 1): "
            "an epoch holds whole groups of a scene and its negatives."
        )
    if options.data is None and options.batch_size % (options.hard_negatives + 1):
        raise TrainingError(
            f"The batch size must be a multiple of {options.hard_negatives + 1} (hard negatives + 1), "
            "so that every scene meets its negatives in the same batch."
        )
