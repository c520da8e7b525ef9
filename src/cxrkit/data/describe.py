"""The data description report (``cxr data describe``): what is in a manifest, before anything is trained.

One HTML page (see :mod:`cxrkit.reporting.html`) with summary numbers, label distribution per split
(positive / negative / unknown kept apart: NaN means *not annotated*, never *absent*), label co-occurrence,
view / sex / age breakdowns, a patient-overlap (leakage) check between splits, sample images, augmented
samples and a sample of unreadable files. Every table is also written as CSV next to the report.

The counting functions (:func:`label_counts`, :func:`cooccurrence`, :func:`patient_overlap`,
:func:`leaking_patients`, :func:`breakdown`, :func:`age_summary`, :func:`summary`, :func:`sources`) are
public so notebooks and tests can use them alone.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cxrkit.data import labels as vocab
from cxrkit.data.augment import BatchAugment
from cxrkit.data.cache import open_cache
from cxrkit.data.manifest import SPLITS, Manifest
from cxrkit.data.transforms import PreprocessSpec
from cxrkit.reporting import plots
from cxrkit.reporting.html import Report

log = logging.getLogger(__name__)

#: Loads the image of one manifest row (by position) as uint8 HxW grayscale.
ImageLoader = Callable[[int], np.ndarray]

SPLIT_ORDER: tuple[str, ...] = (*SPLITS, "")
UNASSIGNED = "unassigned"
UNKNOWN = "unknown"
#: Ages outside this range (years) are reported as implausible (NIH has a few recording errors).
PLAUSIBLE_AGE = (0.0, 110.0)
THUMBNAIL = 320
MAX_FAILURES_SHOWN = 20
MAX_OVERLAP_IDS = 5


# ---------------------------------------------------------------- counting (pure functions on a manifest)


def split_names(manifest: Manifest) -> list[str]:
    """Display names of the splits present, in train/val/test order ("" shows as ``unassigned``)."""
    present = set(manifest.frame["split"].unique())
    return [_split_label(split) for split in SPLIT_ORDER if split in present]


def label_counts(manifest: Manifest) -> pd.DataFrame:
    """Per split and label: ``positive`` (1), ``negative`` (0), ``unknown`` (NaN) image counts and the
    ``prevalence`` among annotated images (NaN when no image of the split annotates the label)."""
    rows = []
    for split, frame in _by_split(manifest):
        values = frame[manifest.labels].to_numpy(dtype=np.float64)
        positive = (values == 1).sum(axis=0)
        negative = (values == 0).sum(axis=0)
        unknown = np.isnan(values).sum(axis=0)
        for i, label in enumerate(manifest.labels):
            annotated = positive[i] + negative[i]
            prevalence = positive[i] / annotated if annotated else np.nan
            rows.append((split, label, int(positive[i]), int(negative[i]), int(unknown[i]), prevalence))
    columns = ["split", "label", "positive", "negative", "unknown", "prevalence"]
    return pd.DataFrame(rows, columns=columns)


def cooccurrence(manifest: Manifest, labels: Sequence[str] | None = None) -> pd.DataFrame:
    """Square label x label table of images positive for both labels (the diagonal: positives per label)."""
    labels = list(labels if labels is not None else manifest.labels)
    positive = (manifest.frame[labels].to_numpy(dtype=np.float64) == 1).astype(np.int64)
    return pd.DataFrame(positive.T @ positive, index=labels, columns=labels)


def patient_overlap(manifest: Manifest) -> pd.DataFrame:
    """Patients found in more than one split, one row per pair of splits that share any.

    Columns: ``splits`` ("train & test"), ``patients`` (count), ``images`` (images of those patients in
    the two splits) and ``example_ids`` (up to five ids). Images with no split or no patient id are ignored.
    """
    frame = manifest.frame[(manifest.frame["split"] != "") & (manifest.frame["patient_id"] != "")]
    patients = {split: set(group["patient_id"]) for split, group in frame.groupby("split")}
    splits = [split for split in SPLIT_ORDER if split in patients]
    rows = []
    for a_index, a in enumerate(splits):
        for b in splits[a_index + 1 :]:
            shared = sorted(patients[a] & patients[b])
            if not shared:
                continue
            in_pair = frame["split"].isin((a, b)) & frame["patient_id"].isin(shared)
            examples = ", ".join(shared[:MAX_OVERLAP_IDS]) + (", …" if len(shared) > MAX_OVERLAP_IDS else "")
            rows.append((f"{a} & {b}", len(shared), int(in_pair.sum()), examples))
    return pd.DataFrame(rows, columns=["splits", "patients", "images", "example_ids"])


def breakdown(manifest: Manifest, column: str, categories: Sequence[str] = ()) -> pd.DataFrame:
    """Image counts per split (rows) and value of ``column`` (columns; "" shows as ``unknown``).

    ``categories`` fixes the order of known values; others follow alphabetically, ``unknown`` last.
    """
    frame = manifest.frame
    values = frame[column].astype(str).replace("", UNKNOWN)
    table = pd.crosstab(frame["split"].map(_split_label), values)
    present = list(table.columns)
    ordered = [c for c in categories if c in present]
    ordered += sorted(c for c in present if c not in ordered and c != UNKNOWN)
    ordered += [UNKNOWN] if UNKNOWN in present else []
    table = table.reindex(index=split_names(manifest), columns=ordered, fill_value=0)
    table.index.name, table.columns.name = "split", column
    return table


def age_summary(manifest: Manifest) -> pd.DataFrame:
    """Per split: images, known / missing / implausible ages, mean, std, median, min and max (years)."""
    rows = []
    low, high = PLAUSIBLE_AGE
    for split, frame in _by_split(manifest):
        ages = frame["age"].to_numpy(dtype=np.float64)
        known = ages[~np.isnan(ages)]
        std = known.std(ddof=1) if known.size > 1 else np.nan
        stats = (
            (known.mean(), std, np.median(known), known.min(), known.max()) if known.size else [np.nan] * 5
        )
        implausible = int(((known < low) | (known > high)).sum())
        rows.append((split, len(ages), known.size, len(ages) - known.size, implausible, *stats))
    columns = ["split", "images", "known", "missing", "implausible", "mean", "std", "median", "min", "max"]
    return pd.DataFrame(rows, columns=columns)


def summary(manifest: Manifest) -> pd.DataFrame:
    """Headline numbers as a two-column table (``quantity``, ``value``)."""
    frame = manifest.frame
    known_patients = frame.loc[frame["patient_id"] != "", "patient_id"]
    per_patient = known_patients.value_counts()
    studies = frame.loc[frame["study_id"] != "", "study_id"]
    rows: list[tuple[str, Any]] = [
        ("images", len(frame)),
        ("patients", int(known_patients.nunique())),
        ("images without patient id", int((frame["patient_id"] == "").sum())),
        ("images per patient (mean)", float(per_patient.mean()) if len(per_patient) else np.nan),
        ("images per patient (max)", int(per_patient.max()) if len(per_patient) else 0),
        ("studies", int(studies.nunique())),
        ("sources", _sources_text(manifest, UNKNOWN)),
        ("labels", len(manifest.labels)),
    ]
    rows += [
        (f"images in {name}", int((frame["split"].map(_split_label) == name).sum()))
        for name in split_names(manifest)
    ]
    return pd.DataFrame(rows, columns=["quantity", "value"]).astype({"value": object})


def sources(manifest: Manifest) -> pd.DataFrame:
    """Per source: images, patients and how many of the manifest's labels it annotates (any non-NaN)."""
    rows = []
    for source, frame in manifest.frame.groupby("source", sort=True):
        annotated = frame[manifest.labels].notna().any(axis=0)
        rows.append(
            (
                source or UNKNOWN,
                len(frame),
                int(frame["patient_id"].replace("", np.nan).nunique()),
                f"{int(annotated.sum())} / {len(manifest.labels)}",
            )
        )
    return pd.DataFrame(rows, columns=["source", "images", "patients", "annotated labels"])


