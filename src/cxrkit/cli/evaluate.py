"""``cxr evaluate``, ``cxr compare``, ``cxr explain``: reports, paired comparisons and heatmaps of a run."""

from __future__ import annotations

from pathlib import Path

import click

from cxrkit.cli.common import (
    backend_option,
    checkpoint_option,
    data_split_option,
    device_option,
    out_option,
    replicates_option,
    split_option,
    temperature_option,
    threshold_options,
)

run_checkpoint_option = checkpoint_option("Which checkpoint of a run (ignored for a bundle).")
config_option = click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Config whose data section replaces the model's (e.g. another dataset); needed for a bundle "
    "without a training config in its provenance.",
)


@click.command("evaluate")
@click.argument("run_dir")
@split_option
@run_checkpoint_option
@threshold_options(
    "How operating points are chosen on the validation split.",
    "With --threshold-method sensitivity: the sensitivity to reach on validation.",
)
@replicates_option
@temperature_option("Temperature scaling fitted on validation (reported beside the raw calibration).")
@out_option(
    "Report folder (default: RUN_DIR/evaluation/<split>-<checkpoint>, plus -<method> for a "
    "threshold method other than youden).",
    kind="dir",
)
@config_option
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Images per forward pass (default: the run's data.loader.batch_size).",
)
@device_option
@backend_option(
    "For a bundle: the graph to score, at its own thresholds (auto: the one `cxr predict` serves)."
)
@click.option(
    "--data",
    default=None,
    help="External validation: a data config or a dataset folder (e.g. another site's class folders), "
    "scored at the model's own thresholds beside its internal test set; writes only under --out.",
)
@data_split_option("With --data: every image, or only the external dataset's test split.")
def evaluate(
    run_dir: str,
    split: str,
    checkpoint: str,
    threshold_method: str,
    target_sensitivity: float,
    replicates: int,
    temperature: str,
    out: Path | None,
    config_path: Path | None,
    batch_size: int | None,
    device: str,
    backend: str,
    data: str | None,
    data_split: str,
) -> None:
    """Evaluate a model on a split of its data: metrics with bootstrap intervals, report, thresholds.

    Operating points are chosen on the validation split only and saved to RUN_DIR/thresholds.json, where
    `cxr export` picks them up. The report (HTML, Markdown, JSON, CSV) and the per-image predictions
    (predictions.csv, for `cxr compare`) go to --out. RUN_DIR is a `cxr train` run directory or a
    `cxr export` bundle (folder, .cxr or .zip), evaluated at the thresholds it carries.

    \b
    cxr evaluate runs/nih-lite0
    cxr evaluate runs/nih-lite0 --threshold-method sensitivity --target-sensitivity 0.95
    cxr evaluate runs/pneumonia-lite0 --data ../shared/data/pneumonia/test
    """
    from cxrkit.evaluation.run import per_finding_lines, run_evaluation

    if data is not None:
        from cxrkit.evaluation.external import evaluate_external

        ext = evaluate_external(
            run_dir,
            data,
            scope=data_split,
            checkpoint=checkpoint,
            out=out,
            n_replicates=replicates,
            batch_size=batch_size,
            device=device,
            backend=backend,
        )
        click.echo("\n".join([*ext.summary_lines(), f"report: {ext.paths['html']}"]))
        return

    evaluation = run_evaluation(
        run_dir,
        split,
        checkpoint=checkpoint,
        threshold_method=threshold_method,
        target_sensitivity=target_sensitivity,
        n_replicates=replicates,
        temperature=temperature,
        out=out,
        config=config_path,
        batch_size=batch_size,
        device=device,
        backend=backend,
    )
    result = evaluation.result
    click.echo("")
    click.echo("\n".join(per_finding_lines(result)))
    click.echo("")
    click.echo(result.summary())
    click.echo(f"report: {evaluation.report}")
    click.echo(f"predictions: {evaluation.paths['predictions']}")
    if "run_thresholds" in evaluation.paths:
        click.echo(f"operating points for `cxr export`: {evaluation.paths['run_thresholds']}")


