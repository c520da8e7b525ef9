"""Boxes, heatmap → box extraction, localisation scoring (Wang et al. 2017 Table 4) and coordinate mapping."""

from __future__ import annotations

import importlib.resources

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrkit.data.decode import read_image
from cxrkit.data.transforms import Geometry, InputGeometry, PreprocessSpec
from cxrkit.explain.boxes import boxes_to_image, clip_boxes, iobb, iou, read_nih_boxes, xywh_to_xyxy
from cxrkit.explain.localize import (
    WANG_HEATMAP_THRESHOLDS,
    WANG_OVERLAP_THRESHOLDS,
    BoxParams,
    LocalizationCase,
    boxes_per_threshold,
    heatmap_peak,
    heatmap_to_boxes,
    overlap_outcome,
    point_in_boxes,
    score_localization,
)

# ----------------------------------------------------------------------------------------- box overlap


def test_iou_and_iobb_of_hand_made_boxes():
    gt = [[0, 0, 10, 10]]
    half_overlap = [5, 0, 15, 10]  # intersection 50, union 150, predicted area 100
    inside = [2, 2, 4, 4]  # 4 px inside the 100 px ground truth
    around = [-10, -10, 20, 20]  # 900 px containing the ground truth
    disjoint = [20, 20, 30, 30]
    pred = [half_overlap, inside, around, disjoint]
    np.testing.assert_allclose(iou(pred, gt)[:, 0], [1 / 3, 0.04, 100 / 900, 0.0])
    np.testing.assert_allclose(iobb(pred, gt)[:, 0], [0.5, 1.0, 100 / 900, 0.0])


def test_overlap_matrices_are_pairwise_and_safe_for_empty_boxes():
    pred = [[0, 0, 10, 10], [3, 3, 3, 8]]  # the second has zero area
    gt = [[0, 0, 10, 10], [0, 0, 5, 10]]
    np.testing.assert_allclose(iou(pred, gt), [[1.0, 0.5], [0.0, 0.0]])
    np.testing.assert_allclose(iobb(pred, gt), [[1.0, 0.5], [0.0, 0.0]])
    assert iou(np.zeros((0, 4)), gt).shape == (0, 2)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        iou([[1, 2, 3]], gt)


def test_clip_boxes_drops_boxes_outside_the_image():
    boxes = [[-5, -5, 10, 10], [90, 10, 120, 20], [200, 0, 220, 5]]
    np.testing.assert_allclose(clip_boxes(boxes, height=50, width=100), [[0, 0, 10, 10], [90, 10, 100, 20]])


# ----------------------------------------------------------------------------------------- NIH box file


def test_read_nih_boxes_subset(nih_sample):
    table = read_nih_boxes(nih_sample / "BBox_List_2017_subset.csv")
    assert len(table) == 12
    assert list(table.columns) == ["image", "finding", "x0", "y0", "x1", "y1"]
    assert "Infiltrate" not in set(table["finding"])
    infiltration = table[table["finding"] == "Infiltration"].iloc[0]
    assert infiltration["image"] == "00026911_000.png"
    first = table.iloc[0]  # 00004296_000.png,Atelectasis,731.428571428571,753.100529100529,119.19...,93.18...
    np.testing.assert_allclose(
        first[["x0", "y0", "x1", "y1"]].to_numpy(float),
        [
            731.428571428571,
            753.100529100529,
            731.428571428571 + 119.195767195767,
            753.100529100529 + 93.189417989418,
        ],
    )
    assert ((table[["x0", "y0", "x1", "y1"]] >= 0) & (table[["x0", "y0", "x1", "y1"]] <= 1024)).all().all()


def test_read_full_nih_box_file_from_torchxrayvision():
    pytest.importorskip("torchxrayvision")
    path = importlib.resources.files("torchxrayvision") / "data" / "BBox_List_2017.csv.gz"
    table = read_nih_boxes(str(path))
    assert len(table) == 984
    assert sorted(table["finding"].unique()) == [
        "Atelectasis",
        "Cardiomegaly",
        "Effusion",
        "Infiltration",
        "Mass",
        "Nodule",
        "Pneumonia",
        "Pneumothorax",
    ]


