"""Which photos a search may return, by what they say about themselves: when, with which
camera, where, what kind of file, how large; and the orders hits can be listed in.

A `Filters` gives the values of the catalog's one filtered read (`sql_values`), so that the
catalog hands the vector search the ids that pass and FAISS skips the others
(`VectorIndex.search`'s ``among``); the one test SQL cannot make exactly, distance on the globe,
narrows to a bounding box there and finishes in NumPy (`within_radius`).

Dates compare with the local time a photo was taken, as people write them: "2019",
"2019-06", "2019-06-01", "2019-06-01T10:30". ``after`` starts at the start of what it names,
``before`` stops at the start of what it names: ``after="2019-06", before="2019-09"`` is June,
July and August. A photo without a date taken passes no date filter.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import cast

import numpy as np

SORTS = ("score", "date", "-date", "path")
EARTH_RADIUS_KM = 6371.0088
DEFAULT_NEAR_KM = 10.0
_SQLITE_LARGEST = 2**63 - 1  # the largest integer SQLite binds
# Spellings of one format: asking for one finds the other.
_SAME_EXTENSION = {"jpg": "jpeg", "jpeg": "jpg", "tif": "tiff", "tiff": "tif", "heic": "heif", "heif": "heic"}
_WHEN = re.compile(r"(\d{4})(?:-(\d{1,2})(?:-(\d{1,2})(?:[T ](\d{1,2}):(\d{2})(?::(\d{2}))?)?)?)?")
_EXTENSION = re.compile(r"[a-z0-9]{1,10}")


@dataclass(frozen=True)
class Filters:
    """What a hit must have. Every field left at its default lets everything through.

    ``after``/``before`` take dates as people write them (see the module) or `date`/`datetime`
    objects; ``camera`` is a case-insensitive part of "make model"; ``near`` is (latitude,
    longitude) or (latitude, longitude, km), 10 km by default; ``extensions`` are file name
    extensions without the dot; ``min_width`` is in pixels as the photo is shown.
    """

    after: str | date | None = None
    before: str | date | None = None
    camera: str | None = None
    near: tuple[float, ...] | None = None
    extensions: tuple[str, ...] = ()
    min_width: int | None = None
    # The bounds as the catalog compares them: "YYYY-MM-DDTHH:MM:SS".
    _after: str | None = field(init=False, repr=False, compare=False, default=None)
    _before: str | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        """Check everything once, here: a bad value is a ValueError that names it, a value of
        the wrong type a TypeError."""
        object.__setattr__(self, "_after", None if self.after is None else start_of(self.after))
        object.__setattr__(self, "_before", None if self.before is None else start_of(self.before))
        if self._after is not None and self._before is not None and self._after >= self._before:
            raise ValueError(f"after ({self.after}) is not earlier than before ({self.before}): no photo can pass")
        if self.camera is not None:
            if not isinstance(self.camera, str):
                raise TypeError(f"camera is a part of a make or model, a str; got {self.camera!r}")
            if not self.camera.strip():
                raise ValueError("camera is blank; give a part of a camera's make or model, e.g. pixel")
            object.__setattr__(self, "camera", self.camera.strip())
        if self.near is not None:
            if isinstance(self.near, str) or not all(isinstance(v, numbers.Real) for v in self.near):
                raise TypeError(f"near is numbers: (latitude, longitude[, km]); got {self.near!r}")
            if len(self.near) not in (2, 3):
                raise ValueError(f"near: expected LAT,LON or LAT,LON,KM, got {self.near!r}")
            object.__setattr__(self, "near", tuple(float(v) for v in self.near))
            lat, lon, km = (*self.near, DEFAULT_NEAR_KM)[:3]
            if not (-90 <= lat <= 90 and -180 <= lon <= 180 and 0 < km < math.inf):
                raise ValueError(f"near: latitude -90..90, longitude -180..180, km > 0; got {lat}, {lon}, {km}")
        extensions = (self.extensions,) if isinstance(self.extensions, str) else self.extensions
        object.__setattr__(self, "extensions", _normalised_extensions(extensions))
        if self.min_width is not None and (not isinstance(self.min_width, int) or isinstance(self.min_width, bool)):
            raise TypeError(f"min_width is a number of pixels, an int; got {self.min_width!r}")
        if self.min_width is not None and self.min_width < 0:
            raise ValueError(f"min_width must be at least 0, got {self.min_width}")
        if self.min_width is not None and self.min_width > _SQLITE_LARGEST:  # as wide passes as few: none
            object.__setattr__(self, "min_width", _SQLITE_LARGEST)

    def __bool__(self) -> bool:
        return any(
            value not in (None, ())
            for value in (self.after, self.before, self.camera, self.near, self.extensions, self.min_width)
        )

    @property
    def radius(self) -> tuple[float, float, float] | None:
        """(latitude, longitude, km) of ``near``, the default radius filled in."""
        if self.near is None:
            return None
        lat, lon, km = (*self.near, DEFAULT_NEAR_KM)[:3]
        return float(lat), float(lon), float(km)

    def sql_values(self) -> dict[str, object]:
        """The values the catalog's filtered read compares its columns with (`Catalog.matching_ids`),
        None for each filter unset. ``near`` gives its bounding box (west and east None near a
        pole, west > east across the antimeridian): `within_radius` finishes the job."""
        wanted = sorted({alias for ext in self.extensions for alias in (ext, _SAME_EXTENSION.get(ext, ext))})
        south, north, west, east = _bounding_box(*self.radius) if self.radius else (None, None, None, None)
        return {
            "taken_from": self._after,
            "taken_until": self._before,
            "camera": "%" + re.sub(r"([\\%_])", r"\\\1", self.camera.casefold()) + "%" if self.camera else None,
            "camera_fold": int(not (self.camera or "").isascii()),
            "min_width": self.min_width,
            "extensions": json.dumps(wanted) if wanted else None,
            "south": south,
            "north": north,
            "west": west,
            "east": east,
        }

    def within_radius(self, latitudes: np.ndarray, longitudes: np.ndarray) -> np.ndarray:
        """Which of these positions lie within ``near``'s radius (all, without ``near``)."""
        if self.radius is None:
            return np.ones(len(latitudes), dtype=bool)
        lat, lon, km = self.radius
        return distance_km(lat, lon, latitudes, longitudes) <= km


