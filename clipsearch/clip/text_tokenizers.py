"""The tokenizers of the model families beyond CLIP, read from Hugging Face ``tokenizer.json``
files with the `tokenizers` library, and the text cleaning open_clip applies before them.

SigLIP's T5 SentencePiece vocabulary, SigLIP 2's Gemma vocabulary and XLM-RoBERTa's
(SentencePiece ids shifted by fairseq's four special tokens) all come as a ``tokenizer.json``
that fixes normalisation, splitting, the model and the special tokens around a text; what it
leaves to ``transformers`` is which token pads (``tokenizer_config.json`` or
``special_tokens_map.json``) and the padding and truncation to the context length, which
open_clip asks for as ``padding="max_length", truncation=True``. This module does the same
with the library alone, so the ids are the ones open_clip's `HFTokenizer` gives.

Cleaning, as open_clip's ``clean`` option names it: "whitespace" (ftfy, HTML entities
unescaped twice, runs of whitespace collapsed), "lower" (the same, lower-cased) and
"canonicalize" (SigLIP's: the same, underscores as spaces, ASCII punctuation removed,
lower-cased).
"""

from __future__ import annotations

import html
import json
import string
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.clip.tokenizer import TextTooLongError, Truncate, warn_cut
from clipsearch.errors import CheckpointError

if TYPE_CHECKING:
    import torch

CLEANERS = ("whitespace", "lower", "canonicalize")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def basic_clean(text: str) -> str:
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def whitespace_clean(text: str) -> str:
    return " ".join(text.split())


def canonicalize(text: str) -> str:
    """Big Vision's caption canonicalisation, which SigLIP was trained with."""
    return whitespace_clean(text.replace("_", " ").translate(_PUNCTUATION).lower())


def clean_text(text: str, mode: str) -> str:
    text = basic_clean(text)
    if mode == "canonicalize":
        return canonicalize(text)
    if mode == "lower":
        return whitespace_clean(text).lower()
    if mode == "whitespace":
        return whitespace_clean(text)
    raise ValueError(f"clean must be one of {CLEANERS}, not {mode!r}")


class HFTokenizer:
    """Texts → token ids ``[N, context_length]``, padded with the pad token, for a model whose
    tokenizer is a directory holding ``tokenizer.json`` (and usually ``tokenizer_config.json``).

    Called like `clip.tokenizer.Tokenizer`: ``tokenizer(texts, context_length, truncate)``, and
    like it refuses a text too long unless ``truncate`` is given (it had cut it silently, so
    ``model.tokenizer(texts)`` raised for a CLIP model and not for a SigLIP one).
    Every row is padded to the full context length: SigLIP reads every position.
    """

    def __init__(self, directory: str | Path, context_length: int, clean: str = "whitespace"):
        if clean not in CLEANERS:
            raise ValueError(f"clean must be one of {CLEANERS}, not {clean!r}")
        self.directory = Path(directory)
        self.context_length = context_length
        self.clean = clean
        settings = _settings(self.directory)
        self.padding_side = settings.get("padding_side", "right")
        self.truncation_side = settings.get("truncation_side", "right")
        self._json = _read_text(self.directory / "tokenizer.json")
        self._whole = self._backend(None)  # for truncate=False: every token, to count them
        self._cut = self._backend(context_length)
        self.pad_token = _pad_token(settings, self._whole)
        pad_id = self._whole.token_to_id(self.pad_token)
        if pad_id is None:
            raise CheckpointError(f"The pad token {self.pad_token!r} of {self.directory} is not in its vocabulary.")
        self.pad_id: int = pad_id

    def _backend(self, max_length: int | None) -> Any:
        """A `tokenizers.Tokenizer` that cuts to ``max_length`` (None: never), as transformers
        sets it up for ``truncation=True``: the text's own tokens go, its special tokens stay."""
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_str(self._json)
        except Exception as err:  # the Rust library raises its own exception type
            raise CheckpointError(f"{self.directory / 'tokenizer.json'} is not a readable tokenizer ({err}).") from None
        backend.no_padding()
        if max_length is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(max_length=max_length, direction=self.truncation_side)
        return backend

    @property
    def vocab_size(self) -> int:
        return self._whole.get_vocab_size(with_added_tokens=True)

    def ids(
        self, texts: str | Sequence[str], context_length: int | None = None, truncate: Truncate = False
    ) -> np.ndarray:
        """Token ids as an ``int64`` NumPy array ``[N, context_length]``; ``truncate`` as
        `clip.tokenizer.Truncate` says."""
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        if not truncate:
            backend = self._whole
        elif length == self.context_length:
            backend = self._cut
        else:
            backend = self._backend(length)
        cleaned = [clean_text(text, self.clean) for text in texts]
        encodings = backend.encode_batch(cleaned)
        if truncate == "warn":
            for text, encoding in zip(texts, encodings):
                if encoding.overflowing:  # what truncation cut off
                    warn_cut(text, length)
        rows = np.full((len(encodings), length), self.pad_id, dtype=np.int64)
        for row, (text, encoding) in enumerate(zip(texts, encodings)):
            ids = encoding.ids
            if len(ids) > length:
                raise TextTooLongError(f"{text!r} is {len(ids)} tokens long, more than the context length of {length}.")
            if self.padding_side == "left":
                rows[row, length - len(ids) :] = ids
            else:
                rows[row, : len(ids)] = ids
        return rows

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None, truncate: Truncate = False
    ) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.ids(texts, context_length, truncate))

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.directory)!r}, context_length={self.context_length}, clean={self.clean!r})"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as err:
        raise CheckpointError(f"The tokenizer file {path} cannot be read ({err.strerror or err}).") from None


def _settings(directory: Path) -> dict[str, Any]:
    """What transformers reads beside ``tokenizer.json``: ``special_tokens_map.json`` overridden
    by ``tokenizer_config.json``, either of which may be missing."""
    settings: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            try:
                data = json.loads(_read_text(path))
            except ValueError as err:
                raise CheckpointError(f"{path} is not a readable tokenizer configuration ({err}).") from None
            if isinstance(data, dict):
                settings.update(data)
    return settings


def _pad_token(settings: dict[str, Any], backend: Any) -> str:
    """The pad token the configuration names (a string or a written-out AddedToken), else the
    one the padding in ``tokenizer.json`` records, else ``<pad>``."""
    token = settings.get("pad_token")
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str):
        return token
    padding = backend.padding
    if padding and padding.get("pad_token"):
        return str(padding["pad_token"])
    return "<pad>"
