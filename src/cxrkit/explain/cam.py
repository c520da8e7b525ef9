"""Class activation maps for multi-label chest X-ray classifiers, through pytorch-grad-cam.

>>> result = explain(model, images, targets="topk", k=3, method="gradcam")
>>> result.heatmaps.shape            # [B, 3, H, W], each map in [0, 1]
>>> result.targets[0]                # the label indices explained for image 0

Targets are the raw logits (``ClassifierOutputTarget``): each finding is an independent sigmoid output, so
the gradient of one logit explains that finding alone (no softmax coupling between findings). Every map is
min-max normalised per image by pytorch-grad-cam, so maps are comparable in shape, not in magnitude; the
target's probability is returned alongside.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from cxrkit.inference.runner import activate
from cxrkit.models.factory import CXRModel, cam_reshape_transform, cam_target_layer

#: pytorch-grad-cam methods by cxrkit name. All share the (model, target_layers, reshape_transform) signature.
CAM_METHODS: dict[str, type] = {
    "gradcam": pgc.GradCAM,
    "gradcam++": pgc.GradCAMPlusPlus,
    "hirescam": pgc.HiResCAM,
    "gradcam-elementwise": pgc.GradCAMElementWise,
    "xgradcam": pgc.XGradCAM,
    "layercam": pgc.LayerCAM,
    "eigencam": pgc.EigenCAM,
    "eigengradcam": pgc.EigenGradCAM,
    "scorecam": pgc.ScoreCAM,
    "ablationcam": pgc.AblationCAM,
    "shapleycam": pgc.ShapleyCAM,
    "fullgrad": pgc.FullGrad,
    "fem": pgc.FEM,
    "kpca-cam": pgc.KPCA_CAM,
    "random": pgc.RandomCAM,
}
_ALIASES: dict[str, str] = {"gradcampp": "gradcam++", "gradcamplusplus": "gradcam++"}
#: Methods whose maps do not depend on the explained label (they summarise the activations only).
CLASS_AGNOSTIC: frozenset[str] = frozenset({"eigencam", "kpca-cam", "fem"})

Targets = Sequence[int] | Sequence[Sequence[int]] | Tensor | Literal["topk"]


@dataclass
class Explanation:
    """Heatmaps for ``B`` images and ``n`` targets each, at model-input resolution."""

    heatmaps: Tensor  #: [B, n, H, W] float32 in [0, 1]
    targets: Tensor  #: [B, n] int64 label index explained by each map
    probabilities: Tensor  #: [B, n] probability of the explained label (the model's activation)
    method: str
    target_layer: str


def method_name(method: str) -> str:
    """Canonical name in :data:`CAM_METHODS` for ``method`` (case, ``-`` and ``_`` are ignored)."""
    key = method.strip().lower()
    if key in CAM_METHODS:
        return key
    compact = key.replace("-", "").replace("_", "").replace(" ", "")
    for name in CAM_METHODS:
        if name.replace("-", "") == compact:
            return name
    if compact in _ALIASES:
        return _ALIASES[compact]
    raise ValueError(f"unknown CAM method {method!r}; choose one of {sorted(CAM_METHODS)}")


def resolve_target_layer(model: nn.Module, target_layer: str | nn.Module | None = None) -> nn.Module:
    """The layer whose activations are explained.

    ``target_layer``: a module, or a dotted module name (``backbone.features.denseblock4``; inside a cxrkit
    model the ``backbone.`` prefix may be omitted), or None for the per-architecture default of
    :func:`cxrkit.models.factory.cam_target_layer` (cxrkit models only: other networks must name a layer).
    """
    if isinstance(target_layer, nn.Module):
        return target_layer
    if isinstance(model, CXRModel):
        return cam_target_layer(model, target_layer)
    if target_layer is None:
        raise ValueError(
            f"{type(model).__name__} is not a cxrkit model (cxrkit.models.factory.create_model):"
            " name its CAM target layer, e.g. target_layer='layer4'"
        )
    try:
        return model.get_submodule(target_layer)
    except AttributeError as error:
        top = [name for name, _ in model.named_children()]
        message = f"{type(model).__name__} has no module {target_layer!r}; its top-level modules are {top}"
        raise ValueError(message) from error


def select_targets(logits: Tensor, targets: Targets, k: int = 3) -> Tensor:
    """Label indices to explain, ``[B, n]``.

    ``targets``: ``"topk"`` (each image's ``k`` highest logits, highest first); a list of indices explained
    in every image; or a ``[B, n]`` tensor / nested list giving each image its own ``n`` indices.
    """
    batch, num_classes = logits.shape
    if _is_topk(targets, k, num_classes):
        return logits.detach().topk(k, dim=1).indices.cpu()
    return _fixed_targets(targets, batch, num_classes)


def _is_topk(targets: Targets, k: int, num_classes: int | None) -> bool:
    if not isinstance(targets, str):
        return False
    if targets != "topk":
        raise ValueError(f"targets must be label indices or 'topk', got {targets!r}")
    if k < 1 or (num_classes is not None and k > num_classes):
        raise ValueError(f"k must be in 1..{num_classes} (the number of outputs), got {k}")
    return True


def _fixed_targets(targets: Targets, batch: int, num_classes: int) -> Tensor:
    chosen = torch.as_tensor(targets, dtype=torch.int64).cpu()
    if chosen.ndim == 1:
        chosen = chosen.repeat(batch, 1)
    if chosen.ndim != 2 or chosen.shape[0] != batch or chosen.shape[1] == 0:
        raise ValueError(
            f"targets must be n >= 1 label indices or a [B={batch}, n] table of them, "
            f"got shape {tuple(chosen.shape)}"
        )
    bad = sorted({int(i) for i in chosen.flatten() if not 0 <= int(i) < num_classes})
    if bad:
        raise ValueError(
            f"target label indices {bad} are out of range for a model with {num_classes} outputs"
        )
    return chosen


class RankedLogitTarget:
    """The logit ranked ``rank`` (0 = highest) in an image's output: a top-k target that needs no separate
    forward pass to know which label it is."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self, output: Tensor) -> Tensor:
        return output.topk(self.rank + 1, dim=-1).values[..., self.rank]


def explain(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "topk",
    method: str = "gradcam",
    k: int = 3,
    target_layer: str | nn.Module | None = None,
    *,
    aug_smooth: bool = False,
    eigen_smooth: bool = False,
    activation: str = "sigmoid",
) -> Explanation:
    """Explain ``images`` (float ``[B, 1, H, W]`` in [0, 1], as the model takes them) with a CAM ``method``.

    ``targets`` is a list of label indices explained in every image, a ``[B, n]`` table of per-image
    indices, or ``"topk"`` for each image's ``k`` highest logits (see :func:`select_targets`).
    The batch goes through the network once per target slot; gradients are taken with respect to the target
    layer's activations only (parameter gradients are not computed, which makes the backward pass cheap).
    ``aug_smooth`` averages over flip/brightness test-time augmentation; ``eigen_smooth`` keeps the first
    principal component. ``activation`` (the model's, :func:`cxrkit.inference.runner.activate`) turns the
    logits into the returned probabilities. The model is put in eval mode for the call and restored after.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    name = method_name(method)
    layer = resolve_target_layer(model, target_layer)
    layer_name = _module_name(model, layer)
    num_classes = getattr(model, "num_classes", None)
    topk = _is_topk(targets, k, num_classes if isinstance(num_classes, int) else None)
    was_training = model.training
    model.eval()
    images = images.to(device=next(model.parameters()).device, dtype=torch.float32)
    logits = chosen = None
    try:
        if aug_smooth or not (topk or isinstance(num_classes, int)):  # logits needed before the CAM passes
            with torch.no_grad():
                logits = model(images).detach()
            chosen = select_targets(logits, targets, k)
        elif not topk:
            chosen = _fixed_targets(targets, images.shape[0], num_classes)
        maps = []
        with _activation_gradients_only(model, layer, name), torch.enable_grad():
            cam = _build_cam(name, model, layer, layer_name)
            try:
                for slot in range(k if chosen is None else chosen.shape[1]):
                    if chosen is None:
                        cam_targets = [RankedLogitTarget(slot)] * images.shape[0]
                    else:
                        cam_targets = [ClassifierOutputTarget(int(i)) for i in chosen[:, slot]]
                    maps.append(cam(images, cam_targets, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth))
                    if logits is None:
                        logits = cam.outputs.detach()
                        chosen = select_targets(logits, targets, k)
            finally:
                cam.activations_and_grads.release()
                model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    probabilities = activate(logits.float().cpu(), activation).gather(1, chosen)
    heatmaps = torch.from_numpy(np.clip(np.stack(maps, axis=1), 0.0, 1.0).astype(np.float32))
    return Explanation(heatmaps, chosen, probabilities, name, layer_name)


#: Methods that need gradients beyond the target layer's activations (input or bias gradients).
_FULL_GRAPH_METHODS = frozenset({"fullgrad", "shapleycam"})


@contextmanager
def _activation_gradients_only(model: nn.Module, layer: nn.Module, method: str) -> Iterator[None]:
    """Freeze every parameter and make the target layer's output a leaf that requires grad, so backward
    runs from the logits to that layer only; restores the parameters' flags afterwards."""
    if method in _FULL_GRAPH_METHODS:
        yield
        return
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]

    def require_grad(_module: nn.Module, _inputs: object, output: object) -> object:
        if isinstance(output, Tensor) and not output.requires_grad:
            return output.detach().requires_grad_(True)
        return output

    handle = layer.register_forward_hook(require_grad)
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        handle.remove()
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def _build_cam(name: str, model: nn.Module, layer: nn.Module, layer_name: str) -> BaseCAM:
    reshape = cam_reshape_transform(model, layer_name) if isinstance(model, CXRModel) else None
    if name == "fullgrad":  # uses every conv/bn bias instead of one layer
        return pgc.FullGrad(model, [], reshape_transform=reshape)
    return CAM_METHODS[name](model, [layer], reshape_transform=reshape)


def _module_name(model: nn.Module, layer: nn.Module) -> str:
    name = next((name for name, module in model.named_modules() if module is layer), None)
    if name is None:
        raise ValueError(f"CAM target layer {type(layer).__name__} is not a module of the model")
    return name
