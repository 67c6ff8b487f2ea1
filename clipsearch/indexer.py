"""One `add` run: walk, diff against the catalog, decode, encode, commit per batch, report.

The run is shaped by what a re-run over an unchanged library must cost: one bulk read of the
catalog's file states, one directory walk, one dictionary lookup per file — no per-file query,
no model load, no torch import unless some file actually needs encoding.

Every batch is its own transaction, so a crash or Ctrl-C loses at most the batch in flight, and
the next run picks up where this one stopped (committed files are unchanged by then).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np

from clipsearch.clip.heap import release_free_memory
from clipsearch.decode import Decoded, DecodePool, Job, Probe, best_workers, failure_reason, probe_file, usable_cores
from clipsearch.errors import ClipsearchError, ImageError
from clipsearch.fingerprint import fingerprint, identifies
from clipsearch.manifest import Manifest
from clipsearch.photo_meta import read_file as read_header
from clipsearch.records import (
    STATUS_FAILED,
    STATUS_INDEXED,
    STATUS_MISSING,
    FailedFile,
    FileState,
    ImageRow,
    IndexedFile,
    PhotoMeta,
)
from clipsearch.walk import FoundFile, Walk, normalise_roots, under

if TYPE_CHECKING:
    from clipsearch.catalog import Catalog
    from clipsearch.encoder import Encoder

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (files done, files to do); first call once the walk is over


class Executor(Protocol):
    """Another way to run a plan's encodes (`clipsearch.ray_index`): decode and encode ``todo``,
    commit it to ``catalog`` batch by batch (counting in ``report``, calling ``progress``,
    stopping when ``should_stop``), and return the contents among ``gone`` (fingerprints of the
    files gone from disk) that it indexed again under another path: those files were moved."""

    def __call__(
        self,
        catalog: Catalog,
        model: str,
        todo: list[tuple[FoundFile, bool]],
        gone: set[bytes],
        report: AddReport,
        progress: Progress | None,
        should_stop: Callable[[], bool],
    ) -> set[bytes]: ...


DEFAULT_BATCH_SIZE = 32
# Files probed (and looked up for reuse) together: one catalog query per chunk, while decoding
# of the previous chunk is still in flight.
_CHUNK = 256
_PROBE_THREADS = 4  # file reads and hashing release the GIL; helps most on slow disks
_METADATA_CHUNK = 1000  # headers read per transaction when filling in the metadata of older rows
# Images in the first batch of a run that chooses its decode workers, decoded in this process to
# measure what an image costs: few, since that is the slow way for large photos (32 photos of
# 12 MP cost 1 s more than with workers beside the graph), and the first vectors land sooner.
_FIRST_BATCH = 8


@dataclass
class AddReport:
    """What one run did. ``moved`` and ``copied`` count files that took the vector of an identical
    file already indexed, without encoding: moved (or renamed) where that content left its old
    path, else copied. Any file indexed also takes the other models' vectors of its content
    (`Catalog.commit_batch`), so a move keeps them all. ``removed`` counts files gone from disk."""

    new: int = 0
    changed: int = 0
    moved: int = 0
    copied: int = 0
    removed: int = 0
    failed: int = 0
    unchanged: int = 0
    # Of the unchanged: files that failed in an earlier run, not tried again (`retry_failed`).
    # Fixed since (a chmod changes no mtime), they had stayed failed with no word of it.
    failed_before: int = 0
    unreadable: int = 0  # folders that could not be listed (their files were left as they were)
    verified: int = 0  # unchanged files fingerprinted again (`verify`)
    metadata: int = 0  # files indexed before, whose metadata was read from their header now
    # Images encoded again in this run because the model's weights changed since their vectors
    # were made (`run_add`'s ``stale``): counted here, neither as new nor as changed files.
    stale: int = 0
    elapsed: float = 0.0
    model_load_s: float = 0.0  # part of elapsed: loading the model, once, if anything needed it
    interrupted: bool = False

    @property
    def encoded(self) -> int:
        """Images encoded in this run: new, changed, and re-encoded for new weights."""
        return self.new + self.changed + self.stale

    @property
    def images_per_s(self) -> float:
        """The encode rate: images encoded per second of the run once the model was loaded."""
        working = self.elapsed - self.model_load_s
        return self.encoded / working if working > 0 else 0.0


@dataclass
class Plan:
    """The diff between the walk and the catalog."""

    todo: list[tuple[FoundFile, bool]] = field(default_factory=list)  # (file, is new)
    missing: list[bytes] = field(default_factory=list)
    unchanged: int = 0
    failed_before: int = 0  # of the unchanged
    unreadable: int = 0
    # With `verify`: indexed files whose size and mtime are as recorded, with their fingerprints.
    to_verify: list[tuple[FoundFile, bytes]] = field(default_factory=list)
    # Indexed files of the recorded size but another mtime, with their fingerprints: the same
    # content is only re-timed, not encoded again.
    retimed: list[tuple[FoundFile, bytes]] = field(default_factory=list)


def plan_changes(
    states: dict[bytes, FileState], walk: Walk | Manifest, retry_failed: bool = False, verify: bool = False
) -> Plan:
    """Compare the walk with the catalog: which files need work, which are gone.

    Only catalog rows under the roots walked now can be gone; rows under a folder that could
    not be listed are kept, since an unreadable folder is not a deleted one, and so are rows an
    exclude pattern skipped (`Walk.excludes`: `remove` forgets them). A file whose size
    and mtime are as recorded is taken as unchanged, unless ``verify`` asks to fingerprint it.
    """
    plan = Plan()
    unseen = dict(states)  # what is left once the walk has popped what it saw
    queued: set[bytes] = set()
    for found in walk:
        state = unseen.pop(found.path, None)
        if state is None:
            if found.path in states or found.path in queued:
                continue  # overlapping roots yielded it twice
            queued.add(found.path)
            plan.todo.append((found, True))
        elif state.status == STATUS_MISSING:
            plan.todo.append((found, True))
        elif (state.status == STATUS_FAILED and retry_failed) or state.size != found.size:
            plan.todo.append((found, False))
        elif state.mtime_ns != found.mtime_ns:
            if (
                state.status == STATUS_INDEXED
                and state.encoded
                and state.fingerprint is not None
                and identifies(found.path, found.size)
            ):
                plan.retimed.append((found, state.fingerprint))
            else:
                plan.todo.append((found, False))
        elif state.status == STATUS_INDEXED and not state.encoded:
            plan.todo.append((found, True))  # indexed by other models: new to this one
        elif verify and state.status == STATUS_INDEXED and state.fingerprint is not None:
            if identifies(found.path, found.size):
                plan.to_verify.append((found, state.fingerprint))
            else:  # its fingerprint cannot tell an edit in its middle: encoded again to be sure
                plan.todo.append((found, False))
        else:
            plan.unchanged += 1
            plan.failed_before += state.status == STATUS_FAILED
    if isinstance(walk, Walk):
        for root in walk.roots:
            _keep_if_unmounted(root, unseen, walk)
    plan.unreadable = len(walk.unreadable)
    in_roots, in_unreadable = under(walk.roots), under(walk.unreadable)
    excluded = walk.excludes if isinstance(walk, Walk) else lambda path: False
    plan.missing = [
        path
        for path, state in unseen.items()
        if state.status != STATUS_MISSING and in_roots(path) and not in_unreadable(path) and not excluded(path)
    ]
    return plan


def _keep_if_unmounted(root: bytes, unseen: dict[bytes, FileState], walk: Walk) -> None:
    """A root folder that is empty now (nothing in it at all) but had files indexed that the
    walk did not see is taken for unreadable, not for emptied: an unmounted drive's mount point
    looks just so, and marking its files missing would drop their vectors, so that mounting it
    again re-encoded them all."""
    inside = under([root])
    held = sum(1 for path, state in unseen.items() if state.status != STATUS_MISSING and inside(path))
    if held and _empty(root):
        log.warning(
            "%s is empty, but %d file(s) under it are indexed; they are kept as they are (is it a drive that is "
            "not mounted?). If they were deleted, `clipsearch remove %s` forgets them.",
            os.fsdecode(root),
            held,
            os.fsdecode(root),
        )
        walk.unreadable.append(root)


def _gone(path: bytes) -> bool:
    """Whether the file at ``path`` is no longer there, rather than out of reach: a folder that
    cannot be read, or a drive that is not mounted (the nearest folder left is empty: its mount
    point, whose rows stay, as `_keep_if_unmounted` keeps them)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        folder = os.path.dirname(path)
        while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder)
        return not _empty(folder)
    except OSError:
        return False
    return False


