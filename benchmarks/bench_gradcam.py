"""Grad-CAM throughput on CPU: DenseNet-121 (1 channel, random init, 14 outputs), 224², batch 8. Prints JSON.

Each timed call is one :func:`cxrkit.explain.cam.explain` of a batch for one target per image (the top
finding): a no-grad forward to pick the target, then pytorch-grad-cam's forward + backward and map
computation. ``images_per_s`` is wall clock; ``images_per_cpu_s`` divides by the process CPU time, so it
holds on a busy machine too (divide by ``threads`` for a per-core rate).

    python benchmarks/bench_gradcam.py [--arch densenet121] [--method gradcam] [--size 224] [--batch 8]
                                       [--repeats 5] [--threads 0] [--k 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from omegaconf import OmegaConf

from cxrkit.data.labels import NIH_FINDINGS
from cxrkit.explain.cam import explain
from cxrkit.models.config import ModelConfig
from cxrkit.models.factory import create_model


def build_model(arch: str) -> torch.nn.Module:
    config = OmegaConf.structured(ModelConfig)
    config.arch = arch
    config.pretrained.source = "none"
    return create_model(config, len(NIH_FINDINGS))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="densenet121")
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=1, help="targets explained per image (top-k)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.arch)
    images = torch.rand(args.batch, 1, args.size, args.size)

    result = explain(model, images, "topk", method=args.method, k=args.k)  # warm-up
    wall, cpu = [], []
    for _ in range(args.repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        result = explain(model, images, "topk", method=args.method, k=args.k)
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    maps = args.batch * args.k
    best_wall, best_cpu = min(wall), min(cpu)
    print(
        json.dumps(
            {
                "benchmark": "gradcam_cpu",
                "arch": args.arch,
                "method": result.method,
                "target_layer": result.target_layer,
                "input": [args.batch, 1, args.size, args.size],
                "targets_per_image": args.k,
                "repeats": args.repeats,
                "threads": torch.get_num_threads(),
                "seconds_per_batch_best": round(best_wall, 4),
                "seconds_per_batch_median": round(sorted(wall)[len(wall) // 2], 4),
                "images_per_s": round(args.batch / best_wall, 2),
                "heatmaps_per_s": round(maps / best_wall, 2),
                "images_per_cpu_s": round(args.batch / best_cpu, 2),
                "torch": torch.__version__,
                "cpu": platform.processor() or platform.machine(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
