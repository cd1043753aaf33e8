"""Decode images from real photo folders into RGB, safely and fast.

Everything that can go wrong with a file (not an image, truncated, a decompression bomb, an odd pixel mode)
becomes an `ImageDecodeError` whose message is a short reason, so readers can skip, count and report bad files.
This runs in decode workers over large folders: each file is opened once, decoded once, at reduced scale
when the format allows (JPEG draft mode), and converted without intermediate copies where Pillow allows it.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

from retrieval.data.scan import IMAGE_EXTENSIONS  # noqa: F401 - defined with the scan, which needs no numpy

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own hard limit (2 * MAX_IMAGE_PIXELS): about 13k x 13k

_ORIENTATION_TAG = 0x0112
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # these EXIF orientations swap width and height
_WHITE = (255, 255, 255)
# Past 3x the target size Pillow first box-reduces by an integer factor, then resamples: several times faster on
# photos, and at this gap the docs call the result indistinguishable from a full bicubic resample.
_REDUCING_GAP = 3.0


class ImageDecodeError(Exception):
    """A file could not be turned into an RGB image; str(e) is a short human reason ("truncated file")."""


def decode_image(
    source: str | os.PathLike[str] | bytes,
    *,
    target_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode `source` (a path or encoded bytes) into an RGB image, upright per its EXIF orientation.

    target_size: the caller will shrink the image to about this many pixels on its short side, so a JPEG may be
        decoded at 1/2, 1/4 or 1/8 scale (never below target_size on either side).
    max_pixels: refuse images whose header claims more pixels than this, before any pixel is decoded. Pillow
        itself refuses anything over 2 * Image.MAX_IMAGE_PIXELS at open, so a larger value has no effect.
    """
    img, _, _ = _decode(source, target_size, max_pixels)
    return img


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """CLIP's eval preprocessing: bicubic resize of the short side to `size`, then a centre crop. (size, size, 3).

    Sizes and crop offsets follow torchvision's Resize(size) + CenterCrop(size), so the pixels match what
    OpenCLIP's own transform sees. Resizing only the crop box does resize-then-crop in one pass, without ever
    materialising the full-width resized image.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    # torchvision: the short side becomes `size`, the long side is truncated, not rounded.
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=_REDUCING_GAP)
    # np.array, not asarray: Pillow's array view is read-only, and torch warns on (and cannot share) those.
    return np.array(out)  # (size, size, 3) uint8


def load_for_model(
    source: str | os.PathLike[str] | bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, int, int]:
    """Decode and preprocess for a model: (uint8 (size, size, 3) array, original width, original height).

    The original size is the full-resolution size after EXIF orientation (read from the header, so JPEG draft
    decoding at reduced scale does not shrink it): what a user would call the photo's size.
    """
    img, width, height = _decode(source, size, max_pixels)
    return resize_center_crop(img, size), width, height


def _decode(
    source: str | os.PathLike[str] | bytes, target_size: int | None, max_pixels: int
) -> tuple[Image.Image, int, int]:
    """The one decode path: (RGB image, full-size width, full-size height), both sizes after EXIF orientation."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_stream(io.BytesIO(source), target_size, max_pixels, empty=len(source) == 0)
    try:
        # We own the file object, so it is closed here even for multi-frame formats (GIF, TIFF), for which
        # Pillow would otherwise keep the file open until the image is garbage collected.
        with open(source, "rb") as fp:
            return _decode_stream(fp, target_size, max_pixels, empty=None)
    except FileNotFoundError:
        raise ImageDecodeError("no such file") from None
    except IsADirectoryError:
        raise ImageDecodeError("is a directory") from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except OSError as e:  # I/O errors from the disk itself; decoding errors are already ImageDecodeError
        raise ImageDecodeError(f"cannot read file: {e.strerror or e}") from None