# ---------------------------------------------------------------- the report


def describe(
    manifest: Manifest,
    out_dir: str | Path,
    *,
    images: ImageLoader | None = None,
    augment_cfg: Any = None,
    n_samples: int = 16,
    seed: int = 0,
    image_size: int = 256,
    resize_policy: str = "letterbox",
    intensity: str = "none",
    failures: pd.DataFrame | None = None,
    title: str = "Data description",
) -> Path:
    """Write the data description report into ``out_dir`` and return the path of ``report.html``.

    ``images`` loads one manifest row (by position) as uint8 HxW; by default the original files are decoded
    with :func:`cxrkit.data.decode.read_image`. Unreadable samples are skipped and listed with the
    ``failures`` table (columns ``path``, ``reason``), e.g. the corrupt files found while caching.
    ``augment_cfg`` (:class:`~cxrkit.data.config.AugmentConfig`) adds a grid of augmented samples, made by
    :class:`cxrkit.data.augment.BatchAugment` on samples resized as the cache does (``image_size``,
    ``resize_policy``, ``intensity``: see :mod:`cxrkit.data.cache`).
    """
    if not len(manifest):
        raise ValueError("cannot describe an empty manifest (0 images)")
    failures = _check_failures(failures)
    report = Report(title, subtitle=f"{len(manifest):,} images from {_sources_text(manifest)}")
    _summary_section(report, manifest)
    _leakage_section(report, manifest)
    _labels_section(report, manifest)
    _cooccurrence_section(report, manifest)
    _demographics_section(report, manifest)
    loader = images if images is not None else _original_loader(manifest)
    samples, load_failures = _load_samples(manifest, loader, n_samples, seed)
    _samples_section(report, manifest, samples)
    spec = PreprocessSpec(image_size, resize_policy, image_size, intensity=intensity)
    inputs = [spec.cache_image(image)[0] for _, image in samples[:4]]
    _augment_section(report, inputs, augment_cfg, seed)
    _failures_section(report, pd.concat([f for f in (failures, load_failures) if len(f)] or [failures]))
    path = report.write(out_dir)
    log.debug("data description written to %s", path)  # `cxr data describe` prints the path
    return path


