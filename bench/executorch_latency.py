"""ExecuTorch (XNNPACK) next to ONNX Runtime and torch: MobileFaceNet at batch 1 on the CPU, FP32 and INT8, with the
file size and the per-row cosine to FP32 PyTorch of every artifact.

Builds (or loads with ``--checkpoint``) a MobileFaceNet and makes every artifact from it, as ``bench.export_latency``
does for ONNX: the gated FP32 ONNX (``edgekd export``), its two INT8 Q/DQ graphs (symmetric S8S8, the TensorRT format
``edgekd export --precision int8`` writes, and U8S8, which ONNX Runtime's x86 kernels prefer), the gated FP32 ``.pte``
(``edgekd export --target executorch``) and the INT8 ``.pte`` (PT2E with the XNNPACK quantizer), both INT8 kinds
calibrated on the same ``builtin`` calibration set. The INT8 ``.pte`` is built without its gates, like the INT8 ONNX
graphs here, because an untrained network's INT8 cosine is a pipeline check, not an accuracy claim (``--checkpoint`` a
trained one to make it one).

Latency is ``bench.export_latency``'s: ``edgekd.export.latency``'s timer, in ``--rounds`` interleaved rounds (every
round times every row once), a row reporting the median of its round medians and their range. Threads are set for
torch, ONNX Runtime (intra-op) and ExecuTorch (its thread pool) alike, one thread count at a time.

    python -m bench.executorch_latency [--checkpoint CKPT] [--threads 1,2] [--rounds 20] [--write-md]
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
from pathlib import Path

import torch

from bench.export_latency import (
    MIN_ROUNDS,
    ORT_FP32,
    benchmark_parser,
    cosines,
    int8_variants,
    measure_rounds,
    ort_runtimes,
    run_settings,
    student_gates,
    student_markdown,
    untrained_mbf,
)
from bench.markdown_section import merge_section
from edgekd.atomic import write_json
from edgekd.bundle import load_bundle
from edgekd.calib import build_calibration_set
from edgekd.export.builders.executorch import QUANTIZER, build_executorch_program, executorch_versions
from edgekd.export.options import ExportOptions
from edgekd.export.passes.onnx import model_metadata
from edgekd.export.pipeline import export_checkpoint
from edgekd.export.runtimes import ExecuTorchRuntime, OrtRuntime, Runtime, TorchRuntime
from edgekd.utils.env import cpu_name, environment
from edgekd.utils.hashing import file_sha256

SECTION = "## ExecuTorch next to ONNX Runtime"
# what the student gates' export did, for the table's caption (its parenthesis stays open: student_markdown)
STUDENT_EXPORT = "`edgekd export --target executorch` defaults (INT8: builtin calibration, XNNPACK quantizer"
EXECUTORCH = "ExecuTorch XNNPACK"
# (backend, precision) of a latency row -> the artifact it runs (its file size and cosine go into the row)
ARTIFACT_OF_ROW = {
    ("torch eager", "fp32"): None,
    ("ORT CPU", ORT_FP32): "fp32",
    ("ORT CPU", "fp32, graph as written"): "fp32",
    ("ORT CPU", "int8 S8S8 (TensorRT Q/DQ)"): "int8-s8s8",
    ("ORT CPU", "int8 U8S8 (x86 Q/DQ)"): "int8-u8s8",
    (EXECUTORCH, "fp32"): "pte-fp32",
    (EXECUTORCH, "int8"): "pte-int8",
}


def executorch_programs(ckpt: Path, out_dir: Path, calib_images: int, log) -> dict[str, Path]:
    """The FP32 ``.pte`` through ``edgekd export --target executorch`` (gated), and the INT8 one lowered from the same
    model, calibrated on the ``builtin`` set ``int8_variants`` calibrates the ONNX graphs on."""
    fp32 = out_dir / f"{ckpt.stem}.fp32.pte"
    export_checkpoint(ckpt, fp32, ExportOptions(target="executorch", gate_images=32), log=log)
    backbone = load_bundle(ckpt).backbone.eval()
    cfg = backbone.cfg
    calib_set = build_calibration_set("builtin", cfg, num_images=calib_images)
    metadata = model_metadata(cfg, precision="int8", source_sha256=file_sha256(ckpt), static_batch=1)
    built = build_executorch_program(
        backbone, tuple(cfg.input_size), "int8", metadata, calib_images=calib_set.images, log=log
    )
    int8 = out_dir / f"{ckpt.stem}.int8.pte"
    int8.write_bytes(built.data)
    log(f"INT8 program built in {built.seconds} s ({QUANTIZER})")
    return {"pte-fp32": fp32, "pte-int8": int8}


def runtimes_at(backbone, paths: dict[str, Path], threads: int) -> dict[tuple[str, str], Runtime]:
    """Every latency row's runtime at ``threads`` threads, in ``ARTIFACT_OF_ROW``'s order."""
    runtimes = {
        ("torch eager", "fp32"): TorchRuntime(backbone),
        **ort_runtimes(paths, threads),
        (EXECUTORCH, "fp32"): ExecuTorchRuntime(paths["pte-fp32"], threads=threads),
        (EXECUTORCH, "int8"): ExecuTorchRuntime(paths["pte-int8"], threads=threads),
    }
    return {key: runtimes[key] for key in ARTIFACT_OF_ROW}


def artifact_cosines(backbone, paths: dict[str, Path], cfg, count: int) -> dict[str, dict[str, float]]:
    """Per-row cosine to FP32 PyTorch of every artifact, each run by its own runtime (ONNX Runtime with edgekd's
    load-time rewrites; ExecuTorch), one thread."""
    runtimes: dict[str, Runtime] = {
        label: ExecuTorchRuntime(path, threads=1) if path.suffix == ".pte" else OrtRuntime(path, threads=1)
        for label, path in paths.items()
    }
    return cosines(backbone, runtimes, cfg, count)


def markdown(rows: list[dict], cos: dict, sizes: dict[str, int], meta: dict) -> list[str]:
    """The BENCHMARKS.md section: one table row per (backend, precision, threads), with its artifact's size and
    cosine."""
    lines = [
        SECTION,
        "",
        "MobileFaceNet (`mbf`, 3x112x112 -> 512) at batch 1 on the CPU, written by "
        f"`python -m bench.executorch_latency {meta['args']} --write-md` ({meta['date']}, {meta['host']}, torch "
        f"{meta['torch']}, onnxruntime {meta['ort']}, executorch {meta['executorch']}). Threads are set for torch, "
        "ONNX Runtime (intra-op) and ExecuTorch (its thread pool) alike. Each row: the median of "
        f"{meta['rounds']} interleaved rounds (each round times every row once, >= {meta['iters']} runs / "
        f"{meta['min_seconds']} s, after warm-up by count and time) and the range of those round medians, ms per "
        f"image. Cosine: per-row cosine to FP32 PyTorch on {next(iter(cos.values()))['n']} held-out synthetic faces. "
        f"Weights: {meta['weights']}.",
        "",
        "| backend | precision | threads | median ms | range of round medians (ms) | vs torch eager | file MB | cosine "
        "mean / min |",
        "|---|---|---:|---:|---|---:|---:|---|",
    ]
    eager = {r["threads"]: r["median_ms"] for r in rows if r["backend"] == "torch eager"}
    for r in sorted(rows, key=lambda r: (r["threads"], list(ARTIFACT_OF_ROW).index((r["backend"], r["precision"])))):
        artifact = ARTIFACT_OF_ROW[(r["backend"], r["precision"])]
        size = f"{sizes[artifact] / 1e6:.2f}" if artifact else ""
        c = f"{cos[artifact]['mean']:.6f} / {cos[artifact]['min']:.6f}" if artifact else "(reference)"
        lines.append(
            f"| {r['backend']} | {r['precision']} | {r['threads']} | {r['median_ms']:.2f} | "
            f"{r['spread_ms'][0]:.2f}-{r['spread_ms'][1]:.2f} | {r['median_ms'] / eager[r['threads']]:.2f}x | {size} | "
            f"{c} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(
        __doc__.split("\n\n")[0],
        rounds_note=f"at least {MIN_ROUNDS} for --write-md",
        gates="executorch fp32 and int8",
        out_name="executorch_latency",
        section=repr(SECTION[3:]),
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or (args.write_md and args.rounds < MIN_ROUNDS):
        parser.error(f"--rounds {args.rounds}: BENCHMARKS.md rows need at least {MIN_ROUNDS} interleaved rounds")
    threads, timing = run_settings(parser, args)
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    with tempfile.TemporaryDirectory(prefix="edgekd-bench-") as tmp:
        ckpt = args.checkpoint or untrained_mbf(Path(tmp) / f"{args.model}.safetensors", args.model)
        backbone = load_bundle(ckpt).backbone.eval()
        cfg = backbone.cfg
        torch.set_num_threads(1)
        onnx_fp32 = export_checkpoint(ckpt, args.out / f"{cfg.name}.fp32.onnx", ExportOptions(gate_images=32), log=log)
        paths = {
            "fp32": onnx_fp32.onnx,
            **int8_variants(onnx_fp32.onnx, cfg, args.out, args.calib_images, args.calib_method),
            **executorch_programs(Path(ckpt), args.out, args.calib_images, log),
        }
        cos = artifact_cosines(backbone, paths, cfg, args.cosine_images)
        log(f"cosine to FP32 PyTorch: {cos}")
        rows = []
        for t in threads:
            torch.set_num_threads(t)
            rows += measure_rounds(runtimes_at(backbone, paths, t), cfg, t, [1], args.rounds, timing, log)
    students = [
        student_gates(s, args.student_data, args.out, log, target="executorch", precisions=("fp32", "int8"))
        for s in args.student
    ]
    sizes = {label: path.stat().st_size for label, path in paths.items()}
    given = " ".join(argv if argv is not None else sys.argv[1:])
    command = f"python -m bench.executorch_latency {given}".rstrip()
    report = {
        "rows": rows,
        "cosine": cos,
        "file_bytes": sizes,
        "student_gates": students,
        "checkpoint": str(args.checkpoint or f"untrained {args.model}"),
        "environment": {**environment(), "executorch": executorch_versions()},
        "command": command,
    }
    write_json(args.out / "executorch_latency.json", report)
    for r in rows:
        log(
            f"{r['backend']:<18} {r['precision']:<26} t{r['threads']} b1: median {r['median_ms']:.3f} ms "
            f"(range {r['spread_ms'][0]:.3f}-{r['spread_ms'][1]:.3f} over {r['rounds']} rounds)"
        )
    log("file sizes (bytes): " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    if args.write_md:
        import onnxruntime as ort

        meta = {
            "args": " ".join(a for a in given.split() if a != "--write-md"),
            "date": datetime.date.today().isoformat(), "host": f"{cpu_name()} ({len(os.sched_getaffinity(0))} CPUs)",
            "torch": torch.__version__, "ort": ort.__version__, "executorch": executorch_versions()["executorch"],
            "rounds": args.rounds, "iters": args.iters, "min_seconds": args.min_seconds,
            "weights": f"trained checkpoint {args.checkpoint.name}" if args.checkpoint else
            f"untrained `{args.model}` (seeded; BatchNorm statistics re-estimated on 128 synthetic faces), so the INT8 "
            "cosines check the pipeline, not accuracy (the trained students' gates do that)",
        }  # fmt: skip
        lines = markdown(rows, cos, sizes, meta)
        if students:
            lines += student_markdown(students, args.student_data, ("fp32", "int8"), STUDENT_EXPORT)
        merge_section(args.benchmarks, SECTION, lines)
        log(f"updated {args.benchmarks}")


if __name__ == "__main__":
    main()