def _decode_stream(
    fp: io.BufferedIOBase, target_size: int | None, max_pixels: int, *, empty: bool | None
) -> tuple[Image.Image, int, int]:
    # Malformed files make Pillow raise almost anything (OSError, SyntaxError, EOFError, struct.error,
    # IndexError, ...), so everything raised while Pillow reads the file is a property of the file.
    try:
        img = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"too large: {_pixels_in_message(e)}") from None
    except Exception as e:
        if empty is None:
            empty = _stream_is_empty(fp)
        raise ImageDecodeError("empty file" if empty else _reason(e)) from None

    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(f"too large: {width}x{height} pixels exceeds the {max_pixels}-pixel limit")
    try:
        if target_size is not None:
            img.draft("RGB", (target_size, target_size))  # JPEG only; a no-op for other formats
        img.load()  # decode every pixel now, so truncated files fail here and not in the model's collate
        orientation = _orientation(img)
        if orientation in _ROTATED_ORIENTATIONS:
            width, height = height, width
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            ImageOps.exif_transpose(img, in_place=True)  # in place: no copy for the common upright photo
        rgb = _to_rgb(img)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:  # raised by some formats when seeking frames
        raise ImageDecodeError(f"too large: {_pixels_in_message(e)}") from None
    except Exception as e:
        raise ImageDecodeError(_reason(e)) from None
    return rgb, width, height


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 = upright); a broken EXIF block is not a reason to lose the photo."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if value in range(1, 9) else 1
    except Exception:
        return 1


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: transparency onto white, high bit depths scaled (not clipped) to 8 bits."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I":
        return _gray_to_rgb(_scale_int(np.asarray(img)))
    if mode == "F":
        return _gray_to_rgb(_scale_float(np.asarray(img)))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or img.has_transparency_data:
        if mode == "La":  # premultiplied; Pillow converts it to LA only
            img = img.convert("LA")
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", img.size, _WHITE)
        out.paste(rgba, mask=rgba)  # alpha blend over white; the mask is rgba's alpha band
        return out
    if mode in ("1", "L", "P", "CMYK", "YCbCr", "RGBX", "HSV"):
        return img.convert("RGB")
    raise ImageDecodeError(f"unsupported mode {mode}")


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(gray, "L").convert("RGB")


def _scale_int(arr: np.ndarray) -> np.ndarray:
    """Integer grey levels to uint8. 16-bit data (I;16*, or 'I' within 0..65535) keeps its high byte.

    Mode 'I' does not say its bit depth: values within 0..255 are taken as 8-bit data widened by the format,
    anything else within 0..65535 as 16-bit, and anything wider is stretched from its own min to max.
    """
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi <= 255:
        return arr.astype(np.uint8)
    if lo >= 0 and hi <= 65535:
        # The high byte: exact for 8-bit values replicated into 16 bits (v * 257), and mid-grey stays mid-grey.
        return (arr.astype(np.uint32) >> 8).astype(np.uint8)
    return _stretch(arr.astype(np.float64), lo, hi)


def _scale_float(arr: np.ndarray) -> np.ndarray:
    """Float grey levels to uint8: 0..1 (the usual convention) or 0..255 taken as is, else min-max stretched."""
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return np.rint(arr * 255.0).astype(np.uint8)
    if lo >= 0.0 and hi <= 255.0:
        return np.rint(arr).astype(np.uint8)
    return _stretch(arr, lo, hi)


def _stretch(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _reason(exc: BaseException) -> str:
    """A short human reason for a Pillow failure; the exception text only where it says something useful."""
    message = str(exc)
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image"
    if isinstance(exc, EOFError) or "truncated" in message.lower() or "broken data stream" in message:
        return "truncated file"
    first_line = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    return f"corrupt image: {first_line[:120]}"


def _pixels_in_message(exc: BaseException) -> str:
    """Pillow's own bomb check fires at open, before we see the size: keep its numbers, drop the alarm."""
    return str(exc).split(", could be", 1)[0].lower().rstrip(".")


def _stream_is_empty(fp: io.BufferedIOBase) -> bool:
    try:
        fp.seek(0, os.SEEK_END)
        return fp.tell() == 0
    except OSError:
        return False
