"""An image sent to the page to search by example: decoded in memory, never written anywhere.

The pixel cap is checked from the file's header, before any pixel is decoded: a small PNG can
claim 100,000 x 100,000 pixels (a decompression bomb) and would otherwise take 30 GB to open.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

from clipsearch.errors import ImageError
from clipsearch.serve.errors import RequestError, TooLarge

if TYPE_CHECKING:
    from PIL import Image

MAX_BYTES = 32 * 1024 * 1024
MAX_PIXELS = 64_000_000  # a 64-megapixel photo is fine; Pillow's own bomb limit is ~179 M


def from_form(content_type: str, body: bytes) -> tuple[bytes, str | None]:
    """The image a request carries, and a ``q`` field sent beside it: the body itself, or for
    ``multipart/form-data`` (an HTML form, ``curl -F image=@photo.jpg -F q=sunset``) its file
    part and its "q" part. The standard library's MIME parser reads the form byte for byte."""
    if not content_type.lower().startswith("multipart/form-data"):
        return body, None
    from email import policy
    from email.message import EmailMessage
    from email.parser import BytesParser

    header = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    form = BytesParser(policy=policy.HTTP).parsebytes(header + body)
    parts = list(form.iter_parts()) if isinstance(form, EmailMessage) and form.is_multipart() else []
    files = [part for part in parts if part.get_filename() is not None]
    if len(files) != 1:
        raise RequestError("Send one image file in the form (e.g. curl -F image=@photo.jpg), or the image as the body.")
    data = files[0].get_payload(decode=True)
    texts = [
        part.get_payload(decode=True)
        for part in parts
        if part.get_filename() is None and part.get_param("name", header="content-disposition") == "q"
    ]
    text = texts[0].decode("utf-8", "replace") if texts and isinstance(texts[0], bytes) else None  # as browsers send it
    return data if isinstance(data, bytes) else b"", text


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
