"""A model's text tower for a process that encodes many texts (a server, an app), with its
linear weights in the narrowest kernel (`clip.weight_only`, or a CLIP's `clip.onnx_text`
graph) that keeps every embedding within cosine `cpu.MIN_COSINE` of fp32.

A new text costs the time to read the tower's weights once: ViT-B/32's 38 M text weights are
151 MB in fp32, 76 MB in bf16, 38 MB in int8. Which kernel is fastest depends on the CPU (bf16
only pays where it has bf16 dot products), on PyTorch's build and on whether ONNX Runtime is
installed, so it is measured, as `clip.cpu` measures the image tower: each usable kernel
encodes `CALIBRATION_TEXTS`, those that drift below the bar are dropped, the fastest of the
rest is kept. The verdict is remembered in the model cache (`clip.precision_verdicts`) by
checkpoint, CPU flags, and torch and onnxruntime versions, so a server measures once per model
and machine (a few seconds at ViT-B/32, at its start).

The torch tower is a text-only copy of the model, in float32 but for the swapped linears, so
layer norms, attention and the residual stream run in fp32 whatever precision the image tower
was given; so does the ONNX graph, but for its quantised products. Every family whose linears
are ``nn.Linear`` or `model.SelfAttention` (CLIP, SigLIP, XLM-R) is handled; a model that
cannot be copied that way gets None, and its caller keeps encoding with the model itself.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from . import heap, numpy_text, onnx_graph, onnx_text, precision_verdicts
from .cpu import MIN_COSINE, has_native_bf16
from .model import CLIP, SharedSpace, with_weights
from .numpy_text import TextTower
from .tower_file import checkpoint_state
from .weight_only import PER_TENSOR_INPUT, swap_linears, usable_kernels

logger = logging.getLogger(__name__)

# Search-box texts, one word to the whole context, a few in other scripts (multilingual towers):
# the worst cosine over them decides whether a kernel is faithful.
CALIBRATION_TEXTS: tuple[str, ...] = (
    "dog",
    "sunset",
    "a red car",
    "two cats sleeping on a sofa",
    "a photo of a lighthouse at night",
    "birthday cake with candles, close-up",
    "an old man reading a newspaper in a cafe in Paris",
    "black and white film photo of a crowded train station in the 1950s",
    "aerial view of a river winding through autumn forest, fog in the valley, early morning light",
    "a child in a yellow raincoat jumping into a puddle on a rainy street while her father holds "
    "an umbrella and laughs, shot from a low angle with a wide lens, shallow depth of field",
    "screenshot of a spreadsheet with quarterly sales figures and a bar chart",
    "IMG_2041.JPG",
    "un chien qui court sur la plage",
    "ein Hund, der am Strand läuft",
    "海辺を走る犬",
    "собака бежит по пляжу",
    " ".join(["very"] * 40) + " long query that is cut at the context length " + " ".join(["again"] * 40),
)
# Single-text encodings timed per kernel; the median counts.
TIMING_RUNS = 9


class FastText(NamedTuple):
    """A text-only model (or ONNX graph), the kernel its products run, and a line saying what was
    measured (or that it was remembered)."""

    model: SharedSpace | OnnxText
    kernel: str
    report: str

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``model.encode_text``, one text at a time where the kernel quantises a whole batch
        with one scale (`weight_only.PER_TENSOR_INPUT`), as it was measured."""
        if self.kernel not in PER_TENSOR_INPUT or len(tokens) == 1:
            return self.model.encode_text(tokens)
        return torch.cat([self.model.encode_text(row[None]) for row in tokens])


# Where a text graph is cached: the model as `clip.load` was given it, and its text verdict's key.
Cache = tuple[str, dict]


