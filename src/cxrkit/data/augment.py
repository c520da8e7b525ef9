"""Train-time augmentation of whole batches, on whatever device the batch is on.

:class:`BatchAugment` draws, per sample, a rotation, a translation, a scaling, a random-resized crop and
(only when enabled: chest films have a laterality) a horizontal flip, composes them into ONE affine
matrix and resamples the batch once (bilinear, zero padding outside the image, like the letterboxed cache)
to ``crop_size x crop_size`` — ``F.grid_sample`` on accelerators, OpenCV's ``warpAffine`` with the same
matrices on the CPU (faster there). Then, on both paths with the same torch code, acquisition-style jitter
(each off by default): resolution loss (down- then up-sampling by ``downscale_range``), blur or sharpening
(an unsharp mask of amount in ``[-sharpness, sharpness]``; -1 is a Gaussian blur of ``blur_sigma`` pixels),
a gamma curve (``gamma_range``, drawn log-uniformly), brightness and contrast jitter, and additive Gaussian
noise (standard deviation up to ``noise_std``). Images are float ``[B, 1, S, S]`` in [0, 1] (uint8 is
accepted and scaled in the same pass) and come out float in [0, 1].
:func:`eval_transform` is the deterministic counterpart for validation/test. :func:`mixup` (off by default)
blends pairs of images of a training batch and their targets.

Geometry conventions (normalised coordinates, x right, y down, image spanning [-1, 1]):

* rotation: a positive angle turns the content counter-clockwise as displayed (torchvision's convention);
* translation: a fraction of the image side, in each axis;
* scale > 1 enlarges the content (zooms in);
* aspect ``a`` (``aspect_range``, log-uniform, off by default) stretches the film along its own axes, by
  ``sqrt(a)`` in width and ``1 / sqrt(a)`` in height (area kept): films resized to a square from their
  original aspect ratio, as many public copies are, differ exactly so;
* random-resized crop: a square window covering ``area`` of the (transformed) image, centred uniformly
  where it stays inside, resized to ``crop_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrkit.data.config import AugmentConfig
from cxrkit.data.labels import as_rows


@dataclass
class AugmentParams:
    """Per-sample draws of a batch: CPU tensors of length B (``translate``, ``crop_centre``: B x 2)."""

    angle_degrees: torch.Tensor
    scale: torch.Tensor
    translate: torch.Tensor
    crop_side: torch.Tensor
    crop_centre: torch.Tensor
    flip: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    downscale: torch.Tensor | None = None
    sharpen: torch.Tensor | None = None
    gamma: torch.Tensor | None = None
    noise_std: torch.Tensor | None = None
    noise_seed: int = 0
    aspect: torch.Tensor | None = None


class BatchAugment(nn.Module):
    """Random affine + crop (one resampling pass) and brightness/contrast jitter of a batch.

    ``seed`` makes the draws reproducible (an own CPU generator; :meth:`reseed` restarts it); without it the
    global torch RNG is used. A ``generator`` passed to :meth:`forward` takes precedence.
    """

    def __init__(self, cfg: AugmentConfig, *, seed: int | None = None) -> None:
        super().__init__()
        self.crop_size = int(cfg.crop_size)
        self.rotation_degrees = abs(float(cfg.rotation_degrees))
        self.translate_fraction = _fraction(cfg.translate_fraction, "translate_fraction")
        self.scale_range = _range(cfg.scale_range, "scale_range", minimum=1e-3)
        self.aspect_range = _range(cfg.aspect_range, "aspect_range", minimum=0.1, maximum=10.0)
        self.crop_area_range = _range(cfg.crop_area_range, "crop_area_range", minimum=1e-3, maximum=1.0)
        self.brightness = _fraction(cfg.brightness, "brightness")
        self.contrast = _fraction(cfg.contrast, "contrast")
        self.horizontal_flip = bool(cfg.horizontal_flip)
        self.downscale_range = _range(cfg.downscale_range, "downscale_range", minimum=0.05, maximum=1.0)
        self.sharpness = _fraction(cfg.sharpness, "sharpness")
        self.blur_sigma = float(cfg.blur_sigma)
        if self.blur_sigma <= 0:
            raise ValueError(f"augment.blur_sigma must be > 0 pixels, got {self.blur_sigma}")
        self.gamma_range = _range(cfg.gamma_range, "gamma_range", minimum=0.1, maximum=10.0)
        self.noise_std = _fraction(cfg.noise_std, "noise_std")
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation's own random stream from ``seed``."""
        self.generator = torch.Generator().manual_seed(int(seed))

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> AugmentParams:
        """Draw the per-sample parameters of a batch."""
        gen = generator if generator is not None else self.generator

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return torch.rand(batch_size, *shape, generator=gen) * (high - low) + low

        side = uniform(*self.crop_area_range).sqrt()
        centre_limit = (1.0 - side).unsqueeze(1)
        flip = torch.rand(batch_size, generator=gen) < 0.5
        if not self.horizontal_flip:
            flip.zero_()
        params = AugmentParams(
            angle_degrees=uniform(-self.rotation_degrees, self.rotation_degrees),
            scale=uniform(*self.scale_range),
            translate=uniform(-self.translate_fraction, self.translate_fraction, 2) * 2.0,
            crop_side=side,
            crop_centre=(torch.rand(batch_size, 2, generator=gen) * 2.0 - 1.0) * centre_limit,
            flip=flip,
            brightness=uniform(1.0 - self.brightness, 1.0 + self.brightness),
            contrast=uniform(1.0 - self.contrast, 1.0 + self.contrast),
        )
        # aspect and acquisition jitter are drawn only when enabled: configs without them keep their streams
        if self.aspect_range != (1.0, 1.0):
            params.aspect = _log_uniform(uniform, self.aspect_range)
        if self.downscale_range != (1.0, 1.0):
            params.downscale = uniform(*self.downscale_range)
        if self.sharpness > 0:
            params.sharpen = uniform(-self.sharpness, self.sharpness)
        if self.gamma_range != (1.0, 1.0):
            params.gamma = _log_uniform(uniform, self.gamma_range)
        if self.noise_std > 0:
            params.noise_std = uniform(0.0, self.noise_std)
            params.noise_seed = int(torch.randint(2**62, (1,), generator=gen))
        return params

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a float [0, 1] (or uint8, scaled by 1/255 in the same pass) batch to float [0, 1]."""
        _check_batch(images, allow_uint8=True)
        return self.apply(images, self.sample(images.shape[0], generator))

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Augment ``images`` with given parameters (deterministic)."""
        _check_batch(images, allow_uint8=True)
        unit = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
        if images.device.type == "cpu" and images.shape[1] == 1:
            out = degrade_cpu(
                warp_cpu(images, affine_matrices(params), self.crop_size), params, self.blur_sigma
            )
        else:
            images = images if images.is_floating_point() else images.float()
            theta = affine_matrices(params).to(device=images.device, dtype=images.dtype, non_blocking=True)
            grid = affine_grid(theta, self.crop_size)
            out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            out = degrade(out, params, self.blur_sigma)
        if params.gamma is not None:
            out = out.mul_(unit).clamp_(min=0.0).pow_(params.gamma.to(out).view(-1, 1, 1, 1))
            unit = 1.0
        out = _intensity(out, params.brightness.to(out) * unit, params.contrast.to(out))
        return add_noise(out, params)


