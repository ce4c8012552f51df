"""Built-in synthetic identities: deterministic cartoon faces with per-image nuisances, the default data of ``distill``.

This is honest test data for the pipeline, not a benchmark of faces. Numbers measured on it say that training,
distillation, export and evaluation work and how methods rank on a controlled problem; they say nothing about real
face recognition accuracy.

How an image is made:

1. **Identity.** Each identity is a latent ``z ~ N(0, I_16)``. A fixed random map (same for every seed) sends it to
   39 layout parameters: skin, hair and iris colours, head width/height/jaw, hairline, eye position/size, brow
   thickness/tilt, nose length/width/shade, mouth position/width/curve, a skin texture (frequency, orientation,
   amplitude, phase) and a mark (mole) position/size. Because 16 latent dimensions drive 39 parameters, identities
   share structure and neighbours in latent space look alike.
2. **Nuisances, per image**, all scaled by ``difficulty``: pose (rotation, scale, translation, a yaw that squeezes
   and shifts the inner features), expression (mouth curve, eye openness), background colour and gradient,
   light (brightness, contrast, directional gradient, colour cast), Gaussian blur, pixel noise, and with some
   probability an occluding rectangle of random colour.
3. **Rendering** is vectorized in torch: every pixel is mapped back through the inverse pose to face coordinates
   and the parts are composited as anti-aliased soft masks, so any ``image_size`` (32, 64, 112, ...) works.

Splits ``train``, ``val`` and ``test`` show the same (training) identities with independent nuisance draws, so
``val``/``test`` measure classification of seen identities in unseen images. Split ``heldout`` shows other
identities, used for verification pairs; training and held-out identities come from disjoint random streams of the
seed, so no held-out identity is a training identity. The layout of identity ``k`` does not depend on how many
identities are asked for (its images do: nuisances and noise are drawn for the whole split). Images are rendered
in fixed-size blocks on first access and kept in memory.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from edgekd.errors import DataError
from edgekd.utils.hashing import content_digest

__all__ = ["SyntheticIdentities", "SPLITS", "identity_params", "nuisance_params", "render_faces"]

SPLITS = ("train", "val", "test", "heldout")
_IDENTITY_STREAM = {"train": 0, "val": 0, "test": 0, "heldout": 1}  # val/test: training identities, new images
_NUISANCE_STREAM = {"train": 10, "val": 11, "test": 12, "heldout": 13}
_LATENT_DIM = 16
_NUM_PARAMS = 39
_NUM_NUISANCES = 27
_BLOCK_PIXELS = 1 << 18  # pixels rendered together: keeps a block in cache; fixed so noise ignores access order

# Ranges (lo, hi) of the 39 identity parameters, each set as lo + (hi - lo) * sigmoid(A z + b).
_RANGES = np.array(
    [(0.35, 0.98), (0.62, 0.9), (0.45, 0.85)]  # 0-2 skin tone, green and blue ratios
    + [(0.03, 0.75), (0.45, 1.0), (0.3, 1.0)]  # 3-5 hair tone, green and blue ratios
    + [(0.52, 0.72), (0.72, 0.92), (0.0, 0.35)]  # 6-8 head half-width, half-height, jaw narrowing
    + [(-0.72, -0.38), (1.02, 1.15)]  # 9-10 hairline v, hair volume
    + [(-0.26, -0.06), (0.2, 0.34), (0.07, 0.12), (0.035, 0.065)]  # 11-14 eye v, half-separation, rx, ry
    + [(0.0, 0.6)] * 3  # 15-17 iris RGB
    + [(0.07, 0.13), (0.012, 0.035), (-0.35, 0.35)]  # 18-20 brow offset, thickness, tilt
    + [(0.14, 0.3), (0.05, 0.12), (0.08, 0.3)]  # 21-23 nose length, half-width, shade
    + [(0.32, 0.55), (0.12, 0.26), (0.018, 0.045), (-0.12, 0.15)]  # 24-27 mouth v, half-width, thickness, curve
    + [(0.3, 0.85), (0.05, 0.45), (0.1, 0.5)]  # 28-30 lip RGB
    + [(2.0, 9.0), (0.0, math.pi), (0.0, 0.14), (0.0, 2 * math.pi)]  # 31-34 texture freq, angle, amp, phase
    + [(-0.38, 0.38), (-0.1, 0.45), (0.015, 0.05), (0.0, 0.6)],  # 35-38 mark u, v, radius, darkness
    dtype=np.float64,
)
assert len(_RANGES) == _NUM_PARAMS


def _identity_map() -> tuple[np.ndarray, np.ndarray]:
    """The fixed latent-to-parameter map ``(A: (39, 16), b: (39,))``, identical for every seed."""
    rng = np.random.default_rng(20240611)
    a = rng.standard_normal((_NUM_PARAMS, _LATENT_DIM)) * (1.6 / math.sqrt(_LATENT_DIM) * 2.0)
    b = rng.standard_normal(_NUM_PARAMS) * 0.3
    return a, b


def identity_params(seed: int, stream: int, count: int) -> np.ndarray:
    """Layout parameters of the first ``count`` identities of a stream, ``(count, 39)`` float64."""
    z = np.random.default_rng([seed, stream]).standard_normal((count, _LATENT_DIM))
    a, b = _identity_map()
    s = 1.0 / (1.0 + np.exp(-(z @ a.T + b)))
    return _RANGES[:, 0] + (_RANGES[:, 1] - _RANGES[:, 0]) * s


def nuisance_params(seed: int, stream: int, count: int, per_identity: int, difficulty: float) -> np.ndarray:
    """Per-image nuisances ``(count, per_identity, 27)`` float64, scaled by ``difficulty`` (0 gives a clean pose)."""
    rng = np.random.default_rng([seed, stream, per_identity])
    u = rng.random((count, per_identity, _NUM_NUISANCES))
    g = rng.standard_normal((count, per_identity, _NUM_NUISANCES))
    d = difficulty
    n = np.empty_like(u)
    n[..., 0] = np.clip(g[..., 0] * 0.14 * d, -0.5, 0.5)  # rotation (rad)
    n[..., 1] = np.exp(np.clip(g[..., 1] * 0.08 * d, -0.3, 0.3))  # scale
    n[..., 2] = np.clip(g[..., 2] * 0.06 * d, -0.2, 0.2)  # translation x
    n[..., 3] = np.clip(g[..., 3] * 0.06 * d, -0.2, 0.2)  # translation y
    n[..., 4] = np.clip(g[..., 4] * 0.35 * d, -0.8, 0.8)  # yaw
    n[..., 5] = g[..., 5] * 0.05 * d  # mouth curve change (expression)
    n[..., 6] = np.clip(1.0 - np.abs(g[..., 6]) * 0.35 * d, 0.15, 1.0)  # eye openness
    n[..., 7:10] = 0.5 + (u[..., 7:10] - 0.5) * min(d, 1.0)  # background RGB (grey at difficulty 0)
    n[..., 10] = u[..., 10] * 2 * math.pi  # background gradient direction
    n[..., 11] = g[..., 11] * 0.12 * d  # brightness
    n[..., 12] = np.exp(g[..., 12] * 0.18 * d)  # contrast
    n[..., 13] = u[..., 13] * 2 * math.pi  # light direction
    n[..., 14] = u[..., 14] * 0.45 * min(d, 2.0)  # light strength
    n[..., 15:18] = np.exp(g[..., 15:18] * 0.06 * d)  # colour cast per channel
    n[..., 18] = u[..., 18] * 1.0 * d  # blur sigma, in pixels at 64 px
    n[..., 19] = u[..., 19] * 0.05 * d  # noise std in [0, 1] units
    n[..., 20] = (u[..., 20] < 0.25 * min(d, 2.0)).astype(np.float64)  # occluder present
    n[..., 21:23] = u[..., 21:23] * 1.6 - 0.8  # occluder centre x, y
    n[..., 23] = 0.15 + u[..., 23] * 0.35  # occluder half-width
    n[..., 24] = 0.1 + u[..., 24] * 0.25  # occluder half-height
    n[..., 25] = u[..., 25]  # occluder grey level
    n[..., 26] = u[..., 26] * 0.35 * min(d, 1.0)  # background gradient strength
    return n


def _soft(sd: torch.Tensor, aa: float) -> torch.Tensor:
    """Anti-aliased inside mask from a signed distance (negative inside), edge width ``aa``."""
    return torch.sigmoid(-sd / aa)


def _ellipse(u: torch.Tensor, v: torch.Tensor, cu, cv, ru, rv) -> torch.Tensor:
    """Approximate signed distance to an axis-aligned ellipse (negative inside)."""
    r = torch.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 + 1e-12)
    return (r - 1.0) * torch.minimum(torch.as_tensor(ru), torch.as_tensor(rv))


def _mix(img: torch.Tensor, mask: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Composite ``colour (B, 3, 1, 1)`` over ``img (B, 3, S, S)`` with ``mask (B, S, S)``, in place."""
    return img.lerp_(colour.expand_as(img), mask.unsqueeze(1))


