"""SigLIP and XLM-RoBERTa CLIPs through `clip.load`, as a user meets them: an OpenCLIP hub folder,
the same folder without its configuration (what the registry downloads), a registry name whose
files are in the cache, and a Hugging Face ``SiglipModel`` saved with ``save_pretrained``.

Each is compared with its reference end to end on random weights: the tokenizer's ids (open_clip's
own tokenizer for the folder), the preprocessed pixels, and the logits, within 1e-5 in fp32.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_family_tokenizers import save_tokenizer
from test_hub import stand_in  # noqa: F401  (the stand-in hub, a fixture)
from test_siglip_parity import filled, reference

from clipsearch import clip
from clipsearch.clip import siglip
from clipsearch.clip.build import build_model
from clipsearch.clip.checkpoints import read_checkpoint
from clipsearch.clip.preprocess import SIGLIP_MEAN
from clipsearch.clip.siglip import SigLIP
from clipsearch.clip.text_tokenizers import HFTokenizer
from clipsearch.clip.xlmr import XlmrCLIP
from clipsearch.errors import CheckpointError

TOLERANCE = 1e-5
TEXTS = ["a photo of a Cat!", "ein roter Kreis", "un cercle rouge", "赤い円", "  two_dogs &amp; a ball  ", ""]
SQUASH = {"mean": list(SIGLIP_MEAN), "std": list(SIGLIP_MEAN), "interpolation": "bicubic", "resize_mode": "squash"}


def photo(seed: int = 0, size: tuple[int, int] = (300, 200)) -> Image.Image:
    """Smooth colour fields: bicubic resizing gives values a model can tell apart."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)


def save_weights(model: torch.nn.Module, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, path)


def copy_tokenizer(source, destination) -> None:
    for file in source.iterdir():
        shutil.copy(file, destination / file.name)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("t5"), "t5")[0]


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory, t5_dir):
    """An OpenCLIP hub folder as timm/ViT-B-16-SigLIP holds it, the model 2 blocks deep."""
    model, cfg = reference("ViT-B-16-SigLIP", vocab_size=1000)
    folder = tmp_path_factory.mktemp("hub") / "ViT-B-16-SigLIP"
    save_weights(model, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": {**cfg, "custom_text": True}, "preprocess_cfg": SQUASH})
    )
    copy_tokenizer(t5_dir, folder)
    return model, folder


def assert_same_logits(reference_model, ours, reference_pixels, our_pixels, reference_ids, our_ids) -> float:
    with torch.no_grad():
        expected, _ = reference_model.get_logits(reference_pixels, reference_ids)
        got, _ = ours(our_pixels, our_ids)
    diff = (expected - got).abs().max().item()
    assert diff <= TOLERANCE
    return diff


def test_openclip_folder_matches_open_clip_end_to_end(siglip_folder):
    model, folder = siglip_folder
    ours, preprocess = clip.load(folder, device="cpu")
    assert isinstance(ours, SigLIP) and ours.config.vision_layers == 2
    assert isinstance(ours.tokenizer, HFTokenizer)
    assert (ours.tokenizer.clean, ours.tokenizer.pad_id, ours.tokenizer.context_length) == ("canonicalize", 1, 64)
    assert preprocess.resize_mode == "squash" and preprocess.mean == SIGLIP_MEAN

    reference_tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    assert torch.equal(ours.tokenizer(TEXTS), reference_tokenizer(TEXTS))
    reference_preprocess = open_clip.image_transform(224, is_train=False, **SQUASH)
    images = [photo(seed, size) for seed, size in enumerate([(300, 200), (120, 400), (224, 224)])]
    ours_pixels = torch.stack([preprocess(image) for image in images])
    reference_pixels = torch.stack([reference_preprocess(image) for image in images])
    assert (ours_pixels - reference_pixels).abs().max() <= TOLERANCE
    diff = assert_same_logits(
        model, ours, reference_pixels, ours_pixels, reference_tokenizer(TEXTS), ours.tokenizer(TEXTS)
    )
    print(f"OpenCLIP folder: logits max abs diff {diff:.2e}")