def degrade(images: torch.Tensor, params: AugmentParams, blur_sigma: float) -> torch.Tensor:
    """Resolution loss then blur/sharpening of a batch on any device (each skipped when not drawn).

    Resolution loss low-passes an image (Gaussian of ``(1/downscale - 1) / 2`` pixels), resamples it to
    ``downscale`` of its side and back (bilinear): lost detail, as from a lower-resolution detector or a
    smaller stored copy. Sharpening is the unsharp mask ``x + a (x - blur(x))``: ``a = -1`` is a Gaussian
    blur of ``blur_sigma`` pixels. Borders are reflected. Linear in the values, so 0-1 and 0-255 alike.
    """
    size = images.shape[-1]
    if params.downscale is not None:
        images = images.clone()
        for index, (side, sigma) in enumerate(_reductions(params.downscale, size)):
            if side < size:
                reduced = F.interpolate(
                    gaussian_blur(images[index : index + 1], sigma),
                    size=(side, side),
                    mode="bilinear",
                    align_corners=False,
                )
                images[index : index + 1] = F.interpolate(
                    reduced, size=(size, size), mode="bilinear", align_corners=False
                )
    if params.sharpen is not None:
        amount = params.sharpen.to(images).view(-1, 1, 1, 1)
        images = torch.addcmul(images, images - gaussian_blur(images, blur_sigma), amount)
    return images


def degrade_cpu(images: torch.Tensor, params: AugmentParams, blur_sigma: float) -> torch.Tensor:
    """:func:`degrade` for a CPU float batch ``[B, 1, S, S]``, with OpenCV per image, in place."""
    if params.downscale is None and params.sharpen is None:
        return images
    size = images.shape[-1]
    reductions = (
        _reductions(params.downscale, size) if params.downscale is not None else [(size, 0.0)] * len(images)
    )
    amounts = params.sharpen.tolist() if params.sharpen is not None else [0.0] * len(images)
    for image, (side, sigma), amount in zip(images[:, 0].numpy(), reductions, amounts, strict=True):
        if side < size:
            reduced = cv2.resize(_blur_cpu(image, sigma), (side, side), interpolation=cv2.INTER_LINEAR)
            image[...] = cv2.resize(reduced, (size, size), interpolation=cv2.INTER_LINEAR)
        if amount:
            cv2.addWeighted(image, 1.0 + amount, _blur_cpu(image, blur_sigma), -amount, 0.0, dst=image)
    return images


