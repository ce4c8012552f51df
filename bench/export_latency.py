"""Export and CPU latency of MobileFaceNet: torch eager, torch.compile, ONNX Runtime FP32 and INT8, with INT8 cosine.

Builds (or loads with ``--checkpoint``) a MobileFaceNet, exports the gated FP32 ONNX with ``edgekd export``'s pipeline,
makes two INT8 Q/DQ graphs from one calibration (``builtin`` identities, percentile ranges): symmetric S8S8, the
TensorRT format ``edgekd export --precision int8`` writes, and asymmetric U8S8, which ONNX Runtime's x86 kernels
prefer. Each INT8 graph's per-row cosine to FP32 PyTorch is measured on held-out synthetic faces.

Latency uses ``edgekd.export.latency``'s timer (warm-up by count and time, then timed runs), interleaved in ``--rounds``
rounds (at least ``MIN_ROUNDS`` = 20): every round times every backend and batch once, short runs each, so the shared
machine's drift hits every backend alike and one lucky or unlucky round cannot make a row. A row reports the median of
its round medians and their range (the spread), plus percentiles pooled over all rounds' runs (p99 from 100 runs on).
Threads are set explicitly for torch and ONNX Runtime.

Without ``--checkpoint`` the weights are untrained (seeded, BatchNorm statistics re-estimated on synthetic faces so the
activations have a trained network's scale): latency does not depend on the weights' values as long as no denormals
occur, but the INT8 cosine of an untrained network is a pipeline check, not an accuracy claim; ``--student`` adds the
gates of a trained student for that.

    python -m bench.export_latency [--checkpoint CKPT] [--threads 1,2] [--batches 1,8] [--rounds 20] [--write-md]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgekd.atomic import write_json
from edgekd.bundle import Bundle, load_bundle, save_bundle
from edgekd.calib import build_calibration_set, calibrate
from edgekd.export.artifact import gate_inputs
from edgekd.export.checks.gates import cosine_rows, run_batched
from edgekd.export.latency import LatencyConfig, stats_ms, time_cpu
from edgekd.export.options import TARGET_SUFFIXES, ExportOptions
from edgekd.export.passes.int8 import QUANT_OP_TYPES, Int8Options, quantize_qdq
from edgekd.export.passes.onnx import save_onnx
from edgekd.export.pipeline import export_checkpoint
from edgekd.export.runtimes import OrtRuntime, Runtime, TorchRuntime
from edgekd.models import create_model
from edgekd.utils.env import cpu_name, environment

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Export and latency"
ORT_FP32 = "fp32, rewritten at load"  # the row the latency goal is about
MIN_ROUNDS = 20  # fewer rounds make a range of round medians too noisy to compare rows by


def untrained_mbf(path: Path, name: str, seed: int = 0) -> Path:
    """A seeded, untrained ``name`` whose BatchNorm statistics are re-estimated on synthetic faces.

    Default initialization leaves BatchNorm at mean 0 / variance 1, so activations shrink layer after layer into the
    float32 denormal range, where x86 arithmetic is many times slower (ONNX Runtime measured slower than torch that
    way) and embeddings are ~1e-6. Re-estimating the statistics on real inputs gives each layer unit-scale activations,
    as a trained network has, and embeddings that differ from image to image.
    """
    from edgekd.data import create_dataset
    from edgekd.data.transforms import normalize

    torch.manual_seed(seed)
    model = create_model(name)
    c, h, _ = model.cfg.input_size
    faces = create_dataset("synthetic", split="train", identities=64, images_per_identity=2, image_size=h, channels=c)
    x = normalize(faces.tensor(), model.cfg.mean, model.cfg.std)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), 32):
            model(x[i : i + 32])
    return save_bundle(path, Bundle(backbone=model.eval()))


def int8_variants(fp32_path: Path, cfg, out_dir: Path, calib_images: int, method: str) -> dict[str, Path]:
    import onnx

    fp32 = onnx.load(str(fp32_path))
    calib_set = build_calibration_set("builtin", cfg, num_images=calib_images)
    ranges = calibrate(fp32, calib_set, method, op_types=list(QUANT_OP_TYPES))
    paths = {}
    for label, acts in (("int8-s8s8", "int8"), ("int8-u8s8", "uint8")):
        path = out_dir / f"{fp32_path.stem}.{label}.onnx"
        save_onnx(quantize_qdq(fp32, ranges, Int8Options(activations=acts)), path)
        paths[label] = path
    return paths


def cosines(backbone, runtimes: dict[str, Runtime], cfg, count: int) -> dict[str, dict[str, float]]:
    """Per-row cosine of each runtime's embeddings to FP32 PyTorch's on ``count`` held-out synthetic faces."""
    x = gate_inputs(cfg, count, seed=0, real=None, with_noise=False)["synthetic"]
    ref = run_batched(TorchRuntime(backbone), x, 32)
    out = {}
    for label, runtime in runtimes.items():
        cos = cosine_rows(ref, run_batched(runtime, x, 32))
        out[label] = {
            "min": float(cos.min()),
            "p1": float(np.percentile(cos, 1)),
            "mean": float(cos.mean()),
            "n": int(len(cos)),
        }
    return out


def multiply_adds(model: torch.nn.Module, input_size) -> int:
    """Multiply-adds of one forward pass at batch 1 (convolutions and linear layers; element-wise ops not counted)."""
    total = 0

    def count(module, _inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * kh * kw * module.in_channels // module.groups
        elif isinstance(module, torch.nn.Linear):
            total += output.numel() * module.in_features

    hooks = [
        m.register_forward_hook(count) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    with torch.no_grad():
        model(torch.zeros(1, *input_size))
    for h in hooks:
        h.remove()
    return total


def sgemm_rate(threads: int, n: int = 1024, repeats: int = 20) -> float:
    """This CPU's FP32 multiply-add rate in GMAC/s at ``threads`` threads: the best of ``repeats`` n x n torch matmuls,
    a practical ceiling for any FP32 convolution kernel (they all reduce to GEMM-like inner loops)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return n**3 / best / 1e9


