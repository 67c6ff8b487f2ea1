"""CLIP's ViT image tower as an ONNX Runtime graph (`clip.onnx_image`): within cosine 0.999 of
the fp32 tower, built and timed with a model's first verdict, cached and found stale with its
checkpoint, chosen when this machine's measurements say it finishes a run first, and then
indexing without ever importing torch."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import bump_mtime, make_library
from test_numpy_image import (
    SMALL,
    image_tower,
    indexed_in_a_new_process,
    needs_a_verdict,
    precisions_of_runs,
    with_costs,
)

from clipsearch.clip import cpu, numpy_image, onnx_graph, onnx_image, precision_verdicts
from clipsearch.clip.cpu import MIN_COSINE
from clipsearch.clip.numpy_image import ImageTower
from clipsearch.clip.preprocess import Preprocess
from clipsearch.encoder import Encoder, NumpyImageEncoder, open_encoder

pytestmark = pytest.mark.skipif(not onnx_graph.available(), reason="the onnx extra is not installed")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
    return np.sum(a * b, axis=1)


@pytest.mark.parametrize("quick_gelu", [True, False])
@pytest.mark.parametrize("codes", onnx_graph.weight_codes("image"))
def test_the_graph_is_the_tower(quick_gelu, codes):
    """Three layers of two heads at large random weights (peaked attention, big activations):
    a wrong patch order, class token, head split, residual bias or class-only last block puts
    cosines far under 0.999. In each of the weights' codes this CPU may build it with."""
    model = image_tower({**SMALL, "quick_gelu": quick_gelu})
    tower = ImageTower.from_model(model, Preprocess(32))
    assert tower is not None
    out = io.BytesIO()
    onnx_image.build(tower, codes, out, {"model": "test"})
    graph = onnx_image.OnnxImageTower(out.getvalue(), tower)
    pixels = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.encode_image(pixels).numpy()
    for threads in (1, 2):
        found = graph.encode_images(pixels.numpy(), threads)
        assert found.shape == expected.shape and found.dtype == np.float32
        assert cosines(found, expected).min() >= MIN_COSINE
    shuffled = graph.encode_images(pixels.numpy()[::-1].copy(), 1)[::-1]  # each image alone: order does not matter
    assert cosines(shuffled, expected).min() >= MIN_COSINE


def test_the_cached_graph_is_stale_when_the_checkpoint_or_layout_changes_and_ignored_when_damaged(
    model_dir: str, monkeypatch: pytest.MonkeyPatch
):
    from clipsearch import clip

    model, preprocess = clip.load(model_dir, device="cpu")
    tower = numpy_image.export(model, model_dir, preprocess)
    assert tower is not None and onnx_image.load_cached(model_dir) is None  # not built yet
    codes = onnx_graph.weight_codes("image")[0]
    path = onnx_image.export(tower, model_dir, codes)
    assert path == onnx_image.cache_file(model_dir) and path.parent == numpy_image.cache_file(model_dir).parent
    cached = onnx_image.load_cached(model_dir)
    assert cached is not None and repr(cached.preprocess) == repr(preprocess)
    pixels = np.stack([preprocess.array(p) for p in make_library(Path(model_dir).parent / "lib", 3)])
    with torch.no_grad():
        expected = model.encode_image(torch.from_numpy(pixels)).numpy()
    assert cosines(cached.encode_images(pixels), expected).min() >= MIN_COSINE

    bump_mtime(Path(model_dir) / "model.safetensors")
    numpy_image.export(model, model_dir, preprocess)  # the NumPy tower again, the graph not
    assert numpy_image.load_cached(model_dir) is not None
    assert onnx_image.load_cached(model_dir) is None  # built from the checkpoint as it was

    onnx_image.export(tower, model_dir, codes)
    assert onnx_image.load_cached(model_dir) is not None
    with monkeypatch.context() as patched:  # a cache shared with a CPU whose products differ
        other = not onnx_graph.has_vnni()
        patched.setattr(onnx_graph, "has_vnni", lambda: other)
        assert onnx_image.load_cached(model_dir) is None
    with monkeypatch.context() as patched:
        patched.setitem(onnx_graph.LAYOUTS, "text", onnx_graph.LAYOUTS["text"] + 1)  # another text graph only
        assert onnx_image.load_cached(model_dir) is not None
        patched.setitem(onnx_graph.LAYOUTS, "image", onnx_graph.LAYOUTS["image"] + 1)  # other image graphs
        assert onnx_image.load_cached(model_dir) is None
    assert onnx_image.load_cached(model_dir) is not None
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert onnx_image.load_cached(model_dir) is None  # damaged: ignored, never trusted


