"""Tests of worker.images: every image is generated here, in memory."""

from __future__ import annotations

import io
import json
import logging
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile

from worker import images
from worker.errors import CaptionError, ErrorCode
from worker.images import ImageLimits, decode_image

LIMITS = ImageLimits(max_pixels=50_000_000, min_side=8, max_side=20_000, max_aspect_ratio=20.0, target_side=None)


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def blank_bilevel_png(width: int, height: int) -> bytes:
    """Build a complete all-black 1-bit PNG; its zeros compress about 1000 to 1, so huge sizes stay small."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte, then 8 pixels per byte
    compressor = zlib.compressobj(9)
    rows_per_piece = 1000
    pieces = [compressor.compress(row * min(rows_per_piece, height - start)) for start in range(0, height, rows_per_piece)]
    pixel_data = b"".join(pieces) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixel_data) + chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """Build a PNG whose header declares width x height but whose pixel data is empty."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def expect_error(data: bytes, code: ErrorCode, limits: ImageLimits = LIMITS) -> CaptionError:
    with pytest.raises(CaptionError) as caught:
        decode_image(data, limits)
    assert caught.value.code == code, caught.value.message
    return caught.value


def assert_rgb_array(pixels: np.ndarray, width: int, height: int) -> None:
    assert pixels.dtype == np.uint8
    assert pixels.shape == (height, width, 3)
    assert pixels.flags.c_contiguous


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"])
def test_accepted_formats_decode_to_rgb(image_format):
    data = encode(Image.new("RGB", (40, 30), (200, 30, 30)), image_format)

    decoded = decode_image(data, LIMITS)

    assert_rgb_array(decoded.pixels, 40, 30)
    assert decoded.format == image_format
    assert decoded.frames == 1
    assert decoded.original_width == 40
    assert decoded.original_height == 30
    assert decoded.decode_seconds >= 0


def test_format_comes_from_bytes_not_name():
    # Only bytes reach decode_image; a PNG is a PNG whatever it was called.
    data = encode(Image.new("RGB", (16, 16)), "PNG")

    assert decode_image(data, LIMITS).format == "PNG"


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (32, 24), (0, 255, 255, 0))  # no black ink, full magenta and yellow: red
    data = encode(cmyk, "JPEG", quality=95)

    decoded = decode_image(data, LIMITS)

    assert_rgb_array(decoded.pixels, 32, 24)
    red, green, blue = decoded.pixels[12, 16].tolist()
    assert red > 200
    assert green < 60
    assert blue < 60


def test_sixteen_bit_ramp_keeps_its_levels():
    ramp = np.tile(np.arange(0, 65536, 257, dtype=np.uint16), (16, 1))  # 256 levels, 0 to 65535
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"

    row = decode_image(data, LIMITS).pixels[0, :, 0].astype(int)

    assert len(np.unique(row)) == 256
    assert np.all(np.diff(row) > 0)
    assert row[0] == 0
    assert row[-1] == 255


def test_sixteen_bit_narrow_range_is_stretched_not_clipped():
    # Values 1000..1255 would all clip to 255 by a plain 8-bit conversion.
    ramp = np.tile(np.arange(1000, 1256, dtype=np.uint16), (16, 1))
    data = encode(Image.fromarray(ramp), "PNG")

    row = decode_image(data, LIMITS).pixels[0, :, 0].astype(int)

    assert len(np.unique(row)) == 256
    assert np.all(np.diff(row) > 0)


