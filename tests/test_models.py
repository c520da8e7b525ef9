"""The model factory: forward shapes over timm families, heads, channel adaptation, parameter names for staged
fine-tuning and Grad-CAM target layers."""

from __future__ import annotations

import fnmatch
import functools
import math

import pytest
import torch
from torch import nn

from cxrkit.models.config import HeadConfig, ModelConfig, PretrainedConfig
from cxrkit.models.factory import (
    CXRModel,
    cam_reshape_transform,
    cam_target_layer,
    create_model,
    layer_group_patterns,
    layer_groups,
    tokens_to_map,
)
from cxrkit.models.heads import LinearHead, LSEHead, MLPHead, build_head, lse_pool
from cxrkit.models.pretrained import IMAGENET_MEAN, IMAGENET_STD


def make(arch: str = "resnet18", num_classes: int = 3, **kwargs) -> CXRModel:
    head = kwargs.pop("head", HeadConfig())
    cfg = ModelConfig(arch=arch, pretrained=PretrainedConfig(source="none"), head=head, **kwargs)
    return create_model(cfg, num_classes=num_classes).eval()


@functools.cache
def shared(arch: str) -> CXRModel:
    """One default model per architecture for the read-only tests (eval mode, never trained)."""
    return make(arch, num_classes=5)


@pytest.fixture(scope="module")
def resnet() -> CXRModel:
    torch.manual_seed(0)
    return make("resnet18", num_classes=4)


@pytest.fixture(scope="module")
def vit() -> CXRModel:
    return make("vit_small_patch16_224", num_classes=2)


# ------------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize(
    ("arch", "channels"),
    [
        ("resnet18", 512),
        ("densenet121", 1024),
        ("tf_efficientnet_lite0", 1280),
        ("mobilenetv3_small_100", 576),
        ("convnext_tiny", 768),
    ],
)
def test_forward_gives_one_logit_per_class(arch: str, channels: int) -> None:
    model = shared(arch)
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        features = model.forward_features(images)
        logits = model(images)
    assert features.shape == (2, channels, 2, 2)
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()


#: Every backbone a recipe in configs/ uses, plus the families cxrkit documents (ViT, MobileNetV3).
RECIPE_BACKBONES = [
    "densenet121",
    "resnet18",
    "resnet50",
    "efficientnet_b4",
    "tf_efficientnet_lite0",
    "convnext_tiny",
    "mobilenetv3_small_100",
    "vit_small_patch16_224",
]


@pytest.mark.parametrize("arch", RECIPE_BACKBONES)
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_pooled_features_are_the_backbones_own(arch: str, head: str) -> None:
    """The head classifies exactly what the pretrained network pools: timm's ``forward_head(pre_logits=True)``
    of the default model (ConvNeXt: pool, then LayerNorm; MobileNetV3: pool, then conv_head; ViT: class
    token) — not an average of a per-position-normalised map."""
    import timm

    torch.manual_seed(0)
    model = make(arch, num_classes=3, head=HeadConfig(type=head, hidden_units=16))
    reference = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=model.backbone_in_chans)
    reference.load_state_dict(model.backbone.state_dict())
    reference.eval()
    side = 224 if "vit" in arch else 64
    images = torch.rand(2, 1, side, side)
    with torch.no_grad():
        raw = reference.forward_features(model.normalize(images))
        expected = reference.forward_head(raw, pre_logits=True)
        logits, pooled = model.forward_with_features(images)
        assert torch.allclose(model.pooled_features(images), expected, atol=1e-5)
        assert torch.allclose(pooled, expected, atol=1e-5)
        assert torch.allclose(logits, model.head(expected), atol=1e-5)
        assert torch.allclose(model(images), logits)


def test_convnext_pooling_differs_from_averaging_a_normalised_map() -> None:
    """Why the previous per-position LayerNorm then average was wrong for ConvNeXt."""
    model = shared("convnext_tiny")
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        feature_map = model.forward_features(images)
        per_position = model.backbone.head.norm(feature_map).mean(dim=(2, 3))
        assert not torch.allclose(per_position, model.pooled_features(images), atol=1e-3)