class OnnxText:
    """A CLIP's text tower as an `clip.onnx_text` graph where `FastText` holds a text-only model:
    ``encode_text`` of torch token ids, and the tokenizer and context length an `Encoder` reads."""

    def __init__(
        self, model: SharedSpace, kernel: str, threads: int, cache: Cache | None = None, *, measured: bool = False
    ):
        """``cache``: the model as `clip.load` was given it and the key of the text verdict that
        chose ``kernel`` (or is measuring it), which the graph records; the graph is then built
        from the NumPy tower, cached too (a later warm start reads its tokenizer there, without
        torch: `onnx_text.remembered`). A remembered kernel's graph is opened from the model cache
        when it is current, else built (about 2 s at ViT-B/32) and saved there. ``measured``: built
        to be measured and held (89 MB at ViT-B/32) for `on_threads`, which saves it."""
        if not isinstance(model, CLIP):
            raise ValueError(f"the text tower of a {type(model).__name__} runs in torch only")
        self.kernel, self.tokenizer, self.context_length = kernel, model.tokenizer, model.context_length
        self.graph: bytes | None = None
        self.cache = cache
        found = onnx_text.load_cached(*cache, kernel, threads) if cache is not None and not measured else None
        if found is not None:
            self.tower = found
            return
        if cache is None:
            graph = onnx_text.build(TextTower.from_model(model, model.tokenizer.bpe_path, copy=False), kernel)
        else:
            model_ref, chosen_by = cache
            source = checkpoint_state(model_ref)
            tower = numpy_text.load_cached(model_ref) or numpy_text.cached_from(model, model_ref, source)
            graph = onnx_text.build(tower, kernel, onnx_text.provenance(model_ref, chosen_by))
        if measured:
            self.graph = graph
        elif cache is not None:
            onnx_text.save(cache[0], kernel, graph)
        self.tower = onnx_text.OnnxTextTower(onnx_graph.session(graph, threads))

    def on_threads(self, threads: int) -> OnnxText:
        """This tower, chosen, in a session of ``threads`` (it was measured on one, so that the
        thread's CPU time is all its work), its graph saved to the model cache and let go."""
        assert self.graph is not None
        if self.cache is not None:
            onnx_text.save(self.cache[0], self.kernel, self.graph)
        self.tower, self.graph = onnx_text.OnnxTextTower(onnx_graph.session(self.graph, threads)), None
        return self

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.tower.encode_text(tokens.cpu().numpy()))


def candidate_kernels() -> tuple[str, ...]:
    """What the measurement chooses among, fp32 first: bf16 only where the CPU has bf16 dot
    products (elsewhere it is emulated, slower than fp32); ONNX Runtime's where it is installed."""
    kernels = tuple(k for k in usable_kernels() if has_native_bf16() or not k.startswith("bf16"))
    return kernels + (tuple(onnx_graph.KERNELS) if onnx_graph.available() else ())


def with_kernel(model: SharedSpace, kernel: str, threads: int, cache: Cache | None = None) -> SharedSpace | OnnxText:
    """A text-only copy of ``model`` whose products run ``kernel``, to be measured; ValueError
    when the kernel cannot run this model's family. ``cache``: where a graph goes if chosen."""
    if kernel in onnx_graph.KERNELS:
        return OnnxText(model, kernel, threads, cache, measured=True)
    copy = text_only_copy(model)
    swap_linears(copy, kernel)
    return copy


def fast_text_tower(model: SharedSpace, model_ref: str | None = None) -> FastText | None:
    """The text tower of ``model`` (any precision; its weights are read, not changed) as the
    fastest faithful text-only copy on this CPU; None when the model cannot be copied or has
    no tokenizer to calibrate with. ``model_ref`` (as `clip.load` was given it) keys the
    remembered verdict."""
    if getattr(model, "tokenizer", None) is None:
        return None
    kernels = candidate_kernels()
    key = _verdict_key(model_ref, kernels)
    verdict = precision_verdicts.recall(key) if key is not None else None
    remembered = verdict["precision"] if verdict is not None else None
    again = f"{remembered}, as measured before"
    cache = _cache(model, model_ref, key)
    if remembered in kernels and remembered in onnx_graph.KERNELS:  # built from the model's weights: no torch copy
        return FastText(OnnxText(model, remembered, torch.get_num_threads(), cache), remembered, again)
    try:
        reference = text_only_copy(model)
    except (AttributeError, TypeError, KeyError, ValueError, RuntimeError) as err:  # not a family we know
        logger.info("the text tower of %s runs as loaded: %s", type(model).__name__, err)
        return None
    if remembered in kernels:
        assert remembered is not None
        swap_linears(reference, remembered)
        return FastText(reference, remembered, again)
    if not onnx_graph.available():
        logger.info("ONNX Runtime is not installed: pip install 'clipsearch[onnx]' measures its text tower too")
    logger.info(
        "Measuring the fastest text kernel for %s on this CPU (once per model and machine; about 10 s for ViT-B/32)...",
        model_ref or type(model).__name__,
        extra={"notice": True},  # shown by the CLI without --verbose: a wait it should explain
    )
    started = time.perf_counter()
    if getattr(model, "towers", None) == "text" and _float32_text(model):
        reference = model  # what the copy is: the measurement holds ViT-B/32's 250 MB once less
    chosen = _fastest_faithful(model, reference, kernels, cache)
    if isinstance(chosen.model, OnnxText):
        chosen = chosen._replace(model=chosen.model.on_threads(torch.get_num_threads()))
    logger.info(
        "text tower in %s: %s (measured in %.1f s, once)", chosen.kernel, chosen.report, time.perf_counter() - started
    )
    if key is not None:
        precision_verdicts.remember(key, {"precision": chosen.kernel, "report": chosen.report})
    return chosen