def _empty(folder: bytes) -> bool:
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except OSError:  # a file, or a folder that could not be listed (said when it was walked)
        return False


def run_add(
    catalog: Catalog,
    model: str,
    get_encoder: Callable[[int], Encoder],
    roots: Iterable[str | os.PathLike] | str | os.PathLike | Manifest,
    *,
    exclude: Sequence[str] = (),
    follow_symlinks: bool = False,
    retry_failed: bool = False,
    verify: bool = False,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    executor: Executor | None = None,
    weights: str | None = None,
    verify_progress: Progress | None = None,
    stale: Collection[bytes] = frozenset(),
) -> AddReport:
    """Bring the catalog, and ``model``'s vectors in it, up to date with the files under ``roots``
    (or the files a `Manifest` lists).

    A file rewritten with its size and mtime kept (an editor that restores the mtime, a copy
    with ``cp -p`` of a same-size file) is taken as unchanged; ``verify`` fingerprints every
    indexed file again and re-encodes those whose content differs from what was indexed.

    ``get_encoder(files to encode)`` (loading ``model``) is called only once some file needs decoding
    (a folder moved or copied whole reuses its vectors and never loads it), and not at all when an
    ``executor`` does the encoding. ``should_stop`` is polled between files; once it
    returns True the batch not yet encoded is dropped, everything finished is committed, and the
    report comes back with ``interrupted`` set. ``weights`` (`sources.weights_fingerprint`) is
    recorded with the model's first vector. ``stale``: the paths whose vectors by ``model`` were
    dropped before the run for having been made by other weights; encoding them again is counted
    in ``report.stale``, not as new files.
    """
    started = time.perf_counter()
    walk = roots if isinstance(roots, Manifest) else _walk(roots, exclude, follow_symlinks, catalog.home)
    if catalog.default_model is None:
        # Recorded even if nothing gets encoded (an empty folder): the next command without
        # --model must use this model, not the built-in default.
        catalog.set_meta("default_model", model)
    states = catalog.file_states(model)
    plan = plan_changes(states, walk, retry_failed, verify)
    if isinstance(walk, Manifest):
        plan.missing = walk.missing(states)
    report = AddReport(
        unchanged=plan.unchanged,
        failed_before=plan.failed_before,
        unreadable=plan.unreadable,
        verified=len(plan.to_verify),
    )
    plan.unchanged += len(_as_indexed(plan, plan.to_verify, should_stop, verify_progress))
    retimed = _as_indexed(plan, plan.retimed, should_stop, None)
    catalog.set_mtimes([(found.path, found.mtime_ns) for found in retimed])
    report.unchanged = plan.unchanged + len(retimed)
    if progress:
        progress(0, len(plan.todo))
    moved_content: set[bytes] = set()
    left: set[bytes] = set()  # indexed paths, outside the folders walked, whose content moved here
    if plan.todo and not should_stop() and executor is not None:
        gone_content = {fp for fp in (states[path].fingerprint for path in plan.missing) if fp is not None}
        moved_content = executor(catalog, model, plan.todo, gone_content, report, progress, should_stop)
        if stale:
            _count_stale_after(catalog, model, plan.todo, stale, moved_content, report)
    elif plan.todo and not should_stop():
        sizes = {state.size for state in states.values() if state.encoded}
        run = _Run(catalog, model, get_encoder, plan.todo, sizes, report, progress, should_stop, weights, stale)
        run.run(batch_size or DEFAULT_BATCH_SIZE, workers)
        # What decoding and encoding freed goes back to the system before the vector index is
        # updated, rather than staying with glibc beneath FAISS's allocations (500 photos: peak
        # RSS 916-930 -> 877-911 MiB).
        release_free_memory()
        moved_content = run.reused_fingerprints
        left = run.left - set(plan.missing)
    renamed = [path for path in plan.missing if states[path].fingerprint in moved_content]
    # Each old path whose content turned up again is one move; the other reuses were copies.
    report.copied = report.moved - min(report.moved, len(renamed) + len(left))
    report.moved -= report.copied
    if should_stop():
        report.interrupted = True
    else:
        # Gone files are dealt with last: until now their vectors could be reused by the files
        # they moved to. A file whose content reappeared elsewhere was moved (renamed): its old
        # row goes (those outside the folders walked, `left`, went with the batch that took
        # their vector). The others are marked missing. A stopped run leaves them for the next one.
        gone = [path for path in plan.missing if states[path].fingerprint not in moved_content]
        if renamed:
            catalog.remove(renamed)
        if gone:
            catalog.commit_batch(missing=gone)
        report.removed = len(gone)
    if not report.interrupted:
        report.metadata = fill_metadata(catalog, walk.roots, walk.unreadable, should_stop)
    report.elapsed = time.perf_counter() - started
    return report