def test_the_cached_graphs_weights_lie_beside_it_in_a_file_each_build_names_anew(model_dir: str):
    """The graph names its weights file and its size; a build replaces both and removes the
    weights it replaced; the session reads the same weights as a graph holding them inside it
    would; a graph whose weights file is gone or cut short is not current."""
    import onnx

    from clipsearch import clip

    model, preprocess = clip.load(model_dir, device="cpu", towers="image")
    tower = numpy_image.export(model, model_dir, preprocess)
    assert tower is not None
    codes = onnx_graph.weight_codes("image")[0]
    names = []
    for _ in range(2):
        path = onnx_image.export(tower, model_dir, codes)
        assert path is not None
        recorded = onnx_graph.recorded(path)
        assert recorded is not None
        (weights,) = path.parent.glob("*.weights")  # the replaced build's removed
        assert recorded["weights"] == weights.name and recorded["weights_bytes"] == str(weights.stat().st_size)
        graph = onnx.load(str(path), load_external_data=False)
        outside = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert outside and all(len(t.raw_data) < 4096 for t in graph.graph.initializer)
        names.append(weights.name)
    assert names[0] != names[1]
    inside = io.BytesIO()
    onnx_image.build(tower, codes, inside)
    cached = onnx_image.load_cached(model_dir)
    assert cached is not None
    pixels = pixels_for(cached)
    np.testing.assert_array_equal(
        cached.encode_images(pixels), onnx_image.OnnxImageTower(inside.getvalue(), tower).encode_images(pixels)
    )
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-64])
    assert not onnx_graph.current(path, model_dir, "image") and onnx_image.load_cached(model_dir) is None
    weights.unlink()
    assert not onnx_graph.current(path, model_dir, "image")
    weights.write_bytes(whole)
    assert onnx_graph.current(path, model_dir, "image")


