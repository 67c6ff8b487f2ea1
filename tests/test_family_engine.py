"""The engine with a SigLIP model: another embedding width (96, not 512), text queries through
torch (the NumPy tower is CLIP's), sigmoid probabilities in zero-shot classification, and the
family told from the files without loading them.

The model is a small random Hugging Face ``SiglipModel`` folder with a Gemma-style tokenizer
(`test_family_load.hf_folder`), the way a user would point ``--model`` at one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_library
from test_family_load import hf_folder  # noqa: F401  (a fixture)

from clipsearch import Index
from clipsearch.clip import registry
from clipsearch.clip.families import family
from clipsearch.encoder import Encoder, TextEncoder, open_encoder
from clipsearch.search import zero_shot


def test_index_add_and_search_with_siglip(hf_folder, tmp_path):  # noqa: F811
    _, folder = hf_folder
    library = make_library(tmp_path / "lib", 6)
    with Index.open(tmp_path / "home", model=str(folder), device="cpu", precision="fp32") as index:
        index.add([tmp_path / "lib"], workers=0)
        assert index.status().dim == 96
        hits = index.search(library[2], k=3)
        assert hits[0].path == library[2] and hits[0].score == pytest.approx(1.0, abs=2e-3)
        text_hits = index.search("ein roter Kreis", k=6)
        vector = index.encoder("text").encode_texts(["ein roter Kreis"])[0]
        assert vector.shape == (96,)
        _, vectors = index.catalog.all_vectors(index.catalog.model(index.model))
    assert vectors.shape == (6, 96)
    expected = sorted(vectors @ vector, reverse=True)
    np.testing.assert_allclose([hit.score for hit in text_hits], expected, atol=2e-3)


def test_text_queries_run_in_torch_for_siglip(hf_folder, tiny_model):  # noqa: F811
    _, folder = hf_folder
    encoder = open_encoder(str(folder), towers="text")
    assert isinstance(encoder, Encoder) and encoder.model.visual is None
    assert encoder.logit_bias is not None
    assert isinstance(open_encoder(tiny_model, towers="text"), TextEncoder)  # CLIP keeps the NumPy tower


def test_no_numpy_text_tower_is_exported_for_siglip(hf_folder, monkeypatch):  # noqa: F811
    """The end of an indexing run prepares CLIP's NumPy text tower; for SigLIP that is refused
    before the model is loaded at all."""
    from clipsearch import clip
    from clipsearch.clip import numpy_text

    _, folder = hf_folder
    monkeypatch.setattr(clip, "load", lambda *args, **kwargs: pytest.fail("loaded"))
    with pytest.raises(ValueError, match="torch only"):
        numpy_text.export(str(folder))


def test_zero_shot_is_sigmoid_for_siglip(hf_folder, tmp_path):  # noqa: F811
    model, folder = hf_folder
    image = make_library(tmp_path / "lib", 1)[0]
    encoder = Encoder(str(folder), device="cpu", precision="fp32")
    labels = ["dog", "cat", "diagram"]
    probabilities = zero_shot(encoder, image, labels)
    image_vector = encoder.encode_images(encoder.preprocess(image).unsqueeze(0))[0]
    text_vectors = encoder.encode_texts([f"a photo of a {label}" for label in labels])
    scale, bias = model.logit_scale.exp().item(), model.logit_bias.item()
    expected = torch.sigmoid(torch.tensor(scale * text_vectors @ image_vector + bias)).numpy()
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)
    assert encoder.logit_bias == pytest.approx(bias)


def test_zero_shot_is_softmax_for_clip(tiny_encoder, tmp_path):
    image = make_library(tmp_path / "lib", 1)[0]
    probabilities = zero_shot(tiny_encoder, image, ["red", "blue", "green"])
    assert tiny_encoder.logit_bias is None
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-6)


def test_family_without_loading(hf_folder, tiny_model, tmp_path):  # noqa: F811
    _, folder = hf_folder
    assert family(str(folder)) == "siglip"
    assert family(tiny_model) == "clip"
    assert family("ViT-B-16-SigLIP2-256") == "siglip"
    assert family("xlm-roberta-base-ViT-B-32") == "xlmr"
    assert family("ViT-B/32") == "clip"
    assert {entry.family for entry in registry.MODELS} == {"clip", "siglip", "xlmr"}
    # A bare open_clip SigLIP file: its header names the timm tower.
    from safetensors.torch import save_file

    save_file({"visual.trunk.pos_embed": torch.zeros(1, 4, 8)}, tmp_path / "w.safetensors")
    assert family(tmp_path / "w.safetensors") == "siglip"


def test_registry_figures_are_complete():
    """Every downloadable entry can fill the models table: width, size, parameters."""
    for entry in registry.MODELS:
        if entry.bundled is None:
            assert entry.figures is not None, entry.name
            assert entry.figures.embed_dim in (512, 640, 768, 1024, 1152)
    siglip2 = registry.get("ViT-B-16-SigLIP2-256")
    assert (siglip2.family, siglip2.image_size, siglip2.figures.embed_dim) == ("siglip", 256, 768)
    assert (siglip2.asset.repo, siglip2.asset.files) == (
        "timm/ViT-B-16-SigLIP2-256",
        ("open_clip_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"),
    )
    xlmr = registry.get("xlm-roberta-base-ViT-B-32")
    assert (xlmr.tokenizer.repo, xlmr.tokenizer.filename) == ("FacebookAI/xlm-roberta-base", "tokenizer.json")