def _walk(
    roots: Iterable[str | os.PathLike] | str | os.PathLike,
    exclude: Sequence[str],
    follow_symlinks: bool,
    home: str | os.PathLike,
) -> Walk:
    root_paths = list(dict.fromkeys(normalise_roots(roots)))
    for root in root_paths:
        if not os.path.lexists(root):
            raise ClipsearchError(
                f"{os.fsdecode(root)} does not exist; check the path "
                "(to forget files indexed there, use `clipsearch remove`)."
            )
    # One pattern alone is one pattern: "*.png" had been taken for its characters, "*" among them.
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    # The index's own folder is no photos (the web page's thumbnails are images), wherever it is.
    return Walk(root_paths, patterns, follow_symlinks, skip=(os.fsencode(home),))


def fill_metadata(
    catalog: Catalog, roots: Sequence[bytes], unreadable: Sequence[bytes], should_stop: Callable[[], bool]
) -> int:
    """Read the metadata of the indexed files under ``roots`` that were indexed before the
    catalog recorded it (or by an older reader) from their headers, nothing decoded or
    encoded; returns how many. Committed per chunk, so a stopped run keeps what it read."""
    in_roots, in_unreadable = under(roots), under(unreadable)
    paths = [path for path in catalog.without_metadata() if in_roots(path) and not in_unreadable(path)]
    if not paths:
        return 0
    log.info("Reading the metadata of %d files indexed before it was recorded", len(paths))
    done = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's complaints about malformed EXIF: it is absent
        for chunk in _batched(paths, _METADATA_CHUNK):
            if should_stop():
                break
            read = [(path, metadata) for path in chunk if (metadata := _header_metadata(path)) is not None]
            catalog.set_metadata(read)
            done += len(read)
    return done