def test_registry_name_downloads_the_hub_folder(siglip_folder, stand_in):  # noqa: F811
    """`clip.load("ViT-B-16-SigLIP")` fetches weights, open_clip_config.json and the tokenizer
    files from timm's repository into the hub cache, and gives what the folder gives."""
    model, folder = siglip_folder
    files = {file.name: file.read_bytes() for file in folder.iterdir()}
    files["special_tokens_map.json"] = json.dumps({"pad_token": "</s>", "eos_token": "</s>"}).encode()
    stand_in.push("timm/ViT-B-16-SigLIP", files)

    ours, preprocess = clip.load("ViT-B-16-SigLIP", device="cpu")
    from_folder, _ = clip.load(folder, device="cpu")
    assert ours.config == from_folder.config
    assert preprocess.resize_mode == "squash" and preprocess.mean == SIGLIP_MEAN and preprocess.resolution == 224
    ids = ours.tokenizer(TEXTS)
    assert torch.equal(ids, from_folder.tokenizer(TEXTS))
    pixels = preprocess(photo()).unsqueeze(0)
    assert_same_logits(model, ours, pixels, pixels, ids, ids)
    served = {request.path.rsplit("/", 1)[-1] for request in stand_in.requests}
    assert {"open_clip_config.json", "tokenizer.json", "open_clip_model.safetensors"} <= served


def test_folder_without_configuration_uses_shapes_and_siglip_defaults(siglip_folder, tmp_path, monkeypatch):
    """A hub folder without open_clip_config.json: the shapes and SigLIP's defaults (mean =
    std = 0.5, no crop, canonicalised text) stand in for it."""
    model, folder = siglip_folder
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "open_clip_config.json").unlink()
    # This model has 2 blocks; the shape table knows the published 12.
    towers = dict(siglip.TIMM_TOWERS)
    towers["vit_base_patch16_siglip_224"] = (16, 768, 2, 12, 3072, "none")
    monkeypatch.setattr(siglip, "TIMM_TOWERS", towers)

    ours, preprocess = clip.load(bare, device="cpu")
    from_folder, _ = clip.load(folder, device="cpu")
    assert ours.config == from_folder.config
    assert preprocess.resize_mode == "squash" and preprocess.mean == SIGLIP_MEAN and preprocess.resolution == 224
    assert ours.tokenizer.clean == "canonicalize"
    ids = ours.tokenizer(TEXTS)
    pixels = preprocess(photo()).unsqueeze(0)
    assert_same_logits(model, ours, pixels, pixels, ids, ids)


def test_folder_without_tokenizer_is_refused_for_text(siglip_folder, tmp_path):
    _, folder = siglip_folder
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "open_clip_model.safetensors", bare)
    shutil.copy(folder / "open_clip_config.json", bare)
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        clip.load(bare, device="cpu")
    image_only, _ = clip.load(bare, device="cpu", towers="image")
    assert image_only.tokenizer is None and image_only.text is None