def _blur_cpu(image: np.ndarray, sigma: float) -> np.ndarray:
    """:func:`gaussian_blur` of one float32 image with OpenCV (same kernel and borders)."""
    side = 2 * _blur_radius(sigma, image.shape[-1]) + 1
    return cv2.GaussianBlur(image, (side, side), sigma, borderType=cv2.BORDER_REFLECT_101)


def _reductions(factors: torch.Tensor, size: int) -> list[tuple[int, float]]:
    """Per image: the reduced side and the anti-aliasing blur (pixels) before resampling to it."""
    sides = [max(2, min(size, round(size * factor))) for factor in factors.tolist()]
    return [(side, max(0.25, (size / side - 1.0) / 2.0)) for side in sides]


def _reduced_sides(factors: torch.Tensor, size: int) -> list[int]:
    return [max(2, min(size, round(size * factor))) for factor in factors.tolist()]


def _blur_radius(sigma: float, size: int) -> int:
    radius = max(1, math.ceil(3.0 * sigma))
    if radius >= size:
        raise ValueError(f"augment.blur_sigma {sigma} is too large for {size}-pixel images")
    return radius


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with a ``ceil(3 sigma)``-pixel radius (reflected borders), per channel."""
    radius = _blur_radius(sigma, images.shape[-1])
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def add_noise(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Additive Gaussian noise of per-sample standard deviation ``noise_std`` (drawn on the CPU from
    ``noise_seed``, so every device gets the same noise; shared by the channels), clamped to [0, 1]."""
    if params.noise_std is None:
        return images
    generator = torch.Generator().manual_seed(params.noise_seed)
    shape = (images.shape[0], 1, *images.shape[2:])  # one detector: the same noise in every channel
    noise = torch.randn(shape, generator=generator).to(images.device, images.dtype, non_blocking=True)
    noise.mul_(params.noise_std.to(images).view(-1, 1, 1, 1))
    return images.add_(noise).clamp_(0.0, 1.0)


