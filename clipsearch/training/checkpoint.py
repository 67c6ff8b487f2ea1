"""A run on disk: its output directory is a loadable model directory (``clip.load(DIR)``) plus
the state that resumes the run, the per-epoch metrics and the options it was started with."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from clipsearch.clip.checkpoints import write_model_dir
from clipsearch.clip.model import CLIP
from clipsearch.clip.preprocess import Preprocess
from clipsearch.clip.tokenizer import Tokenizer
from clipsearch.training.options import TrainingError, TrainOptions

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
OPTIONS_FILE = "train_options.json"


def check_output(options: TrainOptions) -> None:
    """Refuse to start a run over another one or over anything else already in its folder (a
    run's checkpoint replaces config.json, model.safetensors and vocab.txt.gz: a model's folder
    named by mistake had lost its vocabulary), or to resume one that is not there."""
    output = options.output
    has_run = (output / STATE_FILE).is_file()
    if options.resume and not has_run:
        raise TrainingError(f"{output} holds no training run to resume; drop --resume to start one.")
    if not options.resume and has_run:
        raise TrainingError(
            f"{output} already holds a training run; pass --resume to continue it or choose another output directory."
        )
    existing = next((p for p in (output, *output.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise TrainingError(f"{existing} is a file; choose a new or empty output directory.")
    if not options.resume and existing == output and any(output.iterdir()):
        raise TrainingError(
            f"{output} is not empty; a run writes a model there, so choose a new or empty output directory "
            "(to fine-tune the model in it, give it as --init)."
        )


def read_state(options: TrainOptions, device: torch.device) -> dict[str, Any]:
    """What `save` stored as ``state`` after the last complete epoch."""
    return torch.load(options.output / STATE_FILE, map_location=device, weights_only=True)


def save(
    options: TrainOptions,
    model: CLIP,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    state: dict[str, Any],
    metrics: dict[str, Any],
) -> None:
    """Write the model directory, then the resume ``state``, then the ``metrics`` line, each
    replacing the previous epoch's only once complete, so a crash leaves a usable checkpoint."""
    out = options.output
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as staging:
        vocab = Path(staging) / "vocab.txt.gz"
        vocab.write_bytes(Path(tokenizer.bpe_path).read_bytes())
        model_dir = write_model_dir(Path(staging) / "model", model, vocab, mean=preprocess.mean, std=preprocess.std)
        for name in ("config.json", "model.safetensors", "vocab.txt.gz"):
            os.replace(model_dir / name, out / name)
        torch.save(state, Path(staging) / STATE_FILE)
        os.replace(Path(staging) / STATE_FILE, out / STATE_FILE)
    with (out / METRICS_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(metrics) + "\n")
    (out / OPTIONS_FILE).write_text(json.dumps(_jsonable(asdict(options)), indent=2) + "\n")


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value for key, value in options.items()}
