"""Request errors: a one-line message the API returns as ``{"error": message}`` with a status."""

from __future__ import annotations

from clipsearch.errors import ClipsearchError


class RequestError(ClipsearchError):
    """Something in the request itself is wrong (a parameter, the uploaded file)."""

    status = 400


class TooLarge(RequestError):
    status = 413


class NotFound(RequestError):
    status = 404
