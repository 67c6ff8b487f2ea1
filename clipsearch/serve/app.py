"""The HTTP side of `clipsearch serve`: routes, parameters, status codes, the access gate.

Every answer is JSON, errors included (``{"error": "one line"}``); a request that breaks
something unexpected gets a 500 with a generic line while the traceback goes to the server's
log, never into a response. The work itself is `Service`'s, run in a thread pool so that the
event loop keeps accepting requests.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import mimetypes
import os
import secrets
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes, unquote_to_bytes

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from clipsearch.errors import ClipsearchError, ImageError, IndexStateError
from clipsearch.search import Hit
from clipsearch.serve.errors import RequestError, TooLarge
from clipsearch.serve.service import Original, Page, Service
from clipsearch.serve.upload import MAX_BYTES, from_form

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_K = 200
MAX_OFFSET = 10_000
MAX_ID = 2**63 - 1  # SQLite's integers; a larger id would overflow the query
# The page asks for /api/thumbnail/ID?v=SIZE-MTIME, the hit's own: a re-indexed (edited) file
# gets a new URL, so that one may be kept for good. Any other request revalidates by ETag.
THUMBNAIL_VERSIONED = "private, max-age=31536000, immutable"
REVALIDATE = "private, no-cache"
CHUNK = 256 * 1024
TOKEN_COOKIE = "clipsearch_token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def create_app(service: Service, token: str | None = None, max_bytes: int = MAX_BYTES) -> Starlette:
    """The ASGI app. Without ``token`` only requests addressed to a loopback name are served
    (a web page elsewhere cannot reach the server by rebinding a DNS name to 127.0.0.1); with
    one, every request must carry it (query parameter, cookie or ``Authorization: Bearer``)."""

    async def search(request: Request) -> Response:
        page = _page(request)
        text = request.query_params.get("q", "")
        return _hits(await run_in_threadpool(service.search, text, page), page)

    async def search_image(request: Request) -> Response:
        page = _page(request)
        # In a thread, so that other requests go on; the body is let go once its image part is
        # taken out (no name holds it), not kept while the upload waits its turn to be decoded.
        content_type = request.headers.get("content-type", "")
        data, text = await run_in_threadpool(from_form, content_type, await _body(request, max_bytes))
        text = request.query_params.get("q") or text or ""
        return _hits(await run_in_threadpool(service.search_image, data, text, page), page)

    async def similar(request: Request) -> Response:
        page = _page(request)
        found = await run_in_threadpool(service.similar, _id(request), request.query_params.get("q", ""), page)
        return _hits(found, page)

    async def thumbnail(request: Request) -> Response:
        image_id, version = _id(request), request.query_params.get("v")
        key, current = await run_in_threadpool(service.thumbnail_key, image_id, version)
        cache = THUMBNAIL_VERSIONED if current else REVALIDATE
        headers = {"ETag": service.thumbnails.etag(key), "Cache-Control": cache}
        if headers["ETag"] in _etags(request.headers.get("if-none-match", "")):
            return Response(status_code=304, headers=headers)
        made = await run_in_threadpool(service.thumbnail, image_id, key)
        return Response(made.data, media_type=made.media_type, headers=headers | {"ETag": made.etag})

    async def original(request: Request) -> Response:
        found = await run_in_threadpool(service.original, _id(request))
        name = quote_from_bytes(os.fsencode(found.path.name), safe="")
        headers = {
            "ETag": f'"{found.fingerprint.hex()}"',
            "Last-Modified": formatdate(found.mtime_ns / 1e9, usegmt=True),
            "Cache-Control": REVALIDATE,
            # Saved from the browser under its own name ("café é.png"), not its id ("42.png").
            "Content-Disposition": f"inline; filename*=UTF-8''{name}",
        }
        if _not_modified(request.headers, headers["ETag"], found.mtime_ns):
            found.close()
            return Response(status_code=304, headers=headers)
        media_type = mimetypes.guess_type(found.path.name)[0] or "application/octet-stream"
        headers["Content-Length"] = str(found.size)
        return StreamingResponse(_chunks(found), media_type=media_type, headers=headers)

    async def details(request: Request) -> Response:
        return AsciiJSON(await run_in_threadpool(service.details, _id(request)))

    async def status(request: Request) -> Response:
        return AsciiJSON(await run_in_threadpool(service.status))

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    routes = [
        Route("/", page),
        Route("/api/search", search),
        Route("/api/search/image", search_image, methods=["POST"]),
        Route("/api/similar/{image_id:int}", similar),
        Route("/api/thumbnail/{image_id:int}", thumbnail),
        Route("/api/original/{image_id:int}", original),
        Route("/api/image/{image_id:int}", details),
        Route("/api/status", status),
        Mount("/static", app=StaticFiles(directory=STATIC)),
    ]
    # Our own errors and HTTP ones are answered where they are raised; only a bug reaches the
    # `Exception` handler, whose middleware answers and then re-raises it for the server to log
    # with its traceback (ours went there too: every empty search printed one on the terminal).
    app = Starlette(
        routes=routes, exception_handlers={ClipsearchError: _error, HTTPException: _error, Exception: _error}
    )
    app.add_middleware(Gate, token=token)
    return app


class AsciiJSON(JSONResponse):
    """JSON with every non-ASCII character escaped, as `clipsearch query --json` writes it: the
    path of a file whose name is not UTF-8 (a Latin-1 name an old archive unpacked) holds lone
    surrogates, which UTF-8 cannot encode, and every search that found one had been a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


