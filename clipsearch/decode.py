"""Decoding and preprocessing in worker processes that run ahead of the model.

Opening a 12-megapixel JPEG costs more than encoding it with a small CLIP, so decoding runs in
separate processes (the GIL would serialise threads) while the main process encodes the
previous batch. Small images are the other way round: decoding them in the main process leaves
a model on torch's threads every core; ONNX Runtime's share them with the workers
(`best_workers` decides from the run's first batch). Workers are started
with ``forkserver``/``spawn``, never ``fork``: forking a process that has already started
torch's thread pools can deadlock.

A file that fails to decode is a result, not an exception: the run records the reason and goes
on. Even a decoder that crashes its whole process (a native-library bug on a malicious file)
only costs that one file: the pool is restarted and the files that were in flight are retried
one at a time, so the culprit is found and the innocent ones go through.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import types
import warnings
from collections import deque
from collections.abc import Hashable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from clipsearch import photo_meta
from clipsearch.clip.cpu_features import usable_cores
from clipsearch.fingerprint import fingerprint, open_regular

if TYPE_CHECKING:
    from clipsearch.clip.preprocess import Preprocess
    from clipsearch.records import PhotoMeta

log = logging.getLogger(__name__)


@dataclass
class Decoded:
    """One file's outcome: the model's input tensor (as numpy, which crosses a process boundary
    as one buffer copy), the image size as the user sees it and the file's fingerprint, or the
    reason it failed."""

    pixels: np.ndarray | None
    width: int = 0
    height: int = 0
    fingerprint: bytes | None = None
    error: str | None = None
    seconds: float = 0.0  # what decoding it took, wherever it ran (the run sizes its pool by it)
    metadata: PhotoMeta | None = None  # what the file says about itself (`photo_meta`)


@dataclass(frozen=True)
class Probe:
    """What the indexer learnt of a file it opened to look for a vector to reuse (`probe_file`):
    handed to the decoder when there was none, which then neither fingerprints it again nor
    trusts a file that is no longer the one probed."""

    fingerprint: bytes
    identity: tuple[int, int, int]


def probe_file(path: bytes) -> Probe:
    """Fingerprint a file (`open_regular`: never blocking, never anything but a regular file).
    Its pixels are not looked at: a copy of indexed bytes takes the size and metadata that
    decoding them found. Raises OSError when it cannot be read."""
    with open_regular(path) as f:
        return Probe(fingerprint(f), _identity(os.fstat(f.fileno())))


def decode_file(preprocess: Preprocess, path: bytes, probe: Probe | None = None) -> Decoded:
    """Fingerprint (unless ``probe`` did), decode, orient, resize and normalise one file, all from
    one open of it; every failure becomes a reason string. Decoder warnings (corrupt EXIF, ...) go
    to the debug log with the file's name, not to the terminal.

    The open file's identity (inode, size, mtime) is compared when it is opened (with the probe's,
    if any) and once read: a file rewritten meanwhile could pair one content's fingerprint with
    another's pixels, so it is recorded as failed instead, and retried by the next run (its stat
    no longer matches).
    """
    from clipsearch.clip.preprocess import load_upright, opened_image
    from clipsearch.errors import ClipsearchError

    name = os.fsdecode(path)
    started = time.perf_counter()
    try:
        with open_regular(path) as f:
            opened = _identity(os.fstat(f.fileno()))
            if probe is not None and probe.identity != opened:
                return Decoded(None, error=_CHANGED)
            digest = fingerprint(f) if probe is None else probe.fingerprint
            f.seek(0)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with opened_image(f, name) as image:
                    stored = image.size  # the header's: reduced decoding shrinks the image
                    upright = load_upright(image, preprocess.resolution)
                    turned = upright.size != image.size  # EXIF orientations 5-8 (a square looks the same)
                    width, height = stored[::-1] if turned else stored
                    pixels = preprocess.array(upright)
                    metadata = photo_meta.read(image)  # loaded by now: a PNG's EXIF may follow its pixels
            for warning in caught:
                log.debug("%s: %s", _printable(name), warning.message)
            if _identity(os.fstat(f.fileno())) != opened:
                return Decoded(None, error=_CHANGED)
        return Decoded(pixels, width, height, digest, seconds=time.perf_counter() - started, metadata=metadata)
    except ClipsearchError as err:
        return Decoded(None, error=_printable(str(err)))
    except OSError as err:
        return Decoded(None, error=failure_reason(err))
    except Exception as err:  # a decoder bug on one odd file must not stop the run
        return Decoded(None, error=_printable(f"{type(err).__name__}: {err}"))


_CHANGED = "the file changed while it was being read; the next run will retry it"


def failure_reason(err: OSError) -> str:
    """What the catalog records for a file that could not be read: the system's words."""
    return err.strerror or _printable(str(err))


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _printable(message: str) -> str:
    """A message safe to store and print: a non-UTF-8 file name inside it is escaped."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


_worker_preprocess: Preprocess | None = None


def _init_worker(preprocess: Preprocess) -> None:
    global _worker_preprocess
    # Ctrl-C, and a SIGTERM sent to the process group, reach workers too; the main process
    # decides how to stop, and shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with_parent()
    _worker_preprocess = preprocess


def _exit_with_parent() -> None:
    """End this worker when the process that started the pool dies, however it dies.

    Nothing else would: a worker waits on a task queue whose write end it holds itself, and its
    parent is the forkserver, which lives as long as any worker does; together with the
    resource tracker they outlived a SIGKILLed indexer for ever, holding its stdout and stderr
    (a caller reading them hung). multiprocessing gives every child a pipe from its parent that
    reaches end-of-file when the parent dies (`parent_process().sentinel`); a thread waits on it.
    """
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_when_gone, args=(parent,), name="exit-with-parent", daemon=True).start()


def _exit_when_gone(parent: multiprocessing.process.BaseProcess) -> None:
    parent.join()
    os._exit(1)


def _decode_in_worker(path: bytes, probe: Probe | None) -> Decoded:
    assert _worker_preprocess is not None, "set by _init_worker"
    return decode_file(_worker_preprocess, path, probe)


@contextmanager
def _parent_main_hidden() -> Iterator[None]:
    """Workers run only this module's functions, so they never need the parent's ``__main__``.
    Left visible, multiprocessing re-imports it in each worker, which re-runs a user's script
    that lacks an ``if __name__ == "__main__":`` guard (and it would start indexing again)."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # Workers fork from a server that has imported this module and Pillow once (not torch).
        ctx.set_forkserver_preload([__name__, "clipsearch.clip.preprocess"])
        return ctx
    return multiprocessing.get_context("spawn")


