"""Preprocessing equals OpenCLIP's eval transform (torchvision Resize + CenterCrop +
ToTensor + Normalize), the reference for CLIP's released weights, to 1e-6."""

import functools
import io
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from clipsearch.clip.preprocess import (
    ALPHA_BACKGROUND,
    CLIP_MEAN,
    CLIP_STD,
    MAX_EXACT_ASPECT,
    Preprocess,
    open_image,
    to_rgb,
)
from clipsearch.errors import ImageError

open_clip = pytest.importorskip("open_clip")

R = 224


@pytest.fixture(scope="module")
def reference():
    return open_clip.image_transform(R, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)


@pytest.fixture(scope="module")
def ours():
    return Preprocess(R)


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients and blobs plus noise: bicubic overshoot and rounding both occur."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(6 * x + c) * np.cos(4 * y - c) for c in (0.0, 1.0, 2.0)], axis=-1)
    noisy = 127.5 + 90 * base + rng.normal(0, 25, (height, width, 3))
    return noisy.clip(0, 255).astype(np.uint8)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape == (3, R, R)
    return (a - b).abs().max().item()


SIZES = [
    (640, 480),
    (480, 640),
    (224, 224),
    (225, 223),
    (301, 999),
    (1001, 333),
    (7, 5),
    (3, 40),
    (1, 17),
    (19, 1),
    (50, 1000),
]


@pytest.mark.parametrize("size", SIZES)
def test_rgb_equals_reference(ours, reference, size):
    image = Image.fromarray(photo_like(*size))
    assert max_abs(ours(image), reference(image)) <= 1e-6


@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_open_clips_resize_modes_and_interpolations_equal_reference(resize_mode, interpolation):
    ours = Preprocess(R, CLIP_MEAN, CLIP_STD, resize_mode, interpolation)
    reference = open_clip.image_transform(
        R, is_train=False, mean=CLIP_MEAN, std=CLIP_STD, resize_mode=resize_mode, interpolation=interpolation
    )
    for size in SIZES:
        image = Image.fromarray(photo_like(*size))
        assert max_abs(ours(image), reference(image)) <= 1e-6, size


def test_unknown_resize_mode_is_refused():
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        Preprocess(R, resize_mode="crop")


@pytest.mark.parametrize("size", [(640, 480), (33, 47), (1, 9)])
def test_grey_equals_reference(ours, reference, size):
    image = Image.fromarray(photo_like(*size)[..., 0], "L")
    assert max_abs(ours(image), reference(image)) <= 1e-6


@functools.cache
def _modes() -> dict[str, Image.Image]:
    rgb = Image.fromarray(photo_like(320, 240, seed=1))
    alpha = Image.fromarray(photo_like(320, 240, seed=2)[..., 0], "L")
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    palette_clear = rgb.quantize(64)
    palette_clear.info["transparency"] = 3
    grey16 = Image.fromarray((photo_like(320, 240, seed=3)[..., 0].astype(np.uint16) * 257 + 100).astype(np.uint16))
    return {
        "P": rgb.quantize(64),
        "P+transparency": palette_clear,
        "RGBA": rgba,
        "LA": Image.merge("LA", (rgb.convert("L"), alpha)),
        "CMYK": rgb.convert("CMYK"),
        "I;16": grey16,
        "I": grey16.convert("I"),
        "F": Image.fromarray(photo_like(320, 240, seed=4)[..., 0].astype(np.float32) / 255.0, "F"),
        "1": rgb.convert("1"),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_other_modes_equal_reference_after_conversion(ours, reference, mode):
    """The reference resizes before converting to RGB, so for P and 1 Pillow resizes with
    nearest-neighbour (it refuses bicubic on those modes), and alpha, CMYK and 16-bit
    images are resized in their own mode and converted after. We convert first (the
    sensible order). So the comparison is: ours on the raw image equals the reference on
    the image converted to RGB, which checks the resize, crop and normalisation exactly;
    the conversions themselves are checked against formulas below."""
    image = _modes()[mode]
    assert image.mode == mode.split("+")[0]
    assert max_abs(ours(image), reference(to_rgb(image))) <= 1e-6


def test_alpha_is_composited_on_white():
    rgba = np.array([[[200, 100, 0, 0], [200, 100, 0, 255], [200, 100, 0, 128]]], dtype=np.uint8)
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))).astype(int)
    expected = rgba[..., :3] * (rgba[..., 3:] / 255) + np.array(ALPHA_BACKGROUND) * (1 - rgba[..., 3:] / 255)
    assert np.abs(out - expected).max() <= 1
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [200, 100, 0]


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    out = np.asarray(to_rgb(Image.fromarray(values)))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_float_image_is_stretched():
    out = np.asarray(to_rgb(Image.fromarray(np.array([[-1.0, 0.0, 1.0]], dtype=np.float32), "F")))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def save_jpeg(tmp_path, array: np.ndarray, name="photo.jpg", **kwargs):
    path = tmp_path / name
    Image.fromarray(array).save(path, quality=92, **kwargs)
    return path


