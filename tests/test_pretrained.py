"""Pretrained-weight sources: local files (safetensors, state dicts, key maps, reports, refusing code), the
offline EfficientNet-Lite packages mapped onto timm, torchxrayvision's DenseNet and the timm hub offline."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from cxrkit.models.config import ModelConfig, PretrainedConfig
from cxrkit.models.efficientnet_lite import LITE_ARCHS, lite_weights_file, lukemelas_to_timm
from cxrkit.models.factory import CXRModel, create_model
from cxrkit.models.pretrained import (
    PretrainedWeightsError,
    apply_key_map,
    read_state_dict,
    unwrap_checkpoint,
)

MILITARY_UNIFORM = 652  # ImageNet class of the classic Grace Hopper test photo


def model_cfg(arch: str = "resnet18", source: str = "none", **pretrained) -> ModelConfig:
    return ModelConfig(arch=arch, pretrained=PretrainedConfig(source=source, **pretrained))


def from_file(path: Path, arch: str = "resnet18", num_classes: int = 3, **options) -> CXRModel:
    return create_model(model_cfg(arch, "file", path=str(path), **options), num_classes=num_classes)


class CodeInPickle:
    """An object whose unpickling would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def rgb_resnet_state() -> dict[str, torch.Tensor]:
    """A 3-channel timm resnet18 with its ImageNet classifier, random weights."""
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=1000).state_dict()