def _header_metadata(path: bytes) -> PhotoMeta | None:
    """The file's metadata; None to try again next run (it could not be opened just now);
    empty if it opens but is no longer an image Pillow can read."""
    try:
        return read_header(path).metadata
    except OSError as err:
        if err.errno is not None:
            return None
        return PhotoMeta()  # Pillow's UnidentifiedImageError and the like carry no errno
    except ImageError:
        return None  # a HEIF photo while the heif extra is missing: what was read before stays
    except Exception:
        return PhotoMeta()


class _Run:
    """The encode part of a run: reuse by fingerprint, decode in workers, encode, commit."""

    def __init__(
        self,
        catalog: Catalog,
        model: str,
        get_encoder: Callable[[int], Encoder],
        todo: list[tuple[FoundFile, bool]],
        reusable_sizes: set[int],
        report: AddReport,
        progress: Progress | None,
        should_stop: Callable[[], bool],
        weights: str | None = None,
        stale: Collection[bytes] = frozenset(),
    ):
        self.catalog = catalog
        self.weights = weights
        self.stale = stale  # paths whose vectors by the model were dropped for new weights
        self.model = model
        self.get_encoder = get_encoder
        self.loaded: Encoder | None = None
        self.todo = todo
        self.report = report
        self.progress = progress
        self.should_stop = should_stop
        self.done = 0
        self.failed: list[FailedFile] = []
        self.reused: list[IndexedFile] = []
        # Sizes of the files with a vector by the model: a new file of another size cannot be a
        # copy of one, so it goes to the decoder without being probed for a vector to reuse.
        self.reusable_sizes = reusable_sizes
        self.reused_fingerprints: set[bytes] = set()  # contents found again under another path
        self.left: set[bytes] = set()  # the paths, gone from disk, whose rows' vectors were reused
        self.leaving: set[bytes] = set()  # those of them whose rows go with the next commit
        self.decode_s = self.encode_s = 0.0  # summed over the images encoded (report.encoded)

    @property
    def encoder(self) -> Encoder:
        if self.loaded is None:
            loading = time.perf_counter()
            self.loaded = self.get_encoder(len(self.todo))
            self.report.model_load_s = time.perf_counter() - loading
        return self.loaded

    def run(self, batch_size: int, workers: int | None) -> None:
        """Decode in ``workers`` processes; None decides after a first small batch, decoded in this
        process, shows what decoding and encoding an image cost (`decode.best_workers`)."""
        items = self._to_decode()
        if workers is None:
            first = min(batch_size, _FIRST_BATCH)
            if not self._index_batches(itertools.islice(items, first), first, 0) or self.loaded is None:
                return  # stopped, or nothing needed decoding: every file was reused or unreadable
            encoded = max(self.report.encoded, 1)
            decode_s, encode_s = self.decode_s / encoded, self.encode_s / encoded
            on_cpu = self.encoder.device.type == "cpu"
            workers = best_workers(
                decode_s, encode_s, on_cpu, len(self.todo) - self.done, batch_size, self.encoder.shares_cores
            )
            log.info(
                "An image takes %.0f ms to decode and %.0f ms to encode: decoding %s",
                decode_s * 1e3,
                encode_s * 1e3,
                f"in {workers} worker process(es)" if workers else "in this process",
            )
        self._index_batches(items, batch_size, workers)

    def _index_batches(self, items: Iterator[Job[tuple[FoundFile, bool]]], batch_size: int, workers: int) -> bool:
        """Decode, encode and commit ``items`` batch by batch; False if told to stop."""
        first = next(items, None)  # probing for vectors to reuse runs until a file needs decoding
        if first is None:
            self._encode_and_commit([])
            return not self.should_stop()
        items = itertools.chain([first], items)
        decoded: list[tuple[FoundFile, bool, Decoded]] = []
        pool = DecodePool(self.encoder.preprocess, workers, window=max(2 * batch_size, 4 * workers))
        with pool, _model_threads(self.encoder, workers):
            for (found, is_new), result in pool.imap(items):
                if self.should_stop():
                    break
                if result.error is not None:
                    self.failed.append(FailedFile(found.path, found.size, found.mtime_ns, None, result.error))
                else:
                    decoded.append((found, is_new, result))
                if len(decoded) >= batch_size:
                    self._encode_and_commit(decoded)
                    decoded = []
            else:
                self._encode_and_commit(decoded)
                return True
        self._encode_and_commit([])  # interrupted: keep what is finished, drop what is not encoded yet
        return False

    def _to_decode(self) -> Iterator[Job[tuple[FoundFile, bool]]]:
        """Files that must be decoded. A new file identical to an indexed one (its fingerprint
        says so) takes that vector here and never reaches a decoder. Each file is opened once:
        by the decoder, or by `probe_file` here, whose findings the decoder then takes."""
        with ThreadPoolExecutor(_PROBE_THREADS) as threads:
            for chunk in _batched(self.todo, _CHUNK):
                if self.should_stop():
                    return
                probes = self._probe(chunk, threads)
                known = self.catalog.copies_by_fingerprint(self.model, (p.fingerprint for p in probes.values()))
                unreadable = {f.path for f in self.failed}
                for found, is_new in chunk:
                    if found.path in unreadable:
                        continue
                    probe = probes.get(found.path)
                    if probe is None or not self._reuse(found, probe, known.get(probe.fingerprint)):
                        yield (found, is_new), found.path, probe
                if self.failed or self.reused:
                    self._encode_and_commit([])

    def _probe(self, chunk: Sequence[tuple[FoundFile, bool]], threads: ThreadPoolExecutor) -> dict[bytes, Probe]:
        """Probe the new files of ``chunk`` that may be copies of indexed ones (`reusable_sizes`);
        one that cannot be read is recorded as failed here."""
        probing = {
            found: threads.submit(probe_file, found.path)
            for found, is_new in chunk
            if is_new and found.size in self.reusable_sizes and identifies(found.path, found.size)
        }
        probes = {}
        for found, future in probing.items():
            try:
                probes[found.path] = future.result()
            except OSError as err:
                self.failed.append(FailedFile(found.path, found.size, found.mtime_ns, None, failure_reason(err)))
        return probes

    def _reuse(self, found: FoundFile, probe: Probe, copies: tuple[np.ndarray, list[ImageRow]] | None) -> bool:
        """Take the vector of indexed copies of these bytes, and the size and metadata that
        decoding them found. Copies gone from disk (`_gone`) were moved here: their rows go."""
        if copies is None:
            return False
        vector, rows = copies
        row = rows[0]
        if row.width is None or row.height is None:
            return False
        gone = {r.path for r in rows if _gone(r.path)}
        self.left |= gone
        self.leaving |= gone
        reused = IndexedFile(
            found.path, found.size, found.mtime_ns, probe.fingerprint, row.width, row.height, vector, row.metadata
        )
        self.reused.append(reused)
        self.reused_fingerprints.add(probe.fingerprint)
        return True

    def _encode_and_commit(self, decoded: list[tuple[FoundFile, bool, Decoded]]) -> None:
        """One transaction: a batch of freshly encoded files plus the reused and failed ones
        collected since the last commit."""
        indexed = list(self.reused)
        if decoded:
            started = time.perf_counter()
            # Only decoded files reach here: their pixels and fingerprint are there.
            vectors = self.encoder.encode_images(np.stack([cast(np.ndarray, r.pixels) for _, _, r in decoded]))
            self.encode_s += time.perf_counter() - started
            self.decode_s += sum(result.seconds for _, _, result in decoded)
            indexed += [
                IndexedFile(
                    found.path,
                    found.size,
                    found.mtime_ns,
                    cast(bytes, result.fingerprint),
                    result.width,
                    result.height,
                    vector,
                    result.metadata,
                )
                for (found, _, result), vector in zip(decoded, vectors)
            ]
        if not indexed and not self.failed:
            return
        self.catalog.commit_batch(self.model, indexed=indexed, failed=self.failed, weights=self.weights)
        if self.leaving:  # with the batch that took their vectors: a stopped run leaves none behind
            self.catalog.remove(sorted(self.leaving))
            self.leaving.clear()
        self.reusable_sizes.update(f.size for f in indexed)
        new = sum(1 for found, is_new, _ in decoded if is_new and found.path not in self.stale)
        stale = sum(1 for found, is_new, _ in decoded if is_new and found.path in self.stale)
        self.report.new += new
        self.report.stale += stale
        self.report.changed += len(decoded) - new - stale
        self.report.moved += len(self.reused)
        self.report.failed += len(self.failed)
        self.done += len(decoded) + len(self.reused) + len(self.failed)
        self.reused, self.failed = [], []
        if self.progress:
            self.progress(self.done, len(self.todo))


