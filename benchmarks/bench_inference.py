"""CPU inference throughput: PyTorch eager vs fp32 ONNX Runtime vs static int8 ONNX, against the FLOP bound.

Measures, in one run: the fp32 matmul rate of this machine (2048² GEMM on all threads, the better of torch and
ONNX Runtime), the model's FLOPs per image (torch.utils.flop_counter), and images/s for batch sizes 1 and 16
with timm eager, the fp32 ONNX graph and the int8 QDQ graph (graph optimisation ALL, one intra-op thread per
core). With ``--bundle`` the graphs are the bundle's (and its int8 report, per-finding AUROC drops, is
included); else a random-weight ``--arch`` is exported and quantised here (calibrated on noise: speed only).
Prints JSON; targets: ONNX at >= 60 % of the FLOP bound and >= 2x eager; int8 >= 2x fp32 ONNX at batch 16.
On a shared machine every rate is the best of ``--rounds`` interleaved windows (GEMM, eager and the graphs
take turns), so that all see the same background load; the 1-minute load average is reported.

    python benchmarks/bench_inference.py [--arch densenet121 --size 224 --seconds 4 --rounds 3 --out r.json]
    python benchmarks/bench_inference.py --bundle model.cxr --seconds 3 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from omegaconf import OmegaConf
from onnx import TensorProto, helper, numpy_helper
from torch.utils.flop_counter import FlopCounterMode

from cxrkit.inference.onnx_export import create_session, export_onnx, run_session
from cxrkit.inference.quantize import has_vnni, quantize_static_onnx
from cxrkit.models.config import ModelConfig
from cxrkit.models.factory import create_model

TARGET_FRACTION_OF_BOUND = 0.60
TARGET_SPEEDUP = 2.0
TARGET_INT8_SPEEDUP = 2.0


@dataclass(frozen=True)
class Rate:
    """Work per wall-clock second, and per CPU-second of this process (all its threads): on a machine shared
    with other jobs the second is immune to time-slicing, the first is what a user sees."""

    wall: float
    cpu: float


def measure(run: Callable[[], object], work_per_call: float, seconds: float) -> Rate:
    run()
    count, wall, cpu = 0, time.perf_counter(), time.process_time()
    while (elapsed := time.perf_counter() - wall) < seconds or count < 3:
        run()
        count += 1
    return Rate(work_per_call * count / elapsed, work_per_call * count / (time.process_time() - cpu))


def torch_gemm(n: int = 2048) -> tuple[Callable[[], object], float]:
    """A 2n^3-FLOP fp32 GEMM with torch's threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return lambda: torch.mm(a, b), 2.0 * n**3


