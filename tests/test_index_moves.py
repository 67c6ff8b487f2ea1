"""A moved or copied file keeps the vectors of every model, not only of the model that indexed
the move: its content is the same, so no model encodes it again and every model's searches
find it under its new path (their vector files follow the catalog on their next load)."""

import shutil
from pathlib import Path

import pytest
from helpers import make_image, make_library

from clipsearch.index import Index


def open_index(home: Path, model: str) -> Index:
    return Index.open(home, model=model, device="cpu", precision="fp32")


def found(home: Path, model: str) -> set[str]:
    """Every path a search with ``model`` returns, from a freshly opened index (its vector file
    loaded from disk, as a new process would)."""
    with open_index(home, model) as index:
        return {hit.path.name for hit in index.search("a cat", k=100)}


def held(home: Path, model: str) -> int:
    with open_index(home, model) as index:
        stored = index.catalog.model(model)
        return 0 if stored is None else stored.vectors


@pytest.fixture
def library(tmp_path, tiny_model, other_tiny_model) -> Path:
    """Six images indexed by both models."""
    make_library(tmp_path / "lib", 6)
    for model in (tiny_model, other_tiny_model):
        with open_index(tmp_path / "home", model) as index:
            index.add([tmp_path / "lib"], workers=0)
    return tmp_path / "lib"


def test_a_file_renamed_and_indexed_by_one_model_keeps_the_other_model_s_vector(
    tmp_path, library, tiny_model, other_tiny_model, encoded
):
    home = tmp_path / "home"
    old = library / "part0" / "img0000.png"
    old.rename(library / "part0" / "renamed.png")
    encoded.clear()
    with open_index(home, other_tiny_model) as index:
        report = index.add([library], workers=0)
    assert (report.moved, report.new, report.removed, sum(encoded)) == (1, 0, 0, 0)

    names = {p.name for p in library.rglob("*.png")}
    assert "renamed.png" in names and "img0000.png" not in names
    for model in (tiny_model, other_tiny_model):
        assert held(home, model) == 6
        assert found(home, model) == names
    with open_index(home, tiny_model) as index:
        again = index.add([library], workers=0)
    assert (again.new, again.moved, again.unchanged, sum(encoded)) == (0, 0, 6, 0)


def test_a_copy_indexed_by_one_model_takes_the_other_model_s_vector_too(
    tmp_path, library, tiny_model, other_tiny_model, encoded
):
    home = tmp_path / "home"
    shutil.copy2(library / "part1" / "img0001.png", library / "part1" / "copy.png")
    encoded.clear()
    with open_index(home, tiny_model) as index:
        report = index.add([library], workers=0)
    assert (report.copied, report.moved, report.new, sum(encoded)) == (1, 0, 0, 0)
    names = {p.name for p in library.rglob("*.png")}
    assert len(names) == 7
    for model in (tiny_model, other_tiny_model):
        assert held(home, model) == 7
        assert found(home, model) == names
    with open_index(home, other_tiny_model) as index:
        again = index.add([library], workers=0)
    assert (again.new, again.copied, again.unchanged, sum(encoded)) == (0, 0, 7, 0)


def test_a_file_moved_while_only_one_model_had_its_vector_keeps_it(
    tmp_path, library, tiny_model, other_tiny_model, encoded
):
    """The old row had a vector by the other model only: the model indexing the move encodes the
    file (it has no vector to reuse), and the other model's vector follows it to its new path."""
    home = tmp_path / "home"
    make_image(library / "part0" / "late.png", 99)
    with open_index(home, other_tiny_model) as index:
        assert index.add([library], workers=0).new == 1
    (library / "part0" / "late.png").rename(library / "part1" / "late_moved.png")
    encoded.clear()
    with open_index(home, tiny_model) as index:
        report = index.add([library], workers=0)
    assert (report.new, report.unchanged, sum(encoded)) == (1, 6, 1)  # new to this model

    names = {p.name for p in library.rglob("*.png")}
    assert "late_moved.png" in names and len(names) == 7
    for model in (tiny_model, other_tiny_model):
        assert held(home, model) == 7
        assert found(home, model) == names
    encoded.clear()
    with open_index(home, other_tiny_model) as index:
        again = index.add([library], workers=0)
    assert (again.new, again.moved, again.unchanged, sum(encoded)) == (0, 0, 7, 0)
