"""Training benchmarks on the CPU, printed as JSON.

1. Data stall: training images/s of the offline pneumonia recipe (EfficientNet-Lite0, batch 32, its crop) fed
   by the real cache loader with augmentation vs the same model fed the same batches from memory
   (target: loader path >= 95% of in-memory).
2. Peak memory (RSS) of a CPU training run at batch 32, 224 px.
3. Quality under a CPU budget (``--quality``): the offline pneumonia recipe trained on
   ../shared/data/pneumonia/train (validation drawn by patient from it) within 15 minutes: validation AUROC
   and accuracy (target AUROC >= 0.985); and the offline NIH recipe on the 205-image sample: mean validation
   AUROC.

Usage: ``python benchmarks/bench_training.py [--quality] [--out runs/bench]``
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cxrkit.config import load_config
from cxrkit.data.build import prepare_data
from cxrkit.data.dataset import CXRDataModule
from cxrkit.evaluation.metrics import auroc
from cxrkit.evaluation.run import open_data, predict_rows, split_rows
from cxrkit.inference.loading import load_model
from cxrkit.models import create_model
from cxrkit.training.run import train
from cxrkit.training.stages import apply_stage, resolve_stages

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
STEPS = 20
WARMUP = 2


def pneumonia_config(out: Path, extra: list[str] = ()):
    return load_config(
        REPO / "configs" / "pneumonia_lite0_offline.yaml",
        [
            f"data.sources.0.root={SHARED / 'pneumonia' / 'train'}",
            f"data.cache.dir={out / 'cache-pneumonia'}",
            f"output_dir={out / 'pneumonia'}",
            *extra,
        ],
    )


def timed_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch) -> float:
    """Seconds of one optimiser step on ``batch`` (images, targets); for the loader path the batch is
    produced inside the timed region by the caller's generator."""
    started = time.perf_counter()
    images, targets = batch() if callable(batch) else batch
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images), targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - started


def data_stall(out: Path) -> dict:
    """Interleave loader-fed and memory-fed steps (same model, same recipe settings) and compare medians,
    so drift in the machine's speed affects both paths alike."""
    config = pneumonia_config(out)
    prepare_data(config.data)
    datamodule = CXRDataModule(config.data, config.data.cache.dir, seed=0)
    datamodule.setup("fit")
    torch.manual_seed(0)
    model = create_model(config.model, len(datamodule.labels)).to(memory_format=torch.channels_last)
    apply_stage(model, resolve_stages(config.train)[0])
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = iter(loader_batches(datamodule))
    fixed = next(batches)
    loader_times, memory_times = [], []
    for step in range(STEPS + WARMUP):
        loader_time = timed_step(model, optimizer, lambda: next(batches))
        memory_time = timed_step(model, optimizer, fixed)
        if step >= WARMUP:
            loader_times.append(loader_time)
            memory_times.append(memory_time)
    batch_size = len(fixed[0])
    loader_rate = batch_size / float(np.median(loader_times))
    memory_rate = batch_size / float(np.median(memory_times))
    return {
        "model": f"{config.model.arch} (recipe stage 0, channels-last)",
        "batch_size": batch_size,
        "crop_size": int(config.data.augment.crop_size),
        "steps": STEPS,
        "torch_threads": torch.get_num_threads(),
        "loader_images_per_s": round(loader_rate, 2),
        "in_memory_images_per_s": round(memory_rate, 2),
        "loader_fraction_of_in_memory": round(loader_rate / memory_rate, 3),
        "target_fraction": 0.95,
        "peak_rss_mib_batch32": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def loader_batches(datamodule: CXRDataModule):
    while True:
        for batch in datamodule.train_dataloader():
            images, targets = datamodule.train_transform(batch)
            yield images.contiguous(memory_format=torch.channels_last), targets


def validation_quality(run_dir: Path) -> dict:
    loaded = load_model(run_dir)
    cache = open_data(loaded)
    predictions, _ = predict_rows(loaded, cache, split_rows(cache, "val"), progress=False)
    known = ~np.isnan(predictions.y_true)
    aurocs = [
        auroc(predictions.y_true[known[:, i], i], predictions.y_score[known[:, i], i])
        for i in range(len(predictions.labels))
    ]
    correct = (predictions.y_score >= 0.5) == (predictions.y_true == 1)
    return {
        "val_images": len(predictions.y_true),
        "val_auroc_mean": round(float(np.nanmean(aurocs)), 4),
        "val_accuracy_at_0.5": round(float(correct[known].mean()), 4),
    }


def quality(out: Path) -> dict:
    results = {}
    started = time.perf_counter()
    run_dir = train(pneumonia_config(out, ["train.loggers=[csv]"]))
    minutes = (time.perf_counter() - started) / 60
    results["pneumonia"] = {
        "train_minutes": round(minutes, 2),
        "budget_minutes": 15,
        "target_auroc": 0.985,
        **validation_quality(run_dir),
    }
    nih = load_config(
        REPO / "configs" / "nih_lite0_offline.yaml",
        [
            f"data.sources.0.root={SHARED / 'nih'}",
            f"data.cache.dir={out / 'cache-nih'}",
            f"output_dir={out / 'nih'}",
            "train.loggers=[csv]",
        ],
    )
    started = time.perf_counter()
    run_dir = train(nih)
    results["nih_sample"] = {
        "train_minutes": round((time.perf_counter() - started) / 60, 2),
        **validation_quality(run_dir),
    }
    return results


def memory_probe() -> None:
    """Two full-network training steps at batch 32, 224 px (every parameter trainable); print peak RSS."""
    config = pneumonia_config(Path("unused"), ["train.stages=[]"])
    model = create_model(config.model, 1)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = (torch.rand(32, 1, 224, 224), torch.randint(0, 2, (32, 1)).float())
    for _ in range(2):
        timed_step(model, optimizer, batch)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def peak_memory() -> dict:
    probe = subprocess.run(
        [sys.executable, __file__, "--memory-probe"], check=True, capture_output=True, text=True
    )
    return {
        "model": "tf_efficientnet_lite0, all layers trainable",
        "batch_size": 32,
        "image_size": 224,
        "peak_rss_mib": round(float(probe.stdout.strip().splitlines()[-1]), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality", action="store_true", help="also train the offline recipes (~20 min)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-training")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe()
        return
    if args.out.exists() and args.quality:
        import shutil

        shutil.rmtree(args.out / "pneumonia", ignore_errors=True)
        shutil.rmtree(args.out / "nih", ignore_errors=True)
    report = {"data_stall": data_stall(args.out), "peak_memory": peak_memory()}
    if args.quality:
        report["quality"] = quality(args.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