# -------------------------------------------------------------------------------------------- file source
def test_safetensors_backbone_loads_and_first_conv_is_summed_to_gray(
    rgb_resnet_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "resnet18.safetensors"
    save_file(rgb_resnet_state, str(path))
    model = from_file(path)
    torch.testing.assert_close(
        model.backbone.conv1.weight, rgb_resnet_state["conv1.weight"].sum(dim=1, keepdim=True)
    )
    torch.testing.assert_close(
        model.backbone.layer4[1].bn2.running_var, rgb_resnet_state["layer4.1.bn2.running_var"]
    )
    report = model.load_report
    assert report.ok
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"]
    assert report.adapted == ["backbone.conv1.weight: (64, 3, 7, 7) -> (64, 1, 7, 7)"]
    assert {"head.fc.weight", "head.fc.bias", "input_mean", "input_std"} <= set(report.fresh)


def test_repeat_mode_keeps_rgb_file_weights(
    rgb_resnet_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(rgb_resnet_state, path)
    cfg = model_cfg("resnet18", "file", path=str(path))
    cfg.channel_adapt = "repeat"
    model = create_model(cfg, num_classes=2)
    torch.testing.assert_close(model.backbone.conv1.weight, rgb_resnet_state["conv1.weight"])
    assert model.load_report.adapted == []


def test_lightning_checkpoint_of_a_cxr_model_restores_everything(tmp_path: Path) -> None:
    torch.manual_seed(1)
    trained = create_model(model_cfg(), num_classes=3)
    with torch.no_grad():
        trained.input_mean.fill_(0.3)
    checkpoint = {
        "epoch": 4,
        "state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()},
        "optimizer_states": [],
    }
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    restored = from_file(path, strict=True).eval()
    report = restored.load_report
    assert report.ok and not report.unexpected
    assert report.fresh == []
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(restored(images), trained.eval()(images))


def test_key_map_renames_prefixes(rgb_resnet_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "encoder.pt"
    torch.save({f"module.encoder.{k}": v for k, v in rgb_resnet_state.items()}, path)
    unmapped = from_file(path)
    assert len(unmapped.load_report.unexpected) == len(rgb_resnet_state)
    assert "backbone.layer1.0.conv1.weight" in unmapped.load_report.missing
    mapped = from_file(path, key_map={"module.encoder.": ""})
    assert mapped.load_report.ok
    torch.testing.assert_close(
        mapped.backbone.layer1[0].conv1.weight, rgb_resnet_state["layer1.0.conv1.weight"]
    )
    with pytest.raises(PretrainedWeightsError, match="strict loading failed"):
        from_file(path, strict=True)


def test_report_lists_missing_unexpected_and_mismatched(
    rgb_resnet_state: dict[str, torch.Tensor], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = {k: v for k, v in rgb_resnet_state.items() if not k.startswith("layer4.")}
    state["extra.weight"] = torch.zeros(3)
    state["layer3.0.conv1.weight"] = torch.zeros(256, 64, 3, 3)  # wrong shape
    path = tmp_path / "partial.pt"
    torch.save({"model": state}, path)
    with caplog.at_level(logging.WARNING, logger="cxrkit.models.pretrained"):
        model = from_file(path)
    report = model.load_report
    assert not report.ok
    assert report.unexpected == ["extra.weight"]
    assert report.mismatched == [
        "backbone.layer3.0.conv1.weight: file (256, 64, 3, 3) vs model (256, 128, 3, 3)"
    ]
    assert "backbone.layer4.0.conv1.weight" in report.missing
    assert "backbone.layer3.0.conv1.weight" not in report.missing  # listed once, as mismatched
    assert not any(name.startswith("head.") for name in report.missing)  # the file has no head: fresh
    assert "missing" in caplog.text and "extra.weight" in caplog.text
    with pytest.raises(PretrainedWeightsError, match=r"layer4"):
        from_file(path, strict=True)


def test_shape_mismatch_is_reported_not_loaded(tmp_path: Path) -> None:
    torch.manual_seed(2)
    five = create_model(model_cfg(), num_classes=5)
    path = tmp_path / "five.pt"
    torch.save(five.state_dict(), path)
    three = from_file(path, num_classes=3)
    report = three.load_report
    assert report.mismatched == [
        "head.fc.weight: file (5, 512) vs model (3, 512)",
        "head.fc.bias: file (5,) vs model (3,)",
    ]
    assert (report.missing, report.fresh, report.ok) == ([], [], False)
    torch.testing.assert_close(three.backbone.conv1.weight, five.backbone.conv1.weight)


def test_pickle_with_code_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"conv1.weight": CodeInPickle(marker)}}, path)
    with pytest.raises(PretrainedWeightsError, match="refused to load"):
        from_file(path)
    assert not marker.exists()


def test_missing_or_unreadable_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(PretrainedWeightsError, match="not found"):
        read_state_dict(tmp_path / "absent.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match=r"broken\.pt"):
        read_state_dict(broken)
    with pytest.raises(PretrainedWeightsError, match="path is required"):
        create_model(model_cfg(source="file"), num_classes=2)


def test_unwrap_and_key_map_helpers() -> None:
    tensor = torch.zeros(1)
    assert unwrap_checkpoint({"state_dict": {"a": tensor}, "epoch": 3}) == {"a": tensor}
    assert unwrap_checkpoint({"model_state_dict": {"model": {"b": tensor}}}) == {"b": tensor}
    with pytest.raises(PretrainedWeightsError, match="no state dict"):
        unwrap_checkpoint({"epoch": 3, "hyper": {"lr": 0.1}})
    renamed = apply_key_map({"enc.body.x": tensor, "enc.y": tensor}, {"enc.": "backbone.", "enc.body.": ""})
    assert set(renamed) == {"x", "backbone.y"}


# --------------------------------------------------------------------------------------------- hub source
def test_hub_offline_fails_with_a_clear_suggestion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PretrainedWeightsError, match="efficientnet-lite") as error:
        create_model(model_cfg("resnet18", "hub"), num_classes=2)
    assert "resnet18" in str(error.value)


# ------------------------------------------------------------------------------------- EfficientNet-Lite
def grace_hopper(size: int, gray: bool = False) -> torch.Tensor:
    """The Grace Hopper photo shipped with matplotlib as a [1, C, size, size] tensor in [0, 1]."""
    from matplotlib import cbook

    image = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    image = image.convert("L" if gray else "RGB").resize((size, size), Image.BICUBIC)
    array = np.array(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array)
    return tensor[None, None] if gray else tensor.permute(2, 0, 1)[None]


def lite_package_state(arch: str) -> dict[str, torch.Tensor]:
    return torch.load(lite_weights_file(arch), map_location="cpu", weights_only=True)


def timm_lite_with_package_weights(arch: str) -> torch.nn.Module:
    model = timm.create_model(arch).eval()
    model.load_state_dict(lukemelas_to_timm(lite_package_state(arch), model.state_dict().keys()), strict=True)
    return model


NATIVE_SIZE = {"tf_efficientnet_lite0": 224, "tf_efficientnet_lite1": 240, "tf_efficientnet_lite2": 260}


@pytest.mark.parametrize("arch", list(LITE_ARCHS))
def test_lite_mapping_covers_every_timm_key_with_matching_shapes(arch: str) -> None:
    target = timm.create_model(arch).state_dict()
    mapped = lukemelas_to_timm(lite_package_state(arch), target.keys())
    assert set(mapped) == set(target)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in target.items()}