def test_vit_tokens_become_a_patch_grid(vit: CXRModel) -> None:
    images = torch.rand(1, 1, 224, 224)
    with torch.no_grad():
        features = vit.forward_features(images)
        logits = vit(images)
    assert features.shape == (1, 384, 14, 14)
    assert logits.shape == (1, 2)


def test_tokens_to_map_drops_prefix_tokens_and_keeps_positions() -> None:
    patch = torch.arange(6, dtype=torch.float32).view(1, 6, 1).expand(1, 6, 2)
    tokens = torch.cat([torch.full((1, 1, 2), -1.0), patch], dim=1)
    grid = tokens_to_map(tokens, num_prefix_tokens=1, grid=(2, 3))
    assert grid.shape == (1, 2, 2, 3)
    assert grid[0, 0].tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="grid"):
        tokens_to_map(tokens, num_prefix_tokens=0)  # 7 tokens fit no square


@pytest.mark.parametrize("arch", ["mobilenetv3_small_100", "convnext_tiny"])
def test_every_backbone_parameter_is_used(arch: str) -> None:
    """Layers timm applies after pooling (MobileNetV3 conv_head, ConvNeXt head norm) must not be dead
    weights: unused parameters break DDP and waste pretrained weights."""
    model = make(arch).train()
    model(torch.rand(2, 1, 64, 64)).sum().backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert unused == []


def test_wrong_input_channels_is_a_clear_error(resnet: CXRModel) -> None:
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        resnet(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.arch=resnet_does_not_exist", "model.arch"),
        ("model.channel_adapt=average", "model.channel_adapt"),
        ("model.in_chans=0", "model.in_chans"),
    ],
)
def test_invalid_config_names_the_field(override: str, message: str) -> None:
    from cxrkit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):  # checked when the config loads
        load_config(None, ["model.pretrained.source=none", override])


def test_run_config_overrides_build_the_model() -> None:
    from cxrkit.config import load_config

    config = load_config(
        overrides=[
            "model.arch=mobilenetv3_small_100",
            "model.pretrained.source=none",
            "model.head.type=mlp",
            "model.head.hidden_units=16",
            "model.drop_rate=0.2",
            "model.norm_mean=[0.5]",
            "model.norm_std=[0.25]",
            "model.timm_kwargs.bn_eps=0.01",
        ]
    )
    model = create_model(config.model, num_classes=3)
    assert isinstance(model.head, MLPHead) and model.head.drop.p == pytest.approx(0.2)
    assert model.backbone.bn1.eps == pytest.approx(0.01)
    assert model.input_std.item() == pytest.approx(0.25)


def test_unknown_source_and_head_are_errors() -> None:
    with pytest.raises(ValueError, match=r"model\.pretrained\.source"):
        create_model(ModelConfig(arch="resnet18", pretrained=PretrainedConfig(source="imagenet")), 2)
    with pytest.raises(ValueError, match=r"model\.head\.type"):
        build_head(HeadConfig(type="attention"), 8, 2)
    with pytest.raises(ValueError, match="num_classes"):
        create_model(ModelConfig(arch="resnet18", pretrained=PretrainedConfig(source="none")), 0)


# --------------------------------------------------------------------------------------------- normalisation
def test_gray_normalisation_is_the_mean_of_imagenet_statistics_and_lives_in_the_state_dict(
    resnet: CXRModel,
) -> None:
    assert resnet.input_mean.flatten().tolist() == pytest.approx([sum(IMAGENET_MEAN) / 3])
    assert resnet.input_std.flatten().tolist() == pytest.approx([sum(IMAGENET_STD) / 3])
    assert {"input_mean", "input_std"} <= set(resnet.state_dict())
    images = torch.rand(1, 1, 8, 8)
    expected = (images - sum(IMAGENET_MEAN) / 3) / (sum(IMAGENET_STD) / 3)
    torch.testing.assert_close(resnet.normalize(images), expected)


