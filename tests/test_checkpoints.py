"""read_checkpoint on every file format, made in the test from small random models."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import stat
import zipfile
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from clipsearch import clip
from clipsearch.clip.checkpoints import _ArchiveUnpickler, _module_tensors, read_checkpoint, write_model_dir
from clipsearch.clip.model import CLIP, ModelConfig, build_model
from clipsearch.errors import CheckpointError

# Our archives are made the way OpenAI made theirs, with torch.jit, which torch now deprecates.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")

VOCAB = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
TINY_VIT = ModelConfig(
    embed_dim=32,
    image_resolution=32,
    vision_layers=1,
    vision_width=64,
    vision_patch_size=16,
    vision_heads=1,
    context_length=8,
    vocab_size=50,
    text_width=64,
    text_heads=1,
    text_layers=1,
)
TINY_RESNET = ModelConfig(
    embed_dim=32,
    image_resolution=64,
    vision_layers=(1, 1, 1, 1),
    vision_width=8,
    vision_patch_size=None,
    vision_heads=4,
    context_length=8,
    vocab_size=50,
    text_width=64,
    text_heads=1,
    text_layers=1,
)


def tiny_model(config: ModelConfig = TINY_VIT) -> CLIP:
    torch.manual_seed(0)
    return CLIP(config).eval()


def tokens(config: ModelConfig = TINY_VIT) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, config.vocab_size - 1, (2, config.context_length), generator=generator)
    ids[:, -1] = config.vocab_size - 1
    return ids


def assert_same_weights(state_dict: dict, expected: dict) -> None:
    assert sorted(state_dict) == sorted(expected)
    for key, value in expected.items():
        assert state_dict[key].dtype == (torch.float32 if value.is_floating_point() else value.dtype), key
        assert torch.equal(state_dict[key], value.to(state_dict[key].dtype)), key


def openai_archive(model: CLIP, path: Path) -> Path:
    """An archive like OpenAI's releases: a traced fp16 model that also stores its scalars."""
    model.input_resolution = nn.Parameter(torch.tensor(model.config.image_resolution), requires_grad=False)
    model.context_length = nn.Parameter(torch.tensor(model.config.context_length), requires_grad=False)
    model.vocab_size = nn.Parameter(torch.tensor(model.config.vocab_size), requires_grad=False)
    traced = torch.jit.trace_module(model.half(), {"encode_text": tokens(model.config)})
    traced.save(str(path))
    return path


# --- OpenAI TorchScript archives -------------------------------------------------------------


@pytest.mark.parametrize("config", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_openai_archive_loads_as_fp32_without_its_scalars(tmp_path, config):
    model = tiny_model(config)
    expected = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = openai_archive(model, tmp_path / "ViT-B-32.pt")
    state_dict, info = read_checkpoint(path)
    assert info.format == "openai" and info.quick_gelu is True and info.vocab_path is None
    assert_same_weights(state_dict, expected)
    # The loaded weights are the fp16 values widened, so both models agree exactly in fp32.
    reference = CLIP(config).eval()
    reference.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in expected.items()})
    with torch.no_grad():
        text = tokens(config)
        assert torch.equal(build_model(state_dict).encode_text(text), reference.encode_text(text))


def test_openai_archive_matches_torch_jit_load(tmp_path):
    path = openai_archive(tiny_model(), tmp_path / "model.pt")
    jit_state = torch.jit.load(str(path), map_location="cpu").state_dict()
    for name in ("input_resolution", "context_length", "vocab_size"):
        jit_state.pop(name)
    assert_same_weights(read_checkpoint(path)[0], dict(jit_state))


def test_an_openai_archive_is_read_tensor_by_tensor(tmp_path, monkeypatch):
    """Nothing of the weights is read until a tensor is looked up, and then only its storage:
    loading the image tower alone reads none of the text tower's blocks, as from a safetensors
    file (its shapes are read off a few of its other tensors)."""
    model = tiny_model()
    path = openai_archive(model, tmp_path / "model.pt")
    with zipfile.ZipFile(path) as archive:
        (pickled,) = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        stored = dict(_module_tensors(_ArchiveUnpickler(archive, pickled.split("/")[0]).load()))
    text_blocks = {tensor.storage.name for key, tensor in stored.items() if key.startswith("transformer.")}
    read: list[str] = []
    real = zipfile.ZipFile.open

    def noted(self, name, *args, **kwargs):
        member = str(getattr(name, "filename", name))
        if "/data/" in member:
            read.append(member)
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", noted)
    state_dict, _ = read_checkpoint(path)
    assert read == []
    state_dict["visual.conv1.weight"]
    assert read == [stored["visual.conv1.weight"].storage.name]
    read.clear()
    image_only, _ = clip.load(str(path), device="cpu", towers="image")
    assert text_blocks and not text_blocks & set(read)
    whole = dict(read_checkpoint(path)[0])  # every tensor looked up: every storage read
    assert text_blocks <= set(read)
    with torch.no_grad():
        pixels = torch.randn(2, 3, model.config.image_resolution, model.config.image_resolution)
        assert torch.equal(image_only.encode_image(pixels), build_model(whole).encode_image(pixels))