Key = TypeVar("Key", bound=Hashable)
Job = tuple[Key, bytes, Probe | None]  # (the caller's key, path, its probe if any)


class DecodePool:
    """Decodes files in ``workers`` processes, or in this process when ``workers`` is 0 (tests,
    tiny runs, where starting processes costs more than it saves).

    ``window`` bounds the files in flight, which bounds memory and how far decoding runs ahead.
    """

    def __init__(self, preprocess: Preprocess, workers: int, window: int | None = None):
        self.preprocess = preprocess
        self.workers = workers
        self.window = window or max(1, 4 * workers)
        self._executor: ProcessPoolExecutor | None = None

    def imap(self, jobs: Iterable[Job[Key]]) -> Iterator[tuple[Key, Decoded]]:
        """Yields ``(key, Decoded)`` for each ``(key, path, probe)``, in completion order."""
        if self.workers == 0:
            for key, path, probe in jobs:
                yield key, decode_file(self.preprocess, path, probe)
            return
        yield from self._imap_workers(iter(jobs))

    def _imap_workers(self, jobs: Iterator[Job[Key]]) -> Iterator[tuple[Key, Decoded]]:
        pending: dict[Future, Job[Key]] = {}
        suspects: deque[Job[Key]] = deque()  # in flight when a worker died
        isolating = False  # a suspect is running alone: if the pool breaks now, it is the culprit
        while True:
            while not isolating and len(pending) < self.window:
                if suspects:
                    if pending:  # let the rest finish, then run the suspect alone
                        break
                    item, isolating = suspects.popleft(), True
                else:
                    following = next(jobs, None)
                    if following is None:
                        break
                    item = following
                pending[self._submit(item)] = item
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            crashed = []
            for future in done:
                item = pending.pop(future)
                try:
                    yield item[0], future.result()
                except BrokenProcessPool:
                    crashed.append(item)
            if not crashed:
                isolating = False
                continue
            if isolating:
                log.warning("decoding %s crashed a worker process", os.fsdecode(crashed[0][1]))
                yield crashed[0][0], Decoded(None, error="decoding this file crashed the decoder process")
            else:
                suspects.extend(crashed)
                suspects.extend(pending.values())
            pending.clear()
            isolating = False
            self._restart()

    def _submit(self, job: Job) -> Future:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=_context(), initializer=_init_worker, initargs=(self.preprocess,)
            )
        with _parent_main_hidden():  # workers are started by submit()
            return self._executor.submit(_decode_in_worker, job[1], job[2])

    def _restart(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def close(self) -> None:
        self._restart()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# From creating a pool to its first result: a new process that imports Pillow and NumPy, not
# torch (0.24 s measured on a 2-core machine; with torch it was 1.6 s).
WORKER_START_S = 0.3
# What each further thread adds to the model's speed: int8 ViT-B-32-256 ran 74 ms an image on one
# thread and 40 ms on two (1.85x).
THREAD_GAIN = 0.85


def best_workers(
    decode_s: float, encode_s: float, model_uses_cpu: bool, images: int, batch: int, shares_cores: bool = False
) -> int:
    """How many decode processes index ``images`` more images fastest, given what one image
    costs to decode and to encode (measured on the run's first batch, decoded in-process with
    the model on every core).

    In-process, an image costs decode + encode. With W workers decoding beside the model, the
    slower side sets the pace: decode / W, or the model; and the model waits once for the
    workers to start and fill a first ``batch``. A model on a GPU is not slowed by them. One on
    the CPU either gives the workers their cores (`THREAD_GAIN` says what that costs it: a
    640x480 JPEG decodes in ~7 ms while ViT-B/32 wants both cores for ~45 ms, so in-process
    wins; a 12-megapixel JPEG takes ~52 ms even with reduced decoding, and a worker beside a
    one-thread model, ~75 ms an image, wins on all but short runs), or, where its thread pool
    ``shares_cores`` with busy processes, keeps them all and loses only the CPU time the
    workers take: encode + decode / cores an image, and each worker's start. That start is what
    keeps a many-core machine from starting a worker a core (16 cores, an image 7 ms to decode
    and 5 to encode: 3 workers).
    """
    cores = usable_cores()
    best, best_s = 0, images * (decode_s + encode_s)
    sharing = model_uses_cpu and shares_cores
    # The main process keeps a core (it encodes, or feeds the GPU) unless the model shares them.
    for workers in range(1, cores + 1 if sharing else cores):
        if not model_uses_cpu:
            model_s = encode_s
        elif sharing:
            model_s = encode_s + decode_s / cores
        else:
            model_s = encode_s * _speed(cores) / _speed(cores - workers)
        per_image = max(decode_s / workers, model_s)
        total_s = WORKER_START_S + batch * decode_s / workers + images * per_image
        if sharing:
            total_s += workers * WORKER_START_S / cores
        if total_s < best_s:
            best, best_s = workers, total_s
    return best


def _speed(threads: int) -> float:
    return 1 + THREAD_GAIN * (threads - 1)
