"""The bad-file zoo and the odd pixel modes that real photo folders hold, all generated in tmp_path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.data.images import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    decode_image,
    load_for_model,
    resize_center_crop,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _save(img: Image.Image, path: Path, fmt: str | None = None, **kwargs) -> Path:
    img.save(path, fmt, **kwargs)
    return path


def _pattern(w: int = 48, h: int = 32) -> Image.Image:
    """Distinct, exactly reproducible pixels for lossless round trips."""
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 5, y * 7, (x + y) * 3], -1).astype(np.uint8))


def _smooth(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(
        np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1).astype(np.uint8)
    )


def _close(pixel: tuple[int, ...], expected: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True))


def test_extensions_are_lower_case_with_dot():
    assert {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"} == IMAGE_EXTENSIONS


# --- the bad-file zoo -------------------------------------------------------------------------------------------


def test_truncated_jpeg_fails_at_decode(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(noise).save(data, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match="^truncated file$"):
        decode_image(path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="^empty file$"):
        decode_image(path)
    with pytest.raises(ImageDecodeError, match="^empty file$"):
        decode_image(b"")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("shopping list: eggs, milk\n")
    with pytest.raises(ImageDecodeError, match="^not an image$"):
        decode_image(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageDecodeError, match="^no such file$"):
        decode_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageDecodeError):
        decode_image(tmp_path)


def test_png_with_webp_extension_decodes_by_content(tmp_path):
    src = _pattern()
    path = _save(src, tmp_path / "really_a_png.webp", "PNG")
    out = decode_image(path)
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(src))


def test_decompression_bomb_is_refused(tmp_path):
    path = _save(Image.new("RGB", (3000, 3000), GREEN), tmp_path / "big.png")
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError) as err:
        decode_image(path, max_pixels=1_000_000)
    assert str(err.value) == "too large: 3000x3000 pixels exceeds the 1000000-pixel limit"
    assert Image.MAX_IMAGE_PIXELS == limit_before  # the global is never touched
    assert decode_image(path, max_pixels=9_000_000).size == (3000, 3000)  # the limit is inclusive


def test_bomb_check_reads_only_the_header(tmp_path):
    """A file cut right after its header: only a check made before decoding can call it too large."""
    full = io.BytesIO()
    Image.new("RGB", (3000, 3000), GREEN).save(full, "PNG")
    path = tmp_path / "header_only.png"
    path.write_bytes(full.getvalue()[:200])
    with pytest.raises(ImageDecodeError, match="^too large: "):
        decode_image(path, max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError, match="^truncated file$"):
        decode_image(path)


# --- pixel modes ------------------------------------------------------------------------------------------------


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    levels = np.zeros((8, 24), np.uint16)
    levels[:, 8:16] = 32768  # mid-grey
    levels[:, 16:] = 65535
    path = _save(Image.fromarray(levels), tmp_path / "gray16.png")
    assert Image.open(path).mode == "I;16"  # the file really is 16-bit
    out = np.asarray(decode_image(path))
    assert out.shape == (8, 24, 3)
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 12].tolist() == [128, 128, 128]
    assert out[0, 20].tolist() == [255, 255, 255]


def test_16bit_big_endian_and_32bit_int_tiff(tmp_path):
    mid = np.full((4, 4), 32768, np.uint16)
    big_endian = _save(Image.fromarray(mid.astype(">u2")), tmp_path / "be.tif")
    int32 = _save(Image.fromarray(mid.astype(np.int32)), tmp_path / "i32.tif")
    assert Image.open(big_endian).mode == "I;16B"
    assert Image.open(int32).mode == "I"
    assert decode_image(big_endian).getpixel((0, 0)) == (128, 128, 128)
    assert decode_image(int32).getpixel((0, 0)) == (128, 128, 128)


def test_float_tiff(tmp_path):
    path = _save(Image.fromarray(np.full((4, 4), 0.5, np.float32)), tmp_path / "float.tif")
    assert Image.open(path).mode == "F"
    assert _close(decode_image(path).getpixel((0, 0)), (128, 128, 128), tol=1)


def test_cmyk_jpeg(tmp_path):
    path = _save(Image.new("CMYK", (32, 32), (255, 0, 0, 0)), tmp_path / "cyan.jpg")
    assert Image.open(path).mode == "CMYK"
    out = decode_image(path)
    assert out.mode == "RGB"
    assert _close(out.getpixel((16, 16)), (0, 255, 255))


def test_palette_png_transparency_becomes_white(tmp_path):
    img = Image.new("P", (16, 8), 1)
    img.putpalette([*RED, *BLUE])
    img.paste(0, (0, 0, 8, 8))  # left half: index 0, the transparent one (red underneath)
    path = _save(img, tmp_path / "palette.png", transparency=0)
    out = decode_image(path)
    assert out.getpixel((2, 2)) == WHITE
    assert out.getpixel((12, 2)) == BLUE


def test_la_and_rgba_composite_on_white(tmp_path):
    la = Image.new("LA", (24, 4))
    la.paste((0, 0), (0, 0, 8, 4))  # black, fully transparent
    la.paste((0, 255), (8, 0, 16, 4))  # black, opaque
    la.paste((0, 128), (16, 0, 24, 4))  # black, half
    out = decode_image(_save(la, tmp_path / "la.png"))
    assert out.getpixel((2, 2)) == WHITE
    assert out.getpixel((10, 2)) == (0, 0, 0)
    assert _close(out.getpixel((20, 2)), (127, 127, 127), tol=1)

    rgba = Image.new("RGBA", (4, 4), (*RED, 128))
    assert _close(decode_image(_save(rgba, tmp_path / "rgba.png")).getpixel((0, 0)), (255, 127, 127), tol=1)


def test_bilevel_and_grayscale(tmp_path):
    bilevel = Image.new("1", (8, 8), 0)
    bilevel.paste(1, (4, 0, 8, 8))
    out = decode_image(_save(bilevel, tmp_path / "bw.png"))
    assert (out.getpixel((0, 0)), out.getpixel((6, 0))) == ((0, 0, 0), WHITE)
    assert (
        decode_image(_save(Image.new("L", (8, 8), 77), tmp_path / "gray.png")).getpixel((0, 0)) == (77,) * 3
    )


def test_exif_orientation_6_rotates(tmp_path):
    img = Image.new("RGB", (48, 32), BLUE)
    img.paste(RED, (0, 0, 16, 16))  # a marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = _save(img, tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    out = decode_image(path)
    assert out.size == (32, 48)
    assert _close(out.getpixel((28, 4)), RED)  # clockwise: the stored top-left is now the top-right
    assert _close(out.getpixel((4, 4)), BLUE)


def test_exif_orientation_original_size_survives_draft(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(_smooth(800, 400), tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert decode_image(path, target_size=100).size == (100, 200)  # draft at 1/4, then rotated
    arr, width, height = load_for_model(path, 100)
    assert arr.shape == (100, 100, 3)
    assert (width, height) == (400, 800)  # full size, upright


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 2
    out = decode_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((8, 8)) == RED


@pytest.mark.parametrize(
    ("name", "fmt", "kwargs"),
    [("a.tif", "TIFF", {}), ("a.bmp", "BMP", {}), ("a.webp", "WEBP", {"lossless": True})],
)
def test_lossless_formats_round_trip(tmp_path, name, fmt, kwargs):
    src = _pattern()
    out = decode_image(_save(src, tmp_path / name, fmt, **kwargs))
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(src))


def test_lossy_webp_and_bytes_source(tmp_path):
    src = _smooth(64, 48)
    path = _save(src, tmp_path / "photo.webp", quality=90)
    from_path, from_bytes = decode_image(path), decode_image(path.read_bytes())
    assert from_path.size == (64, 48)
    assert np.array_equal(np.asarray(from_path), np.asarray(from_bytes))
    assert np.abs(np.asarray(from_path, np.int16) - np.asarray(src, np.int16)).mean() < 4


# --- draft mode and model preprocessing -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> Path:
    return _save(_smooth(4000, 3000), tmp_path_factory.mktemp("big") / "big.jpg", quality=85)


def test_draft_mode_decodes_big_jpeg_at_reduced_scale(big_jpeg):
    out = decode_image(big_jpeg, target_size=224)
    assert out.mode == "RGB"
    assert out.width <= 1000  # 1/8 scale: 500x375
    assert min(out.size) >= 224
    assert decode_image(big_jpeg).size == (4000, 3000)  # no target: full size


def test_load_for_model_reports_full_size(big_jpeg):
    arr, width, height = load_for_model(big_jpeg, 224)
    assert (arr.shape, arr.dtype) == ((224, 224, 3), np.uint8)
    assert (width, height) == (4000, 3000)


def test_load_for_model_propagates_decode_errors(tmp_path):
    path = tmp_path / "report.png"
    path.write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    with pytest.raises(ImageDecodeError, match="^not an image$"):
        load_for_model(path, 32)


@pytest.mark.parametrize("size", [(600, 200), (200, 600), (10, 20), (224, 224)])
def test_resize_center_crop_shape_and_type(size):
    arr = resize_center_crop(_smooth(*size), 224)
    assert (arr.shape, arr.dtype) == ((224, 224, 3), np.uint8)
    assert arr.flags.writeable  # torch.from_numpy and default_collate warn on read-only arrays


def test_resize_center_crop_takes_the_centre():
    img = Image.new("RGB", (600, 200), RED)
    img.paste(GREEN, (200, 0, 400, 200))
    img.paste(BLUE, (400, 0, 600, 200))
    arr = resize_center_crop(img, 224)  # 672x224 after resize: the crop is exactly the middle third
    assert (arr[:, 8:216] == GREEN).all()


@pytest.mark.parametrize("size", [(640, 480), (301, 517), (4000, 3000)])
def test_resize_center_crop_matches_clip_preprocessing(size):
    """torchvision Resize(224, BICUBIC) + CenterCrop(224) on a PIL image, done the slow, obvious way."""
    img, w, h = _smooth(*size), *size
    new_w, new_h = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)
    left, top = int(round((new_w - 224) / 2.0)), int(round((new_h - 224) / 2.0))
    resized = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    expected = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.int16)
    diff = np.abs(resize_center_crop(img, 224).astype(np.int16) - expected)
    assert diff.mean() < 0.5
    assert diff.max() <= 4
