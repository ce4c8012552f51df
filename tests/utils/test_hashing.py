"""edgekd.utils.hashing, the one home of every digest: equal to hashlib, and recorded fingerprints never change."""

import hashlib

import torch

from edgekd.utils.hashing import content_digest, file_sha256, json_digest, module_fingerprint


def test_digests_equal_hashlib_over_the_concatenated_parts(tmp_path):
    parts = [b"abc", "d\u00e9f", (x for x in (b"1", "2"))]
    assert content_digest(*parts) == hashlib.sha256(b"abc" + "d\u00e9f".encode() + b"12").hexdigest()[:16]
    assert content_digest(b"x", length=40, algorithm="sha1") == hashlib.sha1(b"x").hexdigest()
    assert json_digest({"b": 1, "a": [1]}, length=24) == hashlib.sha256(b'{"a": [1], "b": 1}').hexdigest()[:24]
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 5000)  # more than one read block
    assert file_sha256(path, length=64) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_module_fingerprint_follows_weights_names_and_dtypes():
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert module_fingerprint(a) == module_fingerprint(b)
    with torch.no_grad():
        b.bias[0] += 1e-6
    assert module_fingerprint(a) != module_fingerprint(b)
    c = torch.nn.Linear(3, 2)
    c.load_state_dict(a.state_dict())
    assert module_fingerprint(a) != module_fingerprint(c.double())  # same values, another dtype


def test_data_fingerprints_are_the_recorded_ones():
    """Checkpoints, teacher caches and study results hold these values: a hashing change must not move them."""
    from edgekd.data import create_pairs
    from edgekd.data.synthetic import SyntheticIdentities

    assert SyntheticIdentities(identities=8, images_per_identity=8, image_size=32, seed=0).fingerprint == (
        "38a7695270931651"
    )
    pairs = create_pairs("synthetic:identities=6,images_per_identity=4,image_size=16,pairs=20")
    assert pairs.fingerprint == "6c0af92e0a3ef017"
