"""Filters on what photos say about themselves, orders, lists by filters alone, and "more like
this", through the library, FAISS and the CLI."""

import json
import os
from datetime import date, datetime, timezone

import faiss
import numpy as np
import pytest
from helpers import bump_mtime, make_library, make_photo
from typer.testing import CliRunner

from clipsearch import decode, search
from clipsearch.catalog import Catalog
from clipsearch.cli import app
from clipsearch.filters import Filters, check_sort, distance_km, parse_extensions, parse_near, start_of
from clipsearch.index import Index
from clipsearch.records import IndexedFile
from clipsearch.vectors import VectorIndex

PARIS, VERSAILLES, SYDNEY = (48.8584, 2.2945), (48.8049, 2.1204), (-33.8568, 151.2153)

# name: what make_photo writes
PHOTOS = {
    "june.jpg": dict(taken="2019:06:01 00:30:00", offset="+02:00", make="Google", model="Pixel 3", gps=PARIS),
    "july.jpeg": dict(taken="2019:07:14 12:00:00", make="Google", model="Pixel 7", gps=VERSAILLES),
    "august.JPG": dict(taken="2019:08:31 23:59:59", make="Canon", model="EOS R5", size=(96, 64)),
    "september.png": dict(taken="2019:09:01 00:00:00", make="Canon", model="EOS R5"),
    "may.webp": dict(taken="2019:05:31 23:59:59", make="Apple", model="iPhone 12", gps=SYDNEY),
    "new.jpg": dict(taken="2024:02:29 08:00:00", make="google", model="pixel 8", size=(80, 60)),
    "undated.jpg": dict(make="Apple", model="iPhone 15"),
    "bare.png": {},
}


@pytest.fixture
def photos(tmp_path, tiny_model):
    """An index over `PHOTOS` (and a subfolder with one more), opened with the tiny model."""
    lib = tmp_path / "lib"
    for seed, (name, fields) in enumerate(PHOTOS.items()):
        make_photo(lib / name, seed, **fields)
    make_photo(lib / "sub" / "sub.jpg", 99, taken="2019:07:01 10:00:00", make="Google", model="Pixel 7")
    index = Index.open(tmp_path / "home", model=tiny_model)
    index.add([lib], workers=0)
    yield index
    index.close()


def names(hits):
    return [h.path.name for h in hits]


def matching(index, **filters):
    return sorted(names(index.search("x", k=50, filters=Filters(**filters))))


# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, start",
    [
        ("2019", "2019-01-01T00:00:00"),
        ("2019-06", "2019-06-01T00:00:00"),
        ("2019-6-1", "2019-06-01T00:00:00"),
        ("2019-06-01", "2019-06-01T00:00:00"),
        ("2019-06-01T10:30", "2019-06-01T10:30:00"),
        ("2019-06-01 10:30:15", "2019-06-01T10:30:15"),
        (date(2019, 6, 1), "2019-06-01T00:00:00"),
        (datetime(2019, 6, 1, 10, 30, 15, 999), "2019-06-01T10:30:15"),
    ],
)
def test_dates_as_people_write_them_start_what_they_name(text, start):
    assert start_of(text) == start


@pytest.mark.parametrize(
    "text", ["19", "2019-13", "2019-02-30", "June 2019", "2019-06-01T25:00", "", "0000", "2023-00", "2023-06-00"]
)
def test_impossible_dates_are_refused(text):
    with pytest.raises(ValueError, match="is not a date"):
        Filters(after=text)


def test_option_parsers():
    assert parse_near("48.85,2.29") == (48.85, 2.29) and parse_near("48.85, 2.29, 5") == (48.85, 2.29, 5.0)
    for bad in ("48.85", "a,b", "1,2,3,4", "nan,1"):
        with pytest.raises(ValueError, match="LAT,LON"):
            parse_near(bad)
    with pytest.raises(ValueError, match=r"latitude -90\.\.90"):
        Filters(near=(91, 0))
    with pytest.raises(ValueError, match="km > 0"):
        Filters(near=(0, 0, 0))
    assert parse_extensions("jpg, .HEIC,") == ("jpg", "heic") and Filters(extensions="PNG").extensions == ("png",)
    with pytest.raises(ValueError, match="letters and digits"):
        parse_extensions("j%g")
    assert check_sort("-date") == "-date"
    with pytest.raises(ValueError, match="score, date, -date, path"):
        check_sort("size")
    assert not Filters() and Filters(min_width=0) and Filters(extensions=("jpg",))