def hf_siglip_config(**text):
    from transformers import SiglipConfig

    return SiglipConfig(
        text_config=dict(
            hidden_size=96,
            intermediate_size=200,
            num_hidden_layers=2,
            num_attention_heads=4,  # 24-wide heads: nothing assumes 64
            vocab_size=1300,
            max_position_embeddings=64,
            projection_size=96,  # the image tower has no projection: its width is the space
            hidden_act="gelu_pytorch_tanh",
            **text,
        ),
        vision_config=dict(
            hidden_size=96,
            intermediate_size=200,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=16,
            hidden_act="gelu_pytorch_tanh",
        ),
    )


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A SiglipModel saved with save_pretrained, a SigLIP 2-style Gemma tokenizer beside it."""
    from transformers import SiglipImageProcessor, SiglipModel

    root = tmp_path_factory.mktemp("hf-siglip")
    gemma_dir, _, _ = save_tokenizer(root, "gemma")
    torch.manual_seed(0)
    model = filled(SiglipModel(hf_siglip_config()))
    folder = root / "siglip"
    model.save_pretrained(folder)
    SiglipImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    copy_tokenizer(gemma_dir, folder)
    return model, folder


def test_huggingface_siglip_parity(hf_folder):
    model, folder = hf_folder
    state_dict, info = read_checkpoint(folder)
    assert info.format == "huggingface" and info.resize_mode == "squash" and info.image_mean == SIGLIP_MEAN
    ours = build_model(state_dict, config=info.config)
    assert (ours.config.text_gelu, ours.config.vision_heads, ours.config.embed_dim) == ("tanh", 4, 96)
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, 64, 64, generator=generator)
    ids = torch.randint(0, 1300, (4, 64), generator=generator)
    with torch.no_grad():
        expected = {
            "image": model.get_image_features(pixel_values=images).pooler_output,
            "text": model.get_text_features(input_ids=ids).pooler_output,
            "logits": model(input_ids=ids, pixel_values=images).logits_per_image,
        }
        got = {"image": ours.encode_image(images), "text": ours.encode_text(ids), "logits": ours(images, ids)[0]}
    assert min(value.abs().max().item() for value in expected.values()) > 0.01  # nothing trivially zero
    diffs = {key: (expected[key] - got[key]).abs().max().item() for key in expected}
    print("Hugging Face SiglipModel: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_huggingface_siglip_through_load(hf_folder):
    model, folder = hf_folder
    ours, preprocess = clip.load(folder, device="cpu")
    assert isinstance(ours.tokenizer, HFTokenizer) and ours.tokenizer.pad_id == 0  # Gemma pads with 0
    assert preprocess.resize_mode == "squash" and preprocess.resolution == 64
    ids = ours.tokenizer(TEXTS)
    assert ids.shape == (len(TEXTS), 64) and (ids[:, -1] == 0).all()
    with torch.no_grad():
        expected = model.get_text_features(input_ids=ids).pooler_output
        assert (ours.encode_text(ids) - expected).abs().max() <= TOLERANCE


def test_huggingface_siglip2_naflex_parity_at_its_square_grid(tmp_path):
    """Siglip2Model (NaFlex) on square images at its position grid (4x4 patches of 16 px): the
    patches transformers' processor makes, an all-ones patch mask, the same numbers."""
    from transformers import Siglip2Config, Siglip2Model

    settings = hf_siglip_config().to_dict()
    vision = {**settings["vision_config"], "num_patches": 16}
    vision.pop("image_size", None)
    torch.manual_seed(0)
    model = filled(Siglip2Model(Siglip2Config(text_config=settings["text_config"], vision_config=vision)))
    model.save_pretrained(tmp_path / "siglip2")
    state_dict, info = read_checkpoint(tmp_path / "siglip2")
    ours = build_model(state_dict, config=info.config)
    assert ours.config.image_resolution == 64
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    patches = images.reshape(2, 3, 4, 16, 4, 16).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 16 * 16 * 3)
    naflex = dict(
        pixel_values=patches, pixel_attention_mask=torch.ones(2, 16), spatial_shapes=torch.tensor([[4, 4]] * 2)
    )
    ids = torch.randint(0, 1300, (3, 64), generator=generator)
    with torch.no_grad():
        expected = {
            "image": model.get_image_features(**naflex).pooler_output,
            "text": model.get_text_features(input_ids=ids).pooler_output,
            "logits": model(input_ids=ids, **naflex).logits_per_image,
        }
        got = {"image": ours.encode_image(images), "text": ours.encode_text(ids), "logits": ours(images, ids)[0]}
    diffs = {key: (expected[key] - got[key]).abs().max().item() for key in expected}
    print("Hugging Face Siglip2Model (square grid): " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_other_huggingface_models_are_refused_clearly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip"}))
    with pytest.raises(CheckpointError, match="Siglip2Model"):
        read_checkpoint(tmp_path)


@pytest.fixture(scope="module")
def xlmr_pair(tmp_path_factory):
    from open_clip.model import CustomTextCLIP
    from test_xlmr_parity import encoder_config

    root = tmp_path_factory.mktemp("xlmr")
    encoder_config().save_pretrained(root / "config")
    cfg = open_clip.get_model_config("xlm-roberta-base-ViT-B-32")
    cfg = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "layers": 2}}
    cfg["text_cfg"] = {**cfg["text_cfg"], "hf_model_name": str(root / "config"), "hf_model_pretrained": False}
    torch.manual_seed(0)
    return filled(CustomTextCLIP(**cfg)), save_tokenizer(root, "xlmr")[0]


