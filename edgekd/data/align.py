"""Five-point face alignment to the ArcFace 112×112 template: least-squares similarity (Umeyama) + affine warp.

Matches the insightface IJB pipeline (reference/face.md §4.3): skimage ``SimilarityTransform.estimate`` from the
detected landmarks to the template, then ``cv2.warpAffine`` (bilinear, constant border 0), here in numpy + PIL.
Coordinates are pixel indices as in cv2 (pixel centers at integers).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from edgekd.errors import DataError

ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
"""Landmarks (left eye, right eye, nose, left and right mouth corner) of an aligned 112×112 ArcFace crop."""


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` points onto ``dst``.

    Umeyama (1991), "Least-squares estimation of transformation parameters between two point patterns", eq. 39-42,
    with the reflection correction, as skimage's ``SimilarityTransform.estimate`` does.

    Args:
        src: points ``(P, 2)``.
        dst: points ``(P, 2)``.

    Returns:
        ``(2, 3)`` float64 matrix ``M`` with ``dst ≈ M[:, :2] @ src + M[:, 2]``.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise DataError(f"similarity_transform needs two (P >= 2, 2) point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / len(src)
    sign = np.ones(2)
    if np.linalg.det(cov) < 0:
        sign[1] = -1
    u, sv, vt = np.linalg.svd(cov)
    rank = int((sv > 1e-12 * max(sv.max(), 1e-300)).sum())
    if rank == 0:
        raise DataError("similarity_transform: the source points all coincide")
    if rank == 1:  # collinear points: the reflection sign is free, pick the rotation
        rot = u @ vt if np.linalg.det(u) * np.linalg.det(vt) > 0 else u @ np.diag([1.0, -1.0]) @ vt
    else:
        rot = u @ np.diag(sign) @ vt
    var_s = (s0**2).sum() / len(src)
    scale = (sv * sign).sum() / var_s
    out = np.empty((2, 3))
    out[:, :2] = scale * rot
    out[:, 2] = mu_d - scale * rot @ mu_s
    return out


def warp_affine(image: np.ndarray | Image.Image, matrix: np.ndarray, size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """Warp an RGB image by ``matrix`` (source -> output pixel coordinates), bilinear, constant border 0.

    Equivalent to ``cv2.warpAffine(image, matrix, size, borderValue=0)`` up to rounding: PIL samples at pixel-area
    coordinates, so the inverse map is shifted by half a pixel on each side.

    Args:
        image: uint8 ``(H, W, 3)`` array or a PIL image.
        matrix: ``(2, 3)`` affine map from source to output pixel indices.
        size: output ``(width, height)``.

    Returns:
        uint8 ``(height, width, 3)``.
    """
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    m = np.vstack([np.asarray(matrix, np.float64), [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(m)[:2]
    lin, t = inv[:, :2], inv[:, 2]
    offset = t + 0.5 - lin @ np.array([0.5, 0.5])
    coeffs = (lin[0, 0], lin[0, 1], offset[0], lin[1, 0], lin[1, 1], offset[1])
    # Per channel in float ("F" mode), then rounded: PIL's 8-bit bilinear truncates where cv2 rounds.
    planes = [
        np.asarray(band.convert("F").transform(tuple(size), Image.AFFINE, coeffs, resample=Image.BILINEAR))
        for band in img.convert("RGB").split()
    ]
    return np.clip(np.rint(np.stack(planes, -1)), 0, 255).astype(np.uint8)


def align_face(image: np.ndarray | Image.Image, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """Align a face crop to the ArcFace template from its 5 landmarks ``(5, 2)``; uint8 ``(S, S, 3)`` RGB out.

    For ``image_size`` other than 112 the template is scaled by ``image_size / 112``.
    """
    pts = np.asarray(landmarks, np.float64).reshape(5, 2)
    matrix = similarity_transform(pts, ARCFACE_TEMPLATE * (image_size / 112.0))
    return warp_affine(image, matrix, (image_size, image_size))
