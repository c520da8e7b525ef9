"""``cxr export``, ``cxr predict`` and ``cxr serve``: bundle a run, predict on files, run the service."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Bundle to write: a zip when it ends in .cxr or .zip, else a folder.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "onnx"]),
    default="safetensors",
    show_default=True,
    help="onnx adds an ONNX graph (dynamic batch) used for inference.",
)
@click.option(
    "--checkpoint",
    default="best",
    show_default=True,
    help="best, last, or a checkpoint path inside or outside the run.",
)
@click.option(
    "--thresholds",
    "thresholds_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Operating thresholds JSON (cxrkit thresholds file or {label: value}).",
)
@click.option(
    "--threshold-method",
    type=click.Choice(["youden", "f1", "sensitivity"]),
    default="youden",
    show_default=True,
    help="How thresholds are chosen on validation when the run has none.",
)
@click.option(
    "--quantize",
    is_flag=True,
    help="Add an int8 ONNX graph if validation AUROC drops by less than --max-auroc-drop.",
)
@click.option("--max-auroc-drop", type=float, default=0.005, show_default=True)
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--model-id", default=None, help="Model id (default: the run name).")
@click.option("--model-version", default=None, help="Model version (default: date and weights digest).")
def export(
    run_dir: Path,
    out: Path,
    fmt: str,
    checkpoint: str,
    thresholds_path: Path | None,
    threshold_method: str,
    quantize: bool,
    max_auroc_drop: float,
    opset: int,
    model_id: str | None,
    model_version: str | None,
) -> None:
    """Bundle RUN_DIR (a `cxr train` output) for inference: weights, labels, thresholds, preprocessing."""
    from cxrkit.inference.bundle import BundleError, export_run

    try:
        bundle = export_run(
            run_dir,
            out,
            checkpoint=checkpoint,
            thresholds_path=thresholds_path,
            threshold_method=threshold_method,
            onnx=fmt == "onnx" or quantize,
            quantize=quantize,
            max_auroc_drop=max_auroc_drop,
            opset=opset,
            model_id=model_id,
            version=model_version,
        )
    except (BundleError, FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(
        f"wrote {out}: {bundle.model_id} v{bundle.version}, {bundle.num_classes} labels, "
        f"thresholds: {bundle.threshold_source}"
        + (", ONNX" if bundle.onnx else "")
        + (", int8 ONNX" if bundle.onnx_int8 else "")
    )
    if bundle.quantization:
        report = bundle.quantization
        click.echo(
            f"int8 quantisation {'accepted' if report['accepted'] else 'rejected'}: validation AUROC "
            f"{report['auroc_fp32']:.4f} -> {report['auroc_int8']:.4f} (drop {report['drop']:.4f}, "
            f"limit {report['max_drop']})"
        )


@click.command()
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="results.csv (one row per image) or results.json.",
)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--workers", type=int, default=None, help="Decoding threads (default: one per core).")
@click.option(
    "--backend",
    type=click.Choice(["auto", "onnx", "onnx-int8", "torch"]),
    default="auto",
    show_default=True,
    help="auto uses ONNX Runtime when the bundle has a graph.",
)
@click.option(
    "--heatmaps",
    "heatmap_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write a Grad-CAM overlay PNG per positive finding into this folder.",
)
def predict(
    bundle: Path,
    inputs: tuple[str, ...],
    out: Path,
    batch_size: int,
    workers: int | None,
    backend: str,
    heatmap_dir: Path | None,
) -> None:
    """Predict findings for INPUTS: image files (PNG/JPEG/DICOM), folders, glob patterns or CSVs of paths."""
    from cxrkit.inference.bundle import BundleError
    from cxrkit.inference.predictor import Predictor, expand_inputs

    if out.suffix.lower() not in (".csv", ".json"):
        raise click.BadParameter("must end in .csv or .json", param_hint="--out")
    paths, problems = expand_inputs(inputs)
    try:
        predictor = Predictor.from_bundle(bundle, backend=backend, batch_size=batch_size, workers=workers)
    except (BundleError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    results = []
    for result in predictor.iter_predict(paths, heatmaps=heatmap_dir is not None, progress=True):
        results.append(result)
        if heatmap_dir is not None and result.ok:
            _write_heatmaps(predictor, result, heatmap_dir)
    problems += [(result.source, result.error) for result in results if not result.ok]
    predicted = [result for result in results if result.ok]
    _write_results(out, predictor, predicted, problems)
    click.echo(f"predicted {len(predicted)} image(s) with {predictor.backend}; wrote {out}")
    if problems:
        click.echo(f"warning: {len(problems)} input(s) skipped:", err=True)
        for source, reason in problems:
            click.echo(f"  {source}: {reason}", err=True)
    if not predicted:
        raise click.ClickException("no image could be predicted")


def _write_results(out: Path, predictor, predicted: list, problems: list[tuple[str, str]]) -> None:
    import pandas as pd

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        document = {
            "model": {
                "id": predictor.bundle.model_id,
                "version": predictor.bundle.version,
                "runtime": predictor.backend,
            },
            "labels": predictor.labels,
            "thresholds": predictor.thresholds,
            "predictions": [result.to_record() for result in predicted],
            "errors": [{"source": source, "error": reason} for source, reason in problems],
        }
        out.write_text(json.dumps(document, indent=2))
        return
    rows = []
    for result in predicted:
        row = {
            "path": result.source,
            "height": result.height,
            "width": result.width,
            "findings": "|".join(result.findings),
        }
        row.update({f"prob:{label}": result.probabilities[label] for label in predictor.labels})
        row.update({f"pred:{label}": int(label in result.findings) for label in predictor.labels})
        rows.append(row)
    pd.DataFrame(rows).to_csv(out, index=False)


def _write_heatmaps(predictor, result, folder: Path) -> None:
    from cxrkit.inference.predictor import blend_heatmap, png_bytes

    if not result.heatmaps:
        return
    folder.mkdir(parents=True, exist_ok=True)
    image = predictor.decode(result.source)
    stem = Path(result.source).stem
    for label, heatmap in result.heatmaps.items():
        name = f"{stem}_{label.replace(' ', '_').replace('/', '-')}.png"
        (folder / name).write_bytes(png_bytes(blend_heatmap(image, heatmap)))


@click.command()
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--max-upload-mb", type=float, default=32.0, show_default=True, help="Largest accepted upload.")
@click.option("--max-batch", type=int, default=16, show_default=True, help="Largest micro-batch.")
@click.option(
    "--backend", type=click.Choice(["auto", "onnx", "onnx-int8", "torch"]), default="auto", show_default=True
)
def serve(bundle: Path, host: str, port: int, max_upload_mb: float, max_batch: int, backend: str) -> None:
    """Serve BUNDLE over HTTP: POST /v1/predict, GET /v1/model, /healthz, /readyz, a web page at /."""
    from cxrkit.serve.app import ServiceSettings
    from cxrkit.serve.app import serve as run_service

    settings = ServiceSettings(max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_batch=max_batch)
    click.echo(f"serving {bundle} on http://{host}:{port}/ (docs at /docs)", err=True)
    run_service(bundle, host=host, port=port, settings=settings, backend=backend)