def _cache(model: SharedSpace, model_ref: str | None, key: dict | None) -> Cache | None:
    """Where ``model``'s text graph is cached, if anywhere: only a graph (and a NumPy tower) of
    the float32 weights, never of those an `Encoder` converted to bf16 or fp16 with its image
    tower, which a text-only process or a cold query would then take for the checkpoint's."""
    return (model_ref, key) if model_ref is not None and key is not None and _float32_text(model) else None


def _float32_text(model: SharedSpace) -> bool:
    return all(p.dtype == torch.float32 for name, p in model.named_parameters() if not name.startswith("visual."))


def text_only_copy(model: SharedSpace) -> SharedSpace:
    """A float32 text-only model of ``model``'s family holding copies of its text weights."""
    copy = with_weights(type(model), model.config, model.state_dict(), "text")
    copy.tokenizer = model.tokenizer
    return copy


def calibration_tokens(model: SharedSpace) -> torch.Tensor:
    return model.tokenizer(list(CALIBRATION_TEXTS), context_length=model.context_length, truncate=True)


def _fastest_faithful(
    source: SharedSpace, fp32: SharedSpace, kernels: tuple[str, ...], cache: Cache | None = None
) -> FastText:
    """Each kernel on a fresh copy of ``source``'s text tower, against ``fp32``'s embeddings;
    ``cache``: where the graph of an ONNX kernel goes if chosen (`OnnxText.on_threads`)."""
    tokens = calibration_tokens(fp32)
    with torch.inference_mode():
        reference = fp32.encode_text(tokens)
    best = FastText(fp32, "fp32", "")
    (fp32_seconds,) = _seconds_per_text([fp32], tokens)
    notes = [f"fp32 {fp32_seconds * 1e3:.2f} ms CPU"]
    for kernel in kernels[1:]:
        trial = None  # the last trial, unless it is the best, goes before the next is built
        heap.release_free_memory()
        try:
            trial = FastText(with_kernel(source, kernel, 1, cache), kernel, "")
        except ValueError as err:
            notes.append(f"{kernel} cannot run it ({err})")
            continue
        with torch.inference_mode():
            cosine = F.cosine_similarity(trial.encode_text(tokens), reference).min().item()
        if cosine < MIN_COSINE:
            notes.append(f"{kernel} drifts (cosine {cosine:.5f} < {MIN_COSINE})")
            continue
        # Timed in turns with the best so far, not against its figure from another moment.
        seconds, rival = _seconds_per_text([trial.model, best.model], tokens)
        notes.append(f"{kernel} {seconds * 1e3:.2f} ms CPU, cosine {cosine:.5f}")
        if seconds < rival:
            best = trial
    return best._replace(report=f"{'; '.join(notes)} per text of {len(tokens)} calibration texts")


def _seconds_per_text(models: list[SharedSpace | OnnxText], tokens: torch.Tensor) -> list[float]:
    """The median CPU time of `TIMING_RUNS` single-text encodings by each of ``models``, cycling
    through the texts, the models taking turns on each (after one untimed run each that pays for
    first-call allocations), on one thread.

    The thread's CPU time ranks the kernels even while other processes hold the cores, when
    wall time (and a second thread waiting at every barrier) would rank the noise. It still
    counts what a shared machine's busy moments cost (a slower clock, caches shared with a
    neighbour): timed alone, in a moment of its own, onnx-int8-dynamic once measured 6.04 ms
    where six other measurements gave 4.2-4.5, and lost to a slower kernel. Models that take
    turns see the same moments."""
    times: list[list[float]] = [[] for _ in models]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for model in models:
                model.encode_text(tokens[:1])
            for run in range(TIMING_RUNS):
                one = tokens[run % len(tokens)][None]
                turns = list(enumerate(models))
                for i, model in turns if run % 2 == 0 else reversed(turns):  # neither always goes first
                    start = time.thread_time()
                    model.encode_text(one)
                    times[i].append(time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    return [statistics.median(each) for each in times]


def _verdict_key(model_ref: str | None, kernels: tuple[str, ...]) -> dict[str, Any] | None:
    """What a text verdict depends on; None when the checkpoint cannot be identified."""
    checkpoint = checkpoint_state(model_ref) if model_ref is not None else None
    return precision_verdicts.text_key(checkpoint, kernels) if checkpoint is not None else None
