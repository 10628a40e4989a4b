"""Image loading and resizing for HiDream-E1.1 and E1-Full editing.

Everything the pipeline receives goes through `open_image`, so the model only ever sees
fully decoded, upright, 8-bit RGB pixels, and every bad input becomes one `ImageInputError`
line naming the file instead of a Pillow traceback halfway through a run.
"""

from __future__ import annotations

import io
import logging
import math
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hidream_edit.errors import ImageInputError
from hidream_edit.spec import SIDE_MULTIPLE
from hidream_edit.text import shown

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS: int = 64 * 1024 * 1024
E1_1_TARGET_SIDE = 1024
E1_FULL_SIDE = 768


ImageSource = str | Path | bytes | bytearray | memoryview | BinaryIO | Image.Image

_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def open_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `source` completely into an upright 8-bit RGB image.

    The pixel count is checked from the header before any pixel data is decoded, so a
    decompression bomb is refused without allocating it. Decoding happens here rather than
    lazily so a truncated file fails now, with its name, not deep inside the pipeline.
    Pillow's global `MAX_IMAGE_PIXELS` is left untouched; `max_pixels` is the limit that applies
    (Pillow still refuses images above twice its own limit, which is reported the same way).
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    name = _source_name(source)

    if isinstance(source, Image.Image):
        return _decode(source, name, max_pixels)

    if isinstance(source, (str, Path)):
        check_image_file(Path(source), name)
        stream: BinaryIO | str | Path = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageInputError(f"{name}: no image data (0 bytes)")
        stream = io.BytesIO(bytes(source))
    else:
        stream = source

    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below decides; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(stream)
    except Image.DecompressionBombError as exc:
        raise ImageInputError(f"{name}: image is too large to open safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageInputError(f"{name}: not a recognised image file") from exc
    except FileNotFoundError as exc:
        raise ImageInputError(f"{name}: file not found") from exc
    except IsADirectoryError as exc:
        raise ImageInputError(f"{name}: is a directory, not an image file") from exc
    except PermissionError as exc:
        raise ImageInputError(f"{name}: permission denied") from exc
    except Exception as exc:  # any decoder failure on untrusted input is a bad input
        raise ImageInputError(f"{name}: cannot open image ({_describe(exc)})") from exc

    with opened:
        return _decode(opened, name, max_pixels)


def e1_1_target_size(width: int, height: int, target_side: int = E1_1_TARGET_SIDE) -> tuple[int, int]:
    """Return the (width, height) that `resize_for_e1_1` produces for an image of this size.

    Exposed separately so callers can plan memory and report the working size before decoding.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if target_side < SIDE_MULTIPLE:
        raise ValueError(f"target_side must be at least {SIDE_MULTIPLE}, got {target_side}")
    width, height = _halved_size(width, height, target_side)
    return _pick_area_size(width, height, target_side)


def resize_for_e1_1(image: Image.Image, target_side: int = E1_1_TARGET_SIDE) -> Image.Image:
    """Resize to about `target_side`**2 pixels with 16-aligned sides, keeping the aspect ratio.

    Very large images are first halved with a box filter, which averages cleanly and keeps the
    final bicubic step from aliasing. Small images are upscaled, since E1.1 is trained near one
    megapixel. The returned image is a centre crop of the aspect-preserving cover resize.
    """
    target = e1_1_target_size(image.width, image.height, target_side)
    while min(image.size) >= 2 * target_side:
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
        logger.debug("halved input to %dx%d", image.width, image.height)
    logger.debug("E1.1 working size %dx%d", *target)
    return _cover_and_crop(image, target)


def model_input_size(resize: str, width: int, height: int, keep_aspect: bool = False) -> tuple[int, int]:
    """The working size a `width` x `height` source is brought to (`resize` as in ModelSpec), computed
    without the pixels so that a shape no model input can have is refused before anything loads."""
    if resize == "area":
        return e1_1_target_size(width, height)
    if keep_aspect:
        return _pick_area_size(width, height, E1_FULL_SIDE, "E1-Full")
    return E1_FULL_SIDE, E1_FULL_SIDE


def resize_for_e1_full(image: Image.Image, side: int = E1_FULL_SIDE, keep_aspect: bool = False) -> Image.Image:
    """Bring an image to the working size of E1-Full.

    The default stretches to `side` x `side`, as upstream does. `keep_aspect` resizes the whole
    picture (nothing cropped) to about `side`**2 pixels with the source's aspect ratio and sides that
    are multiples of 16; the few pixels of rounding are undone when the result is resized back.
    """
    if side <= 0:
        raise ValueError(f"side must be positive, got {side}")
    if keep_aspect:
        size = _pick_area_size(image.width, image.height, side, "E1-Full")
        logger.debug("E1-Full keep-aspect working size %dx%d", *size)
        return image.resize(size, Image.Resampling.BICUBIC)
    return image.resize((side, side), Image.Resampling.BICUBIC)


def resize_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize an edited output back to the source size, so the result lines up with the input."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive, got {width}x{height}")
    return image.resize((width, height), Image.Resampling.BICUBIC)


def _source_name(source: ImageSource) -> str:
    """Name the input in error messages the way the user would recognise it (escaped and cut: text.shown)."""
    if isinstance(source, (str, Path)):
        return shown(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<image bytes>"
    if isinstance(source, Image.Image):
        return shown(getattr(source, "filename", "") or "<PIL image>")
    name = getattr(source, "name", None)
    return shown(name) if isinstance(name, (str, bytes, Path)) and name else "<image stream>"


_SPECIAL_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_image_file(path: Path, name: str) -> None:
    """Give the common path mistakes their own clear message before Pillow sees them.

    Only stat() is used, never open(): opening a FIFO would block until someone writes to it.
    """
    try:
        status = path.stat()
    except FileNotFoundError:
        raise ImageInputError(f"{name}: file not found") from None
    except OSError as exc:
        raise ImageInputError(f"{name}: cannot access file ({exc.strerror or _describe(exc)})") from exc
    for is_kind, kind in _SPECIAL_FILE_KINDS:
        if is_kind(status.st_mode):
            raise ImageInputError(f"{name}: is {kind}, not an image file")
    if not stat.S_ISREG(status.st_mode):
        raise ImageInputError(f"{name}: is not a regular file")
    if status.st_size == 0:
        raise ImageInputError(f"{name}: file is empty (0 bytes)")


def _decode(image: Image.Image, name: str, max_pixels: int) -> Image.Image:
    """Check the size, decode, orient and convert an opened (possibly lazy) image."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageInputError(f"{name}: image has zero width or height ({width}x{height})")
    if width * height > max_pixels:
        raise ImageInputError(
            f"{name}: image is {width}x{height} ({width * height} pixels), more than the limit of {max_pixels} pixels"
        )
    try:
        image.load()
    except Exception as exc:  # truncated or corrupt data raises many types in Pillow
        raise ImageInputError(f"{name}: image data is truncated or corrupt ({_describe(exc)})") from exc
    image = _apply_exif_orientation(image, name)
    try:
        return _to_rgb(image)
    except ValueError as exc:
        raise ImageInputError(f"{name}: unsupported image mode {image.mode} ({_describe(exc)})") from exc


def _apply_exif_orientation(image: Image.Image, name: str) -> Image.Image:
    """Rotate phone photos upright; a damaged EXIF block should not make a good image unusable."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # malformed EXIF raises assorted types
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", name, _describe(exc))
        return image.copy()


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, putting transparency over white.

    `image` must be a private copy: an RGB image without transparency is returned as is.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        return _high_depth_to_rgb(image)
    if not image.has_transparency_data:
        return image if mode == "RGB" else image.convert("RGB")
    if mode == "La":
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer and float grayscale to 0..255 instead of Pillow's clipping.

    Integer data is taken as 16-bit (0..65535), which is what PNG and TIFF store in these modes.
    Float data in 0..1 is treated as normalised; anything larger follows Pillow's 0..255 convention.
    """
    raw = np.asarray(image)
    if image.mode == "F":
        values = np.nan_to_num(raw.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    else:
        wide = np.clip(raw.astype(np.int64), 0, 65535)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
    transparent_value = image.info.get("transparency")
    if isinstance(transparent_value, int) and image.mode != "F":
        gray = np.where(raw == transparent_value, np.uint8(255), gray)
    return Image.fromarray(gray).convert("RGB")


def _describe(exc: BaseException) -> str:
    """One line for an underlying error, so our message stays on one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _halved_size(width: int, height: int, target_side: int) -> tuple[int, int]:
    """Mirror the box-filter halving done in `resize_for_e1_1`."""
    while min(width, height) >= 2 * target_side:
        width, height = width // 2, height // 2
    return width, height


def _floor_to_multiple(value: int) -> int:
    return value // SIDE_MULTIPLE * SIDE_MULTIPLE


def _pick_area_size(width: int, height: int, target_side: int, model: str = "E1.1") -> tuple[int, int]:
    """Choose the largest 16-aligned size near the source aspect ratio with area <= target_side**2."""
    max_area = target_side * target_side
    scale = math.sqrt(max_area / (width * height))
    scaled_w, scaled_h = width * scale, height * scale
    widths = (_floor_to_multiple(round(scaled_w)), _floor_to_multiple(math.floor(scaled_w)))
    heights = (_floor_to_multiple(round(scaled_h)), _floor_to_multiple(math.floor(scaled_h)))
    candidates = [(w, h) for w in widths for h in heights]
    best: tuple[int, int] | None = None
    for w, h in candidates:
        area = w * h
        if area <= max_area and (best is None or area > best[0] * best[1]):
            best = (w, h)
    if best is None or best[0] == 0 or best[1] == 0:
        raise ImageInputError(
            f"image of {width}x{height} is too elongated to resize for {model} "
            f"(a side would be under {SIDE_MULTIPLE} pixels)"
        )
    return best


def _cover_and_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize keeping the aspect ratio so `size` is fully covered, then cut out the centre."""
    new_w, new_h = size
    width, height = image.size
    if width / new_w < height / new_h:
        cover = (new_w, max(new_h, round(height / (width / new_w))))
    else:
        cover = (max(new_w, round(width / (height / new_h))), new_h)
    resized = image.resize(cover, Image.Resampling.BICUBIC)
    left = (cover[0] - new_w) // 2
    top = (cover[1] - new_h) // 2
    return resized.crop((left, top, left + new_w, top + new_h))
