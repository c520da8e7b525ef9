"""CPU inference throughput: PyTorch eager vs ONNX Runtime, against the machine's own FLOP bound.

Measures, in one run: the fp32 matmul rate of this machine (torch, all threads), the model's FLOPs per image
(torch.utils.flop_counter), and images/s for batch sizes 1 and 16 with timm eager and ONNX Runtime (graph
optimisation ALL, one intra-op thread per core). Prints JSON; targets: ONNX at >= 60 % of the FLOP bound and
>= 2x eager. On a shared machine every rate is the best of ``--rounds`` interleaved windows (GEMM, eager and
ONNX take turns), so that all three see the same background load; the 1-minute load average is reported.

    python benchmarks/bench_inference.py [--arch densenet121 --size 224 --seconds 10 --out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from cxrkit.inference.onnx_export import create_session, export_onnx, run_session
from cxrkit.models.config import ModelConfig
from cxrkit.models.factory import create_model

TARGET_FRACTION_OF_BOUND = 0.60
TARGET_SPEEDUP = 2.0


def matmul_flops_per_second(n: int = 2048, seconds: float = 3.0) -> float:
    """Sustained fp32 GEMM rate (2 n^3 FLOPs per product) with torch's default thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * n**3 * count / elapsed


def flops_per_image(model: torch.nn.Module, size: int) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.rand(1, 1, size, size))
    return int(counter.get_total_flops())


def images_per_second(run: Callable[[np.ndarray], object], batch: np.ndarray, seconds: float) -> float:
    run(batch)
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count < 3:
        run(batch)
        count += 1
    return count * len(batch) / elapsed


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

    rates, peaks = {}, []
    for batch_size in args.batch_sizes:
        batch = np.random.default_rng(0).random((batch_size, 1, args.size, args.size), dtype=np.float32)
        eager_rates, onnx_rates = [], []
        for _ in range(args.rounds):
            peaks.append(matmul_flops_per_second(seconds=args.seconds / 2))
            eager_rates.append(images_per_second(eager, batch, args.seconds))
            onnx_rates.append(images_per_second(lambda b: run_session(session, b), batch, args.seconds))
        rates[batch_size] = (max(eager_rates), max(onnx_rates))
    bound = max(peaks) / flops
    results = [
        {
            "batch_size": batch_size,
            "eager_images_per_s": round(eager_rate, 2),
            "onnx_images_per_s": round(onnx_rate, 2),
            "onnx_speedup_vs_eager": round(onnx_rate / eager_rate, 3),
            "flop_bound_images_per_s": round(bound, 2),
            "eager_fraction_of_bound": round(eager_rate / bound, 3),
            "onnx_fraction_of_bound": round(onnx_rate / bound, 3),
            "meets_fraction_target": onnx_rate / bound >= TARGET_FRACTION_OF_BOUND,
            "meets_speedup_target": onnx_rate / eager_rate >= TARGET_SPEEDUP,
        }
        for batch_size, (eager_rate, onnx_rate) in rates.items()
    ]
    report = {
        "benchmark": "inference",
        "model": args.arch,
        "input": [1, args.size, args.size],
        "gflops_per_image": round(flops / 1e9, 3),
        "matmul_gflops_per_s": round(max(peaks) / 1e9, 1),
        "matmul_gflops_per_s_samples": [round(p / 1e9, 1) for p in peaks],
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
