"""Predictor and `cxr predict`: real PNG/JPEG/DICOM inputs, a corrupt file skipped, training-identical
preprocessing, heatmaps, CSV/JSON output."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from bundles import LABELS, tiny_bundle
from cxrkit.cli.main import cli
from cxrkit.data.cache import open_cache, prepare_cache
from cxrkit.data.decode import read_image
from cxrkit.data.manifest import Manifest
from cxrkit.inference.predictor import Predictor, expand_inputs


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle().save(tmp_path_factory.mktemp("bundle") / "tiny.cxr")


@pytest.fixture(scope="module")
def predictor(bundle_path: Path) -> Predictor:
    return Predictor.from_bundle(bundle_path, batch_size=3)


@pytest.fixture(scope="module")
def real_files(shared_data: Path) -> list[Path]:
    return [
        shared_data / "nih" / "images" / "00000002_000.png",
        shared_data / "nih" / "images" / "00001369_000.png",  # RGBA
        sorted((shared_data / "pneumonia" / "train" / "PNEUMONIA").glob("*.jpeg"))[0],
        shared_data / "dicom" / "siim_pneumothorax_sample.dcm",
        shared_data / "dicom" / "synthetic_monochrome1_variant.dcm",
    ]


@pytest.fixture(scope="module")
def with_corrupt(real_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("inputs")
    corrupt = folder / "truncated.png"
    corrupt.write_bytes(real_files[0].read_bytes()[:3000])
    return [*real_files[:2], corrupt, *real_files[2:]]


def test_predicts_real_files_and_reports_the_corrupt_one(
    predictor: Predictor, with_corrupt: list[Path]
) -> None:
    results = predictor.predict(with_corrupt)
    assert [r.source for r in results] == [str(p) for p in with_corrupt]
    bad = results[2]
    assert not bad.ok and "truncated" in bad.error and bad.probabilities == {}
    for result in results[:2] + results[3:]:
        assert result.ok, result.error
        assert set(result.probabilities) == set(LABELS)
        assert all(0.0 < p < 1.0 for p in result.probabilities.values())
        assert "Effusion" in result.findings and "Atelectasis" not in result.findings
        assert result.findings == sorted(result.findings, key=lambda label: -result.probabilities[label])
    assert (results[0].height, results[0].width) == (1024, 1024)
    assert (results[3].height, results[3].width) == (224, 224)  # pneumonia JPEG


def test_probabilities_match_the_network_on_training_preprocessing(
    predictor: Predictor, real_files: list[Path], tmp_path: Path
) -> None:
    """The predictor's input is the training cache image put through the evaluation transform."""
    manifest = Manifest(
        pd.DataFrame(
            {
                "path": [str(p) for p in real_files],
                "patient_id": [f"p{i}" for i in range(len(real_files))],
                "study_id": "",
                "view": "",
                "sex": "",
                "age": np.nan,
                "split": "val",
                "source": "test",
            }
        ),
        [],
    )
    prepare_cache(
        manifest, tmp_path / "cache", image_size=80, resize_policy="letterbox", workers=1, progress=False
    )
    cache = open_cache(tmp_path / "cache")
    prepared = [predictor.prepare(path, str(path)) for path in real_files]
    for index, item in enumerate(prepared):
        assert np.array_equal(item.cache_image, cache.image(index))
    from cxrkit.data.augment import eval_transform

    batch = eval_transform(
        torch.from_numpy(cache.images(range(len(real_files)))).float().div(255)[:, None], 64
    )
    with torch.no_grad():
        expected = torch.sigmoid(predictor.torch_model(batch)).double().numpy()
    got = np.array([[r.probabilities[label] for label in LABELS] for r in predictor.predict(real_files)])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_onnx_and_torch_backends_agree(bundle_path: Path, real_files: list[Path]) -> None:
    onnx = Predictor.from_bundle(bundle_path, backend="auto")
    eager = Predictor.from_bundle(bundle_path, backend="torch")
    assert onnx.backend == "onnx" and eager.backend == "torch"
    for a, b in zip(onnx.predict(real_files), eager.predict(real_files), strict=True):
        for label in LABELS:
            assert a.probabilities[label] == pytest.approx(b.probabilities[label], abs=1e-5)


def test_arrays_are_accepted(predictor: Predictor, real_files: list[Path]) -> None:
    gray = read_image(real_files[0])
    gray[0, :2] = (0, 255)  # full range: min-max scaling of the 16-bit copy gives back the same image
    rgb = np.repeat(gray[..., None], 3, axis=2)
    sixteen = gray.astype(np.uint16) * 257
    results = predictor.predict([gray, rgb, sixteen, np.zeros((3, 4, 5))])
    assert [r.source for r in results] == ["array[0]", "array[1]", "array[2]", "array[3]"]
    assert results[1].probabilities == pytest.approx(results[0].probabilities, abs=1e-6)
    assert results[2].probabilities == pytest.approx(results[0].probabilities, abs=1e-6)
    assert not results[3].ok and "shape" in results[3].error


def test_heatmaps_cover_the_original_image(bundle_path: Path, real_files: list[Path]) -> None:
    predictor = Predictor.from_bundle(bundle_path, backend="torch")
    jpeg = real_files[2]
    positive, chosen = (
        predictor.predict([jpeg], heatmaps=True)[0],
        predictor.predict([jpeg], ["Atelectasis"])[0],
    )
    assert set(positive.heatmaps) == set(positive.findings) and "Effusion" in positive.heatmaps
    assert list(chosen.heatmaps) == ["Atelectasis"]
    heatmap = positive.heatmaps["Effusion"]
    assert heatmap.shape == (224, 224) and heatmap.dtype == np.float32
    assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0 and heatmap.max() > 0.1
    with pytest.raises(ValueError, match="unknown labels"):
        predictor.predict([jpeg], heatmaps=["Nodule"])


