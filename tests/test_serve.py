"""`clipsearch serve`'s JSON API, through Starlette's in-process client: searches, uploads,
similar images, thumbnails, originals, status, and every error a request can cause."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from helpers import make_image, make_library
from PIL import Image
from reliability_helpers import blocks, decompression_bomb, encoded_bytes, exif_rotated_jpeg

pytest.importorskip("starlette", reason="the serve extra is not installed")
pytest.importorskip("httpx", reason="Starlette's test client needs httpx")

from starlette.testclient import TestClient

from clipsearch.catalog import Catalog
from clipsearch.index import Index
from clipsearch.serve import service as service_module
from clipsearch.serve.app import create_app
from clipsearch.serve.errors import RequestError
from clipsearch.serve.refine import parse_query
from clipsearch.serve.service import Page, Service
from clipsearch.serve.thumbnails import SHORT_SIDE, Thumbnails
from clipsearch.serve.upload import from_form

LOCAL = "http://127.0.0.1"


def build(root: Path, model: str, count: int = 10) -> tuple[Path, list[Path]]:
    """A library of ``count`` block images in two folders plus one photo stored on its side
    with an EXIF orientation (600 x 300 upright: left half red, right half blue), indexed into
    root/home."""
    library = make_library(root / "lib", count)
    upright = Image.new("RGB", (600, 300), (220, 20, 20))
    upright.paste((20, 20, 220), (300, 0, 600, 300))
    rotated = root / "lib" / "part0" / "rotated.jpg"
    rotated.write_bytes(exif_rotated_jpeg(upright))
    with Index.open(root / "home", model=model, device="cpu") as index:
        index.add([root / "lib"], workers=0)
    return root / "home", [*library, rotated]


def client_for(service: Service, **options) -> TestClient:
    return TestClient(create_app(service, **options), base_url=LOCAL, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("served")
    home, library = build(root, tiny_model)
    service = Service.open(home, "cpu")
    with client_for(service) as client:
        yield client, service, library
    service.close()


@pytest.fixture
def fresh(tmp_path, tiny_model):
    """A library and service of its own, for tests that change files or the index."""
    home, library = build(tmp_path, tiny_model, count=4)
    service = Service.open(home, "cpu")
    yield client_for(service), service, library, home
    service.close()


def ids_by_path(service: Service) -> dict[Path, int]:
    return {Path(os.fsdecode(path)): state.id for path, state in service._files.file_states().items()}


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def error(response, status: int) -> str:
    """The one-line JSON error of a refused request."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in body["error"]
    return body["error"]


# --- searches --------------------------------------------------------------------------------


def test_text_search_answers_the_libraries_hits_in_the_cli_json_shape(served):
    client, service, _ = served
    body = ok(client.get("/api/search", params={"q": "a red circle", "k": 5}))
    expected = [hit.to_json() for hit in service.index.search("a red circle", k=5)]
    assert body == {"hits": expected, "offset": 0, "k": 5}
    assert {"id", "path", "score", "width", "height", "mtime", "size", "taken", "camera_make"} <= set(expected[0])
    assert [h["score"] for h in body["hits"]] == sorted((h["score"] for h in body["hits"]), reverse=True)


def test_refinements_use_the_cli_syntax(served):
    client, service, _ = served
    body = ok(client.get("/api/search", params={"q": "a beach +at sunset -0.5:people", "k": 4}))
    terms = [(1.0, "a beach"), (1.0, "at sunset"), (-0.5, "people")]
    assert body["hits"] == [hit.to_json() for hit in service.index.search(terms, k=4)]
    assert body["hits"] != ok(client.get("/api/search", params={"q": "a beach", "k": 4}))["hits"]


def test_parse_query():
    assert parse_query("a t-shirt") == [(1.0, "a t-shirt")]
    assert parse_query("a - b") == [(1.0, "a - b")]
    assert parse_query("dogs +2:on grass -0.5:people") == [(1.0, "dogs"), (2.0, "on grass"), (-0.5, "people")]
    assert parse_query("  note: dogs ") == [(1.0, "note: dogs")]
    assert parse_query("", required=False) == []
    for bad in ("", "   ", "dogs -nan:x", "dogs +inf:x", "dogs -0.5:", "0.5:", "x" * 1001, " +".join("x" * 17)):
        with pytest.raises(RequestError):
            parse_query(bad)


def test_pages_follow_each_other(served):
    client, _, _ = served
    everything = ok(client.get("/api/search", params={"q": "x", "k": 6}))["hits"]
    second = ok(client.get("/api/search", params={"q": "x", "k": 3, "offset": 3}))
    assert second["hits"] == everything[3:6] and second["offset"] == 3
    assert ok(client.get("/api/search", params={"q": "x", "k": 5, "offset": 50}))["hits"] == []


def test_under_and_min_score_filter(served):
    client, _, library = served
    folder = library[1].parent
    hits = ok(client.get("/api/search", params={"q": "x", "k": 50, "under": str(folder)}))["hits"]
    assert hits and all(Path(h["path"]).parent == folder for h in hits)
    assert len(hits) == len([p for p in library if p.parent == folder])
    data = library[2].read_bytes()
    best = ok(client.post("/api/search/image", params={"min_score": 0.9999}, content=data))["hits"]
    assert [h["path"] for h in best] == [str(library[2])]


def test_a_mistyped_folder_is_a_400_as_on_the_command_line(served, tmp_path):
    """It had answered 200 with no hits, which reads as "nothing matches" (the CLI's --under
    says the folder is not there). A folder not there that still holds indexed files (an
    unmounted drive's) is searched."""
    client, _, library = served
    typo = library[1].parent.with_name(library[1].parent.name + "x")
    said = error(client.get("/api/search", params={"q": "x", "under": str(typo)}), 400)
    assert said == f"under: {typo} does not exist, and nothing indexed lies under it."
    assert ok(client.get("/api/search", params={"q": "x"}))["hits"]  # and it keeps serving
    unmounted = tmp_path / "unmounted"
    library[1].parent.rename(unmounted)
    try:
        hits = ok(client.get("/api/search", params={"q": "x", "k": 50, "under": str(library[1].parent)}))["hits"]
    finally:
        unmounted.rename(library[1].parent)
    assert hits == []  # its files are gone from disk, so none is shown, but the folder is no typo


