"""CLIP's byte-level BPE tokenizer, giving the token ids OpenAI's CLIP was trained with.

Text is cleaned, split into words with CLIP's pattern, each word's UTF-8 bytes are spelled
with printable stand-in characters, and the word's symbols are merged pairwise in the
order the merges were learned. The last symbol of a word carries the end-of-word marker
`</w>`, so "dog" at the end of a word and inside "dogma" are different tokens.

Text is cleaned with ftfy, as OpenAI's tokenizer does. The split pattern uses the `regex`
module's \\p{L} and \\p{N}; stdlib `re` has no such classes, so they are built from Python's
own Unicode database (`_split_pattern`) rather than adding a dependency for one pattern. For
every code point assigned in that database the split is the same; characters assigned only in
newer Unicode versions are punctuation-like here and letters or numbers there.
"""

from __future__ import annotations

import gzip
import html
import itertools
import logging
import re
import sys
from collections.abc import Iterable, Sequence
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from ..errors import ClipsearchError

if TYPE_CHECKING:
    import torch

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's vocabulary is 49,408 tokens: 512 byte symbols (with and without </w>), 48,894
# merges and the two special tokens. Its merges file holds more merges than were used.
MAX_MERGES = 49_408 - 512 - 2
DEFAULT_CONTEXT_LENGTH = 77
# Words seen by one tokenizer are memoised; past this many the memo starts afresh, so
# tokenizing a large caption set cannot grow memory without bound.
_CACHE_LIMIT = 100_000


log = logging.getLogger(__name__)

# False: a text too long raises; True: it is cut (training's captions); "warn": it is cut and a
# warning says so (a query, whose ignored end its author should know of).
Truncate = bool | Literal["warn"]


class TextTooLongError(ClipsearchError, ValueError):
    """A text has more tokens than the model's context length."""


def shown(text: str) -> str:
    """The text, or its start, as a message quotes it."""
    return repr(text if len(text) <= 60 else text[:57] + "...")


def warn_cut(text: str, context_length: int) -> None:
    """Say that the end of ``text`` was cut off (``truncate="warn"``): a long query had been
    searched for without its end and without a word."""
    log.warning("the text %s is longer than the model's %d tokens; the end was ignored", shown(text), context_length)


@cache
def byte_symbols() -> dict[int, str]:
    """Map every byte to a printable character, because merges are stored as text.

    Printable Latin-1 bytes stand for themselves; the others (space, controls, ...) are
    moved to code points from 256 on. The insertion order fixes the first 256 token ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


# --- text cleaning ---------------------------------------------------------------------


def clean_text(text: str) -> str:
    """Normalise text the way CLIP's training captions were before tokenizing.

    ftfy repairs what web captions suffer from (mojibake, curly quotes, full-width forms,
    ligatures, control characters, lone surrogates from undecodable command-line bytes);
    HTML entities are then decoded twice (captions were often escaped twice), whitespace runs
    collapse to one space and everything is lower-cased. Any other cleaning gives token ids
    the model was not trained with.
    """
    if not _is_plain(text):
        import ftfy  # 40 ms to import: a plain query (most are) starts without it

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def _is_plain(text: str) -> bool:
    """Printable ASCII without "&", which ftfy and HTML unescaping leave as it is: mojibake, curly
    quotes, wide forms and ligatures are not ASCII, control characters and terminal codes are not
    printable, and entities start with "&"."""
    return text.isascii() and text.isprintable() and "&" not in text


# --- splitting into words --------------------------------------------------------------


def _ranges(codepoints: list[int]) -> str:
    """Body of a regex character class holding `codepoints` (ascending), as ranges."""
    runs: list[list[int]] = []
    for cp in codepoints:
        if runs and cp == runs[-1][1] + 1:
            runs[-1][1] = cp
        else:
            runs.append([cp, cp])
    return "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in runs)


@cache
def _split_pattern(ascii_only: bool = False) -> re.Pattern[str]:
    """CLIP's word pattern: special tokens, English contractions, a run of letters, one
    number character, or a run of anything else; spaces separate and are dropped.

    Stdlib `re` gives letters as [^\\W\\d_] (word characters minus decimal digits and "_"),
    but that also holds the numeric categories Nl and No (Ⅻ, ½, ①), which \\p{N} claims;
    they are listed explicitly from Python's Unicode database. OpenAI's pattern matches
    case-insensitively, so U+0345 (a combining mark, the only code point that is no letter
    but whose case fold, ι, is) is a letter to its "anything else" class and no letter to
    its letter class: it matches nothing and is dropped like a space.

    ``ascii_only``: the pattern for text that is all ASCII (most queries), where there are no
    such numbers to list. Listing them scans every code point and lengthens the classes:
    0.3 s of a cold query's start, spent on a pattern that splits ASCII text no differently.
    """
    every = range(0 if ascii_only else sys.maxunicode + 1)
    other_numbers = _ranges(
        [cp for cp in every if (c := chr(cp)).isnumeric() and not c.isdecimal() and not c.isalpha()]
    )
    iota_mark = "\u0345"
    letters = rf"[^\W\d_{other_numbers}]+"
    number = rf"[\d{other_numbers}]"
    other = rf"(?:[^\s\w{iota_mark}]|_)+"
    specials = f"{re.escape(SOT)}|{re.escape(EOT)}"
    return re.compile(rf"{specials}|(?i:'s|'t|'re|'ve|'m|'ll|'d)|{letters}|{number}|{other}")


def split_words(cleaned: str) -> list[str]:
    """Split text already passed through `clean_text` into CLIP's pre-tokens."""
    return _split_pattern(cleaned.isascii()).findall(cleaned)


