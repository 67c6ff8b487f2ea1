"""Indexing on a Ray cluster: the driver plans and writes, Ray Data decodes and encodes.

A run (`RayExecutor`, called by `indexer.run_add` in place of the local encode step):

- The driver walks (or reads a manifest) and diffs against the catalog exactly as a local run
  does, before Ray is touched: a re-run over an unchanged archive starts nothing on the cluster.
- Ray Data carries the files to encode: decode tasks on the cluster's CPUs run our own
  `decode.decode_file` (EXIF, draft decoding, fingerprint, the file-changed check), then an
  actor pool encodes, each actor holding the model once (a GPU each where the cluster has
  GPUs, else its share of a node's CPUs in the precision `clip.cpu` picks there).
- Results stream back to the driver, the only writer of the catalog: one transaction per
  batch, as locally, then `Index.add` updates the FAISS file.

Why nothing is lost or duplicated: a decode task or an actor that dies is re-run by Ray (Ray
Data restarts actors and retries their tasks), and whatever reaches the driver is upserted by
path, so a retried file is one row. A killed driver loses the batches it had not committed; the
next run's diff finds exactly the files still to do. A file that crashes its decoder's process
every time is found by the task's retries (`_Attempts`) and recorded as failed.

Workers read the files themselves, through the same path as the driver (a shared mount): only
paths travel, never pixels from the driver. A file whose content is one that disappeared under
another path (a move) is encoded again rather than reused: deciding before decoding would need
the catalog on the workers. The vector is the same either way, and the old row is removed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from clipsearch.errors import ClipsearchError
from clipsearch.records import FailedFile, IndexedFile, PhotoMeta

if TYPE_CHECKING:
    from clipsearch.catalog import Catalog
    from clipsearch.clip.preprocess import Preprocess
    from clipsearch.indexer import AddReport, Progress
    from clipsearch.walk import FoundFile

log = logging.getLogger(__name__)

CPU_BATCH = 32  # images per encoder call (and per commit) on CPU actors, as a local run
GPU_BATCH = 256  # on GPU actors: enough to keep an A100 busy with ViT-B/32
DECODE_BATCH = 16  # files per decode task: small enough to spread, large enough to amortise a task
DECODE_MEMORY = 256 * 2**20  # bytes a decode task reserves: a 12-megapixel JPEG at full size is 36 MB
CRASHED = "decoding this file crashed a Ray worker process"
MAX_BLOCKS = 50_000  # past this many files / DECODE_BATCH, tasks take more files each
INSTALL_HINT = "pip install 'clipsearch[ray]'"
CONNECT_TIMEOUT_S = 5.0  # to reach a cluster's head before Ray is asked to
STALL_S = 60.0  # no batch for this long after a node left: the run is stuck, not slow


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or the one-line error that names the extra."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ClipsearchError(f"Indexing on Ray needs Ray Data, which is not installed: {INSTALL_HINT}.") from None
    return ray


@dataclass(frozen=True)
class EncoderSpec:
    """What each encoder actor loads: ``Encoder(model, device, precision)`` on its own device."""

    model: str
    device: str = "auto"
    precision: str = "auto"


@dataclass(frozen=True)
class RayExecutor:
    """Runs a plan's decodes and encodes on a Ray cluster (see the module's docstring); pass it
    to `Index.add` as ``ray=`` (which sets ``device`` and ``precision`` to the index's).

    ``address``: ``None`` or ``"auto"`` joins the cluster in ``RAY_ADDRESS`` or the one ``ray
    start`` made on this machine, else starts one for the run; ``"local"`` always starts one;
    otherwise a cluster address (``head:6379``, or ``ray://head:10001`` where ``ray[client]`` is
    installed too; `check_address`). ``workers`` is 1 or more. A process that has called
    ``ray.init`` already keeps its connection. ``encoders``/``encoder_cpus`` override the actor
    pool (default: one actor per GPU; without GPUs, half the CPUs, in actors of half a node).
    ``batch_size`` is images per encoder call and per commit (default by device);
    ``workers`` caps the decode tasks in flight (default: Ray fills the free CPUs).
    """

    address: str | None = None
    batch_size: int | None = None
    workers: int | None = None
    encoders: int | None = None
    encoder_cpus: float | None = None
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        require_ray()  # the missing extra is found before the walk, not after it
        if self.address is not None:
            check_address(self.address)
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers is {self.workers}; a Ray run decodes on the cluster: give 1 or more, or None")

    def __call__(
        self,
        catalog: Catalog,
        model: str,
        todo: list[tuple[FoundFile, bool]],
        gone: set[bytes],
        report: AddReport,
        progress: Progress | None,
        should_stop: Callable[[], bool],
    ) -> set[bytes]:
        with _connected(self.address), _ray_data_quiet():
            loading = time.perf_counter()
            preprocess = _preprocess(model)
            report.model_load_s = time.perf_counter() - loading
            pool = _plan_pool(self)
            _check_shared_path(todo[0][0].path)
            run = _Commits(catalog, model, len(todo), gone, report, progress)
            spec = EncoderSpec(model, self.device, self.precision)
            batches = _encoded_batches(todo, preprocess, spec, pool, self.workers)
            try:
                for batch in _watched(batches, should_stop, _alive_nodes):
                    run.commit(batch)
            except Exception as err:
                raise _run_failed(err, run.done, len(todo)) from err
        return run.moved_content


@dataclass(frozen=True)
class _Pool:
    """The encoder actors' shape on this cluster."""

    actors: int
    cpus: float
    gpus: float
    batch: int


def _plan_pool(executor: RayExecutor) -> _Pool:
    """One actor per GPU when the cluster has GPUs (and the device is not pinned to the CPU);
    otherwise actors of half a node's CPUs, half the cluster's CPUs in all, so that decoding
    keeps the other half. One CPU is always left to decoding."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), int(resources.get("GPU", 0))
    if gpus and executor.device != "cpu":
        pool = _Pool(executor.encoders or gpus, executor.encoder_cpus or 1.0, 1.0, executor.batch_size or GPU_BATCH)
    else:
        node_cpus = min((n["Resources"].get("CPU", 0.0) for n in nodes if n["Resources"].get("CPU")), default=1.0)
        per_actor = executor.encoder_cpus or max(1.0, node_cpus // 2)
        actors = executor.encoders or max(1, int(cpus // (2 * per_actor)))
        per_actor = min(per_actor, max(cpus - 1, 0.0) / actors)
        pool = _Pool(actors, per_actor, 0.0, executor.batch_size or CPU_BATCH)
    log.info(
        "Ray cluster: %d node(s), %g CPU(s), %d GPU(s); encoding in %d actor(s) of %g CPU(s) and %g GPU(s), "
        "batches of %d; decoding on the other CPUs",
        len(nodes),
        cpus,
        gpus,
        pool.actors,
        pool.cpus,
        pool.gpus,
        pool.batch,
    )
    return pool


@contextmanager
def _connected(address: str | None) -> Iterator[None]:
    """Connected to the cluster for the run; disconnected after, unless the caller had connected."""
    ray = require_ray()
    if ray.is_initialized():
        yield
        return
    started = time.perf_counter()
    _check_reachable(os.environ.get("RAY_ADDRESS", "") if address in (None, "auto") else address)
    # Ray's own C++ logs (retries, actor notes) would land in the middle of the progress bar.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
    try:
        ray.init(address=None if address == "auto" else address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as err:
        where = f"at {address}" if address not in (None, "auto") else "(RAY_ADDRESS, or one started here)"
        raise ClipsearchError(f"Cannot connect to the Ray cluster {where}: {_last_line(err)}") from None
    log.info("Connected to the Ray cluster in %.1f s", time.perf_counter() - started)
    try:
        yield
    finally:
        ray.shutdown()


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a HOST:PORT or ray://HOST:PORT address; None for anything else."""
    scheme, _, place = address.rpartition("://")
    host, colon, port = place.rpartition(":")
    if scheme in ("", "ray") and colon and host.strip() and port.isdigit() and 0 < int(port) < 65536:
        return host, int(port)
    return None


def check_address(address: str) -> str:
    """``address`` if it can name a cluster (auto, local, HOST:PORT, ray://HOST:PORT); ValueError
    otherwise, before anything is walked or loaded."""
    if address in ("auto", "local") or _host_port(address) is not None:
        return address
    raise ValueError(
        f"{address!r} is not a Ray cluster's address: give auto, local, HOST:PORT (e.g. head:6379) or ray://HOST:PORT"
    )


def _check_reachable(address: str | None) -> None:
    """Fail in seconds where nothing answers at a cluster's HOST:PORT: Ray would retry for some
    14 minutes, deaf to Ctrl-C meanwhile. Other addresses ("local", "ray://...") go to Ray."""
    address = address or ""
    found = None if "://" in address else _host_port(address)
    if found is None:
        return
    host, port = found
    try:
        socket.create_connection((host.strip("[]"), port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise ClipsearchError(
            f"Cannot connect to the Ray cluster at {address}: nothing answers there ({reason}); "
            "is `ray start --head` running, and is the address right?"
        ) from None


@contextmanager
def _ray_data_quiet() -> Iterator[None]:
    """Ray Data announces each execution and its own progress on the terminal; the caller has
    its progress bar, so only Ray Data's errors get through while a run lasts."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _preprocess(model: str) -> Preprocess:
    """The model's preprocessing, for the decode tasks (the driver never encodes)."""
    from clipsearch import clip

    return clip.load(model, device="cpu", towers="image")[1]


def _check_shared_path(path: bytes) -> None:
    """Every node reads the first file before any work is sent: a cluster that does not share
    the driver's files fails here in one line, not with every file recorded as failed."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not os.access(path, os.R_OK):
        return  # unreadable here too: a bad file, which its decode task records
    probe = ray.remote(num_cpus=0, max_retries=0)(_read_reason)
    checks = {
        node["NodeManagerAddress"] + " " + node["NodeID"][:8]: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(path)
        for node in ray.nodes()
        if node["Alive"]
    }
    for node, check in checks.items():
        reason = ray.get(check)
        if reason is not None:
            raise ClipsearchError(
                f"Ray workers on node {node} cannot read {os.fsdecode(path)} ({reason}); every node must see the "
                "files at the same path as this machine (a shared mount)."
            )


def _read_reason(path: bytes) -> str | None:
    """Why ``path`` cannot be read here, or None."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        return err.strerror or str(err)
    return None


def _encoded_batches(
    todo: Sequence[tuple[FoundFile, bool]], preprocess: Preprocess, spec: EncoderSpec, pool: _Pool, workers: int | None
) -> Iterator[dict[str, np.ndarray]]:
    """The Ray Data pipeline: files → decode tasks → encoder actors → batches on the driver."""
    import pyarrow as pa
    import ray

    rows = max(DECODE_BATCH, -(-len(todo) // MAX_BLOCKS))
    blocks = [
        pa.table(
            {
                "path": pa.array([found.path for found, _ in chunk], pa.binary()),
                "size": pa.array([found.size for found, _ in chunk], pa.int64()),
                "mtime_ns": pa.array([found.mtime_ns for found, _ in chunk], pa.int64()),
                "new": pa.array([is_new for _, is_new in chunk], pa.bool_()),
            }
        )
        for chunk in (todo[start : start + rows] for start in range(0, len(todo), rows))
    ]
    attempts = ray.remote(num_cpus=0, max_restarts=-1)(_Attempts).remote()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the caller shows progress; Ray's bars would interleave
    context.print_on_execution_start = False
    dataset = (
        ray.data.from_arrow(blocks)
        .map_batches(
            cast("Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]", _decode_batch),
            fn_args=(preprocess, attempts),
            batch_size=None,  # a block at a time
            batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(size=workers) if workers else None,
            num_cpus=1,
            # Room to decode a large photo; a resource the actors do not ask for, which also
            # keeps Ray Data from fusing decoding into them (where it would run serially).
            memory=DECODE_MEMORY,
        )
        .map_batches(
            _EncodeActor,
            fn_constructor_args=(spec, preprocess.resolution),
            batch_size=pool.batch,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool.actors),
            num_cpus=pool.cpus,
            num_gpus=pool.gpus,
        )
    )
    return iter(dataset.iter_batches(batch_size=pool.batch, batch_format="numpy", prefetch_batches=2))


class _Attempts:
    """Which decode tasks ran before, and on which file each one was: how a file that crashes
    its decoder's process (a native bug on a malicious file) is found and recorded as failed.

    Ray Data runs a task whose process died again, for ever. A task that finds it ran before
    decodes one file at a time, saying which first; the retry after its process died again
    learns the culprit from that, records it as failed without opening it, and goes on. So a
    crashing file costs two retries of its task, and the files beside it are decoded as usual.
    """

    def __init__(self) -> None:
        self.running: set[bytes] = set()  # tasks (by their first path) started and not finished
        self.on: dict[bytes, bytes] = {}  # task -> the file it said it was decoding last

    def start(self, task: bytes) -> tuple[bool, bytes | None]:
        """Whether ``task`` ran before (its process died), and the file it died on if it said."""
        again = task in self.running
        self.running.add(task)
        return again, self.on.pop(task, None)

    def decoding(self, task: bytes, path: bytes) -> None:
        self.on[task] = path

    def finish(self, task: bytes) -> None:
        self.running.discard(task)
        self.on.pop(task, None)


def _decode_batch(batch: dict[str, np.ndarray], preprocess: Preprocess, attempts: Any) -> dict[str, np.ndarray]:
    """A decode task: each file through `decode_file`; pixels travel as float32 bytes (empty for
    a file that failed, whose reason travels instead)."""
    import ray

    from clipsearch.decode import Decoded, decode_file

    paths = [bytes(path) for path in batch["path"]]
    retried, died_on = ray.get(attempts.start.remote(paths[0]))
    results = []
    for path in paths:
        if path == died_on:
            log.warning("decoding %s crashed a Ray worker process", os.fsdecode(path))
            results.append(Decoded(None, error=CRASHED))
            continue
        if retried:
            ray.get(attempts.decoding.remote(paths[0], path))  # recorded before the decoder can crash
        results.append(decode_file(preprocess, path))
    attempts.finish.remote(paths[0])
    node = ray.get_runtime_context()
    here = f"{ray.util.get_node_ip_address()} {node.get_node_id()[:8]}"
    return {
        **batch,
        # The node, where a file failed because it cannot be read there: the driver tells a
        # node that does not see the files from a file that cannot be read at all.
        "unread_on": _objects([here if r.error and _read_reason(p) else "" for p, r in zip(paths, results)]),
        "fingerprint": _objects([r.fingerprint or b"" for r in results]),
        "width": np.array([r.width for r in results], np.int32),
        "height": np.array([r.height for r in results], np.int32),
        "error": _objects([r.error or "" for r in results]),
        # The photo's metadata as JSON (exact for its strings, numbers and None), "" if not read.
        "metadata": _objects([json.dumps(dataclasses.asdict(r.metadata)) if r.metadata else "" for r in results]),
        "pixels": _objects([r.pixels.tobytes() if r.pixels is not None else b"" for r in results]),
    }


class _EncodeActor:
    """One model, loaded once per actor; encodes the decoded rows of each batch."""

    def __init__(self, spec: EncoderSpec, resolution: int):
        import ray
        import torch

        from clipsearch.encoder import Encoder

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
        torch.set_num_threads(max(1, int(cpus)))
        self.encoder = Encoder(spec.model, spec.device, spec.precision, towers="image")
        self.shape = (3, resolution, resolution)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch.pop("pixels")
        decoded = np.array([len(p) > 0 for p in pixels], bool)
        vectors = np.zeros((len(pixels), self.encoder.dim), np.float32)
        if decoded.any():
            stacked = np.stack([np.frombuffer(p, np.float32).reshape(self.shape) for p in pixels[decoded]])
            vectors[decoded] = self.encoder.encode_images(stacked)
        return {**batch, "vector": vectors}


class _Commits:
    """The driver's side: each batch from the cluster is one catalog transaction."""

    def __init__(
        self,
        catalog: Catalog,
        model: str,
        total: int,
        gone: set[bytes],
        report: AddReport,
        progress: Progress | None,
    ):
        self.catalog, self.model, self.total, self.gone = catalog, model, total, gone
        self.report, self.progress = report, progress
        self.done = 0
        self.moved_content: set[bytes] = set()

    def commit(self, batch: dict[str, np.ndarray]) -> None:
        indexed, failed = [], []
        rows = zip(batch["path"], batch["size"], batch["mtime_ns"], batch["fingerprint"], batch["error"], batch["new"])
        unseen = None
        for i, (path, size, mtime_ns, fingerprint, error, is_new) in enumerate(rows):
            path, size, mtime_ns, fingerprint = bytes(path), int(size), int(mtime_ns), bytes(fingerprint)
            if error and batch["unread_on"][i] and _read_reason(path) is None:
                unseen = unseen or (batch["unread_on"][i], path, str(error))
                continue  # a node's view, not the file's fault: never recorded as failed
            if error:
                failed.append(FailedFile(path, size, mtime_ns, fingerprint or None, str(error)))
                continue
            width, height, metadata = int(batch["width"][i]), int(batch["height"][i]), batch["metadata"][i]
            indexed.append(
                IndexedFile(
                    path,
                    size,
                    mtime_ns,
                    fingerprint,
                    width,
                    height,
                    batch["vector"][i],
                    PhotoMeta(**json.loads(metadata)) if metadata else None,
                )
            )
            if fingerprint in self.gone:
                self.moved_content.add(fingerprint)
                self.report.moved += 1
            elif is_new:
                self.report.new += 1
            else:
                self.report.changed += 1
        self.catalog.commit_batch(self.model, indexed=indexed, failed=failed)
        self.report.failed += len(failed)
        self.done += len(indexed) + len(failed)
        if self.progress:
            self.progress(self.done, self.total)
        if unseen is not None:  # the files of this batch that were read are saved first
            node, path, reason = unseen
            raise _NodeCannotRead(
                f"Ray workers on node {node} cannot read {os.fsdecode(path)} ({reason}), which this machine reads; "
                "every node must see the files at the same paths as this machine (a shared mount)"
            )


class _Stalled(RuntimeError):
    pass


class _NodeCannotRead(RuntimeError):
    pass


_DONE = object()


def _watched(
    batches: Iterator[dict[str, np.ndarray]], should_stop: Callable[[], bool], alive_nodes: Callable[[], int]
) -> Iterator[dict[str, np.ndarray]]:
    """``batches`` as they come, read by a thread of their own, so that this one keeps watching:
    a stop (Ctrl-C) is obeyed within a second even while no batch comes, and a run that a node's
    loss left stuck (its encoders holding the CPUs that remain, no decode task can start) ends
    with an error after `STALL_S`, instead of waiting for ever."""
    out: queue.Queue[object] = queue.Queue(maxsize=2)
    stop = threading.Event()

    def hand(item: object) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            for batch in batches:
                if not hand(batch):
                    break
            else:
                hand(_DONE)
        except BaseException as err:  # handed over, to be raised where the run is
            hand(err)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # stops the pipeline when the run stopped early

    threading.Thread(target=pump, name="ray-batches", daemon=True).start()
    nodes, last = alive_nodes(), time.monotonic()
    try:
        while not should_stop():
            try:
                item = out.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() - last > STALL_S and alive_nodes() < nodes:
                    raise _Stalled(
                        f"a node left the cluster and no batch came for {STALL_S:.0f} s since; "
                        "the nodes left may lack the CPUs to decode beside the encoders"
                    ) from None
                continue
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            last = time.monotonic()
            yield cast("dict[str, np.ndarray]", item)
    finally:
        stop.set()


def _alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node["Alive"])


def _run_failed(err: Exception, done: int, total: int) -> Exception:
    """A failure of the cluster (not of a file) stops the run with what was committed kept."""
    if isinstance(err, ClipsearchError):
        return err
    return ClipsearchError(
        f"The Ray run stopped after {done} of {total} files, which are saved (run the same command again to go "
        f"on): {_last_line(err)}"
    )


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _objects(values: list) -> np.ndarray:
    """A 1-D object array (bytes or str per row), which Ray Data stores as an Arrow column."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array