def test_the_graph_is_written_weight_by_weight_and_read_as_one_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Each weight reaches the file as it is added, so a build never holds the graph's weights
    together; ONNX (and the session, `test_the_graph_is_the_tower`) read the pieces as one model."""
    import onnx

    tower = ImageTower.from_model(image_tower(SMALL), Preprocess(32))
    assert tower is not None
    out, written = io.BytesIO(), []
    constant = onnx_graph.Graph.constant

    def noted(self, name, value):
        before = out.tell()
        found = constant(self, name, value)
        written.append((name, out.tell() - before, np.asarray(value).nbytes))
        return found

    monkeypatch.setattr(onnx_graph.Graph, "constant", noted)
    onnx_image.build(tower, onnx_graph.weight_codes("image")[0], out, {"model": "test"})
    assert all(grown >= size for _, grown, size in written)  # each weight written when added
    model = onnx.load_from_string(out.getvalue())
    assert [t.name for t in model.graph.initializer] == [name for name, _, _ in written]
    assert model.graph.name == "clip_image" and len(model.graph.node) > 0
    assert {p.key: p.value for p in model.metadata_props} == {"model": "test"}
    (tmp_path / "graph.onnx").write_bytes(out.getvalue())
    assert onnx_graph.recorded(tmp_path / "graph.onnx") == {"model": "test"}  # read past the pieces


def test_each_towers_verdicts_follow_its_own_graph_layout(monkeypatch: pytest.MonkeyPatch):
    """A new text graph measures text kernels again, not the image tower of every model, and
    the reverse."""
    checkpoint = {"files": [["model.safetensors", 1, 2, 3, 4]]}

    def keys() -> tuple[dict, dict]:
        image = precision_verdicts.key(checkpoint, False, ["fp32", "int8"], frozenset())
        return image, precision_verdicts.text_key(checkpoint, ["fp32", "int8"])

    image, text = keys()
    monkeypatch.setitem(onnx_graph.LAYOUTS, "text", onnx_graph.LAYOUTS["text"] + 1)
    assert keys()[0] == image and keys()[1] != text
    monkeypatch.setitem(onnx_graph.LAYOUTS, "image", onnx_graph.LAYOUTS["image"] + 1)
    assert keys()[0] != image


# Per image: ONNX 0.1 s after 0.6 s, NumPy 0.5 s after 0.01 s, torch 0.1 s (int8) after 2.5 s:
# NumPy for 1 image, ONNX from 2 on.
COSTS = {"fp32": [0.0, 0.4], "bf16": [0.1, 0.2], "int8": [1.0, 0.1], "numpy": [0.01, 0.5], "int8-onnx": [0.6, 0.1]}


@needs_a_verdict
def test_the_first_measurement_builds_and_times_the_graph(model_dir: str, measured: Path):
    verdict = json.loads(measured.read_text())
    preparing, per_image = verdict["costs"]["int8-onnx"]
    assert 0 < preparing < verdict["torch_start"] and per_image > 0
    assert onnx_image.load_cached(model_dir) is not None


@needs_a_verdict
def test_the_graph_is_timed_by_its_fastest_batch_as_torch_is(model_dir: str, monkeypatch: pytest.MonkeyPatch):
    """One slow batch (a busy moment) must not decide against the graph: it gets as many timed
    batches as each torch precision, and the fastest counts."""
    timed = cpu._timed_tower
    slow_first = iter([0.8, 0.08, 0.4])  # seconds per batch of `TIMING_BATCH`, the first caught in a busy moment

    def graph_timed(tower, pixels):
        seconds, found = timed(tower, pixels)
        return (next(slow_first) if isinstance(tower, onnx_image.OnnxImageTower) else seconds), found

    monkeypatch.setattr(cpu, "_timed_tower", graph_timed)
    monkeypatch.setattr(cpu, "TIMING_RUNS", 3)
    cpu.load_prepared(model_dir, "auto", towers="image", images=4)
    (path,) = precision_verdicts.verdict_file({}).parent.glob("*.json")
    assert json.loads(path.read_text())["costs"]["int8-onnx"][1] == pytest.approx(0.08 / cpu.TIMING_BATCH)


@needs_a_verdict
def test_a_drifting_graph_is_not_offered(model_dir: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(cpu, "MIN_COSINE", 1.0 + 1e-9)  # nothing but fp32 passes
    cpu.load_prepared(model_dir, "auto", towers="image", images=4)
    (path,) = precision_verdicts.verdict_file({}).parent.glob("*.json")
    assert "int8-onnx" not in json.loads(path.read_text())["costs"]


def built_with(model_dir: str) -> str:
    """The weights' codes the cached image graph of ``model_dir`` records."""
    recorded = onnx_graph.recorded(onnx_image.cache_file(model_dir))
    assert recorded is not None
    return json.loads(recorded["built_from"])["codes"]


