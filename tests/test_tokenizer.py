"""The tokenizer gives OpenCLIP's ids (the reference) with the real CLIP vocabulary.

The reference cleans text with ftfy (installed here as an open_clip dependency), so the
parity test compares against exactly what OpenCLIP users get; the inputs where our
ftfy-free cleanup gives other tokens are pinned down in `test_differences_from_ftfy`.
"""

import pickle
import random
import sys
import unicodedata

import pytest
import torch

from clipsearch.clip.tokenizer import EOT, SOT, TextTooLongError, Tokenizer, clean_text, split_words, tokenize

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
regex = pytest.importorskip("regex")

VOCAB = open_clip_tokenizer.default_bpe()


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer(VOCAB)


@pytest.fixture(scope="module")
def ref():
    return open_clip_tokenizer.SimpleTokenizer(VOCAB)


WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "cat",
    "dog",
    "on",
    "in",
    "red",
    "blue",
    "green",
    "tree",
    "beach",
    "sunset",
    "city",
    "night",
    "car",
    "person",
    "running",
    "with",
]
FRAGMENTS = [
    # accents, composed and decomposed, and other Latin
    "café",
    "cafe\u0301",
    "naïve",
    "Ærøskøbing",
    "São Paulo",
    "ZÜRICH",
    "straße",
    "ĳssel",
    "ﬁsh ﬂower",
    "Ǆ",
    # CJK, kana (full and half width), hangul, full-width ASCII, ideographic space
    "東京タワー",
    "北京的猫",
    "한국어 사진",
    "ｶﾀｶﾅ",
    "ＡＢＣ　１２３",
    "ねこ",
    "一二三万",
    # other scripts
    "Привет мир",
    "Γειά σου",
    "שלום",
    "مرحبا بالعالم",
    "नमस्ते",
    "ภาษาไทย",
    "ქართული",
    # emoji, modifiers, ZWJ sequences, flags, variation selectors
    "🐶",
    "👍🏽",
    "👨\u200d👩\u200d👧",
    "🇫🇷",
    "❤️",
    "🙂🙃",
    "☕",
    # HTML entities, single and double escaped
    "&amp;",
    "&#39;",
    "&quot;hi&quot;",
    "&lt;b&gt;",
    "&amp;amp;",
    "&rsquo;",
    "&nbsp;",
    "&#x1F600;",
    "&eacute;",
    "&copy;",
    # contractions in various cases, straight and curly
    "'s",
    "'S",
    "'t",
    "'RE",
    "'Ve",
    "'m",
    "'LL",
    "'d",
    "’s",
    "it's",
    "DON'T",
    "they’re",
    "‘quoted’",
    "“double”",
    # punctuation runs and symbols
    "!!!",
    "...",
    "?!",
    "--",
    "(",
    ")",
    "_",
    "__init__",
    "@#$%",
    "a_b",
    "~/path/to-file.jpg",
    ">_>",
    "§¶",
    "™",
    "°C",
    # digits and other number characters
    "2024",
    "3.14",
    "1,000",
    "½",
    "x²",
    "Ⅻ",
    "٣٤",
    "①②",
    "໓",
    "10⁻³",
    # control and invisible characters
    "\x00",
    "\x0b",
    "\x1f",
    "\x7f",
    "\ufeff",
    "\u200b",
    "\u00ad",
]
SEPARATORS = [" ", "", "  ", "\t", "\n", "\u3000", "\xa0", "\u2028", " \r\n ", ",", "-"]


def varied_strings(n: int, seed: int = 0) -> list[str]:
    """Deterministic mixes of plain words and the awkward fragments above.

    No fragment holds a literal "<" or an all-caps entity: with those ftfy is known to
    clean differently, see `test_differences_from_ftfy`.
    """
    rng = random.Random(seed)
    strings = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            piece = rng.choice(WORDS) if rng.random() < 0.5 else rng.choice(FRAGMENTS)
            case = rng.random()
            if "&" not in piece:  # all-caps entities are a known difference, tested below
                piece = piece.upper() if case < 0.1 else piece.title() if case < 0.2 else piece
            parts.append(piece + rng.choice(SEPARATORS))
        strings.append("".join(parts))
    return strings


def long_strings(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS + FRAGMENTS) for _ in range(rng.randint(60, 200))) for _ in range(n)]


def test_ids_equal_reference_on_2000_strings(ours, ref):
    texts = varied_strings(2000)
    for text in texts:
        assert ours.encode(text) == ref.encode(text), text
    assert torch.equal(ours(texts), ref(texts))


def test_truncated_rows_equal_reference(ours, ref):
    texts = long_strings(100)
    assert all(len(ours.encode(t)) > 75 for t in texts)
    rows = ours(texts, truncate=True)
    assert torch.equal(rows, ref(texts))
    assert (rows[:, -1] == ours.eot_id).all()