# --- parameters ------------------------------------------------------------------------------


def _page(request: Request) -> Page:
    """The page a search asks for; a 400 for a parameter that is not UTF-8 text, where Starlette
    puts U+FFFD (Latin-1's ``q=caf%E9`` had been searched as "caf" and U+FFFD, with hits)."""
    for pair in request.scope["query_string"].split(b"&"):
        try:
            unquote_to_bytes(pair.replace(b"+", b" ")).decode()
        except UnicodeDecodeError:
            name = unquote_to_bytes(pair.partition(b"=")[0]).decode(errors="replace")[:40]
            raise RequestError(f"{name} is not UTF-8 text: percent-encode its UTF-8 bytes (é is %C3%A9).") from None
    params = request.query_params
    under = params.get("under") or None
    if under is not None and not under.startswith("/"):
        raise RequestError("under must be an absolute folder path, such as /home/me/photos.")
    return Page(
        k=_number(params, "k", int, 1, MAX_K) or 30,
        offset=_number(params, "offset", int, 0, MAX_OFFSET) or 0,
        under=under,
        min_score=_number(params, "min_score", float, -1.0, 1.0),
    )


def _number(params: QueryParams, name: str, kind: type[int] | type[float], low: float, high: float) -> Any:
    """The parameter as ``kind`` within [low, high], None when absent or empty."""
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise RequestError(f"{name} must be {what}, not {raw[:40]!r}.") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise RequestError(f"{name} must be between {low:g} and {high:g}.")
    return value


def _id(request: Request) -> int:
    image_id = request.path_params["image_id"]
    if image_id > MAX_ID:
        raise RequestError(f"{image_id} is not an image id.")
    return image_id


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it passes ``limit`` bytes (a declared length is
    checked before anything is read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"The upload is larger than {limit // (1024 * 1024)} MiB.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"The upload is larger than {limit // (1024 * 1024)} MiB.")
        chunks.append(chunk)
    return b"".join(chunks)


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",")} if header else set()


def _not_modified(headers: Headers, etag: str, mtime_ns: int) -> bool:
    """RFC 9110's conditional GET: If-None-Match when sent, else If-Modified-Since (to the second)."""
    if "if-none-match" in headers:
        tags = _etags(headers["if-none-match"])
        return etag in tags or "*" in tags
    try:
        since = parsedate_to_datetime(headers.get("if-modified-since", ""))
    except (TypeError, ValueError):
        return False
    return since.tzinfo is not None and mtime_ns // 1_000_000_000 <= since.timestamp()


def _chunks(original: Original) -> Iterator[bytes]:
    """The checked file's bytes, read from the descriptor that was checked, then closed: as many
    as Content-Length said, even if the file grows meanwhile."""
    with original:
        left = original.size
        while left > 0 and (chunk := original.file.read(min(CHUNK, left))):
            left -= len(chunk)
            yield chunk


def _hits(hits: list[Hit], page: Page) -> Response:
    return AsciiJSON({"hits": [hit.to_json() for hit in hits], "offset": page.offset, "k": page.k})


# --- errors ----------------------------------------------------------------------------------


async def _error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        return _json_error(exc.status_code, str(exc.detail), exc.headers)
    if isinstance(exc, RequestError):
        return _json_error(exc.status, str(exc))
    if isinstance(exc, IndexStateError):
        return _json_error(503, str(exc))
    if isinstance(exc, ImageError):  # an indexed file that cannot be read any more
        return _json_error(422, str(exc))
    if isinstance(exc, ClipsearchError):
        return _json_error(400, str(exc))
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _json_error(500, "The server failed on this request (a bug); its log has the details.")


def _json_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return AsciiJSON({"error": " ".join(message.split())}, status_code=status, headers=headers)


# --- access ----------------------------------------------------------------------------------


class Gate:
    """Lets a request through only if it carries the token, or, with no token set, only if it
    is addressed to a loopback name. A valid ``?token=`` in a URL is turned into a cookie, so
    the page's images and later requests need not carry it."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if self.token is None:
            if not _loopback(request.headers.get("host", "")):
                await _json_error(400, "This server answers only requests addressed to 127.0.0.1 or localhost.")(
                    scope, receive, send
                )
                return
            await self.app(scope, receive, send)
            return
        in_url = request.query_params.get("token")
        given = in_url or request.cookies.get(TOKEN_COOKIE) or _bearer(request.headers)
        if not given or not secrets.compare_digest(given.encode(), self.token.encode()):
            await _json_error(401, "This server needs its access token: open the URL it printed.")(scope, receive, send)
            return
        if in_url is None:
            await self.app(scope, receive, send)
            return
        cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"

        async def send_with_cookie(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"set-cookie", cookie.encode())]
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def _bearer(headers: Headers) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def _loopback(host_header: str) -> bool:
    """Whether a Host header names a loopback host, with a port or none: ``localhost``,
    ``LOCALHOST:8765``, ``[::1]:8765``; not ``localhost:evil.example``."""
    if host_header.startswith("["):  # [::1]:8765
        host, _, port = host_header[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = host_header.partition(":")
    return (port == "" or (port.isascii() and port.isdigit())) and is_loopback(host.lower())


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (binding it needs no token)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