def test_an_uploaded_image_finds_itself_and_is_never_stored(served, tmp_path):
    client, service, library = served
    before = sorted(p for p in service.index.home.rglob("*") if "thumbnails" not in p.parts)
    body = ok(client.post("/api/search/image", params={"k": 3}, content=library[4].read_bytes()))
    assert body["hits"][0]["path"] == str(library[4]) and body["hits"][0]["score"] == pytest.approx(1, abs=3e-3)
    assert sorted(p for p in service.index.home.rglob("*") if "thumbnails" not in p.parts) == before


def test_the_image_tower_loads_with_the_first_upload_only(tmp_path, tiny_model, monkeypatch):
    """A server that is only asked texts never loads the image tower (nor, once its text graph
    is cached, torch); the first upload loads the image tower alone, once, and texts keep the
    text tower they had."""
    import clipsearch.index

    home, library = build(tmp_path, tiny_model, count=4)
    opened = []
    real_open = clipsearch.index.open_encoder

    def open_encoder(model, device, precision, towers, *args):
        opened.append(towers)
        return real_open(model, device, precision, towers, *args)

    monkeypatch.setattr(clipsearch.index, "open_encoder", open_encoder)
    service = Service.open(home, "cpu")
    try:
        with client_for(service) as client:
            ok(client.get("/api/search", params={"q": "a red circle", "k": 2}))
            assert opened == ["text"]
            text_tower = service.index.encoder("text")
            for _ in range(2):
                body = ok(client.post("/api/search/image", params={"k": 1}, content=library[1].read_bytes()))
                assert body["hits"][0]["path"] == str(library[1])
                assert body["hits"][0]["score"] == pytest.approx(1, abs=3e-3)
            ok(client.get("/api/search", params={"q": "a blue square", "k": 2}))
            assert opened == ["text", "image"]
            assert service.index.encoder("text") is text_tower
    finally:
        service.close()


def test_texts_are_answered_while_the_first_upload_loads_the_image_tower(tmp_path, tiny_model, monkeypatch):
    """Loading the image tower takes seconds at ViT-B/32 (importing torch); a search by text
    sent meanwhile is answered at once, not queued behind it."""
    import clipsearch.index

    home, library = build(tmp_path, tiny_model, count=4)
    loading, release = threading.Event(), threading.Event()
    real_open = clipsearch.index.open_encoder

    def open_encoder(model, device, precision, towers, *args):
        if towers != "text":
            loading.set()
            assert release.wait(60)
        return real_open(model, device, precision, towers, *args)

    monkeypatch.setattr(clipsearch.index, "open_encoder", open_encoder)
    service = Service.open(home, "cpu")
    uploaded, searched = [], []
    try:
        with client_for(service) as client:
            upload = threading.Thread(
                target=lambda: uploaded.append(
                    client.post("/api/search/image", params={"k": 1}, content=library[2].read_bytes())
                )
            )
            upload.start()
            assert loading.wait(60)
            search = threading.Thread(
                target=lambda: searched.append(client.get("/api/search", params={"q": "a red circle", "k": 2}))
            )
            search.start()
            search.join(20)
            answered_while_loading = not search.is_alive() and upload.is_alive()
            release.set()
            upload.join(60)
            search.join(60)
            assert answered_while_loading
            assert len(ok(searched[0])["hits"]) == 2
            assert ok(uploaded[0])["hits"][0]["path"] == str(library[2])
    finally:
        release.set()
        service.close()


def test_an_upload_can_be_refined_with_text(served):
    client, service, library = served
    vector = service.index.encoder("image").encode_images(
        service.index.encoder("image").preprocess.array(Image.open(library[4]).convert("RGB"))[None]
    )[0]
    body = ok(client.post("/api/search/image", params={"k": 4, "q": "-0.7:a dog"}, content=library[4].read_bytes()))
    expected = service.index.search([(1.0, vector), (-0.7, "a dog")], k=4)
    assert [h["id"] for h in body["hits"]] == [hit.id for hit in expected]


def test_a_form_is_parsed_off_the_event_loop(served, monkeypatch):
    """Parsing a 31 MB form took 1.3 s, during which the server had answered nothing else."""
    import asyncio

    from clipsearch.serve import app

    client, _, library = served
    parsed_on_the_loop: list[bool] = []

    def from_form(*args):
        try:
            asyncio.get_running_loop()
            parsed_on_the_loop.append(True)
        except RuntimeError:
            parsed_on_the_loop.append(False)
        return parse(*args)

    parse = app.from_form
    monkeypatch.setattr(app, "from_form", from_form)
    files = {"image": ("photo.png", library[4].read_bytes(), "image/png")}
    assert ok(client.post("/api/search/image", files=files))["hits"]
    assert parsed_on_the_loop == [False]


def test_a_form_upload_is_read_as_curl_and_html_forms_send_it(served):
    """``curl -F image=@photo.jpg -F q=...``: the file part is the image, byte for byte, and a
    "q" part refines it as the query string's q does (which wins when both are given)."""
    client, _, library = served
    data = library[4].read_bytes()
    as_body = ok(client.post("/api/search/image", params={"k": 4, "q": "-0.7:a dog"}, content=data))
    form = {"files": {"image": ("photo 4.png", data, "image/png")}, "data": {"q": "-0.7:a dog"}}
    assert ok(client.post("/api/search/image", params={"k": 4}, **form)) == as_body
    unrefined = ok(client.post("/api/search/image", params={"k": 4}, content=data))
    assert ok(client.post("/api/search/image", params={"k": 4, "q": ""}, files=form["files"])) == unrefined
    overridden = ok(
        client.post("/api/search/image", params={"k": 4, "q": "-0.7:a dog"}, files=form["files"], data={"q": "x"})
    )
    assert overridden == as_body
    two = {"a": ("a.png", data, "image/png"), "b": ("b.png", data, "image/png")}
    no_file = {
        "content": b'--B\r\nContent-Disposition: form-data; name="q"\r\n\r\nx\r\n--B--\r\n',
        "headers": {"Content-Type": "multipart/form-data; boundary=B"},
    }
    for answer in (client.post("/api/search/image", files=two), client.post("/api/search/image", **no_file)):
        assert answer.status_code == 400 and "Send one image file in the form" in answer.json()["error"]


