"""Data-path throughput: decoding every item vs the preprocessing cache. Prints JSON.

(a) naive: per item, decode a 1024² NIH PNG, resize it to the cache size and augment it (batch of one).
(b) cache: the CXRDataModule train loader over a cache of the NIH sample (batch 32, augmentation on,
    no loader workers) with the batched augmentation applied as ``on_after_batch_transfer`` does.
Both run in this process with ``torch.set_num_threads(1)``; "per core" rates divide by the process CPU time
(wall-clock rates are reported beside them). On a shared machine other processes still slow the CPU work
(shared caches, SMT siblings), so the rate of the median batch is reported too: it is the robust figure.
``prepare`` runs in a
subprocess whose peak resident memory (its process tree summed, sampled every 20 ms) is reported.

Targets (issue): (b) >= 1,500 images/s per core and >= 15x (a).

    python benchmarks/bench_data.py [--nih-root ../shared/data/nih] [--naive-images 40] [--cache-images 3000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import torch

from cxrkit.data import labels as vocab
from cxrkit.data.augment import BatchAugment
from cxrkit.data.config import DataConfig
from cxrkit.data.dataset import CXRDataModule, to_unit_float
from cxrkit.data.decode import read_image
from cxrkit.data.manifest import Manifest, from_records
from cxrkit.data.transforms import Geometry

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NIH = REPO.parent / "shared" / "data" / "nih"


def nih_manifest(root: Path) -> Manifest:
    """The NIH sample as a manifest (official split; 14 findings + No Finding) built from its label CSV."""
    entries = pd.read_csv(root / "Data_Entry_2017_subset.csv")
    test_names = set((root / "official_split" / "test_list.txt").read_text().split())
    labels = [*vocab.NIH_FINDINGS, vocab.NO_FINDING]
    records = []
    for entry in entries.to_dict("records"):
        findings = [vocab.canonical_or_raise(name) for name in entry["Finding Labels"].split("|")]
        name = entry["Image Index"]
        records.append(
            {
                "path": str(root / "images" / name),
                "patient_id": f"nih:{entry['Patient ID']}",
                "view": entry["View Position"] if entry["View Position"] in ("PA", "AP") else "OTHER",
                "split": "test" if name in test_names else "train",
                "source": "nih",
                "targets": vocab.encode(findings, labels, labels),
            }
        )
    return from_records(records, labels)


PREPARE_SCRIPT = """
import sys
from cxrkit.data.cache import prepare_cache
from cxrkit.data.manifest import Manifest
report = prepare_cache(Manifest.load(sys.argv[1]), sys.argv[2], image_size=int(sys.argv[3]), progress=False)
print(report.n_images, report.n_failed)
"""


def run_prepare(manifest_path: Path, cache_dir: Path, image_size: int) -> dict:
    """Run prepare_cache in a subprocess, sampling the summed RSS of its process tree."""
    started = time.perf_counter()
    command = [sys.executable, "-c", PREPARE_SCRIPT, str(manifest_path), str(cache_dir), str(image_size)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        peak = max(peak, _tree_rss(root))
        time.sleep(0.02)
    output = process.stdout.read() if process.stdout else ""
    if process.returncode != 0:
        raise RuntimeError(f"prepare subprocess failed with code {process.returncode}")
    n_images, n_failed = (int(v) for v in output.split())
    seconds = time.perf_counter() - started
    return {
        "images": n_images,
        "failed": n_failed,
        "seconds": round(seconds, 2),
        "images_per_s": round(n_images / seconds, 1),
        "peak_rss_mib": round(peak / 2**20, 1),
    }


def _tree_rss(root: psutil.Process) -> int:
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total


def bench_naive(paths: list[str], n_images: int, cfg: DataConfig, seed: int) -> dict:
    augment = BatchAugment(cfg.augment, seed=seed)
    size = cfg.cache.image_size
    timer = BatchTimer()
    for i in range(n_images):
        with timer.batch(1):
            image = read_image(paths[i % len(paths)])
            resized = Geometry.fit(*image.shape, size, cfg.cache.resize_policy).apply(image)
            augment(to_unit_float(torch.from_numpy(resized)[None, None]))
    return timer.rates()


def bench_cache(cache_dir: Path, n_images: int, cfg: DataConfig, seed: int) -> dict:
    module = CXRDataModule(cfg, cache_dir, seed=seed)
    module.setup("fit")
    loader = module.train_dataloader()
    for batch in loader:  # warm-up: page cache, allocator
        module.train_transform(batch)
    timer = BatchTimer()
    epoch = 0
    while timer.images < n_images:
        loader.sampler.set_epoch(epoch)
        batches = iter(loader)
        while True:
            with timer.batch(cfg.loader.batch_size):
                batch = next(batches, None)
                if batch is not None:
                    module.train_transform(batch)  # what on_after_batch_transfer does while training
            if batch is None:
                timer.discard_last()
                break
        epoch += 1
    return timer.rates()


class BatchTimer:
    """Process-CPU and wall time of each batch (or item) of a loop."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.wall: list[float] = []
        self.sizes: list[int] = []

    @property
    def images(self) -> int:
        return sum(self.sizes)

    @contextlib.contextmanager
    def batch(self, size: int):
        cpu, wall = time.process_time(), time.perf_counter()
        yield
        self.cpu.append(time.process_time() - cpu)
        self.wall.append(time.perf_counter() - wall)
        self.sizes.append(size)

    def discard_last(self) -> None:
        for values in (self.cpu, self.wall, self.sizes):
            values.pop()

    def rates(self) -> dict:
        """Images/s per core from the total CPU time and from the median batch, and wall-clock."""
        cpu, sizes = np.array(self.cpu), np.array(self.sizes)
        return {
            "images": self.images,
            "images_per_s_per_core": round(float(sizes.sum() / cpu.sum()), 1),
            "images_per_s_per_core_median_batch": round(float(np.median(sizes / cpu)), 1),
            "images_per_s_wall": round(float(sizes.sum() / sum(self.wall)), 1),
            "cpu_seconds": round(float(cpu.sum()), 3),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nih-root", type=Path, default=DEFAULT_NIH)
    parser.add_argument("--naive-images", type=int, default=40)
    parser.add_argument("--cache-images", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.nih_root / "images").is_dir():
        sys.exit(f"NIH sample not found at {args.nih_root} (see ../shared/data/README.md)")

    torch.set_num_threads(1)
    cfg = DataConfig()
    cfg.loader.batch_size = args.batch_size
    manifest = nih_manifest(args.nih_root)
    with tempfile.TemporaryDirectory(prefix="cxrkit-bench-") as tmp:
        manifest_path = Path(tmp) / "nih.csv"
        manifest.save(manifest_path)
        cache_dir = Path(tmp) / "cache"
        prepare = run_prepare(manifest_path, cache_dir, cfg.cache.image_size)
        cache = bench_cache(cache_dir, args.cache_images, cfg, args.seed)
    naive = bench_naive(manifest.frame["path"].tolist(), args.naive_images, cfg, args.seed)
    ratio = cache["images_per_s_per_core"] / naive["images_per_s_per_core"]
    ratio_median = cache["images_per_s_per_core_median_batch"] / naive["images_per_s_per_core_median_batch"]
    result = {
        "dataset": f"NIH sample ({len(manifest)} images, 1024x1024 PNG)",
        "image_size": cfg.cache.image_size,
        "crop_size": cfg.augment.crop_size,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": psutil.cpu_count(),
        "load_average_1min": round(psutil.getloadavg()[0], 2),
        "naive": naive,
        "cache": cache,
        "speedup_cache_over_naive": round(ratio, 1),
        "speedup_cache_over_naive_median": round(ratio_median, 1),
        "prepare": prepare,
        "targets": {"cache_images_per_s_per_core": 1500, "speedup": 15},
        "targets_met_total_cpu": bool(cache["images_per_s_per_core"] >= 1500 and ratio >= 15),
        "targets_met_median_batch": bool(
            cache["images_per_s_per_core_median_batch"] >= 1500 and ratio_median >= 15
        ),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
