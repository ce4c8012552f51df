"""Issue 23, class 2 (silent wrong success), images: every kind of image file decodes to the pixels ``cv2.imread``
(insightface's reader) would give, through each path edgekd reads images by: training folders (``ImageFolder``),
``data pack`` (``encode_image_file``, then the RecordIO decoder) and stored bytes (``decode_image``). A 16-bit PNG
used to come out all white.

The expected pixels come from the arrays the files were written from (16-bit samples keep their high byte, EXIF
orientation is applied, alpha is dropped), not from PIL's reading of the files. 16-bit colour PNGs are written by
hand here (PIL cannot write them), chunk by chunk per the PNG specification.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from edgekd.data.image_bytes import decode_image, encode_image_file
from edgekd.data.image_folder import ImageFolder

H = W = 8  # square: a training folder reads images at their own size only when they are square
RNG = np.random.default_rng(5)
# Smooth colour ramps: JPEG keeps them within a few grey levels (noise would measure JPEG, not the reader).
_Y, _X = np.mgrid[0:H, 0:W]
RGB = np.stack([20 + 28 * _X, 30 + 25 * _Y, 200 - 12 * (_X + _Y)], axis=2).astype(np.uint8)
GRAY = (15 + 14 * (_X + _Y)).astype(np.uint8)
WIDE = RNG.integers(0, 65536, (H, W), dtype=np.uint16)
WIDE_RGB = RNG.integers(0, 65536, (H, W, 3), dtype=np.uint16)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG of ``samples`` (H, W, C) uint16, C = 3 (colour type 2) or 4 (colour type 6)."""
    h, w, c = samples.shape
    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _exif_rotated_jpeg() -> tuple[bytes, np.ndarray]:
    """A JPEG stored sideways with EXIF orientation 6 (display rotated 90° clockwise); a flat-coloured quadrant
    layout so JPEG's loss does not blur the check."""
    stored = np.zeros((16, 16, 3), np.uint8)
    stored[:8, :8] = (250, 10, 10)
    stored[:8, 8:] = (10, 250, 10)
    stored[8:, :8] = (10, 10, 250)
    stored[8:, 8:] = (250, 250, 10)
    exif = Image.Exif()
    exif[0x0112] = 6
    body = _save(Image.fromarray(stored), "JPEG", quality=100, exif=exif)
    return body, np.rot90(_plain_jpeg_pixels(body), k=-1)  # orientation 6: rotate 90° clockwise to display


def _plain_jpeg_pixels(body: bytes) -> np.ndarray:
    """The decoded pixels of a plain 8-bit JPEG as stored (JPEG is lossy: the truth is its decode, not the array
    it was made from); no mode or orientation handling is involved in reading them."""
    with Image.open(io.BytesIO(body)) as img:
        return np.asarray(img.convert("RGB"))


def _kinds():
    """(name, encoded bytes, expected RGB pixels (H, W, 3), tolerance in grey levels: 0 but for CMYK, whose
    expected values are rounded from the ink model's real numbers)."""
    gray3 = np.repeat(GRAY[:, :, None], 3, axis=2)
    rgba = np.dstack([RGB, RNG.integers(0, 256, (H, W), dtype=np.uint8)])
    palette = Image.fromarray(RGB).quantize(colors=16)
    pal_rgb = np.asarray(palette.convert("RGB"))  # the palette's own colours are the truth for a P image
    cmyk = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
    c, m, y, k = (cmyk[..., i].astype(np.float64) for i in range(4))
    cmyk_rgb = np.stack([np.rint((255 - v) * (255 - k) / 255) for v in (c, m, y)], axis=2)  # naive ink model
    rotated, upright = _exif_rotated_jpeg()
    rgb_jpeg, gray_jpeg = _save(Image.fromarray(RGB), "JPEG", quality=95), _save(Image.fromarray(GRAY), "JPEG")
    wide_rgb8 = (WIDE_RGB >> 8).astype(np.uint8)
    return [
        ("RGB PNG", _save(Image.fromarray(RGB), "PNG"), RGB, 0),
        ("gray PNG", _save(Image.fromarray(GRAY), "PNG"), gray3, 0),
        ("16-bit gray PNG", _save(Image.fromarray(WIDE), "PNG"), np.repeat((WIDE >> 8)[:, :, None], 3, 2), 0),
        ("16-bit RGB PNG", _png16(WIDE_RGB), wide_rgb8, 0),
        ("16-bit RGBA PNG", _png16(np.dstack([WIDE_RGB, WIDE])), wide_rgb8, 0),
        ("RGBA PNG", _save(Image.fromarray(rgba), "PNG"), RGB, 0),
        ("gray+alpha PNG", _save(Image.fromarray(np.dstack([GRAY, GRAY]), "LA"), "PNG"), gray3, 0),
        ("palette PNG", _save(palette, "PNG"), pal_rgb, 0),
        (
            "1-bit PNG",
            _save(Image.fromarray(GRAY > 127), "PNG"),
            np.repeat(np.where(GRAY > 127, 255, 0)[:, :, None], 3, 2).astype(np.uint8),
            0,
        ),  # fmt: skip
        ("16-bit TIFF", _save(Image.fromarray(WIDE), "TIFF"), np.repeat((WIDE >> 8)[:, :, None], 3, 2), 0),
        ("float TIFF", _save(Image.fromarray(GRAY.astype(np.float32)), "TIFF"), gray3, 0),
        ("CMYK TIFF", _save(Image.fromarray(cmyk, "CMYK"), "TIFF"), cmyk_rgb, 1),
        ("BMP", _save(Image.fromarray(RGB), "BMP"), RGB, 0),
        ("lossless WEBP", _save(Image.fromarray(RGB), "WEBP", lossless=True), RGB, 0),
        ("GIF", _save(palette, "GIF"), pal_rgb, 0),
        ("RGB JPEG", rgb_jpeg, _plain_jpeg_pixels(rgb_jpeg), 0),
        ("gray JPEG", gray_jpeg, _plain_jpeg_pixels(gray_jpeg), 0),
        ("JPEG with EXIF orientation 6", rotated, upright, 0),
    ]


