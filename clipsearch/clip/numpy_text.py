"""CLIP's text tower in NumPy, so that a text query never imports torch.

A `clipsearch query` is a new process that encodes one text of a few tokens. Importing torch
costs it a second or more of CPU and building the model another half second; the forward pass
itself, in NumPy, takes milliseconds. So the text tower is written once (`export`, at the end of
a model's first index run or by its first query), from the checkpoint a tensor at a time, into
one file of float32 arrays in the model cache, and later queries memory-map that file
(`load_cached`), reading only the pages they use.

`TextTower.encode_text` repeats `model.CLIP.encode_text` operation for operation (pre-LayerNorm
blocks, causal attention, QuickGELU or GELU, the end-of-text token's features projected); it
matches the torch tower to float32 rounding. Two shortcuts the causal mask allows: tokens after
the last end-of-text token are never computed, and the last block runs its attention output,
projection and MLP for the end-of-text rows alone, the only ones read.

At a few tokens, the products are small-M GEMMs whose speed OpenBLAS sets, not memory: the
linear weights are stored ``[in, out]`` (``x @ W``), which it ran 1.6x faster than the
``[out, in]`` layout of the state dict (``x @ W.T``) on an AVX-512 EPYC (benchmarks/README.md).

The cache file (`clip.tower_file`) is keyed by the model as the user names it (a registry name
or a path: the name decides the activation) and is stale once any file of the checkpoint
changes size, mtime, ctime or inode; `load_cached` then returns None and the caller exports it
again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipsearch.clip import tower_file
from clipsearch.clip.numpy_ops import gelu, layer_norm, linear, one_blas_thread, softmax_rows, stored
from clipsearch.clip.tokenizer import Tokenizer

if TYPE_CHECKING:
    from clipsearch.clip.model import CLIP

_MAGIC = b"CLIPTEXT"
_FORMAT = 2  # 2: linear weights [in, out]
_HEAD_WIDTH = 64  # as in model.py: CLIP's attention heads are 64 wide


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
        """The model's own tokenizer, read on first use; `CheckpointError` for a vocabulary with
        ids this tower has no embedding for (as `clip.load` refuses it)."""
        if self._tokenizer is None:
            from clipsearch.clip import check_vocabulary

            tokenizer = Tokenizer(self.vocab_path)
            check_vocabulary(self.vocab_path, tokenizer.vocab_size, self.weights["token_embedding.weight"].shape[0])
            self._tokenizer = tokenizer
        return self._tokenizer

    @classmethod
    def from_model(cls, model: CLIP, vocab_path: str | Path, copy: bool = True) -> TextTower:
        """The text tower of a torch `CLIP`, whose tokenizer reads ``vocab_path``. ``copy=False``:
        views of the model's weights, the linear ones transposed (what `cached_from` writes)."""
        weights = {
            key: stored(key, value.detach().float().cpu().numpy())
            for key, value in model.state_dict().items()
            if not key.startswith("visual.") and key != "logit_scale"
        }
        if copy:  # contiguous [in, out]: the products' fastest layout
            weights = {key: np.ascontiguousarray(value) for key, value in weights.items()}
        return cls(
            weights,
            quick_gelu=model.config.quick_gelu,
            logit_scale=float(model.logit_scale.detach().exp()),
            vocab_path=vocab_path,
        )

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        """Unnormalised text embeddings ``float32 [N, embed_dim]`` of token ids ``[N, L]``."""
        with one_blas_thread():
            return self._encode_text(ids)

    def _encode_text(self, ids: np.ndarray) -> np.ndarray:
        w = self.weights
        ends = ids.argmax(axis=-1)  # the end-of-text token has the largest id
        ids = ids[:, : int(ends.max()) + 1]  # attention is causal: padding after it cannot matter
        x = w["token_embedding.weight"][ids] + w["positional_embedding"][: ids.shape[1]]
        for i in range(self.layers):
            block = f"transformer.resblocks.{i}."
            last = ends if i == self.layers - 1 else None
            attended = self._attention(layer_norm(x, w[block + "ln_1.weight"], w[block + "ln_1.bias"]), block, last)
            if last is not None:  # from here on only the end-of-text rows are read
                x = x[np.arange(len(x)), last][:, None]
            x = self._mlp(x + attended, block)
        pooled = layer_norm(x[:, -1], w["ln_final.weight"], w["ln_final.bias"])
        return (pooled @ w["text_projection"]).astype(np.float32)

    def _mlp(self, x: np.ndarray, block: str) -> np.ndarray:
        """``x`` plus the MLP of ``block`` on its second LayerNorm."""
        w = self.weights
        h = layer_norm(x, w[block + "ln_2.weight"], w[block + "ln_2.bias"])
        h = gelu(linear(h, w[block + "mlp.c_fc.weight"], w[block + "mlp.c_fc.bias"]), self.quick_gelu)
        return x + linear(h, w[block + "mlp.c_proj.weight"], w[block + "mlp.c_proj.bias"])

    def start_keys_values(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each block's attention key and value ``[1, width]`` of the start-of-text token. Every
        text begins with it, and attention is causal, so they are the same for every text: a
        graph holds them (`clip.onnx_text`) and computes one row fewer per text, in float32."""
        w = self.weights
        x = w["token_embedding.weight"][[self.tokenizer.sot_id]] + w["positional_embedding"][:1]
        found = []
        for i in range(self.layers):
            block = f"transformer.resblocks.{i}."
            h = layer_norm(x, w[block + "ln_1.weight"], w[block + "ln_1.bias"])
            _, key, value = np.split(linear(h, w[block + "attn.in_proj_weight"], w[block + "attn.in_proj_bias"]), 3, -1)
            found.append((key, value))
            # Alone in its attention, a token's attention output is its own value.
            x = self._mlp(x + linear(value, w[block + "attn.out_proj.weight"], w[block + "attn.out_proj.bias"]), block)
        return found

    def _attention(self, x: np.ndarray, block: str, last: np.ndarray | None) -> np.ndarray:
        """Causal self-attention of every row of ``x``, or of the row ``last[n]`` of each text n."""
        w = self.weights
        batch, length, width = x.shape
        qkv = linear(x, w[block + "attn.in_proj_weight"], w[block + "attn.in_proj_bias"])
        q, k, v = qkv.reshape(batch, length, 3, self.heads, width // self.heads).transpose(2, 0, 3, 1, 4)
        if last is None:
            rows = np.arange(length)[None, :]  # [1, queries]
        else:
            rows = last[:, None]  # [N, 1]
            q = q[np.arange(batch), :, last][:, :, None]  # [N, heads, 1, head width]
        scores = (q @ k.transpose(0, 1, 3, 2)) / np.float32(math.sqrt(width // self.heads))
        ahead = np.arange(length)[None, None, :] > rows[:, :, None]  # no looking ahead
        scores = np.where(ahead[:, None], np.float32(-np.inf), scores)
        out = softmax_rows(scores) @ v  # [N, heads, queries, head width]
        out = out.transpose(0, 2, 1, 3).reshape(batch, -1, width)
        return linear(out, w[block + "attn.out_proj.weight"], w[block + "attn.out_proj.bias"])

    def save(self, path: Path, source: Mapping[str, object]) -> None:
        """Write the tower to `path` (`clip.tower_file`); `source` identifies what it was exported from."""
        settings = {"quick_gelu": self.quick_gelu, "logit_scale": self.logit_scale, "vocab_path": str(self.vocab_path)}
        _save(path, source, settings, self.weights)

    @classmethod
    def load(cls, path: Path) -> tuple[TextTower, dict]:
        """The tower in `path`, memory-mapped, and its ``source``; ValueError if the file is not one."""
        header, weights = tower_file.load(path, _MAGIC, _FORMAT)
        tower = cls(
            weights, quick_gelu=header["quick_gelu"], logit_scale=header["logit_scale"], vocab_path=header["vocab_path"]
        )
        return tower, header["source"]


def _save(
    path: Path,
    source: Mapping[str, object],
    settings: Mapping[str, object],
    weights: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Write a text tower's ``weights`` and the ``settings`` `TextTower` takes, exported from
    ``source``, to ``path`` (`tower_file.save`: with ``shapes``, each weight is read as it is
    written)."""
    header = {"format": _FORMAT, "source": dict(source), **settings}
    tower_file.save(path, _MAGIC, header, weights, shapes)


# --- the cache ----------------------------------------------------------------------------------


def cache_file(model_ref: str) -> Path:
    """Where the text tower of ``model_ref`` (as `clip.load` is given it) is cached."""
    return tower_file.cache_file("text-towers", model_ref)


def load_cached(model_ref: str) -> TextTower | None:
    """The cached text tower of ``model_ref``, or None when there is none or it is stale."""
    tower = tower_file.load_cached(cache_file(model_ref), model_ref, TextTower.load)
    return tower if tower is not None and tower.vocab_path.is_file() else None


def export(model_ref: str) -> TextTower:
    """The text tower of ``model_ref``'s checkpoint, written to the cache a tensor at a time as
    it is read (`tower_file.Checkpointed`) and mapped back; in memory where it cannot be cached.
    No torch model is built: loading ViT-B/32's float32 text model to write it added 370 MiB at
    the end of a model's first index run, its peak (1,081 MiB); read as written, 27 MiB (peak
    856; benchmarks/README.md). ValueError,
    before anything is read, for a model that is not a CLIP; `CheckpointError` for weights that
    do not fit the model they imply."""
    from clipsearch.clip import open_checkpoint
    from clipsearch.clip.build import skeleton
    from clipsearch.clip.download import vocab_path
    from clipsearch.clip.families import family
    from clipsearch.clip.model import misfit

    if family(model_ref) != "clip":
        raise ValueError(f"{model_ref} is a {family(model_ref)} model, whose text tower runs in torch only")
    # Read before the checkpoint: one replaced meanwhile makes the cache stale. A named model
    # is downloaded on its first use, renamed into place whole: known once it is there.
    source = tower_file.checkpoint_state(model_ref)
    checkpoint = open_checkpoint(model_ref)
    source = source or tower_file.checkpoint_state(model_ref)
    config = checkpoint.config
    if getattr(config, "family", "clip") != "clip":  # a pickled file is told apart only once read
        raise ValueError(f"{model_ref} is not a CLIP, and only a CLIP's text tower runs in NumPy")
    shapes = {key: value.shape for key, value in skeleton(config, "text").state_dict().items() if key != "logit_scale"}
    weights = tower_file.Checkpointed(checkpoint.state_dict, shapes, stored)
    try:
        settings = {
            "quick_gelu": config.quick_gelu,
            "logit_scale": float(checkpoint.state_dict["logit_scale"].exp()),
            "vocab_path": str(checkpoint.info.vocab_path or vocab_path()),
        }
        path = cache_file(model_ref)
        written = source is not None and tower_file.store(
            path, lambda path: _save(path, source, settings, weights, weights.shapes)
        )
        if written:
            return TextTower.load(path)[0]
        return TextTower({key: np.ascontiguousarray(weights[key]) for key in weights}, **settings)
    except (KeyError, ValueError) as err:  # a weight missing or of another shape
        raise misfit(config) from err


def cached_from(model: CLIP, model_ref: str, source: dict | None) -> TextTower:
    """The text tower of ``model``, loaded from ``model_ref`` when its checkpoint was ``source``
    (`tower_file.checkpoint_state`), written to the cache and mapped back; in memory where it
    cannot be cached. Written from views of the model's weights: the float32 tower is never in
    memory twice (ViT-B/32's: 250 MB)."""
    views = TextTower.from_model(model, model.tokenizer.bpe_path, copy=False)
    path = cache_file(model_ref)
    if source is not None and tower_file.store(path, lambda path: views.save(path, source)):
        return TextTower.load(path)[0]
    return TextTower.from_model(model, model.tokenizer.bpe_path)
