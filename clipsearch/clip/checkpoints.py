"""Reading model weights from the formats they are published in, as state dicts with our names
(OpenAI's for CLIP, open_clip's for SigLIP and XLM-RoBERTa CLIP: `model.family_of`).

Formats, told apart by content rather than by file name:

- OpenAI's TorchScript archives (``ViT-B-32.pt``). ``torch.jit.load`` would compile and run the
  TorchScript code inside the archive, and ``torch.load(weights_only=True)`` refuses such
  archives for that reason (the path it used to take was CVE-2025-32434). We read only the
  tensors: ``data.pkl`` goes through an unpickler that knows four names (module stand-ins,
  tensor rebuild, storage types, OrderedDict) and refuses everything else.
- OpenCLIP files: safetensors, or torch.save's zip archives and legacy pickles read with
  ``torch.load(weights_only=True)``, whatever their names (the first bytes tell them apart);
  a bare state dict or one wrapped in ``state_dict``, with or without DistributedDataParallel's
  ``module.`` prefix. OpenCLIP hub directories
  (``open_clip_config.json`` beside the weights) also give the activation, head widths,
  mean/std and resize mode, and for SigLIP and XLM-R the ``tokenizer.json`` beside them; a hub
  directory without its configuration (as the registry fetches SigLIP) is read the same way.
- Hugging Face ``CLIPModel`` directories (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), renamed key by key; their ``merges.txt`` becomes our vocabulary file.
  ``SiglipModel`` directories likewise (`clip.hf_siglip`), with their ``tokenizer.json``.
- Our own directories: ``config.json`` (`ModelConfig.to_dict()` plus ``image_mean`` and
  ``image_std``), ``model.safetensors`` and ``vocab.txt.gz``, written by `write_model_dir`.

Every floating tensor comes back as float32; `clip.load` picks the device precision. A state
dict read from a safetensors file is lazy: a tensor is read when it is asked for, so loading one
tower (`towers="image"` for indexing) reads only that tower's weights.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import stat
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from clipsearch.clip import hf_siglip, siglip
from clipsearch.clip.hf_names import check_placed, fuse
from clipsearch.clip.model import CLIP, config_from_state_dict, family_of
from clipsearch.clip.preprocess import RESAMPLING, RESIZE_MODES
from clipsearch.clip.tokenizer import Tokenizer
from clipsearch.errors import CheckpointError
from clipsearch.paths import model_cache_dir, new_file_mode

Mean = tuple[float, float, float]

# Scalars OpenAI's archives store beside the weights; the model derives them from shapes.
_NON_PARAMETERS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself beyond its weights; None where it says nothing."""

    format: str  # "openai", "openclip", "huggingface" or "clipsearch"
    quick_gelu: bool | None = None
    vocab_path: Path | None = None  # the model's own BPE vocabulary, if not CLIP's
    image_mean: Mean | None = None
    image_std: Mean | None = None
    # The model's configuration where the checkpoint states it (open_clip_config.json, a Hugging
    # Face config.json): head counts and activations the weights cannot show.
    config: Any = None
    # A directory with the tokenizer.json of a SigLIP or XLM-R model, and open_clip's cleaning for it.
    tokenizer_dir: Path | None = None
    text_clean: str | None = None
    # open_clip's preprocess_cfg names (`preprocess.RESIZE_MODES`, `preprocess.RESAMPLING`).
    resize_mode: str | None = None
    interpolation: str | None = None


def read_checkpoint(path: str | Path) -> tuple[Mapping[str, torch.Tensor], CheckpointInfo]:
    """The float32 state dict (OpenAI key names) of the checkpoint file or directory at `path`,
    each tensor converted (and, from a safetensors file, read) when it is looked up."""
    path = Path(path).expanduser()
    if path.is_dir():
        state_dict, info = _read_directory(path)
    elif path.is_file():
        state_dict, info = _read_file(path)
    else:
        raise CheckpointError(f"There is no checkpoint file or directory at {path}.")
    return _finite(_clean(state_dict), path), _checked_normalisation(info, path)