def describe_cache(
    cache_dir: str | Path, out_dir: str | Path, augment_cfg: Any = None, *, n_samples: int = 16, seed: int = 0
) -> Path:
    """Describe a prepared cache (:func:`cxrkit.data.cache.open_cache`); samples come from the cache."""
    cache = open_cache(cache_dir)
    failures_csv = Path(cache_dir) / "failures.csv"
    failures = pd.read_csv(failures_csv, dtype=str, keep_default_na=False) if failures_csv.exists() else None
    return describe(
        cache.manifest,
        out_dir,
        images=cache.image,
        augment_cfg=augment_cfg,
        n_samples=n_samples,
        seed=seed,
        image_size=cache.image_size,
        resize_policy=cache.resize_policy,
        intensity="none",  # cache images are already normalised
        failures=failures,
    )


def _summary_section(report: Report, manifest: Manifest) -> None:
    report.heading("Summary")
    report.table(summary(manifest), name="summary", float_format="{:.2f}")
    report.table(sources(manifest), caption="Sources", name="sources")


def _leakage_section(report: Report, manifest: Manifest) -> None:
    report.heading("Patient overlap between splits")
    splits = [name for name in split_names(manifest) if name != UNASSIGNED]
    missing_ids = int((manifest.frame["patient_id"] == "").sum())
    if missing_ids:
        report.callout(
            f"{missing_ids:,} images have no patient id and cannot be checked for leakage.", "warning"
        )
    if len(splits) < 2:
        report.callout(
            f"Only {len(splits)} split assigned ({', '.join(splits) or 'none'}): nothing to compare. "
            "Splits are made by patient when data is prepared.",
            "info",
        )
        return
    overlap = patient_overlap(manifest)
    if overlap.empty:
        report.callout(f"No patient appears in more than one split ({' / '.join(splits)}).", "ok")
        return
    total = len(leaking_patients(manifest))
    report.callout(
        f"{total:,} patients appear in more than one split: their images leak between splits and "
        "inflate validation/test metrics. Split by patient.",
        "error",
    )
    report.table(overlap, caption="Shared patients per pair of splits", name="patient_overlap")