def ort_runtimes(paths: dict[str, Path], threads: int) -> dict[tuple[str, str], Runtime]:
    """The ONNX Runtime CPU rows, (backend, precision) -> runtime: FP32 as edgekd runs it (rewritten at load) and as
    written, and both INT8 Q/DQ graphs of ``int8_variants``."""
    return {
        ("ORT CPU", ORT_FP32): OrtRuntime(paths["fp32"], threads=threads),
        ("ORT CPU", "fp32, graph as written"): OrtRuntime(paths["fp32"], threads=threads, cpu_rewrites=False),
        ("ORT CPU", "int8 S8S8 (TensorRT Q/DQ)"): OrtRuntime(paths["int8-s8s8"], threads=threads),
        ("ORT CPU", "int8 U8S8 (x86 Q/DQ)"): OrtRuntime(paths["int8-u8s8"], threads=threads),
    }


def measure(backbone, paths, cfg, threads: int, batches, rounds: int, timing: LatencyConfig, log) -> list[dict]:
    torch.set_num_threads(threads)
    runtimes = {
        ("torch eager", "fp32"): TorchRuntime(backbone),
        ("torch.compile", "fp32"): TorchRuntime(backbone, compile=True),
        **ort_runtimes(paths, threads),
    }
    return measure_rounds(runtimes, cfg, threads, batches, rounds, timing, log)


def measure_rounds(
    runtimes: dict[tuple[str, str], Runtime], cfg, threads: int, batches, rounds: int, timing: LatencyConfig, log
) -> list[dict]:
    """Time every (backend, precision) runtime at every batch once per round, ``rounds`` times, the rows interleaved
    (see the module docstring); one ``round_summary`` per row. The caller has set torch's threads to ``threads``."""
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, *cfg.input_size, generator=gen) for b in batches}
    medians: dict[tuple, list[float]] = {}
    samples: dict[tuple, list[np.ndarray]] = {}
    # the full warm-up once per row; later rounds only re-touch caches the other rows evicted
    rewarm = dataclasses.replace(timing, warmup_iters=2, warmup_seconds=0.0)
    for r in range(rounds):
        for (backend, precision), runtime in runtimes.items():
            for batch in batches:
                runs, _ = time_cpu(runtime.prepare(inputs[batch]), timing if r == 0 else rewarm)
                key = (backend, precision, batch)
                medians.setdefault(key, []).append(float(np.median(runs)) / 1e6)
                samples.setdefault(key, []).append(runs)
                log(
                    f"threads {threads} round {r + 1}/{rounds}: {backend} {precision} b{batch}: "
                    f"{medians[key][-1]:.3f} ms"
                )
    return [round_summary(*key, threads, medians[key], samples[key]) for key in medians]


