"""Explain a trained run (or an exported bundle) on image files or on a split of its data.

>>> report = explain_run("runs/nih-lite0", split="test", method="gradcam++", top_k=3, limit=16)
>>> report = explain_run("runs/nih-lite0", ["a.png", "b.dcm"], findings=["Effusion", "Mass"])

Every image is decoded with :func:`cxrkit.data.decode.read_image` and preprocessed exactly as the run's cache
and evaluation transform do (:class:`~cxrkit.data.transforms.PreprocessSpec`), then explained with
:func:`cxrkit.explain.cam.explain` (each image's ``top_k`` most likely findings, or the named ``findings``).
The output folder gets, through :func:`cxrkit.explain.gallery.explain_files`, raw ``heatmaps/*.npy`` at
model-input resolution, ``overlays/*.png`` at the ORIGINAL image resolution, ``explanations.csv`` and the
gallery page ``report.html``.

Weakly supervised localisation: with a box table (``boxes``: an NIH ``BBox_List_2017*.csv``; by default the
one found in or next to the root of an NIH source of the run's data), the explained images that have boxes
are explained again for their boxed findings, whatever the predicted probability (Wang et al. 2017), into
``localization/``; boxes from the heatmaps are mapped to original pixels through the cache geometry and
scored as in :mod:`cxrkit.explain.localize` (both heatmap thresholds of the paper, IoBB/IoU accuracy and
average false positives, pointing game).
The Table-4-style tables go into the gallery page, ``localization.csv`` and ``pointing_game.csv``.

A split is explained on at most ``limit`` images: those with ground-truth boxes first, then those with a
positive finding, then the rest, each group in manifest order. Localisation scores every boxed image of the
split (the first ``limit`` of them when ``limit`` is given).
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from cxrkit.data.labels import canonical
from cxrkit.data.manifest import SPLITS
from cxrkit.explain.boxes import read_nih_boxes
from cxrkit.explain.cam import method_name
from cxrkit.explain.gallery import ExplainRun, explain_files, write_report
from cxrkit.inference.loading import LoadedModel, load_model
from cxrkit.inference.predictor import expand_inputs
from cxrkit.inference.runner import resolve_device

log = logging.getLogger(__name__)

EXPLAIN_DIR = "explain"
LOCALIZATION_DIR = "localization"
DEFAULT_LIMIT = 16
DEFAULT_TOP_K = 3
BOX_FILE_PATTERNS: tuple[str, ...] = ("BBox_List_2017*.csv", "BBox_List_2017*.csv.gz")


@dataclass
class RunExplanation:
    """What :func:`run_explanation` produced: the gallery run, the localisation run (images with boxes) and
    the inputs that named no image."""

    model: LoadedModel
    gallery: ExplainRun
    report: Path
    localization: ExplainRun | None = None
    box_file: Path | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def out_dir(self) -> Path:
        return self.gallery.out_dir


def explain_run(path: str | Path, images: Sequence[str | Path] = (), **options) -> Path:
    """:func:`run_explanation`, returning the gallery page (``report.html``)."""
    return run_explanation(path, images, **options).report


def run_explanation(
    path: str | Path,
    images: Sequence[str | Path] = (),
    *,
    split: str = "test",
    checkpoint: str = "best",
    method: str = "gradcam",
    findings: Sequence[str] | None = None,
    top_k: int | None = None,
    target_layer: str | None = None,
    limit: int | None = None,
    boxes: str | Path | None = "auto",
    out: str | Path | None = None,
    config: str | Path | DictConfig | None = None,
    batch_size: int = 8,
    device: str = "auto",
    progress: bool = True,
) -> RunExplanation:
    """Explain the run directory or bundle at ``path`` on ``images`` (files, folders, globs or CSVs of
    paths) or, without images, on up to ``limit`` (default 16) images of ``split``.

    ``findings``: label names explained in every image (default: each image's ``top_k`` most likely;
    ``top_k`` defaults to 3, or the number of labels when the model has fewer).
    ``boxes``: ``"auto"`` (look next to the NIH source), a box file, or None for no localisation scoring.
    """
    method = method_name(method)
    loaded = load_model(path, checkpoint, config)
    targets = resolve_findings(findings, loaded.labels)
    if top_k is None:
        top_k = min(DEFAULT_TOP_K, len(loaded.labels))
    if not 1 <= top_k <= len(loaded.labels):
        raise ValueError(f"top_k must be in 1..{len(loaded.labels)} (the model's outputs), got {top_k}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    box_file = find_box_file(loaded.config.data) if boxes == "auto" else boxes
    box_table = read_nih_boxes(box_file) if box_file is not None else None
    if images:
        paths, problems = expand_inputs([str(image) for image in images])
        paths = paths[:limit] if limit is not None else paths
        if not paths:
            raise ValueError(f"no image to explain: {'; '.join(f'{p}: {r}' for p, r in problems)}")
        where = "images"
    else:
        paths, problems = split_images(loaded, split, box_table, limit or DEFAULT_LIMIT), []
        where = split
    out_dir = Path(out) if out is not None else default_out_dir(loaded, f"{where}-{method}")
    loaded.model.to(resolve_device(device)).eval()
    common = {
        "preprocess": loaded.preprocess,
        "activation": loaded.activation,
        "method": method,
        "target_layer": target_layer,
        "batch_size": batch_size,
        "progress": progress,
    }
    gallery = explain_files(
        loaded.model, loaded.labels, paths, out_dir, targets=targets or "topk", k=top_k, **common
    )
    localization = None
    if box_table is not None:
        candidates = paths if images else split_images(loaded, split, box_table, limit)
        localization = _localize(loaded, candidates, box_table, out_dir, common)
    if localization is not None and localization.localization is not None:
        gallery.localization = localization.localization
        gallery.localization.overlap.to_csv(out_dir / "localization.csv", index=False)
        gallery.localization.pointing.to_csv(out_dir / "pointing_game.csv", index=False)
        gallery.thumbnails.extend(localization.thumbnails)
    if problems:
        gallery.failures.extend(problems)
        pd.DataFrame(gallery.failures, columns=["path", "reason"]).to_csv(
            out_dir / "failures.csv", index=False
        )
    report = write_report(gallery, title=f"Explanations of {loaded.name}")
    return RunExplanation(
        loaded, gallery, report, localization, Path(box_file) if box_file else None, list(problems)
    )


def _localize(
    loaded: LoadedModel, paths: Sequence[str], box_table: pd.DataFrame, out_dir: Path, common: dict
) -> ExplainRun | None:
    """Explain the images that have boxes for their boxed findings (those the model predicts) and score."""
    boxed = boxed_images(box_table, loaded.labels)
    selected = [path for path in paths if _file_name(path) in boxed]
    if not selected:
        log.info(
            "none of the %d explained images has a ground-truth box of a finding the model predicts",
            len(paths),
        )
        return None
    run = explain_files(
        loaded.model,
        loaded.labels,
        selected,
        out_dir / LOCALIZATION_DIR,
        targets="annotated",
        boxes=box_table,
        **common,
    )
    write_report(run, title=f"Weakly supervised localisation of {loaded.name}")
    return run


def resolve_findings(findings: Sequence[str] | None, labels: Sequence[str]) -> list[str] | None:
    """Canonical label names (``effusion`` -> ``Effusion``) checked against the model's outputs."""
    if not findings:
        return None
    names = [canonical(name.strip()) or name.strip() for name in findings if name.strip()]
    unknown = [name for name in names if name not in labels]
    if unknown:
        raise ValueError(f"unknown finding(s) {unknown}; the model predicts {list(labels)}")
    return list(dict.fromkeys(names))