def test_filters_that_no_photo_could_pass_or_of_the_wrong_type_are_refused():
    with pytest.raises(ValueError, match="not earlier than before"):
        Filters(after="2024", before="2019")
    with pytest.raises(ValueError, match="not earlier than before"):
        Filters(after="2019-06", before="2019-06-01")
    with pytest.raises(ValueError, match="has a time zone"):
        Filters(after=datetime(2023, 6, 16, 6, tzinfo=timezone.utc))
    for blank in ("", "  "):
        with pytest.raises(ValueError, match="camera is blank"):
            Filters(camera=blank)
    assert Filters(camera=" r5 ").sql_values()["camera"] == "%r5%"
    for wrong in (
        dict(after=2019),
        dict(camera=5),
        dict(min_width=2.5),
        dict(min_width=True),
        dict(near="48,2"),
        dict(near=("48", "2")),
        dict(extensions=[1]),
        dict(extensions=b"jpg"),
    ):
        with pytest.raises(TypeError):
            Filters(**wrong)
    with pytest.raises(ValueError, match="km > 0"):
        Filters(near=(48, 2, float("inf")))
    assert Filters(near=np.array([48.5, 2.0])).near == (48.5, 2.0)  # numbers of any kind, kept as floats
    for nothing in ("", ",", " , "):
        with pytest.raises(ValueError, match="names no extension"):
            parse_extensions(nothing)


def test_distances_on_the_globe():
    assert distance_km(*PARIS, np.array([VERSAILLES[0]]), np.array([VERSAILLES[1]]))[0] == pytest.approx(14.3, abs=0.3)
    assert distance_km(0, 179.95, np.array([0.0]), np.array([-179.95]))[0] == pytest.approx(11.1, abs=0.1)


# --- filters ----------------------------------------------------------------------------------


def test_date_bounds_are_local_time_half_open(photos):
    # june.jpg was taken at 00:30 local (22:30 UTC the day before): it is a June photo.
    assert matching(photos, after="2019-06", before="2019-09-01") == ["august.JPG", "july.jpeg", "june.jpg", "sub.jpg"]
    assert matching(photos, after="2019-09-01") == ["new.jpg", "september.png"]
    assert matching(photos, before="2019-06") == ["may.webp"]
    assert matching(photos, after="2024-02-29T08:00") == ["new.jpg"]
    assert matching(photos, after="2024-02-29T08:00:01") == []


def test_camera_is_a_case_insensitive_part_of_make_and_model(photos):
    assert matching(photos, camera="PIXEL") == ["july.jpeg", "june.jpg", "new.jpg", "sub.jpg"]
    assert matching(photos, camera="google pixel 7") == ["july.jpeg", "sub.jpg"]
    assert matching(photos, camera="eos") == ["august.JPG", "september.png"]
    assert matching(photos, camera="%") == [] and matching(photos, camera="_") == []  # LIKE's wildcards are text


def test_camera_ignores_case_beyond_ascii(tmp_path, tiny_model):
    make_photo(tmp_path / "lib" / "a.jpg", 0, make="Zé".encode(), model="Câmera Ⅲ".encode())  # as phones write UTF-8
    make_photo(tmp_path / "lib" / "b.jpg", 1, make="Canon")
    with Index.open(tmp_path / "home", model=tiny_model) as index:
        index.add([tmp_path / "lib"], workers=0)
        assert [h.metadata.camera_make for h in index.search(None, filters=Filters(camera="zé"))] == ["Zé"]
        for asked in ("zé", "ZÉ", "CÂMERA", "câmera ⅲ"):
            assert matching(index, camera=asked) == ["a.jpg"], asked