def test_similar_uses_the_stored_vector_and_leaves_the_image_out(served, encoded):
    client, service, library = served
    source = ids_by_path(service)[library[5]]
    body = ok(client.get(f"/api/similar/{source}", params={"k": 4}))
    assert encoded == []  # nothing went through the image tower
    stored = service._files.stored_vector(service.index.model, image_id=source)[1]
    expected = [hit.to_json() for hit in service.index.search(stored, k=5) if hit.id != source][:4]
    assert body["hits"] == expected and len(expected) == 4
    page_two = ok(client.get(f"/api/similar/{source}", params={"k": 2, "offset": 2}))["hits"]
    assert page_two == expected[2:4]


def test_a_query_term_may_be_a_vector(served):
    _, service, library = served
    image_id = ids_by_path(service)[library[3]]
    stored = service._files.stored_vector(service.index.model, image_id=image_id)[1]
    assert service.index.search([(1.0, stored)], k=1)[0].id == image_id
    assert service.index.search(stored, k=1)[0].id == image_id
    assert service._files.fingerprint(10**9) is None


# --- files -----------------------------------------------------------------------------------


def test_thumbnails_are_upright_small_cached_and_answer_304(served, monkeypatch):
    client, service, library = served
    rotated = ids_by_path(service)[library[-1]]
    first = client.get(f"/api/thumbnail/{rotated}")
    assert first.status_code == 200 and first.headers["content-type"] == service.thumbnails.media_type
    image = Image.open(io.BytesIO(first.content)).convert("RGB")
    assert image.size == (2 * SHORT_SIDE, SHORT_SIDE)  # stored 300 x 600 on its side, shown 600 x 300
    left, right = image.getpixel((20, 128)), image.getpixel((490, 128))
    assert left[0] > 150 > left[2] and right[2] > 150 > right[0]  # red left of blue, as shown upright
    etag = first.headers["etag"]
    assert first.headers["cache-control"] == "private, no-cache"  # unversioned: revalidated each time

    made = []
    monkeypatch.setattr(Thumbnails, "make", lambda self, path: made.append(path) or b"")
    again = client.get(f"/api/thumbnail/{rotated}")
    assert again.content == first.content and again.headers["etag"] == etag and made == []
    not_modified = client.get(f"/api/thumbnail/{rotated}", headers={"If-None-Match": etag})
    assert not_modified.status_code == 304 and not_modified.content == b"" and not_modified.headers["etag"] == etag
    other = client.get(f"/api/thumbnail/{rotated}", headers={"If-None-Match": '"something-else"'})
    assert other.status_code == 200


def test_the_status_is_answered_while_thumbnails_are_being_written(fresh, monkeypatch):
    """The status counts the cache's bytes: a thumbnail's temporary file, listed and then renamed
    into place before its size was read, had made it a 500 (the page asks every 15 s, while its
    thumbnails are made). Temporaries are neither counted nor pruned, and a file gone between
    the listing and its size counts nothing."""
    client, service, library, _ = fresh
    ids = ids_by_path(service)
    made = [client.get(f"/api/thumbnail/{ids[path]}").content for path in library[:2]]
    folder = service.thumbnails.folder
    writing = next(folder.iterdir()) / ".k2j4x9.part"  # as `_store` names one while it writes
    writing.write_bytes(b"x" * 1000)
    assert ok(client.get("/api/status"))["thumbnail_bytes"] == sum(map(len, made))
    listed = Thumbnails._files
    monkeypatch.setattr(Thumbnails, "_files", lambda self: [*listed(self), folder / "00" / ".renamed.part"])
    assert ok(client.get("/api/status"))["thumbnail_bytes"] == sum(map(len, made))
    monkeypatch.undo()
    keep = {bytes.fromhex(file.stem) for file in folder.glob("*/*") if not file.name.startswith(".")}
    assert service.thumbnails.prune(keep) == 0 and writing.exists()


def test_the_caches_size_is_walked_for_once_and_kept(fresh, monkeypatch):
    """Each status (the page asks every 15 s) had walked the whole thumbnail cache: 2.3 s for
    100,000 thumbnails. It is walked once; thumbnails made, made again and pruned keep it exact."""
    client, service, library, _ = fresh
    ids = ids_by_path(service)
    walks = []
    listed = Thumbnails._files
    monkeypatch.setattr(Thumbnails, "_files", lambda self: walks.append(1) or listed(self))
    made = {}
    for path in library[:3]:
        made[path] = len(client.get(f"/api/thumbnail/{ids[path]}").content)
        assert ok(client.get("/api/status"))["thumbnail_bytes"] == sum(made.values())
    key = service._files.fingerprint(ids[library[0]])
    with library[0].open("rb") as file:
        service.thumbnails.add(key, file)  # made again: replaces, adds nothing
    assert ok(client.get("/api/status"))["thumbnail_bytes"] == sum(made.values())
    assert service.thumbnails.prune({key}) == 2
    assert ok(client.get("/api/status"))["thumbnail_bytes"] == made[library[0]]
    assert len(walks) == 2  # the first status's and the prune's
    assert sum(file.stat().st_size for file in listed(service.thumbnails)) == made[library[0]]


