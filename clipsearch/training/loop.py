"""Contrastive training of a CLIP on image–caption pairs (`clipsearch train`): the loop, its
step and the evaluation after each epoch.

A batch of N pairs gives an N×N cosine-similarity matrix whose diagonal holds the true pairs;
`clip_loss` is the symmetric cross-entropy over it (`multi_positive_loss` where, as in synthetic
scenes, a caption can be true of several images of the batch). The rest of the package is the
machinery around that step: `data` (where pairs come from), `build` (the model, optimiser and
schedule), `checkpoint` (a directory that both resumes a run and loads with ``clip.load(DIR)``).

Runs are deterministic for a seed on a given machine: model initialisation, shuffling and the
synthetic stream are all seeded, and an epoch's data depends only on the seed and its number,
so a resumed run sees exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from clipsearch.clip.loss import clip_loss, multi_positive_loss
from clipsearch.clip.model import CLIP
from clipsearch.clip.preprocess import Preprocess
from clipsearch.clip.tokenizer import Tokenizer
from clipsearch.training import build, checkpoint, data
from clipsearch.training.options import Precision, TrainingError, TrainOptions, check

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)


@dataclass
class StepInfo:
    epoch: int
    step: int  # global, counted from 1
    total_steps: int
    loss: float
    lr: float
    logit_scale: float


@dataclass
class EpochResult:
    epoch: int  # counted from 1
    step: int
    train_loss: float
    recall: dict[str, float]  # "image_to_text@1", "text_to_image@5", ...
    seconds: float


def train(
    options: TrainOptions,
    on_step: Callable[[StepInfo], None] | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
) -> list[EpochResult]:
    """Run (or continue) a training run; after every epoch ``options.output`` is a loadable
    model directory. Returns the results of the epochs run by this call.

    Nothing is written to ``options.output`` before an epoch is saved: a new model's vocabulary
    waits in a scratch folder, removed however the run ends. Written there first, it had left a
    run that failed, diverged or was interrupted in its first epoch with a folder refused both
    as not empty and as holding no run to resume."""
    check(options)
    checkpoint.check_output(options)
    with tempfile.TemporaryDirectory(prefix="clipsearch-train-") as scratch:
        return _run(options, Path(scratch), on_step, on_epoch)


def _run(
    options: TrainOptions,
    scratch: Path,
    on_step: Callable[[StepInfo], None] | None,
    on_epoch: Callable[[EpochResult], None] | None,
) -> list[EpochResult]:
    torch.manual_seed(options.seed)
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, preprocess, tokenizer = build.model_to_train(options, scratch)
    model.to(device)
    build.lock_towers(model, options)
    train_set, val_set = data.datasets(options, preprocess, tokenizer, model.context_length)

    steps_per_epoch = max(1, len(train_set(0)) // options.batch_size)
    total_steps = steps_per_epoch * options.epochs
    optimizer = build.optimizer(model, options)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, build.warmup_cosine(options.warmup_steps, total_steps))
    autocast_dtype = _autocast_dtype(options.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    start_epoch = 0
    if options.resume:
        state = checkpoint.read_state(options, device)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"]
        if start_epoch >= options.epochs:
            raise TrainingError(
                f"{options.output} has trained {start_epoch} epoch(s) already and --epochs asks for "
                f"{options.epochs}; nothing to do (give --epochs above {start_epoch} to train on)."
            )
        logger.info("resuming %s after epoch %d", options.output, start_epoch)

    results = []
    step = state["step"] if options.resume else 0
    for epoch in range(start_epoch, options.epochs):
        started = time.perf_counter()
        model.train()
        build.keep_locked_towers_in_eval(model, options)
        batches = data.loader(
            train_set(epoch), options, shuffle=options.data is not None, seed=options.seed * 1_000_003 + epoch
        )
        losses = []
        for images, texts, *truth in batches:
            step += 1
            positives = data.positives(*truth).to(device) if truth else None
            loss = _train_step(
                model, images.to(device), texts.to(device), positives, optimizer, scaler, autocast_dtype, options
            )
            schedule.step()
            if not math.isfinite(loss):
                raise _diverged(options, f"the loss became {loss} at step {step}")
            losses.append(loss)
            if on_step is not None:
                lr = float(schedule.get_last_lr()[0])
                on_step(StepInfo(epoch + 1, step, total_steps, loss, lr, model.logit_scale.exp().item()))
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise _diverged(options, f"its weights hold NaN or infinity after epoch {epoch + 1}")
        recall = evaluate(model, data.loader(val_set, options, shuffle=False, seed=0), device, autocast_dtype)
        result = EpochResult(epoch + 1, step, sum(losses) / len(losses), recall, time.perf_counter() - started)
        _save(options, model, preprocess, tokenizer, optimizer, schedule, scaler, result)
        logger.info("epoch %d: loss %.4f, %s", result.epoch, result.train_loss, recall)
        results.append(result)
        if on_epoch is not None:
            on_epoch(result)
    return results


def _diverged(options: TrainOptions, what: str) -> TrainingError:
    """The error for a run that left finite numbers: nothing of it is saved, and a NaN model had
    scored a perfect recall (every comparison with NaN is false, so every rank was 0)."""
    return TrainingError(
        f"The run diverged: {what}. Lower --lr (it is {options.lr:g}) or --grad-clip; the last complete "
        f"epoch saved in {options.output}, if any, is kept."
    )


def _save(
    options: TrainOptions,
    model: CLIP,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    result: EpochResult,
) -> None:
    state = {
        "epoch": result.epoch,
        "step": result.step,
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "scaler": scaler.state_dict(),
    }
    metrics = {
        "epoch": result.epoch,
        "step": result.step,
        "train_loss": result.train_loss,
        "logit_scale": model.logit_scale.exp().item(),
        "seconds": result.seconds,
        **result.recall,
    }
    checkpoint.save(options, model, preprocess, tokenizer, state, metrics)


def _train_step(
    model: CLIP,
    images: torch.Tensor,
    texts: torch.Tensor,
    positives: torch.Tensor | None,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    autocast_dtype: torch.dtype | None,
    options: TrainOptions,
) -> float:
    with _autocast(images.device, autocast_dtype):
        with torch.no_grad() if options.lock_image else nullcontext():
            image_features = model.encode_image(images)
        with torch.no_grad() if options.lock_text else nullcontext():
            text_features = model.encode_text(texts)
        if positives is None:
            loss = clip_loss(image_features.float(), text_features.float(), model.logit_scale)
        else:
            loss = multi_positive_loss(image_features.float(), text_features.float(), model.logit_scale, positives)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], options.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    model.clamp_logit_scale(options.max_logit_scale)
    return loss.item()


@torch.no_grad()
def evaluate(
    model: CLIP, loader: DataLoader, device: torch.device, autocast_dtype: torch.dtype | None = None
) -> dict[str, float]:
    """Recall@k in both directions over the pairs of ``loader``, pair i being the only match."""
    model.eval()
    image_features, text_features = [], []
    with _autocast(device, autocast_dtype):
        for images, texts, *_ in loader:
            image_features.append(model.encode_image(images.to(device)).float())
            text_features.append(model.encode_text(texts.to(device)).float())
    return recall_at_k(torch.cat(image_features), torch.cat(text_features))


def recall_at_k(
    image_features: torch.Tensor, text_features: torch.Tensor, ks: tuple[int, ...] = RECALL_KS
) -> dict[str, float]:
    """The fraction of images whose own text ranks in the top k (and of texts, their image).

    A candidate scoring the same as the true match is ranked above or below it at random: the
    hit counts as the chance it lands in the top k. Counting ties as hits had scored a model
    whose features are all equal (``embed_dim`` 0, or NaN) a perfect 1.0; counting them as
    misses would score it 0, below chance. Without ties this is plain recall."""
    image_features = torch.nn.functional.normalize(image_features, dim=-1)
    text_features = torch.nn.functional.normalize(text_features, dim=-1)
    similarity = image_features @ text_features.t()
    recall = {}
    for direction, sims in (("image_to_text", similarity), ("text_to_image", similarity.t())):
        true = sims.diagonal()[:, None]
        above = (sims > true).sum(dim=1).float()
        below = (sims < true).sum(dim=1).float()
        tied = sims.shape[1] - 1 - above - below  # others neither above nor below, NaN included
        for k in ks:
            recall[f"{direction}@{k}"] = ((k - above) / (tied + 1)).clamp(0, 1).mean().item()
    return recall


def _autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA (bf16 where supported), full fp32 on CPU unless asked."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
