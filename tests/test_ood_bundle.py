"""The out-of-distribution detector end to end: fitted at export, stored in the bundle, scored by the
Predictor (one forward pass, torch or ONNX), written by `cxr predict`, returned by /v1/predict, /v1/model."""

from __future__ import annotations

import dataclasses
import io
import json
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom.data
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from safetensors.numpy import save

from bundles import LABELS, pretrained_bundle, tiny_bundle
from cxrkit.cli.main import cli
from cxrkit.data.cache import open_cache
from cxrkit.data.decode import read_image
from cxrkit.inference.bundle import OOD_ARRAYS, OOD_META, Bundle, BundleError
from cxrkit.inference.export import ValidationData, add_ood, export_run
from cxrkit.inference.onnx_export import export_onnx
from cxrkit.inference.predictor import Predictor
from cxrkit.serve.app import ServiceSettings, create_app
from test_bundle import _table, make_run_dir


@pytest.fixture(scope="module")
def chest_paths(nih_sample: Path) -> list[Path]:
    return sorted((nih_sample / "images").glob("*.png"))


@pytest.fixture(scope="module")
def ood_bundle(chest_paths: list[Path]) -> Bundle:
    """The ImageNet-pretrained Lite0 bundle with a detector fitted through the export API on real chest
    X-rays: 40 images fit it, 20 others set the threshold (no chest X-ray training, real mechanics)."""
    bundle = pretrained_bundle()
    fit, val = _cache(bundle, chest_paths[:40]), _cache(bundle, chest_paths[40:60])
    data = ValidationData(val, np.zeros((len(val), len(LABELS))), np.array(["p"] * len(val)), fit[:4], fit)
    add_ood(bundle, bundle.build_model(), data)
    assert bundle.ood is not None
    return bundle


@pytest.fixture(scope="module")
def ct_file() -> str:
    return pydicom.data.get_testdata_file("CT_small.dcm")


