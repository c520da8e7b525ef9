"""`cxr explain` on a tiny real run trained for one epoch on NIH ChestX-ray14 images with NIH boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from configs import tiny_run_config
from cxrkit.cli.main import cli
from cxrkit.config import load_config
from cxrkit.data.cache import open_cache
from cxrkit.data.decode import read_image
from cxrkit.data.transforms import Geometry, InputGeometry
from cxrkit.explain.boxes import clip_boxes, read_nih_boxes
from cxrkit.explain.localize import BoxParams, heatmap_to_boxes
from cxrkit.explain.run import explain_run, find_box_file
from cxrkit.training.run import train

LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia"]
BOXED = ["00001369_000.png", "00002578_000.png", "00004296_000.png", "00015649_000.png"]
CROP = 96


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, nih_sample) -> Path:
    """A run trained for one epoch: four boxed official-test images (+2) as test, 18 others as train/val."""
    root = tmp_path_factory.mktemp("explain")
    entries = pd.read_csv(nih_sample / "Data_Entry_2017_subset.csv").sort_values("Image Index")
    test_names = set((nih_sample / "official_split" / "test_list.txt").read_text().split())
    others = entries[~entries["Image Index"].isin(test_names)].head(18)
    test = pd.concat(
        [
            entries[entries["Image Index"].isin(BOXED)],
            entries[entries["Image Index"].isin(test_names)].head(2),
        ]
    ).drop_duplicates()
    findings = pd.concat([test, others])["Finding Labels"].str.split("|")
    table = pd.DataFrame(
        {
            "path": [str(nih_sample / "images" / name) for name in pd.concat([test, others])["Image Index"]],
            "patient": pd.concat([test, others])["Patient ID"].astype(str).to_numpy(),
            "split": ["test"] * len(test) + ["val"] * 6 + ["train"] * (len(others) - 6),
            **{label: findings.apply(lambda f, label=label: int(label in f)).to_numpy() for label in LABELS},
        }
    )
    table.to_csv(root / "table.csv", index=False)
    table = {
        "adapter": "table",
        "root": str(root / "table.csv"),
        "options": {"label_columns": LABELS, "patient_column": "patient", "split_column": "split"},
    }
    spec = tiny_run_config(
        "explain-tiny",
        root / "run",
        [table],
        root / "cache",
        image_size=128,
        crop_size=CROP,
        batch_size=8,
        seed=3,
        data={"labels": LABELS},
    )
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return train(load_config(root / "spec.yaml"))


def invoke(*args: object) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def nih_boxes(nih_sample: Path) -> pd.DataFrame:
    return read_nih_boxes(nih_sample / "BBox_List_2017_subset.csv")


# ---- tests ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.shared_data
def test_explain_a_split_scores_localisation_against_nih_boxes(run_dir, nih_sample):
    box_file = nih_sample / "BBox_List_2017_subset.csv"
    output = invoke(
        "explain",
        run_dir,
        "--split",
        "test",
        "--limit",
        3,
        "--top-k",
        2,
        "--method",
        "gradcam++",
        "--boxes",
        box_file,
    )
    out = run_dir / "explain" / "test-gradcam++"
    assert f"gallery: {out / 'report.html'}" in output and "T(IoBB)=0.1 Acc." in output

    # the gallery: 3 images (boxed ones first), their 2 most likely findings each
    records = pd.read_csv(out / "explanations.csv")
    assert len(records) == 6 and set(records["image"]) <= set(BOXED) and records["image"].nunique() == 3
    for row in records.itertuples():
        with Image.open(out / row.overlay) as overlay:
            assert overlay.size == (1024, 1024)  # the original NIH resolution
        heatmap = np.load(out / row.heatmap)
        assert heatmap.shape == (CROP, CROP) and heatmap.dtype == np.float32
        assert heatmap.min() >= 0 and heatmap.max() <= 1

    # localisation: each image explained for its boxed finding, ground truth in original pixels
    boxes = nih_boxes(nih_sample)
    localised = pd.read_csv(out / "localization" / "explanations.csv")
    expected = boxes[boxes["image"].isin(records["image"])]
    assert sorted(zip(localised["image"], localised["label"], strict=True)) == sorted(
        zip(expected["image"], expected["finding"], strict=True)
    )
    assert any(json.loads(boxes) for boxes in localised["boxes"]), "no heatmap gave a box: vacuous check"
    cache = open_cache(run_dir.parent / "cache")
    frame = cache.manifest.frame
    for row in localised.itertuples():
        truth = expected[expected["image"] == row.image][["x0", "y0", "x1", "y1"]].to_numpy()
        np.testing.assert_allclose(json.loads(row.gt_boxes), np.round(truth, 1))
        # heatmap boxes map to original pixels through the geometry the cache stored for this image
        index = int(np.flatnonzero(frame["path"].str.endswith(row.image))[0])
        geometry = InputGeometry(Geometry.from_row(frame.iloc[index], cache.image_size), CROP, "resize")
        heatmap = np.load(out / "localization" / row.heatmap)
        mapped = geometry.to_original_boxes(heatmap_to_boxes(heatmap, BoxParams()).boxes)
        np.testing.assert_allclose(json.loads(row.boxes), np.round(clip_boxes(mapped, 1024, 1024), 1))

    scores = pd.read_csv(out / "localization.csv")
    assert set(scores["criterion"]) == {"IoBB", "IoU"}
    iobb_thresholds = scores.loc[scores["criterion"] == "IoBB", "threshold"].unique()
    assert sorted(iobb_thresholds) == [0.1, 0.25, 0.5, 0.75, 0.9]
    assert np.sort(scores["heatmap_threshold"].unique()) * 255 == pytest.approx([60, 180])  # Wang et al.
    assert set(scores["finding"]) == set(expected["finding"]) and scores["accuracy"].between(0, 1).all()
    assert set(pd.read_csv(out / "pointing_game.csv")["finding"]) == set(expected["finding"])
    html = (out / "report.html").read_text()
    assert "Weakly supervised localisation" in html and "T(IoBB)=0.5 Acc." in html
    assert (out / "localization" / "report.html").is_file()


@pytest.mark.slow
@pytest.mark.shared_data
def test_explain_image_files_at_their_own_resolution(run_dir, nih_sample, shared_data, tmp_path):
    wide = tmp_path / "wide_crop.png"  # a non-square image: letterboxed in the cache
    Image.fromarray(read_image(nih_sample / "images" / "00000211_000.png")[100:800]).save(wide)
    inputs = [
        nih_sample / "images" / "00001369_000.png",  # boxed: Cardiomegaly
        sorted((shared_data / "pneumonia" / "train" / "PNEUMONIA").glob("*.jpeg"))[0],
        shared_data / "dicom" / "siim_pneumothorax_sample.dcm",
        wide,
        tmp_path / "missing.png",
    ]
    out = tmp_path / "files"
    report = explain_run(
        run_dir,
        inputs,
        findings=["effusion", "Mass"],
        method="eigencam",
        boxes=nih_sample / "BBox_List_2017_subset.csv",
        out=out,
        progress=False,
    )
    assert report == out / "report.html" and report.is_file()

    records = pd.read_csv(out / "explanations.csv")
    assert len(records) == 8 and set(records["label"]) == {"Effusion", "Mass"}
    for path in inputs[:4]:
        rows = records[records["path"] == str(path)]
        assert len(rows) == 2, path
        height, width = read_image(path).shape
        with Image.open(out / rows["overlay"].iloc[0]) as overlay:
            assert overlay.size == (width, height), path
        for boxes in rows["boxes"]:
            for x0, y0, x1, y1 in json.loads(boxes):
                assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    failures = pd.read_csv(out / "failures.csv")
    assert str(tmp_path / "missing.png") in set(failures["path"])

    # the boxed NIH image is scored for its boxed finding, whatever findings the gallery shows
    localised = pd.read_csv(out / "localization" / "explanations.csv")
    assert list(zip(localised["image"], localised["label"], strict=True)) == [
        ("00001369_000.png", "Cardiomegaly")
    ]
    assert "Cardiomegaly" in pd.read_csv(out / "localization.csv")["finding"].tolist()


@pytest.mark.slow
@pytest.mark.shared_data
def test_explain_rejects_unknown_findings_and_missing_images(run_dir, tmp_path):
    result = CliRunner().invoke(cli, ["explain", str(run_dir), "--findings", "Effusion,Foo", "--no-boxes"])
    assert result.exit_code != 0 and "unknown finding(s) ['Foo']" in result.output
    result = CliRunner().invoke(cli, ["explain", str(run_dir), str(tmp_path / "none.png"), "--no-boxes"])
    assert result.exit_code != 0 and "no image to explain" in result.output and "none.png" in result.output


def test_explain_cli_errors_name_the_problem(tmp_path):
    result = CliRunner().invoke(cli, ["explain", str(tmp_path / "missing")])
    assert result.exit_code != 0 and "run directory or bundle not found" in result.output
    result = CliRunner().invoke(cli, ["explain", str(tmp_path), "--method", "magiccam"])
    assert result.exit_code != 0 and "unknown CAM method 'magiccam'" in result.output
    assert "gradcam++" in result.output  # the valid choices are listed
    result = CliRunner().invoke(cli, ["explain", str(tmp_path), "--findings", "Mass", "--top-k", "2"])
    assert result.exit_code != 0 and "either --findings or --top-k" in result.output


@pytest.mark.shared_data
def test_box_file_is_found_next_to_an_nih_source(nih_sample, tmp_path):
    nih = load_config(None, [f"data.sources=[{{adapter: nih, root: {nih_sample}}}]"]).data
    assert find_box_file(nih) == nih_sample / "BBox_List_2017_subset.csv"
    (tmp_path / "images").mkdir()
    (tmp_path / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
    beside = load_config(None, [f"data.sources=[{{adapter: nih, root: {tmp_path / 'images'}}}]"]).data
    assert find_box_file(beside) == tmp_path / "BBox_List_2017.csv"
    table = load_config(None, [f"data.sources=[{{adapter: table, root: {nih_sample}}}]"]).data
    assert find_box_file(table) is None