def word_symbols(word: str) -> list[str]:
    """A word's starting BPE symbols: one per UTF-8 byte, the last marked as word end."""
    table = byte_symbols()
    symbols = [table[b] for b in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    return symbols


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Join every occurrence of `pair` in `symbols`, left to right ("aaa" → "aa", "a")."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def read_merges(path: str | Path) -> list[tuple[str, str]]:
    """Read a `bpe_simple_vocab_16e6.txt.gz`-style file: a header line, then one merge
    ("left right") per line, most frequent first. Reading stops at the last merge used: CLIP's
    file holds five times more, and a query's start-up would decompress them all."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        next(f, None)  # the header
        merges = (tuple(line.split()) for line in f if line.strip())
        return list(itertools.islice(merges, MAX_MERGES))  # type: ignore[arg-type]


# --- the tokenizer ---------------------------------------------------------------------


class Tokenizer:
    """Token ids from text and back, for one merges file (CLIP's or one we trained).

    ``context_length`` is the rows' length when a call names none: a model's own tokenizer
    (``model.tokenizer``) has its model's, so that text too long for the model raises (or, with
    ``truncate=True``, is cut to fit) here and not as a shape error in its text tower."""

    def __init__(self, bpe_path: str | Path, context_length: int = DEFAULT_CONTEXT_LENGTH):
        self.bpe_path = Path(bpe_path)
        self.context_length = context_length
        merges = read_merges(self.bpe_path)
        bytes_ = list(byte_symbols().values())
        vocab = [*bytes_, *(b + END_OF_WORD for b in bytes_), *("".join(m) for m in merges), SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.sot_id = self.encoder[SOT]
        self.eot_id = self.encoder[EOT]
        self.vocab_size = len(vocab)
        self._symbol_bytes = {s: b for b, s in byte_symbols().items()}
        self._cache: dict[str, list[int]] = {}

    def _merge(self, symbols: list[str]) -> list[str]:
        """Apply merges to one word, always the earliest-learned pair present next,
        until no adjacent pair is a known merge."""
        while len(symbols) > 1:
            best = min(itertools.pairwise(symbols), key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if best not in self.ranks:
                break
            symbols = merge_pair(symbols, best)
        return symbols

    def _word_ids(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            if word in (SOT, EOT):
                ids = [self.encoder[word]]
            else:
                ids = [self.encoder[s] for s in self._merge(word_symbols(word))]
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without start and end tokens.

        A literal "<|startoftext|>" or "<|endoftext|>" in the text becomes that special
        token, as in OpenAI's tokenizer, so ids match theirs for every input.
        """
        return [i for word in split_words(clean_text(text)) for i in self._word_ids(word)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids: each word end becomes a space, so "a dog's" decodes as
        "a dog 's " (cleaned, lower-cased), which encodes back to the same ids."""
        symbols = "".join(self.decoder[int(i)] for i in ids)
        # Special tokens and </w> are spelled with printable ASCII, which maps to itself.
        raw = bytes(self._symbol_bytes[c] for c in symbols)
        return raw.decode("utf-8", "replace").replace(END_OF_WORD, " ")

    def __call__(
        self,
        texts: str | Sequence[str],
        context_length: int | None = None,
        truncate: Truncate = False,
    ) -> torch.LongTensor:
        """Rows of `[SOT, ids..., EOT, 0...]`, one per text, as CLIP's text tower expects.

        A text that does not fit raises `TextTooLongError`, because silently dropping the
        end of a query changes what is searched for; with `truncate=True` it is cut and
        its last kept token replaced by EOT, as OpenAI's `tokenize` does, and with
        ``truncate="warn"`` a warning says so (`Truncate`).
        """
        import torch

        return torch.from_numpy(self.ids(texts, context_length, truncate))  # type: ignore[return-value]

    def ids(
        self,
        texts: str | Sequence[str],
        context_length: int | None = None,
        truncate: Truncate = False,
    ) -> np.ndarray:
        """What `__call__` returns, as an int64 NumPy array: the query path runs without torch."""
        if isinstance(texts, str):
            texts = [texts]
        context_length = context_length or self.context_length
        rows = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > context_length:
                if not truncate:
                    raise TextTooLongError(
                        f"The text {shown(text)} has {len(ids) - 2} tokens but at most {context_length - 2} fit "
                        f"in the context length of {context_length}; shorten it or pass truncate=True."
                    )
                if truncate == "warn":
                    warn_cut(text, context_length)
                ids = ids[:context_length]
                ids[-1] = self.eot_id
            rows[row, : len(ids)] = ids
        return rows


@lru_cache(maxsize=1)
def _default_tokenizer() -> Tokenizer:
    # Imported here so that importing the tokenizer never pulls in the download code.
    from .download import vocab_path

    return Tokenizer(vocab_path())


def tokenize(
    texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = False
) -> torch.LongTensor:
    """Tokenize with CLIP's own vocabulary (shipped in the package)."""
    return _default_tokenizer()(texts, context_length=context_length, truncate=truncate)
