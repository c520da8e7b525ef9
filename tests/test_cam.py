"""Class activation maps (pytorch-grad-cam) and the explain-files gallery."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from cxrkit.data.labels import NIH_FINDINGS
from cxrkit.data.transforms import PreprocessSpec
from cxrkit.explain.boxes import read_nih_boxes
from cxrkit.explain.cam import CAM_METHODS, explain, method_name, select_targets
from cxrkit.explain.gallery import explain_files, write_report
from cxrkit.explain.localize import heatmap_peak
from cxrkit.models.config import ModelConfig
from cxrkit.models.factory import create_model

SLOW_METHODS = {"scorecam", "ablationcam"}  # one forward pass per channel of the target layer


def make_model(arch: str, num_classes: int = 4, **timm_kwargs) -> nn.Module:
    config = OmegaConf.structured(ModelConfig)
    config.arch = arch
    config.pretrained.source = "none"
    config.timm_kwargs = timm_kwargs
    torch.manual_seed(0)
    return create_model(config, num_classes).eval()


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return make_model("resnet18")


@pytest.fixture(scope="module")
def densenet121() -> nn.Module:
    return make_model("densenet121")


def images(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(1))


def check_maps(result, batch: int, n: int, size: int) -> None:
    maps = result.heatmaps
    assert maps.shape == (batch, n, size, size) and maps.dtype == torch.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert torch.isfinite(maps).all()


# ----------------------------------------------------------------------------------------- methods


@pytest.mark.parametrize("method", sorted(set(CAM_METHODS) - SLOW_METHODS))
def test_every_method_gives_unit_maps_on_resnet18(resnet18, method):
    result = explain(resnet18, images(), "topk", method=method, k=2)
    check_maps(result, 2, 2, 64)
    assert result.method == method and result.target_layer == "backbone.layer4"
    peaks = result.heatmaps.flatten(2).max(dim=2).values
    # min-max normalised per map: peak 1, or an all-zero map when no location has positive evidence
    # (random weights make that common; FEM keeps only activations k sigma above the mean)
    assert ((peaks > 0.99) | (peaks == 0)).all()
    if method != "fem":
        assert (peaks > 0.99).any()


@pytest.mark.parametrize("method", sorted(SLOW_METHODS))
def test_perturbation_methods_on_an_overridden_shallow_layer(resnet18, method):
    result = explain(resnet18, images(1), [0], method=method, target_layer="layer1")
    check_maps(result, 1, 1, 64)
    assert result.target_layer == "backbone.layer1"


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "eigencam", "layercam"])
def test_densenet121_methods(densenet121, method):
    result = explain(densenet121, images(1), [3], method=method)
    check_maps(result, 1, 1, 64)
    assert result.target_layer == "backbone.features.norm5"


def test_vit_maps_go_through_the_token_reshape():
    vit = make_model("vit_tiny_patch16_224", img_size=64)
    result = explain(vit, images(1), "topk", k=1)
    check_maps(result, 1, 1, 64)
    assert result.target_layer.startswith("backbone.blocks.")


def test_maps_equal_pytorch_grad_cam_with_parameter_gradients(resnet18):
    """The activation-gradient shortcut changes nothing: same maps as the library's plain Grad-CAM."""
    batch = images(3)
    result = explain(resnet18, batch, [2])
    reference = GradCAM(resnet18, [resnet18.backbone.layer4])(batch, [ClassifierOutputTarget(2)] * 3)
    np.testing.assert_allclose(result.heatmaps[:, 0].numpy(), reference, atol=1e-6)


def test_explain_restores_the_model(resnet18):
    resnet18.train()
    try:
        explain(resnet18, images(), [0])
        assert resnet18.training
        assert all(p.requires_grad and p.grad is None for p in resnet18.parameters())
    finally:
        resnet18.eval()


def test_method_names():
    assert method_name("GradCAM++") == "gradcam++"
    assert method_name("grad_cam_plus_plus".replace("_plus_plus", "pp")) == "gradcam++"
    assert method_name("Score-CAM") == "scorecam"
    assert method_name("LayerCAM") == "layercam"
    with pytest.raises(ValueError, match="unknown CAM method"):
        method_name("saliency")


# ----------------------------------------------------------------------------------------- targets


def test_topk_targets_are_the_highest_logits(resnet18):
    batch = images(3)
    result = explain(resnet18, batch, "topk", k=3)
    with torch.no_grad():
        logits = resnet18(batch)
    assert torch.equal(result.targets, logits.topk(3, dim=1).indices)
    torch.testing.assert_close(result.probabilities, torch.sigmoid(logits).gather(1, result.targets))
    for slot in range(3):  # slot j is the Grad-CAM of each image's j-th most likely finding
        per_class = explain(resnet18, batch, result.targets[:, slot : slot + 1])
        torch.testing.assert_close(per_class.heatmaps[:, 0], result.heatmaps[:, slot])


def test_select_targets_forms_and_errors():
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5], [3.0, 0.0, 1.0, 2.0]])
    assert select_targets(logits, "topk", k=2).tolist() == [[1, 3], [0, 3]]
    assert select_targets(logits, [2]).tolist() == [[2], [2]]
    assert select_targets(logits, [[0, 1], [2, 3]]).tolist() == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="out of range"):
        select_targets(logits, [4])
    with pytest.raises(ValueError, match="k must be"):
        select_targets(logits, "topk", k=5)
    with pytest.raises(ValueError, match="'topk'"):
        select_targets(logits, "top3")
    with pytest.raises(ValueError, match="table"):
        select_targets(logits, [[0], [1], [2]])