def test_a_thumbnail_asked_for_at_once_is_made_once(fresh, monkeypatch):
    """Every request for a thumbnail not cached yet had made it: 8 at once for a 24-megapixel
    PNG took 3.8 s of CPU against 0.55 s for one (the page asks for a tile's and, searching
    by it, the source's at once; two tabs do too). The first makes it, the others read it."""
    client, service, library, _ = fresh
    image_id = ids_by_path(service)[library[0]]
    key, _ = service.thumbnail_key(image_id)
    made = []
    make = Thumbnails.make

    def slow(self, source):
        made.append(1)
        time.sleep(0.3)
        return make(self, source)

    monkeypatch.setattr(Thumbnails, "make", slow)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(service.thumbnail(image_id, key))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1
    assert len(answers) == 8 and len({answer.data for answer in answers}) == 1
    assert client.get(f"/api/thumbnail/{image_id}").content == answers[0].data and len(made) == 1


def test_a_small_image_keeps_its_size(served):
    client, service, library = served
    data = client.get(f"/api/thumbnail/{ids_by_path(service)[library[0]]}").content
    assert Image.open(io.BytesIO(data)).size == (48, 40)


def test_a_moved_file_reuses_its_thumbnail_and_removed_ones_are_pruned(fresh, tiny_model, monkeypatch):
    client, service, library, home = fresh
    first_id = ids_by_path(service)[library[0]]
    made = client.get(f"/api/thumbnail/{first_id}").content
    client.get(f"/api/thumbnail/{ids_by_path(service)[library[1]]}")
    assert len(service.thumbnails._files()) == 2
    service.close()
    moved = library[0].parent.parent / "moved.png"
    shutil.move(library[0], moved)
    library[1].unlink()
    with Index.open(home, device="cpu") as index:
        report = index.add([library[0].parent.parent], workers=0)
    assert report.moved == 1
    reopened = Service.open(home, "cpu")  # prunes the thumbnail of the removed file
    try:
        assert len(reopened.thumbnails._files()) == 1
        monkeypatch.setattr(Thumbnails, "make", lambda self, path: pytest.fail("made again"))
        moved_id = ids_by_path(reopened)[moved]
        assert client_for(reopened).get(f"/api/thumbnail/{moved_id}").content == made
    finally:
        reopened.close()


def test_thumbnails_of_removed_files_are_pruned_after_an_index_run(fresh, monkeypatch):
    client, service, library, home = fresh
    ids = ids_by_path(service)
    for path in library[:2]:
        client.get(f"/api/thumbnail/{ids[path]}")
    library[1].unlink()
    with Index.open(home, device="cpu") as index:
        index.add([library[0].parent.parent], workers=0)
    ok(client.get("/api/status"))
    assert service.pruner is None  # not within a minute of the last pruning
    monkeypatch.setattr(service_module, "PRUNE_EVERY_S", 0.0)
    ok(client.get("/api/status"))
    service.pruner.join(30)
    assert [file.name for file in service.thumbnails._files()] == [
        service.thumbnails._file(service.thumbnail_key(ids[library[0]])[0]).name
    ]


def test_originals_are_served_by_id_only_while_the_file_is_the_one_indexed(fresh, tmp_path):
    client, service, library, _ = fresh
    ids = ids_by_path(service)
    response = client.get(f"/api/original/{ids[library[0]]}")
    assert response.status_code == 200 and response.content == library[0].read_bytes()
    library[1].unlink()
    assert "no longer there" in error(client.get(f"/api/original/{ids[library[1]]}"), 404)
    assert error(client.get(f"/api/thumbnail/{ids[library[1]]}"), 404)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve me")
    library[2].unlink()
    library[2].symlink_to(secret)  # a photo swapped for a link to something else
    assert "changed since it was indexed" in error(client.get(f"/api/original/{ids[library[2]]}"), 404)
    assert "do not serve me" not in client.get(f"/api/thumbnail/{ids[library[2]]}").text


def test_a_link_given_the_indexed_size_and_mtime_is_not_served(fresh, tmp_path):
    client, service, library, _ = fresh
    victim = library[2]
    victim_id = ids_by_path(service)[victim]
    st = victim.stat()
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(b"S" * st.st_size)
    os.utime(secret, ns=(st.st_atime_ns, st.st_mtime_ns))
    victim.unlink()
    victim.symlink_to(secret)  # os.stat through the link gives the indexed size and mtime
    for endpoint in ("original", "thumbnail", "image"):
        assert "changed since it was indexed" in error(client.get(f"/api/{endpoint}/{victim_id}"), 404)


def test_a_file_indexed_through_a_link_is_served(tmp_path, tiny_model):
    outside = tmp_path / "outside"
    make_library(outside, 1)
    library = tmp_path / "lib"
    library.mkdir()
    (library / "linked").symlink_to(outside / "part0")
    with Index.open(tmp_path / "home", model=tiny_model, device="cpu") as index:
        index.add([library], follow_symlinks=True, workers=0)
    service = Service.open(tmp_path / "home", "cpu")
    try:
        client = client_for(service)
        (image_id,) = ids_by_path(service).values()
        assert client.get(f"/api/original/{image_id}").content == (outside / "part0" / "img0000.png").read_bytes()
        assert ok(client.get(f"/api/image/{image_id}"))["id"] == image_id
        assert client.get(f"/api/thumbnail/{image_id}").status_code == 200
    finally:
        service.close()


def test_a_file_whose_name_is_not_utf8_is_found_shown_and_served(tmp_path, tiny_model):
    """A Latin-1 name, as an old archive unpacks one, is a path with a lone surrogate, which
    UTF-8 cannot encode: every search that found the file had been a 500, and so were its
    details and the 404 naming it. The JSON escapes it as `clipsearch query --json` does."""
    photo = Path(os.fsdecode(make_image(os.fsencode(tmp_path) + b"/caf\xe9/caf\xe9 \xe0 la mer.png", 0)))
    make_image(photo.parent / "日本.png", 1)
    with Index.open(tmp_path / "home", model=tiny_model, device="cpu") as index:
        assert index.add([photo.parent], workers=0).new == 2
    service = Service.open(tmp_path / "home", "cpu")
    try:
        client = client_for(service)
        response = client.get("/api/search", params={"q": "x"})
        assert response.content.isascii()
        paths = {hit["path"]: hit["id"] for hit in ok(response)["hits"]}
        assert set(paths) == {str(photo), str(photo.parent / "日本.png")}
        image_id = paths[str(photo)]
        assert ok(client.get(f"/api/image/{image_id}"))["path"] == str(photo)
        assert client.get(f"/api/original/{image_id}").content == photo.read_bytes()
        assert client.get(f"/api/thumbnail/{image_id}").headers["content-type"].startswith("image/")
        photo.unlink()
        assert error(client.get(f"/api/original/{image_id}"), 404) == f"{photo} is no longer there."
    finally:
        service.close()