def test_float_tiff_is_rescaled_by_range():
    ramp = np.tile(np.linspace(-1.0, 1.0, 64, dtype=np.float32), (8, 1))
    ramp[0, 0] = np.nan
    data = encode(Image.fromarray(ramp), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"

    decoded = decode_image(data, LIMITS)

    row = decoded.pixels[1, :, 0].astype(int)
    assert_rgb_array(decoded.pixels, 64, 8)
    assert row[0] == 0
    assert row[-1] == 255
    assert np.all(np.diff(row) > 0)


def test_flat_sixteen_bit_image_keeps_its_level():
    flat = np.full((8, 8), 65535, dtype=np.uint16)

    decoded = decode_image(encode(Image.fromarray(flat), "PNG"), LIMITS)

    assert np.all(decoded.pixels == 255)


def exif_with_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return exif


def test_exif_orientation_six_rotates_the_image():
    image = Image.new("RGB", (80, 40), "white")
    image.paste((255, 0, 0), (0, 0, 10, 10))  # red mark at the top left as stored
    data = encode(image, "JPEG", exif=exif_with_orientation(6), quality=95)

    decoded = decode_image(data, LIMITS)

    assert_rgb_array(decoded.pixels, 40, 80)
    assert decoded.original_width == 40
    assert decoded.original_height == 80
    # Orientation 6 means "rotate 90 degrees clockwise to display": top left goes to top right.
    assert decoded.pixels[2, 37, 0] > 200
    assert decoded.pixels[2, 37, 1] < 80


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
@pytest.mark.parametrize(
    "exif_block",
    [
        b"Exif\x00\x00not a TIFF header at all",
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12",  # IFD cut short
        b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",  # IFD offset far past the end
    ],
)
def test_malformed_exif_decodes_unrotated(exif_block):
    data = encode(Image.new("RGB", (80, 40), "white"), "JPEG", exif=exif_block)

    decoded = decode_image(data, LIMITS)

    assert_rgb_array(decoded.pixels, 80, 40)


def test_exif_error_logs_warning_and_continues(monkeypatch, caplog):
    def broken_transpose(image):
        raise SyntaxError("bad EXIF IFD")

    monkeypatch.setattr(images.ImageOps, "exif_transpose", broken_transpose)
    data = encode(Image.new("RGB", (80, 40), "white"), "JPEG", exif=exif_with_orientation(6))

    with caplog.at_level(logging.WARNING, logger="worker.images"):
        decoded = decode_image(data, LIMITS)

    assert_rgb_array(decoded.pixels, 80, 40)
    assert "malformed EXIF" in caplog.text


def test_truncated_jpeg_is_corrupt_image():
    data = encode(noise(256, 256), "JPEG", quality=90)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES

    expect_error(data[: len(data) // 2], ErrorCode.CORRUPT_IMAGE)


def jpeg_with_large_comment() -> bytes:
    # The comment segment fills most of the file, so cutting it in half ends the data inside the header.
    return encode(noise(256, 256), "JPEG", quality=90, comment=b"x" * 60_000)


@pytest.mark.parametrize(
    "complete",
    [encode(noise(256, 256), "JPEG", quality=90), jpeg_with_large_comment()],
    ids=["cut_in_pixel_data", "cut_in_header"],
)
def test_cut_jpeg_message_says_truncated(complete):
    error = expect_error(complete[: len(complete) // 2], ErrorCode.CORRUPT_IMAGE)

    assert "image data is truncated or incomplete" in error.message
    assert "invalid" not in error.message


def test_zero_size_png_message_names_header():
    error = expect_error(png_header_only(0, 0), ErrorCode.CORRUPT_IMAGE)

    assert "PNG header declares 0x0 pixels" in error.message
    assert "object at 0x" not in error.message


def test_png_with_broken_pixel_data_is_corrupt_image():
    data = bytearray(encode(noise(64, 64), "PNG"))
    middle = len(data) // 2
    data[middle : middle + 64] = b"\xff" * 64

    expect_error(bytes(data), ErrorCode.CORRUPT_IMAGE)


def test_empty_data_is_empty_object():
    expect_error(b"", ErrorCode.EMPTY_OBJECT)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"><rect width="5" height="5"/></svg>', "SVG"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "PDF"),
        (b"hello, this is plain text and not a picture\n", "unknown"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "HEIC"),
    ],
)
def test_non_raster_data_is_unsupported_format(data, named):
    error = expect_error(data, ErrorCode.UNSUPPORTED_FORMAT)

    assert named in error.message


def test_huge_png_rejected_in_bounded_memory(tmp_path):
    # Decoding 30000 x 30000 pixels would fill 900 MB, one byte per pixel, so the header alone must decide.
    path = tmp_path / "huge.png"
    path.write_bytes(blank_bilevel_png(30_000, 30_000))
    script = textwrap.dedent(
        f"""
        import json, resource
        from worker.errors import CaptionError
        from worker.images import ImageLimits, decode_image
        data = open({str(path)!r}, "rb").read()
        limits = ImageLimits(50_000_000, 8, 50_000, 20.0, 896)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            decode_image(data, limits)
            code = None
        except CaptionError as error:
            code = error.code.value
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"code": code, "peak_growth_kib": after - before}}))
        """
    )
    # A fresh interpreter, so that the peak RSS of earlier tests cannot hide an allocation.
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)

    result = json.loads(completed.stdout)
    assert result["code"] == "image_too_large"
    assert result["peak_growth_kib"] < 50 * 1024


def test_pillow_bomb_limit_message_names_setting():
    # 10^10 pixels is over twice Pillow's own limit, so Pillow rejects the header first.
    error = expect_error(png_header_only(100_000, 100_000), ErrorCode.IMAGE_TOO_LARGE)

    assert "10000000000 pixels" in error.message
    assert f"maximum {LIMITS.max_pixels} (--max-image-pixels)" in error.message
    assert str(2 * Image.MAX_IMAGE_PIXELS) not in error.message


def test_image_over_max_pixels_is_rejected_before_decoding():
    # 8000 x 8000 is under Pillow's own bomb limit, so this is the worker's check.
    error = expect_error(blank_bilevel_png(8_000, 8_000), ErrorCode.IMAGE_TOO_LARGE)

    assert "8000x8000" in error.message


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (30, 10), (255, 0, 0, 0))
    image.paste((255, 0, 0, 255), (10, 0, 20, 10))
    image.paste((255, 0, 0, 128), (20, 0, 30, 10))

    pixels = decode_image(encode(image, "PNG"), LIMITS).pixels

    assert pixels[5, 5].tolist() == [255, 255, 255]
    assert pixels[5, 15].tolist() == [255, 0, 0]
    assert pixels[5, 25, 0] == 255
    assert 120 <= pixels[5, 25, 1] <= 135


def test_palette_transparency_is_composited_on_white():
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (8, 0, 16, 16))
    data = encode(image, "GIF", transparency=0)

    pixels = decode_image(data, LIMITS).pixels

    assert pixels[4, 4].tolist() == [255, 255, 255]
    assert pixels[4, 12].tolist() == [0, 0, 255]