def round_summary(backend, precision, batch, threads, medians: list[float], runs: list[np.ndarray]) -> dict:
    """One latency row: the median and range of the round medians, and statistics pooled over every round's runs."""
    return {
        "backend": backend,
        "precision": precision,
        "batch": batch,
        "threads": threads,
        "rounds": len(medians),
        "median_ms": statistics.median(medians),
        "spread_ms": [min(medians), max(medians)],
        "round_medians_ms": medians,
        "pooled": stats_ms(np.concatenate(runs)),
        "runs": int(sum(len(r) for r in runs)),
    }


# what the ONNX student gates' export did, for the table's caption (its parenthesis stays open)
ONNX_STUDENT_EXPORT = (
    "`edgekd export` defaults (INT8: builtin calibration, percentile ranges, first and last layer in float"
)


def student_gates(
    ckpt: Path, data: str, out: Path, log, target: str = "onnx", precisions: tuple[str, ...] = ("fp16", "int8")
) -> dict:
    """The ``precisions``' gates of ``edgekd export --target TARGET`` on a trained student, gate images and pairs at
    its difficulty."""
    from edgekd.data import parse_synthetic_spec

    difficulty = parse_synthetic_spec(data).get("difficulty")
    spec = f"synthetic:difficulty={difficulty}" if difficulty is not None else "synthetic"
    cfg = load_bundle(ckpt).cfg
    gates = {"checkpoint": str(ckpt), "model": cfg.name, "input_size": list(cfg.input_size), "pairs": spec}
    for precision in precisions:
        options = ExportOptions(
            target=target,
            precision=precision,
            calib="builtin" if precision == "int8" else None,
            pairs=spec,
            gate_data=spec,
        )
        path = out / f"{cfg.name}-student.{precision}{TARGET_SUFFIXES[target]}"
        result = export_checkpoint(ckpt, path, options, log=log)
        gates[precision] = result.gate.to_dict()
    return gates


def student_markdown(
    students: list[dict], data: str, precisions: tuple[str, ...] = ("fp16", "int8"), how: str = ONNX_STUDENT_EXPORT
) -> list[str]:
    """The table of ``student_gates`` results, ``how`` saying what the export did (an open parenthesis)."""
    lines = [
        "",
        f"Gates of trained students (trained on `{data}` by the `edgekd teacher` command below, 400 steps), from the "
        f"same run; {how}; task gate on `{students[0]['pairs']}` held-out pairs, 3000 pairs):",
        "",
        "| student | precision | gate | min cos | mean cos | accuracy ref -> cand | TAR@FAR ref -> cand | result |",
        "|---|---|---|---:|---:|---|---|---|",
    ]
    for st in students:
        name = f"{st['model']} {st['input_size'][1]}x{st['input_size'][2]}"
        for precision in precisions:
            g = st[precision]
            rows = g["rows"]
            task = g.get("task") or {}
            tars = [k for k in task.get("reference", {}) if k.startswith("tar")]
            acc = f"{task['reference']['accuracy']:.2f} -> {task['candidate']['accuracy']:.2f}" if task else ""
            tar = "; ".join(f"{k[4:]}: {task['reference'][k]:.2f} -> {task['candidate'][k]:.2f}" for k in tars)
            lines.append(
                f"| {name} | {precision} | {g['statistic']} cos >= {g['threshold']} | "
                f"{min(r['min_cos'] for r in rows):.5f} | {min(r['mean_cos'] for r in rows):.5f} | {acc} | "
                f"{tar} | {'pass' if g['passed'] else 'FAIL'} |"
            )
    models = " / ".join(f"`{st['model']}`" for st in students)
    lines += [
        "",
        f"The students: `edgekd teacher --model MODEL --head arcface --scale 16 --margin 0.2 --data {data} "
        "--image-size 32 --batch-size 64 --steps 400 --lr 0.2 --no-compile --workers 0 --device cpu --seed 0 --out "
        f"runs/student-MODEL` with MODEL = {models} (the export tests train the same `mbf_tiny` student).",
    ]
    return lines


