"""The NumPy image tower (`clip.numpy_image`): the torch tower's embeddings to float32 rounding,
cached in the model cache and found stale when the checkpoint changes."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import bump_mtime

from clipsearch import clip
from clipsearch.clip import numpy_image
from clipsearch.clip.model import CLIP, ModelConfig
from clipsearch.clip.numpy_image import ImageTower
from clipsearch.clip.preprocess import Preprocess

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
    tower = ImageTower.from_model(model, Preprocess(resolution))
    assert tower is not None
    got = tower.encode_images(pixels.numpy())
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


@pytest.fixture
def model_dir(tiny_model: str, tmp_path: Path) -> str:
    """A copy of the tiny model whose files a test may change."""
    return str(shutil.copytree(tiny_model, tmp_path / "model"))


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


def _photo(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8))