def _labels_section(report: Report, manifest: Manifest) -> None:
    report.heading("Label distribution")
    if not manifest.labels:
        report.callout("The manifest has no label columns.", "warning")
        return
    counts = label_counts(manifest)
    report.paragraph(
        "Positive = 1, negative = 0, unknown = not annotated by the source (NaN; masked in losses "
        "and metrics, never counted as negative). Prevalence is among annotated images."
    )
    positives = counts.pivot(index="label", columns="split", values="positive")
    positives = positives.reindex(index=manifest.labels, columns=split_names(manifest))
    report.figure(
        plots.label_counts_bar(positives, log=_wide_range(positives)),
        "label_counts",
        caption="Positive images per label and split",
    )
    for message, kind in _label_warnings(counts):
        report.callout(message, kind)
    report.attach(counts, "label_counts")
    for split in split_names(manifest):
        table = counts[counts["split"] == split].drop(columns="split")
        report.table(table, caption=f"{split}: images per label", float_format="{:.1%}")


def _label_warnings(counts: pd.DataFrame) -> list[tuple[str, str]]:
    """Labels a model cannot learn (no positive in train) or be scored on (no positive in val/test)."""
    messages = []
    for split, group in counts.groupby("split", sort=False):
        annotated = group[group["positive"] + group["negative"] > 0]
        never = group.loc[group["positive"] + group["negative"] == 0, "label"].tolist()
        no_positive = annotated.loc[annotated["positive"] == 0, "label"].tolist()
        if no_positive:
            consequence = {
                "train": "cannot be learned",
                "val": "cannot be validated (AUROC undefined)",
                "test": "cannot be tested (AUROC undefined)",
            }.get(split, "has no positive image")
            messages.append(
                (f"{split}: no positive image for {_list_text(no_positive)}: {consequence}.", "warning")
            )
        if never:
            messages.append((f"{split}: {_list_text(never)} never annotated (all unknown).", "info"))
    return messages


def _cooccurrence_section(report: Report, manifest: Manifest) -> None:
    report.heading("Label co-occurrence")
    has_train = (manifest.frame["split"] == "train").any()
    subset = manifest.subset(manifest.frame["split"] == "train") if has_train else manifest
    counts = cooccurrence(subset, [label for label in manifest.labels if label != vocab.NO_FINDING])
    shown = [label for label in counts.index if counts.loc[label, label] > 0]
    scope = "train split" if has_train else "all images"
    report.attach(counts, "cooccurrence", index=True)
    if len(shown) < 2:
        report.paragraph(f"Fewer than two findings have a positive image in the {scope}: nothing to show.")
        return
    figure = plots.cooccurrence_heatmap(counts.loc[shown, shown], title=f"Label co-occurrence ({scope})")
    report.figure(
        figure,
        "cooccurrence",
        caption=f"Images positive for both labels, {scope}; the diagonal "
        "counts the positives of each label (colour on a log scale).",
    )


