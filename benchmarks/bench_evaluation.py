"""Time the full evaluation at NIH ChestX-ray14 official test-set size; prints JSON.

Targets and patients are the real official test split (25,596 images, 14 findings, real patient ids, sex,
age and view) when ``../shared/data/nih/official_split/test_list.txt`` and torchxrayvision's label file are
available, otherwise a synthetic set of the same size (2,800 patients with several images each, NIH test
prevalences). Scores are synthetic: a per-label signal plus a per-patient random effect (so images of a
patient are correlated, as in real predictions) and noise; validation predictions for the operating points
come from a separate patient-wise draw.

    python benchmarks/bench_evaluation.py [--replicates 1000] [--report OUT_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxrkit.data.labels import NIH_FINDINGS
from cxrkit.evaluation.evaluator import evaluate
from cxrkit.evaluation.metrics import Predictions

REPO = Path(__file__).resolve().parents[1]
NIH_SPLIT = REPO.parent / "shared" / "data" / "nih" / "official_split"
#: Positive images per finding in the official NIH test list (25,596 images).
NIH_TEST_PREVALENCE = dict(
    zip(
        NIH_FINDINGS,
        np.array([3279, 1069, 4658, 6112, 1748, 1623, 555, 2665, 1815, 925, 1093, 435, 1143, 86]) / 25_596,
        strict=True,
    )
)


def nih_tables() -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Real (test, validation) label tables from the official split, or None when files are missing."""
    try:
        import importlib.resources

        entries = importlib.resources.files("torchxrayvision") / "data" / "Data_Entry_2017_v2020.csv.gz"
        frame = pd.read_csv(str(entries))
        test_names = set((NIH_SPLIT / "test_list.txt").read_text().split())
    except (ImportError, FileNotFoundError, OSError):
        return None
    findings = frame["Finding Labels"].str.get_dummies(sep="|")
    for label in NIH_FINDINGS:
        frame[label] = findings[label.replace(" ", "_")].astype(float)
    frame = frame.rename(
        columns={
            "Patient ID": "patient_id",
            "Patient Gender": "sex",
            "Patient Age": "age",
            "View Position": "view",
        }
    )
    frame["patient_id"] = "nih:" + frame["patient_id"].astype(str)
    is_test = frame["Image Index"].isin(test_names)
    rest = frame[~is_test]
    rng = np.random.default_rng(1)
    val_patients = rng.permutation(rest["patient_id"].unique())[: rest["patient_id"].nunique() // 10]
    return frame[is_test].reset_index(drop=True), rest[rest["patient_id"].isin(val_patients)].reset_index(
        drop=True
    )


def synthetic_table(n_images: int, n_patients: int, rng: np.random.Generator) -> pd.DataFrame:
    """Patients with a skewed number of images each, NIH test prevalences, sex/age/view metadata."""
    weights = rng.gamma(0.7, size=n_patients)
    patient = rng.choice(n_patients, size=n_images, p=weights / weights.sum())
    frame = pd.DataFrame({"patient_id": [f"synthetic:{p}" for p in patient]})
    sex = np.where(rng.random(n_patients) < 0.56, "M", "F")
    age = np.clip(rng.normal(47, 17, n_patients), 1, 95).round()
    frame["sex"] = sex[patient]
    frame["age"] = age[patient]
    frame["view"] = np.where(rng.random(n_images) < 0.6, "PA", "AP")
    for label, prevalence in NIH_TEST_PREVALENCE.items():
        frame[label] = (rng.random(n_images) < prevalence).astype(float)
    return frame


def scored(frame: pd.DataFrame, rng: np.random.Generator) -> Predictions:
    """Synthetic model scores for the targets of ``frame``: AUROC about 0.7-0.9 per finding."""
    labels = list(NIH_FINDINGS)
    y_true = frame[labels].to_numpy(dtype=float)
    patients, index = np.unique(frame["patient_id"], return_inverse=True)
    separation = np.linspace(0.8, 2.0, len(labels))
    patient_effect = rng.normal(0, 0.5, size=(patients.size, len(labels)))[index]
    logits = -2.0 + separation * y_true + patient_effect + rng.normal(0, 1.0, size=y_true.shape)
    metadata = frame[["sex", "age", "view"]].reset_index(drop=True)
    return Predictions(y_true, 1 / (1 + np.exp(-logits)), frame["patient_id"].to_numpy(), labels, metadata)


def timed(function, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, round(time.perf_counter() - wall, 3), round(time.process_time() - cpu, 3)


def check_against_sklearn(pred: Predictions, n_replicates: int = 3) -> float:
    """Largest |replicate AUROC - roc_auc_score(sample_weight=replicate weights)| over a few replicates."""
    from sklearn.metrics import roc_auc_score

    from cxrkit.evaluation import bootstrap as bs

    resampler = bs.Resampler(pred.patient_ids, n_replicates, seed=0)
    values = bs.run(resampler, {"auroc": bs.auroc_statistic(pred.y_true, pred.y_score, resampler)})["auroc"]
    worst = 0.0
    for r in range(n_replicates):
        weights = resampler.row_weights(r)
        for j in range(len(pred.labels)):
            expected = roc_auc_score(pred.y_true[:, j], pred.y_score[:, j], sample_weight=weights)
            worst = max(worst, abs(expected - values[r, j]))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=1000)
    parser.add_argument("--report", type=Path, default=None, help="also write the HTML report here")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    tables = nih_tables()
    source = "nih official test split (real targets, synthetic scores)"
    if tables is None:
        source = "synthetic"
        tables = (synthetic_table(25_596, 2_800, rng), synthetic_table(11_000, 2_800, rng))
    test, val = scored(tables[0], rng), scored(tables[1], rng)

    options = {"threshold_method": "youden", "n_replicates": args.replicates}
    core, core_wall, core_cpu = timed(evaluate, test, val, subgroup_attributes=None, **options)
    full, full_wall, full_cpu = timed(evaluate, test, val, temperature="global", **options)
    macro = core.table.loc["macro"]
    out = {
        "benchmark": "evaluation",
        "data": source,
        "n_images": len(test),
        "n_patients": test.n_patients,
        "n_labels": len(test.labels),
        "n_val_images": len(val),
        "n_replicates": args.replicates,
        "seconds_metrics_cis_thresholds": core_wall,
        "cpu_seconds_metrics_cis_thresholds": core_cpu,
        "seconds_with_calibration_temperature_subgroups": full_wall,
        "cpu_seconds_with_calibration_temperature_subgroups": full_cpu,
        "stages_s": full.timings,
        "mean_auroc": round(float(macro["auroc"]), 4),
        "mean_auroc_ci": [round(float(macro["auroc_low"]), 4), round(float(macro["auroc_high"]), 4)],
        "max_abs_diff_vs_sklearn_sample_weight": check_against_sklearn(test),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}, "
        f"python {platform.python_version()}",
    }
    if args.report is not None:
        from cxrkit.evaluation.report import write_evaluation_report

        _, out["seconds_report"], _ = timed(write_evaluation_report, full, args.report)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
