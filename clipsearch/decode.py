"""Decoding and preprocessing in worker processes that run ahead of the model.

Opening a 12-megapixel JPEG costs more than encoding it with a small CLIP, so decoding runs in
separate processes (the GIL would serialise threads) while the main process encodes the
previous batch. Small images are the other way round: decoding them in the main process leaves
the model every core (`best_workers` decides from the run's first batch). Workers are started
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
import time
import types
import warnings
from collections import deque
from collections.abc import Hashable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from clipsearch.fingerprint import fingerprint
from clipsearch.photo_meta import read_file as read_header

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
    metadata: PhotoMeta | None = None
    error: str | None = None
    seconds: float = 0.0  # what decoding it took, wherever it ran (the run sizes its pool by it)


def decode_file(preprocess: Preprocess, path: bytes) -> Decoded:
    """Fingerprint, open, orient, resize and normalise one file; every failure becomes a reason
    string. Decoder warnings (corrupt EXIF, ...) go to the debug log with the file's name, not
    to the terminal.

    The file's identity (inode, size, mtime) is compared before and after: a file rewritten or
    replaced meanwhile could pair one content's fingerprint with another's pixels, so it is
    recorded as failed instead, and retried by the next run (its stat no longer matches).
    """
    from clipsearch.clip.preprocess import open_image
    from clipsearch.errors import ClipsearchError

    name = os.fsdecode(path)
    started = time.perf_counter()
    try:
        before = _identity(os.stat(path))
        digest = fingerprint(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image = open_image(name, target=preprocess.resolution)
            header = read_header(name)  # size as shown (reduced JPEG decoding shrank `image`), metadata
            pixels = preprocess.array(image)
        for warning in caught:
            log.debug("%s: %s", _printable(name), warning.message)
        if _identity(os.stat(path)) != before:
            return Decoded(None, error="the file changed while it was being read; the next run will retry it")
        return Decoded(
            pixels, header.width, header.height, digest, header.metadata, seconds=time.perf_counter() - started
        )
    except ClipsearchError as err:
        return Decoded(None, error=_printable(str(err)))
    except OSError as err:
        return Decoded(None, error=err.strerror or _printable(str(err)))
    except Exception as err:  # a decoder bug on one odd file must not stop the run
        return Decoded(None, error=_printable(f"{type(err).__name__}: {err}"))


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _printable(message: str) -> str:
    """A message safe to store and print: a non-UTF-8 file name inside it is escaped."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


_worker_preprocess: Preprocess | None = None


def _init_worker(preprocess: Preprocess) -> None:
    global _worker_preprocess
    # Ctrl-C goes to the whole process group; the main process decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_preprocess = preprocess


def _decode_in_worker(path: bytes) -> Decoded:
    return decode_file(_worker_preprocess, path)


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

    def imap(self, items: Iterable[tuple[Hashable, bytes]]) -> Iterator[tuple[Hashable, Decoded]]:
        """Yields ``(key, Decoded)`` for each ``(key, path)``, in completion order."""
        if self.workers == 0:
            for key, path in items:
                yield key, decode_file(self.preprocess, path)
            return
        yield from self._imap_workers(iter(items))

    def _imap_workers(self, items: Iterator[tuple[Hashable, bytes]]) -> Iterator[tuple[Hashable, Decoded]]:
        pending: dict[Future, tuple[Hashable, bytes]] = {}
        suspects: deque[tuple[Hashable, bytes]] = deque()  # in flight when a worker died
        isolating = False  # a suspect is running alone: if the pool breaks now, it is the culprit
        while True:
            while not isolating and len(pending) < self.window:
                if suspects:
                    if pending:  # let the rest finish, then run the suspect alone
                        break
                    item, isolating = suspects.popleft(), True
                else:
                    item = next(items, None)
                    if item is None:
                        break
                pending[self._submit(item[1])] = item
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

    def _submit(self, path: bytes) -> Future:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=_context(), initializer=_init_worker, initargs=(self.preprocess,)
            )
        with _parent_main_hidden():  # workers are started by submit()
            return self._executor.submit(_decode_in_worker, path)

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


def best_workers(decode_s: float, encode_s: float, model_uses_cpu: bool, images: int, batch: int) -> int:
    """How many decode processes index ``images`` more images fastest, given what one image
    costs to decode and to encode (measured on the run's first batch, decoded in-process with
    the model on every core).

    In-process, an image costs decode + encode. With W workers decoding beside the model, the
    slower side sets the pace: decode / W, or the encode slowed to the cores the workers leave
    the model (`THREAD_GAIN`; a model on a GPU is not slowed); and the model waits once for the
    workers to start and fill a first ``batch``. A 640x480 JPEG decodes in ~7 ms while
    ViT-B/32 wants both cores for ~45 ms: in-process (17.8 images/s against 11.1 with a
    worker). A 12-megapixel JPEG, even with reduced decoding, takes ~52 ms: a worker beside a
    one-thread model (~75 ms an image) wins on all but short runs.
    """
    cores = usable_cores()
    best, best_s = 0, images * (decode_s + encode_s)
    for workers in range(1, cores):  # the main process keeps a core: it encodes, or feeds the GPU
        slowdown = _speed(cores) / _speed(cores - workers) if model_uses_cpu else 1.0
        per_image = max(decode_s / workers, encode_s * slowdown)
        total_s = WORKER_START_S + batch * decode_s / workers + images * per_image
        if total_s < best_s:
            best, best_s = workers, total_s
    return best


def _speed(threads: int) -> float:
    return 1 + THREAD_GAIN * (threads - 1)


def usable_cores() -> int:
    """Cores this process may run on (a container's or taskset's limit, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
