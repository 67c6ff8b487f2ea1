"""Learn a small byte-level BPE vocabulary from captions, in CLIP's file format.

A model trained on a narrow caption set (the synthetic scenes) needs a few hundred
tokens, not CLIP's 49,408: a small vocabulary keeps its embedding table, and the weights
we ship, small. Words are cut exactly as the tokenizer cuts them (same cleaning, split
pattern, byte symbols and end-of-word marker), and the file loads with `Tokenizer(path)`.
"""

from __future__ import annotations

import gzip
import heapq
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from .tokenizer import EOT, SOT, clean_text, merge_pair, split_words, word_symbols

Pair = tuple[str, str]


def train_bpe(texts: Iterable[str], num_merges: int) -> list[Pair]:
    """Return up to `num_merges` merges, most frequent first.

    Each step merges the adjacent symbol pair with the highest count over all words
    (weighted by word frequency); equal counts go to the lexicographically smallest pair,
    so the result depends only on the multiset of words, never on their order. Fewer
    merges come back when every word is already a single symbol.

    Pair counts are updated only for the words containing the merged pair, and the next
    pair comes from a heap whose outdated entries are skipped, so a few thousand merges
    over ten thousand captions take seconds.
    """
    word_counts = Counter(w for text in texts for w in split_words(clean_text(text)) if w not in (SOT, EOT))
    words = [word_symbols(w) for w in word_counts]
    freqs = list(word_counts.values())

    pair_counts: Counter[Pair] = Counter()
    holders: defaultdict[Pair, set[int]] = defaultdict(set)  # words that contain (or once contained) the pair
    for index, symbols in enumerate(words):
        for pair in itertools.pairwise(symbols):
            pair_counts[pair] += freqs[index]
            holders[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[Pair] = []
    learned: set[Pair] = set()
    while heap and len(merges) < num_merges:
        negative_count, pair = heapq.heappop(heap)
        if pair_counts[pair] != -negative_count or negative_count == 0:
            continue  # outdated entry: the pair's count changed after it was pushed
        if pair in learned:
            # A merged symbol can be rebuilt by another merge ("ab"+"c" after "a"+"bc"),
            # making an old pair reappear; one rank per pair, as the file format allows.
            continue
        learned.add(pair)
        merges.append(pair)
        touched: set[Pair] = set()
        for index in holders.pop(pair):
            before, after = words[index], merge_pair(words[index], pair)
            for old in itertools.pairwise(before):
                pair_counts[old] -= freqs[index]
                touched.add(old)
            for new in itertools.pairwise(after):
                pair_counts[new] += freqs[index]
                holders[new].add(index)
                touched.add(new)
            words[index] = after
        for changed in touched:
            if pair_counts[changed] > 0:
                heapq.heappush(heap, (-pair_counts[changed], changed))
    return merges


def write_vocab(merges: Iterable[Pair], path: str | Path) -> Path:
    """Write merges as `bpe_simple_vocab_16e6.txt.gz` is written: a header line, then
    "left right" per line. The gzip header carries no name or time, so the same merges
    always give the same bytes (the file's checksum can be recorded)."""
    path = Path(path)
    lines = ["#version: 0.2 - trained by clipsearch.clip.bpe_train", *(f"{left} {right}" for left, right in merges)]
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8"))
    return path