def test_read_nih_boxes_names_bad_files(tmp_path):
    header = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
    missing = tmp_path / "missing.csv"
    missing.write_text("Image Index,Finding Label,x,y\na.png,Mass,1,2\n")
    with pytest.raises(ValueError, match=r"missing\.csv.*missing column"):
        read_nih_boxes(missing)
    bad_box = tmp_path / "bad_box.csv"
    bad_box.write_text(header + "a.png,Mass,10,10,abc,5\n")
    with pytest.raises(ValueError, match=r"bad_box\.csv: row 2"):
        read_nih_boxes(bad_box)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text(header + "a.png,Broken Heart,10,10,5,5\n")
    with pytest.raises(ValueError, match="Broken Heart"):
        read_nih_boxes(unknown)
    with pytest.raises(FileNotFoundError):
        read_nih_boxes(tmp_path / "absent.csv")


# ----------------------------------------------------------------------------------------- heatmap → boxes


def _blobs() -> np.ndarray:
    heatmap = np.zeros((64, 64))
    heatmap[10:20, 5:25] = 1.0  # rows 10..19, columns 5..24: box (5, 10, 25, 20)
    heatmap[40:50, 40:44] = 0.6  # a weaker blob: box (40, 40, 44, 50)
    heatmap[60, 60] = 0.55  # a single-pixel speck
    return heatmap


def test_heatmap_to_boxes_finds_one_box_per_component():
    found = heatmap_to_boxes(_blobs(), BoxParams(threshold=0.5))
    np.testing.assert_array_equal(found.boxes, [[5, 10, 25, 20], [40, 40, 44, 50], [60, 60, 61, 61]])
    np.testing.assert_allclose(found.scores, [1.0, 0.6, 0.55])


def test_heatmap_to_boxes_threshold_min_area_and_max_boxes():
    assert len(heatmap_to_boxes(_blobs(), BoxParams(threshold=0.7)).boxes) == 1
    no_speck = heatmap_to_boxes(_blobs(), BoxParams(threshold=0.5, min_area=2 / 64**2))
    np.testing.assert_array_equal(no_speck.boxes, [[5, 10, 25, 20], [40, 40, 44, 50]])
    np.testing.assert_array_equal(heatmap_to_boxes(_blobs(), BoxParams(max_boxes=1)).boxes, [[5, 10, 25, 20]])


def test_heatmap_to_boxes_connectivity():
    diagonal = np.zeros((8, 8))
    diagonal[2, 2] = diagonal[3, 3] = 1.0
    assert len(heatmap_to_boxes(diagonal, BoxParams(connectivity=2)).boxes) == 1
    assert len(heatmap_to_boxes(diagonal, BoxParams(connectivity=1)).boxes) == 2


def test_heatmap_to_boxes_of_blank_or_bad_maps():
    assert heatmap_to_boxes(np.zeros((16, 16))).boxes.shape == (0, 4)
    with pytest.raises(ValueError, match="2-D"):
        heatmap_to_boxes(np.zeros((1, 16, 16)))
    with pytest.raises(ValueError, match="threshold"):
        BoxParams(threshold=0.0)


# ----------------------------------------------------------------------------------------- pointing game


def test_heatmap_peak_and_pointing_game():
    heatmap = _blobs()
    peak = heatmap_peak(heatmap)
    assert peak == (5.5, 10.5)  # first maximum pixel (row 10, column 5), at its centre
    assert point_in_boxes(peak, [[5, 10, 25, 20]])
    assert not point_in_boxes(peak, [[40, 40, 44, 50]])
    assert point_in_boxes(peak, [[6, 11, 8, 12]], tolerance=1.0)
    assert heatmap_peak(np.full((8, 8), 0.3)) is None
    assert not point_in_boxes(None, [[0, 0, 8, 8]])


# ----------------------------------------------------------------------------------------- scoring


def test_overlap_outcome_counts_hits_and_false_positives():
    gt = np.array([[0, 0, 10, 10]])
    pred = np.array([[5, 0, 15, 10], [50, 50, 60, 60]])  # IoU 1/3 & IoBB 0.5 with gt; a far false positive
    assert overlap_outcome(pred, gt, "IoU", 0.25) == (True, 1)
    assert overlap_outcome(pred, gt, "IoU", 0.5) == (False, 2)
    assert overlap_outcome(pred, gt, "IoBB", 0.25) == (True, 1)
    assert overlap_outcome(pred, gt, "IoBB", 0.5) == (False, 2)  # strict ">" as in the paper
    assert overlap_outcome(np.zeros((0, 4)), gt, "IoU", 0.1) == (False, 0)


