"""Corrupt RecordIO and .bin inputs: one-line DataErrors naming file and record, or skipped and counted."""

import io
import pickle
import warnings

import numpy as np
import pytest
from PIL import Image

from edgekd.cli import main
from edgekd.data.recordio import RecordIODataset, RecordWriter, pack_record
from edgekd.data.verification_bin import load_bin, write_bin
from edgekd.errors import DataError

N = 6  # image records 1..6, three classes


def _jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _write(root, bodies=None, labels=None):
    """Header + images 1..N (no identity records, so the last image ends the file); returns (rec, idx, offsets)."""
    bodies = bodies or {}
    labels = labels or {}
    offsets = {}
    with RecordWriter(root / "train.rec") as w:
        offsets[0] = w.write(0, pack_record([N + 1, N + 4]))
        for key in range(1, N + 1):
            body = bodies.get(key, _jpeg(key))
            offsets[key] = w.write(key, pack_record([labels.get(key, (key - 1) // 2), 0], body))
    return root / "train.rec", root / "train.idx", offsets


def _one_line_error(ds, index, *needles):
    with pytest.raises(DataError) as info:
        ds[index]
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def _skipping(root, expect_len, expect_skipped):
    ds = RecordIODataset(root, skip_bad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(ds) == expect_len
    assert ds.skipped == expect_skipped
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.shape == (3, 12, 12) and 0 <= label < ds.num_classes
    return ds


def test_truncated_rec(tmp_path):
    rec, _, offsets = _write(tmp_path)
    rec.write_bytes(rec.read_bytes()[: offsets[N] + 40])
    _one_line_error(RecordIODataset(tmp_path), N - 1, "train.rec", f"record {N} ", "truncated")
    _skipping(tmp_path, N - 1, 1)


def test_bad_magic_word(tmp_path):
    rec, _, offsets = _write(tmp_path)
    raw = bytearray(rec.read_bytes())
    raw[offsets[3] : offsets[3] + 4] = b"\xde\xad\xbe\xef"
    rec.write_bytes(bytes(raw))
    _one_line_error(RecordIODataset(tmp_path), 2, "train.rec", "record 3 ", "bad magic word 0xEFBEADDE")
    _skipping(tmp_path, N - 1, 1)


def test_index_points_past_end(tmp_path):
    rec, idx, _ = _write(tmp_path)
    size = rec.stat().st_size
    lines = [line.split("\t") for line in idx.read_text().splitlines()]
    idx.write_text("".join(f"{k}\t{size + 64 if k == '4' else off}\n" for k, off in lines))
    _one_line_error(RecordIODataset(tmp_path), 3, "train.rec", "record 4 ", "past the end")
    _skipping(tmp_path, N - 1, 1)


def test_corrupt_jpeg(tmp_path):
    _write(tmp_path, bodies={2: b"\xff\xd8 this is not a jpeg", 5: _jpeg(5)[:60]})
    ds = RecordIODataset(tmp_path)
    _one_line_error(ds, 1, "train.rec", "record 2 ", "cannot decode")
    _one_line_error(ds, 4, "train.rec", "record 5 ", "cannot decode")
    # skip_bad: the header pass cannot see image damage; a read falls through to the next good record ...
    lazy = RecordIODataset(tmp_path, skip_bad=True)
    assert len(lazy) == N and lazy.skipped == 0
    assert lazy[1][1] == lazy[2][1] and lazy.skipped == 1
    # ... and a decoding verification pass drops both up front
    with pytest.warns(UserWarning, match="skipped 2 bad records"):
        problems = lazy.verify(decode_images=True)
    assert len(lazy) == N - 2 and lazy.skipped == 2 and "record 2 " in problems[0] and "record 5 " in problems[1]


def test_label_out_of_range(tmp_path):
    _write(tmp_path, labels={4: 3})  # the header says 3 classes: labels 0..2
    _one_line_error(RecordIODataset(tmp_path), 3, "train.rec", "record 4", "label 3.0 is not in [0, 3)")
    ds = _skipping(tmp_path, N - 1, 1)
    assert ds.labels.tolist() == [0, 0, 1, 2, 2]


def test_bad_index_line_and_missing_files(tmp_path):
    _, idx, _ = _write(tmp_path)
    idx.write_text(idx.read_text() + "seven\teight\n")
    with pytest.raises(DataError, match=r"train\.idx: line 8 is not"):
        RecordIODataset(tmp_path)
    with pytest.raises(DataError, match="not found"):
        RecordIODataset(tmp_path / "nothing")


def test_bin_odd_count_and_mismatch(tmp_path):
    jpg = _jpeg(0)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(pickle.dumps(([jpg] * 3, [True]), protocol=2))
    with pytest.raises(DataError, match=r"odd\.bin: odd image count 3") as info:
        load_bin(odd)
    assert "\n" not in str(info.value)
    short = tmp_path / "short.bin"
    short.write_bytes(pickle.dumps(([jpg] * 4, [True]), protocol=2))
    with pytest.raises(DataError, match=r"short\.bin: 4 images but 1 issame"):
        load_bin(short)
    with pytest.raises(DataError, match=r"w\.bin: odd image count"):
        write_bin(tmp_path / "w.bin", [jpg] * 3, [True])


def test_bin_corrupt_image_and_pickle(tmp_path):
    path = write_bin(tmp_path / "bad.bin", [_jpeg(0), _jpeg(1), b"garbage", _jpeg(3)], [True, False])
    with pytest.raises(DataError, match=r"bad\.bin: image 2 \(pair 1\): cannot decode"):
        load_bin(path)
    (tmp_path / "junk.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(DataError, match=r"junk\.bin: not a verification \.bin pickle"):
        load_bin(tmp_path / "junk.bin")


def test_bin_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([Evil()], [True])))
    with pytest.raises(DataError, match=r"refusing to load builtins\.print"):
        load_bin(tmp_path / "evil.bin")


def test_cli_reports_bad_records_in_one_line(tmp_path, capsys):
    rec, _, offsets = _write(tmp_path)
    rec.write_bytes(rec.read_bytes()[: offsets[N] + 40])
    with pytest.raises(SystemExit) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["data", "verify", str(tmp_path)])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert f"record {N} " in out and "5 good images, 1 bad" in out
    assert err.count("\n") == 1 and err.startswith("edgekd: error:")


# --- values that would size an allocation: range-checked before anything is allocated from them -----------------


def _write_header(root, label):
    """The insightface layout with header record 0 holding ``label`` (float32 values, as stored)."""
    with RecordWriter(root / "train.rec") as w:
        w.write(0, pack_record(label))
        for key in range(1, N + 1):
            w.write(key, pack_record([(key - 1) // 2, 0], _jpeg(key)))


@pytest.mark.parametrize(
    "label",
    [
        [float("nan"), N + 4],
        [N + 1, float("inf")],
        [1e20, 1e20 + 3],
        [1e11, 1e11 + 3],  # an integer in float32, but 1e11 keys: hundreds of GiB if trusted
        [N + 1, 1e11],  # 1e11 classes
        [N + 1.5, N + 4],
        [0, 3],
        [N + 4, N + 1],
        [N + 3, N + 4],  # names more images than the index holds
    ],
)
def test_damaged_header_label_is_a_data_error(tmp_path, label):
    _write_header(tmp_path, label)
    for skip_bad in (False, True):
        with pytest.raises(DataError, match=r"train\.rec: header record 0 \(label \[") as info:
            RecordIODataset(tmp_path, skip_bad=skip_bad)
        assert "\n" not in str(info.value) and "re-pack" in str(info.value)


@pytest.mark.parametrize("value", [1e30, float("nan"), float("-inf"), -1.0, 2.5, float(1 << 24)])
def test_plain_file_label_out_of_range_is_a_data_error(tmp_path, value):
    with RecordWriter(tmp_path / "data.rec") as w:
        for key, label in enumerate([0.0, value, 1.0]):
            w.write(key, pack_record(label, _jpeg(key)))
    ds = RecordIODataset(tmp_path / "data.rec")
    with pytest.raises(DataError, match=r"record 1 at byte \d+: label .* is not in \[0, 2\^24\)"):
        ds.num_classes  # noqa: B018
    _one_line_error(ds, 1, "data.rec", "record 1 ", "--skip-bad")  # the hint names the CLI option (issue 23, class 7)
    skipping = RecordIODataset(tmp_path / "data.rec", skip_bad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert skipping.labels.tolist() == [0, 1] and skipping.num_classes == 2


@pytest.mark.parametrize("line", ["1\t99999999999999999999", "-1\t0", "1\t-40", "1\t1e5", "1\t\u00b2"])
def test_index_numbers_out_of_range(tmp_path, line):
    _, idx, _ = _write(tmp_path)
    lines = idx.read_text().splitlines()
    lines[1] = line
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train\.idx: line 2 is not 'key<TAB>offset' \(two integers >= 0\)"):
        RecordIODataset(tmp_path)


def _bin_error(tmp_path, raw: bytes, pattern: str) -> None:
    (tmp_path / "x.bin").write_bytes(raw)
    with pytest.raises(DataError, match=r"x\.bin: (not a verification \.bin pickle \()?" + pattern) as info:
        load_bin(tmp_path / "x.bin")
    assert "\n" not in str(info.value)


def test_bin_sizes_from_the_file_are_not_trusted(tmp_path):
    huge = b"\x8a\x05" + (10**12).to_bytes(5, "little")  # LONG1 10**12
    # a bytes length of 4 GiB with a few bytes behind it
    _bin_error(tmp_path, b"\x80\x04B\xf0\xff\xff\xff" + b"abc", r"expected 4294967280 bytes in a bytes4")
    # a memo index of 2^32 - 1: the unpickler would size its memo table from it
    _bin_error(tmp_path, b"\x80\x02]r\xff\xff\xff\xff.", r"memo index 4294967295")
    # bytearray(10**12), bytes(10**12), numpy.ndarray((10**12,)) and a 10**12-element _reconstruct
    _bin_error(tmp_path, b"\x80\x02c__builtin__\nbytearray\n" + huge + b"\x85R.", "refusing bytearray")
    _bin_error(tmp_path, b"\x80\x02c__builtin__\nbytes\n" + huge + b"\x85R.", "refusing bytes")
    _bin_error(tmp_path, b"\x80\x02cnumpy\nndarray\n" + huge + b"\x85R.", r"refusing numpy\.ndarray")
    reconstruct = b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + huge + b"\x85U\x01b\x87R."
    _bin_error(tmp_path, reconstruct, "refusing an array")
    # an object dtype: ndarray.__setstate__ would allocate the claimed number of object slots
    _bin_error(tmp_path, pickle.dumps(np.array([b"a", b"b"], dtype=object), protocol=2), "refusing numpy dtype object")
    # _codecs.encode with any codec but latin-1
    _bin_error(tmp_path, b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R.", "refusing _codecs")


def test_bin_types_are_checked(tmp_path):
    jpg = _jpeg(0)
    cases = [
        (({"a": jpg}, [True]), r"bins is a dict, not a list of encoded images"),
        (([jpg, jpg], "yes"), r"issame_list is a str, not a list of booleans"),
        (([jpg, jpg], [0.5]), r"issame_list\[0\] is float 0.5, not a boolean"),
        (([jpg, 7], [True]), r"image 1 \(pair 0\): expected encoded image bytes, got int"),
        (([jpg] * 2, [True], 3), r"expected a pickled \(bins, issame_list\) pair, got tuple"),
    ]
    for obj, pattern in cases:
        _bin_error(tmp_path, pickle.dumps(obj, protocol=2), pattern)
    # numpy booleans, ints 0/1 and uint8 arrays are what real files hold
    raw = pickle.dumps(([np.frombuffer(jpg, np.uint8), jpg], np.array([1], dtype=np.int64)), protocol=2)
    (tmp_path / "ok.bin").write_bytes(raw)
    assert load_bin(tmp_path / "ok.bin").issame.tolist() == [True]
