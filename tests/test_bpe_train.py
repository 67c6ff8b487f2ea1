import gzip
import itertools
import random
from collections import Counter

import pytest

from clipsearch.clip.bpe_train import train_bpe, write_vocab
from clipsearch.clip.tokenizer import EOT, SOT, Tokenizer, clean_text, merge_pair, split_words, word_symbols

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "grey", "white", "black", "pink"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond"]
SIZES = ["small", "large", "tiny", "big"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the centre"]


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = f"{rng.choice(SIZES)} {rng.choice(COLOURS)} {rng.choice(SHAPES)}"
        b = f"{rng.choice(COLOURS)} {rng.choice(SHAPES)}s"
        out.append(
            rng.choice(
                [
                    f"a {a} {rng.choice(PLACES)}",
                    f"A {a} to the left of two {b}.",
                    f"three {b} on a {rng.choice(COLOURS)} background",
                    f"there's a {a}, and it's {rng.choice(PLACES)}!",
                ]
            )
        )
    return out


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return captions(3000)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    merges = train_bpe(corpus, 400)
    path = write_vocab(merges, tmp_path_factory.mktemp("bpe") / "vocab.txt.gz")
    return merges, Tokenizer(path)


def test_vocabulary_loads_with_the_tokenizer(trained):
    merges, tokenizer = trained
    assert 0 < len(merges) <= 400
    assert tokenizer.vocab_size == 512 + len(merges) + 2
    assert (tokenizer.sot_id, tokenizer.eot_id) == (512 + len(merges), 513 + len(merges))
    assert tokenizer.ranks == {m: i for i, m in enumerate(merges)}


def test_every_caption_round_trips(trained, corpus):
    _, tokenizer = trained
    for caption in [*corpus, "東京 🐶 never-seen words!"]:
        words = split_words(clean_text(caption))
        assert tokenizer.decode(tokenizer.encode(caption)) == "".join(w + " " for w in words)


def test_frequent_words_become_single_tokens(trained):
    _, tokenizer = trained
    for word in COLOURS + SHAPES + ["left", "the", "background", "'s", "."]:
        assert tokenizer.encode(word) == [tokenizer.encoder[word + "</w>"]], word
    rows = tokenizer(["a small red circle on the left"], context_length=12)
    assert rows[0].tolist()[:9] == [
        tokenizer.sot_id,
        *(tokenizer.encoder[w + "</w>"] for w in ["a", "small", "red", "circle", "on", "the", "left"]),
        tokenizer.eot_id,
    ]


def test_deterministic_and_order_independent(corpus, tmp_path):
    merges = train_bpe(corpus, 200)
    assert train_bpe(corpus, 200) == merges
    assert train_bpe(reversed(corpus), 200) == merges
    first = write_vocab(merges, tmp_path / "a.txt.gz").read_bytes()
    assert write_vocab(merges, tmp_path / "b.txt.gz").read_bytes() == first


def brute_force_bpe(texts: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Textbook BPE: recount every pair from scratch before each merge."""
    words = Counter(w for t in texts for w in split_words(clean_text(t)) if w not in (SOT, EOT))
    symbols = {w: word_symbols(w) for w in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        counts = Counter()
        for w, s in symbols.items():
            for pair in itertools.pairwise(s):
                if pair not in merges:
                    counts[pair] += words[w]
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        symbols = {w: merge_pair(s, best) for w, s in symbols.items()}
    return merges


def test_incremental_counts_equal_brute_force():
    texts = [*captions(300, seed=1), "aaaa aaa banana bandana", "abc abcabc ab-c <|endoftext|>"]
    assert train_bpe(texts, 150) == brute_force_bpe(texts, 150)


def test_stops_when_every_word_is_one_symbol():
    assert train_bpe(["ab ab", "ab"], 10) == [("a", "b</w>")]
    assert train_bpe([], 10) == []


def test_file_format_matches_clip(tmp_path):
    path = write_vocab([("i", "n"), ("t", "h</w>")], tmp_path / "v.txt.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[0].startswith("#version") and lines[1:] == ["i n", "t h</w>", ""]
