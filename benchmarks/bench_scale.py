"""Full-size dry run of the data path at NIH ChestX-ray14 scale. Prints JSON.

The real 112,120-row label file (``Data_Entry_2017_v2020.csv.gz``, shipped in the torchxrayvision wheel)
and the official split lists, over a temporary folder of symlinks that cycle through the 205 real sample
images, go through what a user runs:

1. ``cxr data manifest`` (adapter, labels, views, patient splits);
2. ``cxr data prepare`` with every core, killed with SIGKILL (the command and its pool workers) once
   ``--kill-at`` of the shards are finished, then run again: it must resume, decoding only the rows of the
   shards not finished (every decode is logged by path, in every process, and counted);
3. ``cxr data describe`` on the cache;
4. evaluation at full test size (the manifest's 25,596 test images): scores drawn at random around the
   labels (no model is run: this measures the evaluation code, not a network) through
   :func:`cxrkit.evaluation.evaluator.evaluate` (validation-chosen operating points, patient-bootstrap
   intervals, calibration, subgroups) and :func:`cxrkit.evaluation.report.write_evaluation_report`.

Each stage runs in a subprocess whose wall time and peak memory are reported: the proportional set size
(PSS: each shared page split between the processes that map it) of its process tree summed, sampled
every 0.2 s, so forked pool workers do not count the parent's libraries again; the summed RSS (which
does) is reported beside it. Target (issue): every stage <= 2 GB peak; nothing decoded twice after
the resume. Code quadratic in the dataset size shows here first. ``--limit N`` keeps the first N rows of the
label file (a quick run); ``--skip-prepare`` runs the other stages at full size without building the cache
(describe then reads the original images of its samples; evaluate scores the manifest's test split). The
machine's load average is reported beside the figures.

    python benchmarks/bench_scale.py [--limit 5000] [--skip-prepare] [--workers 0] [--replicates 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import psutil

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NIH = REPO.parent / "shared" / "data" / "nih"
LABEL_FILE = "Data_Entry_2017_v2020.csv.gz"
PEAK_TARGET_MIB = 2048
CXR = [sys.executable, "-c", "from cxrkit.cli.main import main; main()"]

#: A ``sitecustomize`` that logs every decode of the cache build (path per line) to $CXRKIT_DECODE_LOG. Put on
#: PYTHONPATH, it runs in every interpreter of the command, the pool's fork server and workers included.
COUNT_DECODES = """
import os

if os.environ.get("CXRKIT_DECODE_LOG"):
    import cxrkit.data.cache as cache

    log_path, read_image = os.environ["CXRKIT_DECODE_LOG"], cache.read_image

    def logged_read_image(path, **options):
        with open(log_path, "a") as log:
            log.write(f"{path}\\n")
        return read_image(path, **options)

    cache.read_image = logged_read_image
"""

EVALUATE = """
import json, sys, time
import numpy as np
from cxrkit.data.manifest import Manifest
from cxrkit.evaluation.evaluator import evaluate
from cxrkit.evaluation.leakage import check_patient_leakage
from cxrkit.evaluation.metrics import Predictions
from cxrkit.evaluation.report import write_evaluation_report

manifest_path, out_dir, replicates = sys.argv[1], sys.argv[2], int(sys.argv[3])
manifest = Manifest.load(manifest_path)
frame, rng = manifest.frame, np.random.default_rng(0)

def scores_for(rows):
    targets = manifest.targets[rows]
    signal = np.nan_to_num(targets, nan=0.0) * 1.5  # informative, not perfect: AUROC about 0.85
    probabilities = 1 / (1 + np.exp(-(rng.normal(size=targets.shape) + signal - 1.0)))
    part = frame.iloc[rows]
    metadata = part[["path", "sex", "age", "view"]].reset_index(drop=True)
    return Predictions(targets, probabilities, part["patient_id"].to_numpy(), manifest.labels, metadata)

