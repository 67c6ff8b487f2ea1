"""Photo metadata: read from the header, never failing an image, stored once, filled in for
rows indexed before it was recorded without re-encoding anything."""

import os
import sqlite3
import struct

import pytest
from alembic import command
from helpers import make_image, make_photo
from PIL import Image
from test_migrations import migrate

from clipsearch import photo_meta
from clipsearch.filters import Filters
from clipsearch.index import Index
from clipsearch.records import PhotoMeta

PIXEL = dict(make="Google", model="Pixel 7", lens="Pixel 7 back camera")


def meta(path) -> PhotoMeta:
    return photo_meta.read_file(path).metadata


def test_a_camera_jpeg_gives_every_field(tmp_path):
    path = make_photo(
        tmp_path / "a.jpg",
        size=(60, 40),
        taken="2019:07:04 10:30:00",
        offset="+02:00",
        gps=(48.858233, 2.2945),
        orientation=6,
        **PIXEL,
    )
    header = photo_meta.read_file(path)
    assert (header.width, header.height) == (40, 60)  # orientation 6: shown rotated
    m = header.metadata
    assert (m.format, m.orientation, m.taken, m.taken_offset) == ("JPEG", 6, "2019-07-04T10:30:00", 120)
    assert m.taken_iso == "2019-07-04T10:30:00+02:00"
    assert (m.camera_make, m.camera_model, m.lens) == ("Google", "Pixel 7", "Pixel 7 back camera")
    assert m.latitude == pytest.approx(48.858233, abs=1e-5) and m.longitude == pytest.approx(2.2945, abs=1e-5)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_in_png_and_webp_is_read(tmp_path, fmt):
    m = meta(make_photo(tmp_path / f"a.{fmt.lower()}", taken="2020:01:02 03:04:05", make="Canon", fmt=fmt))
    assert (m.format, m.taken, m.camera_make) == (fmt, "2020-01-02T03:04:05", "Canon")


@pytest.mark.parametrize(
    "offset, minutes",
    [
        ("+02:00", 120),
        ("-05:30", -330),
        ("+00:00", 0),
        ("+14:00", 840),
        ("+5:30", 330),
        ("+0530", 330),
        ("Z", 0),
        ("z", 0),
        ("+25:00", None),
        ("+02:75", None),
        ("x", None),
    ],
)
def test_timezone_offsets_are_minutes_east_of_utc_and_nonsense_is_dropped(tmp_path, offset, minutes):
    m = meta(make_photo(tmp_path / "a.jpg", taken="2019:07:04 23:30:00", offset=offset))
    assert (m.taken, m.taken_offset) == ("2019-07-04T23:30:00", minutes)  # the local time is kept either way


def test_without_date_taken_the_datetime_tag_is_used_with_its_own_offset(tmp_path):
    m = meta(make_photo(tmp_path / "a.jpg", datetime="2018:12:31 22:00:01", datetime_offset="-08:00", offset="+09:00"))
    assert (m.taken, m.taken_offset, m.taken_iso) == ("2018-12-31T22:00:01", -480, "2018-12-31T22:00:01-08:00")


@pytest.mark.parametrize("stamp", ["0000:00:00 00:00:00", "    :  :     :  :  ", "2019:02:30 10:00:00", "yesterday"])
def test_impossible_dates_are_absent_and_never_replaced_by_the_mtime(tmp_path, stamp):
    m = meta(make_photo(tmp_path / "a.jpg", taken=stamp, make="Nikon"))
    assert (m.taken, m.taken_offset, m.camera_make) == (None, None, "Nikon")


def test_a_file_without_metadata_has_only_its_format(tmp_path):
    m = meta(make_image(tmp_path / "a.png", 0))
    assert m == PhotoMeta(format="PNG")
    assert m.known == 1


@pytest.mark.parametrize(
    "gps, expected",
    [((-33.8568, 151.2153), (-33.8568, 151.2153)), ((40.7, -74.0), (40.7, -74.0)), ((0.0, 0.0), (None, None))],
)
def test_gps_signs_follow_the_references_and_no_fix_is_absent(tmp_path, gps, expected):
    m = meta(make_photo(tmp_path / "a.jpg", gps=gps))
    assert (m.latitude, m.longitude) == tuple(pytest.approx(v, abs=1e-5) if v is not None else None for v in expected)


