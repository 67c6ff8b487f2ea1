"""Contrastive training of a CLIP on image–caption pairs (`clipsearch train`).

A batch of N pairs gives an N×N cosine-similarity matrix whose diagonal holds the true pairs;
`clip_loss` is the symmetric cross-entropy over it. Everything else here is the machinery
around that step: where pairs come from, the optimiser and schedule, evaluation on a held-out
split, and checkpoints that both resume a run and load with ``clip.load(DIR)``.

Pairs come from a CSV or JSONL file of ``path,caption``, a folder of images with same-named
``.txt`` captions, or (with no data given) the synthetic scenes of `clipsearch.training.scenes`, drawn
fresh every step. A run starts from a named architecture preset or a ``config.json`` (new
weights, and a BPE vocabulary learned from the run's own captions) or fine-tunes any model
``clip.load`` accepts.

Runs are deterministic for a seed on a given machine: model initialisation, shuffling and the
synthetic stream are all seeded, and an epoch's data depends only on the seed and its number,
so a resumed run sees exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset

from clipsearch.clip.bpe_train import train_bpe, write_vocab
from clipsearch.clip.checkpoints import write_model_dir
from clipsearch.clip.loss import clip_loss, multi_positive_loss
from clipsearch.clip.model import CLIP, ModelConfig
from clipsearch.clip.preprocess import CLIP_MEAN, CLIP_STD, Preprocess, open_image
from clipsearch.clip.tokenizer import Tokenizer
from clipsearch.errors import ClipsearchError
from clipsearch.training.scenes import SceneGenerator

logger = logging.getLogger(__name__)

# Architectures for training from scratch. The vocabulary size comes from the learned BPE, and
# the head counts from the widths: checkpoints do not store them, and every CLIP loader assumes
# 64-dimensional heads.
PRESETS: dict[str, dict] = {
    # The bundled `demo` model: small enough to train on two CPU cores in half an hour.
    "demo": dict(
        embed_dim=128,
        image_resolution=48,
        vision_layers=4,
        vision_width=128,
        vision_patch_size=16,
        context_length=32,
        text_width=64,
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
STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
RECALL_KS = (1, 5, 10)
_HEAD_WIDTH = 64
_BPE_SAMPLE = 20_000  # captions the vocabulary is learned from
_BPE_SCENES = 1_000  # synthetic scenes whose captions the vocabulary is learned from: every word occurs
# OpenAI's token embeddings start at std 0.02, beside positional embeddings at 0.01, so (we
# think) a new text tower first sees a word at each position almost as a different word and has
# to learn what "circle" means once per caption template. Starting them 50 times larger than the
# positional ones lets a word mean the same wherever it stands until order is learned. Measured
# on the demo recipe: loss 0.99 after 500 steps against 2.12 with OpenAI's initialisation, which
# had not learned shapes at all by then.
_TOKEN_EMBEDDING_STD = 0.5
_MAX_NEGATIVES = 3  # distinct hard negatives a scene is guaranteed to have
_SCENE_CAPTION_PROB = 0.3  # otherwise a paraphrase: queries are often shorter than captions

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
    model directory. Returns the results of the epochs run by this call."""
    _check_options(options)
    torch.manual_seed(options.seed)
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, preprocess, tokenizer, mean, std = _build(options)
    model.to(device)
    _lock_towers(model, options)
    train_set, val_set = _datasets(options, preprocess, tokenizer, model.context_length)

    steps_per_epoch = max(1, len(train_set(0)) // options.batch_size)
    total_steps = steps_per_epoch * options.epochs
    optimizer = _optimizer(model, options)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(options.warmup_steps, total_steps))
    autocast_dtype = _autocast_dtype(options.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    start_epoch = 0
    if options.resume:
        state = torch.load(options.output / STATE_FILE, map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"]
        logger.info("resuming %s after epoch %d", options.output, start_epoch)

    results = []
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, options.epochs):
        started = time.perf_counter()
        model.train()
        _keep_locked_towers_in_eval(model, options)
        loader = _loader(
            train_set(epoch), options, shuffle=options.data is not None, seed=options.seed * 1_000_003 + epoch
        )
        losses = []
        for images, texts, *truth in loader:
            step += 1
            positives = _positives(*truth).to(device) if truth else None
            loss = _train_step(
                model, images.to(device), texts.to(device), positives, optimizer, scaler, autocast_dtype, options
            )
            schedule.step()
            losses.append(loss)
            if on_step is not None:
                on_step(
                    StepInfo(
                        epoch + 1, step, total_steps, loss, schedule.get_last_lr()[0], model.logit_scale.exp().item()
                    )
                )
        recall = evaluate(model, _loader(val_set, options, shuffle=False, seed=0), device, autocast_dtype)
        result = EpochResult(epoch + 1, step, sum(losses) / len(losses), recall, time.perf_counter() - started)
        _save(options, model, tokenizer, mean, std, optimizer, schedule, scaler, result)
        logger.info("epoch %d: loss %.4f, %s", result.epoch, result.train_loss, recall)
        results.append(result)
        if on_epoch is not None:
            on_epoch(result)
    return results


# --- evaluation ------------------------------------------------------------------------------


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
    """The fraction of images whose own text ranks in the top k (and of texts, their image)."""
    image_features = torch.nn.functional.normalize(image_features, dim=-1)
    text_features = torch.nn.functional.normalize(text_features, dim=-1)
    similarity = image_features @ text_features.t()
    recall = {}
    for direction, sims in (("image_to_text", similarity), ("text_to_image", similarity.t())):
        # Rank of the true match: how many candidates score strictly higher.
        ranks = (sims > sims.diagonal()[:, None]).sum(dim=1)
        for k in ks:
            recall[f"{direction}@{k}"] = (ranks < k).float().mean().item()
    return recall


# --- model, vocabulary, optimiser --------------------------------------------------------------


def _check_options(options: TrainOptions) -> None:
    if options.config and options.init:
        raise TrainingError("Give either --config (train from scratch) or --init (fine-tune), not both.")
    if options.lock_image and options.lock_text:
        raise TrainingError("Locking both towers leaves nothing to train; drop --lock-image or --lock-text.")
    if options.data is not None and not options.data.exists():
        raise TrainingError(f"There is no training data at {options.data}; give a CSV, JSONL or image folder.")
    if options.data is None and not 0 <= options.hard_negatives <= _MAX_NEGATIVES:
        raise TrainingError(f"--hard-negatives must be between 0 and {_MAX_NEGATIVES}.")
    if options.data is None and options.batch_size % (options.hard_negatives + 1):
        raise TrainingError(
            f"The batch size must be a multiple of {options.hard_negatives + 1} (hard negatives + 1), "
            "so that every scene meets its negatives in the same batch."
        )
    has_state = (options.output / STATE_FILE).is_file()
    if options.resume and not has_state:
        raise TrainingError(f"{options.output} holds no training run to resume; drop --resume to start one.")
    if not options.resume and has_state:
        raise TrainingError(
            f"{options.output} already holds a training run; pass --resume to continue it "
            "or choose another output directory."
        )


def _build(options: TrainOptions) -> tuple[CLIP, Preprocess, Tokenizer, tuple, tuple]:
    """The model to train, its preprocessing, tokenizer and normalisation constants."""
    init = str(options.output) if options.resume else options.init
    if init is not None:
        from clipsearch import clip

        model, preprocess = clip.load(init, device="cpu")
        model.float()  # a model loaded for CUDA inference comes in fp16; train in fp32
        return model, preprocess, model.tokenizer, preprocess.mean, preprocess.std

    config = _config_dict(options.config or "demo")
    captions = _captions_for_vocabulary(options)
    options.output.mkdir(parents=True, exist_ok=True)
    vocab_path = options.output / "vocab.txt.gz"
    write_vocab(train_bpe(captions, options.bpe_merges), vocab_path)
    tokenizer = Tokenizer(vocab_path)
    model = CLIP(ModelConfig.from_dict({**config, "vocab_size": tokenizer.vocab_size}))
    with torch.no_grad():
        torch.nn.init.normal_(model.token_embedding.weight, std=_TOKEN_EMBEDDING_STD)
    preprocess = Preprocess(model.config.image_resolution, CLIP_MEAN, CLIP_STD)
    return model, preprocess, tokenizer, CLIP_MEAN, CLIP_STD


def _config_dict(name_or_path: str) -> dict:
    """The architecture to build, without vocabulary size."""
    if name_or_path in PRESETS:
        config = dict(PRESETS[name_or_path])
    elif Path(name_or_path).is_file():
        fields = set(ModelConfig.__dataclass_fields__) - {"vocab_size", "vision_heads", "text_heads"}
        config = {k: v for k, v in json.loads(Path(name_or_path).read_text(encoding="utf-8")).items() if k in fields}
    else:
        raise TrainingError(f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file.")
    for tower in ("vision", "text"):
        width = config.get(f"{tower}_width", 0)
        if width % _HEAD_WIDTH:
            raise TrainingError(
                f"{tower}_width is {width}; use a multiple of {_HEAD_WIDTH}, the width of CLIP's heads."
            )
        config[f"{tower}_heads"] = width // _HEAD_WIDTH
    return config


def _captions_for_vocabulary(options: TrainOptions) -> list[str]:
    if options.data is None:
        scenes = SceneGenerator(options.seed, resolution=8)  # captions do not depend on the resolution
        return [caption for i in range(_BPE_SCENES) for caption in scenes[i].captions]
    return [caption for _, caption in read_pairs(options.data)[:_BPE_SAMPLE]]


def _lock_towers(model: CLIP, options: TrainOptions) -> None:
    """Freeze a tower, as LiT does: its weights stay as loaded and it gets no gradients."""
    for name, parameter in model.named_parameters():
        image_part = name.startswith("visual.")
        if (options.lock_image and image_part) or (options.lock_text and not image_part and name != "logit_scale"):
            parameter.requires_grad_(False)


def _keep_locked_towers_in_eval(model: CLIP, options: TrainOptions) -> None:
    # A locked ResNet's batch-norm statistics must not drift either.
    if options.lock_image and model.visual is not None:
        model.visual.eval()


def _optimizer(model: CLIP, options: TrainOptions) -> torch.optim.AdamW:
    """AdamW with weight decay only on weight matrices: decaying gains, biases, embeddings and
    the temperature pulls them towards zero for no benefit (as in CLIP's paper)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_matrix = parameter.ndim >= 2 and "embedding" not in name
        (decay if is_matrix else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": options.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=options.lr, betas=(0.9, 0.98), eps=1e-6)


def _warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA (bf16 where supported), full fp32 on CPU unless asked."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _positives(captions: list[str], described: list[str]) -> torch.Tensor:
    """``[i, j]``: caption j is among image i's captions (which ``described`` joins with newlines)."""
    truths = [set(text.split("\n")) for text in described]
    return torch.tensor([[caption in truth for caption in captions] for truth in truths])


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


# --- data ------------------------------------------------------------------------------------


def read_pairs(path: str | Path) -> list[tuple[Path, str]]:
    """Image paths and captions from a CSV (columns ``path`` and ``caption``), a JSONL file
    (objects with those keys) or a folder of images with same-named ``.txt`` captions.
    Relative paths are relative to the file that lists them."""
    path = Path(path)
    if path.is_dir():
        pairs = [
            (image, image.with_suffix(".txt").read_text(encoding="utf-8").strip())
            for image in sorted(path.rglob("*"))
            if image.suffix.lower() in _IMAGE_SUFFIXES and image.with_suffix(".txt").is_file()
        ]
    elif path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        pairs = [(path.parent / row["path"], row["caption"]) for row in rows if "path" in row and "caption" in row]
    elif path.suffix.lower() in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        pairs = [(path.parent / row["path"], row["caption"]) for row in rows if "path" in row and "caption" in row]
    else:
        raise TrainingError(f"{path} is not a CSV, JSONL or folder; give image–caption pairs in one of those.")
    if not pairs:
        raise TrainingError(
            f"No image–caption pairs found in {path}; a CSV or JSONL needs 'path' and 'caption' "
            "fields, a folder needs images with same-named .txt files."
        )
    return pairs


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class PairDataset(Dataset):
    def __init__(
        self, pairs: list[tuple[Path, str]], preprocess: Preprocess, tokenizer: Tokenizer, context_length: int
    ):
        self.pairs = pairs
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, caption = self.pairs[index]
        text = self.tokenizer(caption, context_length=self.context_length, truncate=True)[0]
        return self.preprocess(open_image(path)), text


class SceneDataset(Dataset):
    """Synthetic scenes ``start .. start + count - 1`` of a generator, each with one caption.

    For training, ``negatives`` hard negatives follow each scene (items ``g * k`` to
    ``g * k + g - 1``, with ``g = negatives + 1``, are scene ``k`` and its negatives), so a
    batch holds groups that differ in one respect only. Each item's caption is the detailed one
    or a paraphrase (chosen by the item's index, so the stream is deterministic), never a
    paraphrase that also describes another member of its group: the group is there to teach
    what tells its members apart. ``negatives=None`` gives plain scenes with their detailed
    captions, for evaluation.
    """

    def __init__(
        self,
        generator: SceneGenerator,
        start: int,
        count: int,
        preprocess: Preprocess,
        tokenizer: Tokenizer,
        context_length: int,
        negatives: int | None,
    ):
        self.generator = generator
        self.start = start
        self.count = count
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.negatives = negatives

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple:
        """``(image, tokens)`` for evaluation; for training also the caption and all captions
        true of the image (joined by newlines), from which the loss finds every true pair."""
        index += self.start
        if self.negatives is None:
            scene = self.generator[index]
            return self.preprocess(scene.image), self._tokens(scene.caption)
        base, member = divmod(index, self.negatives + 1)
        scene = self.generator[base] if member == 0 else self.generator.hard_negative(base, member - 1)
        caption = scene.caption
        rng = random.Random(f"caption:{self.generator.seed}:{index}")
        if rng.random() >= _SCENE_CAPTION_PROB:
            others = {c for m in range(self.negatives + 1) if m != member for c in self._captions(base, m)}
            caption = rng.choice([c for c in scene.paraphrases if c not in others] or [caption])
        return self.preprocess(scene.image), self._tokens(caption), caption, "\n".join(scene.captions)

    def _tokens(self, caption: str) -> torch.Tensor:
        return self.tokenizer(caption, context_length=self.context_length, truncate=True)[0]

    def _captions(self, base: int, member: int) -> tuple[str, ...]:
        return self.generator.captions(base, None if member == 0 else member - 1)


def _datasets(
    options: TrainOptions, preprocess: Preprocess, tokenizer: Tokenizer, context_length: int
) -> tuple[Callable[[int], Dataset], Dataset]:
    """A function from epoch to that epoch's training set, and the held-out set."""
    if options.data is None:
        # Training reads scenes 0, 1, 2, ... of the seed (and their hard negatives); the
        # held-out scenes are the negative indices, which that stream never reaches.
        # A curriculum: shapes are learned many times faster from one-object scenes, and once
        # learned they carry over to scenes of several objects.
        scenes = SceneGenerator(options.seed, preprocess.resolution)
        singles = SceneGenerator(options.seed, preprocess.resolution, single_objects=True)
        group = options.hard_negatives + 1
        n = options.samples_per_epoch - options.samples_per_epoch % group  # a group stays in one epoch
        val = SceneDataset(scenes, -options.val_size, options.val_size, preprocess, tokenizer, context_length, None)

        def train_set(epoch: int) -> Dataset:
            generator = singles if epoch < options.single_object_epochs else scenes
            return SceneDataset(generator, epoch * n, n, preprocess, tokenizer, context_length, options.hard_negatives)

        return train_set, val

    pairs = read_pairs(options.data)
    random.Random(options.seed).shuffle(pairs)
    val_size = min(options.val_size, len(pairs) // 5)
    if val_size < 2 or len(pairs) - val_size < 2:
        raise TrainingError(f"{options.data} holds {len(pairs)} pairs; training needs at least 10.")
    train = PairDataset(pairs[val_size:], preprocess, tokenizer, context_length)
    val = PairDataset(pairs[:val_size], preprocess, tokenizer, context_length)
    return (lambda epoch: train), val


def _loader(dataset: Dataset, options: TrainOptions, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=options.batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=options.workers,
        drop_last=shuffle and len(dataset) >= options.batch_size,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )


# --- checkpoints -----------------------------------------------------------------------------


def _save(
    options: TrainOptions,
    model: CLIP,
    tokenizer: Tokenizer,
    mean: tuple,
    std: tuple,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    result: EpochResult,
) -> None:
    """Write the model directory, then the resume state, then the metrics line, each
    replacing the previous epoch's only once complete, so a crash leaves a usable checkpoint."""
    out = options.output
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as staging:
        vocab = Path(staging) / "vocab.txt.gz"
        vocab.write_bytes(Path(tokenizer.bpe_path).read_bytes())
        model_dir = write_model_dir(Path(staging) / "model", model, vocab, mean=mean, std=std)
        for name in ("config.json", "model.safetensors", "vocab.txt.gz"):
            os.replace(model_dir / name, out / name)
        state = {
            "epoch": result.epoch,
            "step": result.step,
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict(),
        }
        torch.save(state, Path(staging) / STATE_FILE)
        os.replace(Path(staging) / STATE_FILE, out / STATE_FILE)
    record = {
        "epoch": result.epoch,
        "step": result.step,
        "train_loss": result.train_loss,
        "logit_scale": model.logit_scale.exp().item(),
        "seconds": result.seconds,
        **result.recall,
    }
    with (out / METRICS_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    (out / "train_options.json").write_text(json.dumps(_jsonable(asdict(options)), indent=2) + "\n")


def _jsonable(options: dict) -> dict:
    return {key: str(value) if isinstance(value, Path) else value for key, value in options.items()}
