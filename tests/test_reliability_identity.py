"""Which catalog a vector file belongs to (issue 18 items 1 and 2): a vector file is trusted only
when it is this catalog's, of this model, and holds the rows the catalog holds; an index whose
first run encoded nothing is usable by every command."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import faiss_file, make_library
from reliability_helpers import run_cli

from clipsearch.index import Index

SAMPLES = Path(__file__).parent.parent / "sample_images"


@pytest.mark.slow
def test_a_first_run_over_an_empty_folder_leaves_an_index_every_command_can_use(tmp_path):
    """The issue's reproduction, as separate processes: the model named by the first run is the
    index's from then on, although that run encoded nothing."""
    (tmp_path / "empty").mkdir()
    home = tmp_path / "home"
    steps = [
        ("index", tmp_path / "empty", "--model", "demo"),
        ("status",),
        ("index", SAMPLES),
        ("query", "a red circle", "-k", "3"),
        ("status",),
    ]
    outputs = []
    for step in steps:
        done = run_cli("--home", home, *step, timeout=300)
        outputs.append(done.stdout.decode())
        assert done.returncode == 0, (step, done.stderr.decode())
    assert len(outputs[3].splitlines()) == 3
    assert "demo (128-d): 41 of 41 images, default" in outputs[4]
    assert "consistent with the catalog" in outputs[4]


def test_search_before_the_first_add_leaves_nothing_that_breaks_the_index(tmp_path, tiny_model):
    """Index.open(new, model=...) -> search() -> add(): the search finds nothing and saves no
    vector file of unknown dimension."""
    make_library(tmp_path / "lib", 3)
    with Index.open(tmp_path / "home", model=tiny_model, precision="fp32") as index:
        assert index.search("anything") == []
        assert index.status().vectors_in_index == 0
        assert index.add([tmp_path / "lib"], workers=0).new == 3
        assert len(index.search("anything", k=5)) == 3
    with Index.open(tmp_path / "home") as index:  # the first model used is the default
        assert index.model == os.path.abspath(tiny_model) or index.model == tiny_model
        assert index.status().consistent


def build(home: Path, libraries: list[Path], model: str) -> None:
    with Index.open(home, model=model, precision="fp32") as index:
        for lib in libraries:
            index.add([lib], workers=0, batch_size=4)


def assert_finds_itself(home: Path, model: str, images: list[Path]) -> None:
    """Query by example: each image comes back first, as itself; every hit exists and is indexed."""
    with Index.open(home, model=model, precision="fp32") as index:
        assert index.status().consistent
        for image in images:
            hits = index.search(image, k=3)
            assert hits[0].path == image and hits[0].score > 0.999, (image, hits[0])
            assert all(hit.path.exists() for hit in hits)


def test_a_vector_file_copied_from_another_home_built_the_same_way_is_not_trusted(tmp_path, tiny_model):
    ours = make_library(tmp_path / "ours", 8)
    make_library(tmp_path / "theirs", 8, start_seed=100)
    build(tmp_path / "a", [tmp_path / "ours"], tiny_model)
    build(tmp_path / "b", [tmp_path / "theirs"], tiny_model)
    shutil.copy(faiss_file(tmp_path / "b"), faiss_file(tmp_path / "a"))  # same generation and count
    assert_finds_itself(tmp_path / "a", tiny_model, ours)


@pytest.mark.parametrize("later", [8, 16], ids=["to-the-same-generation", "past-its-generation"])
def test_an_older_catalog_restored_under_a_newer_vector_file_never_returns_wrong_files(tmp_path, tiny_model, later):
    """A backup of the catalog is restored after the vector file moved on; then another folder
    is indexed, reaching the vector file's generation and count again (8 files), or passing it
    (16): the vector file's rows are another history's and must not be taken as the catalog's."""
    home = tmp_path / "home"
    first = make_library(tmp_path / "first", 8)
    make_library(tmp_path / "lost", 8, start_seed=100)
    third = make_library(tmp_path / "third", later, start_seed=200)
    build(home, [tmp_path / "first"], tiny_model)
    shutil.copy(home / "catalog.db", tmp_path / "backup.db")
    build(home, [tmp_path / "lost"], tiny_model)
    for leftover in home.glob("catalog.db-*"):
        leftover.unlink()
    shutil.copy(tmp_path / "backup.db", home / "catalog.db")
    build(home, [tmp_path / "third"], tiny_model)
    assert_finds_itself(home, tiny_model, first + third)
    with Index.open(home, model=tiny_model) as index:
        hits = index.search("anything", k=100)
    assert sorted(hit.path for hit in hits) == sorted(first + third)