def test_near_is_a_radius_around_a_place(photos):
    assert matching(photos, near=PARIS) == ["june.jpg"]  # Versailles is 14 km away
    assert matching(photos, near=(*PARIS, 20)) == ["july.jpeg", "june.jpg"]
    assert matching(photos, near=(*SYDNEY, 1)) == ["may.webp"]
    assert matching(photos, near=(0, 0, 20_000)) == ["july.jpeg", "june.jpg", "may.webp"]  # the whole globe


def test_near_across_the_antimeridian_and_the_poles(tmp_path, tiny_model):
    make_photo(tmp_path / "lib" / "east.jpg", 0, gps=(0.0, 179.95))
    make_photo(tmp_path / "lib" / "west.jpg", 1, gps=(0.0, -179.95))
    make_photo(tmp_path / "lib" / "pole.jpg", 2, gps=(89.99, 45.0))
    with Index.open(tmp_path / "home", model=tiny_model) as index:
        index.add([tmp_path / "lib"], workers=0)
        assert matching(index, near=(0.0, -179.99, 20)) == ["east.jpg", "west.jpg"]
        assert matching(index, near=(0.0, 179.99, 5)) == ["east.jpg"]
        assert matching(index, near=(89.99, -135.0, 5)) == ["pole.jpg"]  # 2.2 km across the pole


def test_extensions_and_width(photos):
    assert matching(photos, extensions=("jpg",)) == [
        "august.JPG",
        "july.jpeg",
        "june.jpg",
        "new.jpg",
        "sub.jpg",
        "undated.jpg",
    ]
    assert matching(photos, extensions=("png", "webp")) == ["bare.png", "may.webp", "september.png"]
    assert matching(photos, min_width=80) == ["august.JPG", "new.jpg"]
    assert matching(photos, min_width=10**20) == []  # past what SQLite binds: it had raised OverflowError


def test_filters_combine_with_each_other_with_under_min_score_and_k(photos, tmp_path):
    assert matching(photos, camera="pixel", after="2019-07") == ["july.jpeg", "new.jpg", "sub.jpg"]
    hits = photos.search("x", k=50, under=tmp_path / "lib" / "sub", filters=Filters(camera="pixel"))
    assert names(hits) == ["sub.jpg"]
    everything = photos.search("x", k=50, filters=Filters(camera="pixel"))
    floor = everything[1].score
    assert names(photos.search("x", k=50, min_score=floor, filters=Filters(camera="pixel"))) == names(everything[:2])
    assert names(photos.search("x", k=2, filters=Filters(camera="pixel"))) == names(everything[:2])


def test_a_filtered_search_returns_the_best_of_what_passes(photos):
    """Filtered hits are the unfiltered ranking with the others taken out, scores unchanged."""
    everything = photos.search("a red circle", k=50)
    passing = [h for h in everything if h.metadata.camera_make in ("Google", "google")]
    hits = photos.search("a red circle", k=3, filters=Filters(camera="google"))
    assert [(h.path, h.score) for h in hits] == [(h.path, h.score) for h in passing[:3]]


def test_hits_carry_their_metadata(photos):
    (hit,) = photos.search("x", k=1, filters=Filters(near=PARIS))
    assert hit.to_json()["taken"] == "2019-06-01T00:30:00+02:00"
    assert (hit.metadata.camera_make, hit.metadata.camera_model, hit.metadata.format) == ("Google", "Pixel 3", "JPEG")
    assert hit.to_json()["latitude"] == pytest.approx(PARIS[0], abs=1e-5)


