"""Our `HFTokenizer` against open_clip's (transformers underneath) on the same tokenizer files.

The real files (SigLIP's T5 vocabulary, SigLIP 2's Gemma vocabulary, XLM-RoBERTa's) cannot be
downloaded here, so small ones of the same kind are made the way the published ones were:
a SentencePiece model is trained (unigram for T5 and XLM-R, byte-fallback BPE for Gemma) on
text in many scripts, converted by transformers' own tokenizer class with the settings open_clip
used when it published its SigLIP tokenizers (T5: no extra ids, pad = eos = "</s>"; Gemma: EOS
appended, no BOS, right padding, pad "<pad>"), and saved with ``save_pretrained``. Both sides
then tokenize the same ≥ 2,000 strings: every id and every pad must agree.
"""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch
from open_clip.tokenizer import HFTokenizer as ReferenceTokenizer

from clipsearch.clip.text_tokenizers import HFTokenizer, canonicalize, clean_text
from clipsearch.clip.tokenizer import TextTooLongError
from clipsearch.errors import CheckpointError

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")  # transformers reads SentencePiece models with it

SCRIPTS = {
    "latin": "abcdefghijklmnopqrstuvwxyzéèêàçñøßüöäABCDEFGHIJKLMNOPQRSTUVWXYZÉÀÇÑ",
    "cyrillic": "абвгдежзийклмнопрстуфхцчшщъыьэюяАБВГДЕЖЗ",
    "greek": "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔ",
    "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "hebrew": "אבגדהוזחטיכלמנסעפצקרשת",
    "devanagari": "अआइईउऊएऐओऔकखगघचछजझटठडढणतथदधनपफबभमयरलवशषसह",
    "thai": "กขคงจฉชซญดตถทธนบปผพฟภมยรลวศษสหอฮ",
    "han": "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年山水火木金土日月猫狗赤円",
    "kana": "あいうえおかきくけこさしすせそたちつてとアイウエオカキクケコサシスセソ",
    "hangul": "가나다라마바사아자차카타파하고양이개빨간원",
    "emoji": "😀🐱🐶🔴🔵🌍✨🎉",
}
PUNCTUATION = ".,;:!?'\"()[]{}-_/&%$#@*+=<>~`^|\\…—–«»“”‘’"
# What ftfy, the HTML unescaping and whitespace cleaning have to deal with, and special tokens typed as text.
ODDITIES = ["&amp;", "&lt;b&gt;", "&#39;", "\u00a0", "\t", "\n", "  ", "ﬁ", "Ａ", "e\u0301", "â€™", "</s>", "<pad>"]


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 40 if rng.random() < 0.2 else 12)):
        draw = rng.random()
        if draw < 0.75:
            letters = SCRIPTS[rng.choice(list(SCRIPTS))]
            parts.append("".join(rng.choice(letters) for _ in range(rng.randint(1, 8))))
        elif draw < 0.85:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 6))))
        elif draw < 0.95:
            parts.append(rng.choice(PUNCTUATION) * rng.randint(1, 2))
        else:
            parts.append(rng.choice(ODDITIES))
    return rng.choice([" ", "", "  "]).join(parts)


def random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [random_text(rng) for _ in range(count)]


def train_spm(directory, kind: str) -> str:
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(text.replace("\n", " ") for text in random_texts(3000, seed=0)))
    prefix = str(directory / kind)
    common = dict(input=str(corpus), model_prefix=prefix, character_coverage=1.0, minloglevel=2)
    if kind == "gemma":  # Gemma: BPE with bytes for what is not in the vocabulary
        spm.SentencePieceTrainer.train(
            **common,
            vocab_size=1200,
            model_type="bpe",
            byte_fallback=True,
            **dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3),
            **dict(pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>"),
        )
    elif kind == "t5":  # T5 / SigLIP: pad 0, eos 1, unk 2, no bos
        spm.SentencePieceTrainer.train(
            **common, vocab_size=800, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1
        )
    else:  # XLM-R's SentencePiece: unk 0, bos 1, eos 2 (transformers shifts them)
        spm.SentencePieceTrainer.train(**common, vocab_size=800, model_type="unigram")
    return prefix + ".model"