def find_box_file(data_cfg) -> Path | None:
    """An NIH ``BBox_List_2017*.csv`` in, or next to, the root of an NIH source of ``data_cfg``."""
    for source in data_cfg.sources:
        if source.adapter != "nih" or not source.root:
            continue
        root = Path(source.root)
        for folder in (root, root.parent):
            for pattern in BOX_FILE_PATTERNS:
                matches = sorted(folder.glob(pattern)) if folder.is_dir() else []
                if matches:
                    log.info("ground-truth boxes: %s", matches[0])
                    return matches[0]
    return None


def split_images(
    loaded: LoadedModel, split: str, box_table: pd.DataFrame | None, limit: int | None = DEFAULT_LIMIT
) -> list[str]:
    """Up to ``limit`` (None: all) image paths of ``split``: boxed images first, then images with a positive
    finding."""
    frame = _split_frame(loaded, split)
    if frame.empty:
        raise ValueError(f"the data of {loaded.name} has no {split!r} images")
    names = frame["path"].astype(str).map(_file_name)
    boxed = names.isin(boxed_images(box_table, loaded.labels)).to_numpy()
    known = [label for label in loaded.labels if label in frame.columns]
    positive = (frame[known].fillna(0).to_numpy() > 0).any(axis=1) if known else np.zeros(len(frame), bool)
    order = np.lexsort((np.arange(len(frame)), ~positive, ~boxed))
    return frame["path"].astype(str).to_numpy()[order[:limit]].tolist()


def boxed_images(box_table: pd.DataFrame | None, labels: Sequence[str]) -> set[str]:
    """File names that have a ground-truth box of one of ``labels``."""
    if box_table is None:
        return set()
    return set(box_table.loc[box_table["finding"].isin(list(labels)), "image"])


def _split_frame(loaded: LoadedModel, split: str) -> pd.DataFrame:
    """Rows of ``split`` from the run's finished cache, else from its manifest (no images are decoded)."""
    from cxrkit.data.build import build_manifest, build_run_manifest
    from cxrkit.data.cache import CacheIncompleteError, open_cache

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if loaded.kind == "run":  # the splits the run stored, over the images on disk now
        frame = build_run_manifest(loaded.config.data, loaded.path).frame
        return frame[frame["split"].astype(str) == split].reset_index(drop=True)
    try:
        frame = open_cache(loaded.config.data.cache.dir).manifest.frame
    except (CacheIncompleteError, FileNotFoundError):
        frame = build_manifest(loaded.config.data).frame
    return frame[frame["split"].astype(str) == split].reset_index(drop=True)


def default_out_dir(loaded: LoadedModel, name: str) -> Path:
    if loaded.kind == "run":
        return loaded.path / EXPLAIN_DIR / name
    return loaded.path.parent / f"{loaded.path.stem}-{EXPLAIN_DIR}" / name


def _file_name(path: str) -> str:
    return posixpath.basename(str(path).replace("\\", "/"))
