"""Issue 16, target 4: what a model costs in memory while it is loaded and converted.

A model loaded for bf16 or int8 is converted weight by weight as it is read, so the float32
image tower never stands whole beside the converted one; "auto"'s one-off measurement holds the
float32 model and one converted trial at a time; and both give, value for value, the model that
converting a float32 one afterwards gives.

Memory is read from glibc's own books (``mallinfo2``: bytes handed out and not freed), sampled
each time a weight is read: exact where RSS would count what the allocator keeps for reuse.
"""

from __future__ import annotations

import ctypes
import gc
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from test_checkpoints import openai_archive
from test_cpu import fake_timings, precision_of

from clipsearch import clip
from clipsearch.clip import checkpoints, cpu, heap
from clipsearch.clip.checkpoints import write_model_dir
from clipsearch.clip.model import CLIP, ModelConfig

needs_int8 = pytest.mark.skipif(not cpu.has_int8_kernels(), reason="no int8 kernels in this PyTorch")

# An image tower big enough (14 MB of float32) that its weights, not Python's bookkeeping, are
# what the allocator's counts show; a text tower as small as it gets.
WIDE = dict(
    embed_dim=64,
    image_resolution=32,
    vision_layers=4,
    vision_width=256,
    vision_patch_size=16,
    vision_heads=4,
    context_length=8,
    vocab_size=514,
    text_width=32,
    text_heads=1,
    text_layers=1,
)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _libc_mallinfo2():
    try:
        function = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _Mallinfo2
    return function


_mallinfo2 = _libc_mallinfo2()
needs_glibc = pytest.mark.skipif(_mallinfo2 is None, reason="reads glibc's allocator statistics")


def bytes_in_use() -> int:
    assert _mallinfo2 is not None
    info = _mallinfo2()
    return info.uordblks + info.hblkhd  # in the arenas, and in blocks of their own (large tensors)


@pytest.fixture(scope="module")
def wide_model(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    vocab = Path(tiny_model).parent / "tiny-vocab.txt.gz"
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "wide"
    return str(write_model_dir(folder, CLIP(ModelConfig(**WIDE)), vocab, mean=(0.5,) * 3, std=(0.25,) * 3))


def image_tower_bytes(model_ref: str) -> int:
    model, _ = clip.load(model_ref, device="cpu", towers="image")
    assert model.visual is not None
    return sum(p.numel() * 4 for p in model.visual.parameters())


class _Sampling(Mapping[str, torch.Tensor]):
    """A state dict that notes the allocator's bytes in use, less ``base``, at each read."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], base: int, seen: list[int]):
        self._state_dict, self._base, self._seen = state_dict, base, seen

    def __getitem__(self, key: str) -> torch.Tensor:
        self._seen.append(bytes_in_use() - self._base)
        return self._state_dict[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._state_dict)

    def __len__(self) -> int:
        return len(self._state_dict)


def peak_while_loading(monkeypatch: pytest.MonkeyPatch, model_ref: str, precision: str) -> int:
    """The most bytes in use beyond those before `clip.load`, at any weight read and at the end."""
    real = checkpoints.read_checkpoint
    seen: list[int] = []
    gc.collect()
    base = bytes_in_use()

    def sampled(path):
        state_dict, info = real(path)
        return _Sampling(state_dict, base, seen), info

    monkeypatch.setattr(checkpoints, "read_checkpoint", sampled)
    model, _ = clip.load(model_ref, device="cpu", towers="image", precision=precision)
    seen.append(bytes_in_use() - base)
    del model
    return max(seen)


@needs_glibc
@pytest.mark.parametrize("precision", ["bf16", pytest.param("int8", marks=needs_int8)])
def test_a_converting_load_never_holds_the_float32_image_tower(
    wide_model: str, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    tower = image_tower_bytes(wide_model)
    # The measurement sees the weights: a float32 load holds them all by its last read.
    assert peak_while_loading(monkeypatch, wide_model, "fp32") > 0.9 * tower
    # bf16 holds half of float32, int8 0.57 here (a quarter for the projections, twice over:
    # oneDNN keeps the unpacked int8 weight beside its packed one; the patch embedding and
    # norms stay float32), plus the float32 weights of the one layer being read (0.08).
    assert peak_while_loading(monkeypatch, wide_model, precision) < 0.75 * tower


@needs_glibc
def test_an_openai_archive_is_loaded_without_its_weights_standing_whole_beside_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenAI's archives hold float16: read whole, they stood beside the float32 model as it was
    built (half its size again, and the text tower's); read a tensor at a time, the model and the
    one tensor being read are what a load holds."""
    torch.manual_seed(0)
    archive = str(openai_archive(CLIP(ModelConfig(**WIDE)), tmp_path / "ViT-wide.pt"))
    tower = image_tower_bytes(archive)
    # Here 1.16 of the tower: the model, the tensor being read and the 1 MiB the reads go
    # through. Read whole, the archive took it to 1.59.
    assert peak_while_loading(monkeypatch, archive, "fp32") < 1.3 * tower


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", pytest.param("int8", marks=needs_int8)])
def test_converting_while_loading_gives_the_model_converting_afterwards_gives(tiny_model: str, precision: str) -> None:
    loaded, _ = clip.load(tiny_model, device="cpu", precision=precision)
    model, _ = clip.load(tiny_model, device="cpu")
    converted = cpu.prepare_for_inference(model, precision).model
    assert [type(m) for m in loaded.modules()] == [type(m) for m in converted.modules()]
    assert loaded.state_dict().keys() == converted.state_dict().keys()
    for key, value in loaded.state_dict().items():
        assert value.dtype == converted.state_dict()[key].dtype
        assert torch.equal(value, converted.state_dict()[key]), key
    images = cpu.calibration_images(loaded.visual.input_resolution, count=2)
    text = loaded.tokenizer(["a red square", "two circles"], context_length=loaded.context_length)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    with torch.inference_mode():
        assert torch.equal(loaded.encode_image(images.to(dtype)), converted.encode_image(images.to(dtype)))
        if precision != "fp16":  # no half-precision text kernels on every CPU
            assert torch.equal(loaded.encode_text(text), converted.encode_text(text))


def test_a_float32_load_keeps_its_values(tiny_model: str) -> None:
    """Loading through the converting path changed nothing for float32: the checkpoint's own
    tensors, bit for bit."""
    state_dict, _ = checkpoints.read_checkpoint(Path(tiny_model))
    model, _ = clip.load(tiny_model, device="cpu")
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, state_dict[key].float()), key