def write_markdown(path: Path, rows, cos, meta: dict) -> None:
    eager_b1 = {r["threads"]: r["median_ms"] for r in rows if r["backend"] == "torch eager" and r["batch"] == 1}
    lines = [
        SECTION,
        "",
        "CPU latency of MobileFaceNet (`mbf`, 3x112x112 -> 512) written by `python -m bench.export_latency "
        f"{meta['args']} --write-md` ({meta['date']}, {meta['host']}, torch {meta['torch']}, onnxruntime "
        f"{meta['ort']}). Threads are set for torch (`torch.set_num_threads`) and ONNX Runtime (intra-op) alike. "
        f"Each row: the median of {meta['rounds']} interleaved rounds (each round times every row once, >= "
        f"{meta['iters']} runs / {meta['min_seconds']} s, after warm-up by count and time) and the range of those "
        "round medians; ms per batch unless marked per image. The machine is shared, so compare rows of one run. "
        "Weights: " + meta["weights"] + ".",
        "",
        f"| backend | precision | threads | batch | median ms | ms / image | range of {meta['rounds']} round medians "
        "(ms) | vs torch eager b1 |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["threads"], r["batch"], r["backend"], r["precision"])):
        ratio = r["median_ms"] / eager_b1[r["threads"]] if r["batch"] == 1 else None
        lines.append(
            f"| {r['backend']} | {r['precision']} | {r['threads']} | {r['batch']} | {r['median_ms']:.2f} | "
            f"{r['median_ms'] / r['batch']:.2f} | {r['spread_ms'][0]:.2f}-{r['spread_ms'][1]:.2f} "
            f"| {'' if ratio is None else f'{ratio:.2f}x'} |"
        )
    lines += ["", "Goal: ORT FP32 batch-1 <= 0.45x torch eager batch-1."]
    for t, eager in sorted(eager_b1.items()):
        ort = next(r["median_ms"] for r in rows if r["threads"] == t and r["batch"] == 1 and r["precision"] == ORT_FP32)
        floor = meta["macs"] / (meta["sgemm_gmacs"][t] * 1e9) * 1e3
        lines.append(
            f"- {t} thread(s): {ort:.2f} / {eager:.2f} ms = {ort / eager:.2f}x "
            f"({'met' if ort / eager <= 0.45 else 'missed'}). Compute floor: {meta['macs'] / 1e6:.1f} M multiply-adds "
            f"at this CPU's best FP32 SGEMM rate ({meta['sgemm_gmacs'][t]:.1f} GMAC/s, 1024x1024 torch matmul, best "
            f"of 20) = {floor:.2f} ms = {floor / eager:.2f}x eager; ORT FP32 runs at {floor / ort:.0%} of it."
        )
    lines += [
        "",
        f"INT8 per-row cosine to FP32 PyTorch ({next(iter(cos.values()))['n']} held-out synthetic faces, "
        f"this run's weights): "
        + "; ".join(f"{k}: mean {v['mean']:.5f}, min {v['min']:.5f}" for k, v in cos.items())
        + ".",
    ]
    lines += meta.get("extra_md", [])
    lines += [
        "",
        "GPU rows (ORT CUDA, TensorRT FP32/FP16/INT8, CUDA-graph torch): not measured (no GPU lent). Run "
        "`edgekd export CKPT --trt --precision {fp32,fp16,int8}` and `edgekd benchmark-latency CKPT X.onnx "
        "X.plan --device cuda` on one.",
        "",
    ]
    text = (
        path.read_text()
        if path.is_file()
        else "# Benchmarks\n\nMeasured numbers; each section names the script that writes it.\n"
    )
    block = "\n".join(lines)
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _m: block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    from edgekd.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)


