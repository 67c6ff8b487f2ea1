"""A run's output folder across runs that fail, stop or resume: a run that saved no epoch
leaves nothing behind, and --resume continues the run that was saved."""

import json
import signal

import pytest
import torch
from reliability_helpers import start_cli, wait_until
from safetensors.torch import load_file
from typer.testing import CliRunner

from clipsearch.cli import app
from clipsearch.training.checkpoint import METRICS_FILE, OPTIONS_FILE
from clipsearch.training.loop import train
from clipsearch.training.options import TrainingError, TrainOptions
from clipsearch.training.scenes import write_scenes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    with pytest.raises(TrainingError, match="The run diverged"):
        train(scenes(output, epochs=1, lr=1e30, grad_clip=1e30))
    assert not output.exists()


def scenes(output, **overrides):
    """A run on synthetic scenes with nothing left at its default: a resume that fell back to
    the defaults (batch 128, 20,000 scenes an epoch, 10 epochs) shows at once."""
    settings = dict(
        output=output,
        config="tiny",
        epochs=2,
        batch_size=8,
        samples_per_epoch=16,
        val_size=8,
        warmup_steps=0,
        scene_style="classic",
        lr=1e-3,
    )
    return TrainOptions(**{**settings, **overrides})


def cli(*args):
    return CliRunner().invoke(app, ["train", *map(str, args)])


class Stop(Exception):
    pass


def stop(result):
    raise Stop


def test_resume_on_the_command_line_continues_the_saved_run_with_its_options(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(scenes(straight))
    with pytest.raises(Stop):
        train(scenes(interrupted), on_epoch=stop)
    result = cli(interrupted, "--resume", "--threads", "1")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (interrupted / METRICS_FILE).read_text().splitlines()]
    assert [(line["epoch"], line["step"]) for line in lines] == [(1, 2), (2, 4)]
    saved = json.loads((interrupted / OPTIONS_FILE).read_text())
    assert (saved["batch_size"], saved["samples_per_epoch"], saved["epochs"]) == (8, 16, 2)
    ws, wi = load_file(straight / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert all(torch.equal(ws[key], wi[key]) for key in ws)


def test_resume_with_more_epochs_extends_the_run(tmp_path):
    output = tmp_path / "run"
    train(scenes(output, epochs=1))
    result = cli(output, "--resume", "--epochs", 3, "--threads", 1, "--workers", 0)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (output / METRICS_FILE).read_text().splitlines()]
    assert [(line["epoch"], line["step"]) for line in lines] == [(1, 2), (2, 4), (3, 6)]
    assert json.loads((output / OPTIONS_FILE).read_text())["epochs"] == 3


def test_resume_refuses_options_that_would_change_the_run(tmp_path):
    output = tmp_path / "run"
    train(scenes(output, epochs=1))
    before = (output / METRICS_FILE).read_text()
    result = cli(output, "--resume", "-b", 16, "--lr", 0.1, "--scene-style", "varied")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: --resume continues the run saved in {output} with its own options; --batch-size, --lr and "
        "--scene-style would change it (drop them, or start a new run in another folder)."
    ]
    one = cli(output, "--resume", "--seed", 3)
    assert one.exit_code == 1 and one.output.strip().endswith(
        "--seed would change it (drop it, or start a new run in another folder)."
    )
    assert (output / METRICS_FILE).read_text() == before


def test_resume_takes_the_first_command_again_with_resume_added(tmp_path):
    """Options given again with the values the run was saved with change nothing: the first
    command with --resume added had been refused ("--lr would change it")."""
    output = tmp_path / "run"
    train(scenes(output, epochs=1))
    saved = json.loads((output / OPTIONS_FILE).read_text())
    again = ["--config", saved["config"], "-b", saved["batch_size"], "--lr", saved["lr"], "--epochs", 2]
    result = cli(output, "--resume", *again, "--threads", 1)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["epoch"] for line in (output / METRICS_FILE).read_text().splitlines()] == [1, 2]
    changed = cli(output, "--resume", "--lr", saved["lr"] * 2, "--epochs", 3)
    assert changed.exit_code == 1 and "--lr would change it" in changed.output


def test_resume_with_no_epochs_left_says_there_is_nothing_to_do(tmp_path):
    output = tmp_path / "run"
    train(scenes(output, epochs=2))
    before = (output / "model.safetensors").read_bytes()
    for args in (["--epochs", 1], [], ["--epochs", 2]):
        result = cli(output, "--resume", *args)
        assert result.exit_code == 1, result.output
        assert "Saved to" not in result.output
        assert result.output.strip().splitlines() == [
            f"Error: {output} has trained 2 epoch(s) already and --epochs asks for {args[1] if args else 2}; "
            "nothing to do (give --epochs above 2 to train on)."
        ]
    assert (output / "model.safetensors").read_bytes() == before


def test_a_run_killed_with_sigterm_removes_its_scratch_folder(tmp_path):
    """`kill PID` (a service manager, a job scheduler) had ended the process on the spot: each
    killed run left a clipsearch-train-* folder in the tmp dir for good."""
    data = write_scenes(tmp_path / "data", count=40, seed=1)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    options = ["--config", "tiny", "--epochs", "50", "--batch-size", "8", "--val-size", "8", "--threads", "1"]
    process = start_cli("train", tmp_path / "out", "--data", data, *options, env={"TMPDIR": str(tmp)})
    assert wait_until(lambda: any(tmp.glob("clipsearch-train-*/vocab.txt.gz")), timeout=60, process=process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert (process.returncode, stderr.decode().splitlines()[-1]) == (128 + signal.SIGTERM, "Interrupted.")
    assert list(tmp.iterdir()) == []