@needs_a_verdict
def test_a_graph_whose_codes_drift_is_built_again_in_the_next(model_dir: str, monkeypatch: pytest.MonkeyPatch):
    """A CPU without VNNI tries 7-bit weights first, then 8: here the 7-bit codes are cut to
    -1..1, which no graph survives."""
    monkeypatch.setattr(onnx_graph, "weight_codes", lambda tower: ("s7", "u8"))
    monkeypatch.setitem(onnx_graph.CODES, "s7", 1)
    cpu.load_prepared(model_dir, "auto", towers="image", images=4)
    (path,) = precision_verdicts.verdict_file({}).parent.glob("*.json")
    assert "int8-onnx" in json.loads(path.read_text())["costs"]
    assert built_with(model_dir) == "u8"
    assert onnx_image.load_cached(model_dir) is not None  # either codes of this CPU is current


@needs_a_verdict
def test_the_first_codes_that_keep_to_fp32_are_kept(model_dir: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(onnx_graph, "weight_codes", lambda tower: ("s7", "u8"))
    cpu.load_prepared(model_dir, "auto", towers="image", images=4)
    assert built_with(model_dir) == "s7"
    monkeypatch.setattr(onnx_graph, "weight_codes", lambda tower: ("u8",))  # a CPU that never builds it
    assert onnx_image.load_cached(model_dir) is None


@needs_a_verdict
@pytest.mark.parametrize("images, tower", [(1, "numpy"), (3, "int8-onnx"), (1000, "int8-onnx")])
def test_the_tower_that_finishes_first_encodes_the_run(model_dir: str, measured: Path, images: int, tower: str):
    with_costs(measured, COSTS, torch_start=1.5)
    encoder = open_encoder(model_dir, "cpu", "auto", "image", images=images)
    assert isinstance(encoder, NumpyImageEncoder) and encoder.tower.kind == tower
    assert encoder.precision == {"numpy": "fp32-numpy", "int8-onnx": "int8-onnx"}[tower]


@needs_a_verdict
@pytest.mark.parametrize("graph_per_image, tower", [(0.104, "int8-onnx"), (0.106, None)])
def test_the_graph_runs_a_large_run_unless_torch_is_more_than_5_percent_faster(
    model_dir: str, measured: Path, graph_per_image: float, tower: str | None
):
    """Torch costs a process 300-500 MB more: its int8 must finish 5,000 images over 5% sooner."""
    with_costs(measured, {**COSTS, "int8": [1.0, 0.1], "int8-onnx": [0.6, graph_per_image]}, torch_start=1.5)
    # torch int8: 1.5 + 1.0 + 500 s; the graph: 0.6 + 520 s (within 5%) or 0.6 + 530 s (not)
    assert precision_verdicts.torchless_image_tower(model_dir, 5000) == tower


@needs_a_verdict
def test_a_warm_process_chooses_its_image_tower_for_many_images(model_dir: str, measured: Path):
    """A server encodes uploads for as long as it runs: the tower fastest per image, not the one
    that starts first (NumPy's, for one image)."""
    with_costs(measured, COSTS, torch_start=1.5)
    encoder = open_encoder(model_dir, "cpu", "auto", "image", warm=True)
    assert isinstance(encoder, NumpyImageEncoder) and encoder.tower.kind == "int8-onnx"
    faster_in_torch = {**COSTS, "int8": [1.0, 0.05]}
    with_costs(measured, faster_in_torch, torch_start=1.5)
    assert isinstance(open_encoder(model_dir, "cpu", "auto", "image", warm=True), Encoder)


@needs_a_verdict
def test_a_models_first_run_measures_then_opens_the_tower_it_found_fastest(model_dir: str):
    """A first run on this machine measures before it opens its image tower, and then takes the
    one the measurement found fastest for it, without torch where one of those wins: the
    measurement has let go of every model it loaded."""
    assert precision_verdicts.image_verdict(model_dir) is None
    opened = open_encoder(model_dir, "cpu", "auto", "image", images=100)
    assert precision_verdicts.image_verdict(model_dir) is not None  # measured, and remembered
    winner = precision_verdicts.torchless_image_tower(model_dir, 100)
    if winner is None:
        assert isinstance(opened, Encoder)
    else:
        assert isinstance(opened, NumpyImageEncoder) and opened.tower.kind == winner
    pixels = np.stack([opened.preprocess.array(p) for p in make_library(Path(model_dir).parent / "lib", 2)])
    with torch.no_grad():
        expected = Encoder(model_dir, "cpu", "fp32", "image").encode_images(pixels)
    assert cosines(opened.encode_images(pixels), expected).min() >= MIN_COSINE


@needs_a_verdict
def test_torch_runs_where_the_extra_is_missing_or_the_graph_gone(
    model_dir: str, measured: Path, monkeypatch: pytest.MonkeyPatch
):
    with_costs(measured, COSTS, torch_start=1.5)
    onnx_image.cache_file(model_dir).unlink()
    assert isinstance(open_encoder(model_dir, "cpu", "auto", "image", images=100), Encoder)
    # Without the extra the verdict does not apply (its key names onnxruntime's version): the
    # next run measures again before it opens its tower, and takes what that found fastest
    # among those it has (for one image, the NumPy tower).
    monkeypatch.setattr(onnx_graph, "available", lambda: False)
    assert precision_verdicts.torchless_image_tower(model_dir, 1) is None
    opened = open_encoder(model_dir, "cpu", "auto", "image", images=1)
    assert precision_verdicts.torchless_image_tower(model_dir, 1) == precision_verdicts.NUMPY
    assert isinstance(opened, NumpyImageEncoder) and opened.precision == "fp32-numpy"


@needs_a_verdict
def test_indexing_with_the_graph_never_imports_torch(model_dir: str, measured: Path, tmp_path: Path):
    with_costs(measured, COSTS, torch_start=1.5)
    out, expected, stored = indexed_in_a_new_process(tmp_path, model_dir, 6)
    assert (out["precision"], out["torch"], out["new"]) == ("int8-onnx", False, 6)
    assert cosines(np.array(out["vectors"]), expected).min() >= MIN_COSINE
    # Each photo's vector is stored (float16), each nearest its own photo's.
    assert sorted(np.argmax(stored @ expected.T, axis=1).tolist()) == list(range(6))


@needs_a_verdict
def test_an_index_moves_from_numpy_to_the_graph_when_a_later_run_is_larger(
    model_dir: str, measured: Path, tmp_path: Path
):
    with_costs(measured, COSTS, torch_start=1.5)
    assert precisions_of_runs(tmp_path, model_dir, [1, 8]) == ["fp32-numpy", "int8-onnx"]


@needs_a_verdict
def test_the_graph_file_says_what_it_was_built_from_without_a_session(model_dir: str, measured: Path):
    """`onnx_graph.recorded` steps over the graph's bytes to its metadata, as onnx reads it; a
    file cut short, or not a graph at all, is damaged, never current."""
    import onnx

    path = onnx_image.cache_file(model_dir)
    expected = {entry.key: entry.value for entry in onnx.load(str(path)).metadata_props}
    assert "built_from" in expected and onnx_graph.recorded(path) == expected
    assert onnx_graph.current(path, model_dir, "image")
    whole = path.read_bytes()
    for damaged in (whole[:-1], whole[: len(whole) // 2], b"not a graph" * 100):
        path.write_bytes(damaged)
        assert onnx_graph.recorded(path) is None and not onnx_graph.current(path, model_dir, "image")
    assert onnx_graph.recorded(path.with_name("missing.onnx")) is None


def pixels_for(graph: onnx_image.OnnxImageTower) -> np.ndarray:
    return cpu.calibration_images(graph.preprocess.resolution, count=3).numpy()


@needs_a_verdict
def test_the_session_opens_while_the_run_decodes(model_dir: str, measured: Path, monkeypatch: pytest.MonkeyPatch):
    """`load_cached` returns before ONNX Runtime has read the graph (a run decodes its first
    batch meanwhile); the first batch waits for the session."""
    import threading

    released, opening = threading.Event(), onnx_graph.session

    def held(*args, **kwargs):
        assert released.wait(10), "load_cached waited for the session"
        return opening(*args, **kwargs)

    monkeypatch.setattr(onnx_graph, "session", held)
    cached = onnx_image.load_cached(model_dir)
    assert cached is not None
    released.set()
    pixels = pixels_for(cached)
    assert cosines(cached.encode_images(pixels), cached.tower.encode_images(pixels)).min() >= MIN_COSINE


@needs_a_verdict
@pytest.mark.parametrize("images, tower", [(3, "int8-onnx"), (1, "numpy")])
def test_a_new_index_opens_its_graph_while_its_catalog_is_created(
    model_dir: str, measured: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, images: int, tower: str
):
    """`Index.open` of a new home begins opening the graph a run of unknown size would take
    before the catalog exists; the run encodes with that very tower, or lets it go for NumPy's
    (a single photo, by `COSTS`). A home that has a catalog begins nothing: its run may have
    nothing to encode."""
    from clipsearch import Index
    from clipsearch.catalog import CATALOG_FILE

    with_costs(measured, COSTS, torch_start=1.5)
    home, opening, begin, catalog_there, sessions = (
        tmp_path / "home",
        onnx_graph.session,
        onnx_image.load_cached,
        [],
        [],
    )

    def began(*args, **kwargs):  # on this thread: what submits the session's opening to its own
        catalog_there.append((home / CATALOG_FILE).exists())
        return begin(*args, **kwargs)

    def noted(*args, **kwargs):
        sessions.append(args)
        return opening(*args, **kwargs)

    monkeypatch.setattr(onnx_image, "load_cached", began)
    monkeypatch.setattr(onnx_graph, "session", noted)
    make_library(tmp_path / "lib", images)
    with Index.open(home, model=model_dir, device="cpu") as index:
        begun = index._begun
        assert isinstance(begun, onnx_image.OnnxImageTower) and catalog_there == [False]
        assert index.add([tmp_path / "lib"], workers=0).new == images
        encoder = index.encoder("image", images)
        assert isinstance(encoder, NumpyImageEncoder) and encoder.tower.kind == tower
        assert (encoder.tower is begun) == (tower == "int8-onnx") and index._begun is None
    # One session, begun early (the NumPy run may end before its thread starts it); none again for the run.
    assert catalog_there == [False] and len(sessions) <= 1 and (tower != "int8-onnx" or sessions)
    with Index.open(home, model=model_dir, device="cpu") as again:
        assert again._begun is None
    with Index.open(tmp_path / "other", model=model_dir, device="cpu", precision="int8") as named:
        assert named._begun is None


@needs_a_verdict
def test_a_graph_damaged_inside_leaves_the_numpy_tower_to_encode(
    model_dir: str, measured: Path, caplog: pytest.LogCaptureFixture
):
    """Its metadata whole, its graph not: the session fails on its thread, the run goes on with
    the NumPy tower's fp32 embeddings, said once."""
    path = onnx_image.cache_file(model_dir)
    recorded = onnx_graph.recorded(path)
    whole = bytearray(path.read_bytes())
    start = whole.index(b"DynamicQuantizeMatMul")  # an operator's name, inside the graph
    whole[start : start + 21] = b"NoSuchOperatorAtAll!!"
    path.write_bytes(bytes(whole))
    assert onnx_graph.recorded(path) == recorded
    cached = onnx_image.load_cached(model_dir)
    assert cached is not None
    pixels = pixels_for(cached)
    with caplog.at_level("WARNING", logger="clipsearch.clip.onnx_image"):
        for _ in range(2):
            np.testing.assert_array_equal(cached.encode_images(pixels), cached.tower.encode_images(pixels))
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"Cannot read the cached graph {path}"]