def test_int8_is_refused_off_the_cpu(tiny_model: str) -> None:
    with pytest.raises(ValueError, match="CPU only"):
        clip.load(tiny_model, device="meta", precision="int8")


@needs_int8
def test_measuring_holds_one_trial_at_a_time(tiny_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "avx512_vnni"}))
    fake_timings(monkeypatch, fp32=3.0, bf16=1.0, int8=2.0)  # the first trial is the fastest: kept longest before
    real, trials = cpu._trial, []

    def noted(model, precision):
        gc.collect()
        assert [t() for t in trials] == [None] * len(trials), "an earlier trial is still held"
        trial = real(model, precision)
        trials.append(weakref.ref(trial))
        return trial

    monkeypatch.setattr(cpu, "_trial", noted)
    model, _ = clip.load(tiny_model, device="cpu", towers="image")
    prepared = cpu.prepare_for_inference(model, "auto")
    assert len(trials) == 2
    assert (prepared.precision, precision_of(prepared.model)) == ("bf16", "bf16")
    assert prepared.model is model  # converted in place: no second model


@needs_int8
def test_a_first_measurement_holds_one_model_at_a_time(tiny_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cpu.measure` times float32 on the NumPy tower's mapped file (never loaded whole) and then
    loads each trial from the checkpoint: none is loaded while an earlier one is still held, so
    a first run never holds two image towers."""
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "avx512_vnni"}))
    fake_timings(monkeypatch, fp32=3.0, bf16=1.0, int8=2.0)  # the first trial is the fastest: kept longest before
    real, models, loads = clip.load, [], []

    def noted(*args, precision=None, **kwargs):
        gc.collect()
        assert [m() for m in models] == [None] * len(models), "an earlier model is still held"
        loaded = real(*args, precision=precision, **kwargs)
        models.append(weakref.ref(loaded[0]))
        loads.append(precision)
        return loaded

    monkeypatch.setattr(clip, "load", noted)
    assert cpu.measure(tiny_model, "image")
    assert loads == ["bf16", "int8"]
    assert not cpu.measure(tiny_model, "image")  # remembered: nothing is loaded again
    assert loads == ["bf16", "int8"]
    prepared, _ = cpu.load_prepared(tiny_model, "auto", "cpu", "image")
    assert (prepared.precision, precision_of(prepared.model), loads[-1]) == ("bf16", "bf16", "bf16")


@needs_int8
def test_a_trial_copies_no_float32_weight(tiny_model: str) -> None:
    model, _ = clip.load(tiny_model, device="cpu", towers="image")
    weights = {p.data_ptr() for p in model.parameters()}
    bf16 = cpu._trial(model, "bf16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    int8 = cpu._trial(model, "int8")
    assert precision_of(int8) == "int8" and precision_of(model) == "fp32"
    assert {p.data_ptr() for p in int8.parameters()} <= weights  # shared, not copied


@needs_int8
def test_a_remembered_verdict_converts_while_loading(tiny_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second run of "auto" knows its precision before reading a weight, so it loads
    straight into it. The first measured: float32 on the NumPy tower's file, then the int8
    trial loaded converted, then the model it runs."""
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512f", "avx512_vnni"}))
    fake_timings(monkeypatch, fp32=2.0, int8=1.0)
    loads: list[str | None] = []
    real = clip.load

    def noted(*args, precision=None, **kwargs):
        loads.append(precision)
        return real(*args, precision=precision, **kwargs)

    monkeypatch.setattr(clip, "load", noted)
    first, _ = cpu.load_prepared(tiny_model, "auto", "cpu", "image")
    second, _ = cpu.load_prepared(tiny_model, "auto", "cpu", "image")
    named, _ = cpu.load_prepared(tiny_model, "bf16", "cpu", "image")
    assert loads == ["int8", "int8", "int8", "bf16"]
    assert (first.precision, second.precision, named.precision) == ("int8", "int8", "bf16")
    assert precision_of(second.model) == "int8"


def _resident_file_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_a_mapped_arrays_pages_leave_the_process_once_read(tmp_path: Path) -> None:
    """`heap.release_mapped` drops what reading a mapped file brought into this process's memory
    and nothing else: the array reads the same afterwards, and arrays in memory of the process's
    own are left alone."""
    values = np.arange(16 << 20, dtype=np.float32)  # 64 MiB
    values.tofile(tmp_path / "weights")
    mapped = np.memmap(tmp_path / "weights", dtype=np.float32, mode="r")
    before = _resident_file_kib()
    total = float(mapped[::1024].sum())  # a read of every page
    assert _resident_file_kib() - before > 60 << 10
    heap.release_mapped(mapped[1000:].reshape(-1, 8).T)  # a view, transposed, as a tower holds one
    assert _resident_file_kib() - before < 4 << 10
    assert float(mapped[::1024].sum()) == total
    own = values.copy()
    heap.release_mapped(own)
    assert np.array_equal(own, values)


@needs_glibc
def test_freed_memory_goes_back_to_the_system() -> None:
    """glibc keeps what a float32 tower freed: after one large block is freed, blocks of up to its
    size come from the heap and stay there when freed, until `heap.release_free_memory`."""

    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    torch.empty(8 << 20, dtype=torch.uint8).fill_(1)  # freed at once: raises glibc's mmap threshold
    start = resident()
    # Each block followed by a small one that stays: freed, the blocks are holes inside the heap,
    # which free() does not give back (the weights a conversion frees lie among what it kept).
    pairs = [(torch.ones(1 << 20, dtype=torch.uint8), torch.ones(4096, dtype=torch.uint8)) for _ in range(64)]
    kept = [small for _, small in pairs]
    del pairs
    heap.release_free_memory()
    assert resident() < start + (8 << 20)  # without the release, 17-64 MB of the 64 stayed
    assert len(kept) == 64


def test_a_cpu_batch_goes_through_the_model_in_chunks(tiny_encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """Activations grow with the images in one pass (ViT-B-32-256 int8: 110-225 MiB for 32), so
    a CPU encoder never hands the model more than `encoder.CPU_CHUNK` at once; the vectors are
    the batch's all the same."""
    from clipsearch import encoder

    pixels = cpu.calibration_images(tiny_encoder.resolution, count=2 * encoder.CPU_CHUNK + 3).numpy()
    whole = encoder._normalised(tiny_encoder.model.encode_image(torch.as_tensor(pixels)).detach())
    seen: list[int] = []
    real = tiny_encoder.model.encode_image

    def noted(images: torch.Tensor) -> torch.Tensor:
        seen.append(len(images))
        return real(images)

    monkeypatch.setattr(tiny_encoder.model, "encode_image", noted)
    vectors = tiny_encoder.encode_images(pixels)
    assert seen == [encoder.CPU_CHUNK, encoder.CPU_CHUNK, 3]
    assert vectors.shape == whole.shape
    assert abs(vectors - whole).max() <= 1e-5