def test_greyscale_and_bilevel_become_rgb():
    for mode in ("L", "1", "LA"):
        decoded = decode_image(encode(Image.new(mode, (20, 10), 255 if mode != "LA" else (255, 255)), "PNG"), LIMITS)

        assert_rgb_array(decoded.pixels, 20, 10)
        assert decoded.pixels.min() == 255


def test_animated_gif_takes_first_frame_and_counts_frames():
    frames = [Image.new("RGB", (24, 24), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)

    decoded = decode_image(data, LIMITS)

    assert decoded.frames == 3
    assert decoded.pixels[12, 12].tolist() == [255, 0, 0]


@pytest.mark.parametrize(
    ("size", "setting"),
    [
        ((400, 10), "--max-aspect-ratio"),
        ((4, 100), "--min-image-side"),
        ((25_000, 2_000), "--max-image-side"),
    ],
)
def test_bad_dimensions_name_the_setting(size, setting):
    error = expect_error(blank_bilevel_png(*size), ErrorCode.BAD_DIMENSIONS)

    assert setting in error.message


def test_large_jpeg_is_scaled_down_to_target_side():
    limits = ImageLimits(50_000_000, 8, 20_000, 20.0, target_side=200)
    data = encode(noise(1600, 800), "JPEG", quality=80)

    decoded = decode_image(data, limits)

    assert_rgb_array(decoded.pixels, 400, 200)
    assert decoded.original_width == 1600
    assert decoded.original_height == 800


def test_large_png_is_scaled_down_keeping_aspect_ratio():
    limits = ImageLimits(50_000_000, 8, 20_000, 20.0, target_side=100)
    decoded = decode_image(encode(noise(300, 900), "PNG"), limits)

    assert_rgb_array(decoded.pixels, 100, 300)


def test_small_image_is_never_upscaled():
    limits = ImageLimits(50_000_000, 8, 20_000, 20.0, target_side=896)
    decoded = decode_image(encode(noise(120, 60), "PNG"), limits)

    assert_rgb_array(decoded.pixels, 120, 60)
