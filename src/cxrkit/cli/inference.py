"""``cxr export``, ``cxr predict`` and ``cxr serve``: bundle a run, predict on files, run the service."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cxrkit.cli.common import backend_option, out_option, threshold_options
from cxrkit.files import write_atomic


@click.command()
@click.argument(
    "run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@out_option("Bundle to write: a zip when it ends in .cxr or .zip, else a folder.", required=True)
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
@threshold_options("How thresholds are chosen on validation when the run has none.")
@click.option(
    "--quantize",
    is_flag=True,
    help="Add a static int8 ONNX graph if no finding's validation AUROC drops by more than --max-auroc-drop.",
)
@click.option("--max-auroc-drop", type=float, default=0.005, show_default=True)
@click.option("--opset", type=int, default=17, show_default=True)
@click.option(
    "--no-ood",
    "skip_ood",
    is_flag=True,
    help="Skip the out-of-distribution detector (fitted on training images, thresholded on validation).",
)
@click.option("--model-id", default=None, help="Model id (default: the run name).")
@click.option("--model-version", default=None, help="Model version (default: date and weights digest).")
def export(
    run_dirs: tuple[Path, ...],
    out: Path,
    fmt: str,
    checkpoint: str,
    thresholds_path: Path | None,
    threshold_method: str,
    quantize: bool,
    max_auroc_drop: float,
    opset: int,
    skip_ood: bool,
    model_id: str | None,
    model_version: str | None,
) -> None:
    """Bundle RUN_DIR (a `cxr train` output) for inference: weights, labels, thresholds, preprocessing.

    Several RUN_DIRs (seeds of one recipe) make one ensemble bundle and one graph averaging their logits,
    with thresholds chosen on the ensemble's validation scores."""
    from cxrkit.inference.export import export_run
    from cxrkit.models.ensemble import ensemble_runs

    common = {
        "checkpoint": checkpoint,
        "threshold_method": threshold_method,
        "onnx": fmt == "onnx" or quantize,
        "quantize": quantize,
        "max_auroc_drop": max_auroc_drop,
        "model_id": model_id,
        "version": model_version,
        "ood": not skip_ood,
    }
    if len(run_dirs) == 1:
        bundle = export_run(run_dirs[0], out, thresholds_path=thresholds_path, opset=opset, **common)
    elif thresholds_path is not None:
        raise click.UsageError("--thresholds applies to one run; an ensemble's are fitted on its validation")
    else:
        bundle = ensemble_runs(run_dirs, out, opset=opset, **common)
    click.echo(
        f"wrote {out}: {bundle.model_id} v{bundle.version}, {bundle.num_classes} labels, "
        f"thresholds: {bundle.threshold_source}"
        + (", ONNX" if bundle.onnx else "")
        + (", int8 ONNX" if bundle.onnx_int8 else "")
        + (f", OOD detector (threshold {bundle.ood.threshold:.3f})" if bundle.ood else "")
    )
    if bundle.quantization:
        report = bundle.quantization
        drops = ", ".join(f"{label} {drop:+.4f}" for label, drop in report["drops"].items())
        click.echo(
            f"int8 quantisation {'accepted' if report['accepted'] else 'rejected'}: validation AUROC drop "
            f"per finding {drops} (limit {report['max_drop']}); {report['speedup']:.2f}x fp32 ONNX speed; "
            f"served by default: {'yes' if bundle.int8_preferred else 'no'}"
        )