def _case(image: str, finding: str, gt: np.ndarray, pred: np.ndarray, peak) -> LocalizationCase:
    return LocalizationCase(image, finding, gt, {0.5: pred}, peak)


def test_score_localization_matches_hand_counts():
    gt = np.array([[0.0, 0.0, 100.0, 100.0]])
    cases = [
        # exact box: correct at every T, peak inside
        _case("a.png", "Mass", gt, gt.copy(), (50.0, 50.0)),
        # a small box inside (IoU 0.04, IoBB 1) plus a far false positive; peak outside
        _case("b.png", "Mass", gt, np.array([[10, 10, 30, 30], [300, 300, 400, 400.0]]), (350.0, 350.0)),
        # no prediction at all, flat map
        _case("c.png", "Nodule", gt, np.zeros((0, 4)), None),
    ]
    scores = score_localization(cases)
    overlap = scores.overlap.set_index(["finding", "criterion", "threshold"])
    assert overlap.loc[("Mass", "IoU", 0.1), "accuracy"] == 0.5
    assert overlap.loc[("Mass", "IoU", 0.1), "afp"] == 1.0  # b: both boxes are false positives at IoU
    assert overlap.loc[("Mass", "IoBB", 0.9), "accuracy"] == 1.0
    assert overlap.loc[("Mass", "IoBB", 0.9), "afp"] == 0.5  # b: only the far box
    assert overlap.loc[("Nodule", "IoBB", 0.1), "accuracy"] == 0.0
    assert overlap.loc[("Nodule", "IoBB", 0.1), "afp"] == 0.0
    assert (overlap["n_images"].loc["Mass"] == 2).all()
    pointing = scores.pointing.set_index("finding")
    assert pointing.loc["Mass", "hit_rate"] == 0.5 and pointing.loc["Nodule", "hit_rate"] == 0.0

    table = scores.table("IoBB")
    assert list(table.index[:2]) == ["T(IoBB)=0.1 Acc.", "T(IoBB)=0.1 AFP"]
    assert len(table) == 10 and list(table.columns) == ["Mass", "Nodule", "Mean"]
    assert table.loc["T(IoBB)=0.9 Acc.", "Mean"] == pytest.approx(0.5)
    assert scores.table("IoU").loc["T(IoU)=0.5 Acc.", "Mass"] == 0.5
    with pytest.raises(ValueError, match="no localisation cases"):
        score_localization([])


def test_default_thresholds_are_the_papers():
    """Wang et al. 2017: heatmaps thresholded at 60 and 180 of 255; T(IoBB) 0.1..0.9, T(IoU) 0.1..0.7."""
    assert np.allclose(np.array(WANG_HEATMAP_THRESHOLDS) * 255, [60, 180])
    assert WANG_OVERLAP_THRESHOLDS["IoBB"] == (0.1, 0.25, 0.5, 0.75, 0.9)
    assert WANG_OVERLAP_THRESHOLDS["IoU"] == pytest.approx((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7))
    gt = np.array([[0.0, 0.0, 100.0, 100.0]])
    scores = score_localization([_case("a.png", "Mass", gt, gt, None)])
    assert sorted(scores.table("IoU").index)[:1] == ["T(IoU)=0.1 AFP"] and len(scores.table("IoU")) == 14


def test_both_heatmap_thresholds_are_scored_as_separate_detections():
    heatmap = np.zeros((64, 64))
    heatmap[10:30, 10:30] = 0.4  # a broad region above 60/255 only
    heatmap[18:22, 18:22] = 1.0  # its core, above 180/255
    geometry = InputGeometry.fit(1024, 1024, 64, "stretch", 64, "resize")
    boxes = boxes_per_threshold(heatmap, geometry, (1024, 1024))
    low, high = WANG_HEATMAP_THRESHOLDS
    np.testing.assert_allclose(boxes[low], [[160, 160, 480, 480]])
    np.testing.assert_allclose(boxes[high], [[288, 288, 352, 352]])
    gt = np.array([[160.0, 160.0, 480.0, 480.0]])
    scores = score_localization([LocalizationCase("a.png", "Mass", gt, boxes, (320.0, 320.0))])
    iou_half = scores.overlap.set_index(["heatmap_threshold", "criterion", "threshold"])["accuracy"]
    assert iou_half[(low, "IoU", 0.5)] == 1.0 and iou_half[(high, "IoU", 0.5)] == 0.0  # 64² box in 320²
    assert iou_half[(high, "IoBB", 0.9)] == 1.0
    table = scores.table("IoU")
    assert (
        "heatmap 60/255: T(IoU)=0.5 Acc." in table.index and "heatmap 180/255: T(IoU)=0.5 Acc." in table.index
    )


