"""Image decoding: bytes of an allowed raster format to RGB uint8 pixels, height by width by 3.

The model reads any array as RGB uint8 in height-width-channel order, so every
path here ends in that form, and every check that can reject an image runs on
the header before its pixels are decoded.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from worker.errors import CaptionError, ErrorCode
from worker.logs import fields
from worker.settings import Settings

logger = logging.getLogger(__name__)

# Magic numbers of the accepted formats, mapped to the Pillow plugin that may open them.
# AVIF, HEIF, JPEG 2000, ICO, PSD and the rest stay out: rare in uploads, and each extra
# decoder is more attack surface for untrusted bytes.
_MAGIC_NUMBERS: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"WEBP", 8, "WEBP"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
)
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

# Modes that carry more than 8 bits per sample; they are rescaled by their value range.
_HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_WHITE = (255, 255, 255, 255)

# The pixel count in the message of Pillow's DecompressionBombError (checked on Pillow 13.0).
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on decoded images and the side that large images are scaled down to."""

    max_pixels: int
    min_side: int
    max_side: int
    max_aspect_ratio: float
    # Images whose shorter side is longer than this are scaled down to it; None keeps full size.
    target_side: int | None

    @classmethod
    def from_settings(cls, settings: Settings, target_side: int | None) -> ImageLimits:
        return cls(
            max_pixels=settings.max_image_pixels,
            min_side=settings.min_image_side,
            max_side=settings.max_image_side,
            max_aspect_ratio=settings.max_aspect_ratio,
            target_side=target_side,
        )


@dataclass(frozen=True)
class DecodedImage:
    """Decoded pixels with the sizes before and after scaling, both in display orientation."""

    pixels: np.ndarray  # uint8, height x width x 3, C-contiguous
    width: int
    height: int
    original_width: int
    original_height: int
    format: str
    frames: int
    decode_seconds: float


def decode_image(data: bytes, limits: ImageLimits) -> DecodedImage:
    """Decode the first frame of an image into RGB uint8 pixels within `limits`.

    Raises CaptionError: empty_object for no bytes, unsupported_format for anything
    but JPEG, PNG, GIF, WebP, BMP or TIFF, image_too_large over max_pixels,
    bad_dimensions for a side or aspect ratio out of bounds, corrupt_image when
    the bytes do not decode completely.
    """
    started = time.perf_counter()
    if not data:
        raise CaptionError(ErrorCode.EMPTY_OBJECT, "image data is empty (0 bytes)")
    image_format = sniff_format(data)
    _keep_pillow_limit_above(limits.max_pixels)

    image = _open_header(data, image_format, limits)
    header_size = image.size
    frames = _count_frames(image, data, image_format, limits)
    if image_format == "JPEG" and limits.target_side:
        # Decode at 1/2, 1/4 or 1/8 scale while both sides stay >= target_side.
        image.draft(None, (limits.target_side, limits.target_side))
    _load_pixels(image, data, image_format)

    stored_size = image.size
    image = _apply_orientation(image)
    # Report the header's size, turned like the pixels when the orientation swapped the axes.
    original_width, original_height = header_size if image.size == stored_size else header_size[::-1]
    rgb = _to_rgb(image)
    rgb = _scale_down(rgb, limits.target_side)

    pixels = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    return DecodedImage(
        pixels=pixels,
        width=pixels.shape[1],
        height=pixels.shape[0],
        original_width=original_width,
        original_height=original_height,
        format=image_format,
        frames=frames,
        decode_seconds=time.perf_counter() - started,
    )


def sniff_format(data: bytes) -> str:
    """Return the accepted format that the leading bytes name; raise unsupported_format otherwise."""
    for magic, offset, image_format in _MAGIC_NUMBERS:
        if data[offset : offset + len(magic)] == magic:
            if image_format == "WEBP" and not data.startswith(b"RIFF"):
                continue
            return image_format
    raise CaptionError(
        ErrorCode.UNSUPPORTED_FORMAT,
        f"{_describe_unsupported(data)} is not an accepted image format; expected JPEG, PNG, GIF, WebP, BMP or TIFF",
    )