def benchmark_parser(description: str, *, rounds_note: str, gates: str, out_name: str, section: str):
    """The options the latency benchmarks share (this module's and ``bench.executorch_latency``'s): the model, thread
    counts, interleaved rounds and their timing, calibration and cosine images, the trained students whose export
    gates join the section, and where results and BENCHMARKS.md go."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a trained checkpoint (default: untrained mbf)")
    parser.add_argument("--model", default="mbf", help="architecture for the untrained default")
    parser.add_argument("--threads", default="1,2", help="thread counts to run, comma-separated")
    parser.add_argument(
        "--rounds", type=int, default=MIN_ROUNDS, help=f"interleaved rounds ({rounds_note}); rows report their spread"
    )
    parser.add_argument("--iters", type=int, default=10, help="timed runs per row and round (at least)")
    parser.add_argument("--min-seconds", type=float, default=0.3, help="timed seconds per row and round (at least)")
    parser.add_argument("--calib-images", type=int, default=128)
    parser.add_argument("--calib-method", default="percentile", help="the ONNX INT8 graphs' range estimator")
    parser.add_argument("--cosine-images", type=int, default=256)
    parser.add_argument(
        "--student",
        type=Path,
        action="append",
        default=[],
        help=f"a trained student checkpoint (repeatable): also run the {gates} export gates on it",
    )
    parser.add_argument(
        "--student-data",
        default="synthetic",
        help="synthetic spec of the student's data (its difficulty sets the gate images and pairs)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / out_name)
    parser.add_argument("--write-md", action="store_true", help=f"rewrite the {section} section")
    parser.add_argument("--benchmarks", type=Path, default=ROOT / "BENCHMARKS.md")
    return parser


def run_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[int], LatencyConfig]:
    """What both latency benchmarks run with, from ``benchmark_parser``'s options: the thread counts and each row's
    timing (``--iters``, ``--min-seconds`` checked); makes the ``--out`` folder."""
    if args.iters < 1 or args.min_seconds < 0:
        parser.error("--iters must be at least 1 and --min-seconds at least 0")
    args.out.mkdir(parents=True, exist_ok=True)
    threads = [int(t) for t in args.threads.split(",")]
    return threads, LatencyConfig(warmup_iters=10, warmup_seconds=0.5, iters=args.iters, min_seconds=args.min_seconds)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(
        __doc__.split("\n\n")[0],
        rounds_note=f"at least {MIN_ROUNDS}",
        gates="fp16 and int8",
        out_name="export_latency",
        section="Export and latency",
    )
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args(argv)
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds {args.rounds}: a row's spread needs at least {MIN_ROUNDS} interleaved rounds")
    threads, timing = run_settings(parser, args)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    batches = [int(b) for b in args.batches.split(",")]

    with tempfile.TemporaryDirectory(prefix="edgekd-bench-") as tmp:
        ckpt = args.checkpoint or untrained_mbf(Path(tmp) / f"{args.model}.safetensors", args.model)
        backbone = load_bundle(ckpt).backbone.eval()
        cfg = backbone.cfg
        fp32_path = args.out / f"{cfg.name}.fp32.onnx"
        torch.set_num_threads(1)
        result = export_checkpoint(ckpt, fp32_path, ExportOptions(gate_images=32), log=log)
        paths = {"fp32": result.onnx, **int8_variants(result.onnx, cfg, args.out, args.calib_images, args.calib_method)}
        int8 = {k: OrtRuntime(v, threads=1) for k, v in paths.items() if k != "fp32"}
        cos = cosines(backbone, int8, cfg, args.cosine_images)
        log(f"INT8 cosine: {cos}")
        rows = []
        macs = multiply_adds(backbone, cfg.input_size)
        sgemm = {t: sgemm_rate(t) for t in threads}
        log(f"{macs / 1e6:.1f} M multiply-adds; SGEMM GMAC/s by threads: {sgemm}")
        for t in threads:
            rows += measure(backbone, paths, cfg, t, batches, args.rounds, timing, log)
    students = [student_gates(ckpt, args.student_data, args.out, log) for ckpt in args.student]
    sizes = {k: v.stat().st_size for k, v in paths.items()}
    report = {
        "rows": rows,
        "int8_cosine": cos,
        "multiply_adds": macs,
        "sgemm_gmacs_by_threads": sgemm,
        "file_bytes": sizes,
        "fp32_gate": result.gate.to_dict(),
        "student_gates": students,
        "checkpoint": str(args.checkpoint or f"untrained {args.model}"),
        "environment": environment(),
        "command": "python -m bench.export_latency " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_json(args.out / "export_latency.json", report)
    for r in rows:
        log(
            f"{r['backend']:<14} {r['precision']:<28} t{r['threads']} b{r['batch']}: median {r['median_ms']:.3f} ms "
            f"(range {r['spread_ms'][0]:.3f}-{r['spread_ms'][1]:.3f} over {r['rounds']} rounds, per batch)"
        )
    if args.write_md:
        import onnxruntime as ort

        meta = {
            "args": " ".join(argv if argv is not None else sys.argv[1:]).replace(" --write-md", ""),
            "date": datetime.date.today().isoformat(), "host": f"{cpu_name()} ({len(os.sched_getaffinity(0))} CPUs)",
            "torch": torch.__version__, "ort": ort.__version__, "rounds": args.rounds,
            "iters": args.iters, "min_seconds": args.min_seconds, "macs": macs, "sgemm_gmacs": sgemm,
            "weights": f"trained checkpoint {args.checkpoint.name}" if args.checkpoint else
            f"untrained `{args.model}` (seeded; BatchNorm statistics re-estimated on 128 synthetic faces)",
            "extra_md": ["", "File sizes: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()) + "."]
            + (student_markdown(students, args.student_data) if students else []),
        }  # fmt: skip
        write_markdown(args.benchmarks, rows, cos, meta)
        log(f"updated {args.benchmarks}")
    print(json.dumps({"int8_cosine": cos}, indent=1))


if __name__ == "__main__":
    main()
