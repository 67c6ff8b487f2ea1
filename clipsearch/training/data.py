"""Where a run's image–caption pairs come from: a CSV or JSONL file of ``path,caption``, a folder
of images with same-named ``.txt`` captions, or (with no data given) the synthetic scenes of
`clipsearch.training.scenes`, drawn fresh every epoch.

An epoch's data depends only on the seed and the epoch's number, so a resumed run sees exactly
the batches the uninterrupted one would have.
"""

from __future__ import annotations

import csv
import io
import json
import random
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from clipsearch.clip.preprocess import Preprocess, open_image
from clipsearch.clip.tokenizer import Tokenizer
from clipsearch.training.options import TrainingError, TrainOptions
from clipsearch.training.scenes import SceneGenerator

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_SCENE_CAPTION_PROB = 0.3  # otherwise a paraphrase: queries are often shorter than captions
_VOCABULARY_PAIRS = 20_000  # captions of a data file the vocabulary is learned from
_VOCABULARY_SCENES = 1_000  # synthetic scenes whose captions the vocabulary is learned from: every word occurs


def read_pairs(path: str | Path) -> list[tuple[Path, str]]:
    """Image paths and captions from a CSV (columns ``path`` and ``caption``), a JSONL file
    (objects with those keys) or a folder of images with same-named ``.txt`` captions.
    Relative paths are relative to the file that lists them. A file that cannot be read as
    such is a `TrainingError` naming it (and the line): it is the user's to fix, not a bug."""
    path = Path(path)
    if path.is_dir():
        pairs = [
            (image, read_text(image.with_suffix(".txt")).strip())
            for image in sorted(path.rglob("*"))
            if image.suffix.lower() in _IMAGE_SUFFIXES and image.with_suffix(".txt").is_file()
        ]
    elif path.suffix.lower() == ".csv":
        pairs = [(path.parent / row["path"], row["caption"]) for row in _csv_rows(path)]
    elif path.suffix.lower() in (".jsonl", ".json"):
        pairs = [(path.parent / row["path"], row["caption"]) for row in _jsonl_rows(path)]
    else:
        raise TrainingError(f"{path} is not a CSV, JSONL or folder; give image–caption pairs in one of those.")
    if not pairs:
        raise TrainingError(
            f"No image–caption pairs found in {path}; a CSV or JSONL needs 'path' and 'caption' "
            "fields, a folder needs images with same-named .txt files."
        )
    return pairs


def read_text(path: Path) -> str:
    """A text file as UTF-8, past the byte-order mark Excel's "CSV UTF-8" starts with."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise TrainingError(f"{path} is not UTF-8 text (byte {err.start} is not); save it as UTF-8.") from None


def _csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows that have both a path and a caption."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        rows = list(reader)
    except csv.Error as err:
        raise TrainingError(f"{path}, line {reader.line_num}: not CSV ({err}).") from None
    return [row for row in rows if row.get("path") is not None and row.get("caption") is not None]


def _jsonl_rows(path: Path) -> list[dict[str, str]]:
    """The objects that have both a path and a caption. Lines are counted at newlines only, as
    an editor does (``splitlines`` also splits at characters JSON strings may hold)."""
    rows = []
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TrainingError(f"{path}, line {number}: not JSON ({err.msg}, column {err.colno}).") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k, ""), str) for k in ("path", "caption")):
            raise TrainingError(f"{path}, line {number}: not a JSON object with 'path' and 'caption' strings.")
        if "path" in row and "caption" in row:
            rows.append(row)
    return rows


def vocabulary_captions(options: TrainOptions) -> list[str]:
    """The captions a new model's BPE vocabulary is learned from."""
    if options.data is None:
        scenes = SceneGenerator(
            options.seed, resolution=8, style=options.scene_style
        )  # captions do not depend on the resolution
        return [caption for i in range(_VOCABULARY_SCENES) for caption in scenes[i].captions]
    return [caption for _, caption in read_pairs(options.data)[:_VOCABULARY_PAIRS]]