def affine_matrices(params: AugmentParams) -> torch.Tensor:
    """The B x 2 x 3 matrices mapping output to input normalised coordinates (as ``F.affine_grid`` takes).

    The content is stretched (``aspect``), flipped, rotated, scaled and translated, then the crop window is
    read: an output point ``u`` reads the input at ``D^-1 R(-angle) (c + side * flip(u) - t) / scale`` with
    ``D = diag(sqrt(aspect), 1 / sqrt(aspect))``.
    """
    radians = params.angle_degrees.double() * (math.pi / 180.0)
    cos, sin = radians.cos(), radians.sin()
    inverse_rotation = torch.stack(
        [torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2
    )  # B x 2 x 2
    mirror = torch.ones(len(radians), 2, dtype=torch.float64)
    mirror[:, 0] = torch.where(params.flip, -1.0, 1.0)
    factor = (params.crop_side.double() / params.scale.double()).view(-1, 1, 1)
    linear = inverse_rotation * mirror.unsqueeze(1) * factor
    origin = (params.crop_centre.double() - params.translate.double()) / params.scale.double().unsqueeze(1)
    offset = torch.einsum("bij,bj->bi", inverse_rotation, origin)
    if params.aspect is not None:  # D^-1 scales the rows
        root = params.aspect.double().sqrt()
        unstretch = torch.stack([1.0 / root, root], dim=1)
        linear, offset = linear * unstretch.unsqueeze(2), offset * unstretch
    return torch.cat([linear, offset.unsqueeze(2)], dim=2).float()


def pixel_matrices(theta: torch.Tensor, in_size: int, out_size: int) -> np.ndarray:
    """``theta`` (output → input, normalised, ``align_corners=False``) as B x 2 x 3 pixel-space matrices
    mapping output pixel indices to input pixel coordinates (what ``cv2.warpAffine`` takes with
    ``WARP_INVERSE_MAP``)."""
    to_normalised = np.array(
        [[2 / out_size, 0, 1 / out_size - 1], [0, 2 / out_size, 1 / out_size - 1], [0, 0, 1]]
    )
    to_pixels = np.array([[in_size / 2, 0, (in_size - 1) / 2], [0, in_size / 2, (in_size - 1) / 2]])
    homogeneous = np.zeros((len(theta), 3, 3))
    homogeneous[:, :2] = theta.double().numpy()
    homogeneous[:, 2, 2] = 1.0
    return to_pixels @ homogeneous @ to_normalised


def warp_cpu(images: torch.Tensor, theta: torch.Tensor, out_size: int) -> torch.Tensor:
    """The same bilinear, zero-padded resampling as ``F.grid_sample`` over :func:`affine_grid`, done with
    OpenCV per image (several times faster on CPU; uint8 stays uint8 until the float output)."""
    matrices = pixel_matrices(theta, images.shape[-1], out_size)
    source = images[:, 0].numpy()
    out = np.empty((len(source), out_size, out_size), dtype=np.float32)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    for index, (image, matrix) in enumerate(zip(source, matrices, strict=True)):
        out[index] = cv2.warpAffine(image, matrix, (out_size, out_size), flags=flags, borderValue=0)
    return torch.from_numpy(out).unsqueeze(1)


def affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """``F.affine_grid(theta, (B, 1, size, size), align_corners=False)``, built separably.

    Same values, several times faster on CPU: each grid coordinate is ``a * x + b * y + c`` over the pixel
    centres, computed by broadcasting instead of a batched matrix product over every pixel.
    """
    centres = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1
    xs, ys = centres.view(1, 1, size), centres.view(1, size, 1)
    grid = torch.empty(theta.shape[0], size, size, 2, device=theta.device, dtype=theta.dtype)
    for axis in range(2):
        a, b, c = (theta[:, axis, k].view(-1, 1, 1) for k in range(3))
        torch.add(a * xs, b * ys + c, out=grid[..., axis])
    return grid


def _intensity(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """Brightness then contrast as one linear map per image, clamped to [0, 1] (in place).

    ``v = brightness * x`` then ``contrast * (v - mean(v)) + mean(v)``, i.e.
    ``x * brightness * contrast + (1 - contrast) * brightness * mean(x)``.
    """
    shape = (-1, 1, 1, 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    bias = mean * ((1.0 - contrast) * brightness).view(shape)
    return torch.addcmul(bias, images, (brightness * contrast).view(shape), out=images).clamp_(0.0, 1.0)


def mixup(
    images: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    num_classes: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018): every image blended with another of the batch (a random pairing) as
    ``λ x + (1 - λ) x'``, its targets likewise, with one ``λ ~ Beta(alpha, alpha)`` per batch.

    Float targets ``[B, L]`` mix as they are, so an unknown (NaN) target on either side stays unknown;
    class indices ``[B]`` (``ce``; negative = unknown) become one-hot rows first (NaN rows where unknown),
    which :class:`~cxrkit.training.losses.MaskedCrossEntropyLoss` reads as soft targets."""
    if alpha <= 0 or len(images) < 2:
        return images, targets
    seed = int(torch.randint(2**62, (1,), generator=generator).item())
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    pairing = torch.randperm(len(images), generator=generator).to(images.device)
    targets = as_rows(targets, num_classes)
    mixed = lam * images + (1.0 - lam) * images[pairing]
    return mixed, lam * targets + (1.0 - lam) * targets[pairing]


def eval_transform(images: torch.Tensor, crop_size: int, mode: str = "resize") -> torch.Tensor:
    """Deterministic validation/test transform of a float batch to ``crop_size``.

    ``resize`` (default) keeps the whole field of view (antialiased bilinear); ``center_crop`` keeps the
    central ``crop_size`` square.
    """
    _check_batch(images)
    size = images.shape[-1]
    if size == crop_size:
        return images
    if mode == "resize":
        return F.interpolate(
            images, size=(crop_size, crop_size), mode="bilinear", antialias=True, align_corners=False
        )
    if mode == "center_crop":
        if crop_size > size:
            raise ValueError(f"center_crop to {crop_size} needs images at least that large, got {size}")
        start = (size - crop_size) // 2
        return images[..., start : start + crop_size, start : start + crop_size]
    raise ValueError(f"eval_transform mode must be 'resize' or 'center_crop', got {mode!r}")


def _check_batch(images: torch.Tensor, *, allow_uint8: bool = False) -> None:
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"expected a batch of square images [B, C, S, S], got shape {tuple(images.shape)}")
    if not (images.is_floating_point() or (allow_uint8 and images.dtype == torch.uint8)):
        raise TypeError(f"expected float images in [0, 1], got dtype {images.dtype} (divide uint8 by 255)")


def _log_uniform(uniform, bounds: tuple[float, float]) -> torch.Tensor:
    low, high = (math.log(value) for value in bounds)
    return uniform(low, high).exp()


def _range(values, name: str, *, minimum: float, maximum: float = math.inf) -> tuple[float, float]:
    low, high = (float(v) for v in values)
    if not minimum <= low <= high <= maximum:
        raise ValueError(
            f"augment.{name} must be (low, high) with {minimum} <= low <= high <= {maximum}, got {values}"
        )
    return low, high


def _fraction(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"augment.{name} must be in [0, 1], got {value}")
    return value