def test_an_original_carries_its_own_name_to_be_saved_under(tmp_path, tiny_model):
    """The browser saved an opened original under its id ("42.png"): the name, percent-encoded
    as RFC 8187 asks (non-ASCII, spaces, quotes and ;), now comes in Content-Disposition."""
    names = ['café é #1?&%;"x".png', "日本.png"]
    paths = [make_image(tmp_path / "lib" / name, i) for i, name in enumerate(names)]
    latin1 = make_image(os.fsencode(tmp_path) + b"/lib/caf\xe9.png", 2)
    with Index.open(tmp_path / "home", model=tiny_model, device="cpu") as index:
        assert index.add([tmp_path / "lib"], workers=0).new == 3
    service = Service.open(tmp_path / "home", "cpu")
    try:
        client = client_for(service)
        ids = ids_by_path(service)
        headers = [client.get(f"/api/original/{ids[Path(os.fsdecode(path))]}").headers for path in [*paths, latin1]]
        assert [h["content-disposition"] for h in headers] == [
            "inline; filename*=UTF-8''caf%C3%A9%20%C3%A9%20%231%3F%26%25%3B%22x%22.png",
            "inline; filename*=UTF-8''%E6%97%A5%E6%9C%AC.png",
            "inline; filename*=UTF-8''caf%E9.png",  # the bytes as they are
        ]
    finally:
        service.close()


def test_a_versioned_thumbnail_is_kept_for_good_and_an_edit_changes_its_version(fresh):
    client, _, library, home = fresh
    (hit,) = [
        h for h in ok(client.get("/api/search", params={"q": "a", "k": 50}))["hits"] if h["path"] == str(library[0])
    ]
    versioned = client.get(f"/api/thumbnail/{hit['id']}", params={"v": f"{hit['size']}-{hit['mtime']}"})
    assert versioned.headers["cache-control"] == "private, max-age=31536000, immutable"
    for other in ("", "nonsense", f"{hit['size']}-{hit['mtime'] + 1}"):
        response = client.get(f"/api/thumbnail/{hit['id']}", params={"v": other})
        assert response.headers["cache-control"] == "private, no-cache"
        assert response.headers["etag"] == versioned.headers["etag"]
    library[0].write_bytes(encoded_bytes(blocks(99), "PNG"))
    with Index.open(home, device="cpu") as index:
        index.add([library[0].parent], workers=0)
    (edited,) = [h for h in ok(client.get("/api/search", params={"q": "a", "k": 50}))["hits"] if h["id"] == hit["id"]]
    assert (edited["size"], edited["mtime"]) != (hit["size"], hit["mtime"])  # a new URL for the page
    stale = client.get(f"/api/thumbnail/{hit['id']}", params={"v": f"{hit['size']}-{hit['mtime']}"})
    assert stale.headers["cache-control"] == "private, no-cache"
    assert stale.headers["etag"] != versioned.headers["etag"] and stale.content != versioned.content


def test_an_original_answers_304_to_its_validators(fresh):
    client, service, library, _ = fresh
    url = f"/api/original/{ids_by_path(service)[library[0]]}"
    first = client.get(url)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert first.headers["content-length"] == str(library[0].stat().st_size)
    etag, modified = first.headers["etag"], first.headers["last-modified"]
    for headers in ({"If-None-Match": etag}, {"If-None-Match": f'"x", W/{etag}'}, {"If-Modified-Since": modified}):
        again = client.get(url, headers=headers)
        assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", etag)
    for headers in ({"If-None-Match": '"x"', "If-Modified-Since": modified}, {"If-Modified-Since": "yesterday"}):
        assert client.get(url, headers=headers).content == library[0].read_bytes()
    library[0].write_bytes(library[0].read_bytes() + b"edited")  # no longer the file indexed
    assert "changed since it was indexed" in error(client.get(url, headers={"If-None-Match": etag}), 404)


@pytest.mark.parametrize(
    "url",
    [
        "/api/original/../../../etc/passwd",
        "/api/original/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/api/original/..%2fcatalog.db",
        "/api/original/-1",
        "/api/original/1.5",
        "/api/thumbnail/%2fetc%2fpasswd",
        "/static/../catalog.db",
        "/static/%2e%2e/app.py",
        "/static/%2e%2e%2f%2e%2e%2fcatalog.py",
        "/static//etc/passwd",
        "/api/original/999999",
    ],
)
def test_no_request_can_name_a_path(served, url):
    client, _, _ = served
    response = client.get(url)
    assert response.status_code == 404, (url, response.status_code, response.text[:200])
    assert "root:" not in response.text and "import" not in response.text


def test_an_id_past_sqlites_integers_is_a_bad_request(served):
    client, _, _ = served
    assert "not an image id" in error(client.get(f"/api/thumbnail/{2**64}"), 400)
    assert error(client.get(f"/api/similar/{2**70}"), 400)


def test_details_give_the_date_taken_from_exif(fresh):
    client, service, library, _ = fresh
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = "2021:07:04 18:30:00"  # DateTimeOriginal
    dated = library[0].parent / "dated.jpg"
    dated.write_bytes(encoded_bytes(blocks(7), "JPEG", exif=exif))
    with Index.open(service.index.home, device="cpu") as index:
        index.add([library[0].parent], workers=0)
    ids = ids_by_path(service)
    assert ok(client.get(f"/api/image/{ids[dated]}"))["taken"] == "2021-07-04T18:30:00"
    undated = ids[library[0]]
    assert ok(client.get(f"/api/image/{undated}")) == {"id": undated, "path": str(library[0]), "taken": None}


