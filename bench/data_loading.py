"""Data-loading throughput: decode + random flip + normalize, images/s, insightface RecordIO vs an image folder.

Generates a face-sized JPEG set (default 2,000 images, 112×112, 100 identities) in a temporary folder, packs it into
``train.rec`` with ``edgekd data pack``'s writer, then times a DataLoader over each reader with ``--workers`` CPU
worker processes; flip and normalization run on each batch in the main process, as in training. With CUDA, a third
row decodes the RecordIO payloads on the GPU (``torchvision.io.decode_jpeg(device="cuda")``, batched).

Prints one row per reader and updates the "Data loading" section of BENCHMARKS.md (rows with the same reader,
image count, size, workers and host are replaced; other sections are left alone).

    python -m bench.data_loading [--images 2000] [--size 112] [--workers 2] [--batch-size 128] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edgekd.atomic import atomic_path
from edgekd.data.image_folder import ImageFolder
from edgekd.data.recordio import RecordIODataset, pack_image_folder
from edgekd.data.transforms import FACE_MEAN, FACE_STD, normalize, random_hflip
from edgekd.utils.env import cpu_name, gpu_info

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Data loading"
HEADER = "| reader | images | size | workers | batch | images/s | ms/batch | host | torch | date |"
RULE = "|---|---:|---:|---:|---:|---:|---:|---|---|---|"


def make_images(folder: Path, count: int, size: int, identities: int = 100) -> None:
    """Smooth colored face-sized images with noise, saved as quality-95 JPEGs (about the size of aligned crops)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        ident = i % identities
        d = folder / f"id_{ident:04d}"
        d.mkdir(parents=True, exist_ok=True)
        base = np.random.default_rng(ident).uniform(40, 220, 3)
        img = (
            base
            + 60 * np.sin(6 * xx + ident)[..., None] * np.cos(4 * yy)[..., None]
            + rng.normal(0, 12, (size,) * 2 + (3,))
        )
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:06d}.jpg", quality=95)


def time_loader(dataset, batch_size: int, workers: int, epochs: int = 3) -> tuple[float, float]:
    """Images/s and ms/batch (median over ``epochs`` after one warm-up epoch) of decode + flip + normalize."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    rates = []
    for epoch in range(epochs + 1):
        start, n = time.perf_counter(), 0
        for images, _ in loader:
            x = normalize(random_hflip(images), FACE_MEAN, FACE_STD)
            n += x.shape[0]
        if epoch:
            rates.append(n / (time.perf_counter() - start))
    rate = statistics.median(rates)
    return rate, 1000 * batch_size / rate


def time_gpu_decode(dataset: RecordIODataset, batch_size: int, epochs: int = 3) -> tuple[float, float]:
    """Images/s of nvJPEG batch decode + flip + normalize on the GPU, payloads read from the RecordIO file."""
    from torchvision.io import decode_jpeg

    payloads = [torch.frombuffer(bytearray(dataset.encoded(i)[0]), dtype=torch.uint8) for i in range(len(dataset))]
    rates = []
    for epoch in range(epochs + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for lo in range(0, len(payloads), batch_size):
            images = torch.stack(decode_jpeg(payloads[lo : lo + batch_size], device="cuda"))
            x = normalize(random_hflip(images), FACE_MEAN, FACE_STD)
        torch.cuda.synchronize()
        if epoch:
            rates.append(len(payloads) / (time.perf_counter() - start))
    del x
    rate = statistics.median(rates)
    return rate, 1000 * batch_size / rate


def update_benchmarks(path: Path, rows: list[list[str]], command: str) -> None:
    """Replace rows with the same key (reader, images, size, workers, host) in our section; keep everything else."""
    text = (
        path.read_text()
        if path.is_file()
        else "# Benchmarks\n\nMeasured numbers; each section names the script that writes it.\n"
    )
    match = re.search(rf"^{re.escape(SECTION)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    old_rows = []
    if match:
        old_rows = [line for line in match.group(1).splitlines() if line.startswith("| ") and line != HEADER]

    def key(cells):
        return (cells[0], cells[1], cells[2], cells[3], cells[7])

    new_keys = {key(r) for r in rows}
    kept = [line for line in old_rows if key([c.strip() for c in line.strip("|").split("|")]) not in new_keys]
    table = kept + ["| " + " | ".join(r) + " |" for r in rows]
    body = (
        f"{SECTION}\n\nDecode + random flip + normalize throughput, written by `{command}`. CPU rows use DataLoader "
        "worker processes; flip and normalize run per batch in the main process. The CPU of a shared machine "
        "can make CPU rows noisy; compare rows from one host.\n\n" + "\n".join([HEADER, RULE, *table]) + "\n\n"
    )
    text = text[: match.start()] + body + text[match.end() :] if match else text.rstrip("\n") + "\n\n" + body
    with atomic_path(path) as tmp:
        tmp.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--benchmarks", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gpu = gpu_info() if torch.cuda.is_available() else None
    host = f"{cpu_name()} ({os.cpu_count()} cores)" + (f" + {gpu.get('name', 'GPU')}" if gpu else "")
    common = [str(args.images), str(args.size), str(args.workers), str(args.batch_size)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgekd-bench-") as tmp:
        tmp = Path(tmp)
        make_images(tmp / "folder", args.images, args.size)
        pack_image_folder(tmp / "folder", tmp / "rec")
        readers = {"RecordIO": RecordIODataset(tmp / "rec"), "ImageFolder": ImageFolder(tmp / "folder")}
        for name, dataset in readers.items():
            rate, ms = time_loader(dataset, args.batch_size, args.workers, args.epochs)
            rows.append([name, *common, f"{rate:.0f}", f"{ms:.1f}"])
        if gpu:
            rate, ms = time_gpu_decode(readers["RecordIO"], args.batch_size, args.epochs)
            rows.append(["RecordIO + nvJPEG (cuda)", common[0], common[1], "0", common[3], f"{rate:.0f}", f"{ms:.1f}"])
    date = datetime.date.today().isoformat()
    rows = [r + [host, torch.__version__.split("+")[0], date] for r in rows]
    print(HEADER)
    print(RULE)
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if not args.no_write:
        command = "python -m bench.data_loading " + " ".join(sys.argv[1:] if argv is None else argv)
        update_benchmarks(args.benchmarks, rows, command.strip())
        print(f"updated {os.path.relpath(args.benchmarks)}")


if __name__ == "__main__":
    main()