def test_an_inverted_file_still_returns_k_hits_when_a_filter_passes_few(rng=np.random.default_rng(0)):
    """The few ids a filter passes sit in lists a query's nprobe never reaches: the search
    probes more lists the fewer pass (here all of them), so it finds the best k of them."""
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(10, 3010, dtype=np.int64)
    index = VectorIndex.build(ids, vectors, "IVF32,Flat")
    faiss.extract_index_ivf(index.index).nprobe = 1
    among = np.sort(rng.choice(ids, 25, replace=False))
    queries = vectors[:20]
    scores, found = index.search(queries, 10, among)
    exact = vectors[among - 10] @ queries.T
    for q in range(len(queries)):
        best = among[np.argsort(-exact[:, q])[:10]]
        assert found[q].tolist() == best.tolist()
        np.testing.assert_allclose(scores[q], np.sort(exact[:, q])[::-1][:10], atol=1e-5)
    assert index.search(queries, 10, np.array([], dtype=np.int64))[1].max() == -1
    flat = VectorIndex.build(ids, vectors, "Flat")
    assert set(flat.search(queries[:1], 50, among)[1][0]) == set(among) | {-1}


def test_under_alone_searches_inside_the_folder_of_an_inverted_file(tmp_path, tiny_model):
    """A folder's images lie in lists a query's nprobe may not reach: found first and kept if
    under the folder, they had been missing (`--under DIR` printed "No matches.")."""
    for folder in range(8):
        make_library(tmp_path / "lib" / f"f{folder}", 12, start_seed=100 * folder)
    with Index.open(tmp_path / "home", model=tiny_model, device="cpu", precision="fp32") as index:
        index.add([tmp_path / "lib"], workers=0)
        index.rebuild("IVF16,Flat")
        faiss.extract_index_ivf(index._vectors_now().index).nprobe = 1
        found = {f: len(index.search("a red circle", k=20, under=tmp_path / "lib" / f"f{f}")) for f in range(8)}
    assert found == dict.fromkeys(range(8), 12)


def test_a_large_folder_unlike_the_query_is_narrowed_to_not_read_everything(tmp_path, monkeypatch):
    """A folder over FOLDER_NARROWS images is searched through the best of everything; when
    its images are unlike the query, none are, and the search had fetched and read every row
    of the collection (3,000 of 153k: 11-14 s a query). It lists the folder's ids after a
    few rounds instead, and finds the same best k."""
    monkeypatch.setattr(search, "FOLDER_NARROWS", 16)
    monkeypatch.setattr(search, "FOLDER_FETCH", 64, raising=False)
    rng = np.random.default_rng(3)
    query = np.eye(16, dtype=np.float32)[0]
    near = query + 0.5 * rng.standard_normal((1000, 16)).astype(np.float32)
    far = -query + 0.5 * rng.standard_normal((100, 16)).astype(np.float32)
    vectors = np.vstack([near, far])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    paths = [tmp_path / "lib" / "near" / f"{i}.jpg" for i in range(1000)]
    paths += [tmp_path / "lib" / "far" / f"{i}.jpg" for i in range(100)]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    catalog = Catalog.open(tmp_path / "home", create=True)
    files = [
        IndexedFile(bytes(p), 0, 0, i.to_bytes(16, "little"), 8, 8, v) for i, (p, v) in enumerate(zip(paths, vectors))
    ]
    catalog.commit_batch("stand-in", files)
    ids, stored = catalog.all_vectors(catalog.model("stand-in"))
    index = VectorIndex.build(ids, stored, "Flat")
    read = []
    rows = catalog.rows
    monkeypatch.setattr(catalog, "rows", lambda wanted: read.append(len(wanted)) or rows(wanted))
    hits = search.top_k(index, catalog, query, k=10, under=tmp_path / "lib" / "far")
    exact = np.sort(stored[1000:] @ query)[::-1][:10]
    assert [h.path.parent.name for h in hits] == ["far"] * 10
    np.testing.assert_allclose([h.score for h in hits], exact, atol=1e-6)
    assert read == [20, 80, 20]  # had been [20, 80, 320, 1100]: every row