def test_hostile_archive_is_refused_without_running_it(tmp_path):
    path = openai_archive(tiny_model(), tmp_path / "model.pt")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    hostile = tmp_path / "hostile.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(hostile, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps(Payload(), protocol=2)
            dst.writestr(item, data)
    with pytest.raises(CheckpointError, match="system is not allowed"):
        read_checkpoint(hostile)
    assert not marker.exists()


# --- OpenCLIP files --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openclip_state_dict() -> dict:
    """What open_clip 3.3 saves for a (small) standard CLIP: OpenAI's key names."""
    torch.manual_seed(0)
    reference = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=dict(layers=1, width=64, patch_size=16, image_size=32),
        text_cfg=dict(context_length=8, vocab_size=50, width=64, heads=1, layers=1),
    )
    return reference.state_dict()


def test_openclip_bin(tmp_path, openclip_state_dict):
    torch.save(openclip_state_dict, tmp_path / "open_clip_pytorch_model.bin")
    state_dict, info = read_checkpoint(tmp_path / "open_clip_pytorch_model.bin")
    assert info.format == "openclip" and info.quick_gelu is None
    assert_same_weights(state_dict, openclip_state_dict)
    build_model(state_dict)  # strict load: nothing missing, nothing extra


def test_openclip_safetensors(tmp_path, openclip_state_dict):
    save_file(openclip_state_dict, tmp_path / "open_clip_model.safetensors")
    state_dict, info = read_checkpoint(tmp_path / "open_clip_model.safetensors")
    assert info.format == "openclip"
    assert_same_weights(state_dict, openclip_state_dict)


def test_an_image_only_load_reads_no_text_tower_weights(tmp_path, openclip_state_dict, monkeypatch):
    """Indexing loads the image tower alone: of a safetensors file, only its tensors are read (and
    the few whose shapes tell the configuration), each into memory of its own, not mapped."""
    from clipsearch import clip
    from clipsearch.clip import checkpoints

    save_file(openclip_state_dict, tmp_path / "open_clip_model.safetensors")
    read: list[str] = []
    opened = checkpoints.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            assert kwargs.get("backend") == "pread"
            self.file = opened(*args, **kwargs)

        def keys(self):
            return self.file.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.file.get_tensor(key)

    monkeypatch.setattr(checkpoints, "safe_open", Spy)
    model, _ = clip.load(tmp_path / "open_clip_model.safetensors", device="cpu", towers="image")
    visual = {key for key in openclip_state_dict if key.startswith("visual.")}
    assert visual <= set(read)
    text_blocks = {key for key in openclip_state_dict if key.startswith("transformer.resblocks.")}
    assert text_blocks and not text_blocks & set(read)
    assert model.visual is not None and not hasattr(model, "token_embedding")
    for key, value in model.state_dict().items():
        assert torch.equal(value, openclip_state_dict[key].float()), key


def test_training_checkpoint_with_wrapper_and_module_prefix(tmp_path, openclip_state_dict):
    checkpoint = {
        "epoch": 32,
        "name": "ViT-B-32-quickgelu",
        "state_dict": {f"module.{k}": v.half() for k, v in openclip_state_dict.items()},
    }
    torch.save(checkpoint, tmp_path / "epoch_32.pt")
    state_dict, _ = read_checkpoint(tmp_path / "epoch_32.pt")
    assert_same_weights(state_dict, {k: v.half() for k, v in openclip_state_dict.items()})


def test_openclip_hub_directory(tmp_path, openclip_state_dict):
    save_file(openclip_state_dict, tmp_path / "open_clip_model.safetensors")
    config = {
        "model_cfg": {"embed_dim": 32, "quick_gelu": True},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    state_dict, info = read_checkpoint(tmp_path)
    assert info.format == "openclip" and info.quick_gelu is True
    assert info.image_mean == (0.5, 0.5, 0.5) and info.image_std == (0.25, 0.25, 0.25)
    assert_same_weights(state_dict, openclip_state_dict)
    del config["model_cfg"]["quick_gelu"]  # open_clip's default activation is exact GELU
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    assert read_checkpoint(tmp_path)[1].quick_gelu is False


@pytest.mark.parametrize(
    "settings", [{"interpolation": "bilinear"}, {"resize_mode": "longest"}, {"resize_mode": "squash"}, {}]
)
def test_openclip_hub_directory_preprocessing_is_open_clips(tmp_path, openclip_state_dict, settings):
    """Bilinear interpolation and the "longest" resize mode were ignored (bicubic, cropped)."""
    from PIL import Image

    save_file(openclip_state_dict, tmp_path / "open_clip_model.safetensors")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}, "preprocess_cfg": settings}))
    _, preprocess = clip.load(tmp_path, device="cpu", towers="image")
    reference = open_clip.image_transform(32, is_train=False, **settings)
    image = Image.effect_mandelbrot((97, 61), (-2, -1, 1, 1), 100).convert("RGB")
    assert (preprocess(image) - reference(image)).abs().max() <= 1e-6


