"""The NumPy image tower (`clip.numpy_image`): the torch tower's embeddings to float32 rounding,
cached in the model cache and found stale when the checkpoint changes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import bump_mtime, checkpoint_lookups, make_library, python_output

from clipsearch import clip
from clipsearch.clip import cpu, numpy_image, precision_verdicts
from clipsearch.clip.model import CLIP, ModelConfig
from clipsearch.clip.numpy_image import ImageTower
from clipsearch.clip.preprocess import Preprocess
from clipsearch.encoder import Encoder, NumpyImageEncoder, open_encoder

SMALL = dict(
    embed_dim=48,
    image_resolution=32,
    vision_layers=3,
    vision_width=128,
    vision_patch_size=8,
    vision_heads=2,
    context_length=16,
    vocab_size=600,
    text_width=64,
    text_heads=1,
    text_layers=1,
)
# OpenAI's ViT-B/32 image tower.
VIT_B32 = {**SMALL, "embed_dim": 512, "image_resolution": 224, "vision_layers": 12, "vision_width": 768}
VIT_B32.update(vision_patch_size=32, vision_heads=12)


def image_tower(config: dict, scale: float | None = 0.1) -> CLIP:
    """A random image tower; with ``scale``, every weight drawn at that spread (large weights:
    peaked attention and big activations test more than the initialisation does)."""
    torch.manual_seed(0)
    model = CLIP(ModelConfig(**config), towers="image").eval()
    if scale is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0, scale)
    return model


def assert_image_parity(model: CLIP, count: int = 5) -> None:
    resolution = model.config.image_resolution
    pixels = torch.randn(count, 3, resolution, resolution, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.encode_image(pixels).numpy()
    for copy, threads in ((True, 1), (True, 2), (False, None)):  # views of the torch weights: as the verdict times it
        tower = ImageTower.from_model(model, Preprocess(resolution), copy=copy)
        assert tower is not None
        got = tower.encode_images(pixels.numpy(), threads)  # 2 threads: chunks of 4 and 1 images
        assert got.dtype == np.float32 and got.shape == expected.shape
        error = np.abs(got - expected).max() / np.abs(expected).max()
        assert error <= 1e-5, error


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_numpy_image_tower_matches_torch(quick_gelu):
    assert_image_parity(image_tower({**SMALL, "quick_gelu": quick_gelu}))


def test_a_resolution_the_patches_do_not_divide_is_cut_as_the_convolution_cuts_it():
    # 36 px in 16 px patches: a 2 x 2 grid, and the last 4 rows and columns never seen.
    assert_image_parity(image_tower({**SMALL, "image_resolution": 36, "vision_patch_size": 16, "vision_heads": 4}))


def test_numpy_image_tower_matches_torch_at_vit_b32_size():
    assert_image_parity(image_tower(VIT_B32, scale=None), count=2)


def test_activation_and_heads_are_read_off_the_model():
    tower = ImageTower.from_model(image_tower({**SMALL, "quick_gelu": False}), Preprocess(32))
    assert tower is not None and (tower.quick_gelu, tower.heads, tower.patch_size) == (False, 2, 8)


def test_a_tower_it_cannot_run_is_not_offered():
    resnet = {**SMALL, "vision_layers": (1, 1, 1, 1), "vision_width": 64, "vision_patch_size": None}
    resnet["vision_heads"] = 2
    assert ImageTower.from_model(image_tower(resnet, scale=None), Preprocess(32)) is None
    assert ImageTower.from_model(image_tower(SMALL).to(torch.bfloat16), Preprocess(32)) is None


def test_export_caches_the_tower_and_a_changed_checkpoint_makes_it_stale(model_dir: str):
    model, preprocess = clip.load(model_dir, device="cpu")
    assert numpy_image.load_cached(model_dir) is None
    exported = numpy_image.export(model, model_dir, preprocess)
    cached = numpy_image.load_cached(model_dir)
    assert exported is not None and cached is not None
    assert isinstance(cached.weights["proj"], np.memmap)  # mapped, not read
    assert repr(cached.preprocess) == repr(preprocess)  # the model's mean and std, not CLIP's
    pixels = np.stack([preprocess.array(_photo(seed)) for seed in range(3)])
    with torch.no_grad():
        expected = model.encode_image(torch.from_numpy(pixels)).numpy()
    assert np.abs(cached.encode_images(pixels) - expected).max() <= 1e-5 * np.abs(expected).max()

    bump_mtime(Path(model_dir) / "model.safetensors")
    assert numpy_image.load_cached(model_dir) is None  # stale: exported again with the next verdict

    numpy_image.export(model, model_dir, preprocess)
    path = numpy_image.cache_file(model_dir)
    path.write_bytes(path.read_bytes()[:-64])
    assert numpy_image.load_cached(model_dir) is None  # damaged: ignored, never trusted


def test_a_model_without_a_vit_tower_is_never_exported(model_dir: str):
    model, preprocess = clip.load(model_dir, device="cpu", towers="text")
    assert numpy_image.export(model, model_dir, preprocess) is None
    assert not numpy_image.cache_file(model_dir).exists()


def test_the_tower_is_written_from_the_checkpoint_reading_each_image_weight_once(
    model_dir: str, monkeypatch: pytest.MonkeyPatch
):
    """`export_checkpoint` builds no model: it reads each image-tower tensor of the checkpoint
    once (none of the text tower's) and writes the file `export` writes from a loaded model."""
    model, preprocess = clip.load(model_dir, device="cpu")
    from_model = numpy_image.export(model, model_dir, preprocess)
    assert from_model is not None
    expected = {key: np.array(value) for key, value in from_model.weights.items()}
    looked_up = checkpoint_lookups(monkeypatch)
    exported = numpy_image.export_checkpoint(model_dir)
    assert exported is not None and exported.config == model.config and exported.reading_s > 0
    weights = sorted(f"visual.{key}" for key in expected)
    assert sorted(key for key in looked_up if key != "logit_scale") == weights  # each once, the image tower's alone
    assert exported.tower.weights.keys() == expected.keys()
    for key, value in exported.tower.weights.items():
        assert isinstance(value, np.memmap) and np.array_equal(value, expected[key]), key
    assert exported.tower.logit_scale == from_model.logit_scale
    assert repr(exported.tower.preprocess) == repr(preprocess)


def test_a_float32_model_on_the_exported_file_holds_no_weight_of_its_own(
    model_dir: str, monkeypatch: pytest.MonkeyPatch
):
    """`cpu.measure`'s float32 model: each weight a view of the mapped file, the loaded
    model's embeddings to float32 rounding, and each block's pages let go once it has run."""
    model, preprocess = clip.load(model_dir, device="cpu", towers="image")
    exported = numpy_image.export_checkpoint(model_dir)
    assert exported is not None
    let_go: list[int] = []
    monkeypatch.setattr(exported.tower, "let_go", let_go.append)
    on_file = cpu._on_the_file(exported)
    mapped = exported.tower.weights["proj"]._mmap  # the whole file's mapping
    start = np.frombuffer(mapped, dtype=np.uint8).ctypes.data
    for name, parameter in on_file.visual.named_parameters():  # all but the scalar logit_scale
        offset = parameter.data_ptr() - start
        assert 0 <= offset < len(mapped), f"{name} is not a view of the file"
    pixels = torch.from_numpy(np.stack([preprocess.array(_photo(seed)) for seed in range(3)]))
    with torch.inference_mode():
        found, expected = on_file.encode_image(pixels), model.encode_image(pixels)
    assert (found - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert let_go == list(range(exported.tower.layers))


def test_a_checkpoint_the_tower_cannot_run_is_not_written(tmp_path: Path):
    from helpers import write_tiny_model

    resnet = write_tiny_model(tmp_path / "resnet", vision_layers=(1, 1, 1, 1), vision_width=64)
    assert numpy_image.export_checkpoint(str(resnet)) is None
    assert not numpy_image.cache_file(str(resnet)).exists()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_a_transient_tower_holds_one_block_of_its_file_at_a_time(model_dir: str):
    """A transient tower reads each block's weights from the mapped file and lets them go once
    the block has run (`ImageTower.let_go`): the process then holds little more of the file
    than the weights outside the blocks (the patch embedding, the projection)."""
    tower = ImageTower.from_model(image_tower(VIT_B32, scale=None), Preprocess(224))
    assert tower is not None
    path = numpy_image.cache_file(model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    numpy_image.tower_file.save(path, numpy_image._MAGIC, {"format": numpy_image._FORMAT, "source": {}, **{
        "quick_gelu": True, "heads": 12, "patch_size": 32, "logit_scale": 100.0, "resolution": 224,
        "mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "shortest", "interpolation": "bicubic",
    }}, tower.weights)  # fmt: skip
    mapped, _ = ImageTower.load(path)
    blocks = sum(value.nbytes for key, value in mapped.weights.items() if key.startswith("transformer."))
    outside = sum(value.nbytes for key, value in mapped.weights.items() if not key.startswith("transformer."))
    assert blocks > 300 << 20
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    mapped.transient = True
    before = _resident_file_bytes()
    found = mapped.encode_images(pixels, threads=1)
    held = _resident_file_bytes() - before
    assert held < outside + blocks / 12 + (8 << 20), f"{held >> 20} MiB of the file held"
    np.testing.assert_allclose(found, tower.encode_images(pixels, threads=1), rtol=0, atol=1e-5)
    mapped.transient = False  # a run's own tower keeps what it read
    mapped.encode_images(pixels, threads=1)
    assert _resident_file_bytes() - before > blocks


def _resident_file_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:")) << 10


# --- choosing it: the verdict's measurements ------------------------------------------------------

needs_a_verdict = pytest.mark.skipif(
    len(cpu.candidate_precisions("cpu")) == 1, reason="one candidate precision: no verdict is measured here"
)


def with_costs(path: Path, costs: dict, torch_start: float | None) -> None:
    verdict = json.loads(path.read_text())
    verdict["costs"] = costs
    verdict.pop("torch_start", None)
    if torch_start is not None:
        verdict["torch_start"] = torch_start
    path.write_text(json.dumps(verdict))


# Per image: NumPy 0.5 s, bf16 0.2 s after 1.5 + 0.1 s: NumPy first up to 5 images (up to 6
# on a CPU without bf16 instructions, where int8's 0.1 s comes after 1.5 + 1.0 s).
COSTS = {"fp32": [0.0, 0.4], "bf16": [0.1, 0.2], "int8": [1.0, 0.1], "numpy": [0.01, 0.5]}


@needs_a_verdict
def test_the_first_measurement_exports_and_times_the_numpy_tower(model_dir: str, measured: Path):
    verdict = json.loads(measured.read_text())
    preparing, per_image = verdict["costs"]["numpy"]
    assert 0 < preparing < verdict["torch_start"] and per_image > 0
    assert verdict["torch_start"] > 0.05  # importing torch in a new process
    assert numpy_image.load_cached(model_dir) is not None


@needs_a_verdict
def test_torch_start_counts_the_import_the_caller_timed(model_dir: str, monkeypatch: pytest.MonkeyPatch):
    def import_s(module: str) -> float:
        assert module != "torch", "timed torch's import again"
        return 0.1

    monkeypatch.setattr(cpu, "_import_s", import_s)
    cpu.load_prepared(model_dir, "auto", towers="image", images=4, torch_import_s=0.75)
    (path,) = precision_verdicts.verdict_file({}).parent.glob("*.json")
    start = json.loads(path.read_text())["torch_start"]
    assert 0.75 < start < 0.75 + 5  # and loading the tiny model


@needs_a_verdict
@pytest.mark.parametrize("images, numpy", [(1, True), (4, True), (8, False), (100, False)])
def test_numpy_encodes_a_run_when_the_measurements_say_it_finishes_first(
    model_dir: str, measured: Path, images: int, numpy: bool
):
    with_costs(measured, COSTS, torch_start=1.5)
    encoder = open_encoder(model_dir, "cpu", "auto", "image", images=images)
    assert isinstance(encoder, NumpyImageEncoder) is numpy
    assert isinstance(encoder, Encoder) is not numpy


@needs_a_verdict
def test_torch_stays_where_the_numpy_tower_was_not_asked_for_or_not_measured(model_dir: str, measured: Path):
    with_costs(measured, COSTS, torch_start=1.5)
    assert isinstance(open_encoder(model_dir, "cpu", "auto", "image", images=1), NumpyImageEncoder)
    assert isinstance(open_encoder(model_dir, "cpu", "fp32", "image", images=1), Encoder)  # a named precision
    assert isinstance(open_encoder(model_dir, "cpu", "auto", "image"), Encoder)  # how many images: not known
    assert isinstance(open_encoder(model_dir, "cpu", "auto", "both", images=1), Encoder)  # texts too
    numpy_image.cache_file(model_dir).unlink()
    assert isinstance(open_encoder(model_dir, "cpu", "auto", "image", images=1), Encoder)  # no tower
    with_costs(measured, {k: v for k, v in COSTS.items() if k != "numpy"}, torch_start=None)  # an older verdict
    assert isinstance(open_encoder(model_dir, "cpu", "auto", "image", images=1), Encoder)


def indexed_in_a_new_process(tmp_path: Path, model_dir: str, count: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """Index a library of ``count`` photos into a new home under ``tmp_path`` in a new process,
    as `clipsearch index` would: the image encoder's precision, whether torch was imported, how
    many photos were new, and the encoder's vectors of the photos; then, here, torch's fp32
    vectors of them and the vectors the catalog stored."""
    home, library = tmp_path / "home", tmp_path / "lib"
    photos = make_library(library, count)
    code = (
        "import json, sys\n"
        "import numpy as np\n"
        "from clipsearch import Index\n"
        f"with Index.open({str(home)!r}, model={model_dir!r}, device='cpu') as index:\n"
        f"    new = index.add([{str(library)!r}], workers=1).new\n"  # the decode worker's threads too
        f"    encoder = index.encoder('image', {len(photos)})\n"
        f"    pixels = np.stack([encoder.preprocess.array(p) for p in {list(map(str, photos))!r}])\n"
        "    vectors = encoder.encode_images(pixels).tolist()\n"
        "out = {'precision': encoder.precision, 'torch': 'torch' in sys.modules, 'new': new, 'vectors': vectors}\n"
        "print(json.dumps(out))\n"
    )
    out = json.loads(python_output(code))
    reference = Encoder(model_dir, "cpu", "fp32", towers="image")
    expected = reference.encode_images(np.stack([reference.preprocess.array(path) for path in photos]))
    with clip_index(home, model_dir) as index:
        _, stored = index.catalog.all_vectors(index.catalog.model(index.model))
    return out, expected, stored


@needs_a_verdict
def test_indexing_a_few_images_with_numpy_never_imports_torch(model_dir: str, measured: Path, tmp_path: Path):
    with_costs(measured, COSTS, torch_start=1.5)
    out, expected, stored = indexed_in_a_new_process(tmp_path, model_dir, 4)
    assert (out["precision"], out["torch"], out["new"]) == ("fp32-numpy", False, 4)
    vectors = np.array(out["vectors"], dtype=np.float32)
    assert np.abs(vectors - expected).max() <= 1e-5
    # The catalog keeps float16: each photo's vector, rounded, within a float16 step of it.
    rounded = vectors.astype(np.float16)
    nearest = [int(np.abs(rounded.astype(np.float32) - row).max(axis=1).argmin()) for row in stored]
    assert sorted(nearest) == list(range(4))
    steps = np.spacing(np.abs(rounded[nearest])).astype(np.float32)
    assert (np.abs(stored - rounded[nearest].astype(np.float32)) <= steps).all()


def clip_index(home: Path, model: str):
    from clipsearch import Index

    return Index.open(home, model=model, readonly=True)


def _photo(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8))


def precisions_of_runs(tmp_path: Path, model_dir: str, counts: list[int]) -> list[str]:
    """Index a library of each of ``counts`` new photos in turn, all through one `Index` (one
    process): the precision of the image encoder each run had."""
    from clipsearch import Index

    precisions = []
    with Index.open(tmp_path / "home", model=model_dir, device="cpu") as index:
        for run, count in enumerate(counts):
            make_library(tmp_path / f"run{run}", count, start_seed=100 * run)
            assert index.add([tmp_path / f"run{run}"], workers=0).new == count
            precisions.append(index.encoder("image", count).precision)
    return precisions


@needs_a_verdict
def test_an_index_opens_torch_when_a_later_run_is_too_large_for_numpy(model_dir: str, measured: Path, tmp_path: Path):
    """A library that adds a few photos, then many: the NumPy tower the first run got is not
    kept for a run it is slower on."""
    with_costs(measured, COSTS, torch_start=1.5)
    few, many = precisions_of_runs(tmp_path, model_dir, [3, 8])
    assert few == "fp32-numpy" and many in cpu.candidate_precisions("cpu")  # torch's


@needs_a_verdict
def test_an_index_prepares_int8_when_a_later_run_pays_for_it(model_dir: str, measured: Path, tmp_path: Path):
    """bf16 for 3 photos (int8's packing would not pay), then 20 in the same process: int8's
    preparation plus 20 images now costs less than 20 more in bf16, so it is prepared; a run of
    3 after that keeps int8, already paid for. fp32 takes bf16's place on a CPU without bf16
    instructions."""
    with_costs(measured, COSTS, torch_start=None)  # no NumPy tower in this verdict
    light = "bf16" if "bf16" in cpu.candidate_precisions("cpu") else "fp32"
    assert precisions_of_runs(tmp_path, model_dir, [3, 20, 3]) == [light, "int8", "int8"]