@pytest.fixture(scope="module")
def text_png() -> bytes:
    """A rendered page of text: certainly not a chest X-ray."""
    image = Image.new("L", (256, 256), 255)
    draw = ImageDraw.Draw(image)
    for line in range(10):
        draw.text((10, 10 + 22 * line), "The quick brown fox jumps", fill=0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _cache(bundle: Bundle, paths: list[Path]) -> np.ndarray:
    return np.stack([bundle.preprocess.cache_image(read_image(path))[0] for path in paths])


def test_export_writes_the_detector_member_and_reloads_it(tmp_path: Path, nih_sample: Path) -> None:
    table = tmp_path / "table.csv"
    _table(nih_sample).to_csv(table, index=False)
    run_dir, _ = make_run_dir(tmp_path, table)
    thresholds = tmp_path / "t.json"
    thresholds.write_text(json.dumps(dict.fromkeys(LABELS, 0.5)))
    bundle = export_run(run_dir, tmp_path / "m.cxr", thresholds_path=thresholds, ood_quantile=0.99)
    splits = open_cache(tmp_path / "cache").manifest.frame["split"]  # the run's cache, as export reads it
    assert bundle.ood is not None and bundle.ood.quantile == 0.99
    assert bundle.ood.n_fit == (splits == "train").sum() > 2
    assert bundle.ood.n_calibration == (splits == "val").sum() > 2
    with zipfile.ZipFile(tmp_path / "m.cxr") as archive:
        assert {OOD_ARRAYS, OOD_META} <= set(archive.namelist())
        manifest = json.loads(archive.read("bundle.json"))
    assert {OOD_ARRAYS, OOD_META} <= set(manifest["files"])  # checksummed like every member
    loaded = Bundle.load(tmp_path / "m.cxr")
    assert loaded.ood is not None and loaded.ood.threshold == bundle.ood.threshold
    np.testing.assert_array_equal(loaded.ood.bank, bundle.ood.bank)

    skipped = CliRunner().invoke(
        cli,
        [
            "export",
            str(run_dir),
            "-o",
            str(tmp_path / "plain.cxr"),
            "--thresholds",
            str(thresholds),
            "--no-ood",
        ],
    )
    assert skipped.exit_code == 0, skipped.output
    assert Bundle.load(tmp_path / "plain.cxr").ood is None


def test_tampered_or_half_detector_is_refused(ood_bundle: Bundle, tmp_path: Path) -> None:
    folder = ood_bundle.save(tmp_path / "folder")
    (folder / OOD_META).write_text(json.dumps({"format": "x"}))
    with pytest.raises(BundleError, match="corrupt"):
        Bundle.load(folder)
    half = dataclasses.replace(ood_bundle, ood=None).save(tmp_path / "half")
    (half / OOD_META).write_bytes(ood_bundle.ood.to_bytes()[1])
    with pytest.raises(BundleError, match="not listed"):
        Bundle.load(half)


class _MahalanobisDetector:
    """What bundles of an earlier cxrkit stored: a Gaussian's mean and precision."""

    def to_bytes(self) -> tuple[bytes, bytes]:
        arrays = save({"mean": np.zeros(8), "precision": np.eye(8)})
        return arrays, json.dumps({"format": "cxrkit-ood-mahalanobis/1", "threshold": 3.0}).encode()


def test_bundle_with_an_earlier_detector_loads_without_it_and_says_so(
    ood_bundle: Bundle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = dataclasses.replace(ood_bundle, ood=_MahalanobisDetector()).save(tmp_path / "old.cxr")
    loaded = Bundle.load(path)
    assert loaded.ood is None and loaded.thresholds == ood_bundle.thresholds
    assert "cxrkit-ood-mahalanobis/1" in caplog.text and "re-exported" in caplog.text


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_predictor_flags_images_that_are_not_chest_x_rays(
    ood_bundle: Bundle, chest_paths: list[Path], ct_file: str, text_png: bytes, backend: str
) -> None:
    predictor = Predictor(ood_bundle, backend=backend)
    held_out = [str(path) for path in chest_paths[60:63]]
    results = predictor.predict([ct_file, text_png, *held_out])
    threshold = ood_bundle.ood.threshold
    for result in results:
        assert result.ok and result.ood_score is not None
        assert result.ood_flag == (result.ood_score > threshold)
        assert result.to_record()["ood_flag"] == result.ood_flag
    ct, text, chest = results[0], results[1], results[2]
    assert ct.ood_flag and text.ood_flag
    assert not chest.ood_flag and chest.ood_score < ct.ood_score


def test_onnx_features_output_matches_torch_and_old_graphs_fall_back(
    ood_bundle: Bundle, chest_paths: list[Path], ct_file: str
) -> None:
    inputs = [ct_file, str(chest_paths[60])]
    eager = [r.ood_score for r in Predictor(ood_bundle, backend="torch").predict(inputs)]
    graph = [r.ood_score for r in Predictor(ood_bundle, backend="onnx").predict(inputs)]
    np.testing.assert_allclose(graph, eager, rtol=1e-4, atol=1e-5)
    with tempfile.TemporaryDirectory() as folder:  # a graph exported before the features output existed
        logits_only = export_onnx(
            ood_bundle.build_model(), Path(folder) / "m.onnx", ood_bundle.preprocess.crop_size
        ).read_bytes()
    old_graph = dataclasses.replace(ood_bundle, onnx=logits_only)
    fallback = [r.ood_score for r in Predictor(old_graph, backend="onnx").predict(inputs)]
    np.testing.assert_allclose(fallback, eager, rtol=1e-4, atol=1e-5)


def test_bundle_without_detector_reports_no_score(ct_file: str) -> None:
    result = Predictor(tiny_bundle(onnx=False)).predict([ct_file])[0]
    assert result.ok and result.ood_score is None and result.ood_flag is None
    assert "ood_score" not in result.to_record()


def test_cxr_predict_writes_ood_columns(
    ood_bundle: Bundle, chest_paths: list[Path], ct_file: str, tmp_path: Path
):
    path = ood_bundle.save(tmp_path / "m.cxr")
    out = tmp_path / "results.csv"
    result = CliRunner().invoke(cli, ["predict", str(path), ct_file, str(chest_paths[60]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out).set_index("path")
    assert frame.loc[ct_file, "ood_flag"] and not frame.loc[str(chest_paths[60]), "ood_flag"]
    assert (frame["ood_flag"] == (frame["ood_score"] > ood_bundle.ood.threshold)).all()
    plain = tiny_bundle(onnx=False).save(tmp_path / "plain.cxr")
    result = CliRunner().invoke(cli, ["predict", str(plain), ct_file, "-o", str(tmp_path / "plain.csv")])
    assert result.exit_code == 0, result.output
    assert "ood_score" not in pd.read_csv(tmp_path / "plain.csv").columns


def _client(bundle_path: Path) -> TestClient:
    return TestClient(create_app(bundle_path, ServiceSettings(max_upload_bytes=8 << 20)))


def _ready(client: TestClient) -> None:
    deadline = time.monotonic() + 120
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.05)


def test_service_returns_the_ood_check(
    ood_bundle: Bundle, chest_paths: list[Path], ct_file: str, text_png: bytes, tmp_path: Path
) -> None:
    path = ood_bundle.save(tmp_path / "m.cxr")
    with _client(path) as client:
        _ready(client)
        card = client.get("/v1/model").json()
        assert card["ood"]["threshold"] == pytest.approx(ood_bundle.ood.threshold)
        assert card["ood"]["quantile"] == ood_bundle.ood.quantile
        uploads = {
            "ct.dcm": (Path(ct_file).read_bytes(), "application/dicom"),
            "text.png": (text_png, "image/png"),
            "chest.png": (chest_paths[60].read_bytes(), "image/png"),
        }
        checks = {}
        for name, (data, kind) in uploads.items():
            response = client.post("/v1/predict", files={"file": (name, data, kind)})
            assert response.status_code == 200, response.text
            checks[name] = response.json()["ood"]
    for check in checks.values():
        assert check["threshold"] == pytest.approx(ood_bundle.ood.threshold)
        assert check["flagged"] == (check["score"] > check["threshold"])
    assert (
        checks["ct.dcm"]["flagged"] and checks["text.png"]["flagged"] and not checks["chest.png"]["flagged"]
    )


def test_service_without_detector_returns_null(ct_file: str, tmp_path: Path) -> None:
    path = tiny_bundle().save(tmp_path / "plain.cxr")
    with _client(path) as client:
        _ready(client)
        assert client.get("/v1/model").json()["ood"] is None
        response = client.post(
            "/v1/predict", files={"file": ("ct.dcm", Path(ct_file).read_bytes(), "application/dicom")}
        )
        assert response.status_code == 200 and response.json()["ood"] is None


def test_page_shows_the_warning_when_flagged() -> None:
    from cxrkit.serve.app import STATIC_DIR

    page, script = (STATIC_DIR / "index.html").read_text(), (STATIC_DIR / "app.js").read_text()
    assert 'id="ood-warning"' in page and "hidden" in page.split('id="ood-warning"')[1].split(">")[0]
    assert "this does not look like a chest X-ray the model was trained on" in script
    assert "showOodWarning(result.ood)" in script
