"""Indexing on a real Ray cluster (`ray.init(num_cpus=2)`, one per module: starting one costs
10-20 s here): the catalog and vectors of a local run, re-runs that start nothing, and the
faults a cluster has (an encoder actor killed, the driver killed)."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from helpers import CrashingPreprocess, make_image
from reliability_helpers import (
    catalog_vectors,
    expected_vectors,
    indexed_count,
    kill_group,
    run_cli,
    start_cli,
    wait_until,
)

from clipsearch.index import Index
from clipsearch.manifest import Manifest
from clipsearch.walk import FoundFile

ray = pytest.importorskip("ray", reason="the Ray tests need the [ray] extra")

from clipsearch.errors import ClipsearchError  # noqa: E402
from clipsearch.ray_index import RayExecutor  # noqa: E402

IMAGES = 160
BAD = 2  # and two files that fail to decode


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> str:
    """A local Ray cluster of 2 CPUs for the module; its address, for other processes."""
    env = pytest.MonkeyPatch()
    env.setenv("RAY_AUTH_MODE", "disabled")  # no token file written in ~/.ray
    env.setenv("PYTHONPATH", str(Path(__file__).parent), prepend=os.pathsep)  # workers unpickle helpers' classes
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        env.undo()


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """640x480 PNGs (6 ms each to decode, so a run lasts long enough to be interrupted) and
    two files that are not images."""
    root = tmp_path_factory.mktemp("library")
    for i in range(IMAGES):
        make_image(root / f"part{i % 2}" / f"img{i:04d}.png", i, size=(640, 480))
    (root / "part0" / "bad.jpg").write_text("not an image")
    (root / "part1" / "empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def reference(library, tiny_model, tmp_path_factory) -> tuple[dict, dict]:
    """The catalog rows and vectors of a local run over the library."""
    home = tmp_path_factory.mktemp("local")
    with open_index(home, tiny_model) as index:
        report = index.add([library], workers=0)
    assert (report.new, report.failed) == (IMAGES, BAD)
    return catalog_rows(home), catalog_vectors(home)


def open_index(home: Path, model: str) -> Index:
    return Index.open(home, model, device="cpu", precision="fp32")


def catalog_rows(home: Path) -> dict[bytes, tuple]:
    """Every row as the catalog holds it (metadata included), but for its id and when it was written."""
    with sqlite3.connect(f"file:{home / 'catalog.db'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT * FROM images")
        names = [column[0] for column in rows.description]
        kept = [i for i, name in enumerate(names) if name not in ("id", "indexed_at", "vector_generation")]
        return {row[names.index("path")]: tuple(row[i] for i in kept) for row in rows}


def assert_same_as(reference: tuple[dict, dict], home: Path) -> None:
    """The same rows, and the same float16 vectors but where the fp32 results of another batch
    composition (within 1e-5: the fp32 test) fell on the other side of a float16 rounding."""
    rows, vectors = reference
    assert catalog_rows(home) == rows
    stored = catalog_vectors(home)
    assert stored.keys() == vectors.keys()
    for path, vector in vectors.items():
        one_step = np.spacing(np.abs(vector).astype(np.float16)).astype(np.float32)
        assert np.all(np.abs(stored[path] - vector) <= one_step), path


def test_a_ray_run_gives_the_catalog_of_a_local_run_and_a_rerun_starts_nothing(
    cluster, library, reference, tiny_model, tmp_path
):
    home = tmp_path / "home"
    with open_index(home, tiny_model) as index:
        report = index.add([library], ray="auto", batch_size=8)
        assert (report.new, report.failed, report.unchanged) == (IMAGES, BAD, 0)
        assert report.metadata == 0  # the photos' metadata came with their vectors: no header read after
        assert index.status().consistent
    assert_same_as(reference, home)

    # Nothing changed: the run must not even connect (nothing listens at that address).
    rerun = run_cli("--home", home, "index", library, "--ray", "127.0.0.1:9")
    assert rerun.returncode == 0, rerun.stderr
    assert b"new 0, changed 0, moved 0, copied 0, removed 0, failed 0, unchanged 162" in rerun.stdout


def test_the_cluster_computes_the_local_encoders_fp32_vectors(cluster, library, tiny_model, tiny_encoder):
    """Before the catalog's float16: what the actors send back is what the local encoder gives."""
    from clipsearch.ray_index import CPU_BATCH, EncoderSpec, _encoded_batches, _Pool

    paths = sorted(p for p in library.rglob("img*.png"))[:40]
    todo = [(FoundFile(os.fsencode(p), p.stat().st_size, p.stat().st_mtime_ns), True) for p in paths]
    spec = EncoderSpec(tiny_model, "cpu", "fp32")
    batches = _encoded_batches(todo, tiny_encoder.preprocess, spec, _Pool(1, 1.0, 0.0, 8), None)
    got = {bytes(path): vector for batch in batches for path, vector in zip(batch["path"], batch["vector"])}
    expected = expected_vectors(tiny_encoder, paths)  # one batch of 40, in this process
    assert got.keys() == expected.keys() and CPU_BATCH != 8
    assert max(np.abs(got[path] - vector).max() for path, vector in expected.items()) <= 1e-5


