"""Tests for hidream_edit.images: decoding to RGB, input errors, and the E1.1 / E1-Full resizes."""

from __future__ import annotations

import io
import math
import os
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hidream_edit import images
from hidream_edit.errors import ImageInputError
from hidream_edit.images import (
    DEFAULT_MAX_PIXELS,
    E1_1_TARGET_SIDE,
    E1_FULL_SIDE,
    e1_1_target_size,
    open_image,
    resize_for_e1_1,
    resize_for_e1_full,
    resize_to,
)

MAX_AREA = E1_1_TARGET_SIDE**2
RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def _png_bytes(image: Image.Image, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **save_args)
    return buffer.getvalue()


def _png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims `width`x`height` but whose pixel data is only 4x4."""
    data = bytearray(_png_bytes(Image.new("RGB", (4, 4), RED)))
    # Signature (8) + IHDR length (4) + b"IHDR" (4), then width and height, then the chunk CRC.
    data[16:20] = struct.pack(">I", width)
    data[20:24] = struct.pack(">I", height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = image.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


# --- open_image: mode conversion -------------------------------------------------------------


def test_rgb_passes_through_unchanged(tmp_path: Path) -> None:
    source = Image.new("RGB", (3, 2), (10, 20, 30))
    source.putpixel((2, 1), (200, 100, 50))
    path = tmp_path / "plain.png"
    source.save(path)
    result = open_image(path)
    assert result.mode == "RGB"
    assert result.size == (3, 2)
    assert np.array_equal(np.asarray(result), np.asarray(source))


def test_rgba_transparent_pixels_become_white_and_partial_alpha_blends() -> None:
    source = Image.new("RGBA", (3, 1), (255, 0, 0, 255))
    source.putpixel((1, 0), (0, 0, 0, 0))
    source.putpixel((2, 0), (0, 0, 0, 128))
    result = open_image(_png_bytes(source))
    assert result.mode == "RGB"
    assert _pixel(result, (0, 0)) == RED
    assert _pixel(result, (1, 0)) == WHITE
    assert _close(_pixel(result, (2, 0)), (127, 127, 127), 1)


def test_la_transparent_pixel_becomes_white() -> None:
    source = Image.new("LA", (2, 1), (40, 255))
    source.putpixel((1, 0), (0, 0))
    result = open_image(_png_bytes(source))
    assert result.mode == "RGB"
    assert _pixel(result, (0, 0)) == (40, 40, 40)
    assert _pixel(result, (1, 0)) == WHITE


def test_palette_colours_are_kept() -> None:
    source = Image.new("P", (3, 1))
    source.putpalette([*RED, *GREEN, *BLUE] + [0] * (256 - 3) * 3)
    source.putdata([0, 1, 2])
    result = open_image(_png_bytes(source))
    assert result.mode == "RGB"
    assert [_pixel(result, (x, 0)) for x in range(3)] == [RED, GREEN, BLUE]


def test_palette_transparency_index_becomes_white() -> None:
    source = Image.new("P", (2, 1))
    source.putpalette([*RED, *BLUE] + [0] * (256 - 2) * 3)
    source.putdata([0, 1])
    result = open_image(_png_bytes(source, transparency=1))
    assert [_pixel(result, (x, 0)) for x in range(2)] == [RED, WHITE]


def test_gif_palette_transparency_becomes_white() -> None:
    source = Image.new("P", (2, 1))
    source.putpalette([*GREEN, *BLUE] + [0] * (256 - 2) * 3)
    source.putdata([0, 1])
    buffer = io.BytesIO()
    source.save(buffer, "GIF", transparency=1)
    result = open_image(buffer.getvalue())
    assert [_pixel(result, (x, 0)) for x in range(2)] == [GREEN, WHITE]


def test_pa_mode_image_object_is_composited_over_white() -> None:
    source = Image.new("PA", (2, 1))
    source.putpalette([*BLUE] + [0] * 255 * 3)
    source.putdata([(0, 255), (0, 0)])
    result = open_image(source)
    assert [_pixel(result, (x, 0)) for x in range(2)] == [BLUE, WHITE]


def test_cmyk_is_converted_to_rgb() -> None:
    source = Image.new("CMYK", (3, 1))
    source.putdata([(0, 0, 0, 0), (0, 255, 255, 0), (0, 0, 0, 255)])
    result = open_image(source)
    assert result.mode == "RGB"
    assert [_pixel(result, (x, 0)) for x in range(3)] == [WHITE, RED, (0, 0, 0)]


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
    result = open_image(path)
    assert result.mode == "RGB"
    assert _close(_pixel(result, (8, 8)), RED, 8)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_grayscale_is_scaled_not_clipped(mode: str) -> None:
    dtype = "<u2" if mode == "I;16" else ">u2"
    values = np.array([[0, 257, 32896, 65535]], dtype=dtype)
    source = Image.frombytes(mode, (4, 1), values.tobytes())
    result = open_image(source)
    assert result.mode == "RGB"
    assert [_pixel(result, (x, 0)) for x in range(4)] == [(0,) * 3, (1,) * 3, (128,) * 3, (255,) * 3]


def test_16_bit_png_file_is_scaled(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 65535, 25700]], dtype=np.uint16)).save(path)
    result = open_image(path)
    assert [_pixel(result, (x, 0)) for x in range(3)] == [(0,) * 3, (255,) * 3, (100,) * 3]


def test_32_bit_integer_mode_is_treated_as_16_bit_and_clamped() -> None:
    source = Image.fromarray(np.array([[-5, 0, 65535, 70000]], dtype=np.int32))
    assert source.mode == "I"
    result = open_image(source)
    assert [_pixel(result, (x, 0))[0] for x in range(4)] == [0, 0, 255, 255]


def test_16_bit_transparent_value_becomes_white() -> None:
    source = Image.frombytes("I;16", (2, 1), np.array([[1000, 0]], dtype="<u2").tobytes())
    source.info["transparency"] = 0
    result = open_image(source)
    assert [_pixel(result, (x, 0))[0] for x in range(2)] == [4, 255]


def test_grayscale_and_bilevel_become_rgb() -> None:
    gray = open_image(Image.new("L", (1, 1), 77))
    assert gray.mode == "RGB"
    assert _pixel(gray, (0, 0)) == (77, 77, 77)
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    result = open_image(bilevel)
    assert [_pixel(result, (x, 0)) for x in range(2)] == [(0, 0, 0), WHITE]


def test_float_image_in_unit_range_is_scaled_to_8_bit() -> None:
    source = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32))
    assert source.mode == "F"
    result = open_image(source)
    assert [_pixel(result, (x, 0))[0] for x in range(4)] == [0, 128, 255, 0]


def test_float_image_beyond_unit_range_uses_0_to_255() -> None:
    source = Image.fromarray(np.array([[2.0, 100.4, 300.0, -3.0]], dtype=np.float32))
    result = open_image(source)
    assert [_pixel(result, (x, 0))[0] for x in range(4)] == [2, 100, 255, 0]


def test_open_accepts_path_str_bytes_stream_and_image(tmp_path: Path) -> None:
    source = Image.new("RGB", (5, 4), GREEN)
    path = tmp_path / "green.png"
    source.save(path)
    data = path.read_bytes()
    with path.open("rb") as stream:
        from_stream = open_image(stream)
    for result in (open_image(path), open_image(str(path)), open_image(data), from_stream, open_image(source)):
        assert result.mode == "RGB"
        assert result.size == (5, 4)
        assert _pixel(result, (0, 0)) == GREEN


def test_open_does_not_modify_or_return_the_callers_image() -> None:
    source = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    result = open_image(source)
    assert result is not source
    assert source.mode == "RGBA"
    assert _pixel(result, (0, 0)) == WHITE


def test_exif_orientation_6_rotates_clockwise(tmp_path: Path) -> None:
    stored = Image.new("RGB", (64, 32), RED)
    stored.paste(BLUE, (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, quality=95, exif=exif.tobytes())

    result = open_image(path)
    assert result.size == (32, 64)
    # Rotating 90 degrees clockwise moves the stored left half (red) to the top.
    assert _close(_pixel(result, (16, 8)), RED, 12)
    assert _close(_pixel(result, (16, 56)), BLUE, 12)


def test_exif_without_orientation_keeps_size(tmp_path: Path) -> None:
    path = tmp_path / "plain.jpg"
    Image.new("RGB", (64, 32), RED).save(path, quality=95)
    assert open_image(path).size == (64, 32)


# --- open_image: errors ----------------------------------------------------------------------


def _assert_input_error(excinfo: pytest.ExceptionInfo[ImageInputError], name: str) -> str:
    assert type(excinfo.value) is ImageInputError
    message = str(excinfo.value)
    assert name in message
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(ImageInputError) as excinfo:
        open_image(path)
    assert "not found" in _assert_input_error(excinfo, "nope.png")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    folder = tmp_path / "photos.png"
    folder.mkdir()
    with pytest.raises(ImageInputError) as excinfo:
        open_image(str(folder))
    assert "directory" in _assert_input_error(excinfo, "photos.png")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageInputError) as excinfo:
        open_image(path)
    assert "empty" in _assert_input_error(excinfo, "empty.jpg")


def test_a_character_device_says_what_it_is() -> None:
    with pytest.raises(ImageInputError) as excinfo:
        open_image("/dev/zero")
    assert _assert_input_error(excinfo, "/dev/zero").endswith("is a character device, not an image file")


def test_a_fifo_says_what_it_is_and_is_never_opened(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes: the writer here unblocks such an open,
    so a check that opened the FIFO would end with some other message instead of hanging."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    opened_by_a_reader = threading.Event()

    def writer() -> None:
        handle = os.open(fifo, os.O_WRONLY)  # returns once anyone opens the FIFO for reading
        opened_by_a_reader.set()
        os.close(handle)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        with pytest.raises(ImageInputError) as excinfo:
            open_image(fifo)
        message = _assert_input_error(excinfo, "pipe.png")
        assert not opened_by_a_reader.is_set()
    finally:
        # Let the writer go: its open returns while a reader holds the FIFO open (a reader that closed at
        # once could be missed, and the join would wait out its whole timeout).
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            thread.join(timeout=30)
        finally:
            os.close(reader)
    assert not thread.is_alive()
    assert message.endswith("is a named pipe (FIFO), not an image file")


def test_a_symlink_to_a_directory_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "link.png").symlink_to(tmp_path / "folder")
    with pytest.raises(ImageInputError) as excinfo:
        open_image(tmp_path / "link.png")
    assert _assert_input_error(excinfo, "link.png").endswith("is a directory, not an image file")


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageInputError) as excinfo:
        open_image(path)
    assert "not a recognised image" in _assert_input_error(excinfo, "notes.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_fails_in_open_image(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noisy.save(buffer, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageInputError) as excinfo:
        open_image(path)
    assert "truncated or corrupt" in _assert_input_error(excinfo, path.name)


def test_corrupt_png_data(tmp_path: Path) -> None:
    data = bytearray(_png_bytes(Image.new("RGB", (32, 32), RED)))
    idat = data.index(b"IDAT")
    data[idat + 6 : idat + 14] = b"\xff" * 8
    path = tmp_path / "broken.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageInputError) as excinfo:
        open_image(path)
    _assert_input_error(excinfo, "broken.png")


def test_zero_sized_image() -> None:
    with pytest.raises(ImageInputError) as excinfo:
        open_image(Image.new("RGB", (0, 5)))
    assert "zero width or height" in _assert_input_error(excinfo, "<PIL image>")


def test_zero_bytes_input() -> None:
    with pytest.raises(ImageInputError) as excinfo:
        open_image(b"")
    _assert_input_error(excinfo, "<image bytes>")


def test_more_pixels_than_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (10, 10)).save(path)
    with pytest.raises(ImageInputError) as excinfo:
        open_image(path, max_pixels=99)
    assert "limit of 99 pixels" in _assert_input_error(excinfo, "big.png")
    assert open_image(path, max_pixels=100).size == (10, 10)


def test_pixel_limit_is_checked_from_header_before_decoding(tmp_path: Path) -> None:
    # 9000x9000 is over our default limit but under Pillow's, and the data is only 4x4: decoding
    # first would report a truncated file instead of the size.
    assert DEFAULT_MAX_PIXELS < 9000 * 9000
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_header_size(9000, 9000))
    with pytest.raises(ImageInputError) as excinfo:
        open_image(path)
    message = _assert_input_error(excinfo, "bomb.png")
    assert "9000x9000" in message
    assert "truncated" not in message


@pytest.mark.filterwarnings("error")
def test_pillow_decompression_bomb_warning_becomes_our_error(tmp_path: Path) -> None:
    limit_before = Image.MAX_IMAGE_PIXELS
    assert limit_before is not None
    side = math.isqrt(limit_before) + 10  # above Pillow's warning threshold, below its hard error
    path = tmp_path / "warned.png"
    path.write_bytes(_png_with_header_size(side, side))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageInputError) as excinfo:
            open_image(path)
    _assert_input_error(excinfo, "warned.png")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert limit_before == Image.MAX_IMAGE_PIXELS


def test_pillow_decompression_bomb_error_becomes_our_error(tmp_path: Path) -> None:
    limit_before = Image.MAX_IMAGE_PIXELS
    path = tmp_path / "huge.png"
    path.write_bytes(_png_with_header_size(30000, 30000))
    with pytest.raises(ImageInputError) as excinfo:
        open_image(path, max_pixels=10**12)
    assert "too large" in _assert_input_error(excinfo, "huge.png")
    assert limit_before == Image.MAX_IMAGE_PIXELS


def test_bad_stream_is_named_by_its_name_attribute(tmp_path: Path) -> None:
    path = tmp_path / "stream.bin"
    path.write_bytes(b"\x00" * 64)
    with path.open("rb") as stream, pytest.raises(ImageInputError) as excinfo:
        open_image(stream)
    _assert_input_error(excinfo, "stream.bin")


def test_unnamed_stream_gets_a_placeholder_name() -> None:
    with pytest.raises(ImageInputError) as excinfo:
        open_image(io.BytesIO(b"garbage"))
    _assert_input_error(excinfo, "<image stream>")


def test_non_positive_max_pixels_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="max_pixels must be positive, got 0"):
        open_image(Image.new("RGB", (1, 1)), max_pixels=0)


# --- E1.1 target size ------------------------------------------------------------------------


def _candidates(width: int, height: int) -> list[tuple[int, int]]:
    """Independent restatement of the four candidate sizes, in preference order."""
    while min(width, height) >= 2 * E1_1_TARGET_SIDE:
        width, height = width // 2, height // 2
    scale = math.sqrt(MAX_AREA / (width * height))
    widths = [round(width * scale) // 16 * 16, math.floor(width * scale) // 16 * 16]
    heights = [round(height * scale) // 16 * 16, math.floor(height * scale) // 16 * 16]
    return [(w, h) for w in widths for h in heights]


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1024, 1024), (1024, 1024)),
        # scale = sqrt(2**20 / 393216) = 1.63299: 836.1 -> 832, 1254.1 -> 1248.
        ((512, 768), (832, 1248)),
        # Short side 3000 >= 2048, so first halved to 2000x1500; scale 0.59121: 1182.4 -> 1168, 886.8 -> 880.
        ((4000, 3000), (1168, 880)),
        # scale = 1024 / 1440: 1365.3 -> 1360, 768 -> 768.
        ((1920, 1080), (1360, 768)),
        # scale = 0.83610: 2508.3 -> 2496, 418.0 -> 416.
        ((3000, 500), (2496, 416)),
        ((500, 3000), (416, 2496)),
        # Halved twice (4100 -> 2050 -> 1025), then 1025 * 1024 / 1025 = 1024.
        ((4100, 4100), (1024, 1024)),
        # Short side exactly 2048 is halved, to 1025x1024: scale 0.99951: 1024.5 -> 1024, 1023.5 -> 1024.
        # (Unhalved, 2051x2048 would give scale 0.49963: 1024.7 -> 1024, 1023.3 -> 1023 -> 1008.)
        ((2051, 2048), (1024, 1024)),
        # Short side 2047 is not halved: scale 0.50012: 1024.2 -> 1024, 1023.7 -> 1024.
        # (Halved, 1024x1023 would give scale 1.00049: 1024.50 -> 1024, 1023.49 -> 1023 -> 1008.)
        ((2048, 2047), (1024, 1024)),
        # Small inputs are upscaled to about one megapixel.
        ((100, 80), (1136, 912)),
        # scale 1.16614: 1170.8 -> 1168 either way; 895.6 rounds to 896 (fits: 1168 * 896 <= 2**20), floors to 880.
        ((1004, 768), (1168, 896)),
    ],
)
def test_e1_1_target_size_hand_computed(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert e1_1_target_size(*size) == expected


@pytest.mark.parametrize(
    "size",
    [(1024, 1024), (512, 768), (4000, 3000), (1920, 1080), (3000, 500), (333, 777), (7000, 2100), (17, 4099),
     (1004, 768), (1009, 600), (600, 1009)],
)  # fmt: skip
def test_e1_1_target_size_is_aligned_bounded_and_largest(size: tuple[int, int]) -> None:
    width, height = e1_1_target_size(*size)
    assert width % 16 == 0
    assert height % 16 == 0
    assert 0 < width * height <= MAX_AREA
    fitting = [c for c in _candidates(*size) if c[0] * c[1] <= MAX_AREA]
    best_area = max(w * h for w, h in fitting)
    assert width * height == best_area
    assert (width, height) == next(c for c in fitting if c[0] * c[1] == best_area)


def test_e1_1_target_size_is_close_to_one_megapixel_for_many_shapes() -> None:
    for width in range(200, 5000, 173):
        for height in range(200, 5000, 311):
            w, h = e1_1_target_size(width, height)
            assert w % 16 == 0 and h % 16 == 0
            assert 0.9 * MAX_AREA < w * h <= MAX_AREA


def test_e1_1_target_size_respects_custom_target_side() -> None:
    assert e1_1_target_size(512, 512, target_side=512) == (512, 512)
    w, h = e1_1_target_size(1920, 1080, target_side=768)
    assert w % 16 == 0 and h % 16 == 0 and w * h <= 768**2


def test_e1_1_target_size_rejects_absurd_aspect_ratio() -> None:
    with pytest.raises(ImageInputError, match="too elongated"):
        e1_1_target_size(100_000, 10)
    with pytest.raises(ImageInputError, match="image of 10x100000 is too elongated"):
        e1_1_target_size(10, 100_000)


def test_e1_1_target_size_rejects_non_positive_sizes() -> None:
    with pytest.raises(ValueError, match="image size must be positive, got 0x100"):
        e1_1_target_size(0, 100)
    with pytest.raises(ValueError, match="image size must be positive, got 100x-1"):
        e1_1_target_size(100, -1)
    with pytest.raises(ValueError, match="target_side must be at least 16, got 15"):
        e1_1_target_size(100, 100, target_side=15)
    assert e1_1_target_size(100, 100, target_side=16) == (16, 16)


# --- E1.1 resize -----------------------------------------------------------------------------


def _row_and_column_coded(width: int, height: int) -> Image.Image:
    """Each pixel stores its column in R/G high-low and its row in B, so crops are identifiable."""
    xs = np.arange(width)
    ys = np.arange(height)
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[..., 0] = (xs // 256)[None, :]
    array[..., 1] = (xs % 256)[None, :]
    array[..., 2] = (ys % 256)[:, None]
    return Image.fromarray(array)


@pytest.mark.parametrize(
    ("size", "crop_box"),
    [
        # 1120x933 -> target 1120x928; width already matches, so no resampling, and the crop
        # starts (933 - 928) // 2 = 2 rows down.
        ((1120, 933), (0, 2, 1120, 930)),
        ((933, 1120), (2, 0, 930, 1120)),
        ((1120, 936), (0, 4, 1120, 932)),
    ],
)
def test_resize_for_e1_1_is_a_centre_crop(size: tuple[int, int], crop_box: tuple[int, int, int, int]) -> None:
    source = _row_and_column_coded(*size)
    result = resize_for_e1_1(source)
    assert result.size == e1_1_target_size(*size)
    assert result.size == (crop_box[2] - crop_box[0], crop_box[3] - crop_box[1])
    assert np.array_equal(np.asarray(result), np.asarray(source.crop(crop_box)))


def test_resize_for_e1_1_covers_then_crops_when_resampling() -> None:
    # 1200x1000 -> target 1120x928. Width ratio 1.0714 < height ratio 1.0776, so the width is
    # matched: 1120 x round(1000 / (1200 / 1120)) = 1120x933, then crop 2 rows from the top.
    source = _row_and_column_coded(1200, 1000)
    result = resize_for_e1_1(source)
    assert result.size == (1120, 928)
    expected = source.resize((1120, 933), Image.Resampling.BICUBIC).crop((0, 2, 1120, 930))
    assert np.array_equal(np.asarray(result), np.asarray(expected))


@pytest.mark.parametrize("size", [(64, 48), (1920, 1080), (500, 3000), (4096, 2048)])
def test_resize_for_e1_1_output_matches_target_size(size: tuple[int, int]) -> None:
    source = Image.new("RGB", size, (30, 60, 90))
    result = resize_for_e1_1(source)
    assert result.size == e1_1_target_size(*size)
    assert result.mode == "RGB"
    assert _close(_pixel(result, (result.width // 2, result.height // 2)), (30, 60, 90), 1)


@pytest.mark.parametrize(
    ("size", "halvings"),
    [((4200, 2100), [(2100, 1050)]), ((2051, 2048), [(1025, 1024)]), ((4096, 4096), [(2048, 2048), (1024, 1024)]),
     ((2048, 2047), []), ((4095, 4095), [(2047, 2047)])],
)
def test_resize_for_e1_1_halves_large_inputs_with_box_filter(
    size: tuple[int, int], halvings: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Halve while the short side is at least twice the target: exactly 2048 is halved, 2047 is not."""
    calls: list[tuple[tuple[int, int], int]] = []
    original_resize = Image.Image.resize

    def recording_resize(self: Image.Image, size: tuple[int, int], resample: int | None = None, **kw: object):
        calls.append((tuple(size), resample))
        return original_resize(self, size, resample, **kw)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    result = resize_for_e1_1(Image.new("RGB", size))
    assert calls[: len(halvings)] == [(halved, Image.Resampling.BOX) for halved in halvings]
    assert all(resample != Image.Resampling.BOX for _, resample in calls[len(halvings) :])
    assert result.size == e1_1_target_size(*size)