KINDS = _kinds()
IDS = [k[0] for k in KINDS]


def _close(got: np.ndarray, want: np.ndarray, tol: int) -> None:
    """Every pixel within ``tol`` grey levels."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.abs(got.astype(np.int64) - want.astype(np.int64)).max() <= tol


@pytest.mark.parametrize("name, body, want, tol", KINDS, ids=IDS)
def test_stored_bytes_decode_to_the_written_pixels(name, body, want, tol):
    got = decode_image(body, None, "test", "").permute(1, 2, 0).numpy()
    _close(got, want, tol)


@pytest.mark.parametrize("name, body, want, tol", KINDS, ids=IDS)
def test_a_training_folder_reads_the_written_pixels(name, body, want, tol, tmp_path):
    suffix = {"PNG": ".png", "TIFF": ".tif", "BMP": ".bmp", "WEBP": ".webp", "GIF": ".gif", "JPEG": ".jpg"}
    fmt = next(f for f in suffix if f in name) if any(f in name for f in suffix) else "JPEG"
    for who in ("a", "b"):
        (tmp_path / who).mkdir()
        (tmp_path / who / f"0{suffix[fmt]}").write_bytes(body)
    image, _ = ImageFolder(tmp_path)[0]
    _close(image.permute(1, 2, 0).numpy(), want, tol)


@pytest.mark.parametrize("name, body, want, tol", KINDS, ids=IDS)
def test_data_pack_stores_what_reading_gives(name, body, want, tol, tmp_path):
    """``data pack`` keeps plain RGB JPEGs as they are and stores anything else as the JPEG of what the reader gives
    (checked against the truth above): so the packed pixels are that JPEG's, exactly."""
    path = tmp_path / "image"
    path.write_bytes(body)
    stored = encode_image_file(path, quality=100)
    read = decode_image(body, None, "test", "").permute(1, 2, 0).numpy()
    expected = read if stored == body else _plain_jpeg_pixels(_save(Image.fromarray(read), "JPEG", quality=100))
    _close(decode_image(stored, None, "test", "").permute(1, 2, 0).numpy(), expected, 0)
    assert (stored == body) == (name in ("RGB JPEG",))  # a gray or rotated JPEG is stored upright in RGB


def test_one_identity_is_refused_before_training(tmp_path, run_cli):
    for k in range(4):
        (tmp_path / "data" / "only").mkdir(parents=True, exist_ok=True)
        Image.fromarray(RGB).save(tmp_path / "data" / "only" / f"{k}.png")
    out = tmp_path / "run"
    code, _, err = run_cli(["teacher", "--data", str(tmp_path / "data"), "--model", "r_tiny", "--batch-size", "2",
                            "--steps", "1", "--no-compile", "--out", str(out)])  # fmt: skip
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "has 1 class(es)" in lines[0], err
    assert not out.exists()
