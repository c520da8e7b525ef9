"""Explain image files end to end: heatmaps, overlays at original resolution, boxes, scores, a gallery page.

>>> run = explain_files(model, labels, paths, "runs/x/explain", preprocess=bundle.preprocess)
>>> write_report(run)                      # runs/x/explain/report.html (+ report.md)

Each image goes through the training preprocessing of a :class:`~cxrkit.data.transforms.PreprocessSpec`
(:func:`cxrkit.inference.runner.prepare_image`: decode and cache resize; then the evaluation transform), then
:func:`cxrkit.explain.cam.explain`; maps and boxes return to the original image through
:class:`~cxrkit.data.transforms.InputGeometry`.
For every (image, explained label) ``out_dir`` gets:

* ``heatmaps/<image>__<label>.npy``: the raw float32 map at model-input resolution, values in [0, 1];
* ``overlays/<image>__<label>.png``: the map resampled through the resize geometry onto the ORIGINAL image at
  its original resolution, with the boxes drawn from the map (white) and ground-truth boxes (green);
* a row of ``explanations.csv``: probability, boxes and heatmap peak in original pixel coordinates, and the
  overlap with the ground truth when a box table is given.

``targets="annotated"`` explains each image for the findings it has ground-truth boxes for (the protocol of
Wang et al. 2017); localisation is then scored with :func:`cxrkit.explain.localize.score_localization`.
Unreadable files are skipped and listed in ``failures.csv``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from torch import nn
from tqdm.auto import tqdm

from cxrkit.data.transforms import InputGeometry, PreprocessSpec
from cxrkit.explain.boxes import boxes_to_image, group_boxes, iobb, iou
from cxrkit.explain.cam import CLASS_AGNOSTIC, explain
from cxrkit.explain.localize import (
    BoxParams,
    LocalizationCase,
    LocalizationScores,
    boxes_per_threshold,
    heatmap_peak,
    original_boxes,
    point_in_boxes,
    score_localization,
)
from cxrkit.inference.predictor import blend_heatmap
from cxrkit.inference.runner import prepare_image
from cxrkit.reporting.html import Report

TargetSpec = Literal["topk", "annotated"] | Sequence[str]
PRED_COLOUR = (255, 255, 255)
GT_COLOUR = (0, 230, 64)
THUMBNAIL_SIDE = 320


@dataclass
class ExplainRun:
    """What :func:`explain_files` produced (files are under ``out_dir``)."""

    out_dir: Path
    method: str
    target_layer: str
    records: pd.DataFrame
    failures: list[tuple[str, str]]
    localization: LocalizationScores | None = None
    thumbnails: list[tuple[str, np.ndarray]] = field(default_factory=list)


@dataclass
class _Item:
    path: str
    name: str
    stem: str
    targets: list[int] | None  # None: top-k


@dataclass
class _Prepared:
    item: _Item
    image: np.ndarray
    geometry: InputGeometry
    cache_image: np.ndarray


_RECORD_COLUMNS = (
    "image", "path", "label", "rank", "probability", "heatmap", "overlay", "boxes", "peak_x", "peak_y",
    "gt_boxes", "best_iou", "best_iobb", "pointing_hit",
)  # fmt: skip


@dataclass
class _Collector:
    """Rows, scored cases and gallery thumbnails gathered while explaining."""

    max_thumbnails: int
    rows: list[dict] = field(default_factory=list)
    cases: list[LocalizationCase] = field(default_factory=list)
    thumbnails: list[tuple[str, np.ndarray]] = field(default_factory=list)

    def add(self, row: dict, case: LocalizationCase | None, overlay: np.ndarray) -> None:
        self.rows.append(row)
        if case is not None:
            self.cases.append(case)
        if len(self.thumbnails) < self.max_thumbnails:
            title = f"{row['image']} · {row['label']} ({row['probability']:.2f})"
            self.thumbnails.append((title, _thumbnail(overlay)))


def explain_files(
    model: nn.Module,
    labels: Sequence[str],
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    preprocess: PreprocessSpec,
    activation: str = "sigmoid",
    targets: TargetSpec = "topk",
    k: int = 3,
    method: str = "gradcam",
    target_layer: str | None = None,
    boxes: pd.DataFrame | None = None,
    box_params: BoxParams | None = None,
    batch_size: int = 8,
    max_thumbnails: int = 48,
    progress: bool = True,
) -> ExplainRun:
    """Explain every file of ``paths`` and write heatmaps, overlays and ``explanations.csv`` to ``out_dir``.

    ``labels`` names the model outputs in order; ``activation`` (the model's) turns logits into probabilities.
    ``targets``: ``"topk"`` (each image's ``k`` most likely findings), label names explained in every image,
    or ``"annotated"`` (each image's findings in ``boxes``, a :func:`cxrkit.explain.boxes.read_nih_boxes`
    table matched on the file name). With ``boxes``, every explained (image, label) that has ground truth is
    scored (``run.localization``). ``box_params``: how
    heatmaps become boxes (:class:`~cxrkit.explain.localize.BoxParams`).
    """
    labels, out_dir, box_params = list(labels), Path(out_dir), box_params or BoxParams()
    failures: list[tuple[str, str]] = []
    items = _plan_items(labels, [str(p) for p in paths], targets, boxes, failures)
    truth = group_boxes(boxes) if boxes is not None else {}
    for sub in ("heatmaps", "overlays"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    collected = _Collector(max_thumbnails)
    method_name, layer_name = method, ""
    for batch in tqdm(list(_chunks(items, batch_size)), desc=f"explain ({method})", disable=not progress):
        prepared = _prepare_batch(batch, preprocess, failures)
        if not prepared:
            continue
        images = torch.from_numpy(preprocess.model_input(np.stack([p.cache_image for p in prepared])))
        wanted = "topk" if prepared[0].item.targets is None else [p.item.targets for p in prepared]
        result = explain(
            model, images, wanted, method=method, k=k, target_layer=target_layer, activation=activation
        )
        method_name, layer_name = result.method, result.target_layer
        for index, entry in enumerate(prepared):
            for slot, label_index in enumerate(result.targets[index].tolist()):
                label = labels[label_index]
                heatmap = result.heatmaps[index, slot].numpy()
                probability = float(result.probabilities[index, slot])
                gt_boxes = truth.get((entry.item.name, label))
                collected.add(
                    *_explain_one(entry, label, slot, probability, heatmap, gt_boxes, box_params, out_dir)
                )
    records = pd.DataFrame(collected.rows, columns=list(_RECORD_COLUMNS))
    localization = score_localization(collected.cases) if collected.cases else None
    run = ExplainRun(out_dir, method_name, layer_name, records, failures, localization, collected.thumbnails)
    _write_tables(run)
    return run


def _write_tables(run: ExplainRun) -> None:
    run.records.to_csv(run.out_dir / "explanations.csv", index=False)
    pd.DataFrame(run.failures, columns=["path", "reason"]).to_csv(run.out_dir / "failures.csv", index=False)
    if run.localization is not None:
        run.localization.overlap.to_csv(run.out_dir / "localization.csv", index=False)
        run.localization.pointing.to_csv(run.out_dir / "pointing_game.csv", index=False)


def _plan_items(
    labels: list[str],
    paths: list[str],
    targets: TargetSpec,
    boxes: pd.DataFrame | None,
    failures: list[tuple[str, str]],
) -> list[_Item]:
    stems = _unique_stems(paths)
    if isinstance(targets, str) and targets == "topk":
        return [_Item(path, Path(path).name, stem, None) for path, stem in zip(paths, stems, strict=True)]
    if isinstance(targets, str) and targets == "annotated":
        if boxes is None:
            raise ValueError("targets='annotated' needs a ground-truth box table (boxes=read_nih_boxes(...))")
        items = []
        for path, stem in zip(paths, stems, strict=True):
            name = Path(path).name
            findings = sorted(set(boxes.loc[boxes["image"] == name, "finding"]))
            if not findings:
                failures.append((path, "no ground-truth box for this image"))
            for finding in findings:
                if finding in labels:
                    items.append(_Item(path, name, stem, [labels.index(finding)]))
                else:
                    failures.append((path, f"boxed finding {finding!r} is not a model output"))
        return items
    if isinstance(targets, str):
        raise ValueError(f"targets must be 'topk', 'annotated' or a list of label names, got {targets!r}")
    unknown = [label for label in targets if label not in labels]
    if unknown or not targets:
        raise ValueError(f"unknown target labels {unknown}; the model predicts {labels}")
    indices = [labels.index(label) for label in targets]
    return [_Item(path, Path(path).name, stem, indices) for path, stem in zip(paths, stems, strict=True)]


def _unique_stems(paths: list[str]) -> list[str]:
    """File stems made safe for file names, with ``_2``, ``_3``... where two paths share one."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        stem = _slug(Path(path).stem)
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "image"


def _chunks(items: list[_Item], size: int) -> Iterator[list[_Item]]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _prepare_batch(
    batch: list[_Item], spec: PreprocessSpec, failures: list[tuple[str, str]]
) -> list[_Prepared]:
    prepared = []
    for item in batch:
        entry = prepare_image(item.path, item.path, spec, keep_image=True)
        if entry.error is not None:
            failures.append((item.path, entry.error))
            continue
        assert entry.image is not None and entry.cache_image is not None and entry.geometry is not None
        geometry = spec.input_geometry(entry.geometry)
        prepared.append(_Prepared(item, entry.image, geometry, entry.cache_image))
    return prepared


def _explain_one(
    entry: _Prepared,
    label: str,
    rank: int,
    probability: float,
    heatmap: np.ndarray,
    gt_boxes: np.ndarray | None,
    box_params: BoxParams,
    out_dir: Path,
) -> tuple[dict, LocalizationCase | None, np.ndarray]:
    geometry = entry.geometry
    base = f"{entry.item.stem}__{_slug(label)}"
    heatmap_file, overlay_file = f"heatmaps/{base}.npy", f"overlays/{base}.png"
    np.save(out_dir / heatmap_file, heatmap.astype(np.float32))
    pred_boxes = original_boxes(heatmap, geometry, entry.image.shape, box_params)
    gt_boxes = None if gt_boxes is None else boxes_to_image(gt_boxes, entry.image.shape)
    peak = heatmap_peak(heatmap)
    peak = geometry.to_original_point(peak) if peak is not None else None
    blended = blend_heatmap(entry.image, geometry.heatmap_to_original(heatmap))
    overlay = draw_boxes(blended, pred_boxes, gt_boxes)
    Image.fromarray(overlay).save(out_dir / overlay_file, compress_level=3)
    row = {
        "image": entry.item.name,
        "path": entry.item.path,
        "label": label,
        "rank": rank + 1,
        "probability": probability,
        "heatmap": heatmap_file,
        "overlay": overlay_file,
        "boxes": json.dumps(np.round(pred_boxes, 1).tolist()),
        "peak_x": peak[0] if peak else math.nan,
        "peak_y": peak[1] if peak else math.nan,
        "gt_boxes": "",
        "best_iou": math.nan,
        "best_iobb": math.nan,
        "pointing_hit": None,
    }
    if gt_boxes is None:
        return row, None, overlay
    row["gt_boxes"] = json.dumps(np.round(gt_boxes, 1).tolist())
    if len(pred_boxes):
        row["best_iou"] = float(iou(pred_boxes, gt_boxes).max())
        row["best_iobb"] = float(iobb(pred_boxes, gt_boxes).max())
    row["pointing_hit"] = point_in_boxes(peak, gt_boxes)
    scored = boxes_per_threshold(heatmap, geometry, entry.image.shape, box_params)
    return row, LocalizationCase(entry.item.name, label, gt_boxes, scored, peak), overlay


def draw_boxes(rgb: np.ndarray, pred_boxes: np.ndarray, gt_boxes: np.ndarray | None = None) -> np.ndarray:
    """Draw predicted (white) and ground-truth (green) xyxy boxes on an RGB uint8 image."""
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(rgb.shape[:2]) / 400))
    for boxes, colour in ((pred_boxes, PRED_COLOUR), (gt_boxes, GT_COLOUR)):
        for x0, y0, x1, y1 in [] if boxes is None else boxes:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=width)
    return np.asarray(image)