def write_model_dir(
    directory: str | Path, model: CLIP, vocab_path: str | Path, *, mean: Sequence[float], std: Sequence[float]
) -> Path:
    """Save `model` in clipsearch's own format, which keeps its vocabulary and normalisation with it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {**model.config.to_dict(), "image_mean": list(mean), "image_std": list(std)}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    save_file(weights, directory / "model.safetensors")
    os.chmod(directory / "model.safetensors", new_file_mode())  # safetensors makes it the owner's alone
    shutil.copyfile(vocab_path, directory / "vocab.txt.gz")
    return directory


# --- files -----------------------------------------------------------------------------------


def _read_file(path: Path) -> tuple[Mapping[str, torch.Tensor], CheckpointInfo]:
    kind = _kind_of_file(path)
    if kind == "safetensors":
        return _load_safetensors(path), CheckpointInfo("openclip")
    if kind is None:
        raise CheckpointError(
            f"{path} is not a model checkpoint: it is not a zip archive, pickle or safetensors file, "
            "the formats weights are saved in."
        )
    if kind == "zip":
        with zipfile.ZipFile(path) as archive:
            _check_unpacked_size(path, archive)
            if any(name.endswith("/constants.pkl") for name in archive.namelist()):
                return _read_torchscript(path, archive), CheckpointInfo("openai", quick_gelu=True)
    return _unwrap(_torch_load(path), path), CheckpointInfo("openclip")


def _kind_of_file(path: Path) -> str | None:
    """The file's format as its first bytes tell: "safetensors", "zip" (what torch.save writes),
    "pickle" (its legacy format) or None. A photo given as the model was otherwise read as a
    pickle, and the reader's error said it "holds Python objects other than tensors"."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as err:
        raise _unreadable(path, err) from None
    if len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"  # the length of its JSON header, then the header
    if zipfile.is_zipfile(path):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"  # the PROTO opcode, then the protocol
    return None


def _load_safetensors(path: Path) -> Mapping[str, torch.Tensor]:
    """The file's tensors, each read when looked up (with ``pread``, into memory of its own).

    Indexing needs the image tower alone: reading only its tensors saves reading the text
    tower's (ViT-B/32: 250 MB). Reading rather than mapping the file keeps its pages out of the
    process's resident memory, where a mapped file's pages count for as long as it is mapped:
    mapped, the ViT-B-32-256 image tower stood twice in memory while the model copied it (1.19
    GB peak, against 0.85 GB read).
    """
    try:
        file = safe_open(path, framework="pt", backend="pread")
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, err) from None

    def read(key: str) -> torch.Tensor:
        try:
            return file.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as err:
            raise _unreadable(path, err) from None

    return _Lazy(file.keys(), read)


class _Lazy(Mapping[str, torch.Tensor]):
    """A state dict whose tensors are made by ``load(key)`` when looked up, and not kept."""

    def __init__(self, keys: Iterable[str], load: Callable[[str], torch.Tensor]):
        self._keys = tuple(keys)
        self._known = frozenset(self._keys)
        self._load = load

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._known:
            raise KeyError(key)
        return self._load(key)

    def __contains__(self, key: object) -> bool:
        return key in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a file that is not a checkpoint breaks the reader in many ways
        if isinstance(err, pickle.UnpicklingError) and str(err).startswith("Weights only load failed"):
            raise CheckpointError(
                f"{path} holds Python objects other than tensors, which clipsearch never unpickles; "
                "convert it to a plain state dict or a safetensors file."
            ) from None
        raise _unreadable(path, err) from None


