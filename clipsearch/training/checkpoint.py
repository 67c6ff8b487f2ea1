"""A run on disk: its output directory is a loadable model directory (``clip.load(DIR)``) plus
the state that resumes the run, the per-epoch metrics and the options it was started with."""

from __future__ import annotations

import dataclasses
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
    saved = asdict(options)
    if options.data is not None:  # a resume may run from another folder
        saved["data"] = options.data.resolve()
    (out / OPTIONS_FILE).write_text(json.dumps(_jsonable(saved), indent=2) + "\n")


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value for key, value in options.items()}


# What a resumed run may be given anew: how long it goes on and where it runs. Anything else
# (data, model, batch, rates, seed...) would make it another run than the one saved.
RESUMABLE = ("epochs", "workers", "device")


def resumed_options(output: Path, given: dict[str, Any]) -> TrainOptions:
    """The options the run in ``output`` was saved with, to continue it (``--resume``), with
    those of ``given`` that `RESUMABLE` allows; any other given is refused. A resume had
    ignored the saved options and run on the defaults: another batch size, epoch length and
    schedule, and a wrong step count."""
    path = Path(output) / OPTIONS_FILE
    if not (Path(output) / STATE_FILE).is_file() or not path.is_file():
        raise TrainingError(f"{output} holds no training run to resume; drop --resume to start one.")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TrainingError(f"{path} is not the JSON a run saves ({err}); the run cannot be resumed.") from None
    # The first command again with --resume added gives what was saved: that changes nothing.
    changes = [name for name in given if name not in RESUMABLE and not _same(given[name], saved.get(name))]
    if changes:
        flags = [f"--{name.replace('_', '-')}" for name in changes]
        listed = flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} and {flags[-1]}"
        raise TrainingError(
            f"--resume continues the run saved in {output} with its own options; {listed} would change it "
            f"(drop {'it' if len(flags) == 1 else 'them'}, or start a new run in another folder)."
        )
    fields = {field.name for field in dataclasses.fields(TrainOptions)} - {"output", "resume", "device"}
    kept = {key: value for key, value in saved.items() if key in fields}
    return TrainOptions(**{**kept, **given, "output": Path(output), "resume": True})


def _same(given: Any, saved: Any) -> bool:
    """Whether an option given again is the value the run was saved with (paths as the files they name)."""
    if isinstance(given, Path):
        return isinstance(saved, str) and Path(saved).resolve() == given.resolve()
    return given == saved
