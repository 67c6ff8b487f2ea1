"""Hugging Face `CLIPModel` directories: saved with `save_pretrained`, read by our loader, the same
embeddings within 1e-5 (fp32, max abs).

Pooling: our text tower (like OpenAI's) takes the features at the largest token id; Hugging Face
takes them at the first `eos_token_id`. With CLIP's vocabulary the end-of-text token is the last
id, so the two agree; the small test vocabularies keep that property (eos = vocab_size - 1), and
the loader refuses a config where it does not hold.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from clipsearch.clip.checkpoints import read_checkpoint
from clipsearch.clip.model import build_model
from clipsearch.clip.tokenizer import Tokenizer
from clipsearch.errors import CheckpointError

TOLERANCE = 1e-5
VOCAB_SIZE = 60


def hf_config(hidden_act: str, **overrides) -> CLIPConfig:
    # Our model, like every CLIP, has 64-wide attention heads; widths are multiples of 64.
    text = dict(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=12,
        hidden_act=hidden_act,
        bos_token_id=VOCAB_SIZE - 2,
        eos_token_id=VOCAB_SIZE - 1,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=48,
        patch_size=16,
        hidden_act=hidden_act,
    )
    text.update(overrides.pop("text", {}))
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=48, **overrides)


def randomized(model: CLIPModel) -> CLIPModel:
    """No LayerNorm weight, bias or scalar left at a constant, so a misplaced one shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point() and tensor.ndim <= 1 and tensor.min() == tensor.max():
                tensor.add_(0.1 * torch.randn_like(tensor))
    return model.eval()