def test_box_threshold_is_a_share_of_the_min_max_range():
    heatmap = _blobs() * 0.5 + 0.5  # the same map on [0.5, 1]: the paper normalises it first
    np.testing.assert_array_equal(
        heatmap_to_boxes(heatmap, BoxParams(threshold=0.7)).boxes,
        heatmap_to_boxes(_blobs(), BoxParams(threshold=0.7)).boxes,
    )
    assert heatmap_to_boxes(np.full((8, 8), 0.3)).boxes.shape == (0, 4)


# ----------------------------------------------------------------------------------------- coordinate mapping


@pytest.mark.parametrize(
    ("height", "width", "policy", "mode"),
    [
        (1024, 1024, "letterbox", "center_crop"),
        (900, 1200, "letterbox", "resize"),
        (1200, 900, "crop", "center_crop"),
        (700, 1000, "stretch", "resize"),
    ],
)
def test_box_mapping_round_trips(height, width, policy, mode):
    geometry = InputGeometry.fit(height, width, 256, policy, 224, mode)
    boxes = np.array([[100.5, 200.25, 400.0, 500.75], [0.0, 0.0, 30.0, 40.0]])
    np.testing.assert_allclose(geometry.to_original_boxes(geometry.to_input_boxes(boxes)), boxes, atol=1e-9)


def test_box_mapping_agrees_with_the_cache_geometry():
    cache = Geometry.fit(900, 1200, 256, "letterbox")
    box_xywh = (300.0, 150.0, 240.0, 120.0)
    in_cache = cache.to_cache_box(*box_xywh)  # (x, y, w, h) in the 256² cache image
    centre_crop = InputGeometry(cache, 224, "center_crop")
    offset = (256 - 224) // 2
    expected = xywh_to_xyxy([in_cache])[0] - offset
    np.testing.assert_allclose(centre_crop.to_input_boxes(xywh_to_xyxy([box_xywh]))[0], expected)
    resized = InputGeometry(cache, 128, "resize")
    np.testing.assert_allclose(
        resized.to_input_boxes(xywh_to_xyxy([box_xywh]))[0], xywh_to_xyxy([in_cache])[0] / 2
    )


def _nih_box(nih_sample, finding: str) -> tuple[np.ndarray, np.ndarray]:
    table = read_nih_boxes(nih_sample / "BBox_List_2017_subset.csv")
    row = table[table["finding"] == finding].iloc[0]
    image = read_image(nih_sample / "images" / row["image"])
    return image, row[["x0", "y0", "x1", "y1"]].to_numpy(np.float64)[None]


def _paint(box: np.ndarray, size: int) -> np.ndarray:
    """A heatmap that is 1 on the pixels whose centres fall inside ``box`` (model-input coordinates)."""
    centres = np.arange(size) + 0.5
    inside_x = (centres >= box[0]) & (centres <= box[2])
    inside_y = (centres >= box[1]) & (centres <= box[3])
    return (inside_y[:, None] & inside_x[None, :]).astype(np.float32)