@pytest.mark.parametrize(
    "name, value, known",
    [("interpolation", "lanczos", "bicubic, bilinear, random"), ("resize_mode", "pad", "shortest, squash, longest")],
)
def test_preprocessing_clipsearch_does_not_know_is_refused(tmp_path, openclip_state_dict, name, value, known):
    save_file(openclip_state_dict, tmp_path / "open_clip_model.safetensors")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"preprocess_cfg": {name: value}}))
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(tmp_path)
    assert str(err.value) == f"{tmp_path} asks for {name} {value!r}; clipsearch knows {known}."


# --- our own directories ---------------------------------------------------------------------


def test_own_directory_round_trip(tmp_path):
    model = tiny_model()
    model.config.quick_gelu = False
    directory = write_model_dir(tmp_path / "mine", model, VOCAB, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors", "vocab.txt.gz"]
    state_dict, info = read_checkpoint(directory)
    assert info.format == "clipsearch" and info.quick_gelu is False
    assert info.vocab_path == directory / "vocab.txt.gz"
    assert info.image_mean == (0.1, 0.2, 0.3) and info.image_std == (0.4, 0.5, 0.6)
    assert_same_weights(state_dict, model.state_dict())
    config = json.loads((directory / "config.json").read_text())
    del config["image_mean"], config["image_std"]
    assert ModelConfig.from_dict(config) == model.config


def test_own_directory_files_are_as_readable_as_the_umask_says(tmp_path):
    previous = os.umask(0o027)
    try:
        directory = write_model_dir(tmp_path / "mine", tiny_model(), VOCAB, mean=(0, 0, 0), std=(1, 1, 1))
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}
    assert modes == dict.fromkeys(["config.json", "model.safetensors", "vocab.txt.gz"], 0o640)


def test_own_directory_missing_vocab(tmp_path):
    directory = write_model_dir(tmp_path / "mine", tiny_model(), VOCAB, mean=(0, 0, 0), std=(1, 1, 1))
    (directory / "vocab.txt.gz").unlink()
    with pytest.raises(CheckpointError, match=r"lacks vocab.txt.gz"):
        read_checkpoint(directory)


# --- refusals --------------------------------------------------------------------------------


class Arbitrary:
    def __init__(self):
        self.weight = torch.zeros(2)


def test_pickled_object_is_refused(tmp_path):
    torch.save({"model": Arbitrary()}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="never unpickles") as err:
        read_checkpoint(tmp_path / "model.pt")
    assert str(tmp_path / "model.pt") in str(err.value)


@pytest.mark.parametrize(
    "name, content",
    [
        ("model.bin", b"this is not a checkpoint" * 20),
        ("model.pt", b""),
        ("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}"),
        ("model.pt", gzip.compress(b"zip? no")),
    ],
)
def test_garbage_is_refused_naming_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_photo_is_not_a_checkpoint(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(tmp_path / "photo.jpg")
    assert str(err.value) == (
        f"{tmp_path / 'photo.jpg'} is not a model checkpoint: it is not a zip archive, pickle or safetensors file, "
        "the formats weights are saved in."
    )


def test_formats_are_told_apart_by_content_not_name(tmp_path, openclip_state_dict):
    save_file(openclip_state_dict, tmp_path / "safetensors.bin")
    torch.save(openclip_state_dict, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("safetensors.bin", "legacy.pt"):
        assert_same_weights(read_checkpoint(tmp_path / name)[0], openclip_state_dict)


def test_missing_path_and_non_model_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint file or directory"):
        read_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="not a model directory"):
        read_checkpoint(tmp_path)


def test_a_plain_tensor_is_not_a_state_dict(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="does not contain a state dict"):
        read_checkpoint(tmp_path / "tensor.pt")


@pytest.mark.parametrize(
    "key, value",
    [("visual.proj", float("nan")), ("logit_scale", float("inf")), ("visual.proj", float("-inf"))],
)
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, openclip_state_dict, key, value):
    """One NaN made every vector NaN: the model indexed every photo and matched none."""
    broken = {name: tensor.clone() for name, tensor in openclip_state_dict.items()}
    broken[key].view(-1)[0] = value
    path = tmp_path / "model.safetensors"
    save_file(broken, path)
    with pytest.raises(CheckpointError) as err:
        clip.load(path, device="cpu")
    assert str(err.value) == f"{path} holds NaN or infinite values in {key}; it cannot be used."


def test_finite_weights_whose_sum_overflows_load(tmp_path, openclip_state_dict):
    large = dict(openclip_state_dict, **{"visual.proj": torch.full_like(openclip_state_dict["visual.proj"], 3e38)})
    save_file(large, tmp_path / "model.safetensors")
    model, _ = clip.load(tmp_path / "model.safetensors", device="cpu", towers="image")
    assert torch.equal(model.visual.proj, large["visual.proj"])
