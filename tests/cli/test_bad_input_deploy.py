"""Bad input to the deployment commands (``eval``, ``export``, ``benchmark-latency``) through the real CLI.

Every case must exit non-zero with exactly one line on stderr that names the problem, print no traceback, and leave
no file in the output location; all of them fail before any export, gate or timing starts.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

SIZE = 32


def _read_only_dir(tmp_path: Path) -> Path:
    """A folder nobody can create files in: chmod 555, or, for root (who ignores modes), a read-only filesystem."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return folder
    for candidate in (Path("/sys"), Path("/proc")):
        try:
            (candidate / ".edgekd-probe").touch()
        except OSError:
            return candidate / "edgekd-out"
        (candidate / ".edgekd-probe").unlink()
    pytest.skip("running as root with no read-only filesystem to write into")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny checkpoint, a foreign ONNX of it with a fixed 1x3x32x32 input, and broken files."""
    from edgekd.bundle import Bundle, save_bundle
    from edgekd.models import create_model

    root = tmp_path_factory.mktemp("bad-input")
    torch.manual_seed(0)
    model = create_model("mbf_tiny", input_size=SIZE).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, SIZE, SIZE),), buf, dynamo=False, opset_version=11)
    (root / "model.onnx").write_bytes(buf.getvalue())
    (root / "corrupt.onnx").write_bytes(b"\x08\x07this is not a protobuf" * 50)
    (root / "empty.onnx").write_bytes(b"")
    (root / "weights.txt").write_text("not a model")
    (root / "garbage.safetensors").write_bytes(b"garbage" * 20)
    (root / "a-file").write_text("x")
    (root / "a-folder").mkdir()
    return SimpleNamespace(
        root=root,
        ckpt=str(save_bundle(root / "m.safetensors", Bundle(backbone=model))),
        onnx=str(root / "model.onnx"),
        corrupt=str(root / "corrupt.onnx"),
        empty=str(root / "empty.onnx"),
        txt=str(root / "weights.txt"),
        garbage=str(root / "garbage.safetensors"),
        a_file=str(root / "a-file"),
        a_folder=str(root / "a-folder"),
    )


FAST_BENCH = ["--iters", "1", "--min-seconds", "0", "--warmup", "0", "--warmup-seconds", "0"]

# (id, argv given the inputs `i` and the output folder `o`, fragments the error line must contain)
CASES = [
    # eval
    ("eval-missing-model", lambda i, o: ["eval", f"{i.root}/nope.onnx", "--out", o], ["nope.onnx", "does not exist"]),
    ("eval-corrupt-onnx", lambda i, o: ["eval", i.corrupt, "--out", o], ["corrupt.onnx", "corrupt"]),
    ("eval-empty-onnx", lambda i, o: ["eval", i.empty, "--out", o], ["empty.onnx", "empty"]),
    ("eval-wrong-suffix", lambda i, o: ["eval", i.txt, "--out", o], ["weights.txt", ".txt"]),
    ("eval-folder-as-model", lambda i, o: ["eval", i.a_folder, "--out", o], ["a-folder"]),
    ("eval-corrupt-checkpoint", lambda i, o: ["eval", i.garbage, "--out", o], ["garbage.safetensors"]),
    ("eval-batch-0", lambda i, o: ["eval", i.onnx, "--batch-size", "0", "--out", o], ["--batch-size", "0"]),
    ("eval-image-size", lambda i, o: ["eval", i.onnx, "--image-size", "48", "--out", o], ["48", "32x32"]),
    (
        "eval-pairs-size",
        lambda i, o: ["eval", i.onnx, "--pairs", "synthetic:image_size=48,pairs=20", "--out", o],
        ["48x48", "32x32", "--image-size"],
    ),
    ("eval-ckpt-image-size", lambda i, o: ["eval", i.ckpt, "--image-size", "64", "--out", o], ["64", "32x32"]),
    ("eval-out-is-file", lambda i, o: ["eval", i.onnx, "--out", i.a_file], ["a-file", "is a file"]),
    ("eval-std-0", lambda i, o: ["eval", i.onnx, "--std", "0", "--out", o], ["--std"]),
    ("eval-mean-text", lambda i, o: ["eval", i.onnx, "--mean", "grey", "--out", o], ["--mean", "grey"]),
    ("eval-device", lambda i, o: ["eval", i.onnx, "--device", "gpu0", "--out", o], ["--device", "gpu0"]),
    ("eval-missing-bin", lambda i, o: ["eval", i.onnx, "--pairs", f"{i.root}/lfw.bin", "--out", o], ["lfw.bin"]),
    # export
    ("export-missing-ckpt", lambda i, o: ["export", f"{i.root}/nope.safetensors", "--out", f"{o}/m.onnx"], ["nope"]),
    ("export-corrupt-ckpt", lambda i, o: ["export", i.garbage, "--out", f"{o}/m.onnx"], ["garbage.safetensors"]),
    ("export-corrupt-onnx", lambda i, o: ["export", i.corrupt], ["corrupt.onnx"]),
    ("export-read-only-out", lambda i, o: ["export", i.ckpt, "--out", "READ_ONLY/m.onnx"], ["not writable"]),
    ("export-out-is-folder", lambda i, o: ["export", i.ckpt, "--out", i.a_folder], ["a-folder", "folder"]),
    ("export-out-suffix", lambda i, o: ["export", i.ckpt, "--out", f"{o}/m.txt"], ["m.txt", ".onnx"]),
    ("export-precision", lambda i, o: ["export", i.ckpt, "--precision", "int4", "--out", f"{o}/m.onnx"], ["int4"]),
    (
        "export-calib-images-0",
        lambda i, o: [
            "export",
            i.ckpt,
            "--precision",
            "int8",
            "--calib",
            "builtin",
            "--calib-images",
            "0",
            "--out",
            f"{o}/m.onnx",
        ],
        ["--calib-images"],
    ),  # fmt: skip
    ("export-int8-no-calib", lambda i, o: ["export", i.ckpt, "--precision", "int8", "--out", f"{o}/m.onnx"], ["calib"]),
    (
        "export-calib-missing",
        lambda i, o: [
            "export",
            i.ckpt,
            "--precision",
            "int8",
            "--calib",
            f"{i.root}/no-such-folder",
            "--out",
            f"{o}/m.onnx",
        ],
        ["no-such-folder"],
    ),  # fmt: skip
    ("export-static-batch-0", lambda i, o: ["export", i.ckpt, "--static-batch", "0"], ["--static-batch"]),
    ("export-gate-batches", lambda i, o: ["export", i.ckpt, "--gate-batches", "0,8"], ["--gate-batches"]),
    ("export-min-cosine", lambda i, o: ["export", i.ckpt, "--min-cosine", "2"], ["--min-cosine"]),
    ("export-max-drop", lambda i, o: ["export", i.ckpt, "--max-drop", "-1"], ["--max-drop"]),
    ("export-trt-batch-order", lambda i, o: ["export", i.ckpt, "--trt-batch", "8,1,64"], ["min <= opt <= max"]),
    ("export-trt-batch-count", lambda i, o: ["export", i.ckpt, "--trt-batch", "1,8"], ["--trt-batch"]),
    (
        "export-static-vs-profile",
        lambda i, o: ["export", i.ckpt, "--static-batch", "4", "--trt-batch", "1,8,64"],
        ["--static-batch 4", "--trt-batch"],
    ),
    # benchmark-latency
    ("bench-missing", lambda i, o: ["benchmark-latency", f"{i.root}/nope.onnx"], ["nope.onnx"]),
    (
        "bench-corrupt-onnx",
        lambda i, o: ["benchmark-latency", i.corrupt, "--json", f"{o}/l.json", *FAST_BENCH],
        ["corrupt.onnx"],
    ),
    (
        "bench-empty-onnx",
        lambda i, o: ["benchmark-latency", i.empty, "--json", f"{o}/l.json", *FAST_BENCH],
        ["empty.onnx", "empty"],
    ),
    (
        "bench-batch-0",
        lambda i, o: ["benchmark-latency", i.onnx, "--batch", "1,0", "--json", f"{o}/l.json"],
        ["--batch"],
    ),
    ("bench-iters-negative", lambda i, o: ["benchmark-latency", i.onnx, "--iters", "-5"], ["--iters", "-5"]),
    ("bench-threads-0", lambda i, o: ["benchmark-latency", i.onnx, "--threads", "0"], ["--threads"]),
    ("bench-max-iters", lambda i, o: ["benchmark-latency", i.onnx, "--max-iters", "5"], ["--max-iters 5"]),
    (
        "bench-image-size",
        lambda i, o: ["benchmark-latency", i.onnx, "--image-size", "48", "--json", f"{o}/l.json", *FAST_BENCH],
        ["48", "32x32"],
    ),
    (
        "bench-read-only-json",
        lambda i, o: ["benchmark-latency", i.onnx, "--json", "READ_ONLY/l.json"],
        ["not writable"],
    ),
    ("bench-plot-suffix", lambda i, o: ["benchmark-latency", i.onnx, "--plot", f"{o}/plot.jpg"], ["plot.jpg", ".png"]),
    ("bench-backend", lambda i, o: ["benchmark-latency", i.onnx, "--backend", "openvino"], ["openvino"]),
]


@pytest.mark.parametrize(("argv", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(inputs, tmp_path, run_cli, argv, fragments):
    out = tmp_path / "out"
    args = argv(inputs, str(out))
    if any("READ_ONLY" in a for a in args):
        read_only = _read_only_dir(tmp_path)
        args = [a.replace("READ_ONLY", str(read_only)) for a in args]
    before = sorted(p.name for p in inputs.root.iterdir())

    code, stdout, err = run_cli(args)

    assert code != 0, stdout
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("edgekd: error:") and "Traceback" not in err + stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    assert sorted(p.name for p in inputs.root.iterdir()) == before, "a file appeared beside the inputs"


def test_writable_checks_leave_no_probe_files(tmp_path):
    """The writability probe removes its file, and a folder that does not exist yet is judged by its parent."""
    from edgekd.utils.out_paths import check_output_dir, check_output_file  # the deploy commands' checks

    check_output_file(tmp_path / "new" / "deeper" / "m.onnx", ".onnx")
    check_output_dir(tmp_path / "eval")
    assert list(tmp_path.iterdir()) == []
