"""Data and config files a run is given: what it reads, and the one-line errors for what it
cannot (a bad file is the user's to fix, not a bug to report)."""

import json

import pytest
import torch

from clipsearch.training.data import read_pairs
from clipsearch.training.loop import recall_at_k, train
from clipsearch.training.options import TrainingError, TrainOptions

TINY_CONFIG = {
    "embed_dim": 64,
    "image_resolution": 48,
    "vision_layers": 2,
    "vision_width": 64,
    "vision_patch_size": 16,
    "context_length": 32,
    "text_width": 64,
    "text_layers": 1,
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_recall_counts_ties_as_a_coin_toss_so_equal_features_score_chance():
    """A zero-width model's features are all equal; ties had counted as hits, recall 1.0."""
    features = torch.ones(20, 4)
    recall = recall_at_k(features, features)
    assert recall["image_to_text@1"] == pytest.approx(1 / 20)
    assert recall["text_to_image@5"] == pytest.approx(5 / 20)
    assert recall["image_to_text@10"] == pytest.approx(10 / 20)


def test_recall_is_unchanged_without_ties():
    """Image 0's text ranks second (text 1 lies nearer), image 1's third (texts 0 and 2 do)."""
    images = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    texts = torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]])
    recall = recall_at_k(images, texts, ks=(1, 2, 3))
    assert recall["image_to_text@1"] == pytest.approx(1 / 3)
    assert recall["image_to_text@2"] == pytest.approx(2 / 3)
    assert recall["image_to_text@3"] == 1.0


def test_a_tie_with_one_other_is_half_a_hit_at_1():
    images = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0]])
    texts = images.clone()
    recall = recall_at_k(images, texts, ks=(1, 2))
    assert recall["image_to_text@1"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert recall["image_to_text@2"] == 1.0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("embed_dim", 0, "embed_dim must be a whole number above 0, not 0"),
        ("text_layers", -1, "text_layers must be a whole number above 0, not -1"),
        ("image_resolution", 0, "image_resolution must be a whole number above 0, not 0"),
        ("vision_patch_size", 0, "vision_patch_size must be a whole number above 0, not 0"),
        ("vision_layers", [2, 0, 2, 2], "vision_layers must be a whole number above 0 or four of them"),
        ("context_length", 2.5, "context_length must be a whole number above 0, not 2.5"),
        ("image_resolution", 40, "image_resolution is 40, not a multiple of vision_patch_size 16"),
    ],
)
def test_a_config_with_sizes_that_cannot_build_a_model_is_refused(tmp_path, field, value, message):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY_CONFIG, field: value}))
    output = tmp_path / "out"
    with pytest.raises(TrainingError, match=f"^{config}: {message}"):
        train(TrainOptions(output=output, config=str(config), epochs=1, batch_size=8, samples_per_epoch=8))
    assert not output.exists()


def test_a_csv_or_jsonl_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM, which had become part of the first column's name:
    no 'path' column, so no pairs."""
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("path,caption\na.png,a café\nb.png,a dog\n", encoding="utf-8-sig")
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"path": "a.png", "caption": "a café"}\n', encoding="utf-8-sig")
    assert read_pairs(csv_file) == [(tmp_path / "a.png", "a café"), (tmp_path / "b.png", "a dog")]
    assert read_pairs(jsonl) == [(tmp_path / "a.png", "a café")]