class TwoEvidence(nn.Module):
    """Logit 0 grows with bright pixels, logit 1 with dark pixels: a CAM must point at different places."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 2, kernel_size=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.features.bias.copy_(torch.tensor([0.0, 1.0]))
            self.fc.weight.copy_(torch.eye(2) * 10)
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.features(x)).mean(dim=(2, 3)))


def test_maps_follow_the_evidence_of_each_target():
    model = TwoEvidence()
    image = torch.zeros(1, 1, 32, 32)
    image[..., 8:16, 20:28] = 1.0  # the bright square: evidence for class 0, against class 1
    result = explain(model, image, [0, 1], target_layer="act")
    bright, dark = (result.heatmaps[0, i].numpy() for i in range(2))
    x, y = heatmap_peak(bright)
    assert 20 <= x <= 28 and 8 <= y <= 16
    assert bright[8:16, 20:28].min() > 0.99 and bright[:8].max() < 0.01
    assert dark[8:16, 20:28].max() < 0.01 and dark[:8].min() > 0.99


def test_plain_models_must_name_their_target_layer():
    with pytest.raises(ValueError, match="name its CAM target layer"):
        explain(TwoEvidence(), torch.zeros(1, 1, 8, 8), [0])
    with pytest.raises(ValueError, match="no module 'nope'"):
        explain(TwoEvidence(), torch.zeros(1, 1, 8, 8), [0], target_layer="nope")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        explain(TwoEvidence(), torch.zeros(8, 8), [0], target_layer="act")


# ----------------------------------------------------------------------------------------- gallery


def test_gallery_writes_overlays_at_original_resolution(tmp_path, nih_sample):
    boxes = read_nih_boxes(nih_sample / "BBox_List_2017_subset.csv")
    nih_name = boxes[boxes["finding"] == "Nodule"]["image"].iloc[0]
    wide = tmp_path / "wide.png"
    Image.fromarray((np.arange(200 * 300) % 251).astype(np.uint8).reshape(200, 300)).save(wide)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    labels = list(NIH_FINDINGS)
    model = make_model("resnet18", num_classes=len(labels))
    paths = [nih_sample / "images" / nih_name, wide, broken]

    run = explain_files(
        model,
        labels,
        paths,
        tmp_path / "out",
        preprocess=PreprocessSpec(80, "letterbox", 64),
        targets="topk",
        k=2,
        boxes=boxes,
        progress=False,
    )

    assert run.failures == [(str(broken), run.failures[0][1])] and "broken.png" not in run.records["path"]
    assert len(run.records) == 4 and run.records["rank"].tolist() == [1, 2, 1, 2]
    for record in run.records.itertuples():
        heatmap = np.load(tmp_path / "out" / record.heatmap)
        assert heatmap.shape == (64, 64) and heatmap.dtype == np.float32
        overlay = Image.open(tmp_path / "out" / record.overlay)
        assert overlay.mode == "RGB"
        assert overlay.size == ((1024, 1024) if record.image == nih_name else (300, 200))
        for x0, y0, x1, y1 in json.loads(record.boxes):
            assert 0 <= x0 < x1 <= overlay.size[0] and 0 <= y0 < y1 <= overlay.size[1]
    page = write_report(run)
    html = page.read_text()
    assert page.name == "report.html" and "Gallery" in html and "data:image/png;base64" in html
    assert (tmp_path / "out" / "explanations.csv").exists()
    assert pd.read_csv(tmp_path / "out" / "failures.csv")["path"].tolist() == [str(broken)]


def test_gallery_annotated_targets_score_localization(tmp_path, nih_sample):
    boxes = read_nih_boxes(nih_sample / "BBox_List_2017_subset.csv")
    chosen = boxes[boxes["finding"].isin(["Cardiomegaly", "Nodule"])].groupby("finding").head(1)
    labels = list(NIH_FINDINGS)
    model = make_model("resnet18", num_classes=len(labels))
    paths = [nih_sample / "images" / name for name in chosen["image"]]

    run = explain_files(
        model,
        labels,
        paths,
        tmp_path,
        preprocess=PreprocessSpec(80, "letterbox", 64, "resize"),
        targets="annotated",
        boxes=boxes,
        progress=False,
    )

    assert sorted(run.records["label"]) == ["Cardiomegaly", "Nodule"]
    for record in run.records.itertuples():
        has_boxes = len(json.loads(record.boxes)) > 0
        assert has_boxes == (0 <= record.best_iobb <= 1) == (0 <= record.best_iou <= record.best_iobb)
        assert isinstance(record.pointing_hit, bool) and json.loads(record.gt_boxes)
    assert run.localization is not None
    assert sorted(run.localization.pointing["finding"]) == ["Cardiomegaly", "Nodule"]
    table = run.localization.table("IoBB")
    assert list(table.columns) == ["Cardiomegaly", "Nodule", "Mean"]
    assert (tmp_path / "localization.csv").exists()
    assert "Weakly supervised localisation" in write_report(run).read_text()
