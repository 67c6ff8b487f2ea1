"""CLIP's text tower in NumPy, so that a text query never imports torch.

A `clipsearch query` is a new process that encodes one text of a few tokens. Importing torch
costs it a second or more of CPU and building the model another half second; the forward pass
itself, in NumPy, takes milliseconds. So the first query of a model loads it with torch and
exports its text tower (`export`) into one file of float32 arrays in the model cache, and later
queries memory-map that file (`load_cached`), reading only the pages they use.

`TextTower.encode_text` repeats `model.CLIP.encode_text` operation for operation (pre-LayerNorm
blocks, causal attention, QuickGELU or GELU, the end-of-text token's features projected); it
matches the torch tower to float32 rounding. Two shortcuts the causal mask allows: tokens after
the last end-of-text token are never computed, and the last block runs its attention output,
projection and MLP for the end-of-text rows alone, the only ones read.

At a few tokens, the products are small-M GEMMs whose speed OpenBLAS sets, not memory: the
linear weights are stored ``[in, out]`` (``x @ W``), which it ran 1.6x faster than the
``[out, in]`` layout of the state dict (``x @ W.T``) on an AVX-512 EPYC (benchmarks/README.md).

The cache file is keyed by the model as the user names it (a registry name or a path: the
name decides the activation) and is stale once any file of the checkpoint changes size, mtime,
ctime or inode; `load_cached` then returns None and the caller exports it again.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipsearch.clip import registry
from clipsearch.clip.sources import locate
from clipsearch.clip.tokenizer import Tokenizer
from clipsearch.paths import model_cache_dir

if TYPE_CHECKING:
    from clipsearch.clip.model import CLIP

log = logging.getLogger(__name__)

_MAGIC = b"CLIPTEXT"
_FORMAT = 2  # 2: linear weights [in, out]
_HEADER = struct.Struct("<8sQ")  # magic, JSON length
_ALIGN = 64  # every array starts on a 64-byte boundary of the file
_HEAD_WIDTH = 64  # as in model.py: CLIP's attention heads are 64 wide
_LN_EPS = 1e-5
# The state-dict names of the linear weights, stored transposed (``[in, out]``).
_LINEAR_WEIGHTS = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class TextTower:
    """The text half of a CLIP: float32 arrays under OpenAI's state-dict names, the blocks'
    linear weights transposed to ``[in, out]``."""

    def __init__(
        self, weights: Mapping[str, np.ndarray], *, quick_gelu: bool, logit_scale: float, vocab_path: str | Path
    ):
        self.weights = dict(weights)
        self.quick_gelu = quick_gelu
        self.logit_scale = logit_scale  # exp() already applied, as Encoder.logit_scale
        self.vocab_path = Path(vocab_path)
        self.width = self.weights["ln_final.weight"].shape[0]
        self.heads = self.width // _HEAD_WIDTH
        self.layers = len({key.split(".")[2] for key in self.weights if key.startswith("transformer.resblocks.")})
        self.context_length = self.weights["positional_embedding"].shape[0]
        self.embed_dim = self.weights["text_projection"].shape[1]
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's own tokenizer, read on first use."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.vocab_path)
        return self._tokenizer

    @classmethod
    def from_model(cls, model: CLIP, vocab_path: str | Path) -> TextTower:
        """The text tower of a torch `CLIP`, whose tokenizer reads ``vocab_path``."""
        weights = {
            key: _stored(key, value.detach().float().cpu().numpy())
            for key, value in model.state_dict().items()
            if not key.startswith("visual.") and key != "logit_scale"
        }
        return cls(
            weights,
            quick_gelu=model.config.quick_gelu,
            logit_scale=float(model.logit_scale.detach().exp()),
            vocab_path=vocab_path,
        )

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        """Unnormalised text embeddings ``float32 [N, embed_dim]`` of token ids ``[N, L]``."""
        with _one_blas_thread():
            return self._encode_text(ids)

    def _encode_text(self, ids: np.ndarray) -> np.ndarray:
        w = self.weights
        ends = ids.argmax(axis=-1)  # the end-of-text token has the largest id
        ids = ids[:, : int(ends.max()) + 1]  # attention is causal: padding after it cannot matter
        x = w["token_embedding.weight"][ids] + w["positional_embedding"][: ids.shape[1]]
        for i in range(self.layers):
            block = f"transformer.resblocks.{i}."
            last = ends if i == self.layers - 1 else None
            attended = self._attention(_layer_norm(x, w[block + "ln_1.weight"], w[block + "ln_1.bias"]), block, last)
            if last is not None:  # from here on only the end-of-text rows are read
                x = x[np.arange(len(x)), last][:, None]
            x = x + attended
            h = _layer_norm(x, w[block + "ln_2.weight"], w[block + "ln_2.bias"])
            h = _gelu(_linear(h, w[block + "mlp.c_fc.weight"], w[block + "mlp.c_fc.bias"]), self.quick_gelu)
            x = x + _linear(h, w[block + "mlp.c_proj.weight"], w[block + "mlp.c_proj.bias"])
        pooled = _layer_norm(x[:, -1], w["ln_final.weight"], w["ln_final.bias"])
        return (pooled @ w["text_projection"]).astype(np.float32)

    def _attention(self, x: np.ndarray, block: str, last: np.ndarray | None) -> np.ndarray:
        """Causal self-attention of every row of ``x``, or of the row ``last[n]`` of each text n."""
        w = self.weights
        batch, length, width = x.shape
        qkv = _linear(x, w[block + "attn.in_proj_weight"], w[block + "attn.in_proj_bias"])
        q, k, v = qkv.reshape(batch, length, 3, self.heads, width // self.heads).transpose(2, 0, 3, 1, 4)
        if last is None:
            rows = np.arange(length)[None, :]  # [1, queries]
        else:
            rows = last[:, None]  # [N, 1]
            q = q[np.arange(batch), :, last][:, :, None]  # [N, heads, 1, head width]
        scores = (q @ k.transpose(0, 1, 3, 2)) / np.float32(math.sqrt(width // self.heads))
        ahead = np.arange(length)[None, None, :] > rows[:, :, None]  # no looking ahead
        scores = np.where(ahead[:, None], np.float32(-np.inf), scores)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out = (scores / scores.sum(axis=-1, keepdims=True)) @ v  # [N, heads, queries, head width]
        out = out.transpose(0, 2, 1, 3).reshape(batch, -1, width)
        return _linear(out, w[block + "attn.out_proj.weight"], w[block + "attn.out_proj.bias"])

    def save(self, path: Path, source: Mapping[str, object]) -> None:
        """Write the tower to `path` atomically; `source` identifies what it was exported from.

        The file: magic, header length, a JSON header (settings, and each array's offset and
        shape), then the float32 arrays, each 64-byte aligned, from the first aligned offset on.
        """
        arrays: dict[str, dict] = {}
        size = 0
        for key, value in self.weights.items():
            arrays[key] = {"offset": size, "shape": list(value.shape)}
            size += _aligned(value.nbytes)
        header = json.dumps(
            {
                "format": _FORMAT,
                "source": dict(source),
                "quick_gelu": self.quick_gelu,
                "logit_scale": self.logit_scale,
                "vocab_path": str(self.vocab_path),
                "arrays": arrays,
            }
        ).encode()
        start = _aligned(_HEADER.size + len(header))
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(_HEADER.pack(_MAGIC, len(header)) + header)
                for key, value in self.weights.items():
                    f.seek(start + arrays[key]["offset"])
                    f.write(np.ascontiguousarray(value, dtype="<f4").tobytes())
                f.truncate(start + size)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> tuple[TextTower, dict]:
        """The tower in `path`, memory-mapped, and its ``source``; ValueError if the file is not one."""
        with open(path, "rb") as f:
            magic, length = _HEADER.unpack(f.read(_HEADER.size))
            if magic != _MAGIC:
                raise ValueError("not a text tower file")
            header = json.loads(f.read(length))
        if header.get("format") != _FORMAT:
            raise ValueError(f"format {header.get('format')}, expected {_FORMAT}")
        data = np.memmap(path, dtype="<f4", mode="r", offset=_aligned(_HEADER.size + length))
        weights = {}
        for key, spec in header["arrays"].items():
            first, count = spec["offset"] // 4, math.prod(spec["shape"])
            if first + count > len(data):
                raise ValueError("truncated")
            weights[key] = data[first : first + count].reshape(spec["shape"])
        tower = cls(
            weights, quick_gelu=header["quick_gelu"], logit_scale=header["logit_scale"], vocab_path=header["vocab_path"]
        )
        return tower, header["source"]


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """NumPy's BLAS on one thread for a moment. A few tokens make matrices too small to share:
    with a second thread on a busy two-core machine, every product waited at a barrier for a
    thread the OS had not scheduled, and encoding took 5 to 10 times the CPU time."""
    set_threads = _blas_thread_setter()
    if set_threads is None:
        yield
        return
    previous = set_threads(1)
    try:
        yield
    finally:
        set_threads(previous)


@functools.cache
def _blas_thread_setter() -> Callable[[int], int] | None:
    """``openblas_set_num_threads_local`` (sets the count, returns the previous one) of the
    OpenBLAS that NumPy's wheels bundle; None for another BLAS or an OpenBLAS before 0.3.27."""
    package = Path(np.__file__).parent
    for library in [*package.parent.glob("numpy.libs/*openblas*"), *package.glob(".dylibs/*openblas*")]:
        try:
            return ctypes.CDLL(str(library)).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
    return None