def onnx_gemm(n: int = 2048) -> tuple[Callable[[], object], float]:
    """The same GEMM through ONNX Runtime's kernels and thread pool (the session options the model uses)."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
    b = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32), "b")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm", [a], [c], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = create_session(model.SerializeToString())
    feed = {"a": np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)}
    return lambda: session.run(None, feed), 2.0 * n**3


def flops_per_image(model: torch.nn.Module, size: int) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.rand(1, 1, size, size))
    return int(counter.get_total_flops())


def load_engines(args: argparse.Namespace) -> tuple[torch.nn.Module, int, dict[str, bytes], dict]:
    """The network, its input size, its fp32 and int8 ONNX graphs and the int8 report: from ``--bundle``
    (the graphs it serves), else a random-weight ``--arch`` quantised here (static QDQ, calibrated on noise:
    speed only)."""
    if args.bundle is not None:
        from cxrkit.inference.bundle import Bundle

        bundle = Bundle.load(args.bundle)
        if bundle.onnx is None:
            raise SystemExit(f"{args.bundle} has no ONNX graph: export it with --format onnx --quantize")
        graphs = {"onnx": bundle.onnx}
        if bundle.onnx_int8 is not None:
            graphs["onnx-int8"] = bundle.onnx_int8
        else:  # rejected by the gate (or never quantised): the speed of such a graph all the same
            graphs["onnx-int8"] = quantize_on_noise(bundle.onnx, bundle.preprocess.crop_size)[0]
        report = {
            **(bundle.quantization or {}),
            "graph": "bundle" if bundle.onnx_int8 else "noise-calibrated",
        }
        return bundle.build_model(), bundle.preprocess.crop_size, graphs, report
    config = OmegaConf.structured(ModelConfig(arch=args.arch))
    config.pretrained.source = "none"
    model = create_model(config, args.classes).eval()
    with tempfile.TemporaryDirectory() as folder:
        fp32 = export_onnx(model, Path(folder) / "model.onnx", args.size).read_bytes()
    int8, settings = quantize_on_noise(fp32, args.size)
    return (
        model,
        args.size,
        {"onnx": fp32, "onnx-int8": int8},
        {"settings": settings, "graph": "noise-calibrated"},
    )


def quantize_on_noise(fp32: bytes, size: int) -> tuple[bytes, dict]:
    """Static int8 of ``fp32`` calibrated on 32 noise images: the graph's speed, not its accuracy."""
    images = np.random.default_rng(0).integers(0, 256, (32, size, size), dtype=np.uint8)
    return quantize_static_onnx(fp32, images, lambda batch: (batch[:, None] / 255.0).astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bundle", type=Path, default=None, help="an exported bundle (its graphs and report)"
    )
    parser.add_argument("--arch", default="densenet121")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=4.0, help="timing window per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved windows; the best is kept")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    model, size, graphs, quantization = load_engines(args)
    flops = flops_per_image(model, size)
    sessions = {name: create_session(graph, threads=cores) for name, graph in graphs.items()}

    def eager(batch: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(batch))

    engines: dict[str, Callable[[np.ndarray], object]] = {"eager": eager}
    engines.update({name: lambda b, s=session: run_session(s, b) for name, session in sessions.items()})
    gemms = {"torch": torch_gemm(), "onnxruntime": onnx_gemm()}
    peaks: dict[str, list[Rate]] = {name: [] for name in gemms}
    rates: dict[int, dict[str, list[Rate]]] = {}
    for batch_size in args.batch_sizes:
        batch = np.random.default_rng(0).random((batch_size, 1, size, size), dtype=np.float32)
        rates[batch_size] = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, (gemm, gemm_flops) in gemms.items():
                peaks[name].append(measure(gemm, gemm_flops, args.seconds / 2))
            for name, engine in engines.items():
                rates[batch_size][name].append(
                    measure(lambda b=batch, e=engine: e(b), batch_size, args.seconds)
                )
    every_peak = [rate for samples in peaks.values() for rate in samples]
    peak = Rate(max(r.wall for r in every_peak), max(r.cpu for r in every_peak))
    results = []
    for batch_size, runs in rates.items():
        best = {name: Rate(max(r.wall for r in rs), max(r.cpu for r in rs)) for name, rs in runs.items()}
        eager_rate, onnx_rate = best["eager"], best["onnx"]
        fraction = onnx_rate.wall * flops / peak.wall
        row = {
            "batch_size": batch_size,
            "eager_images_per_s": round(eager_rate.wall, 2),
            "onnx_images_per_s": round(onnx_rate.wall, 2),
            "onnx_speedup_vs_eager": round(onnx_rate.wall / eager_rate.wall, 3),
            "flop_bound_images_per_s": round(peak.wall / flops, 2),
            "eager_fraction_of_bound": round(eager_rate.wall * flops / peak.wall, 3),
            "onnx_fraction_of_bound": round(fraction, 3),
            "per_cpu_second": {
                "eager_images": round(eager_rate.cpu, 2),
                "onnx_images": round(onnx_rate.cpu, 2),
                "onnx_speedup_vs_eager": round(onnx_rate.cpu / eager_rate.cpu, 3),
                "onnx_fraction_of_bound": round(onnx_rate.cpu * flops / peak.cpu, 3),
            },
            "meets_fraction_target": fraction >= TARGET_FRACTION_OF_BOUND,
            "meets_speedup_target": onnx_rate.wall / eager_rate.wall >= TARGET_SPEEDUP,
        }
        if "onnx-int8" in best:
            int8_rate = best["onnx-int8"]
            row["int8_images_per_s"] = round(int8_rate.wall, 2)
            row["int8_speedup_vs_onnx"] = round(int8_rate.wall / onnx_rate.wall, 3)
            row["int8_speedup_vs_eager"] = round(int8_rate.wall / eager_rate.wall, 3)
            row["per_cpu_second"]["int8_images"] = round(int8_rate.cpu, 2)
            row["per_cpu_second"]["int8_speedup_vs_onnx"] = round(int8_rate.cpu / onnx_rate.cpu, 3)
            row["meets_int8_target"] = int8_rate.wall / onnx_rate.wall >= TARGET_INT8_SPEEDUP
        results.append(row)
    report = {
        "benchmark": "inference",
        "model": str(args.bundle) if args.bundle else args.arch,
        "input": [1, size, size],
        "gflops_per_image": round(flops / 1e9, 3),
        "graph_bytes": {name: len(graph) for name, graph in graphs.items()},
        "int8": _int8_summary(quantization),
        "matmul_gflops_per_s": round(peak.wall / 1e9, 1),
        "matmul_gflops_per_cpu_second": round(peak.cpu / 1e9, 1),
        "matmul_gflops_per_s_samples": {
            name: [round(rate.wall / 1e9, 1) for rate in samples] for name, samples in peaks.items()
        },
        "targets": {
            "onnx_fraction_of_bound": TARGET_FRACTION_OF_BOUND,
            "onnx_speedup_vs_eager": TARGET_SPEEDUP,
            "int8_speedup_vs_onnx_at_batch_16": TARGET_INT8_SPEEDUP,
        },
        "results": results,
        "machine": {
            "cpu_cores": cores,
            "processor": platform.processor() or platform.machine(),
            "vnni": has_vnni(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "torch_threads": torch.get_num_threads(),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


def _int8_summary(quantization: dict) -> dict:
    """The gate's verdict from a bundle's quantisation report (per-finding AUROC drops), or how the int8
    graph was made."""
    if "accepted" not in quantization:
        return quantization
    keys = (
        "accepted",
        "preferred",
        "max_drop",
        "worst_drop",
        "drops",
        "auroc_fp32",
        "auroc_int8",
        "settings",
    )
    return {key: quantization.get(key) for key in (*keys, "n_images", "n_calibration", "graph")}


if __name__ == "__main__":
    main()