class CaptionedImages(Dataset):
    """Pairs as the model takes them: preprocessed pixels and padded token ids."""

    def __init__(self, preprocess: Preprocess, tokenizer: Tokenizer, context_length: int):
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.context_length = context_length

    @abstractmethod
    def __len__(self) -> int: ...

    def _encode(self, image: Image.Image, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.preprocess(image), self.tokenizer(caption, context_length=self.context_length, truncate=True)[0]


class PairDataset(CaptionedImages):
    def __init__(
        self, pairs: list[tuple[Path, str]], preprocess: Preprocess, tokenizer: Tokenizer, context_length: int
    ):
        super().__init__(preprocess, tokenizer, context_length)
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, caption = self.pairs[index]
        return self._encode(open_image(path), caption)


class SceneDataset(CaptionedImages):
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
        super().__init__(preprocess, tokenizer, context_length)
        self.generator = generator
        self.start = start
        self.count = count
        self.negatives = negatives

    def __len__(self) -> int:
        return self.count

    def __getitem__(
        self, index: int
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, str, str]:
        """``(image, tokens)`` for evaluation; for training also the caption and all captions
        true of the image (joined by newlines), from which `positives` finds every true pair."""
        index += self.start
        if self.negatives is None:
            scene = self.generator[index]
            return self._encode(scene.image, scene.caption)
        base, member = divmod(index, self.negatives + 1)
        scene = self.generator[base] if member == 0 else self.generator.hard_negative(base, member - 1)
        caption = scene.caption
        rng = random.Random(f"caption:{self.generator.seed}:{index}")
        if rng.random() >= _SCENE_CAPTION_PROB:
            others = {c for m in range(self.negatives + 1) if m != member for c in self._captions(base, m)}
            caption = rng.choice([c for c in scene.paraphrases if c not in others] or [caption])
        return *self._encode(scene.image, caption), caption, "\n".join(scene.captions)

    def _captions(self, base: int, member: int) -> tuple[str, ...]:
        return self.generator.captions(base, None if member == 0 else member - 1)


def positives(captions: list[str], described: list[str]) -> torch.Tensor:
    """``[i, j]``: caption j is among image i's captions (which ``described`` joins with newlines),
    from the last two fields of a training batch of `SceneDataset`."""
    truths = [set(text.split("\n")) for text in described]
    return torch.tensor([[caption in truth for caption in captions] for truth in truths])


def datasets(
    options: TrainOptions, preprocess: Preprocess, tokenizer: Tokenizer, context_length: int
) -> tuple[Callable[[int], CaptionedImages], CaptionedImages]:
    """A function from epoch to that epoch's training set, and the held-out set."""
    if options.data is None:
        # Training reads scenes 0, 1, 2, ... of the seed (and their hard negatives); the
        # held-out scenes are the negative indices, which that stream never reaches.
        # A curriculum: shapes are learned many times faster from one-object scenes, and once
        # learned they carry over to scenes of several objects.
        scenes = SceneGenerator(options.seed, preprocess.resolution, style=options.scene_style)
        singles = SceneGenerator(options.seed, preprocess.resolution, single_objects=True, style=options.scene_style)
        group = options.hard_negatives + 1
        n = options.samples_per_epoch - options.samples_per_epoch % group  # a group stays in one epoch
        val = SceneDataset(scenes, -options.val_size, options.val_size, preprocess, tokenizer, context_length, None)

        def scenes_of(epoch: int) -> CaptionedImages:
            generator = singles if epoch < options.single_object_epochs else scenes
            return SceneDataset(generator, epoch * n, n, preprocess, tokenizer, context_length, options.hard_negatives)

        return scenes_of, val

    pairs = read_pairs(options.data)
    random.Random(options.seed).shuffle(pairs)
    val_size = min(options.val_size, len(pairs) // 5)
    if val_size < 2 or len(pairs) - val_size < 2:
        raise TrainingError(
            f"{options.data} holds {len(pairs)} pair{'' if len(pairs) == 1 else 's'}; training needs at least 10."
        )
    training = PairDataset(pairs[val_size:], preprocess, tokenizer, context_length)
    return (lambda epoch: training), PairDataset(pairs[:val_size], preprocess, tokenizer, context_length)


def loader(dataset: CaptionedImages, options: TrainOptions, shuffle: bool, seed: int) -> DataLoader:
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