def _thumbnail(rgb: np.ndarray) -> np.ndarray:
    image = Image.fromarray(rgb)
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    return np.asarray(image)


def overlay_grid(tiles: Sequence[tuple[str, np.ndarray]], ncols: int = 4, tile_inches: float = 2.6) -> Figure:
    """RGB overlay thumbnails in a grid, each titled."""
    if not tiles:
        raise ValueError("overlay_grid needs at least one tile")
    ncols = max(1, min(ncols, len(tiles)))
    nrows = math.ceil(len(tiles) / ncols)
    fig = Figure(figsize=(tile_inches * ncols, (tile_inches + 0.4) * nrows), layout="constrained")
    for index, ax in enumerate(fig.subplots(nrows, ncols, squeeze=False).flat):
        ax.set_axis_off()
        if index < len(tiles):
            title, tile = tiles[index]
            ax.imshow(tile, interpolation="lanczos")
            ax.set_title(title, fontsize=7)
    return fig


def write_report(run: ExplainRun, title: str = "Explanations", tiles_per_figure: int = 24) -> Path:
    """The gallery page ``report.html`` (and ``report.md``) in ``run.out_dir``; returns its path."""
    report = Report(title, subtitle=f"{run.method} on {run.target_layer}")
    n_images = run.records["image"].nunique() if len(run.records) else 0
    report.paragraph(
        f"{n_images} images, {len(run.records)} heatmaps ({run.method}, target layer {run.target_layer}). "
        "Overlays are at the original image resolution: white boxes come from the heatmap, green boxes "
        "are ground truth. Raw heatmaps (.npy, model-input resolution) and overlays are in heatmaps/ and "
        "overlays/; every row is in explanations.csv."
    )
    if run.method in CLASS_AGNOSTIC:
        report.callout(
            f"{run.method} does not depend on the label: every label of an image gets one map.", "info"
        )
    if run.failures:
        report.callout(f"{len(run.failures)} inputs were skipped (see failures.csv).", "warning")
    if run.localization is not None:
        _localization_section(report, run.localization)
    if run.thumbnails:
        report.heading("Gallery")
        for page, start in enumerate(range(0, len(run.thumbnails), tiles_per_figure)):
            tiles = run.thumbnails[start : start + tiles_per_figure]
            report.figure(overlay_grid(tiles), f"gallery_{page + 1:02d}")
    if len(run.records):
        report.heading("Heatmaps")
        columns = ["image", "label", "rank", "probability", "overlay", "best_iou", "best_iobb"]
        report.table(run.records[[*columns, "pointing_hit"]], float_format="{:.3f}")
    if run.failures:
        report.heading("Skipped inputs")
        report.table(pd.DataFrame(run.failures, columns=["path", "reason"]))
    return report.write(run.out_dir)


def _localization_section(report: Report, scores: LocalizationScores) -> None:
    report.heading("Weakly supervised localisation")
    report.paragraph(
        "Wang et al. 2017 (ChestX-ray8) Table 4 protocol: an image is correctly localised when at least "
        "one box from the heatmap of the finding has IoBB (intersection over the detected box area) or IoU "
        "with a ground-truth box above T; AFP counts the other boxes per image. Pointing game: the heatmap "
        "maximum falls inside a ground-truth box."
    )
    for criterion in ("IoBB", "IoU"):
        report.table(
            scores.table(criterion), f"Accuracy and AFP at T({criterion})", index=True, float_format="{:.3f}"
        )
    report.table(scores.pointing, "Pointing game", float_format="{:.3f}")
