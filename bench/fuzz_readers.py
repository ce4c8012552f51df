"""Fuzz the RecordIO (``.rec`` + ``.idx``) and verification ``.bin`` readers: damaged files read or raise DataError.

Writes small valid files with edgekd's own writers: an insightface-layout ``.rec`` (header record, six images, one
of them stored split around a magic word, identity records), a plain im2rec ``.rec`` (scalar labels, no header), a
protocol-4 ``.bin`` as ``write_bin`` writes it and a protocol-2 ``.bin`` as insightface's Python 2 files are. Each
case mutates one of these files (bit flips, byte overwrites, extreme values such as NaN, inf and 1e30 written into
IRHeader fields or pickle length/memo fields, truncation, insertion, deletion, duplicated slices, and edits of the
index text), then reads it the way training and ``edgekd data verify`` do: every indexed record, every image and
label, strictly and with ``skip_bad``; or ``load_bin``. Outcomes per case:

- ``ok``: everything read (the mutation hit bytes that do not matter, e.g. inside JPEG entropy data);
- ``data_error``: a ``DataError`` (the contract for a damaged file);
- ``other``: any other exception, a bug. Each is printed with its traceback tail and a command that replays it.

Every case draws its randomness from ``(seed, case)`` alone, so ``--case K`` replays case K of a run by itself (and
``--save-dir`` keeps the mutated file). The process's address space is capped (``--memory-cap-gb`` above what it
uses at start), so a reader that allocates from an unchecked size fails with MemoryError instead of exhausting the
machine. The test suite runs the same fuzzer on a small budget (tests/data/test_reader_fuzz.py).

    python -m bench.fuzz_readers [--mutations 2000] [--seed 0] [--case K] [--save-dir DIR] [--memory-cap-gb 4]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pickle
import pickletools
import resource
import struct
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from edgekd.data.recordio import MAGIC, RecordIODataset, RecordWriter, pack_record, read_index
from edgekd.data.verification_bin import load_bin, write_bin
from edgekd.errors import DataError

OUTCOMES = ("ok", "data_error", "other")

# Values that break naive readers: non-finite and huge floats (labels), sizes and counts at type limits.
EXTREME_FLOATS = (float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 1e20, 1e11, 3e9, 16777217.0, -1.0, 0.5,
                  1e-40, 3.4028235e38)  # fmt: skip
EXTREME_INTS = (0, 1, 2, 255, 0x7FFF, 0xFFFF, (1 << 29) - 1, 1 << 29, 0x7FFFFFFF, 0xFFFFFFFF, MAGIC, 1 << 32,
                (1 << 63) - 1, (1 << 64) - 1)  # fmt: skip
EXTREME_INDEX_NUMBERS = ("-1", "0", "99999999999999999999", "9223372036854775807", "18446744073709551615", "1e30",
                         "nan", "+7", "0x10", "", "1 2", "\u00b2")  # fmt: skip


@dataclass
class Target:
    """One fixture file to mutate; ``fields`` are (byte offset, struct format) of header / length fields in it."""

    name: str
    path: Path
    read: Callable[[], None]
    fields: list[tuple[int, str]] = field(default_factory=list)
    text: bool = False  # an index: also mutated line by line


@dataclass
class Case:
    """The result of one mutation."""

    number: int
    target: str
    mutation: str
    outcome: str
    error: str = ""
    trace: str = ""
    data: bytes = b""


# --- fixtures -------------------------------------------------------------------------------------------------------


def _image_bytes(seed: int, fmt: str = "JPEG", size: int = 8) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _record_fields(offset: int, payload: bytes) -> list[tuple[int, str]]:
    """Chunk length word and IRHeader fields of the record written at ``offset`` (its first chunk)."""
    flag = struct.unpack_from("<I", payload)[0]
    fields = [(offset + 4, "<I"), (offset + 8, "<I"), (offset + 12, "<f"), (offset + 16, "<Q"), (offset + 24, "<Q")]
    return fields + [(offset + 32 + 4 * i, "<f") for i in range(flag)]


def _write_rec(rec: Path, records: list[tuple[int, bytes]]) -> list[tuple[int, str]]:
    """Write the records; the fields of all of them, those of the first (the header, if any) listed 8 times over:
    one value there sizes the whole dataset, so it deserves more of the mutations than one image's label."""
    fields = []
    with RecordWriter(rec) as writer:
        for n, (key, payload) in enumerate(records):
            fields += _record_fields(writer.write(key, payload), payload) * (8 if n == 0 else 1)
    return fields


