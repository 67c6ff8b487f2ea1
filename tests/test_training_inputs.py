"""Data and config files a run is given: what it reads, and the one-line errors for what it
cannot (a bad file is the user's to fix, not a bug to report)."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from clipsearch.cli import app
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


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def _cli_train(output, *args):
    return CliRunner().invoke(
        app,
        [
            "train",
            str(output),
            "--config",
            "tiny",
            "--epochs",
            "1",
            "-b",
            "8",
            "--val-size",
            "8",
            "--threads",
            "1",
            *args,
        ],
    )


def _bad_files(tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"path": "a.png", "caption": "x"}\n\n{not json\n', encoding="utf-8")
    not_object = tmp_path / "list.jsonl"
    not_object.write_text('{"path": "a.png", "caption": "x"}\n["a.png", "x"]\n', encoding="utf-8")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("path,caption\na.png,a caf\u00e9\n".encode("latin-1"))
    caption = tmp_path / "folder"
    caption.mkdir()
    (caption / "a.png").write_bytes(b"")
    (caption / "a.txt").write_bytes("caf\u00e9".encode("latin-1"))
    return [
        (jsonl, rf"^{jsonl}, line 3: not JSON \(Expecting property name enclosed in double quotes"),
        (not_object, rf"^{not_object}, line 2: not a JSON object with 'path' and 'caption'"),
        (latin, rf"^{latin} is not UTF-8 text \(byte 24 is not\); save it as UTF-8"),
        (caption, rf"^{caption / 'a.txt'} is not UTF-8 text \(byte 3 is not\); save it as UTF-8"),
    ]


def test_bad_data_files_are_named_with_the_line_and_what_is_wrong(tmp_path):
    for path, message in _bad_files(tmp_path):
        with pytest.raises(TrainingError, match=message):
            read_pairs(path)


def test_a_bad_data_file_is_one_line_not_a_bug_and_leaves_no_output(tmp_path):
    jsonl, _ = _bad_files(tmp_path)[0]
    result = _cli_train(tmp_path / "out", "--data", str(jsonl))
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {jsonl}, line 3: not JSON (Expecting property name enclosed in double quotes, column 2)."
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"embed_dim": 64,', r"is not JSON \(Expecting property name enclosed in double quotes, line 1 column 18\)"),
        ("[64]", r"is not a JSON object of a model's sizes"),
        (
            '{"embed_dim": 64}',
            "misses image_resolution, vision_layers, vision_width, vision_patch_size, context_length, text_width, "
            "text_layers",
        ),
    ],
)
def test_a_config_that_is_not_json_or_misses_fields_is_one_line(tmp_path, text, message):
    config = tmp_path / "config.json"
    config.write_text(text)
    result = _cli_train(tmp_path / "out", "--config", str(config))
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and "this is a bug" not in result.output
    assert re.search(f"^Error: {config}:? {message}", result.output), result.output
    assert not (tmp_path / "out").exists()


def test_fewer_synthetic_samples_than_a_scene_and_its_negatives_is_refused(tmp_path):
    """--samples-per-epoch 3 with 3 hard negatives had made an empty epoch: ZeroDivisionError."""
    with pytest.raises(TrainingError, match=r"^--samples-per-epoch must be at least 4 \(hard negatives \+ 1\)"):
        train(TrainOptions(output=tmp_path / "out", config="tiny", batch_size=8, samples_per_epoch=3))
    assert not (tmp_path / "out").exists()