def _describe_unsupported(data: bytes) -> str:
    head = data[:256].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"%PDF"):
        return "PDF"
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096]):
        return "SVG"
    if data[4:8] == b"ftyp":
        brand = data[8:12].decode("ascii", errors="replace").strip()
        return f"ISO media ({brand}, such as HEIC or AVIF)"
    if head.startswith((b"<", b"{", b"[")):
        return "text"
    return "data of unknown format"


def _keep_pillow_limit_above(max_pixels: int) -> None:
    # Pillow raises DecompressionBombError in open() above 2 * MAX_IMAGE_PIXELS, which must
    # not reject images that max_image_pixels allows. Our own check rejects the rest first.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _open_header(data: bytes, image_format: str, limits: ImageLimits) -> Image.Image:
    """Open the image lazily (header only) and check its size before any pixel is decoded."""
    try:
        image = Image.open(io.BytesIO(data), formats=[image_format])
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(exc, "image", limits) from None
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types on bad headers
        raise _header_error(data, image_format, exc) from None

    width, height = image.size
    if width * height > limits.max_pixels:
        raise CaptionError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"image is {width}x{height} = {width * height} pixels, maximum {limits.max_pixels} (--max-image-pixels)",
        )
    _check_dimensions(width, height, limits)
    return image


def _check_dimensions(width: int, height: int, limits: ImageLimits) -> None:
    short_side, long_side = sorted((width, height))
    if short_side < limits.min_side:
        raise CaptionError(
            ErrorCode.BAD_DIMENSIONS,
            f"image is {width}x{height}, shorter side below {limits.min_side} pixels (--min-image-side)",
        )
    if long_side > limits.max_side:
        raise CaptionError(
            ErrorCode.BAD_DIMENSIONS,
            f"image is {width}x{height}, longer side above {limits.max_side} pixels (--max-image-side)",
        )
    if long_side / short_side > limits.max_aspect_ratio:
        raise CaptionError(
            ErrorCode.BAD_DIMENSIONS,
            f"image is {width}x{height}, aspect ratio {long_side / short_side:.1f} above "
            f"{limits.max_aspect_ratio:g} (--max-aspect-ratio)",
        )


def _count_frames(image: Image.Image, data: bytes, image_format: str, limits: ImageLimits) -> int:
    try:
        frames = getattr(image, "n_frames", 1)
        image.seek(0)
    except Image.DecompressionBombError as exc:
        # A GIF frame may declare a larger size than the image's header.
        raise _too_many_pixels(exc, "a frame", limits) from None
    except Exception as exc:  # noqa: BLE001 - walking frames parses the whole file
        raise _data_error(data, image_format, f"could not read the {image_format} frames", exc) from None
    return frames


def _load_pixels(image: Image.Image, data: bytes, image_format: str) -> None:
    # A truncated file fails here instead of being decoded half grey, because
    # ImageFile.LOAD_TRUNCATED_IMAGES stays False.
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, zlib.error...
        raise _data_error(data, image_format, f"could not decode the {image_format} pixel data", exc) from None


def _too_many_pixels(exc: Image.DecompressionBombError, what: str, limits: ImageLimits) -> CaptionError:
    # Pillow raises this above twice its own limit, which is kept at or above max_pixels,
    # so the image is over max_pixels either way. Its message names Pillow's limit, not ours.
    match = _BOMB_PIXELS.search(str(exc))
    size = f"{match.group(1)} pixels" if match else f"more than {2 * Image.MAX_IMAGE_PIXELS} pixels"
    return CaptionError(
        ErrorCode.IMAGE_TOO_LARGE, f"{what} is {size}, maximum {limits.max_pixels} (--max-image-pixels)"
    )


def _header_error(data: bytes, image_format: str, exc: Exception) -> CaptionError:
    """Return a corrupt_image error that explains why Pillow could not open the header of an accepted format."""
    png_size = _png_header_size(data) if image_format == "PNG" else None
    if png_size is not None and 0 in png_size:
        message = f"PNG header declares {png_size[0]}x{png_size[1]} pixels, so the image has no pixels"
        return CaptionError(ErrorCode.CORRUPT_IMAGE, message)
    if isinstance(exc, UnidentifiedImageError) and not _ends_early(data, image_format):
        # Pillow drops the plugin's reason here, and its message shows only the repr of a buffer.
        message = (
            f"could not read the {image_format} header: "
            f"the data starts like {image_format} but the header is invalid"
        )
        return CaptionError(ErrorCode.CORRUPT_IMAGE, message)
    return _data_error(data, image_format, f"could not read the {image_format} header", exc)


