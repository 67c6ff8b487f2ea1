"""The tokenizer gives OpenCLIP's ids (the reference) with the real CLIP vocabulary, on
ordinary text and on the damaged text (mojibake, control characters, ...) that ftfy repairs."""

import pickle
import random
import subprocess
import sys
import unicodedata

import ftfy
import pytest
import torch

from clipsearch.clip.tokenizer import EOT, SOT, TextTooLongError, Tokenizer, _split_pattern, clean_text, split_words

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
# Damaged text, where ftfy's fixes (in both tokenizers) change the tokens.
DAMAGED = [
    "cafÃ© au lait",
    "Ã©tÃ©",
    "Ã¼ber",
    "doesnâ€™t",
    "â€œquotedâ€\x9d",
    "ÃƒÂ©",
    "Ð¿Ñ€Ð¸Ð²ÐµÑ‚",
    "the \x93best\x94 dog",
    "\x80\x9f",
    "\x1b[31mred\x1b[0m car",
    "P&EACUTE;REZ",
    "&AMP;",
    "ﬅop",
    "<3 dog&rsquo;s",
    "<b>bold</b> &amp;",
    "a\r\nb\rc",
]
SEPARATORS = [" ", "", "  ", "\t", "\n", "\u3000", "\xa0", "\u2028", " \r\n ", ",", "-"]


def varied_strings(n: int, seed: int = 0, fragments: list[str] = FRAGMENTS) -> list[str]:
    """Deterministic mixes of plain words and the awkward fragments above."""
    rng = random.Random(seed)
    strings = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            piece = rng.choice(WORDS) if rng.random() < 0.5 else rng.choice(fragments)
            case = rng.random()
            piece = piece.upper() if case < 0.1 else piece.title() if case < 0.2 else piece
            parts.append(piece + rng.choice(SEPARATORS))
        strings.append("".join(parts))
    return strings


def printable_ascii(n: int, seed: int = 4) -> list[str]:
    """Random printable ASCII: what `clean_text` cleans without ftfy, except those holding "&"."""
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(32, 127)]
    return ["".join(rng.choices(alphabet, k=rng.randint(1, 40))) for _ in range(n)]


def long_strings(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS + FRAGMENTS) for _ in range(rng.randint(60, 200))) for _ in range(n)]


@pytest.mark.parametrize(
    "texts",
    [
        varied_strings(2000),
        DAMAGED,
        varied_strings(2000, seed=3, fragments=FRAGMENTS + DAMAGED),
        printable_ascii(2000),
    ],
    ids=["varied", "damaged", "varied-and-damaged", "printable-ascii"],
)
def test_ids_equal_reference(ours, ref, texts):
    for text in texts:
        assert ours.encode(text) == ref.encode(text), text
    assert torch.equal(ours(texts), ref(texts))


def test_truncated_rows_equal_reference(ours, ref):
    texts = long_strings(100)
    assert all(len(ours.encode(t)) > 75 for t in texts)
    rows = ours(texts, truncate=True)
    assert torch.equal(rows, ref(texts))
    assert (rows[:, -1] == ours.eot_id).all()


def test_truncate_warn_cuts_as_true_and_warns_once_per_text_cut(ours, caplog):
    """A long query had been searched for without its end and without a word."""
    long = "a photo of " + "a very " * 40 + "red circle"
    rows = ours([long, "a red circle", long + "!"], truncate="warn")
    assert torch.equal(rows, ours([long, "a red circle", long + "!"], truncate=True))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", f"the text {long[:57] + '...'!r} is longer than the model's 77 tokens; the end was ignored")
    ] * 2


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


def test_ascii_text_splits_like_regex_without_reading_the_unicode_database(ref):
    """ASCII text (most queries) is split by a pattern built without listing Unicode's other
    numbers, which took 0.3 s of every cold query; it splits every ASCII character alike."""
    probe = "".join(f"x{c}{c}7{c}'S{c}'ll{c}. " for c in map(chr, range(128)) if c not in "\x1c\x1d\x1e\x1f")
    _split_pattern.cache_clear()
    assert split_words(probe) == ref.pat.findall(probe)
    assert _split_pattern.cache_info().currsize == 1 and _split_pattern(True).pattern != _split_pattern().pattern
    assert split_words(probe) == _split_pattern().findall(probe)


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


def test_cleaning_repairs_text_like_the_reference():
    assert clean_text("a Dog’s “toy”") == 'a dog\'s "toy"'
    assert clean_text("cafe\u0301") == "café"
    assert clean_text("ＲＥＤ　ｃａｒ") == "red car"
    assert clean_text("ﬁsh") == "fish"
    assert clean_text("a\x00b\ufeff c\x0bd") == "ab cd"
    assert clean_text("&amp;lt;3  &rsquo;") == "<3 '"
    assert clean_text("cafÃ© au lait") == "café au lait"
    assert clean_text("the \x93best\x94 dog") == 'the "best" dog'
    assert clean_text("\x1b[31mred\x1b[0m car") == "red car"
    assert clean_text("P&EACUTE;REZ") == "pérez"


def test_plain_text_skips_ftfy_which_would_leave_it_unchanged():
    """Printable ASCII without "&" is cleaned without importing ftfy (40 ms of a query's start)."""
    plain = [text for text in printable_ascii(2000) if "&" not in text]
    assert len(plain) > 1000
    assert all(ftfy.fix_text(text) == text for text in plain)
    code = (
        "import sys\n"
        "from clipsearch.clip.tokenizer import clean_text\n"
        "print(clean_text('A red car, at night!') == 'a red car, at night!', 'ftfy' in sys.modules)\n"
        "print(clean_text('caf\\xc3\\xa9') == 'café', 'ftfy' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "False", "True", "True"]


def test_module_tokenize_works_offline_at_first_call(monkeypatch):
    """CLIP's vocabulary ships with the package: nothing is fetched, even on the first call."""
    from clipsearch import clip
    from clipsearch.clip import download, registry
    from clipsearch.clip import tokenizer as module

    def no_network(*args, **kwargs):
        raise AssertionError("tokenize tried to download")

    monkeypatch.setattr(download, "fetch", no_network)
    module._default_tokenizer.cache_clear()
    try:
        assert clip.tokenize(["a dog"])[0, :5].tolist() == [49406, 320, 1929, 49407, 0]
        assert module._default_tokenizer().bpe_path == registry.VOCAB.bundled
    finally:
        module._default_tokenizer.cache_clear()