def test_every_assigned_code_point_splits_like_regex(ref):
    """Our stdlib-re pattern against OpenCLIP's `regex` pattern, over every code point
    Python's Unicode database assigns (surrogates cannot be text). Code points
    \\x1c-\\x1f are whitespace only to stdlib re, but cleaning has removed them."""
    chars = [
        c
        for c in map(chr, range(sys.maxunicode + 1))
        if unicodedata.category(c) not in ("Cn", "Cs") and c not in "\x1c\x1d\x1e\x1f"
    ]
    probe = "".join(f"x{c}{c}7{c}'s{c}. " for c in chars)
    assert split_words(probe) == ref.pat.findall(probe)


def test_vocabulary_layout(ours):
    assert ours.vocab_size == 49408
    assert (ours.sot_id, ours.eot_id) == (49406, 49407)
    assert ours.encoder["!"] == 0 and ours.encoder["!</w>"] == 256


def test_special_token_text_is_the_special_token(ours, ref):
    """As in OpenAI's tokenizer; OpenCLIP spells its special tokens differently."""
    assert ours.encode(f"a {EOT} b{SOT}") == ref.encode("a <end_of_text> b<start_of_text>")
    assert ours.encode(f"a {EOT}")[-1] == ours.eot_id


def test_decode_equals_reference_and_encodes_back(ours, ref):
    for text in varied_strings(300, seed=2):
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.encode(ours.decode(ids)) == ids
    assert ours.decode(torch.tensor([320, 1125, 539, 320, 2368])) == "a photo of a cat "


def test_too_long_text_is_refused_with_its_start_and_the_limit(ours):
    text = "a photo of " + "a very big red dog " * 20
    with pytest.raises(
        TextTooLongError,
        match=r"'a photo of a very big.*\.\.\.' has 103 tokens but at most 75 fit in the context length of 77",
    ):
        ours(["short", text])
    assert isinstance(TextTooLongError("x"), ValueError)
    assert ours(text, context_length=105).shape == (1, 105)


def test_single_string_and_padding(ours):
    rows = ours("a photo of a cat", context_length=10)
    assert rows.dtype == torch.long
    assert rows.tolist() == [[49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0]]


def test_surrogates_are_paired_or_replaced(ours, ref):
    for text in ["a dog\udcff", "\ud83d\udc36 puppy", "\udc80\udc80"]:
        assert ours.encode(text) == ref.encode(text)
    assert ours.encode("\ud83d\udc36") == ours.encode("🐶")


def test_pickles_for_data_loader_workers(ours):
    clone = pickle.loads(pickle.dumps(ours))
    assert clone.encode("a dog’s toy") == ours.encode("a dog’s toy")


def test_cleaning_fixes_typography_like_ftfy():
    """The ftfy fixes we do repeat, each changing the tokens of a plausible query."""
    assert clean_text("a Dog’s “toy”") == 'a dog\'s "toy"'
    assert clean_text("cafe\u0301") == "café"
    assert clean_text("ＲＥＤ　ｃａｒ") == "red car"
    assert clean_text("ﬁsh") == "fish"
    assert clean_text("a\x00b\ufeff c\x0bd") == "ab cd"
    assert clean_text("&amp;lt;3  &rsquo;") == "<3 '"


def test_differences_from_ftfy(ref):
    """Inputs where ftfy's fix_text (in the reference) changes tokens and we do not. All
    are damaged text rather than queries a person types: mojibake (UTF-8 read as
    Latin-1/Windows-1252), C1 control characters, terminal colour codes, all-caps HTML
    entities; plus ftfy's unusual "ſt" for the ligature ﬅ, and text holding a literal "<",
    where ftfy decodes no entities (assuming HTML) and so leaves the curly quote that
    "&rsquo;" later becomes, while we straighten it. Everything else in the parity corpus
    above, which exercises the fixes ftfy applies to ordinary text, matches."""
    ours = Tokenizer(VOCAB)
    differing = {
        "cafÃ© au lait": "cafã© au lait",
        "the \x93best\x94 dog": "the \x93best\x94 dog",
        "\x1b[31mred\x1b[0m car": "[31mred[0m car",
        "P&EACUTE;REZ": "p&eacute;rez",
        "ﬅop": "stop",
        "<3 dog&rsquo;s": "<3 dog's",
    }
    for text, cleaned in differing.items():
        assert clean_text(text) == cleaned
        assert ours.encode(text) != ref.encode(text), text


def test_module_tokenize_uses_the_downloaded_vocabulary(monkeypatch):
    download = pytest.importorskip("clipsearch.clip.download")
    from clipsearch.clip import tokenizer as module

    monkeypatch.setattr(download, "vocab_path", lambda: VOCAB)
    module._default_tokenizer.cache_clear()
    try:
        assert tokenize(["a photo of a cat"])[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    finally:
        module._default_tokenizer.cache_clear()
