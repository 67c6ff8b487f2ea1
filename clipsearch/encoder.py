"""A loaded CLIP on a device, in the fastest precision that keeps embeddings faithful.

Everything downstream (catalog, FAISS, search) sees only L2-normalised float32 numpy arrays,
whatever the device and precision the model ran in.

Text queries take a lighter road (`TextEncoder`): the text tower in NumPy, from a file the
first query exported, so that a `clipsearch query` process never imports torch. So do runs that
index images on a CPU (`NumpyImageEncoder`) where what this machine measured says a tower
without torch finishes them first: the NumPy image tower for a few, ONNX Runtime's int8 graph of
it (the onnx extra) for any number.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType, SimpleNamespace
from typing import TYPE_CHECKING, cast

import numpy as np

if TYPE_CHECKING:
    import torch

    from clipsearch.clip.model import SharedSpace, Towers
    from clipsearch.clip.numpy_image import ImageTower
    from clipsearch.clip.numpy_text import TextTower
    from clipsearch.clip.onnx_image import OnnxImageTower
    from clipsearch.clip.onnx_text import OnnxTextTower
    from clipsearch.clip.text_fast import FastText


# On a CPU a batch goes through the model this many images at a time. ViT-B-32-256 in int8 held
# 110-225 MiB of activations at peak for 32 images and ~70 for 16, and ran 16 at 20.5 ms an image
# against 25 for 32 (the operands stay in cache); bf16 ran both at 33 (2-vCPU AVX-512 EPYC).
CPU_CHUNK = 16
# How many images a warm process's image tower is chosen for (`open_encoder`) when it does not
# say: a server's uploads, which come one at a time, a few a visit. Its first upload waits for
# the tower to start (ViT-B/32 here: ONNX Runtime's graph in 0.4 s, torch's int8 in 2.6 s and
# 650 MB more), and torch's 3 ms less per image would take some 700 uploads to earn that back.
WARM_IMAGES = 100


def model_id(model_ref: str) -> str:
    """What the catalog records for a model: its registry name, or the absolute path of a
    checkpoint. Computed without loading anything, so a mismatch is refused before the slow part.
    """
    from clipsearch.clip import registry

    entry = registry.find(model_ref)
    if entry is not None:
        return entry.name
    path = os.path.expanduser(model_ref)
    if os.path.exists(path):
        return os.path.abspath(path)
    return registry.get(model_ref).name  # raises the error that lists the known names


def resolve_device(device: str) -> torch.device:
    import torch

    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def open_encoder(
    model_ref: str,
    device: str = "auto",
    precision: str = "auto",
    towers: Towers = "both",
    warm: bool = False,
    images: int | None = None,
    begun: OnnxImageTower | None = None,
) -> Encoder | TextEncoder | NumpyImageEncoder:
    """The cheapest encoder that can do the job: `TextEncoder` for text alone on the CPU in
    full precision (what "auto" means for a text tower), else `Encoder`. A text query on a GPU
    machine stays on the CPU too: one query takes milliseconds there, starting CUDA a second.
    The NumPy text tower is CLIP's: SigLIP and XLM-R models encode text with `Encoder`.

    A ``warm`` process (a server, an app: many texts, one start) gets an `Encoder` whose texts go
    through `clip.text_fast` (bf16 or int8 weights where they are faithful) with "auto"
    precision: importing torch and preparing the tower cost it once what a one-shot query
    process would pay for every query; once that tower is a cached ONNX graph, a text-only warm
    process gets a `TextEncoder` on it and never imports torch. ``images``: how many images it is
    opened to encode ("auto" precision weighs that against each precision's preparation,
    `clip.cpu.cheapest_for`; for the image tower alone on a CPU, against the towers without torch
    too: `NumpyImageEncoder`; a warm process's image tower, for `WARM_IMAGES` when it gives no count).
    ``begun``: the graph `begin_image_tower` began to open, used if that is the tower chosen."""
    from clipsearch.clip.families import family

    if towers == "image" and precision == "auto" and (images is not None or warm) and _cpu_only(device):
        count = images if images is not None else WARM_IMAGES
        numpy_encoder = _numpy_image_encoder(model_ref, count, begun)
        if numpy_encoder is None and _measured_now(model_ref):  # a model's first run on this machine
            numpy_encoder = _numpy_image_encoder(model_ref, count, None)
        if numpy_encoder is not None:
            return numpy_encoder

    text_on_cpu = towers == "text" and device in ("auto", "cpu")
    if warm and precision == "auto" and text_on_cpu and family(model_ref) == "clip":
        graph = _remembered_text_graph(model_ref)
        if graph is not None:
            return graph
    if warm and precision == "auto":
        encoder = Encoder(model_ref, "cpu" if text_on_cpu else device, precision, towers)
        encoder.prepare_texts()
        return encoder
    if text_on_cpu and precision in ("auto", "fp32") and family(model_ref) == "clip":
        return TextEncoder(model_ref)
    return Encoder(model_ref, device, precision, towers, images)


def _cpu_only(device: str) -> bool:
    """Whether ``device`` means the CPU, known without importing torch: "auto" does where no GPU
    driver (NVIDIA, ROCm, WSL's) or Apple GPU could be there for torch to find."""
    if device == "cpu":
        return True
    gpu_nodes = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")
    return device == "auto" and sys.platform != "darwin" and not any(os.path.exists(node) for node in gpu_nodes)


def _measured_now(model_ref: str) -> bool:
    """Measure the image tower's precisions on this CPU unless they were (`clip.cpu.measure`);
    True when it measured now. The run then takes the tower the measurement found fastest for
    it, which is often one without torch: the measurement let go of every model torch held."""
    cpu, importing = _cpu_module()
    return cpu.measure(model_ref, "image", importing)


def _cpu_module() -> tuple[ModuleType, float | None]:
    """`clip.cpu`, which imports torch, and the seconds importing torch took when this call did
    it (None when it was imported already): a first measurement weighs them against the towers
    that run without torch."""
    started, fresh = time.perf_counter(), "torch" not in sys.modules
    from clipsearch.clip import cpu

    return cpu, time.perf_counter() - started if fresh else None


def _remembered_text_graph(model_ref: str) -> TextEncoder | None:
    """A warm text-only `TextEncoder` on the ONNX graph this machine's text verdict chose, when
    it stands and the graph is cached (`onnx_text.remembered`): torch is never imported, so a
    process that searches by text (an app, a notebook) starts in a fraction of a second and holds
    a third of the memory. (`clipsearch serve` loads the image tower too, for uploads.)"""
    from clipsearch.clip import onnx_graph, onnx_text
    from clipsearch.clip.cpu_features import usable_cores

    if not onnx_graph.available():
        return None
    found = onnx_text.remembered(model_ref, usable_cores())
    return TextEncoder(model_ref, found) if found is not None else None


def _numpy_image_encoder(model_ref: str, images: int, begun: OnnxImageTower | None) -> NumpyImageEncoder | None:
    """A `NumpyImageEncoder` when this machine's measurements say a tower that runs without
    torch encodes ``images`` sooner than torch would, and that tower is cached (``begun``, for
    ONNX Runtime's graph, when one is); None otherwise."""
    from clipsearch.clip import numpy_image, onnx_image
    from clipsearch.clip.precision_verdicts import NUMPY, torchless_image_tower

    winner = torchless_image_tower(model_ref, images)
    if winner is None:
        return None
    tower = numpy_image.load_cached(model_ref) if winner == NUMPY else begun or onnx_image.load_cached(model_ref)
    return NumpyImageEncoder(model_ref, tower) if tower is not None else None


def begin_image_tower(model_ref: str, device: str = "auto", precision: str = "auto") -> OnnxImageTower | None:
    """ONNX Runtime's graph of ``model_ref``'s image tower, its session opening on a thread of
    its own (`onnx_image.load_cached`), where that is the tower "auto" takes on this CPU for a
    run of unknown size (`WARM_IMAGES`); None otherwise. An `Index` made in a new home, which a
    run fills next, begins it before creating its catalog: the session (0.3-0.5 s for ViT-B/32
    on two AVX2 cores, with the GIL let go) then opens meanwhile, not after the folders are
    walked with the first batch waiting for it. `open_encoder` takes it up, or lets it go for
    another tower (a run of a few images: NumPy's)."""
    from clipsearch.clip import onnx_image
    from clipsearch.clip.precision_verdicts import ONNX, torchless_image_tower

    if precision != "auto" or not _cpu_only(device) or torchless_image_tower(model_ref, WARM_IMAGES) != ONNX:
        return None
    return onnx_image.load_cached(model_ref)


class TextMemory:
    """The embeddings of the last `TextMemory.size` texts encoded, by text.

    Searches repeat themselves: a page of results reloaded, a filter or a folder changed, an app
    asking again. A text costs the text tower 10-40 ms on a CPU, more than the vector search at a
    million images, so a repeated one is looked up instead; the vectors are the same either way.
    """

    size = 1024  # 2 KB per text at 512 dimensions

    def __init__(self) -> None:
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str], encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """``encode(texts)``, calling ``encode`` only for the texts not remembered."""
        if not texts:
            return encode([])
        with self._lock:
            missing = [text for text in dict.fromkeys(texts) if text not in self._vectors]
        found = dict(zip(missing, encode(missing))) if missing else {}
        with self._lock:
            for text, vector in found.items():
                self._vectors[text] = vector.copy()
            rows = [found[text] if text in found else self._vectors[text] for text in texts]
            for text in texts:
                if text in self._vectors:
                    self._vectors.move_to_end(text)
            while len(self._vectors) > self.size:
                self._vectors.popitem(last=False)
        return np.stack(rows)


class Encoder:
    """A model loaded with only the towers a job needs (``towers="text"`` for text queries:
    the image tower is neither built nor read), in the precision `clip.cpu` finds fastest on
    this device without moving the embeddings (``precision="fp32"`` forces full precision)."""

    shares_cores = False  # torch's OpenMP threads want their cores to themselves (`decode.best_workers`)

    def __init__(
        self,
        model_ref: str,
        device: str = "auto",
        precision: str = "auto",
        towers: Towers = "both",
        images: int | None = None,
    ):
        cpu, importing = _cpu_module()
        self.model_id = model_id(model_ref)
        self.device = resolve_device(device)
        self.towers = towers
        (self.model, self.precision, self.input_dtype), self.preprocess = cpu.load_prepared(
            model_ref, precision, self.device, towers, images, importing
        )
        model = self.model
        self.dim: int = model.config.embed_dim
        self.resolution: int = model.config.image_resolution
        self.logit_scale = float(model.logit_scale.detach().float().exp())
        # Sigmoid families (SigLIP): sigmoid(logit_scale * cos + logit_bias) is a probability.
        bias = getattr(model, "logit_bias", None)
        self.logit_bias: float | None = None if bias is None else float(bias.detach().float())
        self._texts = TextMemory()

    def encode_images(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        """``[N, 3, R, R]`` preprocessed images → ``float32 [N, dim]`` unit vectors."""
        import torch

        batch = torch.as_tensor(pixels)
        if self.device.type == "cuda":
            # Page-locked memory lets the copy run asynchronously, overlapping the last batch.
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        parts = batch.split(CPU_CHUNK) if self.device.type == "cpu" and len(batch) > CPU_CHUNK else (batch,)
        with torch.inference_mode():
            return np.concatenate(
                [_normalised(self.model.encode_image(part.to(self.device, self.input_dtype))) for part in parts]
            )

    @contextmanager
    def threads(self, count: int) -> Iterator[None]:
        """The model on ``count`` threads for a moment (decode workers have the other cores)."""
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts → ``float32 [N, dim]`` unit vectors. Text longer than the model's context is
        cut, as a search box should, rather than refused."""
        return self._texts.encode(texts, self._encode_texts)

    # Which text tower `encode_texts` runs: "model" (the loaded one, in the model's precision),
    # or after `prepare_texts` on a CPU "fast <kernel>" (`clip.text_fast`).
    text_path = "model"
    _fast_text: FastText | None = None

    def prepare_texts(self) -> str:
        """Encode texts from now on with `clip.text_fast`'s tower, for a process that will encode
        many (its first call measures the kernels once per model and machine: seconds).
        On a GPU, or for a tower it cannot copy, the model's own tower stays. The path taken."""
        from clipsearch.clip.text_fast import fast_text_tower

        if self._fast_text is None and self.device.type == "cpu" and self.towers != "image":
            fast = fast_text_tower(self.model, self.model_id)
            if fast is not None:
                self._fast_text, self.text_path = fast, f"fast {fast.kernel}"
                if self.towers == "text":  # the loaded tower has nothing left to do: its memory goes
                    # An OnnxText has all a text-only Encoder reads of its model: the tokenizer,
                    # the context length and encode_text.
                    self.model = cast("SharedSpace", fast.model)
        return self.text_path

    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        model = self.model if self._fast_text is None else self._fast_text
        tokens = self.model.tokenizer(texts, context_length=self.model.context_length, truncate="warn")
        with torch.inference_mode():
            return _normalised(model.encode_text(tokens.to(self.device)))


class TextEncoder:
    """Text to unit vectors without torch: CLIP's text tower in NumPy (`clip.numpy_text`), or a
    warm process's ONNX graph of it (`clip.onnx_text`) with its tokenizer.

    The NumPy tower's weights come from the model cache, where the first text query of a model
    exported them; when they are missing or stale, the model is loaded with torch once more and
    exported again.
    """

    towers = "text"
    logit_bias: float | None = None  # CLIP's scores have no bias

    def __init__(self, model_ref: str, graph: tuple[str, OnnxTextTower] | None = None):
        """``graph``: the kernel and the graph to encode with instead of the NumPy tower."""
        from clipsearch.clip import numpy_text

        self.model_id = model_id(model_ref)
        self.tower = numpy_text.load_cached(model_ref) or numpy_text.export(model_ref)
        self.text_path = "numpy" if graph is None else f"fast {graph[0]}"
        self._encoder: TextTower | OnnxTextTower = self.tower if graph is None else graph[1]
        self.dim: int = self.tower.embed_dim
        self.logit_scale = self.tower.logit_scale
        self._texts = TextMemory()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts → ``float32 [N, dim]`` unit vectors, as `Encoder.encode_texts` gives them."""
        return self._texts.encode(texts, self._encode_texts)

    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        tokens = self.tower.tokenizer.ids(texts, context_length=self.tower.context_length, truncate="warn")
        return _unit(self._encoder.encode_text(tokens))


class NumpyImageEncoder:
    """Images to unit vectors without torch: CLIP's ViT image tower in NumPy (`clip.numpy_image`,
    memory-mapped from the file the model's precision verdict exported) or as ONNX Runtime's
    graph (`clip.onnx_image`, built from that file). What the indexer uses of an `Encoder`
    (``encode_images``, ``preprocess``, ``dim``, ``device.type``, ``threads``); it has no text
    tower, so an `Index` that needs texts too opens an `Encoder`."""

    towers = "image"
    device = SimpleNamespace(type="cpu")
    logit_bias: float | None = None

    def __init__(self, model_ref: str, tower: ImageTower | OnnxImageTower):
        self.model_id = model_id(model_ref)
        self.tower = tower
        self.precision: str = tower.precision
        self.preprocess = tower.preprocess
        self.resolution: int = tower.preprocess.resolution
        self.dim: int = tower.embed_dim
        self.logit_scale = tower.logit_scale
        self.shares_cores: bool = tower.shares_cores

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """``[N, 3, R, R]`` preprocessed images → ``float32 [N, dim]`` unit vectors, as
        `Encoder.encode_images` gives them (in fp32 from NumPy, in int8 from ONNX Runtime)."""
        return _unit(self.tower.encode_images(pixels, self._threads))

    _threads: int | None = None  # None: a thread per usable core

    @contextmanager
    def threads(self, count: int) -> Iterator[None]:
        """The tower on ``count`` threads for a moment (decode workers have the other cores)."""
        before, self._threads = self._threads, count
        try:
            yield
        finally:
            self._threads = before


def _normalised(features: torch.Tensor) -> np.ndarray:
    return _unit(features.float().cpu().numpy())


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
