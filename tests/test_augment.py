"""Batched augmentation: shapes, identity, flips, reproducibility, range and geometric conventions."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from cxrkit.data.augment import (
    AugmentParams,
    BatchAugment,
    affine_grid,
    affine_matrices,
    eval_transform,
    gaussian_blur,
    mixup,
)
from cxrkit.data.config import AugmentConfig

STILL = AugmentConfig(
    crop_size=32,
    rotation_degrees=0.0,
    translate_fraction=0.0,
    scale_range=(1.0, 1.0),
    crop_area_range=(1.0, 1.0),
    brightness=0.0,
    contrast=0.0,
)


def params(batch: int = 1, **overrides) -> AugmentParams:
    """Parameters of the identity transform, with ``overrides`` (per-sample values broadcast)."""
    values = {
        "angle_degrees": torch.zeros(batch),
        "scale": torch.ones(batch),
        "translate": torch.zeros(batch, 2),
        "crop_side": torch.ones(batch),
        "crop_centre": torch.zeros(batch, 2),
        "flip": torch.zeros(batch, dtype=torch.bool),
        "brightness": torch.ones(batch),
        "contrast": torch.ones(batch),
        "downscale": None,
        "sharpen": None,
        "gamma": None,
        "noise_std": None,
        "aspect": None,
    }
    for name, value in overrides.items():
        like = values[name] if values[name] is not None else torch.ones(batch)
        values[name] = torch.as_tensor(value, dtype=like.dtype).expand_as(like).clone()
    return AugmentParams(**values)


def dot_image(size: int = 32, row: int = 16, column: int = 24) -> torch.Tensor:
    image = torch.zeros(1, 1, size, size)
    image[0, 0, row, column] = 1.0
    return image


def brightest(image: torch.Tensor) -> tuple[int, int]:
    index = int(image[0, 0].flatten().argmax())
    return divmod(index, image.shape[-1])


ACQUISITION = dataclasses.replace(
    STILL, downscale_range=(0.4, 1.0), sharpness=1.0, gamma_range=(0.6, 1.6), noise_std=0.05
)


def pattern_batch(batch: int = 8, size: int = 32) -> torch.Tensor:
    """Smooth structure plus fine texture, as uint8 (what the cache holds)."""
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    smooth = (torch.sin(xx / 5) + torch.cos(yy / 7)) * 50 + 128
    texture = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(0)) * 40 - 20
    return (smooth + texture).round().clamp(0, 255).to(torch.uint8)


def test_output_shape_dtype_and_range() -> None:
    augment = BatchAugment(AugmentConfig(crop_size=48, brightness=1.0, contrast=1.0), seed=0)
    images = torch.rand(6, 1, 64, 64)
    out = augment(images)
    assert out.shape == (6, 1, 48, 48) and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not torch.equal(out[0], out[1])  # per-sample parameters


def test_identity_when_all_ranges_are_zero() -> None:
    images = torch.rand(3, 1, 32, 32)
    out = BatchAugment(STILL, seed=0)(images)
    torch.testing.assert_close(out, images, atol=1e-6, rtol=0)


def test_uint8_input_is_scaled_in_the_same_pass() -> None:
    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    out = BatchAugment(STILL, seed=0)(images)
    torch.testing.assert_close(out, images.float() / 255, atol=1e-6, rtol=0)


def test_horizontal_flip_is_off_by_default() -> None:
    assert AugmentConfig().horizontal_flip is False
    draws = BatchAugment(AugmentConfig(), seed=0).sample(512)
    assert not draws.flip.any()


def test_horizontal_flip_when_enabled_mirrors_some_samples() -> None:
    augment = BatchAugment(dataclasses.replace(STILL, horizontal_flip=True), seed=0)
    images = torch.rand(1, 1, 32, 32).expand(64, 1, 32, 32).contiguous()
    out = augment(images)
    mirrored = torch.flip(images, dims=[-1])
    is_same = [torch.allclose(o, i, atol=1e-6) for o, i in zip(out, images, strict=True)]
    is_mirrored = [torch.allclose(o, m, atol=1e-6) for o, m in zip(out, mirrored, strict=True)]
    assert all(a != b for a, b in zip(is_same, is_mirrored, strict=True))  # exactly one of the two
    assert 10 < sum(is_mirrored) < 54


def test_reproducible_with_a_seed_or_generator() -> None:
    images = torch.rand(4, 1, 40, 40)
    cfg = AugmentConfig(crop_size=32)
    torch.testing.assert_close(BatchAugment(cfg, seed=7)(images), BatchAugment(cfg, seed=7)(images))
    assert not torch.allclose(BatchAugment(cfg, seed=7)(images), BatchAugment(cfg, seed=8)(images))
    augment = BatchAugment(cfg, seed=1)
    first = augment(images, generator=torch.Generator().manual_seed(3))
    second = augment(images, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, second)
    augment.reseed(7)
    torch.testing.assert_close(augment(images), BatchAugment(cfg, seed=7)(images))


def test_rotation_turns_content_counter_clockwise() -> None:
    augment = BatchAugment(STILL)
    image = dot_image(row=16, column=24)  # right of the centre (15.5, 15.5)
    rotated = augment.apply(image, params(angle_degrees=90.0))
    assert brightest(rotated) == (7, 16)  # now above the centre: counter-clockwise as displayed
    pattern = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(augment.apply(pattern, params(angle_degrees=90.0)), TF.rotate(pattern, 90.0))


def test_translation_and_scale_move_a_known_point() -> None:
    augment = BatchAugment(STILL)
    image = dot_image(row=16, column=24)
    shifted = augment.apply(image, params(translate=[[0.25, -0.125]]))  # fractions of the side x 2
    assert brightest(shifted) == (16 - 2, 24 + 4)
    odd = BatchAugment(dataclasses.replace(STILL, crop_size=33))  # centre pixel (16, 16)
    zoomed = odd.apply(dot_image(size=33, row=19, column=23), params(scale=2.0))  # 3 and 7 px from centre
    assert brightest(zoomed) == (16 + 6, 16 + 14)


def test_aspect_stretches_width_and_squeezes_height() -> None:
    odd = BatchAugment(dataclasses.replace(STILL, crop_size=33))  # centre pixel (16, 16)
    stretched = odd.apply(dot_image(size=33, row=20, column=20), params(aspect=4.0))  # 4 px right and below
    assert brightest(stretched) == (16 + 2, 16 + 8)
    assert BatchAugment(AugmentConfig(), seed=0).sample(4).aspect is None  # off by default
    draws = BatchAugment(dataclasses.replace(STILL, aspect_range=(0.8, 1.25)), seed=0).sample(2000)
    assert draws.aspect.min() >= 0.8 and draws.aspect.max() <= 1.25
    assert abs(float(draws.aspect.log().mean())) < 0.05 * math.log(1.25 / 0.8)  # log-uniform around 1


def test_crop_window_reads_the_expected_region() -> None:
    augment = BatchAugment(dataclasses.replace(STILL, crop_size=16))
    image = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32) / (32 * 32)
    # a half-side window centred on the top-left quadrant at full resolution is exactly that quadrant
    out = augment.apply(
        image, params(crop_side=0.5, crop_centre=[[-0.5, -0.5]], brightness=1.0, contrast=1.0)
    )
    torch.testing.assert_close(out, image[..., :16, :16], atol=1e-6, rtol=0)


def test_separable_grid_equals_affine_grid() -> None:
    draws = BatchAugment(AugmentConfig(horizontal_flip=True), seed=0).sample(8)
    theta = affine_matrices(draws)
    expected = F.affine_grid(theta, (8, 1, 24, 24), align_corners=False)
    torch.testing.assert_close(affine_grid(theta, 24), expected, atol=1e-6, rtol=0)


def test_eval_transform() -> None:
    images = torch.rand(2, 1, 40, 40)
    assert eval_transform(images, 40) is images
    assert eval_transform(images, 32).shape == (2, 1, 32, 32)
    torch.testing.assert_close(eval_transform(images, 32, "center_crop"), images[..., 4:36, 4:36])
    flat = torch.full((1, 1, 40, 40), 0.25)
    torch.testing.assert_close(eval_transform(flat, 20), torch.full((1, 1, 20, 20), 0.25))
    with pytest.raises(ValueError, match="mode"):
        eval_transform(images, 32, "pad")


def test_bad_inputs_and_config_are_refused() -> None:
    augment = BatchAugment(AugmentConfig())
    with pytest.raises(ValueError, match="square"):
        augment(torch.rand(2, 1, 32, 30))
    with pytest.raises(TypeError, match="float"):
        eval_transform(torch.zeros(1, 1, 8, 8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="crop_area_range"):
        BatchAugment(AugmentConfig(crop_area_range=(0.5, 1.5)))
    with pytest.raises(ValueError, match="brightness"):
        BatchAugment(AugmentConfig(brightness=2.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_batch_device() -> None:
    images = torch.rand(4, 1, 64, 64, device="cuda")
    out = BatchAugment(AugmentConfig(crop_size=32), seed=0)(images)
    assert out.device == images.device and out.shape == (4, 1, 32, 32)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_cpu_warp_matches_grid_sample(dtype: torch.dtype) -> None:
    """The OpenCV CPU path resamples exactly like F.grid_sample (zero padding, align_corners=False)."""
    from cxrkit.data.augment import _intensity, affine_grid, affine_matrices

    cfg = AugmentConfig(
        crop_size=48,
        rotation_degrees=30,
        translate_fraction=0.2,
        scale_range=(0.7, 1.3),
        aspect_range=(0.7, 1.4),
    )
    augment = BatchAugment(cfg, seed=3)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    pattern = ((torch.sin(xx / 5) + torch.cos(yy / 7)) * 60 + 128).round().to(torch.uint8)
    images = pattern.expand(8, 1, 64, 64).contiguous()
    params = augment.sample(8)
    fast = augment.apply(images if dtype == torch.uint8 else images.float() / 255, params)
    grid = affine_grid(affine_matrices(params), 48)
    reference = F.grid_sample(
        images.float() / 255, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    reference = _intensity(reference, params.brightness, params.contrast)
    tolerance = 3 / 255 if dtype == torch.uint8 else 1e-4
    assert (fast - reference).abs().max() < tolerance
    assert (reference == 0).any()  # the rotations reach outside the image: padding is compared too


def test_acquisition_jitter_is_off_by_default_and_keeps_the_random_stream() -> None:
    draws = BatchAugment(AugmentConfig(), seed=0).sample(4)
    assert draws.downscale is None and draws.sharpen is None and draws.gamma is None
    assert draws.noise_std is None
    with_jitter = BatchAugment(dataclasses.replace(AugmentConfig(), **_acquisition_fields()), seed=0).sample(
        4
    )
    torch.testing.assert_close(with_jitter.angle_degrees, draws.angle_degrees)  # drawn first, unchanged
    torch.testing.assert_close(with_jitter.contrast, draws.contrast)


def _acquisition_fields() -> dict:
    return {
        name: getattr(ACQUISITION, name)
        for name in ("downscale_range", "sharpness", "gamma_range", "noise_std")
    }


def test_acquisition_draws_stay_in_their_ranges() -> None:
    draws = BatchAugment(ACQUISITION, seed=0).sample(2000)
    assert draws.downscale.min() >= 0.4 and draws.downscale.max() <= 1.0
    assert -1.0 <= draws.sharpen.min() < -0.9 and 0.9 < draws.sharpen.max() <= 1.0
    assert draws.gamma.min() >= 0.6 and draws.gamma.max() <= 1.6
    assert abs(float(draws.gamma.log().mean())) < 0.05 * math.log(1.6 / 0.6)  # log-uniform: centred on ~1
    assert draws.noise_std.min() >= 0.0 and draws.noise_std.max() <= 0.05


def test_gamma_maps_values_by_a_power() -> None:
    images = torch.rand(2, 1, 32, 32)
    out = BatchAugment(STILL).apply(images, params(2, gamma=[2.0, 0.5]))
    torch.testing.assert_close(out[0], images[0] ** 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], images[1].sqrt(), atol=1e-5, rtol=0)
    as_uint8 = (images * 255).round().to(torch.uint8)  # scaled to [0, 1] before the curve
    expected = (as_uint8.float() / 255) ** 2
    torch.testing.assert_close(
        BatchAugment(STILL).apply(as_uint8, params(2, gamma=2.0)), expected, atol=1e-5, rtol=0
    )


def test_blur_smooths_and_sharpening_amplifies_detail() -> None:
    images = pattern_batch(3).float() / 255
    out = BatchAugment(STILL).apply(images, params(3, sharpen=[-1.0, 0.0, 1.0]))

    def detail(batch: torch.Tensor) -> list[float]:
        return [float((image - gaussian_blur(image[None], 1.0)[0]).abs().mean()) for image in batch]

    (blurred, kept, sharpened), original = detail(out), detail(images)
    assert blurred < 0.5 * original[0] and abs(kept - original[1]) < 1e-6 and sharpened > 1.2 * original[2]
    flat = torch.full((1, 1, 32, 32), 0.4)
    torch.testing.assert_close(BatchAugment(STILL).apply(flat, params(sharpen=-1.0)), flat)  # mean kept


def test_downscale_removes_fine_detail_only() -> None:
    images = pattern_batch(2).float() / 255
    out = BatchAugment(STILL).apply(images, params(2, downscale=[0.25, 1.0]))
    torch.testing.assert_close(out[1], images[1])  # factor 1: untouched
    coarse = F.avg_pool2d(out[:1], 8)
    assert (out[0] - images[0]).abs().mean() > 0.02  # texture lost
    assert (coarse - F.avg_pool2d(images[:1], 8)).abs().mean() < 0.03  # structure kept


def test_noise_has_the_drawn_strength_and_is_reproducible() -> None:
    images = torch.full((2, 1, 32, 32), 0.5)
    noisy = params(2, noise_std=[0.0, 0.05])
    noisy.noise_seed = 11
    out = BatchAugment(STILL).apply(images, noisy)
    torch.testing.assert_close(out[0], images[0])
    assert abs(float((out[1] - 0.5).std()) - 0.05) < 0.006
    torch.testing.assert_close(BatchAugment(STILL).apply(images, noisy), out)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_cpu_and_torch_paths_agree_with_acquisition_jitter(dtype: torch.dtype) -> None:
    """The OpenCV CPU path (warp + per-image degradation) and the batched torch path (used on accelerators
    and for multi-channel images) give the same images for the same draws."""
    cfg = dataclasses.replace(
        ACQUISITION, crop_size=40, rotation_degrees=20, scale_range=(0.8, 1.2), brightness=0.2, contrast=0.2
    )
    augment = BatchAugment(cfg, seed=5)
    images = pattern_batch(8, size=48)
    images = images if dtype == torch.uint8 else images.float() / 255
    draws = augment.sample(8)
    assert draws.downscale.min() < 0.9 and (draws.sharpen.abs() > 0.1).any()
    fast = augment.apply(images, draws)  # 1 channel on the CPU: OpenCV
    three = images.expand(-1, 3, -1, -1).contiguous()  # 3 channels: the torch path
    reference = augment.apply(three, draws)
    for channel in range(3):
        assert (fast[:, 0] - reference[:, channel]).abs().max() < 3 / 255


def test_bad_acquisition_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="downscale_range"):
        BatchAugment(dataclasses.replace(STILL, downscale_range=(0.5, 1.5)))
    with pytest.raises(ValueError, match="gamma_range"):
        BatchAugment(dataclasses.replace(STILL, gamma_range=(0.0, 2.0)))
    with pytest.raises(ValueError, match="sharpness"):
        BatchAugment(dataclasses.replace(STILL, sharpness=1.5))
    with pytest.raises(ValueError, match="blur_sigma"):
        BatchAugment(dataclasses.replace(STILL, blur_sigma=0.0))
    with pytest.raises(ValueError, match="aspect_range"):
        BatchAugment(dataclasses.replace(STILL, aspect_range=(0.0, 2.0)))


def _recover_mixup(mixed: torch.Tensor, images: torch.Tensor, soft: torch.Tensor) -> tuple[float, list[int]]:
    """λ and the pairing j(i) with mixed_i = λ x_i + (1 - λ) x_j, found from the outputs alone: λ is one of
    the soft binary targets (or 1 minus one), the pairing the nearest image to the partner's share."""
    values = {round(v, 6) for v in soft[:, 0].tolist() if 0 < v < 1}
    for lam in sorted(values | {round(1 - v, 6) for v in values}):
        partner = (mixed - lam * images) / (1.0 - lam)
        pairing = torch.cdist(partner.flatten(1), images.flatten(1)).argmin(1).tolist()
        if torch.allclose(mixed, lam * images + (1 - lam) * images[pairing], atol=1e-5):
            return lam, pairing
    raise AssertionError("the mixed images are not blends of two images of the batch")