def test_xlm_roberta_registry_name_matches_open_clip(xlmr_pair, stand_in):  # noqa: F811
    """xlm-roberta-base-ViT-B-32 by name: LAION's weight file and XLM-RoBERTa's tokenizer.json,
    from two hub repositories; the same ids as open_clip's tokenizer, the same logits."""
    model, tokenizer_dir = xlmr_pair
    weights = io.BytesIO()
    torch.save(model.state_dict(), weights)
    stand_in.push(
        "laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k", {"open_clip_pytorch_model.bin": weights.getvalue()}
    )
    stand_in.push("FacebookAI/xlm-roberta-base", {"tokenizer.json": (tokenizer_dir / "tokenizer.json").read_bytes()})

    ours, preprocess = clip.load("xlm-roberta-base-ViT-B-32", device="cpu")
    assert isinstance(ours, XlmrCLIP) and preprocess.resize_mode == "shortest" and preprocess.resolution == 224
    assert (ours.tokenizer.pad_id, ours.tokenizer.clean, ours.tokenizer.context_length) == (1, "whitespace", 77)
    reference_tokenizer = open_clip.tokenizer.HFTokenizer(str(tokenizer_dir), context_length=77)
    assert torch.equal(ours.tokenizer(TEXTS), reference_tokenizer(TEXTS))
    reference_preprocess = open_clip.image_transform(224, is_train=False)
    image = photo()
    pixels = preprocess(image).unsqueeze(0)
    assert (pixels - reference_preprocess(image).unsqueeze(0)).abs().max() <= TOLERANCE
    ids = ours.tokenizer(TEXTS)
    diff = assert_same_logits(model, ours, pixels, pixels, ids, ids)
    print(f"xlm-roberta-base-ViT-B-32 by name: logits max abs diff {diff:.2e}")


def test_every_familys_tokenizer_refuses_a_text_too_long_unless_told_to_cut(siglip_folder):
    """`model.tokenizer(texts)` raised for a CLIP model and silently cut for a SigLIP one, so
    code written for any family broke on CLIP alone."""
    from clipsearch.clip.tokenizer import TextTooLongError

    ours, _ = clip.load(str(siglip_folder[1]), device="cpu")
    long = "a photo of " + "a very long caption " * 40
    with pytest.raises(TextTooLongError, match="more than the context length of 64"):
        ours.tokenizer([long])
    assert ours.tokenizer([long], truncate=True).shape == (1, 64)


def test_an_empty_batch_of_texts_encodes_to_no_rows(xlmr_pair):
    """open_clip answers [0, embed_dim]; ours raised from `max()` of nothing (CLIP and XLM-R)."""
    from clipsearch.clip.model import CLIP, ModelConfig

    tiny = CLIP(ModelConfig(16, 32, 1, 64, 16, 1, 8, 50, 64, 1, 1))
    xlmr = build_model(xlmr_pair[0].state_dict())
    for model, dim in ((tiny, 16), (xlmr, xlmr_pair[0].text.proj[-1].out_features)):
        with torch.no_grad():
            assert model.encode_text(torch.zeros(0, model.context_length, dtype=torch.long)).shape == (0, dim)


def test_classify_scores_one_label_alone_with_a_siglip_model(siglip_folder, tmp_path):
    """A SigLIP model gives each label its own probability ("is this a dog?"); classify had
    asked for two labels, which only CLIP's softmax needs."""
    from typer.testing import CliRunner

    from clipsearch.cli import app

    _, folder = siglip_folder
    image = tmp_path / "a.png"
    photo(3).save(image)
    args = ["--home", str(tmp_path / "home"), "classify", str(image), "--labels", "cat", "--model", str(folder)]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    (found,) = json.loads(result.stdout)
    ours, preprocess = clip.load(str(folder), device="cpu")
    with torch.no_grad():
        logits, _ = ours(preprocess(Image.open(image)).unsqueeze(0), ours.tokenizer(["a photo of a cat"]))
    # The CLI's encoder runs the precision this machine measured fastest (cosine >= 0.999 to fp32)
    assert found["labels"]["cat"] == pytest.approx(torch.sigmoid(logits).item(), abs=0.01)