def _insightface_records() -> list[tuple[int, bytes]]:
    """Header, six images of three classes (one PNG, one split by a magic word in its id), identity records."""
    n, k = 6, 3
    records = [(0, pack_record([n + 1, n + 1 + k]))]
    for key in range(1, n + 1):
        body = _image_bytes(key, "PNG" if key == 4 else "JPEG")
        records.append((key, pack_record([(key - 1) // 2, 0], body, id=MAGIC if key == 2 else 0)))
    records += [(n + 1 + c, pack_record([1 + 2 * c, 3 + 2 * c])) for c in range(k)]
    return records


def _plain_records() -> list[tuple[int, bytes]]:
    return [(key, pack_record(float(label), _image_bytes(10 + key))) for key, label in enumerate([2, 0, 1, 1])]


def _pickle_fields(data: bytes) -> list[tuple[int, str]]:
    """Offsets of the pickle's length, memo-index and integer arguments, by their width."""
    widths = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}
    fields = []
    for op, _, pos in pickletools.genops(data):
        width = op.arg.n if op.arg is not None else 0
        if width in widths and op.name != "BINFLOAT":
            fields.append((pos + 1, widths[width]))
    return fields


def make_targets(folder: Path) -> list[Target]:
    """Write the valid fixture files into ``folder``; one Target per file to mutate."""
    targets = []
    for name, records in (("insightface", _insightface_records()), ("plain", _plain_records())):
        rec = folder / name / "train.rec"
        rec.parent.mkdir(parents=True)
        fields = _write_rec(rec, records)
        targets.append(Target(f"{name}.rec", rec, lambda r=rec: read_recordio(r), fields))
        targets.append(Target(f"{name}.idx", rec.with_suffix(".idx"), lambda r=rec: read_recordio(r), text=True))
    images = [_image_bytes(20 + i, "PNG" if i == 1 else "JPEG") for i in range(4)]
    p4 = write_bin(folder / "protocol4.bin", images, [True, False])
    p2 = folder / "protocol2.bin"
    p2.write_bytes(pickle.dumps((images, [np.bool_(False), np.bool_(True)]), protocol=2))
    for path in (p4, p2):
        targets.append(Target(path.name, path, lambda p=path: read_bin(p), _pickle_fields(path.read_bytes())))
    return targets


# --- readers --------------------------------------------------------------------------------------------------------


def _read_items(ds: RecordIODataset) -> None:
    ds.num_classes  # noqa: B018 -- the property reads every label
    for i in range(len(ds)):
        ds[i]
        ds.encoded(i)


def read_recordio(rec: Path) -> None:
    """Read everything a training run or ``edgekd data verify`` reads: strictly, then with ``skip_bad``.

    Raises the first error; a DataError from the strict pass still lets the skipping pass run.
    """
    first: DataError | None = None
    try:
        ds = RecordIODataset(rec)
        for key in read_index(ds.idx_path)[0].tolist():
            ds.read_record(key)
        _read_items(ds)
    except DataError as exc:
        first = exc
    ds = RecordIODataset(rec, skip_bad=True)
    ds.verify(decode_images=True)
    _read_items(ds)
    if first is not None:
        raise first


def read_bin(path: Path) -> None:
    load_bin(path)


# --- mutations ------------------------------------------------------------------------------------------------------


def _flip_bits(rng: np.random.Generator, data: bytes, target: Target) -> tuple[bytes, str]:
    out = bytearray(data)
    bits = rng.integers(0, 8 * len(out), int(rng.integers(1, 9))).tolist()
    for bit in bits:
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out), f"flip bits {bits}"


def _overwrite_bytes(rng: np.random.Generator, data: bytes, target: Target) -> tuple[bytes, str]:
    pos = int(rng.integers(0, len(data)))
    choice = rng.integers(0, 3)
    if choice == 0:
        new = bytes([int(rng.choice([0x00, 0xFF, 0x80, 0x7F]))]) * int(rng.integers(1, 9))
    else:
        new = rng.integers(0, 256, int(rng.integers(1, 17)), dtype=np.uint8).tobytes()
    new = new[: len(data) - pos]
    return data[:pos] + new + data[pos + len(new) :], f"overwrite {len(new)} bytes at {pos} with {new.hex()}"


def _extreme_value(rng: np.random.Generator, fmt: str) -> float | int:
    if fmt == "<f":
        return EXTREME_FLOATS[int(rng.integers(0, len(EXTREME_FLOATS)))]
    limit = 1 << (8 * struct.calcsize(fmt))
    values = [v for v in EXTREME_INTS if v < limit] + [limit - 1, limit // 2]
    return values[int(rng.integers(0, len(values)))]  # by index: numpy would turn 2**64 - 1 into a float


def _write_extreme(rng: np.random.Generator, data: bytes, target: Target) -> tuple[bytes, str]:
    """An extreme value into a header/length field (or, a quarter of the time, at a random offset)."""
    if target.fields and rng.random() < 0.75:
        pos, fmt = target.fields[int(rng.integers(0, len(target.fields)))]
    else:
        fmt = str(rng.choice(["<f", "<I", "<Q", "<B"]))
        pos = int(rng.integers(0, max(1, len(data) - struct.calcsize(fmt))))
    if fmt == "<I" and rng.random() < 0.3:
        fmt = "<f"  # a float's bits in an integer field, as a shifted header would hold
    value = _extreme_value(rng, fmt)
    new = struct.pack(fmt, value)[: len(data) - pos]
    return data[:pos] + new + data[pos + len(new) :], f"write {fmt} {value!r} at {pos}"


def _truncate(rng: np.random.Generator, data: bytes, target: Target) -> tuple[bytes, str]:
    size = int(rng.integers(0, len(data)))
    return data[:size], f"truncate to {size} bytes"


def _insert(rng: np.random.Generator, data: bytes, target: Target) -> tuple[bytes, str]:
    pos = int(rng.integers(0, len(data) + 1))
    if not data or rng.random() < 0.5:
        new = rng.integers(0, 256, int(rng.integers(1, 65)), dtype=np.uint8).tobytes()
    else:  # a copy of a slice of the file itself: a duplicated chunk header, magic word or pickle opcode run
        start = int(rng.integers(0, len(data)))
        new = data[start : start + int(rng.integers(1, 65))]
    return data[:pos] + new + data[pos:], f"insert {new.hex()} at {pos}"


def _delete(rng: np.random.Generator, data: bytes, target: Target) -> tuple[bytes, str]:
    pos = int(rng.integers(0, len(data)))
    count = int(rng.integers(1, 65))
    return data[:pos] + data[pos + count :], f"delete {count} bytes at {pos}"


def _copy_slice(rng: np.random.Generator, data: bytes, target: Target) -> tuple[bytes, str]:
    src, dst = (int(v) for v in rng.integers(0, len(data), 2))
    new = data[src : src + int(rng.integers(4, 33))][: len(data) - dst]
    return data[:dst] + new + data[dst + len(new) :], f"copy {len(new)} bytes from {src} over {dst}"


def _index_number(rng: np.random.Generator, data: bytes, target: Target) -> tuple[bytes, str]:
    lines = data.decode().splitlines()
    row = int(rng.integers(0, len(lines)))
    parts = lines[row].split("\t")
    col = int(rng.integers(0, len(parts)))
    parts[col] = str(rng.choice(EXTREME_INDEX_NUMBERS))
    lines[row] = "\t".join(parts)
    return ("\n".join(lines) + "\n").encode(), f"index line {row + 1} field {col + 1} := {parts[col]!r}"


def _index_lines(rng: np.random.Generator, data: bytes, target: Target) -> tuple[bytes, str]:
    lines = data.decode().splitlines()
    row, other = (int(v) for v in rng.integers(0, len(lines), 2))
    action = str(rng.choice(["drop", "duplicate", "swap keys", "move"]))
    if action == "drop":
        del lines[row]
    elif action == "duplicate":
        lines.insert(other, lines[row])
    elif action == "swap keys":
        (a, x), (b, y) = lines[row].split("\t"), lines[other].split("\t")
        lines[row], lines[other] = f"{b}\t{x}", f"{a}\t{y}"
    else:
        lines.insert(other, lines.pop(row))
    return ("\n".join(lines) + "\n").encode(), f"index: {action} line {row + 1} (other {other + 1})"


BYTE_MUTATIONS = (_flip_bits, _overwrite_bytes, _write_extreme, _truncate, _insert, _delete, _copy_slice)
TEXT_MUTATIONS = (_index_number, _index_lines)


def mutate(rng: np.random.Generator, data: bytes, target: Target) -> tuple[bytes, str]:
    """One or (a fifth of the time) two mutations of ``data``; returns the bytes and what was done."""
    steps = []
    for _ in range(2 if rng.random() < 0.2 else 1):
        choices = BYTE_MUTATIONS + (TEXT_MUTATIONS * 2 if target.text and _is_index_text(data) else ())
        mutation = choices[int(rng.integers(0, len(choices)))] if data else _insert
        data, what = mutation(rng, data, target)
        steps.append(what)
    return data, "; ".join(steps)


def _is_index_text(data: bytes) -> bool:
    """Whether the line edits apply: ASCII lines of two tab-separated fields (not after a byte-level mutation)."""
    return data.isascii() and bool(data.strip()) and all(len(line.split(b"\t")) == 2 for line in data.splitlines())


# --- running --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def memory_cap(extra_bytes: int) -> Iterator[None]:
    """Cap the address space at its current size + ``extra_bytes`` (a runaway allocation raises MemoryError)."""
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = used + extra_bytes if hard == resource.RLIM_INFINITY else min(hard, used + extra_bytes)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_case(targets: list[Target], originals: dict[str, bytes], seed: int, number: int) -> Case:
    """Mutate one target as case ``number`` of run ``seed`` dictates, read it, restore it; the outcome."""
    rng = np.random.default_rng([seed, number])
    target = targets[int(rng.integers(0, len(targets)))]
    data, what = mutate(rng, originals[target.name], target)
    target.path.write_bytes(data)
    case = Case(number, target.name, what, "ok", data=data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skip_bad's summaries and PIL's size warnings
            target.read()
    except DataError as exc:
        case.outcome, case.error = "data_error", str(exc)
    except Exception as exc:  # noqa: BLE001 -- any other type is what the fuzzer exists to find
        case.outcome, case.error = "other", f"{type(exc).__name__}: {exc}"
        case.trace = "".join(traceback.format_exception(exc)[-4:])
    finally:
        target.path.write_bytes(originals[target.name])
    if case.outcome != "other":
        case.data = b""  # tens of thousands of cases: keep only the files worth replaying
    return case


def fuzz(mutations: int, seed: int, workdir: Path, cases: list[int] | None = None,
         memory_cap_bytes: int = 4 << 30) -> list[Case]:  # fmt: skip
    """Run cases ``0 .. mutations-1`` (or just ``cases``) on fixtures written under ``workdir``."""
    targets = make_targets(workdir)
    originals = {t.name: t.path.read_bytes() for t in targets}
    with memory_cap(memory_cap_bytes):
        return [run_case(targets, originals, seed, n) for n in (cases if cases is not None else range(mutations))]


def summarize(results: list[Case]) -> Counter:
    """Counts per (target, outcome) and per outcome (target ``all``)."""
    counts = Counter((c.target, c.outcome) for c in results)
    counts.update(("all", c.outcome) for c in results)
    return counts


def describe_failure(case: Case, seed: int, mutations: int) -> str:
    """A failing case: what was mutated, the exception, its traceback tail and the command that replays it."""
    return (
        f"case {case.number}: {case.target}: {case.mutation}\n  {case.error}\n{case.trace}"
        f"  replay: python -m bench.fuzz_readers --seed {seed} --mutations {mutations} --case {case.number} "
        f"--save-dir fuzz-case-{case.number}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutations", type=int, default=2000, help="number of cases (mutated files) to read")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case", type=int, action="append", help="replay only this case (repeatable)")
    parser.add_argument("--save-dir", type=Path, help="write the mutated file of every failing case here")
    parser.add_argument("--memory-cap-gb", type=float, default=4.0, help="address space allowed beyond the start")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgekd-fuzz-") as tmp:
        results = fuzz(args.mutations, args.seed, Path(tmp), args.case, int(args.memory_cap_gb * (1 << 30)))
    wall = time.perf_counter() - start
    counts = summarize(results)
    names = sorted({c.target for c in results}) + ["all"]
    print(f"{len(results)} mutations, seed {args.seed}, {wall:.1f} s")
    print(f"{'target':<18}" + "".join(f"{o:>12}" for o in OUTCOMES))
    for name in names:
        print(f"{name:<18}" + "".join(f"{counts[(name, o)]:>12}" for o in OUTCOMES))
    failures = [c for c in results if c.outcome == "other"]
    kinds = Counter(c.error.split(":")[0] for c in failures)
    if failures:
        print(f"\n{len(failures)} non-edgekd exceptions ({', '.join(f'{k} x{n}' for k, n in kinds.items())}):")
        for case in failures[:20]:
            print(describe_failure(case, args.seed, args.mutations))
    if args.save_dir:
        args.save_dir.mkdir(parents=True, exist_ok=True)
        for case in failures:
            (args.save_dir / f"case-{case.number}-{case.target}").write_bytes(case.data)
    if args.case:
        for case in results:
            print(f"case {case.number}: {case.target}: {case.mutation} -> {case.outcome} {case.error}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
