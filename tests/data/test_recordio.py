"""RecordIO: dmlc chunk framing at byte level, writer -> reader round trips, the insightface layout, workers."""

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from edgekd.data.recordio import (
    MAGIC,
    RecordIODataset,
    RecordWriter,
    encode_chunks,
    pack_image_folder,
    pack_record,
    unpack_record,
)

MAGIC_LE = b"\x0a\x23\xd7\xce"  # 0xCED7230A little-endian, written out by hand


def _jpeg(seed: int, size: int = 16) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_magic_constant_bytes():
    assert struct.pack("<I", MAGIC) == MAGIC_LE


def test_encode_chunks_splits_at_aligned_magic_byte_exact():
    # magic at offsets 8 and 16 (aligned: split), at 3 (unaligned: kept), length 23 (not a multiple of 4)
    payload = b"abc" + MAGIC_LE + b"d" + MAGIC_LE + b"efgh" + MAGIC_LE + b"ijk"
    assert len(payload) == 23 and payload[8:12] == MAGIC_LE and payload[16:20] == MAGIC_LE
    expected = (
        MAGIC_LE + bytes([8, 0, 0, 0x20]) + payload[0:8]  # cflag 1 (1 << 29), 8 bytes
        + MAGIC_LE + bytes([4, 0, 0, 0x40]) + payload[12:16]  # cflag 2, 4 bytes
        + MAGIC_LE + bytes([3, 0, 0, 0x60]) + payload[20:23] + b"\0"  # cflag 3, 3 bytes, 1 pad byte
    )  # fmt: skip
    assert encode_chunks(payload) == expected


def test_encode_chunks_plain_and_leading_magic():
    assert encode_chunks(b"hello") == MAGIC_LE + bytes([5, 0, 0, 0]) + b"hello\0\0\0"
    assert encode_chunks(b"") == MAGIC_LE + bytes(4)
    # a payload that starts with the magic: an empty first part
    assert encode_chunks(MAGIC_LE + b"xy") == (
        MAGIC_LE + bytes([0, 0, 0, 0x20]) + MAGIC_LE + bytes([2, 0, 0, 0x60]) + b"xy\0\0"
    )


def test_pack_record_header_layout():
    scalar = pack_record(7.0, b"BODY", id=3)
    assert scalar[:24] == struct.pack("<IfQQ", 0, 7.0, 3, 0) and scalar[24:] == b"BODY"
    arr = pack_record([2.0, 1.5], b"BODY")
    assert arr[:24] == struct.pack("<IfQQ", 2, 0.0, 0, 0) and arr[24:32] == struct.pack("<2f", 2.0, 1.5)
    header, body = unpack_record(arr)
    assert header.flag == 2 and header.label == (2.0, 1.5) and body == b"BODY"


def _write_insightface(path, records, num_classes, extra=()):
    """records: list of (label, body, id); header + images 1..N + no identity records + extra (key, payload)."""
    n = len(records)
    with RecordWriter(path / "train.rec") as w:
        w.write(0, pack_record([n + 1, n + 1 + num_classes]))
        for key, (label, body, id_) in enumerate(records, 1):
            w.write(key, pack_record(label, body, id=id_))
        for key, payload in extra:
            w.write(key, payload)


def test_round_trip_split_record_and_label_array(tmp_path):
    imgs = [_jpeg(i) for i in range(4)]
    # id=MAGIC puts the magic word at payload offset 8: that record is stored split and must be re-joined.
    records = [
        ([0, 0], imgs[0][0], 0),
        ([1.0, 0.25, 9.0], imgs[1][0], MAGIC),
        (2, imgs[2][0], 0),
        ([1, 0], imgs[3][0], 0),
    ]
    _write_insightface(tmp_path, records, num_classes=3)
    raw = (tmp_path / "train.rec").read_bytes()
    assert raw.count(MAGIC_LE) == 6  # 5 records + 1 extra chunk for the split one
    ds = RecordIODataset(tmp_path)
    assert len(ds) == 4 and ds.num_classes == 3 and ds.channels == 3 and ds.image_size == 16
    for i, (_, arr) in enumerate(imgs):
        img, label = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 16, 16)
        assert np.array_equal(img.permute(1, 2, 0).numpy(), arr)
        assert label == [0, 1, 2, 1][i]
    assert ds.labels.tolist() == [0, 1, 2, 1]
    header, body = ds.read_record(2)  # the split record, joined with its magic word re-inserted
    assert header.id == MAGIC and header.label == pytest.approx((1.0, 0.25, 9.0)) and body == imgs[1][0]