split = frame["split"].to_numpy()
test, val = scores_for(np.flatnonzero(split == "test")), scores_for(np.flatnonzero(split == "val"))
leakage = check_patient_leakage(frame["patient_id"], frame["split"])
started = time.perf_counter()
result = evaluate(test, val, n_replicates=replicates, leakage=leakage)
paths = write_evaluation_report(result, out_dir, title="bench_scale")
print(json.dumps({"test_images": len(test), "val_images": len(val), "labels": len(manifest.labels),
                  "evaluate_s": round(time.perf_counter() - started, 1), "timings_s": result.timings,
                  "mean_auroc": round(float(result.table.loc["macro", "auroc"]), 4)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nih-root", type=Path, default=DEFAULT_NIH)
    parser.add_argument("--limit", type=int, default=None, help="first N rows of the label file only")
    parser.add_argument("--workers", type=int, default=0, help="prepare processes (0 = all cores)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction of shards finished at the kill")
    parser.add_argument("--replicates", type=int, default=1000, help="bootstrap replicates of evaluate")
    parser.add_argument(
        "--skip-prepare", action="store_true", help="manifest, describe and evaluate only (no cache build)"
    )
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args()
    if not (args.nih_root / "images").is_dir():
        sys.exit(f"NIH sample not found at {args.nih_root} (see ../shared/data/README.md)")

    with contextlib.ExitStack() as stack:
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cxrkit-scale-")))
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    print(json.dumps(result, indent=2))


def run(args: argparse.Namespace, work: Path) -> dict:
    load_before = psutil.getloadavg()[0]
    started = time.perf_counter()
    root = make_root(args.nih_root, work / "nih", args.limit)
    setup_s = time.perf_counter() - started
    overrides = [
        f"data.sources=[{{adapter: nih, root: {root}}}]",
        f"data.cache.dir={work / 'cache'}",
        f"data.cache.image_size={args.image_size}",
        f"data.cache.shard_size={args.shard_size}",
        f"data.cache.workers={args.workers}",
        f"data.augment.crop_size={min(224, args.image_size)}",
        f"output_dir={work / 'out'}",
    ]
    manifest_path = work / "manifest.csv"
    stages = {"manifest": measure([*CXR, "data", "manifest", *overrides, "--out", str(manifest_path)])}
    manifest = pd.read_csv(manifest_path, usecols=["path", "split"], keep_default_na=False)
    resume = {} if args.skip_prepare else run_prepare(stages, overrides, work, len(manifest), args)
    stages["describe"] = measure([*CXR, "data", "describe", *overrides, "--out", str(work / "describe")])
    stages["evaluate"] = measure(
        [sys.executable, "-c", EVALUATE, str(manifest_path), str(work / "evaluation"), str(args.replicates)]
    )
    peaks = {name: stage["peak_pss_mib"] for name, stage in stages.items()}
    return {
        "rows_in_label_file": int(pd.read_csv(root / LABEL_FILE, usecols=["Image Index"]).shape[0]),
        "manifest_rows": len(manifest),
        "split_sizes": manifest["split"].value_counts().to_dict(),
        "image_size": args.image_size,
        "shard_size": args.shard_size,
        "workers": args.workers or len(os.sched_getaffinity(0)),
        "cpu_count": psutil.cpu_count(),
        "load_average_1min_before": round(load_before, 2),
        "load_average_1min_after": round(psutil.getloadavg()[0], 2),
        "setup_s": round(setup_s, 1),
        "stages": stages,
        "resume": resume,
        "targets": {"peak_pss_mib_per_stage": PEAK_TARGET_MIB},
        "targets_met": bool(
            all(peak <= PEAK_TARGET_MIB for peak in peaks.values())
            and resume.get("nothing_decoded_twice", True)
        ),
    }


def run_prepare(
    stages: dict, overrides: list[str], work: Path, n_rows: int, args: argparse.Namespace
) -> dict:
    """`cxr data prepare` killed with SIGKILL at ``args.kill_at`` of its shards, then resumed; decodes
    counted in both runs."""
    n_shards = math.ceil(n_rows / args.shard_size)
    shards = work / "cache" / "shards"
    decode_log, hooks = work / "decodes.txt", work / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(COUNT_DECODES)
    path = os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "CXRKIT_DECODE_LOG": str(decode_log), "PYTHONPATH": path}
    prepare = [*CXR, "data", "prepare", *overrides]
    kill_after = max(1, math.floor(n_shards * args.kill_at))
    finished = lambda: len(list(shards.glob("shard_*.json"))) if shards.is_dir() else 0  # noqa: E731
    stages["prepare_until_killed"] = measure(prepare, env, kill_when=lambda: finished() >= kill_after)
    finished_at_kill = sorted(shards.glob("shard_*.json"))
    decoded_before = _lines(decode_log)
    decode_log.unlink()
    stages["prepare_resumed"] = measure(prepare, env)
    decoded_after = _lines(decode_log)
    stages["prepare_resumed"]["images_per_s"] = round(
        len(decoded_after) / stages["prepare_resumed"]["seconds"], 1
    )
    finished_rows = {row[1] for path in finished_at_kill for row in json.loads(path.read_text())["rows"]}
    finished_rows |= {row[1] for path in finished_at_kill for row in json.loads(path.read_text())["failures"]}
    after = Counter(decoded_after)
    resume = {
        "shards": n_shards,
        "shards_finished_at_kill": len(finished_at_kill),
        "decoded_before_kill": len(decoded_before),
        "decoded_after_resume": len(decoded_after),
        "rows_not_finished_at_kill": n_rows - len(finished_rows),
        "finished_rows_decoded_again": sum(after[path] for path in finished_rows),
        "rows_decoded_twice_in_resume": sum(1 for count in after.values() if count > 1),
    }
    resume["nothing_decoded_twice"] = (
        resume["finished_rows_decoded_again"] == 0
        and resume["rows_decoded_twice_in_resume"] == 0
        and resume["decoded_after_resume"] == resume["rows_not_finished_at_kill"]
    )
    return resume


def make_root(sample: Path, root: Path, limit: int | None) -> Path:
    """An NIH root: the full label file (or its first ``limit`` rows), the official split lists, and
    ``images/<name>`` symlinks to the sample images in turn."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("torchxrayvision is not installed: it ships the full NIH label file")
    label_file = Path(spec.submodule_search_locations[0]) / "data" / LABEL_FILE
    table = pd.read_csv(label_file, dtype=str)
    if limit:
        table = table.head(limit)
    table.to_csv(root / LABEL_FILE, index=False, compression="gzip")
    with contextlib.suppress(FileExistsError):
        (root / "official_split").symlink_to(sample / "official_split")
    images = sorted((sample / "images").glob("*.png"))
    for i, name in enumerate(table["Image Index"]):
        link = root / "images" / name
        if not link.is_symlink():
            link.symlink_to(images[i % len(images)])
    return root


def measure(command: list[str], env: dict | None = None, kill_when: Callable[[], bool] | None = None) -> dict:
    """Run ``command``; its wall time and peak summed RSS of its process tree; with ``kill_when``, SIGKILL
    the process group as soon as it returns True."""
    started = time.perf_counter()
    # output goes to files: a pipe nobody reads while the command runs fills up and blocks it
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        process = subprocess.Popen(
            command, env=env, stdout=out_file, stderr=err_file, text=True, process_group=0
        )
        root = psutil.Process(process.pid)
        peak_pss, peak_rss, killed = 0, 0, False
        while process.poll() is None:
            pss, rss = _tree_memory(root)
            peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
            if kill_when is not None and not killed and kill_when():
                os.killpg(process.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.2)
        out_file.seek(0), err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    if process.returncode != 0 and not killed:
        raise RuntimeError(f"{' '.join(command[:4])}... failed ({process.returncode}):\n{err[-3000:]}")
    stage = {
        "seconds": round(time.perf_counter() - started, 1),
        "peak_pss_mib": round(peak_pss / 2**20),
        "peak_rss_summed_mib": round(peak_rss / 2**20),
    }
    if killed:
        stage["killed"] = "SIGKILL to the command and its workers"
    last_line = out.strip().splitlines()[-1] if out.strip() else ""
    with contextlib.suppress(ValueError):
        stage["output"] = json.loads(last_line)
    if "output" not in stage and last_line:
        stage["output"] = last_line[:300]
    return stage


def _tree_memory(root: psutil.Process) -> tuple[int, int]:
    """Summed PSS and RSS of ``root`` and its descendants (PSS falls back to RSS where unavailable)."""
    pss = rss = 0
    with contextlib.suppress(psutil.Error):
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                info = process.memory_full_info()
                pss += getattr(info, "pss", info.rss)
                rss += info.rss
    return pss, rss


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


if __name__ == "__main__":
    main()