def _data_error(data: bytes, image_format: str, failure: str, exc: Exception) -> CaptionError:
    """Return a corrupt_image error that reports truncation when the data looks cut short, else Pillow's reason."""
    if _is_truncation(exc) or _ends_early(data, image_format):
        return CaptionError(
            ErrorCode.CORRUPT_IMAGE, f"{failure}: image data is truncated or incomplete ({len(data)} bytes)"
        )
    reason = str(exc) or type(exc).__name__
    return CaptionError(ErrorCode.CORRUPT_IMAGE, f"{failure}: {reason}")


def _is_truncation(exc: Exception) -> bool:
    # Pillow 13.0 reports data that ends early as "image file is truncated",
    # "Truncated File Read" or "truncated PNG file", and some plugins let EOFError
    # or struct.error through.
    return isinstance(exc, (EOFError, struct.error)) or "truncated" in str(exc).lower()


def _ends_early(data: bytes, image_format: str) -> bool:
    """Return True when the data lacks the end marker or the length that its format declares.

    Only a hint for data that already failed to decode, because a JPEG may carry bytes
    after its end-of-image marker.
    """
    tail = data[-16:].rstrip(b"\x00")
    if image_format == "JPEG":
        return not tail.endswith(b"\xff\xd9")
    if image_format == "PNG":
        return b"IEND" not in tail
    if image_format == "GIF":
        return not tail.endswith(b"\x3b")
    if image_format == "WEBP" and len(data) >= 8:
        # The RIFF header gives the length of everything after its first 8 bytes.
        return len(data) < 8 + int.from_bytes(data[4:8], "little")
    if image_format == "BMP" and len(data) >= 6:
        # The file header gives the file's length, which some writers leave at 0.
        return len(data) < int.from_bytes(data[2:6], "little")
    if image_format == "TIFF":
        # The first image file directory must start inside the data.
        byte_order = "little" if data.startswith(b"II") else "big"
        return len(data) < 8 or len(data) <= int.from_bytes(data[4:8], byte_order)
    return False


def _png_header_size(data: bytes) -> tuple[int, int] | None:
    """Return the width and height in a PNG's IHDR chunk, or None when the data ends before them."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _apply_orientation(image: Image.Image) -> Image.Image:
    # A malformed EXIF block must not cost the caption, so the image goes on unrotated.
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - EXIF parsing raises many types on bad data
        logger.warning(
            "ignoring malformed EXIF orientation", extra=fields(error=f"{type(exc).__name__}: {exc}")
        )
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB: composite transparency on white, rescale high-bit samples."""
    if image.mode in _HIGH_BIT_MODES:
        return _rescale_to_8_bits(image).convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise CaptionError(
            ErrorCode.UNSUPPORTED_FORMAT, f"pixel mode {image.mode} cannot be converted to RGB: {exc}"
        ) from None


def _rescale_to_8_bits(image: Image.Image) -> Image.Image:
    """Map the range of sample values onto 0..255, so 16-bit and float images keep their levels."""
    # One float32 copy, then in-place arithmetic: 4 bytes per pixel at the peak.
    values = np.array(image, dtype=np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        if not finite.any():
            return Image.new("L", image.size, 0)
        values[~finite] = values[finite].min()
    low = float(values.min())
    high = float(values.max())
    if high <= low:
        # A flat image has no range to stretch; keep its value where it fits in 8 bits.
        level = int(np.clip(low / 257 if image.mode.startswith("I;16") else low, 0, 255))
        return Image.new("L", image.size, level)

    values -= low
    values *= 255.0 / (high - low)
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return Image.fromarray(values.astype(np.uint8))


def _scale_down(image: Image.Image, target_side: int | None) -> Image.Image:
    # Gemma 3 squashes every image to a square, so each axis needs target_side pixels:
    # the shorter side is scaled to target_side, keeping the aspect ratio, never up.
    if not target_side:
        return image
    width, height = image.size
    short_side = min(width, height)
    if short_side <= target_side:
        return image
    scale = target_side / short_side
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