def test_a_filter_that_passes_a_tenth_keeps_the_inverted_files_recall(rng=np.random.default_rng(1)):
    """Recall@10 against exact search over what passes is no worse than unfiltered."""
    centres = rng.standard_normal((60, 32)).astype(np.float32)

    def around_centres(count):
        points = centres[rng.integers(0, 60, count)] + 0.5 * rng.standard_normal((count, 32)).astype(np.float32)
        return points / np.linalg.norm(points, axis=1, keepdims=True)

    vectors, queries, ids = around_centres(6000), around_centres(100), np.arange(6000, dtype=np.int64)
    index = VectorIndex.build(ids, vectors, "IVF64,Flat")  # nprobe tuned for recall@10 >= 0.95

    def recall(among):
        found = index.search(queries, 10, among)[1]
        allowed = ids if among is None else among
        exact = allowed[np.argsort(-(vectors[allowed] @ queries.T), axis=0)[:10].T]
        return np.mean([len(np.intersect1d(f, e)) / 10 for f, e in zip(found, exact)])

    assert recall(np.sort(rng.choice(ids, 600, replace=False))) >= max(0.95, recall(None))


# --- order, and lists by filters alone --------------------------------------------------------


def test_sort_orders_the_best_k_by_date_or_path(photos):
    best = photos.search("x", k=5)
    by_date = photos.search("x", k=5, sort="date")
    assert sorted(names(by_date)) == sorted(names(best))
    taken = [h.metadata.taken for h in by_date]
    dated = [t for t in taken if t is not None]
    assert dated == sorted(dated) and taken == dated + [None] * (len(taken) - len(dated))
    newest = [h.metadata.taken for h in photos.search("x", k=5, sort="-date")]
    assert newest == sorted(dated, reverse=True) + [None] * (len(taken) - len(dated))
    assert [os.fsencode(h.path) for h in photos.search("x", k=5, sort="path")] == sorted(
        os.fsencode(h.path) for h in best
    )


def test_filters_alone_list_photos_newest_first_or_as_asked(photos):
    assert names(photos.search(None, filters=Filters(after="2019-07"))) == [
        "new.jpg",
        "september.png",
        "august.JPG",
        "july.jpeg",
        "sub.jpg",
    ]
    assert names(photos.search(None, k=2, filters=Filters(after="2019"), sort="date")) == ["may.webp", "june.jpg"]
    listed = photos.search([], k=20, filters=Filters(camera="apple"), sort="date")
    assert names(listed) == ["may.webp", "undated.jpg"]  # no date: last
    assert all(h.score is None and h.to_json()["score"] is None for h in listed)
    assert names(photos.search(None, filters=Filters(near=(*PARIS, 20)))) == ["july.jpeg", "june.jpg"]


def test_a_list_skips_files_deleted_since_they_were_indexed_and_pages_on(tmp_path, tiny_model):
    lib = tmp_path / "lib"
    for i in range(150):
        make_photo(lib / f"{i:03d}.jpg", i, taken=f"2020:01:01 00:{i // 60:02d}:{i % 60:02d}")
    with Index.open(tmp_path / "home", model=tiny_model) as index:
        index.add([lib], workers=0)
        for i in range(0, 140):
            os.remove(lib / f"{i:03d}.jpg")
        assert names(index.search(None, k=5, filters=Filters(after="2020"), sort="date")) == [
            f"{i:03d}.jpg" for i in range(140, 145)
        ]


def test_an_empty_query_without_filters_is_an_error(photos):
    from clipsearch.errors import ClipsearchError

    with pytest.raises(ClipsearchError, match="The query is empty"):
        photos.search(None)


# --- more like this ---------------------------------------------------------------------------


def test_similar_uses_the_stored_vector_and_leaves_the_image_out(photos, tmp_path, encoded, monkeypatch):
    def no_decoding(*args):
        raise AssertionError("decoded")

    monkeypatch.setattr(decode, "decode_file", no_decoding)
    june = tmp_path / "lib" / "june.jpg"
    hits = photos.similar(june, k=3)
    assert len(hits) == 3 and "june.jpg" not in names(hits)
    with_self = photos.similar(june, k=3, include_self=True)
    assert with_self[0].path == june and with_self[0].score == pytest.approx(1, abs=2e-3)
    assert names(with_self[1:]) == names(hits[:2])
    by_id = photos.similar(with_self[0].id, k=3)
    assert [(h.path, h.score) for h in by_id] == [(h.path, h.score) for h in hits]
    assert sorted(names(photos.similar(june, k=3, filters=Filters(camera="canon")))) == ["august.JPG", "september.png"]
    assert encoded == []