def test_bytes_and_file_objects_predict_like_their_paths(
    predictor: Predictor, real_files: list[Path]
) -> None:
    """Uploads need no file: encoded bytes and binary streams go through the same core as paths; a DICOM
    without its preamble marker is read when its name says .dcm."""
    png, dicom = real_files[0], real_files[3]
    with dicom.open("rb") as stream:
        inputs = [png.read_bytes(), io.BytesIO(png.read_bytes()), stream, dicom.read_bytes()]
        results = predictor.predict(inputs)
        reference = predictor.predict([png, dicom])
    assert [r.source for r in results] == ["bytes[0]", "stream[1]", str(dicom), "bytes[3]"]
    for result, expected in zip(
        results, [reference[0], reference[0], reference[1], reference[1]], strict=True
    ):
        assert result.ok, result.error
        assert result.probabilities == pytest.approx(expected.probabilities, abs=1e-12)
    headless = dicom.read_bytes()[132:]  # no 128-byte preamble and DICM marker
    prepared = predictor.prepare(headless, "upload.dcm")
    assert prepared.error is None and np.array_equal(
        prepared.cache_image, predictor.prepare(dicom, "f").cache_image
    )
    assert predictor.prepare(headless, "upload.png").error is not None


def test_heatmap_mapping_inverts_the_letterbox(predictor: Predictor) -> None:
    """A map that is 1 everywhere on the model input covers exactly the image, not the padding."""
    wide = np.full((100, 200), 128, dtype=np.uint8)
    _, geometry = predictor.preprocess(wide)
    mapped = predictor.heatmap_to_image(np.ones((64, 64), dtype=np.float32), geometry)
    assert mapped.shape == (100, 200)
    assert mapped[5:-5, 5:-5].min() > 0.99
    half = predictor.heatmap_to_image(np.ones((64, 64), dtype=np.float32), geometry, out_shape=(50, 100))
    assert half.shape == (50, 100)


def test_expand_inputs(real_files: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(real_files[0], folder / "a.png")
    shutil.copy(real_files[3], folder / "nested" / "b.dcm")
    (folder / "notes.txt").write_text("x")
    table = tmp_path / "list.csv"
    pd.DataFrame({"path": ["images/a.png", str(real_files[2])]}).to_csv(table, index=False)
    paths, problems = expand_inputs(
        [
            str(folder),
            str(tmp_path / "images" / "*.png"),
            str(table),
            str(tmp_path / "missing.png"),
            str(tmp_path / "*.jpeg"),
        ]
    )
    assert paths == [
        str(folder / "a.png"),
        str(folder / "nested" / "b.dcm"),
        str(folder / "a.png"),
        str(tmp_path / "images" / "a.png"),
        str(real_files[2]),
    ]
    assert [reason for _, reason in problems] == ["no such file or folder", "no file matches the pattern"]


def test_cli_predict_csv_and_json(bundle_path: Path, with_corrupt: list[Path], tmp_path: Path) -> None:
    runner = CliRunner()
    csv_out, json_out = tmp_path / "results.csv", tmp_path / "results.json"
    inputs = [str(p) for p in with_corrupt]
    result = runner.invoke(cli, ["predict", str(bundle_path), *inputs, "--out", str(csv_out)])
    assert result.exit_code == 0, result.output
    assert "1 input(s) skipped" in result.output and "truncated.png" in result.output
    table = pd.read_csv(csv_out)
    assert len(table) == len(with_corrupt) - 1 and "truncated.png" not in " ".join(table["path"])
    assert {f"prob:{label}" for label in LABELS} <= set(table.columns)
    assert (table["pred:Effusion"] == 1).all() and (table["pred:Atelectasis"] == 0).all()
    assert table["findings"].str.contains("Effusion").all()

    result = runner.invoke(cli, ["predict", str(bundle_path), *inputs, "--out", str(json_out)])
    assert result.exit_code == 0, result.output
    document = json.loads(json_out.read_text())
    assert document["model"] == {"id": "tiny", "version": "1.0", "runtime": "onnx"}
    assert len(document["predictions"]) == len(with_corrupt) - 1
    assert document["errors"][0]["source"].endswith("truncated.png")


def test_cli_predict_writes_heatmaps(bundle_path: Path, real_files: list[Path], tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    result = CliRunner().invoke(
        cli,
        [
            "predict",
            str(bundle_path),
            str(real_files[3]),
            "--out",
            str(tmp_path / "r.json"),
            "--heatmaps",
            str(maps),
        ],
    )
    assert result.exit_code == 0, result.output
    flagged = json.loads((tmp_path / "r.json").read_text())["predictions"][0]["findings"]
    written = sorted(path.name for path in maps.iterdir())
    assert written == sorted(f"{real_files[3].stem}_{label}.png" for label in flagged)
    from PIL import Image

    with Image.open(maps / written[0]) as overlay:
        assert overlay.mode == "RGB" and overlay.size == (1024, 1024)


def test_cli_predict_fails_when_nothing_is_predictable(
    bundle_path: Path, with_corrupt: list[Path], tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "predict",
            str(bundle_path),
            str(with_corrupt[2]),
            str(tmp_path / "x.png"),
            "--out",
            str(tmp_path / "r.csv"),
        ],
    )
    assert result.exit_code != 0
    assert "no image could be predicted" in result.output and "no such file" in result.output