def _stored(key: str, value: np.ndarray) -> np.ndarray:
    """A state-dict array as the tower holds it: linear weights transposed to ``[in, out]``."""
    return np.ascontiguousarray(value.T) if key.endswith(_LINEAR_WEIGHTS) else value


def _linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return x @ weight + bias


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    variance = np.square(x - mean).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + np.float32(_LN_EPS)) * weight + bias


def _gelu(x: np.ndarray, quick: bool) -> np.ndarray:
    if quick:  # x * sigmoid(1.702 x), with sigmoid(z) = (1 + tanh(z / 2)) / 2, which cannot overflow
        return x * (0.5 + 0.5 * np.tanh(np.float32(0.851) * x))
    return (0.5 * x * (1 + _erf(x / math.sqrt(2)))).astype(np.float32)


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to within 1.5e-7 (Abramowitz & Stegun 7.1.26), in float64: NumPy has no erf."""
    t = 1 / (1 + 0.3275911 * np.abs(x.astype(np.float64)))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1 - poly * np.exp(-np.square(x.astype(np.float64))))


# --- the cache ----------------------------------------------------------------------------------


def cache_file(model_ref: str) -> Path:
    """Where the text tower of ``model_ref`` (as `clip.load` is given it) is cached."""
    digest = hashlib.sha256(_canonical(model_ref).encode()).hexdigest()[:16]
    return model_cache_dir() / "text-towers" / f"{digest}.bin"


def load_cached(model_ref: str) -> TextTower | None:
    """The cached text tower of ``model_ref``, or None when there is none or it is stale."""
    path = cache_file(model_ref)
    source = checkpoint_state(model_ref)
    if source is None or not path.is_file():
        return None
    try:
        tower, recorded = TextTower.load(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.info("Ignoring the damaged text tower cache %s (%s)", path, err)
        return None
    if recorded != source or not tower.vocab_path.is_file():
        log.info("The text tower cache %s is stale: %s has changed", path, model_ref)
        return None
    return tower


def export(model_ref: str) -> TextTower:
    """The text tower of ``model_ref``, loaded with torch (`clip.load`) and written to the cache
    when possible. ValueError, before anything is loaded, for a model that is not a CLIP."""
    from clipsearch.clip import load
    from clipsearch.clip.families import family
    from clipsearch.clip.model import CLIP

    if family(model_ref) != "clip":
        raise ValueError(f"{model_ref} is a {family(model_ref)} model, whose text tower runs in torch only")
    source = checkpoint_state(model_ref)  # before loading: a checkpoint replaced meanwhile makes the cache stale
    model, _ = load(model_ref, device="cpu", towers="text")
    if not isinstance(model, CLIP):  # a pickled file is told apart only once loaded
        raise ValueError(f"{model_ref} is not a CLIP, and only a CLIP's text tower runs in NumPy")
    tower = TextTower.from_model(model, model.tokenizer.bpe_path)
    if source is not None:
        path = cache_file(model_ref)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tower.save(path, source)
        except OSError as err:  # a read-only or full cache only costs later queries their speed
            log.info("Could not cache the text tower in %s (%s)", path, err)
    return tower


def _canonical(model_ref: str) -> str:
    entry = registry.find(model_ref)
    return entry.name if entry is not None else os.path.abspath(os.path.expanduser(model_ref))


def checkpoint_state(model_ref: str) -> dict | None:
    """What the checkpoint files of ``model_ref`` look like on disk now, or None when they are
    not there (a registry model not downloaded yet)."""
    entry = registry.find(model_ref)
    if entry is None:
        root = Path(model_ref).expanduser()
    elif (found := locate(entry).path) is not None:
        root = found
    else:
        return None
    try:
        files = sorted(root.iterdir()) if root.is_dir() else [root]
        stats = [(file.name, os.stat(file)) for file in files if file.is_file()]
    except OSError:
        return None
    if not stats:
        return None
    return {
        "model": _canonical(model_ref),
        # ctime and inode too: no tool sets them back, as `cp -p` or `touch -r` can the mtime.
        "files": [[name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] for name, st in stats],
    }