@pytest.mark.parametrize("orientation", [3, 6, 8, 2])
def test_exif_orientation_is_applied(tmp_path, ours, reference, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save_jpeg(tmp_path, photo_like(400, 260), exif=exif.tobytes())
    upright = open_image(path)
    expected_size = (260, 400) if orientation in (6, 8) else (400, 260)
    assert upright.size == expected_size and upright.mode == "RGB"
    with Image.open(path) as raw:
        transposed = ImageOps.exif_transpose(raw)
    assert max_abs(ours(upright), reference(transposed)) <= 1e-6
    # a path goes through open_image; a 400 x 260 JPEG is too small to be decoded reduced
    assert max_abs(ours(path), reference(transposed)) <= 1e-6


def test_corrupt_exif_keeps_the_pixels(tmp_path, monkeypatch):
    path = save_jpeg(tmp_path, photo_like(64, 48), exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff\x01\x12garbage")
    with pytest.warns(UserWarning, match="Corrupt EXIF"):  # Pillow's own warning
        image = open_image(path)
    assert image.size == (64, 48) and image.mode == "RGB"

    # Pillow 13 reads the above leniently; older versions raised from exif_transpose.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = save_jpeg(tmp_path, photo_like(64, 48), name="rotated.jpg", exif=exif.tobytes())

    def broken(image):
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    assert open_image(rotated).size == (64, 48)


def test_jpeg_draft_keeps_twice_the_target(tmp_path):
    path = save_jpeg(tmp_path, photo_like(2000, 1500))
    assert open_image(path).size == (2000, 1500)
    assert open_image(path, target=224).size == (1000, 750)  # 1/2: 1/4 would give 375 < 448
    assert open_image(path, target=100).size == (500, 375)  # 1/4: 1/8 would give 188 < 200
    assert open_image(path, target=90).size == (250, 188)  # 1/8


def test_first_frame_of_gif_and_multipage_tiff(tmp_path):
    frames = [Image.new("RGB", (32, 24), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    for name in ("anim.gif", "pages.tif"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
        assert open_image(tmp_path / name).getpixel((5, 5)) == (255, 0, 0)


def test_file_objects_are_accepted(tmp_path):
    path = save_jpeg(tmp_path, photo_like(50, 40))
    with open(path, "rb") as f:
        assert open_image(f).size == (50, 40)
    assert open_image(io.BytesIO(path.read_bytes())).size == (50, 40)


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def test_a_jpeg_over_pillows_bomb_limit_decodes_within_the_budget(tmp_path, monkeypatch):
    """A 16000 x 12000 JPEG panorama (192 megapixels, over Pillow's limit of 2 x 89.5) decodes at
    1/8 scale in 3: it had been refused as a decompression bomb, whatever CLIPSEARCH_MAX_MEGAPIXELS
    said. Here Pillow's limit is lowered to stand for it: 400 x 300 is over 2 x 20,000 pixels."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    path = save_jpeg(tmp_path, photo_like(400, 300))
    assert open_image(path, target=50).size == (200, 150)  # decoded at 1/2 scale
    assert Image.MAX_IMAGE_PIXELS == 20_000  # left as it was
    png = tmp_path / "big.png"
    Image.fromarray(photo_like(400, 300)).save(png)
    assert open_image(png, target=50).size == (400, 300)  # within the budget too
    monkeypatch.setenv("CLIPSEARCH_MAX_MEGAPIXELS", "0.1")  # 100,000 pixels: not any more
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(png, target=50)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "cannot be decoded"),
        (b"just some notes, not a photo\n", "cannot be decoded"),
        ("truncated", "cannot be decoded"),
        (png_header_only(40000, 40000), "decompression bomb"),
    ],
)
def test_undecodable_files_raise_image_error(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        whole = save_jpeg(tmp_path, photo_like(300, 200), name="whole.jpg").read_bytes()
        content = whole[: len(whole) // 2]
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason) as info:
        open_image(path, target=224)
    assert str(path) in str(info.value)
    with pytest.raises(ImageError):
        Preprocess(R)(path)


def test_missing_file():
    with pytest.raises(ImageError, match="does not exist"):
        open_image("/nonexistent/x.jpg")


@pytest.mark.parametrize("size", [(4, 4 * MAX_EXACT_ASPECT + 40), (3, 200), (150, 6)])
def test_extreme_strip_is_bounded_and_close(ours, reference, size):
    """Past MAX_EXACT_ASPECT only the kept region is resized (the reference would build a
    224 x 2,240,000 image for a 1 x 10,000 strip). The sampling geometry is the same, but
    Pillow's two 8-bit passes may round differently: at most one grey level apart."""
    image = Image.fromarray(photo_like(*size, seed=5))
    grey_levels = (ours(image) - reference(image)).abs() * torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    assert grey_levels.max().item() <= 1 + 1e-3
    assert grey_levels.mean().item() < 0.01
    assert ours(Image.new("RGB", (1, 10_000), (10, 20, 30))).shape == (3, R, R)


def test_output_tensor_and_pickling(ours):
    image = Image.fromarray(photo_like(300, 200))
    out = ours(image)
    assert out.dtype == torch.float32 and out.is_contiguous()
    clone = pickle.loads(pickle.dumps(ours))
    assert torch.equal(clone(image), out)
    assert Preprocess(64, mean=(0, 0, 0), std=(1, 1, 1))(Image.new("RGB", (80, 64), (255, 0, 51)))[
        :, 0, 0
    ].tolist() == [
        1.0,
        0.0,
        pytest.approx(0.2),
    ]