# --- E1-Full and resize_to -------------------------------------------------------------------


def _three_stripes(width: int, height: int) -> Image.Image:
    """Green outer quarters, red and blue in the middle half."""
    image = Image.new("RGB", (width, height), GREEN)
    image.paste(RED, (width // 4, 0, width // 2, height))
    image.paste(BLUE, (width // 2, 0, 3 * width // 4, height))
    return image


def test_e1_full_default_stretches_whole_image() -> None:
    result = resize_for_e1_full(_three_stripes(400, 100))
    assert result.size == (E1_FULL_SIDE, E1_FULL_SIDE)
    assert _close(_pixel(result, (10, 384)), GREEN, 2)
    assert _close(_pixel(result, (288, 384)), RED, 2)
    assert _close(_pixel(result, (480, 384)), BLUE, 2)
    assert _close(_pixel(result, (757, 384)), GREEN, 2)


def test_e1_full_keep_aspect_keeps_the_whole_picture_at_its_aspect() -> None:
    # 400x100 (4:1) at about 768*768 pixels: 1536x384, all three stripes kept, none stretched.
    result = resize_for_e1_full(_three_stripes(400, 100), keep_aspect=True)
    assert result.size == (1536, 384)
    assert _close(_pixel(result, (10, 192)), GREEN, 2)
    assert _close(_pixel(result, (576, 192)), RED, 2)
    assert _close(_pixel(result, (960, 192)), BLUE, 2)
    assert _close(_pixel(result, (1525, 192)), GREEN, 2)


@pytest.mark.parametrize("size", [(1000, 750), (300, 1000), (4000, 1000), (77, 61), (768, 768), (2000, 1999)])
def test_e1_full_keep_aspect_size_rule(size: tuple[int, int]) -> None:
    width, height = resize_for_e1_full(Image.new("RGB", size), keep_aspect=True).size
    assert width % 16 == 0 and height % 16 == 0
    assert 0.9 * E1_FULL_SIDE**2 <= width * height <= E1_FULL_SIDE**2
    assert abs(width / height - size[0] / size[1]) <= 0.05 * size[0] / size[1]


def test_e1_full_keep_aspect_refuses_a_sliver_naming_e1_full() -> None:
    with pytest.raises(ImageInputError, match="too elongated to resize for E1-Full"):
        resize_for_e1_full(Image.new("RGB", (40000, 10)), keep_aspect=True)


def test_e1_full_custom_side() -> None:
    assert resize_for_e1_full(Image.new("RGB", (30, 20)), side=64).size == (64, 64)
    assert resize_for_e1_full(Image.new("RGB", (30, 20)), side=64, keep_aspect=True).size == (64, 48)
    assert resize_for_e1_full(Image.new("RGB", (30, 20)), side=1).size == (1, 1)
    with pytest.raises(ValueError, match="side must be positive, got 0"):
        resize_for_e1_full(Image.new("RGB", (30, 20)), side=0)


def test_resize_to_uses_bicubic_and_exact_size() -> None:
    source = _row_and_column_coded(96, 64)
    result = resize_to(source, (150, 77))
    assert result.size == (150, 77)
    expected = source.resize((150, 77), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(result), np.asarray(expected))


def test_resize_to_rejects_empty_size() -> None:
    with pytest.raises(ValueError, match="size must be positive, got 0x4"):
        resize_to(Image.new("RGB", (4, 4)), (0, 4))


def test_module_logger_name() -> None:
    assert images.logger.name == "hidream_edit.images"
