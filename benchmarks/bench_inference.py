"""CPU inference throughput: PyTorch eager vs ONNX Runtime, against the machine's own FLOP bound.

Measures, in one run: the fp32 matmul rate of this machine (2048² GEMM on all threads, the better of torch and
ONNX Runtime), the model's FLOPs per image (torch.utils.flop_counter), and images/s for batch sizes 1 and 16
with timm eager and ONNX Runtime (graph optimisation ALL, one intra-op thread per core). Prints JSON;
targets: ONNX at >= 60 % of the FLOP bound and >= 2x eager. On a shared machine every rate is the best of
``--rounds`` interleaved windows (GEMM, eager and ONNX take turns), so that all see the same background
load; the 1-minute load average is reported.

    python benchmarks/bench_inference.py [--arch densenet121 --size 224 --seconds 4 --rounds 3 --out r.json]
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
from cxrkit.models.config import ModelConfig
from cxrkit.models.factory import create_model

TARGET_FRACTION_OF_BOUND = 0.60
TARGET_SPEEDUP = 2.0


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    config = OmegaConf.structured(ModelConfig(arch=args.arch))
    config.pretrained.source = "none"
    model = create_model(config, args.classes).eval()
    flops = flops_per_image(model, args.size)
    with tempfile.TemporaryDirectory() as folder:
        session = create_session(export_onnx(model, Path(folder) / "model.onnx", args.size), threads=cores)

    def eager(batch: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(batch))

    gemms = {"torch": torch_gemm(), "onnxruntime": onnx_gemm()}
    peaks: dict[str, list[Rate]] = {name: [] for name in gemms}
    rates: dict[int, dict[str, list[Rate]]] = {}
    for batch_size in args.batch_sizes:
        batch = np.random.default_rng(0).random((batch_size, 1, args.size, args.size), dtype=np.float32)
        rates[batch_size] = {"eager": [], "onnx": []}
        for _ in range(args.rounds):
            for name, (gemm, gemm_flops) in gemms.items():
                peaks[name].append(measure(gemm, gemm_flops, args.seconds / 2))
            rates[batch_size]["eager"].append(measure(lambda b=batch: eager(b), batch_size, args.seconds))
            rates[batch_size]["onnx"].append(
                measure(lambda b=batch: run_session(session, b), batch_size, args.seconds)
            )
    every_peak = [rate for samples in peaks.values() for rate in samples]
    peak = Rate(max(r.wall for r in every_peak), max(r.cpu for r in every_peak))
    results = []
    for batch_size, runs in rates.items():
        eager_rate = Rate(max(r.wall for r in runs["eager"]), max(r.cpu for r in runs["eager"]))
        onnx_rate = Rate(max(r.wall for r in runs["onnx"]), max(r.cpu for r in runs["onnx"]))
        fraction = onnx_rate.wall * flops / peak.wall
        results.append(
            {
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
        )
    report = {
        "benchmark": "inference",
        "model": args.arch,
        "input": [1, args.size, args.size],
        "gflops_per_image": round(flops / 1e9, 3),
        "matmul_gflops_per_s": round(peak.wall / 1e9, 1),
        "matmul_gflops_per_cpu_second": round(peak.cpu / 1e9, 1),
        "matmul_gflops_per_s_samples": {
            name: [round(rate.wall / 1e9, 1) for rate in samples] for name, samples in peaks.items()
        },
        "targets": {
            "onnx_fraction_of_bound": TARGET_FRACTION_OF_BOUND,
            "onnx_speedup_vs_eager": TARGET_SPEEDUP,
        },
        "results": results,
        "machine": {
            "cpu_cores": cores,
            "processor": platform.processor() or platform.machine(),
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


if __name__ == "__main__":
    main()