def test_similar_encodes_an_image_that_is_not_indexed_or_changed_since(photos, tmp_path, encoded):
    outside = tmp_path / "outside.png"
    outside.write_bytes((tmp_path / "lib" / "bare.png").read_bytes())
    hits = photos.similar(outside, k=2)
    assert hits[0].path.name == "bare.png" and hits[0].score == pytest.approx(1, abs=2e-3)
    assert sum(encoded) == 1
    bump_mtime(tmp_path / "lib" / "bare.png")  # its stored vector may be out of date now
    hits = photos.similar(tmp_path / "lib" / "bare.png", k=2)
    assert sum(encoded) == 2 and "bare.png" not in names(hits)


def test_similar_by_an_unknown_id_says_so(photos):
    from clipsearch.errors import ImageError

    with pytest.raises(ImageError, match="No image with id 999"):
        photos.similar(999)


# --- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def cli(photos):
    home = str(photos.home)

    def run(*args, code=0):
        result = CliRunner().invoke(app, ["--home", home, *map(str, args)])
        assert result.exit_code == code, (result.stdout, result.stderr)
        return result

    return run


def test_cli_filters_and_sort(cli):
    rows = json.loads(
        cli("query", "x", "--after", "2019-06", "--before", "2019-09-01", "--sort", "date", "--json").stdout
    )
    assert [os.path.basename(r["path"]) for r in rows] == ["june.jpg", "sub.jpg", "july.jpeg", "august.JPG"]
    assert rows[0]["taken"] == "2019-06-01T00:30:00+02:00" and rows[0]["camera_model"] == "Pixel 3"
    out = cli("query", "x", "--camera", "canon", "--ext", "png", "--paths-only").stdout
    assert [os.path.basename(p) for p in out.splitlines()] == ["september.png"]
    near = cli("query", "x", "--near", f"{PARIS[0]},{PARIS[1]},20", "--min-width", "40", "--paths-only").stdout
    assert sorted(os.path.basename(p) for p in near.splitlines()) == ["july.jpeg", "june.jpg"]


def test_cli_lists_by_filters_alone(cli):
    lines = cli("query", "--after", "2024", "--sort", "date").stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("2024-02-29T08:00:00  ") and lines[0].endswith("new.jpg")
    lines = cli("query", "--camera", "apple", "--sort", "date").stdout.splitlines()
    assert lines[1].startswith("(no date)  ")


def test_cli_more_like_this(cli, tmp_path):
    june = tmp_path / "lib" / "june.jpg"
    paths = cli("query", "--like", june, "-k", "3", "--paths-only").stdout.splitlines()
    assert len(paths) == 3 and str(june) not in paths
    assert cli("query", "--like", june, "--include-self", "--paths-only").stdout.splitlines()[0] == str(june)
    result = cli("query", "--like", tmp_path / "nope.jpg", code=1)
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "args, says",
    [
        (["--after", "2019-13"], "is not a date"),
        (["--before", "soon"], "is not a date"),
        (["--near", "100,0"], "latitude -90..90"),
        (["--near", "here"], "LAT,LON"),
        (["--ext", "j.pg"], "letters and digits"),
        (["--sort", "size"], "not an order"),
        (["--min-width", "0"], "--min-width"),
        (["--after", "2024", "--before", "2019"], "not earlier than before"),
        (["--camera", " "], "camera is blank"),
        (["--ext", ","], "names no extension"),
    ],
)
def test_cli_bad_filters_are_usage_errors(cli, args, says):
    result = cli("query", "x", *args, code=2)
    assert says in result.stderr and "Traceback" not in result.stderr


def test_query_help_names_every_option(cli):
    text = cli("query", "--help").stdout
    for option in (
        "--after",
        "--before",
        "--camera",
        "--near",
        "--ext",
        "--min-width",
        "--sort",
        "--like",
        "--include-self",
    ):
        assert option in text
