"""What a photo says about itself: when, with what, where, from the header alone.

Read once, while the file is open for decoding, or for a file indexed before the catalog had
these columns, by opening its header without decoding the pixels. EXIF is written by thousands
of devices and editors, many of them carelessly: every field is read on its own, and one that is
missing, malformed or absurd is recorded as absent. Reading metadata never fails an image.

The date taken is EXIF DateTimeOriginal with OffsetTimeOriginal, else DateTime with OffsetTime,
else unknown: never the file's mtime, which says when it was copied, not when it was taken.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple

from clipsearch.records import PhotoMeta

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

# EXIF tag numbers (Pillow's ExifTags names them; numbers keep this module free of its import).
_MAKE, _MODEL, _ORIENTATION, _DATETIME = 0x010F, 0x0110, 0x0112, 0x0132
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_DATETIME_ORIGINAL, _OFFSET_TIME, _OFFSET_TIME_ORIGINAL = 0x9003, 0x9010, 0x9011
_LENS_MAKE, _LENS_MODEL = 0xA433, 0xA434
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON = 1, 2, 3, 4

_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height
_MAX_TEXT = 128  # a camera name longer than this is garbage, not a name
_MAX_EXIF = 1 << 20  # EXIF fits 64 KiB in a JPEG; a PNG's larger than this is not one
_MAX_PNG_CHUNKS = 100_000  # 8 KiB IDAT chunks of a 100-MP photo number ~40k: more is garbage
_DATE = re.compile(r"\s*(\d{4})[:-](\d{2})[:-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET = re.compile(r"\s*(?:([+-])(\d{1,2}):?(\d{2})|[Zz])\s*$")


class Header(NamedTuple):
    width: int  # as the photo is shown: EXIF rotation applied
    height: int
    metadata: PhotoMeta


def read(image: Image.Image) -> PhotoMeta:
    """What an image Pillow has opened says about itself, without decoding its pixels to find
    out: the EXIF of a PNG that keeps it after its pixels counts once the image is loaded."""
    fields: dict[str, object] = {"format": image.format}
    try:
        exif = image.getexif() if image.format != "PNG" or "exif" in image.info else None
    except Exception as e:  # malformed EXIF: the pixels are fine, the metadata is absent
        log.debug("unreadable EXIF in %s: %s", _name(image), e)
        exif = None
    if exif is not None:
        for part in (_orientation, _camera, _date, _place):
            try:
                fields.update(part(exif))
            except Exception as e:
                log.debug("ignoring unreadable EXIF %s in %s: %s", part.__name__.strip("_"), _name(image), e)
    return PhotoMeta(**fields)  # type: ignore[arg-type]


def read_file(path: str | os.PathLike[str] | bytes) -> Header:
    """The size as shown and the metadata of ``path``, from its header alone (opened as the
    indexer opens files: `open_regular`). Raises OSError (Pillow's UnidentifiedImageError among
    them) when it is not an image that can be opened."""
    from clipsearch.clip.preprocess import open_pillow
    from clipsearch.fingerprint import open_regular

    with open_regular(path) as f, open_pillow(f, os.fsdecode(path)) as image:
        if image.format == "PNG" and "exif" not in image.info:
            exif = _png_exif_after_pixels(f.fileno())
            if exif is not None:
                image.info["exif"] = b"Exif\x00\x00" + exif  # as Pillow keeps a PNG's eXIf once loaded
        metadata = read(image)
        width, height = image.size
    if metadata.orientation in _TRANSPOSED:
        width, height = height, width
    return Header(width, height, metadata)


def _png_exif_after_pixels(fd: int) -> bytes | None:
    """The eXIf chunk of a PNG that writes it after its image data, found by stepping over the
    chunks' headers (8 bytes each, read without a buffer) rather than by decoding the pixels as
    Pillow would; None where there is none, or where the chunks are not what they say."""
    at = 8  # past the signature
    for _ in range(_MAX_PNG_CHUNKS):
        head = os.pread(fd, 8, at)
        if len(head) < 8 or head[4:] == b"IEND":
            return None
        length = int.from_bytes(head[:4], "big")
        if head[4:] == b"eXIf":
            if length > _MAX_EXIF:
                return None
            data = os.pread(fd, length, at + 8)
            return data if len(data) == length else None
        at += 12 + length  # length, type, data, CRC
    return None


def _name(image: Image.Image) -> str:
    return str(getattr(image, "filename", "") or "image")


def _orientation(exif: Image.Exif) -> dict[str, object]:
    value = exif.get(_ORIENTATION)
    return {"orientation": value} if isinstance(value, int) and 1 <= value <= 8 else {}


def _camera(exif: Image.Exif) -> dict[str, object]:
    sub = exif.get_ifd(_EXIF_IFD)
    return {
        "camera_make": _text(exif.get(_MAKE)),
        "camera_model": _text(exif.get(_MODEL)),
        "lens": _text(sub.get(_LENS_MODEL)) or _text(sub.get(_LENS_MAKE)),
    }


def _date(exif: Image.Exif) -> dict[str, object]:
    """DateTimeOriginal (in the EXIF IFD where it belongs, or in IFD0 where some writers put it)
    with its offset; else DateTime with its own. An offset never pairs with the other date."""
    sub = exif.get_ifd(_EXIF_IFD)
    candidates = (
        (sub.get(_DATETIME_ORIGINAL), sub.get(_OFFSET_TIME_ORIGINAL)),
        (exif.get(_DATETIME_ORIGINAL), exif.get(_OFFSET_TIME_ORIGINAL)),
        (exif.get(_DATETIME), sub.get(_OFFSET_TIME)),
    )
    for stamp, offset in candidates:
        taken = _datetime(stamp)
        if taken is not None:
            return {"taken": taken, "taken_offset": _offset(offset)}
    return {}


def _datetime(value: object) -> str | None:
    """EXIF's "YYYY:MM:DD HH:MM:SS" as "YYYY-MM-DDTHH:MM:SS"; None for blanks, zeros and
    impossible dates (cameras write "0000:00:00 00:00:00" when the clock was never set)."""
    match = _DATE.match(_text(value) or "")
    if match is None:
        return None
    year, month, day, hour, minute, second = map(int, match.groups())
    try:
        return datetime(year, month, day, hour, minute, second).isoformat()
    except ValueError:
        return None


def _offset(value: object) -> int | None:
    """ "+02:00" (or "+2:00", "+0200", "Z") as minutes east of UTC; None for anything else, or
    beyond ±14 hours."""
    match = _OFFSET.match(_text(value) or "")
    if match is None:
        return None
    sign, hours, minutes = match.groups("0")  # "Z": UTC
    total = int(hours) * 60 + int(minutes)
    if int(minutes) >= 60 or total > 14 * 60:
        return None
    return -total if sign == "-" else total


def _place(exif: Image.Exif) -> dict[str, object]:
    """GPS latitude and longitude in degrees. Both or neither: half a position is none, and so
    is (0, 0), which receivers write when they have no fix."""
    gps = exif.get_ifd(_GPS_IFD)
    latitude = _degrees(gps.get(_GPS_LAT), gps.get(_GPS_LAT_REF), "S", 90)
    longitude = _degrees(gps.get(_GPS_LON), gps.get(_GPS_LON_REF), "W", 180)
    if latitude is None or longitude is None or (latitude == 0 and longitude == 0):
        return {}
    return {"latitude": latitude, "longitude": longitude}


def _degrees(value: object, ref: object, negative: str, limit: float) -> float | None:
    """(degrees, minutes, seconds) rationals, or one number, signed by the N/S or E/W reference."""
    parts = value if isinstance(value, tuple) else (value,)
    if not 1 <= len(parts) <= 3:
        return None
    try:
        numbers = [float(part) for part in parts]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if any(not 0 <= number < 60 for number in numbers[1:]):  # minutes and seconds
        return None
    total = sum(number / 60**i for i, number in enumerate(numbers))
    if not math.isfinite(total) or abs(total) > limit:
        return None
    if (_text(ref) or "").upper().startswith(negative):
        total = -abs(total)
    return round(total, 7)  # ~1 cm: what a float's tail adds beyond that is noise


def _text(value: object) -> str | None:
    """An EXIF string, trimmed of the NULs and spaces writers pad with, its tabs and line ends
    made spaces; None when empty or not text. EXIF says ASCII and Pillow reads Latin-1, but
    phones and editors write UTF-8 ("Zé", "Ⅲ"): bytes that are valid UTF-8 are read as such."""
    if isinstance(value, str):
        with contextlib.suppress(UnicodeEncodeError):  # else more than Latin-1: decoded by one who knew
            value = value.encode("latin-1")
    if isinstance(value, bytes):
        raw = value
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            value = raw.decode("latin-1")
    if not isinstance(value, str):
        return None
    value = " ".join(value.replace("\x00", " ").split())
    return value[:_MAX_TEXT] if value and value.isprintable() else None