@pytest.mark.parametrize(
    ("image_size", "crop_size", "eval_mode"), [(256, 224, "center_crop"), (256, 224, "resize")]
)
def test_real_nih_box_maps_to_model_space_and_back(nih_sample, image_size, crop_size, eval_mode):
    image, gt = _nih_box(nih_sample, "Cardiomegaly")
    assert image.shape == (1024, 1024)
    spec = PreprocessSpec(image_size, "letterbox", crop_size, eval_mode)
    cache_image, cache_geometry = spec.cache_image(image)
    geometry = spec.input_geometry(cache_geometry)
    model_box = geometry.to_input_boxes(gt)[0]
    assert 0 <= model_box[0] < model_box[2] <= crop_size and 0 <= model_box[1] < model_box[3] <= crop_size

    # the mapped box frames the same anatomy in the model input as the original box in the original image
    model_input = (spec.model_input(cache_image[None])[0, 0] * 255).astype(np.float32)
    x0, y0, x1, y1 = np.round(model_box).astype(int)
    ox0, oy0, ox1, oy1 = np.round(gt[0]).astype(int)
    seen = np.asarray(Image.fromarray(model_input[y0:y1, x0:x1]).resize((32, 32), Image.Resampling.BILINEAR))
    truth = np.asarray(Image.fromarray(image[oy0:oy1, ox0:ox1].astype(np.float32)).resize((32, 32)))
    assert np.corrcoef(seen.ravel(), truth.ravel())[0, 1] > 0.95

    # a heatmap painted on the box in model space gives back the box in original space
    heatmap = _paint(model_box, crop_size)
    found = heatmap_to_boxes(heatmap)
    assert len(found.boxes) == 1
    predicted = geometry.to_original_boxes(found.boxes)
    assert iou(predicted, gt)[0, 0] > 0.97
    one_model_pixel = 1024 / (
        cache_geometry.resized_width * crop_size / image_size
        if eval_mode == "resize"
        else cache_geometry.resized_width
    )
    np.testing.assert_allclose(predicted[0], gt[0], atol=one_model_pixel)

    # and the map upsampled onto the 1024² original lies on the box
    full = geometry.heatmap_to_original(heatmap)
    assert full.shape == image.shape
    inside = np.zeros(image.shape, dtype=bool)
    inside[oy0 + 8 : oy1 - 8, ox0 + 8 : ox1 - 8] = True
    outside = np.ones(image.shape, dtype=bool)
    outside[oy0 - 8 : oy1 + 8, ox0 - 8 : ox1 + 8] = False
    assert full[inside].min() > 0.99 and full[outside].max() < 0.01


def test_heatmap_to_original_zeroes_what_the_model_did_not_see():
    geometry = InputGeometry.fit(400, 800, 64, "crop", 64, "resize")  # crop keeps the central 400 x 400
    full = geometry.heatmap_to_original(np.ones((64, 64), dtype=np.float32))
    assert full.shape == (400, 800)
    assert full[:, :195].max() == 0 and full[:, 605:].max() == 0
    assert full[:, 205:595].min() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="model input"):
        geometry.heatmap_to_original(np.ones((32, 32)))


def test_localization_table_columns_are_findings():
    gt = np.array([[0.0, 0.0, 10.0, 10.0]])
    scores = score_localization([_case("a", "Effusion", gt, gt, (5.0, 5.0))], thresholds={"IoU": (0.5,)})
    assert isinstance(scores.overlap, pd.DataFrame)
    assert scores.table("IoU").to_dict() == {
        "Effusion": {"T(IoU)=0.5 Acc.": 1.0, "T(IoU)=0.5 AFP": 0.0},
        "Mean": {"T(IoU)=0.5 Acc.": 1.0, "T(IoU)=0.5 AFP": 0.0},
    }


@pytest.mark.parametrize("side", [224, 512])
def test_ground_truth_follows_a_downscaled_copy(nih_sample, tmp_path, side):
    """NIH boxes are in 1024² release pixels; on a downscaled copy they are rescaled to the file read, so a
    heatmap exactly on the finding scores as it does on the original (and would miss without rescaling)."""
    image, gt = _nih_box(nih_sample, "Cardiomegaly")
    copy = tmp_path / f"copy_{side}.png"
    Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR).save(copy)
    small = read_image(copy)
    assert small.shape == (side, side)
    gt_small = boxes_to_image(gt, small.shape)
    np.testing.assert_allclose(gt_small, gt * side / 1024)
    spec = PreprocessSpec(128, "letterbox", 128, "resize")
    geometry = spec.input_geometry(spec.cache_image(small)[1])
    heatmap = _paint(geometry.to_input_boxes(gt_small)[0], 128)
    boxes = boxes_per_threshold(heatmap, geometry, small.shape)
    case = LocalizationCase(copy.name, "Cardiomegaly", gt_small, boxes, None)
    overlap = score_localization([case]).overlap.set_index(["criterion", "threshold"])
    assert (overlap.loc[("IoU", 0.7), "accuracy"] == 1.0).all()
    unscaled = LocalizationCase(copy.name, "Cardiomegaly", gt, boxes, None)
    assert (
        score_localization([unscaled])
        .overlap.set_index(["criterion", "threshold"])
        .loc[("IoU", 0.5), "accuracy"]
        == 0
    ).all()