def _unwrap(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside an OpenCLIP file: training checkpoints wrap it in ``state_dict``."""
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise CheckpointError(f"{path} does not contain a state dict.")
    tensors = {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    if all(key.startswith("module.") for key in tensors):  # saved from DistributedDataParallel
        tensors = {key.removeprefix("module."): value for key, value in tensors.items()}
    return tensors


# --- OpenAI TorchScript archives -------------------------------------------------------------

_STORAGE_DTYPES = {
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptObject(dict):
    """Stands in for a TorchScript module while unpickling: keeps its attributes, runs nothing."""

    def __setstate__(self, state: dict) -> None:
        self.update(state)


class _Storage(NamedTuple):
    """Where one storage of the archive lies, its element type and count: read when a tensor
    on it is."""

    name: str
    dtype: torch.dtype
    elements: int


class _Stored(NamedTuple):
    """A tensor of the archive, not read yet: its storage and its view of it."""

    storage: _Storage
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> _Stored:
    return _Stored(storage, offset, size, stride)


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript ``data.pkl`` into nested `_ScriptObject`s holding where each
    tensor lies (`_Stored`): the storages are read when a tensor is looked up."""

    def __init__(self, archive: zipfile.ZipFile, root: str):
        super().__init__(archive.open(f"{root}/data.pkl"))
        self.archive = archive
        self.root = root

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return _ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights archive")

    def persistent_load(self, pid: Any) -> _Storage:
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected record {kind!r} in a weights archive")
        name = f"{self.root}/data/{key}"
        size = self.archive.getinfo(name).file_size  # checked before a byte of it is inflated
        if size != numel * dtype.itemsize:
            raise pickle.UnpicklingError(f"storage {key} has {size} bytes, not {numel} elements")
        return _Storage(name, dtype, numel)


def _read_torchscript(path: Path, archive: zipfile.ZipFile) -> Mapping[str, torch.Tensor]:
    """The archive's tensors, each read when it is looked up, as from a safetensors file: a
    run that loads the image tower alone never reads the text tower's, and the weights are
    never all in memory beside the model they go into. Read whole, OpenAI's ViT-B/32 (300 MB of
    float16) took a load of its image tower to a peak of 1.27 GB; read so, 0.87."""
    roots = {name.split("/")[0] for name in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", name)}
    if len(roots) != 1:
        raise CheckpointError(f"{path} is a TorchScript archive without a single data.pkl.")
    try:
        module = _ArchiveUnpickler(archive, roots.pop()).load()
    except Exception as err:  # malformed or hostile archives break the unpickler in many ways
        raise _unreadable(path, err) from None
    if not isinstance(module, _ScriptObject):
        raise CheckpointError(f"{path} is a TorchScript archive that holds no module.")
    stored = dict(_module_tensors(module))
    opened = zipfile.ZipFile(path)  # for the reads to come; closed with the state dict
    buffer = bytearray(_CHUNK)  # what every read goes through

    def read(key: str) -> torch.Tensor:
        tensor = stored[key]
        try:
            storage = _float32_storage(opened, tensor.storage, buffer)
            return storage.as_strided(tensor.size, tensor.stride, tensor.offset)
        except Exception as err:  # a damaged member (zlib, CRC) or a view past its storage
            raise _unreadable(path, err) from None

    return _Lazy(stored, read)


_CHUNK = 1 << 20


def _float32_storage(archive: zipfile.ZipFile, storage: _Storage, buffer: bytearray) -> torch.Tensor:
    """The storage's elements, floats widened to float32 a megabyte at a time as they are read:
    a whole float16 storage and its float32 copy never stand side by side (ViT-B/32's image
    tower loaded into int8 peaked at 1,016 MiB widening whole storages, 851 so)."""
    itemsize, count = storage.dtype.itemsize, storage.elements
    out = torch.empty(count, dtype=torch.float32 if storage.dtype.is_floating_point else storage.dtype)
    window = memoryview(buffer)[: len(buffer) - len(buffer) % itemsize]
    done = 0
    with archive.open(storage.name) as opened:
        member = cast(zipfile.ZipExtFile, opened)  # the reader of a member read from the start
        while done < count:
            size = member.readinto(window)
            if not size:
                raise EOFError(f"{storage.name} ends after {done} of its {count} elements")
            piece = torch.frombuffer(window, dtype=storage.dtype, count=size // itemsize)
            out[done : done + len(piece)] = piece
            done += len(piece)
    return out


def _module_tensors(module: _ScriptObject, prefix: str = ""):
    """(name, tensor) pairs of a module and its submodules, named as ``state_dict`` names them."""
    for name, value in module.items():
        if isinstance(value, _Stored):
            yield prefix + name, value
        elif isinstance(value, _ScriptObject):
            yield from _module_tensors(value, f"{prefix}{name}.")


# --- directories -----------------------------------------------------------------------------


_OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _read_directory(path: Path) -> tuple[Mapping[str, torch.Tensor], CheckpointInfo]:
    _refuse_links_out(path)
    if (path / "open_clip_config.json").is_file():
        return _read_openclip_dir(path, _read_json(path / "open_clip_config.json"))
    if (path / "config.json").is_file():
        config = _read_json(path / "config.json")
        if "model_type" in config:
            return _read_huggingface_dir(path, config)
        return _read_own_dir(path, config)
    if any((path / name).is_file() for name in _OPENCLIP_WEIGHTS):
        # An OpenCLIP hub folder fetched without its configuration (what the registry downloads).
        return _read_openclip_dir(path, {})
    raise CheckpointError(
        f"{path} is a directory without config.json or open_clip_config.json, so it is not a model directory."
    )


def _read_own_dir(path: Path, config: dict) -> tuple[Mapping[str, torch.Tensor], CheckpointInfo]:
    for name in ("model.safetensors", "vocab.txt.gz"):
        if not (path / name).is_file():
            raise CheckpointError(f"The model directory {path} lacks {name}.")
    info = CheckpointInfo(
        "clipsearch",
        quick_gelu=config.get("quick_gelu"),
        vocab_path=path / "vocab.txt.gz",
        image_mean=_triple(config.get("image_mean")),
        image_std=_triple(config.get("image_std")),
    )
    return _load_safetensors(path / "model.safetensors"), info


def _read_openclip_dir(path: Path, config: Mapping[str, Any]) -> tuple[Mapping[str, torch.Tensor], CheckpointInfo]:
    """An OpenCLIP hub folder: the weights, ``open_clip_config.json`` when there is one (its
    ``model_cfg`` and ``preprocess_cfg``), and for SigLIP and XLM-R models the ``tokenizer.json``."""
    model_cfg, preprocess_cfg = config.get("model_cfg", {}), config.get("preprocess_cfg", {})
    text_cfg = model_cfg.get("text_cfg", {})
    state_dict, _ = _read_file(_first_file(path, _OPENCLIP_WEIGHTS))
    family = family_of(state_dict)
    quick_gelu = bool(model_cfg.get("quick_gelu", False))  # OpenCLIP's default is exact GELU
    architecture: Any = None
    if family == "siglip" and model_cfg:
        architecture = siglip.config_from_openclip(model_cfg, state_dict)
    elif family == "clip" and model_cfg:
        vision_cfg = model_cfg.get("vision_cfg", {})
        architecture = config_from_state_dict(
            _clean(state_dict),
            quick_gelu=quick_gelu,
            vision_head_width=vision_cfg.get("head_width"),
            text_head_width=int(text_cfg.get("width", 512)) // int(text_cfg.get("heads", 8)),
        )
    info = CheckpointInfo(
        "openclip",
        quick_gelu=quick_gelu,
        image_mean=_triple(preprocess_cfg.get("mean")),
        image_std=_triple(preprocess_cfg.get("std")),
        config=architecture,
        tokenizer_dir=path if family != "clip" and (path / "tokenizer.json").is_file() else None,
        text_clean=(text_cfg.get("tokenizer_kwargs") or {}).get("clean"),
        resize_mode=_known(preprocess_cfg, "resize_mode", RESIZE_MODES, path),
        interpolation=_known(preprocess_cfg, "interpolation", RESAMPLING, path),
    )
    return state_dict, info


def _read_huggingface_dir(path: Path, config: dict) -> tuple[Mapping[str, torch.Tensor], CheckpointInfo]:
    if config.get("model_type") in ("siglip", "siglip2"):
        return _read_huggingface_siglip(path, config)
    if config.get("model_type") != "clip":
        raise CheckpointError(
            f"{path} holds a Hugging Face {config.get('model_type')!r} model; "
            "CLIPModel, SiglipModel and Siglip2Model checkpoints load."
        )
    text, vision = config.get("text_config", {}), config.get("vision_config", {})
    acts = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
    if not acts <= {"quick_gelu", "gelu"} or len(acts) != 1:
        raise CheckpointError(
            f"{path} uses activations {sorted(acts)}; clipsearch supports quick_gelu or gelu in both towers."
        )
    for name, tower in (("text", text), ("vision", vision)):
        if tower.get("layer_norm_eps", 1e-5) != 1e-5:
            raise CheckpointError(f"{path} has a {name} LayerNorm epsilon other than CLIP's 1e-5.")
    weights = _first_file(path, ("model.safetensors", "pytorch_model.bin"))
    hf_state_dict, _ = _read_file(weights)
    state_dict = _from_huggingface(hf_state_dict, path)
    # The head counts are not in the weights; the configuration has them. Read first, as it
    # names a missing weight (a folder without its text tower) in a CheckpointError.
    architecture = config_from_state_dict(
        _clean(state_dict),
        quick_gelu=acts == {"quick_gelu"},
        vision_head_width=_head_width(vision, 768, 12),
        text_head_width=_head_width(text, 512, 8),
    )
    _check_eos_pooling(text, architecture.vocab_size, path)
    preprocessor = path / "preprocessor_config.json"
    preprocess_cfg = _read_json(preprocessor) if preprocessor.is_file() else {}
    info = CheckpointInfo(
        "huggingface",
        quick_gelu=acts == {"quick_gelu"},
        config=architecture,
        vocab_path=_huggingface_vocab(path),
        image_mean=_triple(preprocess_cfg.get("image_mean")),
        image_std=_triple(preprocess_cfg.get("image_std")),
    )
    return state_dict, info


def _read_huggingface_siglip(path: Path, config: dict) -> tuple[Mapping[str, torch.Tensor], CheckpointInfo]:
    architecture = hf_siglip.config_from_huggingface(config, path)
    hf_state_dict, _ = _read_file(_first_file(path, ("model.safetensors", "pytorch_model.bin")))
    preprocessor = path / "preprocessor_config.json"
    preprocess_cfg = _read_json(preprocessor) if preprocessor.is_file() else {}
    info = CheckpointInfo(
        "huggingface",
        image_mean=_triple(preprocess_cfg.get("image_mean")),
        image_std=_triple(preprocess_cfg.get("image_std")),
        config=architecture,
        tokenizer_dir=path if (path / "tokenizer.json").is_file() else None,
        resize_mode="squash",  # Hugging Face's SigLIP processor resizes to the square
    )
    return hf_siglip.state_dict_from_huggingface(hf_state_dict, path), info


# Hugging Face name fragment -> OpenAI name fragment; every one is applied to every key.
_HF_RENAMES = (
    ("text_model.embeddings.token_embedding.", "token_embedding."),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("text_model.final_layer_norm.", "ln_final."),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.patch_embedding.", "visual.conv1."),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
    ("vision_model.pre_layrnorm.", "visual.ln_pre."),  # sic: Hugging Face's spelling
    ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
    ("vision_model.post_layernorm.", "visual.ln_post."),
    (".self_attn.out_proj.", ".attn.out_proj."),
    (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
)
# Linear layers store [out, in]; OpenAI's projections are matrices applied as x @ proj.
_HF_PROJECTIONS = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}


def _from_huggingface(hf: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hf.items():
        if key.endswith("position_ids"):  # older transformers saved this index buffer
            continue
        if key in _HF_PROJECTIONS:
            state_dict[_HF_PROJECTIONS[key]] = value.t()
            continue
        for old, new in _HF_RENAMES:
            key = key.replace(old, new)
        block, is_qkv, leaf = key.partition(".self_attn.")
        if is_qkv:  # q_proj.weight, k_proj.bias, ...: fused into one in_proj as nn.MultiheadAttention has it
            projection, kind = leaf.split(".")
            qkv.setdefault(f"{block}.attn.in_proj_{kind}", {})[projection] = value
        else:
            state_dict[key] = value
    state_dict.update(fuse(qkv, "q_proj", "k_proj", "v_proj"))
    check_placed(state_dict, path)
    return state_dict


def _head_width(tower: Mapping[str, Any], width: int, heads: int) -> int:
    """A Hugging Face tower's head width, with transformers' defaults for what it leaves out."""
    return int(tower.get("hidden_size", width)) // int(tower.get("num_attention_heads", heads))


def _check_eos_pooling(text_config: Mapping[str, Any], vocab_size: int, path: Path) -> None:
    """Our text tower pools at the largest token id, as OpenAI's does. Hugging Face pools at the
    first ``eos_token_id`` (or, for the legacy value 2, at the largest id too); both agree when
    the end-of-text token is the last id of the vocabulary, as in CLIP's own vocabulary."""
    eos = text_config.get("eos_token_id", 2)
    if eos not in (2, vocab_size - 1):
        raise CheckpointError(
            f"{path} ends texts with token {eos}, not the last of its {vocab_size} token ids; "
            "clipsearch's text pooling needs the end-of-text token to be the largest id."
        )


def _huggingface_vocab(path: Path) -> Path | None:
    """Our vocabulary file (OpenAI's format) for a Hugging Face tokenizer, written once into the
    cache and keyed by the merges' hash; None when the directory has no tokenizer files.

    The token ids of CLIP's BPE follow from the merge list alone (bytes, bytes + ``</w>``, one
    token per merge, then the two special tokens), so ``merges.txt`` is all our tokenizer needs;
    ``vocab.json`` must agree with the ids it derives, or the model would see other tokens.
    """
    if not (path / "merges.txt").is_file():
        return None
    text = _read_small(path / "merges.txt")
    if not text.startswith(b"#version"):
        text = b"#version: 0.2\n" + text  # the tokenizer skips the first line
    target = model_cache_dir() / "vocab" / f"merges-{hashlib.sha256(text).hexdigest()[:16]}.txt.gz"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        _write_no_wider_than(part, gzip.compress(text, mtime=0), path / "merges.txt")
        part.replace(target)
    if (path / "vocab.json").is_file() and Tokenizer(target).encoder != _read_json(path / "vocab.json"):
        raise CheckpointError(
            f"The vocab.json in {path} does not number tokens as its merges.txt implies "
            "(added tokens?); clipsearch cannot tokenize for this model."
        )
    return target


# --- helpers ---------------------------------------------------------------------------------


def _clean(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Drop what is not a learned parameter and bring every float tensor to float32, as each is
    looked up (a lazy state dict stays lazy)."""

    def float32(key: str) -> torch.Tensor:
        value = state_dict[key]
        return value.float() if value.is_floating_point() else value

    kept = (key for key in state_dict if key not in _NON_PARAMETERS and not key.endswith(("attn_mask", "position_ids")))
    return _Lazy(kept, float32)


def _finite(state_dict: Mapping[str, torch.Tensor], path: Path) -> Mapping[str, torch.Tensor]:
    """The state dict, each float tensor checked as it is looked up: one NaN or infinity (a
    diverged training run, a damaged conversion) made every vector NaN, and such a model indexed
    every photo "successfully" and then matched none. A NaN or infinity makes the tensor's sum
    (one pass) non-finite; only then, as the sum of large finite values may overflow too, are
    the values checked one by one."""

    def checked(key: str) -> torch.Tensor:
        value = state_dict[key]
        if value.is_floating_point() and not value.sum().isfinite() and not value.isfinite().all():
            raise CheckpointError(f"{path} holds NaN or infinite values in {key}; it cannot be used.")
        return value

    return _Lazy(state_dict, checked)


def _first_file(directory: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"The model directory {directory} has none of {', '.join(names)}.")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(_read_small(path))
    except (OSError, ValueError) as err:
        raise _unreadable(path, err) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object.")
    return data


def _known(settings: Mapping[str, Any], name: str, known: Iterable[str], path: Path) -> str | None:
    """The setting ``name`` if it is one clipsearch knows, None if unset, else CheckpointError:
    an unknown one would have been ignored, and every image prepared otherwise than in training."""
    value = settings.get(name)
    if value is not None and value not in known:
        raise CheckpointError(f"{path} asks for {name} {value!r}; clipsearch knows {', '.join(known)}.")
    return value


def _triple(values: Any) -> Any:
    """As the file gives them: `_checked_normalisation` makes sure they are three numbers."""
    return None if values is None else tuple(values) if isinstance(values, (list, tuple)) else (values,)


def _checked_normalisation(info: CheckpointInfo, path: Path) -> CheckpointInfo:
    """``info`` with its image mean and std as floats, or CheckpointError naming the model: a std
    of 0 made every vector NaN, and a mean of the wrong length failed every image, for good."""
    checked: dict[str, Any] = {}
    for name, values in (("image_mean", info.image_mean), ("image_std", info.image_std)):
        if values is None:
            continue
        try:
            numbers = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            numbers = ()
        positive = name == "image_std"
        if len(numbers) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in numbers):
            raise CheckpointError(
                f"{path} gives {name} {list(values)}; it must be 3 finite numbers"
                + (" above 0" if positive else "")
                + ", one per colour channel."
            )
        checked[name] = numbers
    return replace(info, **checked)


# --- bounds on what a model's files make us read, allocate or copy ---------------------------

# JSON settings and merges files: CLIP's vocab.json is 0.9 MB, its merges.txt 0.5 MB.
MAX_SMALL_FILE_BYTES = 16 << 20
# torch.save stores tensors uncompressed: an archive that inflates to more than this many times
# its size is a zip bomb (3 MB inflating to gigabytes), refused before anything is inflated.
MAX_UNPACKED_RATIO = 2


def _read_small(path: Path) -> bytes:
    """A settings file, read only if it is as small as such files are (a sparse 3 GiB
    config.json cost 6.7 GB of memory when read whole)."""
    with open(path, "rb") as f:
        data = f.read(MAX_SMALL_FILE_BYTES + 1)
    if len(data) > MAX_SMALL_FILE_BYTES:
        raise CheckpointError(
            f"{path} is larger than a model's settings file ever is ({MAX_SMALL_FILE_BYTES >> 20} MB); it was not read."
        )
    return data


def _check_unpacked_size(path: Path, archive: zipfile.ZipFile) -> None:
    unpacked, size = sum(info.file_size for info in archive.infolist()), path.stat().st_size
    if unpacked > MAX_UNPACKED_RATIO * size + (1 << 20):
        raise CheckpointError(
            f"{path} unpacks to {unpacked / 1e6:.0f} MB from {size / 1e6:.1f} MB (a zip bomb?); clipsearch reads "
            "weights archives whose tensors are stored uncompressed, as torch.save writes them."
        )


def _refuse_links_out(folder: Path) -> None:
    """Files of a model folder are read, and some copied into the cache, so a symlink in it must
    not lead elsewhere (a merges.txt linking to a private file had that file copied out, readable
    by everyone). The one layout allowed to link out is the Hugging Face cache's, whose
    ``snapshots/<revision>/`` files link to ``../../blobs/``."""
    inside = [folder.resolve()]
    if folder.parent.name == "snapshots":
        inside.append((folder.parent.parent / "blobs").resolve())
    for entry in folder.iterdir():
        if entry.is_symlink():
            target = entry.resolve()
            if not any(target.is_relative_to(root) for root in inside):
                raise CheckpointError(
                    f"{entry} links outside the model folder (to {target}); "
                    "copy the file into the folder if it belongs to the model."
                )


def _write_no_wider_than(path: Path, data: bytes, source: Path) -> None:
    """Write a new cache file readable by no one who cannot read ``source``: created with the
    source's permissions, which the kernel narrows by the umask."""
    path.unlink(missing_ok=True)  # a leftover keeps its own permissions
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & stat.S_IMODE(source.stat().st_mode))
    with open(fd, "wb") as f:
        f.write(data)


def _unreadable(path: Path, err: BaseException) -> CheckpointError:
    reason = " ".join(str(err).split())[:200] or type(err).__name__
    return CheckpointError(f"{path} is not a checkpoint clipsearch can read ({reason}).")
