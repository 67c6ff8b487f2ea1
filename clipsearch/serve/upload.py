"""An image sent to the page to search by example: decoded in memory, never written anywhere.

The pixel cap is checked from the file's header, before any pixel is decoded: a small PNG can
claim 100,000 x 100,000 pixels (a decompression bomb) and would otherwise take 30 GB to open.
"""

from __future__ import annotations

import io
import warnings
from email import policy
from email.message import Message
from email.parser import BytesHeaderParser
from typing import TYPE_CHECKING

from clipsearch.errors import ImageError
from clipsearch.serve.errors import RequestError, TooLarge

if TYPE_CHECKING:
    from PIL import Image

MAX_BYTES = 32 * 1024 * 1024
MAX_PIXELS = 64_000_000  # a 64-megapixel photo is fine; Pillow's own bomb limit is ~179 M


MAX_PARTS = 16  # a form has an image and perhaps a text
# A part's header lines (its name, file name and type) fit in this: 30 MB of them had taken 15 s
# and 1 GB in the MIME parser.
MAX_PART_HEADERS = 16 * 1024


def from_form(content_type: str, body: bytes) -> tuple[bytes, str | None]:
    """The image a request carries, and a ``q`` field sent beside it: the body itself, or for
    ``multipart/form-data`` (an HTML form, ``curl -F image=@photo.jpg -F q=sunset``) its file
    part and its "q" part."""
    if not content_type.lower().startswith("multipart/form-data"):
        return body, None
    parts = _form_parts(_parameter(content_type, "boundary"), body)
    files = [data for headers, data in parts if headers.get_filename() is not None]
    if len(files) != 1:
        raise RequestError("Send one image file in the form (e.g. curl -F image=@photo.jpg), or the image as the body.")
    texts = [data for headers, data in parts if headers.get_filename() is None and _name(headers) == "q"]
    return files[0], texts[0].decode("utf-8", "replace") if texts else None  # UTF-8, as browsers send it


def _form_parts(boundary: str | None, body: bytes) -> list[tuple[Message, bytes]]:
    """RFC 7578's parts: (headers, content) between the boundary's delimiters, found with
    ``bytes.find`` and sliced once. The standard library's MIME parser had read a form of 27 MB
    line by line, in 6.5 s and ~300 MB; only each part's few header lines go through it here."""
    if not boundary or len(boundary) > 70:  # RFC 2046's limit
        raise RequestError("The form has no valid boundary in its Content-Type.")
    delimiter = b"\r\n--" + boundary.encode("latin-1", "replace")
    # The first delimiter may start the body, without the CRLF before it.
    start = -2 if body.startswith(delimiter[2:]) else body.find(delimiter)
    parts: list[tuple[Message, bytes]] = []
    while start != -1:
        after = start + len(delimiter)
        if body.startswith(b"--", after):  # the close delimiter
            return parts
        line_end = body.find(b"\r\n", after)
        end = body.find(delimiter, line_end)
        headers_end = body.find(b"\r\n\r\n", line_end, min(end, line_end + MAX_PART_HEADERS))
        if line_end < 0 or end < 0 or headers_end < 0 or body[after:line_end].strip(b" \t") or len(parts) == MAX_PARTS:
            break
        headers = BytesHeaderParser(policy=policy.HTTP).parsebytes(body[line_end + 2 : headers_end + 4])
        parts.append((headers, body[headers_end + 4 : end]))
        start = end
    if delimiter[2:] + b"\n" in body and delimiter[2:] + b"\r\n" not in body:  # a hand-written form
        raise RequestError("The form is malformed: its lines end in LF, where multipart/form-data needs CRLF.")
    raise RequestError("The form is malformed (multipart/form-data parts without their closing boundary).")


def _parameter(content_type: str, name: str) -> str | None:
    message = Message()
    message["content-type"] = content_type
    value = message.get_param(name)
    return value if isinstance(value, str) else None


def _name(headers: Message) -> str | None:
    value = headers.get_param("name", header="content-disposition")
    return value if isinstance(value, str) else None


def open_upload(data: bytes, max_pixels: int = MAX_PIXELS, target: int | None = None) -> Image.Image:
    """Upright RGB pixels of an uploaded file (``target``: the model's resolution, which lets a
    JPEG decode at a reduced scale); `TooLarge` or `RequestError` when it cannot be used."""
    from PIL import Image, UnidentifiedImageError

    from clipsearch.clip.preprocess import open_image, open_pillow

    if not data:
        raise RequestError("The upload is empty; send an image file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the cap below decides
            with open_pillow(io.BytesIO(data), "The upload") as probe:
                width, height = probe.size
    except Image.DecompressionBombError:
        limit = f"{max_pixels / 1e6:.0f} megapixels"
        raise TooLarge(f"The uploaded image has more pixels than the limit of {limit}.") from None
    except UnidentifiedImageError:
        raise RequestError("The upload is not an image this server can read (JPEG, PNG, WebP, GIF, ...).") from None
    except ImageError as e:  # HEIF without the extra
        raise RequestError(str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise RequestError(f"The uploaded image cannot be read ({e}).") from None
    if width * height > max_pixels:
        raise TooLarge(
            f"The uploaded image is {width} x {height} pixels; the limit is {max_pixels / 1e6:.0f} megapixels."
        )
    try:
        return open_image(io.BytesIO(data), target=target)
    except ImageError:
        raise RequestError("The uploaded image cannot be decoded; it may be truncated or damaged.") from None
