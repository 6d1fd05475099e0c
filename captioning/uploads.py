"""Uploaded image files -> pixels, as `--mode=caption` reads them (the web demo's input side).

    rgb = read_image(path, max_bytes=10 * 2**20)     # [H, W, 3] uint8, upright; or ImageError
    pixels = model_pixels(rgb, size)                 # [size, size, 3] float32, as the backbone's

PIL reads the header (file and pixel limits, EXIF orientation) before anything is decoded; JPEG,
PNG, GIF and BMP files are then decoded by the same `tf.io.decode_image` call and resized by the
same `tf.image.resize` call as `backbone._load_image`, so a file gets exactly the pixels, and the
caption, of `--mode=caption` (EXIF-rotated photos excepted: caption mode does not turn them
upright). Other formats (TIFF, WebP, ...) are decoded by PIL; grayscale, RGBA, CMYK, palette and
16-bit images become 8-bit RGB.
"""

from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # Larger images are refused before decoding (decompression bombs).
FORMATS = "JPEG, PNG, GIF, BMP, WebP or TIFF"
_TF_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP")  # PIL format names tf.io.decode_image reads.
_ORIENTATION = 0x0112  # EXIF tag.
_EXIF_TRANSPOSE = {  # EXIF orientation -> the transpose that makes the image upright.
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageError(ValueError):
    """An upload that cannot be captioned; the message says what is wrong and what to do."""


def read_image(path: str, *, max_bytes: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An uploaded file -> [H, W, 3] uint8 RGB, upright; raises `ImageError` naming the problem.

    The file size and the pixel count (from the header, read with PIL) are checked before
    anything is decoded. JPEG, PNG, GIF and BMP files are then decoded by `tf.io.decode_image`,
    exactly as `backbone._load_image` decodes them for training and caption mode (TF's and PIL's
    JPEG decoders differ by a few levels per pixel); other formats (TIFF, WebP, ...) by PIL.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise ImageError(f"The file is empty (0 bytes): upload a {FORMATS} image.")
    if size > max_bytes:
        raise ImageError(
            f"The file is {size / 2**20:.1f} MB, above this server's upload limit of "
            f"{max_bytes / 2**20:g} MB (--max_upload_mb): upload a smaller image."
        )
    try:
        with Image.open(path) as image:  # Reads the header only.
            _check_pixels(*image.size, max_pixels)
            orientation = _exif_orientation(image)
            if image.format in _TF_FORMATS:
                rgb = _decode_like_backbone(path)
            else:
                image.load()
                rgb = _to_rgb(image)
    except Image.DecompressionBombError as e:
        raise _too_large(None, max_pixels) from e
    except UnidentifiedImageError as e:
        raise ImageError(
            f"The file is not an image this server can read: upload a {FORMATS} file."
        ) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if isinstance(e, ImageError):
            raise
        raise _undecodable(str(e)) from e
    if orientation in _EXIF_TRANSPOSE:
        rgb = np.asarray(Image.fromarray(rgb).transpose(_EXIF_TRANSPOSE[orientation]))
    return rgb


def _too_large(size: tuple[int, int] | None, max_pixels: int) -> ImageError:
    shape = f"{size[0]} x {size[1]} pixels, " if size else ""
    return ImageError(
        f"The image is too large ({shape}more than this server's limit of "
        f"{max_pixels / 1e6:g} megapixels); refused without decoding it. Upload a smaller image."
    )


def _undecodable(reason: str) -> ImageError:
    return ImageError(
        f"The image could not be decoded: the file is truncated or corrupt ({reason}). "
        "Upload the complete file."
    )


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise _too_large((width, height), max_pixels)


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright, also when the EXIF block is missing or broken)."""
    try:
        return int(image.getexif().get(_ORIENTATION, 1))
    except (OSError, ValueError, KeyError, TypeError, SyntaxError):
        return 1


def _decode_like_backbone(path: str) -> np.ndarray:
    """JPEG/PNG/GIF/BMP file -> [H, W, 3] uint8 with `backbone._load_image`'s decoder call."""
    import tensorflow as tf

    try:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except (tf.errors.OpError, ValueError) as e:
        message = re.sub(r"\{\{[^}]*\}\}\s*", "", getattr(e, "message", str(e)))
        raise _undecodable(message.split(" [Op:")[0].strip()) from e
    return image.numpy()


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> [H, W, 3] uint8. 16-bit (and 32-bit integer) grayscale is scaled to 8 bits
    (65535 -> 255); float images are clipped to 0..255; every other mode is converted by PIL."""
    if image.mode.startswith("I") or image.mode == "F":
        gray = np.asarray(image).astype(np.float64)
        if image.mode != "F":
            gray = gray / 257.0
        gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))


def model_pixels(rgb: np.ndarray, size: int) -> np.ndarray:
    """[H, W, 3] uint8 RGB -> [size, size, 3] float32 in 0..255, as `backbone._load_image` makes
    them: bilinear antialiased resize to a square (images already at size are only cast)."""
    if rgb.shape[:2] == (size, size):
        return rgb.astype(np.float32)
    import tensorflow as tf

    return tf.image.resize(rgb, [size, size], method="bilinear", antialias=True).numpy()