@click.command()
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.argument("inputs", nargs=-1, required=True)
@out_option("results.csv (one row per image) or results.json.", required=True, kind="file")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--workers", type=int, default=None, help="Decoding threads (default: one per core).")
@backend_option("auto uses ONNX Runtime when the bundle has a graph.")
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
    """Predict findings for INPUTS: image files (PNG/JPEG/DICOM), folders (searched recursively), glob
    patterns or CSV files of paths (column `path`, else the first column).

    A relative path inside a CSV is relative to the CSV file's folder, not to the current directory.
    Inputs that cannot be read are listed on stderr and left out of --out; when none can be predicted,
    the command fails and writes nothing.

    \b
    cxr predict model.cxr scans/ -o results.csv
    cxr predict model.cxr lists/batch1.csv -o results.json --backend onnx
    """
    from cxrkit.inference.predictor import Predictor, expand_inputs

    if out.suffix.lower() not in (".csv", ".json"):
        raise click.BadParameter("must end in .csv or .json", param_hint="--out")
    paths, problems = expand_inputs(inputs)
    predictor = Predictor.from_bundle(bundle, backend=backend, batch_size=batch_size, workers=workers)
    results = []
    try:
        for result in predictor.iter_predict(paths, heatmaps=heatmap_dir is not None, progress=True):
            results.append(result)
            if heatmap_dir is not None and result.ok:
                _write_heatmaps(predictor, result, heatmap_dir)
    except KeyboardInterrupt as stop:
        raise KeyboardInterrupt(f"{out} was not written") from stop
    problems += [(result.source, result.error) for result in results if not result.ok]
    predicted = [result for result in results if result.ok]
    if problems:
        click.echo(f"warning: {len(problems)} input(s) skipped:", err=True)
        for source, reason in problems:
            click.echo(f"  {source}: {reason}", err=True)
    if not predicted:
        raise click.ClickException(
            f"no image could be predicted ({len(problems)} input(s) skipped); nothing written"
        )
    _write_results(out, predictor, predicted, problems)
    flagged = sum(bool(result.ood_flag) for result in predicted)
    if flagged:
        click.echo(f"warning: {flagged} image(s) do not look like the training chest X-rays", err=True)
    click.echo(f"predicted {len(predicted)} image(s) with {predictor.backend}; wrote {out}")
    model = predictor.bundle
    click.echo(f"model {model.model_id} v{model.version}; thresholds: {model.threshold_source}")


def _write_results(out: Path, predictor, predicted: list, problems: list[tuple[str, str]]) -> None:
    """Write ``out`` (CSV or JSON) all at once: an interrupted or failed write leaves no partial file."""
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
        write_atomic(out, json.dumps(document, indent=2).encode())
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
        if predictor.ood is not None:
            row.update({"ood_score": result.ood_score, "ood_flag": result.ood_flag})
        rows.append(row)
    write_atomic(out, pd.DataFrame(rows).to_csv(index=False).encode())


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
@backend_option()
@click.option(
    "--decode-memory-mb",
    type=click.IntRange(min=16),
    default=512,
    show_default=True,
    help="Memory for uploads and decodes in flight (estimated from image headers); beyond it: 503.",
)
@click.option("--max-pixels", type=click.IntRange(min=1), default=8192 * 8192, show_default=True)
@click.option("--min-side", type=click.IntRange(min=0), default=64, show_default=True, help="Smaller: 422.")
@click.option("--max-aspect", type=click.FloatRange(min=1), default=4.0, show_default=True, help="More: 422.")
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Require 'Authorization: Bearer <token>' on /v1, the token in this file (else $CXR_SERVE_TOKEN).",
)
@click.option("--insecure-no-auth", is_flag=True, help="Allow a non-loopback --host without a token.")
@click.option("--log-filenames", is_flag=True, help="Log upload file names (they often carry patient names).")
def serve(
    bundle: Path,
    host: str,
    port: int,
    max_upload_mb: float,
    max_batch: int,
    backend: str,
    decode_memory_mb: int,
    max_pixels: int,
    min_side: int,
    max_aspect: float,
    token_file: Path | None,
    insecure_no_auth: bool,
    log_filenames: bool,
) -> None:
    """Serve BUNDLE over HTTP: POST /v1/predict, GET /v1/model, /healthz, /readyz, a web page at /."""
    from cxrkit.data.decode import Plausibility
    from cxrkit.inference.bundle import BundleError
    from cxrkit.serve.app import ServiceSettings
    from cxrkit.serve.app import serve as run_service
    from cxrkit.serve.auth import AuthConfigError, load_token

    try:
        settings = ServiceSettings(
            max_upload_bytes=int(max_upload_mb * 1024 * 1024),
            max_batch=max_batch,
            decode_memory_bytes=decode_memory_mb * 1024 * 1024,
            max_pixels=max_pixels,
            plausibility=Plausibility(min_side, max_aspect),
            token=load_token(token_file),
            log_filenames=log_filenames,
        )
        click.echo(f"serving {bundle} on http://{host}:{port}/ (docs at /docs)", err=True)
        run_service(bundle, host, port, settings, insecure_no_auth, backend=backend)
    except AuthConfigError as error:
        raise click.UsageError(str(error)) from error
    except (BundleError, ValueError, OSError) as error:
        raise click.ClickException(f"cannot serve {bundle}: {error}") from error