def test_configured_normalisation_overrides_the_source() -> None:
    model = make("resnet18", norm_mean=[0.4], norm_std=[0.2])
    assert model.input_mean.item() == pytest.approx(0.4)
    assert model.input_std.item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="together"):
        make("resnet18", norm_mean=[0.4])


def test_repeat_mode_keeps_rgb_weights_and_repeats_the_gray_image() -> None:
    torch.manual_seed(0)
    gray = make("resnet18", channel_adapt="repeat")
    assert gray.backbone.conv1.weight.shape[1] == 3
    assert gray.input_mean.flatten().tolist() == pytest.approx(list(IMAGENET_MEAN))
    rgb = make("resnet18", in_chans=3)
    rgb.load_state_dict(gray.state_dict())
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gray(images), rgb(images.repeat(1, 3, 1, 1)))


def test_sum_mode_builds_a_one_channel_first_conv(resnet: CXRModel) -> None:
    assert resnet.backbone.conv1.weight.shape == (64, 1, 7, 7)


# ------------------------------------------------------------------------------------------------- heads
def test_lse_pool_interpolates_between_average_and_max() -> None:
    torch.manual_seed(0)
    features = torch.randn(2, 3, 4, 5)
    flat = features.flatten(2)
    r = 2.5
    naive = torch.log(torch.exp(r * flat).mean(dim=2)) / r
    torch.testing.assert_close(lse_pool(features, r), naive)
    torch.testing.assert_close(lse_pool(features, 1e4), flat.amax(dim=2), atol=1e-3, rtol=0)
    torch.testing.assert_close(
        lse_pool(features.double(), 1e-6), flat.double().mean(dim=2), atol=1e-5, rtol=0
    )
    assert torch.isfinite(lse_pool(features * 1e3, 10.0)).all()  # no overflow


def test_linear_head_is_dropout_linear_on_pooled_features() -> None:
    head = LinearHead(6, 2, drop_rate=0.3).eval()
    features = torch.randn(3, 6)
    torch.testing.assert_close(head(features), head.fc(features))
    assert not head.takes_map
    assert head.drop.p == pytest.approx(0.3)


def test_mlp_head_has_the_configured_hidden_layers() -> None:
    cfg = HeadConfig(type="mlp", hidden_layers=2, hidden_units=16, dropout=0.25)
    head = build_head(cfg, in_features=8, num_classes=3, drop_rate=0.1)
    assert isinstance(head, MLPHead)
    linears = [m for m in head.hidden if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, 16)]
    assert sum(isinstance(m, nn.ReLU) for m in head.hidden) == 2
    assert [m.p for m in head.hidden if isinstance(m, nn.Dropout)] == [0.25, 0.25]
    assert head.drop.p == pytest.approx(0.1)
    assert (head.fc.in_features, head.fc.out_features) == (16, 3)
    assert head(torch.randn(4, 8)).shape == (4, 3)


def test_lse_head_transition_pool_predict() -> None:
    cfg = HeadConfig(type="lse", transition_channels=12, lse_r=5.0)
    head = build_head(cfg, in_features=8, num_classes=3).eval()
    assert isinstance(head, LSEHead)
    features = torch.randn(2, 8, 4, 4)
    expected = head.fc(lse_pool(head.transition(features), 5.0))
    torch.testing.assert_close(head(features), expected)
    assert head.transition.out_channels == 12


@pytest.mark.parametrize("kind", ["linear", "mlp", "lse"])
def test_every_head_type_runs_on_a_backbone(kind: str) -> None:
    model = make(
        "resnet18", num_classes=3, head=HeadConfig(type=kind, hidden_units=32, transition_channels=64)
    )
    with torch.no_grad():
        assert model(torch.rand(2, 1, 64, 64)).shape == (2, 3)
    assert all(name.startswith("head.") for name, _ in model.head.named_parameters(prefix="head"))
    assert "head.fc.weight" in dict(model.named_parameters())


# ------------------------------------------------------------------------------------- staged fine-tuning
def test_parameter_names_are_backbone_timm_names_or_head(resnet: CXRModel) -> None:
    names = [name for name, _ in resnet.named_parameters()]
    assert all(name.startswith(("backbone.", "head.")) for name in names)
    assert "backbone.conv1.weight" in names
    assert "backbone.layer4.1.conv2.weight" in names