@contextmanager
def only_this_process_reads(image: Path) -> Iterator[str]:
    """/proc/self/fd/987, a path to ``image`` for this process only: the driver reads it, the
    workers cannot."""
    fd = os.open(image, os.O_RDONLY)
    os.dup2(fd, 987)
    os.close(fd)
    try:
        yield "/proc/self/fd/987"
    finally:
        os.close(987)


def test_a_worker_that_cannot_read_the_files_stops_the_run_before_any_work(cluster, library, tiny_model, tmp_path):
    listed = tmp_path / "files.txt"
    with only_this_process_reads(next(library.rglob("img*.png"))) as path:
        listed.write_text(f"{path}\n")
        with open_index(tmp_path / "home", tiny_model) as index, pytest.raises(ClipsearchError) as raised:
            index.add(Manifest(listed), ray="auto")
    message = str(raised.value)
    assert message.startswith("Ray workers on node ") and "\n" not in message
    assert "cannot read /proc/self/fd/987 (No such file or directory); every node must see the files" in message
    assert indexed_count(tmp_path / "home") == 0


def test_a_file_that_only_the_workers_cannot_read_stops_the_run_and_is_not_recorded_failed(
    cluster, library, tiny_model, tmp_path
):
    """The first file is read everywhere, so the run starts; a later one that the workers cannot
    read, though the driver can, is a node that does not see the files, not a bad file: it had
    been recorded as failed, and a plain re-run never tried it again."""
    image, listed = next(library.rglob("img*.png")), tmp_path / "files.txt"
    with only_this_process_reads(image) as path:
        listed.write_text(f"{image}\n{path}\n")
        with open_index(tmp_path / "home", tiny_model) as index, pytest.raises(ClipsearchError) as raised:
            index.add(Manifest(listed), ray=RayExecutor(batch_size=8))
    message = str(raised.value)
    assert message.startswith("The Ray run stopped after 1 of 2 files, which are saved") and "\n" not in message
    assert "Ray workers on node " in message and "cannot read /proc/self/fd/987 (" in message
    assert "which this machine reads; every node must see the files at the same paths" in message
    assert catalog_rows(tmp_path / "home").keys() == {os.fsencode(image)}  # the one read; no failed row


def encoder_actors() -> list[dict]:
    """The encoder actors Ray knows of in this job (from the GCS: the state API needs the dashboard)."""
    job = ray.get_runtime_context().get_job_id()
    return [
        actor
        for actor in ray._private.state.actors().values()
        if "_EncodeActor" in actor["ActorClassName"] and actor["JobID"] == bytes.fromhex(job).hex()
    ]