def test_mixup_blends_images_and_targets_with_one_beta_draw() -> None:
    images = torch.rand(8, 1, 16, 16)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 4)
    targets[3, 1] = float("nan")  # unknown
    mixed, soft = mixup(images, targets, 0.4, 2, torch.Generator().manual_seed(0))
    lam, pairing = _recover_mixup(mixed, images, soft)
    torch.testing.assert_close(soft, lam * targets + (1 - lam) * targets[pairing], equal_nan=True)
    assert torch.isnan(soft[3, 1]) and torch.isnan(soft[pairing.index(3), 1])  # unknown stays unknown
    again_images, again_targets = mixup(images, targets, 0.4, 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again_images, mixed)
    torch.testing.assert_close(again_targets, soft, equal_nan=True)


def test_mixup_turns_class_indices_into_soft_rows_and_is_off_at_alpha_zero() -> None:
    images, indices = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, -1, 1])
    _, soft = mixup(images, indices, 1.0, 3, torch.Generator().manual_seed(1))
    known = ~torch.isnan(soft).any(1)
    assert soft.shape == (6, 3) and torch.isnan(soft[4]).all() and 4 <= int(known.sum()) <= 5
    torch.testing.assert_close(soft[known].sum(1), torch.ones(int(known.sum())))  # rows of probabilities
    same_images, same_targets = mixup(images, indices, 0.0, 3)
    assert same_images is images and same_targets is indices