def token_ids(count: int, context: int, vocab_size: int) -> torch.Tensor:
    """[SOT, random ids, EOT, padding]: texts of varied length, one filling the whole context."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab_size - 2, (count, context), generator=generator)
    ids[:, 0] = vocab_size - 2
    for row, end in enumerate(torch.linspace(2, context - 1, count).round().long().tolist()):
        ids[row, end] = vocab_size - 1
        ids[row, end + 1 :] = 0
    return ids


def logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    return logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()


def assert_parity(reference: CLIPModel, directory: Path, image_size: int, context: int, vocab_size: int) -> dict:
    state_dict, info = read_checkpoint(directory)
    ours = build_model(state_dict, quick_gelu=info.quick_gelu)
    torch.manual_seed(2)
    images = torch.randn(2, 3, image_size, image_size)
    texts = token_ids(3, context, vocab_size)
    with torch.no_grad():
        ref_image = reference.get_image_features(pixel_values=images).pooler_output
        ref_text = reference.get_text_features(input_ids=texts).pooler_output
        our_image, our_text = ours.encode_image(images), ours.encode_text(texts)
        diffs = {
            "image": (our_image - ref_image).abs().max().item(),
            "text": (our_text - ref_text).abs().max().item(),
            "logits": (
                logits(our_image, our_text, ours.logit_scale) - logits(ref_image, ref_text, reference.logit_scale)
            )
            .abs()
            .max()
            .item(),
        }
    print(f"{directory.name}: max abs diff {diffs}")
    assert max(diffs.values()) <= TOLERANCE
    return diffs


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_small_model_parity(tmp_path, hidden_act):
    torch.manual_seed(0)
    reference = randomized(CLIPModel(hf_config(hidden_act)))
    reference.save_pretrained(tmp_path / hidden_act)
    _, info = read_checkpoint(tmp_path / hidden_act)
    assert info.format == "huggingface" and info.quick_gelu is (hidden_act == "quick_gelu")
    assert_parity(reference, tmp_path / hidden_act, 48, 12, VOCAB_SIZE)


def test_activation_is_read_not_assumed(tmp_path):
    """The GELU model through QuickGELU is measurably off: the parity above is not luck."""
    torch.manual_seed(0)
    reference = randomized(CLIPModel(hf_config("gelu")))
    reference.save_pretrained(tmp_path / "gelu")
    state_dict, _ = read_checkpoint(tmp_path / "gelu")
    images = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        wrong = build_model(state_dict, quick_gelu=True).encode_image(images)
        right = reference.get_image_features(pixel_values=images).pooler_output
    assert (wrong - right).abs().max() > 100 * TOLERANCE


@pytest.mark.slow
def test_vit_b_32_architecture_parity(tmp_path):
    """The real ViT-B/32 shapes (Hugging Face's CLIPConfig defaults), saved as safetensors."""
    torch.manual_seed(0)
    config = CLIPConfig()  # ViT-B/32: 768-wide 12-layer vision, 512-wide 12-layer text, 77 tokens
    config.text_config.eos_token_id = config.text_config.vocab_size - 1
    reference = randomized(CLIPModel(config))
    reference.save_pretrained(tmp_path / "vit-b-32")
    state_dict, _ = read_checkpoint(tmp_path / "vit-b-32")
    assert state_dict["visual.conv1.weight"].shape == (768, 3, 32, 32)
    assert state_dict["visual.proj"].shape == (768, 512)
    assert state_dict["transformer.resblocks.11.attn.in_proj_weight"].shape == (1536, 512)
    assert_parity(reference, tmp_path / "vit-b-32", 224, 77, 49408)


def test_legacy_pytorch_model_bin_with_position_ids(tmp_path):
    """Older transformers wrote pytorch_model.bin with `position_ids` buffers and eos_token_id 2."""
    torch.manual_seed(0)
    reference = randomized(CLIPModel(hf_config("quick_gelu", text=dict(eos_token_id=2))))
    directory = tmp_path / "legacy"
    reference.save_pretrained(directory)
    (directory / "model.safetensors").unlink()
    weights = dict(reference.state_dict())
    weights["text_model.embeddings.position_ids"] = torch.arange(12)[None]
    weights["vision_model.embeddings.position_ids"] = torch.arange(10)[None]
    torch.save(weights, directory / "pytorch_model.bin")
    assert_parity(reference, directory, 48, 12, VOCAB_SIZE)


def test_hugging_face_tokenizer_files_become_our_vocabulary(tmp_path):
    """merges.txt + vocab.json with CLIP's real vocabulary: our tokenizer built from them gives
    Hugging Face's CLIPTokenizer ids."""
    torch.manual_seed(0)
    directory = tmp_path / "with-tokenizer"
    CLIPModel(hf_config("quick_gelu")).save_pretrained(directory)
    write_clip_tokenizer_files(directory)
    _, info = read_checkpoint(directory)
    assert info.vocab_path is not None and info.vocab_path.name.endswith(".txt.gz")
    # No HTML entities: OpenAI's tokenizer (and ours) unescapes them, Hugging Face's does not.
    texts = ["a photo of a cat", "Hello, World!  café 東京 🙂", "don't stop; go", "a long caption " * 10]
    ours = Tokenizer(info.vocab_path)(texts, context_length=20, truncate=True)
    theirs = CLIPTokenizer.from_pretrained(directory)(texts, padding="max_length", max_length=20, truncation=True)
    expected = torch.tensor(theirs["input_ids"])
    for row, ids in enumerate(theirs["input_ids"]):
        expected[row, ids.index(49407) + 1 :] = 0  # Hugging Face pads with EOT; OpenAI and we with 0
    assert expected[3, -1] == 49407  # the long caption was cut
    assert torch.equal(ours, expected)


def test_vocab_json_that_disagrees_is_refused(tmp_path):
    directory = tmp_path / "added-token"
    CLIPModel(hf_config("quick_gelu")).save_pretrained(directory)
    write_clip_tokenizer_files(directory)
    vocab = json.loads((directory / "vocab.json").read_text())
    vocab["<|extra|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(CheckpointError, match=r"vocab.json"):
        read_checkpoint(directory)


def test_eos_token_that_is_not_the_largest_id_is_refused(tmp_path):
    directory = tmp_path / "odd-eos"
    CLIPModel(hf_config("quick_gelu", text=dict(eos_token_id=5))).save_pretrained(directory)
    with pytest.raises(CheckpointError, match="largest id"):
        read_checkpoint(directory)


def test_unsupported_activation_is_refused(tmp_path):
    directory = tmp_path / "relu"
    CLIPModel(hf_config("relu")).save_pretrained(directory)
    with pytest.raises(CheckpointError, match="activations"):
        read_checkpoint(directory)


def test_weights_without_the_text_tower_are_refused_naming_what_is_missing(tmp_path):
    """As a bare image-only state dict is (it had raised a KeyError, 'a bug' in the CLI)."""
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "image-only"
    CLIPModel(hf_config("quick_gelu")).save_pretrained(directory)
    weights = load_file(directory / "model.safetensors")
    text = ("text_model.", "text_projection.")
    save_file(
        {key: value for key, value in weights.items() if not key.startswith(text)}, directory / "model.safetensors"
    )
    with pytest.raises(CheckpointError, match=r"^The weights lack 'ln_final\.weight', so they are not a CLIP"):
        read_checkpoint(directory)


def write_clip_tokenizer_files(directory: Path) -> None:
    """vocab.json and merges.txt as Hugging Face publishes them for CLIP, built from OpenAI's
    vocabulary file with open_clip's reference tokenizer (whose special tokens it renames)."""
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:48_895]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {specials.get(token, token): i for token, i in SimpleTokenizer().encoder.items()}
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