def _blur(img: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image ``sigma (B,)`` in pixels, edge-replicated; ``img (B, C, S, S)``."""
    radius = int(math.ceil(3 * float(sigma.max()))) if len(sigma) else 0
    if radius == 0:
        return img
    b, c, h, w = img.shape
    offs = torch.arange(-radius, radius + 1, dtype=img.dtype)
    k = torch.exp(-0.5 * (offs[None, :] / sigma.clamp_min(1e-3)[:, None]) ** 2)  # (B, K)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K)
    x = F.pad(img.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(b * c, 1, 1, -1), groups=b * c)
    x = F.conv2d(x, k.view(b * c, 1, -1, 1), groups=b * c)
    return x.view(b, c, h, w)


def render_faces(ident: np.ndarray, nuis: np.ndarray, image_size: int, noise_seed: int) -> torch.Tensor:
    """Draw faces; ``ident (B, 39)`` and ``nuis (B, 27)`` from the functions above.

    Returns:
        float32 RGB in [0, 1], ``(B, 3, S, S)``.
    """
    b, s = ident.shape[0], image_size
    p = torch.as_tensor(ident, dtype=torch.float32).T.reshape(_NUM_PARAMS, b, 1, 1)
    q = torch.as_tensor(nuis, dtype=torch.float32).T.reshape(_NUM_NUISANCES, b, 1, 1)
    lin = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1
    y, x = lin.view(1, s, 1), lin.view(1, 1, s)
    aa = 1.2 / s

    # Pixel -> face coordinates through the inverse pose.
    xs, ys = x - q[2], y - q[3]
    cos, sin = torch.cos(q[0]), torch.sin(q[0])
    u, v = (cos * xs + sin * ys) / q[1], (-sin * xs + cos * ys) / q[1]
    aa = aa / q[1]
    yaw = q[4]
    squeeze = 1 - 0.3 * yaw.abs()
    uh = (u + 0.05 * yaw) / (1 - 0.18 * yaw.abs())  # head outline barely moves
    uf = (u - 0.16 * yaw) / squeeze  # inner features slide toward the turned side
    un = u - 0.26 * yaw  # the nose sticks out most

    def colour(i: int) -> torch.Tensor:
        """RGB from parameters ``i..i+2``, ``(B, 3, 1, 1)``."""
        return p[i : i + 3].permute(1, 0, 2, 3)

    def toned(i: int) -> torch.Tensor:
        """RGB from a tone ``p[i]`` and green/blue ratios ``p[i+1], p[i+2]`` (skin and hair), ``(B, 3, 1, 1)``."""
        return (p[i] * torch.stack([torch.ones_like(p[i]), p[i + 1], p[i + 2]])).permute(1, 0, 2, 3)

    # Background: per-image colour with a linear gradient.
    bg = q[7:10].permute(1, 0, 2, 3)
    grad = (torch.cos(q[10]) * x + torch.sin(q[10]) * y).unsqueeze(1) * q[26].unsqueeze(1)
    img = (bg + grad).expand(b, 3, s, s).clone()

    # Hair behind the head, then the head with skin texture, then the fringe above the hairline.
    hw, hh = p[6], p[7]
    hair = toned(3)
    hair_back = _soft(_ellipse(uh, v, 0.0, -0.08, hw * p[10], hh * p[10] * 0.95), aa) * _soft(v - 0.15, aa)
    img = _mix(img, hair_back, hair)
    head_w = hw * (1 - p[8] * torch.relu(v) / hh)  # jaw narrows the lower half
    head = _soft(_ellipse(uh, v, 0.0, 0.0, head_w, hh), aa)
    tex = 1 + p[33] * torch.sin(p[31] * math.pi * (uf * torch.cos(p[32]) + v * torch.sin(p[32])) + p[34])
    img = img.lerp_(toned(0) * tex.unsqueeze(1), head.unsqueeze(1))
    fringe = head * _soft(v - p[9] - 0.04 * torch.cos(uh * 6), aa)
    img = _mix(img, fringe, hair)

    # Eyes (sclera + iris), brows, nose shade, mouth, mark.
    ey, ex, erx, ery = p[11], p[12], p[13], p[14] * q[6]
    for side in (-1.0, 1.0):
        eye = _soft(_ellipse(uf, v, side * ex, ey, erx, ery), aa) * head
        img = _mix(img, eye, torch.full_like(hair, 0.92))
        iris = _soft(_ellipse(uf, v, side * ex, ey, ery * 0.95, ery * 0.95), aa) * eye
        img = _mix(img, iris, colour(15))
        tilt = p[20] * side
        bv = v - (ey - p[18]) - tilt * (uf - side * ex)
        brow = _soft(torch.maximum(bv.abs() - p[19], (uf - side * ex).abs() - erx * 1.25), aa) * head
        img = _mix(img, brow, hair * 0.6)
    nose = _soft(_ellipse(un, v, 0.0, ey + 0.05 + p[21] / 2, p[22], p[21] / 2), aa * 2) * head
    mv = v - p[24] - (p[27] + q[5]) * (1 - (uf / p[25]) ** 2)
    mouth = _soft(torch.maximum(mv.abs() - p[26], uf.abs() - p[25]), aa) * head
    img = _mix(img, mouth, colour(28))
    mark = _soft(_ellipse(uf, v, p[35], p[36], p[37], p[37]), aa) * head
    img.mul_((1 - p[23] * nose - p[38] * mark).unsqueeze(1))  # shading of the nose and the mark

    # Occluder in image coordinates (a hand, a sticker, a scarf).
    occ = _soft(torch.maximum((x - q[21]).abs() - q[23], (y - q[22]).abs() - q[24]), 1.2 / s) * q[20]
    img = _mix(img, occ, q[25].unsqueeze(1).expand(b, 3, 1, 1))

    # Light: contrast about mid-grey, directional gradient, brightness, colour cast.
    # ((img - 0.5) * contrast + 0.5) * shade + brightness, written as one gain and one offset per pixel.
    shade = 1 + q[14] * (torch.cos(q[13]) * x + torch.sin(q[13]) * y)
    gain, offset = q[12] * shade, (0.5 - 0.5 * q[12]) * shade + q[11]
    img.mul_(gain.unsqueeze(1)).add_(offset.unsqueeze(1)).mul_(q[15:18].permute(1, 0, 2, 3))

    img = _blur(img, q[18].flatten() * (s / 64.0))
    gen = torch.Generator().manual_seed(noise_seed)
    img.add_(torch.randn(img.shape, generator=gen).mul_(q[19].unsqueeze(1)))
    return img.clamp_(0, 1)


class SyntheticIdentities(Dataset):
    """Deterministic synthetic face identities; yields ``(image: uint8 (C, S, S), label: int)``.

    Image ``i`` shows identity ``i // images_per_identity``. See the module docstring for what varies. Items are
    views into the in-memory cache: copy before modifying them in place. With DataLoader workers each worker
    renders its own copy; call ``tensor()`` first (or use ``num_workers=0``) to render once.

    Args:
        identities: number of identities (classes) in this split.
        images_per_identity: images drawn per identity.
        image_size: side ``S`` in pixels.
        seed: selects the identities and the nuisance draws.
        split: ``train``, ``val`` or ``test`` (the training identities, independent images each), or ``heldout``
            (other identities, disjoint from training; used for verification pairs).
        difficulty: nuisance strength; 0 renders every image of an identity in the same clean pose, 1 is the
            default, larger values add more pose, light, blur, noise and occlusion.
        channels: 3 for RGB, 1 for luminance.
    """

    def __init__(
        self,
        identities: int = 1000,
        images_per_identity: int = 20,
        image_size: int = 112,
        seed: int = 0,
        split: str = "train",
        difficulty: float = 1.0,
        channels: int = 3,
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"synthetic split {split!r} is not one of {', '.join(SPLITS)}")
        for name, value, low in (
            ("identities", identities, 1),
            ("images_per_identity", images_per_identity, 1),
            ("image_size", image_size, 8),
        ):
            if int(value) != value or value < low:
                raise DataError(f"synthetic {name}={value} must be an integer >= {low}")
        if channels not in (1, 3):
            raise DataError(f"synthetic channels={channels} must be 1 or 3")
        if not (0 <= difficulty <= 10):
            raise DataError(f"synthetic difficulty={difficulty} must be in [0, 10]")
        self.identities, self.images_per_identity = int(identities), int(images_per_identity)
        self.image_size, self.seed, self.split = int(image_size), int(seed), split
        self.difficulty, self.channels = float(difficulty), int(channels)
        self.num_classes = self.identities
        self.fingerprint = content_digest(json.dumps(self.params(), sort_keys=True), algorithm="sha1")
        self._ident = identity_params(self.seed, _IDENTITY_STREAM[split], self.identities)
        self._nuis = nuisance_params(
            self.seed, _NUISANCE_STREAM[split], self.identities, self.images_per_identity, self.difficulty
        ).reshape(len(self), _NUM_NUISANCES)
        self._block_len = max(8, min(1024, _BLOCK_PIXELS // (self.image_size * self.image_size)))
        self._blocks: dict[int, torch.Tensor] = {}

    def params(self) -> dict:
        """The generator parameters that fix every byte of the data (also what the fingerprint hashes)."""
        return {
            "kind": "synthetic-identities",
            "version": 1,
            "identities": self.identities,
            "images_per_identity": self.images_per_identity,
            "image_size": self.image_size,
            "seed": self.seed,
            "split": self.split,
            "difficulty": self.difficulty,
            "channels": self.channels,
        }

    def __len__(self) -> int:
        return self.identities * self.images_per_identity

    @property
    def labels(self) -> torch.Tensor:
        """Class of every image, int64 ``(N,)``."""
        return torch.arange(self.identities).repeat_interleave(self.images_per_identity)

    def _block(self, k: int) -> torch.Tensor:
        if k not in self._blocks:
            lo, hi = k * self._block_len, min((k + 1) * self._block_len, len(self))
            idx = np.arange(lo, hi)
            noise_seed = int(np.random.default_rng([self.seed, _NUISANCE_STREAM[self.split], 99, k]).integers(2**62))
            img = render_faces(
                self._ident[idx // self.images_per_identity], self._nuis[idx], self.image_size, noise_seed
            )
            if self.channels == 1:
                img = (img * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
            self._blocks[k] = (img * 255).round_().to(torch.uint8)
        return self._blocks[k]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return self._block(index // self._block_len)[index % self._block_len], index // self.images_per_identity

    def tensor(self) -> torch.Tensor:
        """Every image rendered, uint8 ``(N, C, S, S)`` (renders the blocks not yet in memory)."""
        return torch.cat([self._block(k) for k in range(-(-len(self) // self._block_len))])