def test_camera_names_in_utf8_or_with_tabs_read_as_written(tmp_path):
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "EOS\t5D  ", "Ricoh GR Ⅲ".encode()  # Pillow reads bytes as Latin-1
    exif.get_ifd(0x8769)[0xA434] = "Zé".encode("latin-1")  # not UTF-8: Latin-1 it stays
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg", exif=exif)
    m = meta(tmp_path / "a.jpg")
    assert (m.camera_make, m.camera_model, m.lens) == ("EOS 5D", "Ricoh GR Ⅲ", "Zé")


def test_gps_minutes_or_seconds_of_60_or_more_are_absent(tmp_path):
    assert meta(make_photo(tmp_path / "a.jpg", gps=(48.5, 2.25))).latitude == pytest.approx(48.5, abs=1e-5)
    from PIL.TiffImagePlugin import IFDRational

    exif = Image.Exif()
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2], gps[3], gps[4] = "N", (IFDRational(48), IFDRational(75), IFDRational(0)), "E", (IFDRational(2),)
    Image.new("RGB", (8, 8)).save(tmp_path / "b.jpg", exif=exif)
    assert (meta(tmp_path / "b.jpg").latitude, meta(tmp_path / "b.jpg").longitude) == (None, None)


def test_gps_with_a_zero_denominator_is_absent_and_the_rest_is_kept(tmp_path):
    from PIL.TiffImagePlugin import IFDRational

    exif = Image.Exif()
    exif[0x010F] = "Apple"
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2], gps[3], gps[4] = "N", (IFDRational(1, 0), IFDRational(0), IFDRational(0)), "E", (IFDRational(2),)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg", exif=exif)
    m = meta(tmp_path / "a.jpg")
    assert (m.camera_make, m.latitude, m.longitude) == ("Apple", None, None)


def broken_exif_jpeg(path, seed=0) -> bytes:
    """A JPEG whose EXIF block claims tags that run past its end: Pillow warns or raises."""
    make_photo(path, seed, taken="2019:07:04 10:30:00", make="Google", orientation=6)
    data = bytearray(path.read_bytes())
    start = data.find(b"Exif\x00\x00") + 6
    data[start + 8 : start + 40] = b"\xff" * 32  # IFD0's entry count and first entries
    path.write_bytes(bytes(data))
    return bytes(data)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_broken_exif_is_absent_and_the_size_is_still_read(tmp_path):
    broken_exif_jpeg(tmp_path / "a.jpg")
    header = photo_meta.read_file(tmp_path / "a.jpg")
    assert (header.width, header.height) == (48, 40)
    assert header.metadata.format == "JPEG" and header.metadata.taken is None


def test_reading_metadata_never_fails_an_image(tmp_path, monkeypatch, tiny_model):
    """Even a reader that raises on every EXIF part leaves the images indexed, metadata absent."""
    broken_exif_jpeg(tmp_path / "lib" / "broken.jpg")
    make_photo(tmp_path / "lib" / "fine.jpg", 1, taken="2021:05:06 07:08:09")

    def boom(exif):
        raise SyntaxError("not EXIF after all")

    monkeypatch.setattr(photo_meta, "_place", boom)
    with Index.open(tmp_path / "home", model=tiny_model) as index:
        report = index.add([tmp_path / "lib"], workers=0)
        rows = index.catalog.rows(range(1, 3))
    assert (report.new, report.failed) == (2, 0)
    by_name = {os.path.basename(r.path): r.metadata for r in rows.values()}
    assert by_name[b"broken.jpg"] == PhotoMeta(format="JPEG")
    assert by_name[b"fine.jpg"].taken == "2021-05-06T07:08:09"