def _demographics_section(report: Report, manifest: Manifest) -> None:
    report.heading("Views, sex and age")
    for column, categories, caption in (
        ("view", ("PA", "AP", "LAT", "OTHER"), "View position"),
        ("sex", ("M", "F"), "Sex"),
    ):
        table = breakdown(manifest, column, categories)
        figure = plots.category_bars(table, title=f"{caption} per split")
        report.figure(figure, f"{column}_per_split", caption=f"{caption}: share of images per split")
        report.table(table.reset_index(), caption=f"{caption}: images per split", name=f"{column}_per_split")
    ages = age_summary(manifest)
    implausible = int(ages["implausible"].sum())
    if implausible:
        low, high = PLAUSIBLE_AGE
        report.callout(
            f"{implausible:,} image(s) have an implausible age (outside {low:g}-{high:g} years); "
            "they are left out of the histogram.",
            "warning",
        )
    report.table(ages, caption="Age (years) per split", name="age_per_split", float_format="{:.1f}")
    if ages["known"].sum():
        by_split = {split: _plausible(frame["age"]) for split, frame in _by_split(manifest)}
        report.figure(
            plots.histogram(
                by_split,
                bins=np.arange(PLAUSIBLE_AGE[0], PLAUSIBLE_AGE[1] + 5, 5),
                xlabel="age (years)",
                title="Age per split",
                normalize=len(by_split) > 1,
            ),
            "age_histogram",
            caption="Age in 5-year bins (plausible ages only)",
        )


def _samples_section(report: Report, manifest: Manifest, samples: list[tuple[int, np.ndarray]]) -> None:
    report.heading("Sample images")
    if not samples:
        report.callout("No sample image could be loaded (see the unreadable files below).", "warning")
        return
    titles = [_sample_title(manifest.frame.iloc[i], manifest.labels) for i, _ in samples]
    figure = plots.image_grid([_thumbnail(image) for _, image in samples], titles, ncols=4)
    report.figure(
        figure,
        "samples",
        caption=f"{len(samples)} images drawn at random; titles list the positive findings and the view.",
    )


def _augment_section(
    report: Report, inputs: list[np.ndarray], augment_cfg: Any, seed: int, n_variants: int = 3
) -> None:
    report.heading("Augmented samples")
    if augment_cfg is None:
        report.paragraph("No augmentation config given.")
        return
    if not getattr(augment_cfg, "enabled", True):
        report.callout("Augmentation is disabled (data.augment.enabled = false).", "info")
        return
    if not inputs:
        report.paragraph("No sample image to augment.")
        return
    variants = augment_images(inputs, augment_cfg, n_variants=n_variants, seed=seed)
    grid, titles = [], []
    for i, image in enumerate(inputs):
        grid += [image, *variants[i]]
        titles += [f"input {image.shape[0]}²", *(f"augmented #{v + 1}" for v in range(n_variants))]
    size, crop = inputs[0].shape[0], variants[0][0].shape[0]
    report.figure(
        plots.image_grid(grid, titles, ncols=n_variants + 1),
        "augmented",
        caption=f"Each row: one input at the cache size ({size}²) and {n_variants} draws of the train-time "
        f"augmentation (output {crop}²).",
    )