@pytest.mark.parametrize("arch", list(LITE_ARCHS))
def test_lite_weights_reproduce_the_reference_implementation(arch: str) -> None:
    """timm with the mapped weights computes the same logits as EfficientNet-Lite-PyTorch, the implementation
    the weights were published for, and recognises the Grace Hopper photo."""
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    size = NATIVE_SIZE[arch]
    reference = reference_package.EfficientNet.from_name(f"efficientnet-lite{LITE_ARCHS[arch]}").eval()
    reference.load_state_dict(lite_package_state(arch), strict=True)
    model = timm_lite_with_package_weights(arch)
    images = (grace_hopper(size) - 0.5) / 0.5
    with torch.no_grad():
        expected, logits = reference(images), model(images)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert int(logits.argmax()) == MILITARY_UNIFORM


@pytest.mark.parametrize("arch", list(LITE_ARCHS))
def test_cxr_model_with_lite_weights_classifies_imagenet(arch: str) -> None:
    """Through create_model (normalisation inside, RGB input, the packaged classifier as head) the Grace
    Hopper photo is a confident 'military uniform', exactly as the plain timm model computes it."""
    size = NATIVE_SIZE[arch]
    cfg = model_cfg(arch, "efficientnet-lite")
    cfg.in_chans = 3
    model = create_model(cfg, num_classes=1000).eval()
    report = model.load_report
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], [])
    assert sorted(report.ignored) == ["classifier.bias", "classifier.weight"]
    state = lite_package_state(arch)
    model.head.fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    image = grace_hopper(size)
    with torch.no_grad():
        probabilities = model(image).softmax(dim=1)[0]
        expected = timm_lite_with_package_weights(arch)((image - 0.5) / 0.5).softmax(dim=1)[0]
    torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=1e-4)
    assert int(probabilities.argmax()) == MILITARY_UNIFORM
    assert float(probabilities.max()) > 0.15  # 1000 classes: uniform would be 0.001


