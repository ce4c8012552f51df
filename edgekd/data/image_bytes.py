"""Encoded image bytes as RecordIO records and insightface ``.bin`` pair sets store them: decoded to uint8 RGB tensors,
and image files turned into the bytes to store. A file that cannot be read is a one-line ``DataError`` saying where it
is, why PIL failed, and what to do about it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from edgekd.errors import DataError

__all__ = ["decode_image", "encode_image_file", "to_8bit"]

# PIL's modes of one channel wider than 8 bits: 16-bit unsigned (a 16-bit grayscale PNG opens as "I;16"), 32-bit
# signed ("I", older Pillow's 16-bit PNG) and 32-bit float ("F", TIFF).
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ORIENTATION = 0x0112  # the EXIF tag: 1 is upright; a JPEG with another value is stored turned upright


def _image_failure(exc: Exception) -> str:
    """Why PIL could not read an image, in a few words (PIL's own message for an unknown format names a BytesIO)."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a known image format"
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


def to_8bit(img: Image.Image, mode: str = "RGB") -> Image.Image:
    """``img`` as an 8-bit ``mode`` (``RGB`` or ``L``) image, read the way ``cv2.imread`` (insightface's reader)
    reads a file: EXIF orientation applied, alpha dropped, CMYK and palettes converted, and samples wider than 8 bits
    shifted down to their top 8 (PIL's own ``convert`` clips them instead: a 16-bit grayscale PNG comes out white)."""
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in _WIDE_MODES:
        wide = np.asarray(img)
        if img.mode == "F":  # floats: PIL's clip to [0, 255] is the only reading that needs no guess of the range
            narrow = np.clip(np.rint(wide), 0, 255)
        else:
            narrow = np.clip(wide.astype(np.int64) >> 8, 0, 255)  # 16 significant bits, as cv2 keeps the high byte
        img = Image.fromarray(narrow.astype(np.uint8), mode="L")
    return img if img.mode == mode else img.convert(mode)


def decode_image(body: bytes, size: int | None, where: str, hint: str) -> torch.Tensor:
    """Decode encoded image bytes to uint8 RGB ``(3, H, W)``, resized (bilinear) to ``size``² when given.

    Raises ``DataError`` ``"<where>: cannot decode the image (<why>); <hint>"``.
    """
    try:
        with Image.open(io.BytesIO(body)) as img:
            img.load()
            img = to_8bit(img)
            if size and img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            arr = np.asarray(img)
    # Damaged bytes make PIL's decoders fail with nearly any exception type (struct.error, IndexError, MemoryError
    # from a size field, ...): every one of them means this image cannot be read.
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{where}: cannot decode the image ({_image_failure(exc)}); {hint}") from None
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # numpy's transpose copy is faster


def encode_image_file(path: Path, quality: int = 95, hint: str = "replace or remove it") -> bytes:
    """The bytes to store for an image file: RGB JPEGs without a rotation tag as they are, anything else read by
    ``to_8bit`` and re-encoded as JPEG ``quality``.

    Raises ``DataError`` ``"<path>: cannot read the image (<why>); <hint>"`` (no ``; <hint>`` when ``hint`` is empty).
    """
    try:
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as img:
            if img.format == "JPEG" and img.mode == "RGB" and img.getexif().get(_ORIENTATION, 1) == 1:
                img.load()
                return raw
            buf = io.BytesIO()
            to_8bit(img).save(buf, format="JPEG", quality=quality)
            return buf.getvalue()
    # As in decode_image: a damaged file can make PIL fail with nearly any exception type.
    except Exception as exc:  # noqa: BLE001
        advice = f"; {hint}" if hint else ""
        raise DataError(f"{path}: cannot read the image ({_image_failure(exc)}){advice}") from None
