"""Queries through the library API (`Index`): example images, text, weighted combinations,
filters, and the FAISS file as derived data."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import bump_mtime, faiss_file, make_image, make_library

from clipsearch import Hit, Index
from clipsearch.errors import ClipsearchError, IndexStateError
from clipsearch.search import parse_term


@pytest.fixture
def library(tmp_path):
    return make_library(tmp_path / "lib", 12)


@pytest.fixture
def index(tmp_path, tiny_model, library):
    with Index.open(tmp_path / "home", model=tiny_model, device="cpu", precision="fp32") as index:
        index.add([tmp_path / "lib"], workers=0)
        yield index


def brute_force(index, vector):
    ids, vectors = index.catalog.all_vectors(index.catalog.model(index.model))
    scores = vectors @ vector
    order = np.argsort(-scores)
    rows = index.catalog.rows(ids)
    return [(rows[ids[i]].path, float(scores[i])) for i in order]


def test_an_image_finds_itself_first(index, library):
    hits = index.search(library[3], k=3)
    assert hits[0].path == library[3]
    assert hits[0].score == pytest.approx(1.0, abs=2e-3)  # vectors are stored as float16
    assert (hits[0].width, hits[0].height, hits[0].size) == (48, 40, library[3].stat().st_size)
    assert hits[0].mtime == pytest.approx(library[3].stat().st_mtime)
    assert isinstance(hits[0], Hit) and hits[0].score >= hits[1].score >= hits[2].score


def test_text_results_match_brute_force_over_the_catalog(index):
    hits = index.search("a red circle", k=5)
    vector = index.encoder("text").encode_texts(["a red circle"])[0]
    expected = brute_force(index, vector)[:5]
    assert [os.fsencode(h.path) for h in hits] == [p for p, _ in expected]
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-5)


def test_a_text_query_loads_only_the_text_tower(index, tmp_path):
    with Index.open(tmp_path / "home", readonly=True) as reader:
        reader.search("anything", k=1)
        assert reader._encoder.towers == "text"
        assert not any(name.startswith("visual.") for name in reader._encoder.tower.weights)


def test_weighted_terms_fold_into_one_normalised_vector(index, library):
    terms = [(1.0, "a dog"), (0.5, library[0]), (-0.3, "people")]
    hits = index.search(terms, k=12)
    encoder = index.encoder("both")
    texts = encoder.encode_texts(["a dog", "people"])
    image = encoder.encode_images(encoder.preprocess(str(library[0])).numpy()[None])[0]
    combined = texts[0] + 0.5 * image - 0.3 * texts[1]
    combined /= np.linalg.norm(combined)
    expected = brute_force(index, combined)
    assert [os.fsencode(h.path) for h in hits] == [p for p, _ in expected]
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-4)


def test_under_keeps_only_results_inside_the_folder(index, tmp_path):
    hits = index.search("x", k=10, under=tmp_path / "lib" / "part1")
    assert len(hits) == 6 and all(h.path.parent == tmp_path / "lib" / "part1" for h in hits)
    assert index.search("x", k=10, under=tmp_path / "lib" / "part") == []  # a prefix, not a folder


def test_min_score_cuts_the_tail(index, library):
    everything = index.search(library[0], k=12)
    floor = everything[4].score
    hits = index.search(library[0], k=12, min_score=floor)
    assert [h.path for h in hits] == [h.path for h in everything if h.score >= floor]


def test_files_deleted_since_indexing_are_not_returned(index, library):
    library[3].unlink()
    hits = index.search("x", k=12)
    assert library[3] not in [h.path for h in hits] and len(hits) == 11


def test_an_empty_index_returns_nothing(tmp_path, tiny_model):
    with Index.open(tmp_path / "empty", model=tiny_model) as index:
        assert index.search("anything") == []
        assert index.status().counts == {"indexed": 0, "failed": 0, "missing": 0}


def test_a_deleted_or_garbage_faiss_file_is_rebuilt(index, tmp_path, library, caplog):
    expected = [h.path for h in index.search(library[1], k=5)]
    home = tmp_path / "home"
    for damage in (lambda f: f.unlink(), lambda f: f.write_bytes(b"garbage" * 100)):
        damage(faiss_file(home))
        with Index.open(home, precision="fp32") as fresh:  # as `index`: the same query vector
            assert [h.path for h in fresh.search(library[1], k=5)] == expected
        assert "Rebuilding the vector index" in caplog.text
        caplog.clear()


def test_a_reader_saves_what_it_rebuilds_and_leaves_updates_to_the_writer(index, tmp_path, library, caplog):
    """A read-only `Index` (what `clipsearch serve` opens) that finds the FAISS file missing
    rebuilds it and saves it, where the home can be written, so that the next start does not
    rebuild it again; the update of a file an index run left behind it leaves to that run."""
    home = tmp_path / "home"
    faiss_file(home).unlink()
    for start in range(2):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="clipsearch.vectors"), Index.open(home, readonly=True) as reader:
            assert len(reader.search("x", k=20)) == 12
        assert ("Rebuilding the vector index" in caplog.text) is (start == 0)
        assert faiss_file(home).exists()
    saved = faiss_file(home).read_bytes()
    index.remove([library[0]])
    faiss_file(home).write_bytes(saved)  # as if the writer had not saved yet
    with caplog.at_level(logging.INFO, logger="clipsearch.vectors"), Index.open(home, readonly=True) as reader:
        assert len(reader.search("x", k=20)) == 11
    assert "Updated the vector index: 0 vectors in, 1 out" in caplog.text
    assert faiss_file(home).read_bytes() == saved


def test_an_older_faiss_file_put_back_is_brought_up_to_date_not_trusted(index, tmp_path, caplog):
    home = tmp_path / "home"
    old = (faiss_file(home)).read_bytes()
    index.remove([tmp_path / "lib" / "part0"])
    (faiss_file(home)).write_bytes(old)  # e.g. restored from a backup: ids of removed rows
    with caplog.at_level(logging.INFO, logger="clipsearch.vectors"), Index.open(home, readonly=True) as fresh:
        hits = fresh.search("x", k=20)
    assert len(hits) == 6 and all(h.path.parent.name == "part1" for h in hits)
    assert "Updated the vector index: 0 vectors in, 6 out" in caplog.text


def test_adding_and_changing_files_updates_the_faiss_file_instead_of_rebuilding_it(index, library, tmp_path, caplog):
    extra = make_image(tmp_path / "lib" / "extra.png", seed=600)
    make_image(library[4], seed=601)  # same file, new picture
    bump_mtime(library[4])
    with caplog.at_level(logging.INFO, logger="clipsearch.vectors"):
        report = index.add([tmp_path / "lib"], workers=0)
    assert (report.new, report.changed) == (1, 1)
    assert "Updated the vector index: 2 vectors in, 1 out" in caplog.text and "Built" not in caplog.text
    for image in (extra, library[4]):
        best = index.search(image, k=1)[0]
        assert best.path == image and best.score > 0.999
    assert index.status().consistent


def test_a_stale_faiss_file_is_noticed_by_an_open_index(index, tmp_path):
    # Another process indexes more files: this long-lived Index must not serve stale ids.
    assert len(index.search("x", k=50)) == 12
    extra = make_image(tmp_path / "lib" / "extra.png", seed=500)
    with Index.open(tmp_path / "home") as writer:
        writer.add([tmp_path / "lib"], workers=0)
    assert extra in [h.path for h in index.search(extra, k=50)] and len(index.search("x", k=50)) == 13


def assert_same_scores(hits, expected: dict) -> None:
    """The same images with the same scores (the NumPy and torch text towers agree to ~1e-7)."""
    got = {h.path: h.score for h in hits}
    assert sorted(got) == sorted(expected)
    np.testing.assert_allclose([got[p] for p in expected], list(expected.values()), atol=1e-5)


def test_a_second_model_adds_its_vectors_beside_the_first(index, tmp_path, tiny_model, other_tiny_model, encoded):
    home = tmp_path / "home"
    first = {h.path: h.score for h in index.search("a red circle", k=12)}
    with Index.open(home, model=other_tiny_model, precision="fp32") as other:
        with pytest.raises(IndexStateError, match=r"no vectors by .*other.*index with it first"):
            other.search("a red circle")
        report = other.add([tmp_path / "lib"], workers=0)
        assert (report.new, report.changed, report.unchanged) == (12, 0, 0) and sum(encoded) == 12
        assert other.status().consistent and len(other.search("x", k=50)) == 12
        # The two models' vectors differ, each searched with its own model.
        assert {h.path: h.score for h in other.search("a red circle", k=12)} != first
        assert other.add([tmp_path / "lib"], workers=0).unchanged == 12 and sum(encoded) == 12
    with Index.open(home, readonly=True) as reader:  # the first model stays the default
        assert reader.model == tiny_model
        assert [(m.name, m.vectors, m.default) for m in reader.status().models] == [
            (tiny_model, 12, True),
            (other_tiny_model, 12, False),
        ]
        assert_same_scores(reader.search("a red circle", k=12), first)
    with Index.open(home, model=other_tiny_model) as other:
        other.set_default_model()
    with Index.open(home) as default:
        assert default.model == other_tiny_model
        assert default.drop_model() and not default.drop_model()
    with Index.open(home) as after:
        assert after.model == tiny_model and after.catalog.default_model == tiny_model
        assert [m.name for m in after.status().models] == [tiny_model]
        assert_same_scores(after.search("a red circle", k=12), first)
    assert sorted(p.name for p in home.glob("vectors-*.faiss")) == ["vectors-1.faiss"]


def test_a_changed_file_keeps_only_the_vector_of_the_model_that_re_encoded_it(
    index, tmp_path, tiny_model, other_tiny_model, library
):
    home = tmp_path / "home"
    with Index.open(home, model=other_tiny_model) as other:
        other.add([tmp_path / "lib"], workers=0)
    make_image(library[0], seed=900)  # new content, same path
    bump_mtime(library[0])
    index.add([tmp_path / "lib"], workers=0)
    with Index.open(home, model=other_tiny_model) as other:
        assert other.status().models[1].vectors == 11 and other.status().consistent
        assert library[0] not in [h.path for h in other.search("x", k=50)]
        assert other.add([tmp_path / "lib"], workers=0).new == 1  # re-encoded by this model too
        assert library[0] in [h.path for h in other.search("x", k=50)]


def test_reading_an_index_without_vectors_creates_nothing(tmp_path, tiny_model):
    home = tmp_path / "home"
    with pytest.raises(IndexStateError, match="There is no index"):
        Index.open(home, readonly=True)
    assert not home.exists()
    with Index.open(home, model=tiny_model) as index:  # created, nothing encoded yet
        assert index.search("x") == [] and index.status().models == []
    assert [p.name for p in home.iterdir() if not p.name.startswith("catalog.db")] == []


def test_remove_forgets_files_under_a_path(index, tmp_path):
    assert index.remove([tmp_path / "lib" / "part0"]) == 6
    assert all(h.path.parent.name == "part1" for h in index.search("x", k=20))
    assert index.status().counts["indexed"] == 6 and index.status().consistent


def test_one_path_alone_is_one_path_not_its_characters(index, tmp_path, library):
    """``remove("a.png")`` had removed "/" among its characters: every file of the index."""
    assert index.remove(str(library[0])) == 1 and index.remove(library[1]) == 1
    assert index.status().counts["indexed"] == 10
    report = index.add(str(tmp_path / "lib"), exclude="part0", workers=0)  # its letters had excluded nothing
    assert library[0].parent.name == "part0" and (report.new, report.unchanged) == (1, 5)
    assert index.add(str(tmp_path / "lib"), workers=0).new == 1


def test_batch_size_and_workers_out_of_range_are_value_errors(index, tmp_path):
    """They had been errors from deep inside (islice, ProcessPoolExecutor), or a silent default."""
    for bad in ({"batch_size": 0}, {"batch_size": -1}, {"workers": -1}):
        with pytest.raises(ValueError, match=r"batch_size is|workers is"):
            index.add([tmp_path / "lib"], **bad)


def test_rebuild_with_another_index_type_keeps_results(index, library):
    before = [h.path for h in index.search(library[2], k=4)]
    status = index.rebuild("Flat")
    assert status.index_type == "Flat" and status.vectors_in_index == 12
    assert [h.path for h in index.search(library[2], k=4)] == before


def test_status_reports_model_counts_and_sizes(index, tiny_model, tmp_path):
    (tmp_path / "lib" / "bad.jpg").write_text("no")
    index.add([tmp_path / "lib"], workers=0)
    status = index.status()
    assert status.model == tiny_model and status.dim == 32
    assert status.counts == {"indexed": 12, "failed": 1, "missing": 0}
    assert status.consistent and status.catalog_bytes > 0 and status.vectors_bytes > 0
    ((path, reason),) = index.failures()
    assert path == tmp_path / "lib" / "bad.jpg" and "cannot" in reason


def test_non_utf8_names_come_back_as_the_same_path(tmp_path, tiny_model):
    name = os.path.join(os.fsencode(tmp_path / "odd"), b"caf\xe9 \n.png")
    make_image(name, seed=7)
    with Index.open(tmp_path / "home", model=tiny_model) as index:
        index.add([tmp_path / "odd"], workers=0)
        (hit,) = index.search(Path(os.fsdecode(name)), k=1)
    assert os.fsencode(hit.path) == name


def test_parse_term(tmp_path):
    image = make_image(tmp_path / "ref.png", seed=1)
    assert parse_term("a dog") == (1.0, "a dog")
    assert parse_term("0.5:a dog") == (0.5, "a dog")
    assert parse_term("note: dogs") == (1.0, "note: dogs")
    assert parse_term(str(image)) == (1.0, image)
    assert parse_term(f"2:{image}") == (2.0, image)
    with pytest.raises(ClipsearchError, match=f"{tmp_path} is a folder; to search inside it, add --under"):
        parse_term(str(tmp_path))
    assert parse_term("0.5:") == (0.5, "")  # a weight with nothing after it: refused as empty


def test_a_weight_without_a_term_is_refused_not_searched_as_text(index):
    with pytest.raises(ClipsearchError, match="empty"):
        index.search([(1.0, "x"), parse_term("-0.5:")])


def test_queries_of_the_wrong_shape_say_the_right_one(index):
    """Each had been a bare error from deep inside (an unpacking, float(), an AssertionError
    from FAISS), or a term quietly left out, or a NaN bound quietly ignored."""
    dim = index.catalog.model(index.model).dim
    cases = [
        (["a dog", "a cat"], TypeError, "pairs"),
        ([("x", "a dog")], TypeError, "not a number"),
        ([(1.0, "a dog"), (1.0, 5)], TypeError, "not 5"),
        (np.ones(dim + 1, np.float32), ClipsearchError, f"has {dim + 1} values, but the vectors of this model have"),
        (np.full(dim, np.nan, np.float32), ClipsearchError, "not finite"),
        ([(1.0, "a dog"), (1.0, np.full(dim, np.inf, np.float32))], ClipsearchError, "not finite"),
    ]
    for query, kind, message in cases:
        with pytest.raises(kind, match=message):
            index.search(query)
    for bad in ({"k": 0}, {"k": -3}, {"min_score": float("nan")}):
        with pytest.raises(ValueError, match=r"k is|NaN"):
            index.search("x", **bad)


def test_a_huge_weight_ranks_like_weight_one(index):
    """The sum of 1e300 x a unit vector with another had overflowed: every score 0, any order."""
    expected = index.search([(1.0, "a dog"), (0.5, "grass")], k=12)
    hits = index.search([(1e300, "a dog"), (5e299, "grass")], k=12)
    assert [h.id for h in hits] == [h.id for h in expected]
    np.testing.assert_allclose([h.score for h in hits], [h.score for h in expected], atol=1e-6)
    assert len({h.score for h in hits}) > 1


def test_a_closed_index_says_so(tmp_path, tiny_model, library):
    index = Index.open(tmp_path / "home", model=tiny_model, device="cpu", precision="fp32")
    index.add([tmp_path / "lib"], workers=0)
    index.close()
    for use in (lambda: index.search("x"), index.status, lambda: index.add([tmp_path / "lib"], workers=0)):
        with pytest.raises(IndexStateError, match="has been closed; open it again"):
            use()
