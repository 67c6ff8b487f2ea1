"""A run's output folder across runs that fail, stop or resume: a run that saved no epoch
leaves nothing behind, and --resume continues the run that was saved."""

import json

import pytest
import torch

from clipsearch.training.checkpoint import METRICS_FILE
from clipsearch.training.loop import train
from clipsearch.training.options import TrainingError, TrainOptions
from clipsearch.training.scenes import write_scenes


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def on_files(output, data, **overrides):
    settings = dict(output=output, data=data, config="tiny", epochs=1, batch_size=8, val_size=8, warmup_steps=0)
    return TrainOptions(**{**settings, **overrides})


def test_a_run_refused_for_too_few_pairs_leaves_nothing_and_the_folder_can_be_used(tmp_path):
    """The run had written its vocabulary first, so the folder was then refused both as not
    empty and as holding no run to resume."""
    few = write_scenes(tmp_path / "few", count=5, seed=1)
    enough = write_scenes(tmp_path / "enough", count=40, seed=1)
    output = tmp_path / "out"
    with pytest.raises(TrainingError, match="holds 5 pairs; training needs at least 10"):
        train(on_files(output, few))
    assert not output.exists()
    output.mkdir()  # an empty folder given as the output stays empty
    with pytest.raises(TrainingError, match="holds 5 pairs"):
        train(on_files(output, few))
    assert list(output.iterdir()) == []
    assert [r.epoch for r in train(on_files(output, enough))] == [1]


def test_a_run_interrupted_in_its_first_epoch_leaves_nothing(tmp_path):
    enough = write_scenes(tmp_path / "enough", count=40, seed=1)
    output = tmp_path / "out"

    def interrupt(info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(on_files(output, enough), on_step=interrupt)
    assert not output.exists()
    assert [r.epoch for r in train(on_files(output, enough))] == [1]
    assert [json.loads(line)["epoch"] for line in (output / METRICS_FILE).read_text().splitlines()] == [1]


def test_a_run_diverging_in_its_first_epoch_leaves_nothing(tmp_path):
    output = tmp_path / "out"
    options = TrainOptions(
        output=output,
        config="tiny",
        epochs=1,
        batch_size=8,
        samples_per_epoch=16,
        val_size=8,
        lr=1e30,
        warmup_steps=0,
        grad_clip=1e30,
    )
    with pytest.raises(TrainingError, match="The run diverged"):
        train(options)
    assert not output.exists()
