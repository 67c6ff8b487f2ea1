"""Images as CLIP sees them: upright RGB, short side resized with bicubic, centre-cropped,
normalised with the statistics of CLIP's training images. SigLIP sees the whole image instead,
resized to the square without keeping its aspect ratio (open_clip's "squash"), normalised with
mean = std = 0.5. An OpenCLIP model may ask for bilinear resizing, or for the whole image fitted
in the square and padded ("longest"), in its ``open_clip_config.json``; those are reproduced too.

The resize and crop reproduce torchvision's `Resize(R)` + `CenterCrop(R)` on PIL images
(the preprocessing of OpenAI's and OpenCLIP's releases) pixel for pixel, with Pillow and
NumPy alone. Two things differ on purpose: the EXIF orientation is applied (the reference
ignores it and embeds photos lying on their side), and every mode is converted to RGB
before resizing, not after, so palette images are not resized with nearest-neighbour.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps
from PIL.Jpeg2KImagePlugin import Jpeg2KImageFile
from PIL.JpegImagePlugin import JpegImageFile

from ..errors import ImageError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SigLIP's (Inception's) normalisation: pixels to [-1, 1].
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# Transparent pixels are shown on white, as browsers and viewers on a light page show
# them; dropping alpha instead would expose whatever colour they store, often black.
ALPHA_BACKGROUND = (255, 255, 255)
# A 1 x 10,000 strip resized to a 224 short side would be 224 x 2,240,000 pixels. Past
# this aspect ratio only the part that survives the crop is resized.
MAX_EXACT_ASPECT = 20

# Pillow refuses images over 2 x 89 megapixels as bombs, but decoding one under that still cost
# 3.1 GB (a 6.5 KB WebP of 13000 x 13000) in every decode worker. Past this many megapixels, as
# decoded (after reduced decoding, which lets larger JPEGs through), an image is refused from its
# header; the environment variable CLIPSEARCH_MAX_MEGAPIXELS sets another limit.
DEFAULT_MAX_MEGAPIXELS = 48.0


class OverPixelBudget(Exception):
    """Raised by `load_upright` for an image larger than the pixel budget."""


# What Pillow and its plugins raise for unreadable, truncated or malformed files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def open_image(source: str | os.PathLike[str] | BinaryIO, target: int | None = None) -> Image.Image:
    """Decode an image file to upright RGB pixels, or raise `ImageError` saying why not.

    With `target` (the model's resolution), JPEGs are decoded at 1/2, 1/4 or 1/8 scale
    when the short side stays at least twice the target: the DCT does the downscaling,
    which makes a 12-megapixel photo several times cheaper and barely changes the
    embedding (benchmarks/draft_decode.py). Animated and multi-page files give their
    first frame.
    """
    with opened_image(source) as image:
        return load_upright(image, target)


@contextmanager
def opened_image(source: str | os.PathLike[str] | BinaryIO, name: str | None = None) -> Iterator[Image.Image]:
    """The image with only its header read (size, mode, EXIF), for `load_upright`; whatever
    Pillow raises meanwhile becomes an `ImageError` naming the file (``name``, else the path).
    A reader that wants the header too (the size as shown, metadata) reads it here first."""
    if name is None:
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else getattr(source, "name", "image data")
    try:
        with open_pillow(source, name) as image:
            yield image
    except FileNotFoundError:
        raise ImageError(f"{name} does not exist; check the path.") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name} is refused as a possible decompression bomb ({e}); exclude it.") from e
    except OverPixelBudget as e:
        raise ImageError(
            f"{name} is {e} to decode; exclude it, or set CLIPSEARCH_MAX_MEGAPIXELS to a higher limit."
        ) from None
    except _DECODE_ERRORS as e:
        # Pillow names the file too, a path as 'path' and an open file by its repr: said once, first.
        unidentified = isinstance(e, Image.UnidentifiedImageError)
        detail = "cannot identify image file" if unidentified else str(e).replace(f" '{name}'", "")
        if unidentified and _is_empty(source):  # a copy that was cut off, a placeholder
            detail = "the file is empty"
        raise ImageError(f"{name} cannot be decoded as an image ({detail}); check the file or exclude it.") from e


def _is_empty(source: str | os.PathLike[str] | BinaryIO) -> bool:
    try:
        size = os.path.getsize(source) if isinstance(source, (str, os.PathLike)) else os.fstat(source.fileno()).st_size
    except (OSError, ValueError):  # in memory (no file number), or gone: not known to be empty
        return False
    return size == 0


def open_pillow(source: str | os.PathLike[str] | BinaryIO, name: str) -> Image.Image:
    """``Image.open``, and HEIF too (iPhone photos): Pillow reads it through pillow-heif, the
    ``heif`` extra, registered the first time a HEIF file is met rather than at import (it costs
    ~40 ms, which every run would pay). `ImageError` for a HEIF file without the extra."""
    try:
        return _open_within_budget(source)
    except Image.UnidentifiedImageError:
        if not _is_heif(source):
            raise
    if not _heif_registered():
        raise ImageError(
            f"{name} is a HEIF/HEIC photo, which needs the heif extra: pip install 'clipsearch[heif]' "
            "(then index --retry-failed)"
        )
    if not isinstance(source, (str, os.PathLike)):
        source.seek(0)
    return _open_within_budget(source)


_PILLOW_LIMIT = threading.Lock()  # held while Pillow's own limit is lifted, for one open


def _open_within_budget(source: str | os.PathLike[str] | BinaryIO) -> Image.Image:
    """``Image.open``, where Pillow's limit on the size a header declares gives way to the budget
    (`max_megapixels`), which `load_upright` applies to the pixels as decoded: a 16000 x 12000
    JPEG panorama, decoded at 1/8 scale in 3 megapixels, had been refused as a decompression
    bomb, whatever CLIPSEARCH_MAX_MEGAPIXELS said. Any other image over Pillow's limit and the
    budget is still refused as one."""
    try:
        return Image.open(source)
    except Image.DecompressionBombError:
        if not isinstance(source, (str, os.PathLike)):
            source.seek(0)
        with _PILLOW_LIMIT:
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                image = Image.open(source)
            finally:
                Image.MAX_IMAGE_PIXELS = limit
        reduced = isinstance(image, (JpegImageFile, Jpeg2KImageFile))  # decoded at a smaller scale
        if reduced or image.width * image.height <= max_megapixels() * 1e6:
            return image
        image.close()
        raise


# The major brands of ISO media files that are HEIF images (not AVIF, which Pillow reads itself).
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})


def _is_heif(source: str | os.PathLike[str] | BinaryIO) -> bool:
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            head = f.read(12)
    else:
        source.seek(0)
        head = source.read(12)
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


@functools.cache
def _heif_registered() -> bool:
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def load_upright(image: Image.Image, target: int | None = None) -> Image.Image:
    """The pixels of an image from `opened_image`, upright and RGB, reduced while decoding for
    `target` where the format allows (see `open_image`)."""
    halved = 0  # times JPEG 2000 halves the size while decoding (JPEG's draft shrinks `size` itself)
    if target:
        image.draft("RGB", (2 * target, 2 * target))
        if isinstance(image, Jpeg2KImageFile):
            halved = min(5, int(np.log2(max(1, min(image.size) // (2 * target)))))
            image.reduce = halved
    megapixels = (image.width >> halved) * (image.height >> halved) / 1e6
    if megapixels > max_megapixels():
        raise OverPixelBudget(f"{megapixels:.0f} megapixels, more than the {max_megapixels():g} allowed")
    image.load()
    return to_rgb(_upright(image))


def max_megapixels() -> float:
    """The pixel budget of one decode: CLIPSEARCH_MAX_MEGAPIXELS, else `DEFAULT_MAX_MEGAPIXELS`."""
    return megapixel_budget(os.environ.get("CLIPSEARCH_MAX_MEGAPIXELS", "")) or DEFAULT_MAX_MEGAPIXELS


def megapixel_budget(setting: str) -> float | None:
    """CLIPSEARCH_MAX_MEGAPIXELS's value as a budget; None when unset or none ("abc" and "0";
    "nan" too, which had passed every image), which the CLI refuses and the library ignores."""
    try:
        value = float(setting)
    except ValueError:
        return None
    return value if value > 0 else None


def _upright(image: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF orientation says; unreadable EXIF leaves the image as is,
    since the pixels themselves are fine."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        return ImageOps.exif_transpose(image) if orientation != 1 else image
    except Exception as e:
        log.debug("ignoring unreadable EXIF in %s: %s", getattr(image, "filename", "image"), e)
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Alpha is composited onto `ALPHA_BACKGROUND`; 16- and 32-bit integer greys are scaled
    from 0..65535 (Pillow's own conversion would clip everything above 255 to white);
    float images are stretched from their minimum to their maximum, having no white point.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I"):
        grey = np.asarray(image).astype(np.float64).clip(0, 65535) * (255 / 65535)
        return Image.fromarray(grey.round().astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = values.min(), values.max()
        grey = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
        return Image.fromarray(grey.round().astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


# open_clip's ``interpolation`` settings; "random" (training's) is bicubic at inference, as there.
RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "random": Image.Resampling.BICUBIC,
}


def resize_and_crop(image: Image.Image, resolution: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """torchvision's `CenterCrop(R)(Resize(R, BICUBIC)(image))` (or another ``resample``), with its
    exact rounding: the long side becomes int(R * long / short), the crop offset round((size - R) / 2)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(resolution * long / short)
    new_width, new_height = (resolution, new_long) if width <= height else (new_long, resolution)
    top = round((new_height - resolution) / 2.0)
    left = round((new_width - resolution) / 2.0)
    if long > MAX_EXACT_ASPECT * short:
        # The same geometry, sampled from the source region the crop keeps. Not
        # bit-identical to resizing everything first, but bounded in memory.
        sx, sy = width / new_width, height / new_height
        box = (left * sx, top * sy, (left + resolution) * sx, (top + resolution) * sy)
        return image.resize((resolution, resolution), resample, box=box)
    resized = image.resize((new_width, new_height), resample)
    return resized.crop((left, top, left + resolution, top + resolution))