# --- status ----------------------------------------------------------------------------------


def test_status(fresh):
    client, service, library, home = fresh
    (library[0].parent / "broken.jpg").write_text("not a picture")
    with Index.open(home, device="cpu") as index:
        index.add([library[0].parent.parent], workers=0)
    client.get(f"/api/thumbnail/{ids_by_path(service)[library[0]]}")
    body = ok(client.get("/api/status"))
    assert body["counts"] == {"indexed": 5, "failed": 1, "missing": 0}
    assert body["model"] == service.index.model and body["index_type"] == "Flat" and body["consistent"]
    assert body["vectors_in_index"] == 5 and body["home"] == str(home) and body["indexing"] is False
    assert body["failures_total"] == 1 and body["failures"][0]["path"].endswith("broken.jpg")
    assert body["failures"][0]["reason"] and body["thumbnail_bytes"] > 0


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"q": ""}, "empty"),
        ({}, "empty"),
        ({"q": "x", "k": "abc"}, "k must be a whole number"),
        ({"q": "x", "k": "0"}, "k must be between 1 and 200"),
        ({"q": "x", "k": "201"}, "k must be between"),
        ({"q": "x", "offset": "-1"}, "offset must be between"),
        ({"q": "x", "offset": "1e9"}, "offset must be a whole number"),
        ({"q": "x", "min_score": "high"}, "min_score must be a number"),
        ({"q": "x", "min_score": "nan"}, "min_score must be between"),
        ({"q": "x", "min_score": "2"}, "min_score must be between"),
        ({"q": "x", "under": "relative/dir"}, "absolute"),
        ({"q": "x -nan:y"}, "refinement"),
        ({"q": "x -1:x"}, "cancel out"),
    ],
)
def test_bad_parameters_get_a_one_line_400(served, params, message):
    client, _, _ = served
    assert message in error(client.get("/api/search", params=params), 400)


def test_a_parameter_that_is_not_utf8_is_a_400(served):
    """Starlette reads such bytes as U+FFFD: Latin-1's ``q=caf%E9`` had been searched for "caf"
    and a replacement character, answered 200 with hits that had nothing to do with café."""
    client, service, _ = served
    any_id = next(iter(ids_by_path(service).values()))
    for url, name in [
        ("/api/search?q=caf%E9", "q"),
        ("/api/search?q=x&under=/photos/caf%E9", "under"),
        ("/api/search?q=%FF%FE&k=5", "q"),
        ("/api/search?q=x&%E9=1", "\ufffd"),
        (f"/api/similar/{any_id}?q=caf%E9", "q"),
        ("/api/search/image?q=caf%E9", "q"),
    ]:
        response = client.post(url, content=b"") if "image" in url else client.get(url)
        assert error(response, 400) == f"{name} is not UTF-8 text: percent-encode its UTF-8 bytes (é is %C3%A9)."
    # The same words in UTF-8 are searched, with or without + for spaces.
    assert ok(client.get("/api/search?q=caf%C3%A9+%E6%97%A5%E6%9C%AC%20%F0%9F%98%80&k=3"))["hits"]


def test_bad_uploads(served):
    client, _, library = served
    assert "empty" in error(client.post("/api/search/image", content=b""), 400)
    assert "not an image" in error(client.post("/api/search/image", content=b"hello, world" * 10), 400)
    truncated = library[-1].read_bytes()[:600]
    assert error(client.post("/api/search/image", content=truncated), 400)
    megapixels = decompression_bomb(10_000, 10_000)  # 100 MP: over our cap, under Pillow's own
    assert "10000 x 10000 pixels" in error(client.post("/api/search/image", content=megapixels), 413)
    assert "megapixels" in error(client.post("/api/search/image", content=decompression_bomb()), 413)
    assert error(client.get("/api/search/image"), 405)


def form(parts: list[tuple[str, str | None, bytes]], boundary: str = "xYz'()+_,-./:=?") -> bytes:
    """A multipart/form-data body of (name, filename, content) parts, as a browser writes it."""
    out = b"preamble, to be ignored\r\n"
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_a_large_form_is_parsed_in_about_its_own_size(monkeypatch):
    image = bytes(range(256)) * 80_000 + b"\r\n--xYz"  # 20 MB, and a near-delimiter inside
    body = form([("q", None, "sunset à".encode()), ("image", "big.png", image)])
    tracemalloc.start()
    try:
        data, text = from_form('multipart/form-data; boundary="xYz\'()+_,-./:=?"', body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (data, text) == (image, "sunset à")
    assert peak < 1.2 * len(image)  # the file part, sliced once (the email parser: ~10 times)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", form([("image", "a.png", b"x")])),  # no boundary
        ("multipart/form-data; boundary=other", form([("image", "a.png", b"x")])),
        ('multipart/form-data; boundary="xYz\'()+_,-./:=?"', form([("image", "a.png", b"x")])[:-10]),  # cut short
        ("multipart/form-data; boundary=B", b"--B\r\nContent-Disposition: form-data; name=image; filename=a\r\n"),
        ("multipart/form-data; boundary=B", form([("f", f"{i}.png", b"x") for i in range(20)], "B")),
        # a part whose header lines never end: 30 MB of them had taken 15 s and 1 GB to parse
        (
            "multipart/form-data; boundary=B",
            b"--B\r\nContent-Disposition: form-data; name=image; filename=a.png\r\n"
            + b"X-A: b\r\n" * 3000
            + b"\r\nx\r\n--B--\r\n",
        ),
    ],
)
def test_malformed_forms_are_refused(content_type, body):
    with pytest.raises(RequestError, match="form"):
        from_form(content_type, body)


def test_a_form_with_bare_lf_line_ends_is_told_so():
    """A form written by hand (a script's string, a file saved on Unix) had been told its parts
    lacked their closing boundary, which they had."""
    body = form([("image", "a.png", b"x"), ("q", None, b"sunset")], "B").replace(b"\r\n", b"\n")
    with pytest.raises(RequestError, match="its lines end in LF, where multipart/form-data needs CRLF"):
        from_form("multipart/form-data; boundary=B", body)