@pytest.mark.slow
def test_a_killed_encoder_actor_is_replaced_and_nothing_is_lost_or_doubled(
    cluster, library, reference, tiny_model, tmp_path
):
    killed: list[dict] = []

    def kill_the_encoder_once(done: int, total: int) -> None:
        if done and not killed:
            (actor,) = [a for a in encoder_actors() if a["State"] == "ALIVE"]
            os.kill(actor["Pid"], signal.SIGKILL)
            killed.append({**actor, "done": done})

    home = tmp_path / "home"
    with open_index(home, tiny_model) as index:
        report = index.add([library], ray=RayExecutor(batch_size=4, workers=1), progress=kill_the_encoder_once)
    assert killed and killed[0]["done"] < IMAGES / 2  # killed with most of the work to do
    (actor,) = [a for a in encoder_actors() if a["ActorID"] == killed[0]["ActorID"]]
    assert actor["NumRestarts"] >= 1 and actor["Pid"] != killed[0]["Pid"]
    assert (report.new, report.failed) == (IMAGES, BAD)
    assert_same_as(reference, home)


def test_a_stopped_run_keeps_what_it_committed_and_the_next_one_does_the_rest(
    cluster, library, reference, tiny_model, tmp_path
):
    """Ctrl-C in the CLI: `should_stop` turns true, the run commits what it has and returns."""
    home, committed = tmp_path / "home", []
    with open_index(home, tiny_model) as index:
        stopped = index.add(
            [library],
            ray=RayExecutor(batch_size=8, workers=1),
            progress=lambda d, t: committed.append(d),
            should_stop=lambda: bool(committed[1:]),
        )
        assert stopped.interrupted and stopped.new + stopped.failed == committed[-1] < IMAGES
        rest = index.add([library], ray="auto")
    assert (rest.new + stopped.new, rest.failed + stopped.failed) == (IMAGES, BAD)
    assert_same_as(reference, home)


@pytest.mark.slow
def test_a_killed_driver_loses_only_what_it_had_not_committed(cluster, library, reference, tiny_model, tmp_path):
    home = tmp_path / "home"
    args = ["--home", home, "--device", "cpu", "index", library, "--model", tiny_model, "--precision", "fp32"]
    driver = start_cli(*args, "--ray", cluster, "--batch-size", "2", "--workers", "1")
    try:
        assert wait_until(lambda: indexed_count(home) > 0, timeout=120, poll=0.005, process=driver)
        kill_group(driver)
    finally:
        driver.wait()
    committed = indexed_count(home)
    assert 0 < committed < IMAGES

    with open_index(home, tiny_model) as index:
        report = index.add([library], ray="auto")
    assert report.new + report.changed == IMAGES - committed
    assert_same_as(reference, home)


@pytest.mark.slow
def test_a_file_that_crashes_its_decoders_process_is_recorded_as_failed_and_the_rest_go_through(
    cluster, tmp_path, tiny_encoder
):
    """A native crash on one malicious file kills the decode task's process (helpers'
    CrashingPreprocess dies on 13x13 images); Ray runs the task again, which finds the culprit."""
    from clipsearch.ray_index import CRASHED, EncoderSpec, _encoded_batches, _Pool

    paths = [make_image(tmp_path / f"img{i}.png", i, size=(13, 13) if i == 2 else (48, 40)) for i in range(5)]
    todo = [(FoundFile(os.fsencode(p), p.stat().st_size, p.stat().st_mtime_ns), True) for p in paths]
    spec = EncoderSpec(tiny_encoder.model_id, "cpu", "fp32")
    preprocess = CrashingPreprocess(tiny_encoder.preprocess)
    rows = [
        (bytes(path), error, vector)
        for batch in _encoded_batches(todo, preprocess, spec, _Pool(1, 1.0, 0.0, 8), None)
        for path, error, vector in zip(batch["path"], batch["error"], batch["vector"])
    ]
    assert sorted(path for path, _, _ in rows) == sorted(os.fsencode(p) for p in paths)  # each once
    assert {path: error for path, error, _ in rows if error} == {os.fsencode(paths[2]): CRASHED}
    expected = expected_vectors(tiny_encoder, [p for i, p in enumerate(paths) if i != 2])
    assert max(np.abs(vector - expected[path]).max() for path, error, vector in rows if not error) <= 1e-5