def squash(image: Image.Image, resolution: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """torchvision's `Resize((R, R), BICUBIC)`: the whole image, its aspect ratio not kept."""
    return image.resize((resolution, resolution), resample)


def fit_and_pad(image: Image.Image, resolution: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """open_clip's "longest" resize mode, `CenterCropOrPad(R)(ResizeKeepRatio(R, longest=1)(image))`:
    the whole image, its long side resized to R, centred on black. A side that would round to no
    pixel at all (a strip over 2R times longer than wide) keeps one, where torchvision fails."""
    width, height = image.size
    ratio = max(width, height) / resolution
    size = (max(1, round(width / ratio)), max(1, round(height / ratio)))
    square = Image.new("RGB", (resolution, resolution))
    square.paste(image.resize(size, resample), ((resolution - size[0]) // 2, (resolution - size[1]) // 2))
    return square


# open_clip's ``resize_mode`` settings, what each does to an image.
RESIZE_MODES = {"shortest": resize_and_crop, "squash": squash, "longest": fit_and_pad}


class Preprocess:
    """PIL image (or image file) → normalised float32 `Tensor[3, R, R]` for the model.

    ``resize_mode`` and ``interpolation`` are open_clip's settings (`RESIZE_MODES`, `RESAMPLING`):
    CLIP's resize of the short side and centre crop ("shortest"), SigLIP's resize of the whole
    image to the square ("squash"), or the whole image fitted in the square and padded ("longest").
    Holds only numbers and names, so it pickles into decode worker processes.
    """

    def __init__(
        self,
        resolution: int,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
    ):
        if resize_mode not in RESIZE_MODES or interpolation not in RESAMPLING:
            raise ValueError(
                f"resize_mode must be one of {tuple(RESIZE_MODES)} and interpolation one of {tuple(RESAMPLING)}, "
                f"not {resize_mode!r} and {interpolation!r}"
            )
        self.resolution = resolution
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.resize_mode = resize_mode
        self.interpolation = interpolation

    def __call__(self, image: Image.Image | str | os.PathLike[str]) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.array(image))

    def array(self, image: Image.Image | str | os.PathLike[str]) -> np.ndarray:
        """What calling it gives, as a float32 NumPy array ``[3, R, R]``: decode workers use this,
        and never import torch (which cost each worker 1.3 s of start-up)."""
        if not isinstance(image, Image.Image):
            image = open_image(image, target=self.resolution)
        resize = RESIZE_MODES[self.resize_mode]
        pixels = np.array(resize(to_rgb(image), self.resolution, RESAMPLING[self.interpolation]), dtype=np.float32)
        mean = np.array(self.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.array(self.std, dtype=np.float32).reshape(3, 1, 1)
        return (np.ascontiguousarray(pixels.transpose(2, 0, 1)) / np.float32(255) - mean) / std

    def __repr__(self) -> str:
        return (
            f"Preprocess(resolution={self.resolution}, mean={self.mean}, std={self.std}, "
            f"resize_mode={self.resize_mode!r}, interpolation={self.interpolation!r})"
        )
