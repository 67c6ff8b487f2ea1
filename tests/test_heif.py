"""HEIF/HEIC photos (iPhones' default format) through the `heif` extra, pillow-heif: indexed with
their camera metadata where it is installed; where it is not, each fails with a line naming the
extra, and the rest of the run goes on."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from helpers import make_library
from PIL import Image

from clipsearch import Index
from clipsearch.clip import preprocess
from clipsearch.errors import ImageError
from clipsearch.photo_meta import read_file

pillow_heif = pytest.importorskip("pillow_heif")

_EXIF_ORIENTATION, _EXIF_MAKE, _EXIF_MODEL = 0x0112, 0x010F, 0x0110


def heic(path, seed: int = 0, size: tuple[int, int] = (96, 64)) -> np.ndarray:
    """An iPhone-like photo (camera in its EXIF) at ``path``, and the pixels it was made from."""
    rng = np.random.default_rng(seed)
    pixels = np.kron(
        rng.integers(0, 256, (4, 6, 3), dtype=np.uint8), np.ones((size[1] // 4, size[0] // 6, 1), np.uint8)
    )
    exif = Image.Exif()
    exif[_EXIF_MAKE], exif[_EXIF_MODEL] = "Apple", "iPhone 15"
    path.parent.mkdir(parents=True, exist_ok=True)
    pillow_heif.from_pillow(Image.fromarray(pixels)).save(path, quality=95, exif=exif.tobytes())
    return pixels


@pytest.fixture
def without_heif_opener(monkeypatch):
    """Pillow as it is before pillow-heif registers itself; undone after the test."""
    Image.init()
    forget_heif(monkeypatch)
    yield
    preprocess._heif_registered.cache_clear()


def forget_heif(monkeypatch) -> None:
    monkeypatch.delitem(Image.OPEN, "HEIF", raising=False)
    monkeypatch.setattr(Image, "ID", [format for format in Image.ID if format != "HEIF"])
    preprocess._heif_registered.cache_clear()


def test_a_heic_photo_decodes_to_its_pixels_with_its_camera(tmp_path, without_heif_opener):
    pixels = heic(tmp_path / "IMG_0001.HEIC")
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(tmp_path / "IMG_0001.HEIC")  # Pillow alone cannot
    decoded = np.asarray(preprocess.open_image(tmp_path / "IMG_0001.HEIC"))
    assert decoded.shape == pixels.shape
    assert np.abs(decoded.astype(int) - pixels).mean() < 4  # lossy, but these pixels
    header = read_file(tmp_path / "IMG_0001.HEIC")
    assert (header.width, header.height) == (96, 64)
    assert (header.metadata.camera_make, header.metadata.camera_model) == ("Apple", "iPhone 15")


def test_without_the_extra_a_heic_fails_alone_and_names_the_extra(
    tmp_path, tiny_model, without_heif_opener, monkeypatch
):
    make_library(tmp_path / "lib", 3)
    heic(tmp_path / "lib" / "IMG_0002.heic")
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # not installed
    with pytest.raises(
        ImageError,
        match=r"IMG_0002.heic is a HEIF/HEIC photo, which needs the heif extra: pip install 'clipsearch\[heif\]'",
    ):
        preprocess.open_image(tmp_path / "lib" / "IMG_0002.heic")
    with Index.open(tmp_path / "home", model=tiny_model, device="cpu", precision="fp32") as index:
        report = index.add([tmp_path / "lib"], workers=0)
        failures = index.catalog.failures()
    assert (report.new, report.failed) == (3, 1)
    assert [(path.rsplit(b"/", 1)[-1], "clipsearch[heif]" in reason) for path, reason in failures] == [
        (b"IMG_0002.heic", True)
    ]


def test_heic_photos_are_indexed_beside_others_and_found(tmp_path, tiny_model, without_heif_opener):
    make_library(tmp_path / "lib", 3)
    heic(tmp_path / "lib" / "IMG_0003.heic", seed=5)
    with Index.open(tmp_path / "home", model=tiny_model, device="cpu", precision="fp32") as index:
        report = index.add([tmp_path / "lib"], workers=2)  # decode workers register the opener too
        assert (report.new, report.failed) == (4, 0)
        hits = index.search(tmp_path / "lib" / "IMG_0003.heic", k=1)  # decoded again, here
    assert hits[0].path.name == "IMG_0003.heic" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].metadata.camera_model == "iPhone 15" and (hits[0].width, hits[0].height) == (96, 64)


def test_a_heic_dropped_on_the_web_page(tmp_path, without_heif_opener, monkeypatch):
    pytest.importorskip("starlette")
    from clipsearch.serve.errors import RequestError
    from clipsearch.serve.upload import open_upload

    pixels = heic(tmp_path / "IMG_0004.heic", seed=2)
    data = (tmp_path / "IMG_0004.heic").read_bytes()
    assert np.abs(np.asarray(open_upload(data)).astype(int) - pixels).mean() < 4
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # not installed
    forget_heif(monkeypatch)
    with pytest.raises(RequestError, match=r"^The upload is a HEIF/HEIC photo, which needs the heif extra"):
        open_upload(data)


def test_metadata_read_again_keeps_a_heic_camera_while_the_extra_is_missing(tmp_path, tiny_model, monkeypatch):
    """A reader newer than the one that read a HEIC photo's camera reads it again; without the
    extra it cannot, and what was read stays until it can."""
    import sqlite3

    heic(tmp_path / "lib" / "IMG_0005.heic")
    with Index.open(tmp_path / "home", model=tiny_model, device="cpu", precision="fp32") as index:
        index.add([tmp_path / "lib"], workers=0)
    with sqlite3.connect(tmp_path / "home" / "catalog.db") as db:
        db.execute("UPDATE images SET metadata_version = 1")
    forget_heif(monkeypatch)
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # uninstalled since
    with Index.open(tmp_path / "home", model=tiny_model, device="cpu", precision="fp32") as index:
        assert index.add([tmp_path / "lib"], workers=0).metadata == 0
        assert index.catalog.rows([1])[1].metadata.camera_model == "iPhone 15"
    monkeypatch.undo()
    preprocess._heif_registered.cache_clear()
    with Index.open(tmp_path / "home", model=tiny_model, device="cpu", precision="fp32") as index:
        assert index.add([tmp_path / "lib"], workers=0).metadata == 1
        assert index.catalog.without_metadata() == []
        assert index.catalog.rows([1])[1].metadata.camera_model == "iPhone 15"
