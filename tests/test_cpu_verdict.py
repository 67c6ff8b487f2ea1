"""clip.cpu's "auto" on a CPU: decided by measurement once per checkpoint and machine, then recalled."""

import json
from pathlib import Path

import pytest
from helpers import bump_mtime
from test_cpu import fake_timings, precision_of

from clipsearch import clip
from clipsearch.clip import cpu, precision_verdicts

pytestmark = pytest.mark.skipif(not cpu.has_int8_kernels(), reason="no int8 kernels: auto has no choice to make")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def bf16_and_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both candidates on offer, whatever this CPU has (the timings are faked)."""
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "avx512_vnni"}))


def prepare(model_ref: str) -> cpu.Prepared:
    model, _ = clip.load(model_ref, device="cpu")
    return cpu.prepare_for_inference(model, "auto", model_ref=model_ref)


@pytest.mark.parametrize("fastest", ["fp32", "bf16", "int8"])
def test_auto_picks_the_fastest_faithful_candidate(
    model_dir: str, bf16_and_int8: None, monkeypatch: pytest.MonkeyPatch, fastest: str
) -> None:
    seconds = {"fp32": 3.0, "bf16": 2.0, "int8": 2.5, fastest: 1.0}
    timed = fake_timings(monkeypatch, **seconds)
    prepared = prepare(model_dir)
    assert sorted(timed) == ["bf16", "fp32", "int8"]
    assert (prepared.precision, precision_of(prepared.model)) == (fastest, fastest)


def test_a_second_prepare_recalls_the_verdict(
    model_dir: str, bf16_and_int8: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    timed = fake_timings(monkeypatch, fp32=3.0, bf16=2.0, int8=1.0)
    with caplog.at_level("INFO", logger="clipsearch.clip.cpu"):
        assert prepare(model_dir).precision == "int8"
    assert len(timed) == 3
    assert "measured in" in caplog.text  # the one-off cost is said
    files = list((Path(precision_verdicts.verdict_file({}).parent)).iterdir())
    assert [f.suffix for f in files] == [".json"]  # no temporary file left behind
    assert json.loads(files[0].read_text())["precision"] == "int8"

    again = prepare(model_dir)
    assert len(timed) == 3  # nothing timed again
    assert (again.precision, precision_of(again.model)) == ("int8", "int8")


def test_a_changed_checkpoint_is_measured_again(
    model_dir: str, bf16_and_int8: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    timed = fake_timings(monkeypatch, fp32=3.0, bf16=2.0, int8=1.0)
    assert prepare(model_dir).precision == "int8"
    for weights in Path(model_dir).iterdir():
        bump_mtime(weights)
    timed = fake_timings(monkeypatch, fp32=3.0, bf16=1.0, int8=2.0)
    assert prepare(model_dir).precision == "bf16"
    assert len(timed) == 3


def test_another_torch_or_cpu_is_measured_again(
    model_dir: str, bf16_and_int8: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_timings(monkeypatch, fp32=3.0, bf16=2.0, int8=1.0)
    assert prepare(model_dir).precision == "int8"
    onnx_graph_available = precision_verdicts.onnx_graph.available()
    monkeypatch.setattr(precision_verdicts, "package_version", lambda name: "0.0.1")
    timed = fake_timings(monkeypatch, fp32=3.0, bf16=2.0, int8=1.0)
    prepare(model_dir)
    assert len(timed) == 3
    monkeypatch.setattr(precision_verdicts.onnx_graph, "available", lambda: not onnx_graph_available)
    timed = fake_timings(monkeypatch, fp32=3.0, bf16=2.0, int8=1.0)
    prepare(model_dir)  # the onnx extra installed, or removed
    assert len(timed) == 3
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "amx_bf16"}))
    timed = fake_timings(monkeypatch, fp32=3.0, bf16=2.0, int8=1.0)
    prepare(model_dir)
    assert len(timed) == 3


def test_a_damaged_verdict_is_measured_again(
    model_dir: str, bf16_and_int8: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_timings(monkeypatch, fp32=3.0, bf16=2.0, int8=1.0)
    prepare(model_dir)
    (verdict,) = Path(precision_verdicts.verdict_file({}).parent).iterdir()
    verdict.write_text('{"precision": ')
    timed = fake_timings(monkeypatch, fp32=1.0, bf16=2.0, int8=3.0)
    assert prepare(model_dir).precision == "fp32"
    assert len(timed) == 3


def test_a_named_precision_is_neither_measured_nor_remembered(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    timed = fake_timings(monkeypatch, fp32=3.0, bf16=2.0, int8=1.0)
    model, _ = clip.load(model_dir, device="cpu")
    assert cpu.prepare_for_inference(model, "int8", model_ref=model_dir).precision == "int8"
    assert timed == []
    assert not precision_verdicts.verdict_file({}).parent.exists()


def _verdict_path() -> Path:
    (path,) = Path(precision_verdicts.verdict_file({}).parent).iterdir()
    return path


def test_the_verdict_keeps_what_each_faithful_precision_costs(
    model_dir: str, bf16_and_int8: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_timings(monkeypatch, fp32=3.0, bf16=2.0, int8=1.0)
    prepare(model_dir)
    costs = json.loads(_verdict_path().read_text())["costs"]
    assert sorted(costs) == ["bf16", "fp32", "int8"]
    per_image = {name: per for name, (_, per) in costs.items()}
    assert per_image == {name: s / cpu.TIMING_BATCH for name, s in (("fp32", 3.0), ("bf16", 2.0), ("int8", 1.0))}
    assert costs["fp32"][0] == 0.0 and costs["bf16"][0] > 0 and costs["int8"][0] > 0  # converting takes time


@pytest.mark.parametrize("images, expected", [(None, "int8"), (4, "bf16"), (1000, "int8"), (0, "fp32")])
def test_a_run_of_few_images_takes_the_precision_that_costs_least_with_its_preparation(
    model_dir: str, bf16_and_int8: None, monkeypatch: pytest.MonkeyPatch, images: int | None, expected: str
) -> None:
    fake_timings(monkeypatch, fp32=3.0, bf16=2.0, int8=1.0)  # per image: 0.375, 0.25, 0.125 s
    prepare(model_dir)
    verdict = json.loads(_verdict_path().read_text())
    verdict["costs"] = {"fp32": [0.0, 0.375], "bf16": [0.1, 0.25], "int8": [5.0, 0.125]}
    _verdict_path().write_text(json.dumps(verdict))
    # 4 images: fp32 1.5 s, bf16 1.1 s, int8 5.5 s; 1,000: int8 130 s, bf16 250 s.
    (prepared, _) = cpu.load_prepared(model_dir, "auto", images=images)
    assert (prepared.precision, precision_of(prepared.model)) == (expected, expected)


def test_a_verdict_without_costs_keeps_its_precision_for_any_run(
    model_dir: str, bf16_and_int8: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_timings(monkeypatch, fp32=3.0, bf16=2.0, int8=1.0)
    prepare(model_dir)
    verdict = json.loads(_verdict_path().read_text())
    del verdict["costs"]  # as verdicts written before costs were kept
    _verdict_path().write_text(json.dumps(verdict))
    assert cpu.load_prepared(model_dir, "auto", images=1)[0].precision == "int8"


def test_cheapest_for_never_picks_what_was_not_measured_faithful():
    costs = {"fp32": (0.0, 0.3), "int8": (0.6, 0.1)}
    assert cpu.cheapest_for(2, costs, "int8") == "fp32"
    assert cpu.cheapest_for(10, costs, "int8") == "int8"
    assert cpu.cheapest_for(2, costs, "bf16") == "bf16"  # costs that do not know the verdict: the verdict