def test_index_records_the_metadata_with_the_row(tmp_path, tiny_model):
    make_photo(tmp_path / "lib" / "a.jpg", 0, taken="2019:07:04 10:30:00", offset="-04:00", orientation=8, **PIXEL)
    with Index.open(tmp_path / "home", model=tiny_model) as index:
        index.add([tmp_path / "lib"], workers=0)
        (row,) = index.catalog.rows([1]).values()
    assert (row.width, row.height) == (40, 48)
    assert row.metadata == PhotoMeta("JPEG", 8, "2019-07-04T10:30:00", -240, "Google", "Pixel 7", "Pixel 7 back camera")


def test_a_copy_that_reuses_a_vector_still_gets_its_own_metadata(tmp_path, tiny_model, encoded):
    make_photo(tmp_path / "lib" / "a.jpg", 0, taken="2019:07:04 10:30:00")
    with Index.open(tmp_path / "home", model=tiny_model) as index:
        index.add([tmp_path / "lib"], workers=0)
        (tmp_path / "lib" / "copy.jpg").write_bytes((tmp_path / "lib" / "a.jpg").read_bytes())
        report = index.add([tmp_path / "lib"], workers=0)
        rows = index.catalog.rows([1, 2])
    assert (report.moved, report.copied) == (0, 1) and sum(encoded) == 1
    assert rows[2].path.endswith(b"copy.jpg") and rows[2].metadata.taken == "2019-07-04T10:30:00"


def png_with_exif_after_its_pixels(path):
    """A PNG whose eXIf chunk follows its IDAT, as some editors write it: only decoding finds it."""
    make_photo(path, 0, size=(48, 40), taken="2014:04:04 04:04:04", make="Fujifilm", orientation=6, fmt="PNG")
    data = path.read_bytes()
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        chunks.append(data[at : at + 12 + length])
        at += 12 + length
    exif = next(c for c in chunks if c[4:8] == b"eXIf")
    rest = [c for c in chunks if c is not exif]
    path.write_bytes(data[:8] + b"".join(rest[:-1]) + exif + rest[-1])  # before IEND
    with Image.open(path) as image:
        assert "exif" not in image.info  # Pillow finds it only once the pixels are decoded


def test_the_header_read_finds_a_png_exif_after_its_pixels_without_decoding_them(tmp_path, monkeypatch):
    png_with_exif_after_its_pixels(tmp_path / "a.png")
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded the pixels"))
    header = photo_meta.read_file(tmp_path / "a.png")
    assert (header.width, header.height) == (40, 48)  # orientation 6: shown turned
    assert (header.metadata.taken, header.metadata.camera_make, header.metadata.orientation) == (
        "2014-04-04T04:04:04",
        "Fujifilm",
        6,
    )


def test_a_png_whose_chunks_lie_about_their_length_has_no_metadata(tmp_path):
    png_with_exif_after_its_pixels(tmp_path / "a.png")
    data = bytearray((tmp_path / "a.png").read_bytes())
    at = data.index(b"eXIf") - 4
    data[at : at + 4] = (1 << 31).to_bytes(4, "big")  # far past the file's end, and EXIF's size
    (tmp_path / "a.png").write_bytes(bytes(data))
    assert photo_meta.read_file(tmp_path / "a.png").metadata == PhotoMeta(format="PNG")


def test_a_copy_takes_what_decoding_its_bytes_found_not_what_its_header_says(tmp_path, tiny_model, encoded):
    png_with_exif_after_its_pixels(tmp_path / "lib" / "a.png")
    with Index.open(tmp_path / "home", model=tiny_model) as index:
        index.add([tmp_path / "lib"], workers=0)
        (tmp_path / "lib" / "copy.png").write_bytes((tmp_path / "lib" / "a.png").read_bytes())
        report = index.add([tmp_path / "lib"], workers=0)
        original, copy = index.catalog.rows([1, 2]).values()
    assert (report.moved, report.copied) == (0, 1) and sum(encoded) == 1
    assert (original.width, original.height, original.metadata.taken) == (40, 48, "2014-04-04T04:04:04")
    assert (copy.width, copy.height, copy.metadata) == (original.width, original.height, original.metadata)