def test_plain_im2rec_file_without_header(tmp_path):
    imgs = [_jpeg(i) for i in range(3)]
    with RecordWriter(tmp_path / "data.rec") as w:
        for key, (label, (body, _)) in enumerate(zip([2, 0, 1], imgs, strict=True)):
            w.write(key, pack_record(float(label), body))
    ds = RecordIODataset(tmp_path / "data.rec", image_size=8)
    assert len(ds) == 3 and ds.num_classes == 3 and ds.image_size == 8
    assert [ds[i][1] for i in range(3)] == [2, 0, 1] and ds[0][0].shape == (3, 8, 8)


def _make_folder(root, counts=(2, 3, 1), size=20):
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, size)[None, :, None] + np.linspace(0, 50, size)[:, None, None]
    expected = []
    for c, n in enumerate(counts):
        d = root / f"person_{c:02d}"
        d.mkdir(parents=True)
        for i in range(n):
            arr = (ramp * rng.uniform(0.5, 1.2, 3)).astype(np.uint8)  # smooth: JPEG keeps it within a few levels
            if i == 1:  # a PNG: re-encoded as JPEG by the packer
                Image.fromarray(arr).save(d / f"{i}.png")
                expected.append((c, arr, False))
            else:
                Image.fromarray(arr).save(d / f"{i}.jpg", quality=92)
                expected.append((c, np.asarray(Image.open(d / f"{i}.jpg").convert("RGB")), True))
    return expected


def test_pack_image_folder_insightface_layout(tmp_path):
    expected = _make_folder(tmp_path / "faces")
    info = pack_image_folder(tmp_path / "faces", tmp_path / "rec")
    assert info["images"] == 6 and info["classes"] == 3
    ds = RecordIODataset(tmp_path / "rec")
    header, body = ds.read_record(0)
    assert header.flag == 2 and header.label == (7.0, 10.0) and body == b""
    assert [ds.read_record(k)[0].label for k in (7, 8, 9)] == [(1.0, 3.0), (3.0, 6.0), (6.0, 7.0)]
    assert ds.read_record(1)[0].label == (0.0, 0.0)
    assert len(ds) == 6 and ds.num_classes == 3 and ds.labels.tolist() == [0, 0, 1, 1, 1, 2]
    for i, (cls, arr, exact) in enumerate(expected):
        img, label = ds[i]
        assert label == cls
        got = img.permute(1, 2, 0).numpy().astype(int)
        # JPEG files are packed as their bytes and decoded alike: exact; a PNG re-encoded as JPEG of this smooth ramp
        # (the packer's quality 95) is off by a few grey levels on average
        assert np.array_equal(got, arr) if exact else np.abs(got - arr).mean() < 8


def test_fingerprint_stable_and_sensitive(tmp_path):
    _make_folder(tmp_path / "faces")
    pack_image_folder(tmp_path / "faces", tmp_path / "a")
    fp = RecordIODataset(tmp_path / "a").fingerprint
    assert len(fp) == 16 and RecordIODataset(tmp_path / "a" / "train.rec").fingerprint == fp
    idx = tmp_path / "a" / "train.idx"
    idx.write_text(idx.read_text().replace("\n", "\n", 1))  # same content, new mtime of idx only
    assert RecordIODataset(tmp_path / "a").fingerprint == fp
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines[:-1]) + "\n")  # drop the last identity record from the index
    assert RecordIODataset(tmp_path / "a").fingerprint != fp


def test_dataloader_workers_match_direct_reads(tmp_path):
    _make_folder(tmp_path / "faces")
    pack_image_folder(tmp_path / "faces", tmp_path / "rec")
    ds = RecordIODataset(tmp_path / "rec")
    direct = torch.stack([ds[i][0] for i in range(len(ds))])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    assert torch.equal(torch.cat([b[0] for b in batches]), direct)
    assert torch.cat([b[1] for b in batches]).tolist() == ds.labels.tolist()


def test_cli_pack_and_verify(tmp_path, capsys):
    from edgekd.cli import main

    _make_folder(tmp_path / "faces")
    main(["data", "pack", str(tmp_path / "faces"), str(tmp_path / "rec"), "--quality", "90"])
    assert "packed 6 images of 3 identities" in capsys.readouterr().out
    main(["data", "verify", str(tmp_path / "rec")])
    assert "6 good images, 0 bad, 3 classes" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["data", "pack", str(tmp_path / "missing"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "missing" in err
    assert not (tmp_path / "out" / "train.rec").exists()
