"""Photos in: decoding any image file or array to upright RGB, with a size limit against decompression bombs."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


MAX_PIXELS = 100_000_000  # images above 100 MP are refused before decoding (decompression bombs)


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

def load_image(source, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A path, file object or bytes -> upright 8-bit RGB PIL image (see `to_rgb`).

    The pixel count is read from the header and checked against max_pixels before anything is
    decoded; unreadable, truncated or non-image input raises ValueError saying which.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        import io

        source, name = io.BytesIO(bytes(source)), "the image bytes"
    elif isinstance(source, (str, os.PathLike)):
        name = str(source)
        if not Path(source).is_file():
            raise ValueError(f"image file {name} does not exist (or is not a file)")
    else:
        name = getattr(source, "name", "the image file")
    with warnings.catch_warnings():
        # our own max_pixels check below replaces PIL's warning
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
        except Image.DecompressionBombError as exc:
            raise ValueError(f"{name} is too large to open safely ({exc}); resize it first") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"{name} is not an image this program can read ({exc}); use a JPEG, PNG, "
                             "WebP or TIFF file") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(f"{name} is {width}x{height} = {width * height / 1e6:.0f} MP, above the "
                         f"{max_pixels / 1e6:.0f} MP limit (a decompression bomb, or simply too large); "
                         "downscale it first or pass a larger max_pixels")
    try:
        image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... on bad data
        raise ValueError(f"{name} is corrupt or truncated and cannot be decoded ({type(exc).__name__}: "
                         f"{exc}); re-export or re-download it") from exc
    return to_rgb(image)


def upright(image: Image.Image) -> Image.Image:
    """The image rotated/flipped as its EXIF orientation tag says (itself when there is none)."""
    orientation = image.getexif().get(0x0112, 1)  # 0x0112: EXIF Orientation
    return image if orientation in (1, None) else ImageOps.exif_transpose(image)


def to_rgb(image) -> Image.Image:
    """PIL image or numpy array -> upright 8-bit RGB PIL image.

    PIL: EXIF orientation applied; transparency composited on white (what viewers show);
    16-bit ("I;16", "I") scaled by 1/257, float ("F") read as [0, 1] when its maximum is <= 1,
    else as [0, 255]; CMYK, palette, grey and bilevel converted by PIL.
    numpy: [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; uint8 as is, uint16 scaled by 1/257,
    float read as [0, 1] (ComfyUI images).
    """
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    image = upright(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _array_to_rgb(np.asarray(image))
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"cannot convert a {mode} image to RGB ({exc}); save it as an RGB PNG or JPEG") from exc


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(f"expected an image array of shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], "
                         f"got {array.shape}")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16 or (np.issubdtype(array.dtype, np.integer) and array.max(initial=0) > 255):
        array = np.rint(np.clip(array, 0, 65535) / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        array = np.clip(array, 0, 255).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float32))
        scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
        array = np.rint(np.clip(array * scale, 0, 255)).astype(np.uint8)
    else:
        raise ValueError(f"unsupported image array dtype {array.dtype}; use uint8, uint16 or float in [0, 1]")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:
        return to_rgb(Image.fromarray(np.ascontiguousarray(array), "RGBA"))
    return Image.fromarray(np.ascontiguousarray(array), "RGB")