@click.command("compare")
@click.argument("run_a", type=click.Path(exists=True, path_type=Path))
@click.argument("run_b", type=click.Path(exists=True, path_type=Path))
@split_option
@run_checkpoint_option
@replicates_option
@out_option("Write comparison.csv, comparison.json and report.html here.", kind="dir")
def compare(run_a: Path, run_b: Path, split: str, checkpoint: str, replicates: int, out: Path | None) -> None:
    """Compare two evaluated models on the same images: paired patient bootstrap of AUROC (B minus A).

    RUN_A and RUN_B are run directories evaluated with `cxr evaluate` (their
    evaluation/<split>-<checkpoint>/predictions.csv), evaluation folders, or predictions CSV files.
    """
    from cxrkit.evaluation.run import compare_saved, comparison_display

    result, paths = compare_saved(
        run_a, run_b, split=split, checkpoint=checkpoint, n_replicates=replicates, out=out
    )
    click.echo(comparison_display(result).to_string(index=False))
    click.echo(result.summary())
    if paths:
        click.echo(f"report: {paths['html']}")


@click.command("explain")
@click.argument("run_dir")
@click.argument("images", nargs=-1)
@split_option
@run_checkpoint_option
@click.option(
    "--method",
    default="gradcam",
    show_default=True,
    help="CAM method: gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam, scorecam, "
    "ablationcam, fullgrad...",
)
@click.option(
    "--findings",
    default=None,
    help='Comma-separated findings explained in every image, e.g. "Effusion,Mass".',
)
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=None,
    help="Explain each image's K most likely findings (default 3; not with --findings).",
)
@click.option("--target-layer", default=None, help="Module to explain (default: chosen per architecture).")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="At most this many images (default: 16 of a split, all given IMAGES).",
)
@click.option(
    "--boxes",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="NIH BBox_List_2017.csv to score localisation (default: one next to the NIH data).",
)
@click.option("--no-boxes", is_flag=True, help="Do not look for ground-truth boxes.")
@out_option("Output folder (default: RUN_DIR/explain/<split or images>-<method>).", kind="dir")
@config_option
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@device_option
def explain(
    run_dir: str,
    images: tuple[str, ...],
    split: str,
    checkpoint: str,
    method: str,
    findings: str | None,
    top_k: int | None,
    target_layer: str | None,
    limit: int | None,
    boxes: Path | None,
    no_boxes: bool,
    out: Path | None,
    config_path: Path | None,
    batch_size: int,
    device: str,
) -> None:
    """Class activation maps of a model on IMAGES (files, folders, globs, CSVs of paths) or on a split.

    Writes heatmaps (.npy), overlays at the original resolution (.png), explanations.csv and a gallery page;
    with ground-truth boxes, scores weakly supervised localisation (Wang et al. 2017 Table 4, pointing game).
    RUN_DIR is a `cxr train` run directory or a `cxr export` bundle.

    \b
    cxr explain runs/nih-lite0 --split test --method gradcam++ --limit 32
    cxr explain runs/nih-lite0 scans/*.dcm --findings "Effusion,Mass"
    """
    from cxrkit.explain.cam import method_name
    from cxrkit.explain.run import run_explanation

    if findings and top_k is not None:
        raise click.UsageError("give either --findings or --top-k, not both")
    if boxes is not None and no_boxes:
        raise click.UsageError("give either --boxes or --no-boxes, not both")
    try:
        method_name(method)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--method") from error
    explanation = run_explanation(
        run_dir,
        images,
        split=split,
        checkpoint=checkpoint,
        method=method,
        findings=findings.split(",") if findings else None,
        top_k=top_k,
        target_layer=target_layer,
        limit=limit,
        boxes=None if no_boxes else boxes or "auto",
        out=out,
        config=config_path,
        batch_size=batch_size,
        device=device,
    )
    gallery = explanation.gallery
    click.echo(
        f"{gallery.records['image'].nunique() if len(gallery.records) else 0} images, "
        f"{len(gallery.records)} heatmaps ({gallery.method} on {gallery.target_layer})"
    )
    for path, reason in gallery.failures:
        click.echo(f"skipped {path}: {reason}", err=True)
    if gallery.localization is not None:
        click.echo(f"localisation against {explanation.box_file}:")
        click.echo(gallery.localization.table("IoBB").to_string(float_format="{:.3f}".format))
        click.echo(gallery.localization.pointing.to_string(index=False))
    click.echo(f"gallery: {explanation.report}")