def start_of(when: str | date) -> str:
    """The first second of what ``when`` names, as the catalog stores times: "2019-06" →
    "2019-06-01T00:00:00". Raises ValueError for anything else."""
    if isinstance(when, datetime):
        if when.utcoffset() is not None:  # photos' times are their own local times, many without a zone
            raise ValueError(f"{when} has a time zone; dates compare with the local time a photo was taken")
        return when.replace(microsecond=0).isoformat()
    if isinstance(when, date):
        return datetime(when.year, when.month, when.day).isoformat()
    if not isinstance(when, str):
        raise TypeError(f"a date is a str such as '2019-06', a date or a datetime; got {when!r}")
    match = _WHEN.fullmatch(when.strip())
    if match is None:
        raise ValueError(f"{when!r} is not a date: write 2019, 2019-06, 2019-06-01 or 2019-06-01T10:30")
    year, month, day, hour, minute, second = (int(part) if part else None for part in match.groups())
    try:  # what is left out starts at its first (month 1, day 1, 00:00); a 0 written is refused
        return datetime(
            cast(int, year),
            1 if month is None else month,
            1 if day is None else day,
            hour or 0,
            minute or 0,
            second or 0,
        ).isoformat()
    except ValueError as e:
        raise ValueError(f"{when!r} is not a date ({e})") from None


def parse_near(text: str) -> tuple[float, ...]:
    """ "LAT,LON" or "LAT,LON,KM" as numbers; ValueError otherwise."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r}: expected LAT,LON or LAT,LON,KM, e.g. 48.8584,2.2945,5") from None
    if len(values) not in (2, 3) or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{text!r}: expected LAT,LON or LAT,LON,KM, e.g. 48.8584,2.2945,5")
    Filters(near=values)  # checks the ranges
    return values


def parse_extensions(text: str) -> tuple[str, ...]:
    """ "jpg,.HEIC" → ("jpg", "heic"); ValueError for anything but letters and digits, or none."""
    found = _normalised_extensions(text.split(","))
    if not found:
        raise ValueError(f"{text!r} names no extension; give one or more, e.g. jpg,heic")
    return found


def _normalised_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    extensions = tuple(extensions)
    if any(not isinstance(ext, str) for ext in extensions):
        raise TypeError(f"extensions are str, e.g. ('jpg', 'heic'); got {extensions!r}")
    found = tuple(ext.strip().lstrip(".").lower() for ext in extensions if ext.strip())
    for ext in found:
        if not _EXTENSION.fullmatch(ext):
            raise ValueError(f"extension {ext!r}: letters and digits only (e.g. jpg)")
    return found


def check_sort(order: str) -> str:
    if order not in SORTS:
        raise ValueError(f"{order!r} is not an order; use one of {', '.join(SORTS)}")
    return order


def distance_km(lat: float, lon: float, latitudes: np.ndarray, longitudes: np.ndarray) -> np.ndarray:
    """Great-circle distances (haversine) from one point to many, in km."""
    phi1, phi2 = math.radians(lat), np.radians(np.asarray(latitudes, dtype=np.float64))
    dphi = phi2 - phi1
    dlam = np.radians(np.asarray(longitudes, dtype=np.float64) - lon)
    a = np.sin(dphi / 2) ** 2 + math.cos(phi1) * np.cos(phi2) * np.sin(dlam / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0, 1)))


def _bounding_box(lat: float, lon: float, km: float) -> tuple[float, float, float | None, float | None]:
    """(south, north, west, east) around the circle, for SQL to narrow by before the exact test.
    Near a pole every longitude qualifies (None); across the antimeridian west > east."""
    dlat = math.degrees(km / EARTH_RADIUS_KM)
    if abs(lat) + dlat >= 90:
        return lat - dlat, lat + dlat, None, None
    dlon = math.degrees(math.asin(min(1.0, math.sin(km / EARTH_RADIUS_KM) / math.cos(math.radians(lat)))))
    west, east = lon - dlon, lon + dlon
    if west < -180 or east > 180:
        west, east = _wrap(west), _wrap(east)
    return lat - dlat, lat + dlat, west, east


def _wrap(longitude: float) -> float:
    return (longitude + 180) % 360 - 180
