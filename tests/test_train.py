import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_layout import dependency_graph
from typer.testing import CliRunner

from clipsearch import clip
from clipsearch.cli import app
from clipsearch.clip.model import CLIP, ModelConfig
from clipsearch.clip.preprocess import Preprocess
from clipsearch.training import build
from clipsearch.training.checkpoint import METRICS_FILE, STATE_FILE
from clipsearch.training.data import datasets, positives, read_pairs
from clipsearch.training.loop import _train_step, recall_at_k, train
from clipsearch.training.options import TrainingError, TrainOptions
from clipsearch.training.scenes import SceneGenerator, write_scenes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(output, **overrides):
    settings = dict(
        output=output,
        config="tiny",
        epochs=2,
        batch_size=32,
        samples_per_epoch=32 * 4,
        val_size=64,
        lr=1e-3,
        warmup_steps=20,
        single_object_epochs=1,
        scene_style="classic",  # the grid scenes a tiny model learns within these few steps
        seed=0,
    )
    return TrainOptions(**{**settings, **overrides})


def weights(directory):
    return load_file(directory / "model.safetensors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few hundred steps of the tiny preset on synthetic scenes, with every step's loss."""
    output = tmp_path_factory.mktemp("run") / "model"
    torch.set_num_threads(1)
    losses = []
    results = train(tiny(output, epochs=2, samples_per_epoch=32 * 100), on_step=lambda info: losses.append(info.loss))
    return output, results, losses


def test_training_reduces_the_loss_and_beats_chance_recall(trained):
    _output, results, losses = trained
    assert len(losses) == 200
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first - 0.8
    chance = 5 / 64
    final = results[-1].recall
    assert final["text_to_image@5"] > 5 * chance and final["image_to_text@5"] > 5 * chance
    assert results[-1].train_loss < results[0].train_loss


def test_metrics_file_has_one_line_per_epoch(trained):
    output, results, _ = trained
    lines = [json.loads(line) for line in (output / METRICS_FILE).read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert lines[-1]["text_to_image@5"] == results[-1].recall["text_to_image@5"]
    assert lines[-1]["step"] == 200


def test_output_loads_with_clip_load_and_reproduces_the_held_out_recall(trained):
    output, results, _ = trained
    model, preprocess = clip.load(output, device="cpu")
    assert preprocess.resolution == 48
    scenes = SceneGenerator(seed=0, resolution=48).take(64, start=-64)  # the held-out split
    with torch.no_grad():
        images = torch.stack([preprocess(s.image) for s in scenes])
        texts = model.tokenizer([s.caption for s in scenes], context_length=model.context_length)
        recall = recall_at_k(model.encode_image(images), model.encode_text(texts))
    assert recall == pytest.approx(results[-1].recall, abs=1e-6)


def test_learned_vocabulary_round_trips_captions(trained):
    output, _, _ = trained
    model, _ = clip.load(output, device="cpu")
    tokenizer = model.tokenizer
    assert tokenizer.vocab_size == model.config.vocab_size
    for caption in SceneGenerator(seed=11)[3].captions:
        ids = tokenizer.encode(caption)
        assert len(ids) == len(caption.replace(",", " ,").replace(":", " :").split())  # one token per word
        assert tokenizer.decode(ids).split() == caption.replace(",", " ,").replace(":", " :").split()


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train(tiny(a))
    train(tiny(b))
    train(tiny(c, seed=1))
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(wa[key], wb[key]) for key in wa)
    assert not torch.equal(wa["visual.conv1.weight"], wc["visual.conv1.weight"])


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(tiny(straight))

    class Stop(Exception):
        pass

    def stop_after_first_epoch(result):
        raise Stop

    with pytest.raises(Stop):
        train(tiny(interrupted), on_epoch=stop_after_first_epoch)
    assert json.loads((interrupted / METRICS_FILE).read_text())["epoch"] == 1
    results = train(tiny(interrupted, resume=True))
    assert [r.epoch for r in results] == [2]
    ws, wi = weights(straight), weights(interrupted)
    assert all(torch.equal(ws[key], wi[key]) for key in ws)
    assert torch.load(interrupted / STATE_FILE, weights_only=True)["epoch"] == 2


def test_refuses_to_overwrite_a_run_or_resume_nothing(tmp_path):
    with pytest.raises(TrainingError, match="--resume"):
        train(tiny(tmp_path / "none", resume=True))
    train(tiny(tmp_path / "run", epochs=1))
    with pytest.raises(TrainingError, match="--resume"):
        train(tiny(tmp_path / "run", epochs=1))
    with pytest.raises(TrainingError, match="not both"):
        train(tiny(tmp_path / "x", init=str(tmp_path / "run")))


def test_refuses_an_output_that_holds_anything_else(tmp_path):
    """A model's folder named as the output had lost its vocabulary to the run's, even when the
    run then failed: the model still loaded, and classified wrongly."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "vocab.txt.gz").write_bytes(b"its own")
    with pytest.raises(TrainingError, match="is not empty; a run writes a model there"):
        train(tiny(model))
    assert [p.name for p in model.iterdir()] == ["vocab.txt.gz"] and (model / "vocab.txt.gz").read_bytes() == b"its own"
    (tmp_path / "file.txt").write_text("x")
    for output in (tmp_path / "file.txt", tmp_path / "file.txt" / "out"):
        with pytest.raises(TrainingError, match=r"file\.txt is a file; choose a new or empty output directory"):
            train(tiny(output))


@pytest.mark.parametrize(
    ("option", "value"),
    [("lr", -1.0), ("lr", 0.0), ("lr", math.nan), ("grad_clip", -1.0), ("grad_clip", math.inf), ("weight_decay", -5.0)],
)
def test_refuses_rates_and_norms_that_cannot_train(tmp_path, option, value):
    """A negative clip norm had turned every step uphill; the others trained nothing."""
    with pytest.raises(TrainingError, match=f"--{option.replace('_', '-')} must be a number"):
        train(tiny(tmp_path / "out", **{option: value}))
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_stops_and_saves_nothing(tmp_path):
    """At lr=inf the weights become NaN, whose recall had come out perfect (1.0) and been saved."""
    output = tmp_path / "out"
    with pytest.raises(TrainingError, match="The run diverged: the loss became nan at step 2"):
        train(tiny(output, lr=1e30, warmup_steps=0, grad_clip=1e30))
    assert not (output / "model.safetensors").exists() and not (output / "metrics.jsonl").exists()


def test_read_pairs_from_csv_jsonl_and_folder(tmp_path):
    manifest = write_scenes(tmp_path / "scenes", count=6, seed=2)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    csv_file = tmp_path / "scenes" / "pairs.csv"
    csv_file.write_text("path,caption\n" + "".join(f'{r["path"]},"{r["caption"]}"\n' for r in records))
    for record in records:
        (tmp_path / "scenes" / record["path"]).with_suffix(".txt").write_text(record["caption"] + "\n")
    expected = [(tmp_path / "scenes" / r["path"], r["caption"]) for r in records]
    assert read_pairs(manifest) == expected
    assert read_pairs(csv_file) == expected
    assert sorted(read_pairs(tmp_path / "scenes")) == sorted(expected)
    empty = tmp_path / "empty.csv"
    empty.write_text("path,caption\n")
    with pytest.raises(TrainingError, match="No image"):
        read_pairs(empty)


def test_fine_tune_on_files_with_a_locked_image_tower(trained, tmp_path):
    base, _, _ = trained
    write_scenes(tmp_path / "data", count=40, seed=3)
    output = tmp_path / "tuned"
    results = train(
        TrainOptions(
            output=output,
            data=tmp_path / "data" / "manifest.jsonl",
            init=str(base),
            epochs=1,
            batch_size=16,
            val_size=8,
            lr=1e-3,
            warmup_steps=1,
            lock_image=True,
        )
    )
    assert results[0].step == 2  # 32 training pairs after 8 are held out
    before, after = weights(base), weights(output)
    visual = [key for key in before if key.startswith("visual.")]
    text = [key for key in before if key.startswith("transformer.")]
    assert all(torch.equal(before[key], after[key]) for key in visual)
    assert any(not torch.equal(before[key], after[key]) for key in text)
    assert (output / "vocab.txt.gz").read_bytes() == (base / "vocab.txt.gz").read_bytes()


def test_curriculum_shows_one_object_scenes_first():
    options = TrainOptions(output="unused", single_object_epochs=2, samples_per_epoch=64)
    train_set, val = datasets(options, Preprocess(48), tokenizer=None, context_length=32)
    assert [train_set(epoch).generator.single_objects for epoch in range(4)] == [True, True, False, False]
    assert not val.generator.single_objects
    assert train_set(1).start == 64  # every epoch reads scenes no other epoch reads


def test_positives_mark_every_image_a_caption_describes():
    captions = ["a red circle", "a blue square", "a red circle and a blue square"]
    described = [
        "a red circle\na small red circle",
        "a blue square\na red circle",
        "a red circle and a blue square\na red circle\na blue square",
    ]
    assert positives(captions, described).tolist() == [[True, False, False], [True, True, False], [True, True, True]]


# A CLIP small enough to build in milliseconds, for tests of the optimiser's bookkeeping.
SMALL = ModelConfig(
    embed_dim=32,
    image_resolution=16,
    vision_layers=1,
    vision_width=64,
    vision_patch_size=8,
    vision_heads=1,
    context_length=8,
    vocab_size=20,
    text_width=64,
    text_heads=1,
    text_layers=1,
)


def test_weight_decay_skips_gains_biases_embeddings_and_temperature():
    model = CLIP(SMALL)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = build.optimizer(model, TrainOptions(output="unused")).param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert {
        "logit_scale",
        "token_embedding.weight",
        "positional_embedding",
        "visual.class_embedding",
        "visual.positional_embedding",
        "ln_final.weight",
        "visual.transformer.resblocks.0.attn.in_proj_bias",
    } <= undecayed
    assert {names[id(p)] for p in decay["params"]} >= {"text_projection", "visual.proj", "visual.conv1.weight"}


def test_logit_scale_is_clamped_after_each_step():
    model = CLIP(SMALL)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(500))
    options = TrainOptions(output="unused")
    optimizer = build.optimizer(model, options)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    texts = torch.randint(1, 19, (4, 8))
    texts[:, -1] = 19
    _train_step(model, torch.randn(4, 3, 16, 16), texts, None, optimizer, scaler, None, options)
    assert model.logit_scale.item() == pytest.approx(math.log(100))


def test_cli_trains_and_prints_the_recall_table(tmp_path):
    output = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(output),
            "--config",
            "tiny",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--samples-per-epoch",
            "32",
            "--val-size",
            "16",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()  # the progress bar is on stderr
    header = next(i for i, line in enumerate(lines) if line.startswith("epoch"))
    assert lines[header].split() == [
        "epoch",
        "step",
        "loss",
        "i2t@1",
        "i2t@5",
        "i2t@10",
        "t2i@1",
        "t2i@5",
        "t2i@10",
        "time",
    ]
    assert lines[header + 1].split()[:2] == ["1", "2"]
    assert (output / "model.safetensors").is_file()
    again = CliRunner().invoke(app, ["train", str(output), "--config", "tiny"])
    assert again.exit_code == 1 and "--resume" in again.output
    tiny = ["--config", "tiny", "--epochs", "1", "-b", "16", "--samples-per-epoch", "32", "--val-size", "16"]
    quiet = CliRunner().invoke(app, ["-q", "train", str(tmp_path / "quiet"), *tiny, "--threads", "1"])
    # -q prints nothing but results and errors, as for `index`: the table had been printed all the same
    assert (quiet.exit_code, quiet.stdout) == (0, "")
    assert (tmp_path / "quiet" / "model.safetensors").is_file()


def test_an_unknown_scene_style_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(app, ["train", str(tmp_path / "out"), "--scene-style", "cubist"])
    assert result.exit_code == 2 and "classic, varied, mixed" in result.output
    assert not (tmp_path / "out").exists()


def test_only_the_cli_reaches_into_training():
    """Training is a client of the engine and of the bundled CLIP, never a part of them."""
    graph = dependency_graph()
    users = {
        module
        for module, deps in graph.items()
        if not module.startswith("clipsearch.training") and any(d.startswith("clipsearch.training") for d in deps)
    }
    assert "clipsearch.training.loop" in graph and graph["clipsearch.training"] == set()
    assert users == {"clipsearch.cli"}
    assert {d for d in graph["clipsearch.cli"] if d.startswith("clipsearch.training")} == {
        "clipsearch.training.command"
    }