def augment_images(
    images: list[np.ndarray], augment_cfg: Any, *, n_variants: int = 3, seed: int = 0
) -> list[list[np.ndarray]]:
    """``n_variants`` augmented uint8 copies of each same-size square uint8 image, via ``BatchAugment``."""
    batch = torch.from_numpy(np.stack(images)).float().div(255).unsqueeze(1)
    batch = batch.repeat_interleave(n_variants, dim=0)
    with torch.no_grad():
        out = BatchAugment(augment_cfg, seed=seed)(batch)
    out = (out.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()
    return [list(out[i * n_variants : (i + 1) * n_variants]) for i in range(len(images))]


def _failures_section(report: Report, failures: pd.DataFrame) -> None:
    if failures.empty:
        return
    report.heading("Unreadable files")
    report.callout(f"{len(failures):,} files could not be read; they are skipped.", "warning")
    shown = failures.head(MAX_FAILURES_SHOWN)
    caption = f"First {len(shown)} of {len(failures):,}" if len(failures) > len(shown) else None
    report.table(shown, caption=caption)
    report.attach(failures, "failures")


# ---------------------------------------------------------------- images


def _original_loader(manifest: Manifest) -> ImageLoader:
    paths = manifest.frame["path"].tolist()

    def load(position: int) -> np.ndarray:
        from cxrkit.data.decode import read_image

        return read_image(paths[position])

    return load


def _load_samples(
    manifest: Manifest, loader: ImageLoader, n_samples: int, seed: int
) -> tuple[list[tuple[int, np.ndarray]], pd.DataFrame]:
    """Load ``n_samples`` random rows; rows that fail become (path, reason) failures."""
    rng = np.random.default_rng(seed)
    positions = sorted(rng.choice(len(manifest), size=min(n_samples, len(manifest)), replace=False).tolist())
    samples, failures = [], []
    for position in positions:
        try:
            samples.append((position, _as_gray_uint8(loader(position))))
        except Exception as error:  # a bad file must not stop the report: record it and go on
            path = manifest.frame["path"].iloc[position]
            log.warning("cannot load sample %s: %s", path, error)
            failures.append((path, getattr(error, "reason", None) or f"{type(error).__name__}: {error}"))
    return samples, pd.DataFrame(failures, columns=["path", "reason"])


def _as_gray_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"image loader must return uint8 HxW, got {image.dtype} {image.shape}")
    return image


def _thumbnail(image: np.ndarray, size: int = THUMBNAIL) -> np.ndarray:
    if max(image.shape) <= size:
        return image
    thumbnail = Image.fromarray(image)
    thumbnail.thumbnail((size, size), Image.Resampling.LANCZOS)
    return np.asarray(thumbnail)


def _sample_title(row: pd.Series, labels: list[str]) -> str:
    positives = [label for label in labels if row[label] == 1]
    if not positives:
        annotated = any(row[label] == 0 for label in labels)
        positives = ["no positive label"] if annotated else ["labels unknown"]
    view = f" · {row['view']}" if row["view"] else ""
    findings = textwrap.shorten(", ".join(positives), width=44, placeholder="…")
    return textwrap.fill(findings + view, width=30)


# ---------------------------------------------------------------- small helpers


def leaking_patients(manifest: Manifest) -> list[str]:
    """Ids of patients with images in more than one split (sorted); no split or no id is ignored."""
    frame = manifest.frame[(manifest.frame["split"] != "") & (manifest.frame["patient_id"] != "")]
    splits_per_patient = frame.groupby("patient_id")["split"].nunique()
    return sorted(splits_per_patient[splits_per_patient > 1].index)


def _by_split(manifest: Manifest) -> list[tuple[str, pd.DataFrame]]:
    frame = manifest.frame
    return [
        (_split_label(split), frame[frame["split"] == split])
        for split in SPLIT_ORDER
        if (frame["split"] == split).any()
    ]


def _split_label(split: str) -> str:
    return split or UNASSIGNED


def _plausible(ages: pd.Series) -> np.ndarray:
    values = ages.to_numpy(dtype=np.float64)
    low, high = PLAUSIBLE_AGE
    return values[(values >= low) & (values <= high)]


def _wide_range(counts: pd.DataFrame) -> bool:
    """Whether positive counts span more than two orders of magnitude (then a log axis reads better)."""
    values = counts.to_numpy(dtype=np.float64)
    values = values[values > 0]
    return bool(values.size) and values.max() / values.min() > 100


def _sources_text(manifest: Manifest, default: str = "an unnamed source") -> str:
    names = sorted(set(manifest.frame["source"].unique()) - {""})
    return ", ".join(names) if names else default


def _list_text(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _check_failures(failures: pd.DataFrame | None) -> pd.DataFrame:
    if failures is None:
        return pd.DataFrame(columns=["path", "reason"])
    missing = {"path", "reason"} - set(failures.columns)
    if missing:
        raise ValueError(f"failures table is missing column(s) {sorted(missing)} (needs 'path' and 'reason')")
    return failures[["path", "reason"]].astype(str)