def save_tokenizer(root, kind: str):
    """A tokenizer directory as published for ``kind``, and the clean mode and context length
    open_clip's configuration gives it. transformers converts the SentencePiece model when it
    loads a directory holding one under the name its class expects."""
    from transformers import GemmaTokenizer, T5Tokenizer, XLMRobertaTokenizer

    source = root / f"{kind}-source"
    source.mkdir()
    model = train_spm(root, kind)
    if kind == "t5":
        shutil.copy(model, source / "spiece.model")
        tokenizer = T5Tokenizer.from_pretrained(str(source), extra_ids=0, legacy=False)
        tokenizer.pad_token_id = 1
        clean, context = "canonicalize", 64
    elif kind == "gemma":
        shutil.copy(model, source / "tokenizer.model")
        tokenizer = GemmaTokenizer.from_pretrained(
            str(source), padding_side="right", add_bos_token=False, add_eos_token=True, legacy=False
        )
        tokenizer.pad_token_id, tokenizer.eos_token_id = 0, 1
        clean, context = "canonicalize", 64
    else:
        shutil.copy(model, source / "sentencepiece.bpe.model")
        tokenizer = XLMRobertaTokenizer.from_pretrained(str(source))
        clean, context = "whitespace", 77
    directory = root / f"{kind}-tokenizer"
    tokenizer.save_pretrained(directory)
    return directory, clean, context


def too_long(tokenizer: HFTokenizer, text: str) -> bool:
    try:
        tokenizer.ids(text, truncate=False)
    except TextTooLongError:
        return True
    return False


@pytest.fixture(scope="module", params=["t5", "gemma", "xlmr"])
def tokenizer_dir(request, tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp(request.param), request.param)


def test_ids_and_padding_match_open_clip(tokenizer_dir):
    directory, clean, context = tokenizer_dir
    texts = random_texts(2500, seed=1)
    reference = ReferenceTokenizer(str(directory), context_length=context, clean=clean)
    ours = HFTokenizer(directory, context_length=context, clean=clean)
    expected = reference(texts).numpy()
    got = ours.ids(texts, truncate=True)  # as open_clip's, which cuts without being asked
    mismatched = [text for text, a, b in zip(texts, expected, got) if not np.array_equal(a, b)]
    truncated = sum(too_long(ours, text) for text in texts)
    print(f"{directory.name}: {len(texts)} strings, {len(mismatched)} differ, {truncated} truncated")
    assert not mismatched, mismatched[:3]
    assert truncated > 10  # the long strings exercised the truncation
    assert (expected == ours.pad_id).any()
    assert torch.equal(ours(texts[:5], truncate=True), reference(texts[:5]))


def test_pad_ids_are_the_families_own(tokenizer_dir):
    directory, clean, context = tokenizer_dir
    ours = HFTokenizer(directory, context_length=context, clean=clean)
    assert (ours.pad_token, ours.pad_id) == {
        "t5-tokenizer": ("</s>", 1),
        "gemma-tokenizer": ("<pad>", 0),
        "xlmr-tokenizer": ("<pad>", 1),
    }[directory.name]
    ids = ours.ids("a")[0]
    assert ids[-1] == ours.pad_id and len(ids) == context


def test_a_long_text_is_refused_unless_truncate_is_given(tokenizer_dir):
    """As the CLIP tokenizer does: refused by default (it had been cut silently here alone)."""
    directory, clean, context = tokenizer_dir
    ours = HFTokenizer(directory, context_length=context, clean=clean)
    long_text = " ".join(random_texts(40, seed=2))
    for refused in ({}, {"truncate": False}):
        with pytest.raises(TextTooLongError):
            ours.ids(long_text, **refused)
        with pytest.raises(TextTooLongError):
            ours(long_text, **refused)
    assert ours.ids(long_text, truncate=True).shape == (1, context)
    assert ours.ids(long_text, context_length=8, truncate=True).shape == (1, 8)


def test_truncate_warn_cuts_as_true_and_warns_for_each_text_cut(tokenizer_dir, caplog):
    directory, clean, context = tokenizer_dir
    ours = HFTokenizer(directory, context_length=context, clean=clean)
    texts = [" ".join(random_texts(40, seed=2)), "a red circle"]
    assert np.array_equal(ours.ids(texts, truncate="warn"), ours.ids(texts, truncate=True))
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"the text {texts[0][:57] + '...'!r} is longer than the model's {context} tokens; the end was ignored"
    ]


def test_canonicalize_is_siglip_s():
    assert canonicalize("A photo_of  the CAT!!! (really).") == "a photo of the cat really"
    assert clean_text("  &amp;lt;b&amp;gt; Caf\u00e9\u00a0&#39;x&#39; ", "canonicalize") == "b café x"
    assert clean_text("Hello   World", "lower") == "hello world"
    assert clean_text("Hello   World", "whitespace") == "Hello World"
    with pytest.raises(ValueError):
        clean_text("x", "shout")


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot be read"):
        HFTokenizer(tmp_path, context_length=64)