def test_uploads_are_decoded_at_most_one_per_cpu_at_once(served, monkeypatch):
    _, service, library = served
    data, at_once, most = library[4].read_bytes(), [0], [0]
    real = service_module.open_upload

    def counted(*args, **kwargs):
        at_once[0] += 1
        most[0] = max(most[0], at_once[0])
        time.sleep(0.2)
        at_once[0] -= 1
        return real(*args, **kwargs)

    monkeypatch.setattr(service_module, "open_upload", counted)
    monkeypatch.setattr(service, "_decoding", threading.BoundedSemaphore(2), raising=False)  # 2 CPUs
    threads = [threading.Thread(target=service.search_image, args=(data, "", Page(k=2))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 2


def test_uploads_are_capped_in_bytes(served):
    _, service, library = served
    client = client_for(service, max_bytes=1000)
    big = library[-1].read_bytes()
    assert len(big) > 1000
    assert "larger than" in error(client.post("/api/search/image", content=big), 413)

    def chunks():  # no Content-Length: the cap applies while reading
        yield big[:800]
        yield big[800:]

    assert "larger than" in error(client.post("/api/search/image", content=chunks()), 413)
    assert ok(client.post("/api/search/image", content=library[0].read_bytes()))["hits"]


def test_a_bug_is_a_500_without_traceback_and_the_server_goes_on(served, monkeypatch):
    client, service, _ = served

    def broken(*args, **kwargs):
        raise ZeroDivisionError("secret internals")

    monkeypatch.setattr(service.index, "status", broken)
    message = error(client.get("/api/status"), 500)
    assert "secret" not in message and "ZeroDivisionError" not in message
    monkeypatch.undo()
    assert ok(client.get("/api/status"))["counts"]
    assert error(client.get("/api/nowhere"), 404)


def test_bad_requests_are_answered_not_raised_to_the_server(served):
    """A bad request is the client's: answered with its 4xx, never handed on to the server,
    which would print its traceback on the terminal of `clipsearch serve` each time."""
    _, service, _ = served
    client = TestClient(create_app(service), base_url=LOCAL)  # raises whatever reaches the server
    assert "empty" in error(client.get("/api/search", params={"q": ""}), 400)
    assert error(client.get("/api/thumbnail/999999"), 404)
    assert "not an image" in error(client.post("/api/search/image", content=b"hello, world" * 10), 400)


def test_the_server_keeps_serving_after_bad_requests(served):
    client, _, _ = served
    for _ in range(3):
        client.post("/api/search/image", content=decompression_bomb())
        client.get("/api/search", params={"k": "x"})
        client.get("/api/original/%2e%2e")
    assert ok(client.get("/api/search", params={"q": "x", "k": 2}))["hits"]


# --- access ----------------------------------------------------------------------------------


def test_without_a_token_only_loopback_names_are_served(served):
    _, service, _ = served
    for base in ("http://127.0.0.1:8765", "http://localhost:8765", "http://[::1]:8765"):
        assert ok(TestClient(create_app(service), base_url=base).get("/api/status"))
    for base in ("http://LocalHost:8765", "http://LOCALHOST"):  # host names have no case
        assert ok(TestClient(create_app(service), base_url=base).get("/api/status"))
    rebound = TestClient(create_app(service), base_url="http://attacker.example:8765")
    assert "127.0.0.1" in error(rebound.get("/api/status"), 400)
    client = TestClient(create_app(service), base_url="http://127.0.0.1:8765")
    for host in ("localhost:evil.example", "127.0.0.1:80:attacker.example", "[::1]evil"):
        assert "127.0.0.1" in error(client.get("/api/status", headers={"host": host}), 400)


def test_a_token_is_required_when_set(served):
    _, service, _ = served
    client = TestClient(create_app(service, token="s3cret"), base_url="http://192.0.2.7:8765")
    assert "token" in error(client.get("/api/status"), 401)
    assert error(client.get("/api/status", params={"token": "wrong"}), 401)
    assert error(client.get("/"), 401)
    assert ok(client.get("/api/status", headers={"Authorization": "Bearer s3cret"}))
    page = client.get("/", params={"token": "s3cret"})  # the printed URL: a cookie carries it on
    assert page.status_code == 200 and "clipsearch_token" in page.headers["set-cookie"]
    assert "HttpOnly" in page.headers["set-cookie"]
    assert ok(client.get("/api/status"))  # the client kept the cookie


def test_the_page_and_its_files_are_served(served):
    client, _, _ = served
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200


# --- concurrency -----------------------------------------------------------------------------


@pytest.mark.slow
def test_requests_at_once_while_an_index_run_commits(tmp_path, tiny_model):
    from reliability_helpers import kill_group, start_cli, wait_until

    home, _ = build(tmp_path, tiny_model, count=4)
    service = Service.open(home, "cpu")
    ids = list(ids_by_path(service).values())
    extra = make_library(tmp_path / "lib" / "more", 40, start_seed=100)
    indexer = start_cli(
        "--home", home, "index", tmp_path / "lib", "--workers", "0", "--batch-size", "4", encode_delay_s=0.05
    )
    failures: list[str] = []
    counts = [0] * 4
    seen_indexing = []

    def client_loop(n: int) -> None:
        client = client_for(service)
        while indexer.poll() is None or counts[n] < 5:
            for response in (
                client.get("/api/search", params={"q": f"query {n}", "k": 20}),
                client.get(f"/api/thumbnail/{ids[n % len(ids)]}"),
            ):
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text[:200]}")
            status = client.get("/api/status")
            seen_indexing.append(status.json()["indexing"] if status.status_code == 200 else None)
            counts[n] += 1

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert indexer.wait(120) == 0, indexer.stderr.read()
    finally:
        kill_group(indexer)
    assert failures == []
    assert True in seen_indexing  # the status panel saw the run going on
    # The new images are found without a restart: the server followed the catalog's generation.
    client = client_for(service)
    assert wait_until(lambda: ok(client.get("/api/status"))["counts"]["indexed"] == 45, timeout=10)
    body = ok(client.post("/api/search/image", params={"k": 1}, content=Path(extra[17]).read_bytes()))
    assert body["hits"][0]["path"] == str(extra[17])
    assert ok(client.get("/api/status"))["indexing"] is False
    service.close()


def test_a_rebuild_by_another_process_is_searched_at_once(fresh):
    client, _, _, home = fresh
    assert ok(client.get("/api/status"))["index_type"] == "Flat"
    with Index.open(home, device="cpu") as index:
        index.rebuild("HNSW32")  # rewrites the vector file alone: the catalog's generation stays
    assert ok(client.get("/api/status"))["index_type"] == "HNSW32"
    hits = ok(client.get("/api/search", params={"q": "a red circle", "k": 3}))["hits"]
    assert len(hits) == 3


def index_with(home: Path, model: str, folder: Path, default: bool = False) -> None:
    with Index.open(home, model=model, device="cpu") as index:
        index.add([folder], workers=0)
        if default:
            index.set_default_model()


def test_a_server_started_without_a_model_follows_the_default_one(fresh, other_tiny_model, tiny_model):
    client, service, library, home = fresh
    index_with(home, other_tiny_model, library[0].parent.parent, default=True)  # as `index --model`
    new = make_image(library[0].parent / "new.png", 77)
    index_with(home, other_tiny_model, library[0].parent)  # as `clipsearch index` with the new default
    status = ok(client.get("/api/status"))
    assert status["model"] == other_tiny_model and status["vectors_in_index"] == len(library) + 1
    assert str(new) in [h["path"] for h in ok(client.get("/api/search", params={"q": "a", "k": 50}))["hits"]]
    assert ok(client.get(f"/api/similar/{ids_by_path(service)[new]}"))["hits"]
    assert ok(client.post("/api/search/image", content=new.read_bytes()))["hits"][0]["path"] == str(new)
    with Index.open(home, model=tiny_model, device="cpu") as index:
        index.set_default_model()
    assert ok(client.get("/api/status"))["model"] == tiny_model


def test_a_model_named_stays_and_its_status_is_served_when_dropped(tmp_path, tiny_model, other_tiny_model):
    home, library = build(tmp_path, tiny_model, count=4)
    service = Service.open(home, "cpu", model=tiny_model)
    try:
        client = client_for(service)
        index_with(home, other_tiny_model, library[0].parent.parent, default=True)
        new = make_image(library[0].parent / "new.png", 77)
        index_with(home, other_tiny_model, library[0].parent)  # by the other model only
        assert ok(client.get("/api/status"))["model"] == tiny_model
        new_id = ids_by_path(service)[new]
        message = error(client.get(f"/api/similar/{new_id}"), 404)
        assert message == f"Image {new_id} has no vector by {tiny_model}, the model served; index it with that model."
        with Index.open(home, model=tiny_model, device="cpu") as index:
            assert index.drop_model()
        status = ok(client.get("/api/status"))
        assert (status["model"], status["index_type"], status["vectors_in_index"]) == (tiny_model, "none", 0)
        message = error(client.get("/api/search", params={"q": "a"}), 503)
        assert f"no vectors by {tiny_model} any more" in message and "restart" in message
        assert error(client.get(f"/api/similar/{new_id}"), 503) == message  # had been a 404 saying to index
    finally:
        service.close()


def test_a_default_model_that_cannot_load_leaves_the_server_on_the_one_it_has(fresh, other_tiny_model, tmp_path):
    """Every request, status too, had failed on it, and tried to load it again."""
    client, service, library, home = fresh
    served = service.index.model
    broken = str(shutil.copytree(other_tiny_model, tmp_path / "broken"))
    index_with(home, broken, library[0].parent.parent, default=True)
    shutil.rmtree(broken)  # the new default's checkpoint is gone
    for _ in range(2):
        assert ok(client.get("/api/status"))["model"] == served
        assert len(ok(client.get("/api/search", params={"q": "a", "k": 3}))["hits"]) == 3
    assert service._unloadable == broken


def test_a_deleted_or_replaced_index_is_a_503_asking_for_a_restart(fresh, tiny_model):
    client, service, library, home = fresh
    image_id = ids_by_path(service)[library[0]]
    urls = ["/api/status", "/api/search?q=a", f"/api/similar/{image_id}", f"/api/original/{image_id}"]
    urls += [f"/api/thumbnail/{image_id}", f"/api/image/{image_id}"]
    assert all(client.get(url).status_code == 200 for url in urls)
    shutil.rmtree(home)
    for url in urls:
        assert "was deleted or replaced since the server started" in error(client.get(url), 503)
    index_with(home, tiny_model, library[0].parent)  # a new index in its place
    for url in urls:
        assert "restart `clipsearch serve`" in error(client.get(url), 503)


def test_the_writer_lock_shows_as_indexing_without_being_taken(tmp_path, monkeypatch):
    import fcntl

    from clipsearch.locks import indexing

    home = tmp_path / "home"
    with Catalog.open(home, create=True) as catalog:
        assert indexing(home) is False
        with catalog.writer_lock():
            calls = []
            monkeypatch.setattr(fcntl, "flock", lambda *args: calls.append(args))
            assert indexing(home) is True
            assert calls == []  # only read: an indexer starting now is never turned away
            monkeypatch.undo()
    assert indexing(home) is False


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    from typer.testing import CliRunner

    from clipsearch.cli import app

    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: `clipsearch serve` needs the web server packages (uvicorn is missing): pip install 'clipsearch[serve]'"
    ]


def test_hit_json_is_the_clis(served):
    _, service, _ = served
    hit = service.index.search("x", k=1)[0]
    assert json.loads(json.dumps(hit.to_json())) == {
        "id": hit.id,
        "path": str(hit.path),
        "score": round(hit.score, 6),
        "width": hit.width,
        "height": hit.height,
        "mtime": hit.mtime,
        "size": hit.size,
        **hit.metadata.to_json(),  # the photo's own facts (clipsearch.photo_meta)
    }
    assert np.isfinite(hit.score)
