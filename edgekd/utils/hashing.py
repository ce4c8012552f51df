"""Content hashes: every cache key, fingerprint and file identity edgekd records is computed here.

All are hex prefixes of a digest (SHA-256 unless a caller keeps the SHA-1 its recorded fingerprints were made with):
changing an algorithm or a length changes keys that users' caches, checkpoints and reports already hold.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["content_digest", "json_digest", "file_sha256", "module_fingerprint"]


def content_digest(*parts: bytes | str | Iterable[bytes | str], length: int = 16, algorithm: str = "sha256") -> str:
    """The first ``length`` hex digits of the digest of ``parts`` fed in order (``str`` as UTF-8).

    A part may also be an iterable of parts (a generator over files, say), fed item by item.
    """
    digest = hashlib.new(algorithm)
    for part in parts:
        for item in (part,) if isinstance(part, (bytes, bytearray, memoryview, str)) else part:
            digest.update(item.encode() if isinstance(item, str) else item)
    return digest.hexdigest()[:length]


def json_digest(obj: object, length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``obj`` as sorted-key JSON (a stable cache key)."""
    return content_digest(json.dumps(obj, sort_keys=True, default=str), length=length)


def file_sha256(path: str | os.PathLike, length: int = 16) -> str:
    """The first ``length`` hex digits of the file's SHA-256 (identifies a checkpoint in caches and metadata)."""
    with open(path, "rb") as f:
        return content_digest(iter(lambda: f.read(1 << 20), b""), length=length)


def module_fingerprint(module: nn.Module) -> str:
    """SHA-256 (16 hex digits) over a module's state_dict names, shapes, dtypes and bytes."""

    def parts():
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            yield f"{name}|{tuple(t.shape)}|{t.dtype}"
            yield t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""

    return content_digest(parts())