def test_an_index_from_before_metadata_gains_it_without_reencoding(tmp_path, tiny_model, encoded):
    lib = tmp_path / "lib"
    make_photo(lib / "a.jpg", 0, taken="2019:07:04 10:30:00", make="Google")
    make_photo(lib / "sub" / "b.jpg", 1, gps=(10.5, -20.25))
    make_image(lib / "c.png", 2)
    broken_exif_jpeg(lib / "d.jpg", 3)
    home = tmp_path / "home"
    with Index.open(home, model=tiny_model) as index:
        index.add([lib], workers=0)
    migrate(home / "catalog.db", "0004", command.downgrade)
    encoded.clear()
    with Index.open(home, model=tiny_model) as index:
        assert len(index.catalog.without_metadata()) == 4  # upgraded: nothing known yet...
        listed = index.search(None, filters=Filters(extensions=("png",)))
        assert [h.path.name for h in listed] == ["c.png"]  # ...but the extension, from the path
        hits_before = index.search("x", k=4)
        report = index.add([lib / "sub"], workers=0)  # only the files under the roots walked
        assert report.metadata == 1 and len(index.catalog.without_metadata()) == 3
        report = index.add([lib], workers=0)
        assert (report.metadata, report.new, report.changed, report.unchanged) == (3, 0, 0, 4)
        assert index.catalog.without_metadata() == []
        assert index.add([lib], workers=0).metadata == 0  # read once
        metadata = {os.path.basename(r.path): r.metadata for r in index.catalog.rows(range(1, 5)).values()}
        assert [h.path for h in index.search("x", k=4)] == [h.path for h in hits_before]
    assert encoded == []
    assert metadata[b"a.jpg"].taken == "2019-07-04T10:30:00" and metadata[b"a.jpg"].camera_make == "Google"
    assert (metadata[b"b.jpg"].latitude, metadata[b"b.jpg"].longitude) == (10.5, -20.25)
    assert metadata[b"c.png"] == PhotoMeta(format="PNG") and metadata[b"d.jpg"] == PhotoMeta(format="JPEG")


def test_filling_in_metadata_does_not_touch_the_vectors_generation(tmp_path, tiny_model):
    make_photo(tmp_path / "lib" / "a.jpg", 0, taken="2019:07:04 10:30:00")
    home = tmp_path / "home"
    with Index.open(home, model=tiny_model) as index:
        index.add([tmp_path / "lib"], workers=0)
    with sqlite3.connect(home / "catalog.db") as db:
        db.execute("UPDATE images SET metadata_version = NULL, taken = NULL")
    with Index.open(home, model=tiny_model) as index:
        generation = index.catalog.generation
        assert index.add([tmp_path / "lib"], workers=0).metadata == 1
        assert index.catalog.generation == generation
        assert index.catalog.rows([1])[1].metadata.taken == "2019-07-04T10:30:00"


def test_rows_read_by_an_older_reader_are_read_again_once(tmp_path, tiny_model, encoded):
    """What the reader of version 1 got wrong (camera names in UTF-8 read as Latin-1, here) is
    put right by the next run, from the headers alone."""
    make_photo(tmp_path / "lib" / "a.jpg", 0, make="Zeiß".encode())  # type: ignore[arg-type]
    png_with_exif_after_its_pixels(tmp_path / "lib" / "b.png")
    home = tmp_path / "home"
    with Index.open(home, model=tiny_model) as index:
        index.add([tmp_path / "lib"], workers=0)
    with sqlite3.connect(home / "catalog.db") as db:
        db.execute("UPDATE images SET metadata_version = 1, camera_make = 'ZeiÃ\x9f' WHERE id = 1")
        db.execute("UPDATE images SET metadata_version = 1")
    encoded.clear()
    with Index.open(home, model=tiny_model) as index:
        assert index.add([tmp_path / "lib"], workers=0).metadata == 2
        assert index.add([tmp_path / "lib"], workers=0).metadata == 0
        rows = index.catalog.rows([1, 2])
    assert encoded == []
    assert rows[1].metadata.camera_make == "Zeiß"
    assert (rows[2].metadata.taken, rows[2].metadata.camera_make) == ("2014-04-04T04:04:04", "Fujifilm")