def test_resnet_layer_groups_follow_its_stages(resnet: CXRModel) -> None:
    groups = layer_groups(resnet)
    assert list(groups) == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
    all_names = [name for name, _ in resnet.named_parameters()]
    assert sorted(n for names in groups.values() for n in names) == sorted(all_names)
    patterns = layer_group_patterns(resnet)
    assert patterns["stem"] == ["backbone.conv1.*", "backbone.bn1.*"]
    assert patterns["stage4"] == ["backbone.layer4.*"]
    assert patterns["head"] == ["head.fc.*"]
    # "freeze up to layer3, train layer4 and the head"
    trainable = [n for n in all_names if any(fnmatch.fnmatch(n, p) for p in ["backbone.layer4.*", "head.*"])]
    assert sorted(trainable) == sorted(groups["stage4"] + groups["head"])


@pytest.mark.parametrize("arch", ["densenet121", "tf_efficientnet_lite0"])
def test_group_patterns_select_exactly_their_group(arch: str) -> None:
    model = shared(arch)
    groups = layer_groups(model)
    patterns = layer_group_patterns(model)
    all_names = [name for name, _ in model.named_parameters()]
    for group, names in groups.items():
        selected = [n for n in all_names if any(fnmatch.fnmatch(n, p) for p in patterns[group])]
        assert sorted(selected) == sorted(names), group
    if arch == "densenet121":
        assert "backbone.features.denseblock4.*" in patterns[list(groups)[-3]]


# ---------------------------------------------------------------------------------------------- Grad-CAM
@pytest.mark.parametrize(
    ("arch", "layer"),
    [
        ("resnet18", "layer4"),
        ("densenet121", "features.norm5"),
        ("tf_efficientnet_lite0", "bn2"),
        ("mobilenetv3_small_100", "blocks.5"),
        ("convnext_tiny", "stages.3"),
    ],
)
def test_cam_target_is_the_last_feature_layer(arch: str, layer: str) -> None:
    model = shared(arch)
    target = cam_target_layer(model)
    assert target is model.backbone.get_submodule(layer)
    captured = []
    handle = target.register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        features = model.forward_features(torch.rand(1, 1, 64, 64))
    handle.remove()
    assert captured[-1].shape == features.shape  # the map the head sees
    assert cam_reshape_transform(model) is None


def test_cam_target_for_vit_is_last_block_norm_with_a_grid_reshape(vit: CXRModel) -> None:
    target = cam_target_layer(vit)
    assert target is vit.backbone.blocks[-1].norm1
    reshape = cam_reshape_transform(vit)
    assert reshape is not None
    assert reshape(torch.randn(2, 197, 384)).shape == (2, 384, 14, 14)


def test_cam_target_for_lse_head_is_its_transition_layer() -> None:
    model = make("resnet18", head=HeadConfig(type="lse", transition_channels=16))
    assert cam_target_layer(model) is model.head.transition


def test_cam_target_can_be_named(resnet: CXRModel) -> None:
    assert cam_target_layer(resnet, "backbone.layer3") is resnet.backbone.layer3
    assert cam_target_layer(resnet, "layer3") is resnet.backbone.layer3
    with pytest.raises(ValueError, match="no module named"):
        cam_target_layer(resnet, "layer9")


@pytest.mark.parametrize("which", ["resnet", "vit"])
def test_grad_cam_runs_on_the_chosen_layer(which: str, request: pytest.FixtureRequest) -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = request.getfixturevalue(which)
    size = 224 if which == "vit" else 64
    cam = GradCAM(
        model=model, target_layers=[cam_target_layer(model)], reshape_transform=cam_reshape_transform(model)
    )
    heatmap = cam(input_tensor=torch.rand(1, 1, size, size), targets=[ClassifierOutputTarget(0)])
    assert heatmap.shape == (1, size, size)
    assert math.isfinite(float(heatmap.sum()))
    assert heatmap.min() >= 0 and heatmap.max() <= 1
