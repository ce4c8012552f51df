"""``edgekd data``: pack image folders into insightface RecordIO and ``.bin`` pair files, and check them."""

from __future__ import annotations

from pathlib import Path

import click

from edgekd.data.recordio import RecordIODataset, encode_image_file, pack_image_folder
from edgekd.data.verification_bin import load_bin, write_bin
from edgekd.errors import EdgekdError
from edgekd.utils.out_paths import check_output_dir, check_output_file


@click.group("data")
def data() -> None:
    """Pack image folders into insightface RecordIO / .bin files, and check them."""


@data.command("pack")
@click.argument("image_folder", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True,
              help="JPEG quality for images that are not already RGB JPEGs (those are stored unchanged)")  # fmt: skip
@click.option("--skip-bad", is_flag=True,
              help="leave out images that cannot be read (and list them) instead of stopping at the first")  # fmt: skip
def pack(image_folder: Path, out: Path, quality: int, skip_bad: bool) -> None:
    """Write OUT/train.rec + OUT/train.idx (insightface layout) from IMAGE_FOLDER/<identity>/<image>.

    The files appear only when packing succeeds; a failure leaves nothing in OUT.
    """
    check_output_dir(out, "OUT")
    info = pack_image_folder(image_folder, out, quality=quality, skip_bad=skip_bad)
    click.echo(f"packed {info['images']} images of {info['classes']} identities into {info['rec']}")
    _report_skipped(info["skipped"])


def _report_skipped(skipped: list[str], shown: int = 5) -> None:
    """How many images were left out, and the first few of them with the reason."""
    if not skipped:
        return
    click.echo(f"skipped {len(skipped)} unreadable image{'s' if len(skipped) > 1 else ''}:")
    for message in skipped[:shown]:
        click.echo(f"  {message}")
    if len(skipped) > shown:
        click.echo(f"  ... and {len(skipped) - shown} more")


def _read_pairs_file(pairs_file: Path) -> list[tuple[str, str, bool]]:
    if not pairs_file.is_file():
        raise EdgekdError(f"pairs file {pairs_file} not found")
    rows = []
    for n, line in enumerate(pairs_file.read_text().splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) != 3 or parts[2] not in ("0", "1"):
            raise EdgekdError(f"{pairs_file}: line {n} is not 'image_a image_b 0|1': {line.strip()[:60]!r}")
        rows.append((parts[0], parts[1], parts[2] == "1"))
    if not rows:
        raise EdgekdError(f"{pairs_file}: no pairs")
    return rows


@data.command("pack-bin")
@click.argument("pairs_file", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--root", type=click.Path(path_type=Path), default=None,
              help="folder the image paths are relative to (default: the pairs file's folder)")  # fmt: skip
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True,
              help="JPEG quality for images that are not already RGB JPEGs")  # fmt: skip
def pack_bin(pairs_file: Path, out: Path, root: Path | None, quality: int) -> None:
    """Write a verification .bin from PAIRS_FILE lines 'image_a image_b 0|1' (1 = same identity)."""
    check_output_file(out, option="OUT")
    rows = _read_pairs_file(pairs_file)
    root = root or pairs_file.parent
    encoded = []
    for a, b, _ in rows:
        for name in (a, b):
            path = root / name
            if not path.is_file():
                raise EdgekdError(f"{pairs_file}: image {path} not found")
            encoded.append(encode_image_file(path, quality))
    write_bin(out, encoded, [same for _, _, same in rows])
    click.echo(f"wrote {len(rows)} pairs ({sum(s for *_, s in rows)} genuine) to {out}")


@data.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--decode/--no-decode", default=True, show_default=True, help="also decode every image")
def verify(path: Path, decode: bool) -> None:
    """Check a RecordIO file/folder or a .bin pair file; list bad records (exit 2 if there are any)."""
    if path.suffix == ".bin":
        pairs = load_bin(path)
        click.echo(f"{path}: {len(pairs)} pairs, {pairs.num_genuine} genuine, images {tuple(pairs.images.shape)}")
        return

    ds = RecordIODataset(path, skip_bad=True)
    problems = ds.verify(decode_images=decode)
    for msg in problems[:20]:
        click.echo(msg)
    click.echo(f"{ds.rec_path}: {len(ds)} good images, {len(problems)} bad, {ds.num_classes} classes, "
               f"fingerprint {ds.fingerprint}")  # fmt: skip
    if problems:
        raise EdgekdError(f"{ds.rec_path} has {len(problems)} bad records; train with --skip-bad to leave them out")


command = data