def _count_stale_after(
    catalog: Catalog,
    model: str,
    todo: list[tuple[FoundFile, bool]],
    stale: Collection[bytes],
    moved_content: set[bytes],
    report: AddReport,
) -> None:
    """After an `Executor`, which counts every file new to the model as new: move to
    ``report.stale`` those that were only re-encoded for new weights (their vectors now there)."""
    states = catalog.file_states(model)
    again = 0
    for found, is_new in todo:
        state = states.get(found.path)
        if is_new and found.path in stale and state is not None and state.encoded:
            again += state.fingerprint not in moved_content  # those it counted as moved stay so
    again = min(again, report.new)
    report.new -= again
    report.stale += again


@contextmanager
def _model_threads(encoder: Encoder, workers: int) -> Iterator[None]:
    """While decode workers keep ``workers`` cores busy, the model's thread pool gets the rest,
    unless it `shares_cores`. OpenMP threads that share a core with a busy process stall at every
    barrier: a small matmul on 2 threads ran 20x slower than on 1 when the other core was taken."""
    if workers == 0 or encoder.device.type != "cpu" or encoder.shares_cores:
        yield
        return
    with encoder.threads(max(1, usable_cores() - workers)):
        yield


def _as_indexed(
    plan: Plan, files: list[tuple[FoundFile, bytes]], should_stop: Callable[[], bool], progress: Progress | None
) -> list[FoundFile]:
    """Fingerprint ``files`` again: those whose content is still the fingerprint recorded come
    back; the others (or those that cannot be read any more: the decoder will say why) join
    ``plan.todo`` as changed."""
    same: list[FoundFile] = []
    done, total = 0, len(files)
    with ThreadPoolExecutor(_PROBE_THREADS) as threads:
        for chunk in _batched(files, _CHUNK):
            if should_stop():
                break
            for (found, _), unchanged in zip(chunk, threads.map(_has_fingerprint, chunk)):
                if unchanged:
                    same.append(found)
                else:
                    plan.todo.append((found, False))
            done += len(chunk)
            if progress:
                progress(done, total)
    return same


def _has_fingerprint(item: tuple[FoundFile, bytes]) -> bool:
    found, recorded = item
    try:
        return fingerprint(found.path) == recorded
    except OSError:  # the decoder will record why it cannot be read
        return False


def _batched(items: Sequence, size: int) -> Iterator[Sequence]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