def test_gray_lite_model_equals_rgb_model_on_a_gray_image() -> None:
    """Summing the RGB stem weights is exact for gray images when the channel statistics are equal (0.5)."""
    gray_cfg = model_cfg("tf_efficientnet_lite0", "efficientnet-lite")
    rgb_cfg = model_cfg("tf_efficientnet_lite0", "efficientnet-lite")
    rgb_cfg.in_chans = 3
    repeat_cfg = model_cfg("tf_efficientnet_lite0", "efficientnet-lite")
    repeat_cfg.channel_adapt = "repeat"
    torch.manual_seed(0)
    gray, rgb, repeat = (create_model(cfg, num_classes=4).eval() for cfg in (gray_cfg, rgb_cfg, repeat_cfg))
    rgb.head.load_state_dict(gray.head.state_dict())
    repeat.head.load_state_dict(gray.head.state_dict())
    state = lite_package_state("tf_efficientnet_lite0")
    torch.testing.assert_close(
        gray.backbone.conv_stem.weight, state["_conv_stem.weight"].sum(1, keepdim=True)
    )
    assert gray.input_mean.flatten().tolist() == [0.5] and gray.input_std.flatten().tolist() == [0.5]
    image = grace_hopper(224, gray=True)
    with torch.no_grad():
        expected = rgb(image.repeat(1, 3, 1, 1))
        torch.testing.assert_close(gray(image), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(repeat(image), expected, atol=1e-5, rtol=1e-5)


def test_lite_source_needs_a_tf_lite_arch() -> None:
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        create_model(model_cfg("efficientnet_lite0", "efficientnet-lite"), num_classes=2)


# ------------------------------------------------------------------------------------------ torchxrayvision
@pytest.fixture(scope="module")
def xrv_densenet() -> torch.nn.Module:
    """A torchxrayvision DenseNet with random weights and BatchNorm statistics (so mapping errors show)."""
    xrv = pytest.importorskip("torchxrayvision")
    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    return model.eval()


def xrv_cache(folder: Path, model: torch.nn.Module, legacy: bool = False) -> Path:
    """Store ``model`` as torchxrayvision caches weights: the whole pickled model, under the URL's name."""
    from cxrkit.models.torchxrayvision_weights import DEFAULT_WEIGHTS, weights_url

    path = folder / weights_url(DEFAULT_WEIGHTS).rsplit("/", 1)[-1]
    torch.save(model, path, _use_new_zipfile_serialization=not legacy)
    return path


def test_torchxrayvision_densenet_maps_onto_timm(xrv_densenet: torch.nn.Module, tmp_path: Path) -> None:
    xrv_cache(tmp_path, xrv_densenet)
    model = create_model(
        model_cfg("densenet121", "torchxrayvision", path=str(tmp_path)), num_classes=3
    ).eval()
    report = model.load_report
    assert report.ok and report.adapted == []
    assert sorted(report.ignored) == ["classifier.bias", "classifier.weight"]
    assert model.input_mean.item() == pytest.approx(0.5)
    assert model.input_std.item() == pytest.approx(1 / 2048)
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected = xrv_densenet.features2(images * 2048 - 1024)  # torchxrayvision's own scaling
        pooled = model.forward_features(images).mean(dim=(2, 3))
    torch.testing.assert_close(pooled, expected, atol=1e-4, rtol=1e-4)


def test_torchxrayvision_pickles_of_pre_1_6_torch_are_read(
    xrv_densenet: torch.nn.Module, tmp_path: Path
) -> None:
    """The published weights predate torch's zip format: the legacy format must load the same tensors."""
    from cxrkit.models.torchxrayvision_weights import read_pickled_model

    state = read_pickled_model(xrv_cache(tmp_path, xrv_densenet, legacy=True))
    expected = xrv_densenet.state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_torchxrayvision_without_cached_weights_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xrv = pytest.importorskip("torchxrayvision")

    def no_download(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(xrv.utils, "download", no_download)
    monkeypatch.setattr(xrv.utils, "get_cache_dir", lambda: str(tmp_path / "cache"))
    with pytest.raises(PretrainedWeightsError, match="not cached") as error:
        create_model(model_cfg("densenet121", "torchxrayvision"), num_classes=2)
    assert str(tmp_path / "cache") in str(error.value)
    with pytest.raises(ValueError, match="densenet121-res224-all"):
        create_model(model_cfg("densenet121", "torchxrayvision", name="densenet999"), num_classes=2)
    with pytest.raises(ValueError, match=r"model\.arch"):
        create_model(model_cfg("resnet50", "torchxrayvision", path=str(tmp_path)), num_classes=2)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_torchxrayvision_file_with_code_is_refused(tmp_path: Path, legacy: bool) -> None:
    pytest.importorskip("torchxrayvision")
    marker = tmp_path / "pwned"
    xrv_cache(tmp_path, CodeInPickle(marker), legacy)  # torch.save pickles any object
    with pytest.raises(PretrainedWeightsError, match="refused to load"):
        create_model(model_cfg("densenet121", "torchxrayvision", path=str(tmp_path)), num_classes=2)
    assert not marker.exists()


class OutsideAllowlist(torch.nn.Module):
    """An nn.Module class neither of torch.nn nor of torchxrayvision: naming it must not be enough."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_torchxrayvision_payloads_inside_a_model_or_its_classes_are_refused(
    xrv_densenet: torch.nn.Module, tmp_path: Path, legacy: bool
) -> None:
    """Through torch's weights-only unpickler: a payload in a module's state, or a module class outside the
    allowlist (the legacy format names classes in persistent records, which are checked like any global)."""
    import copy

    from cxrkit.models.torchxrayvision_weights import read_pickled_model

    marker = tmp_path / "pwned"
    poisoned = copy.deepcopy(xrv_densenet)
    poisoned.payload = CodeInPickle(marker)
    for index, model in enumerate((poisoned, OutsideAllowlist())):
        folder = tmp_path / str(index)
        folder.mkdir()
        with pytest.raises(PretrainedWeightsError, match="refused to load") as error:
            read_pickled_model(xrv_cache(folder, model, legacy))
        assert "\n" not in str(error.value)
    assert not marker.exists()


def test_torchxrayvision_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    from cxrkit.models.torchxrayvision_weights import read_pickled_model

    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x80\x02not a torch file")
    with pytest.raises(PretrainedWeightsError, match=r"broken\.pt"):
        read_pickled_model(broken)
