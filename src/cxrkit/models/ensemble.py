"""Several trained networks of one architecture served as one model, one bundle and one ONNX graph.

:class:`EnsembleModel` runs every member on the batch and returns the mean of their logits (for sigmoid
outputs: the pooled log-odds, i.e. the geometric mean of the members' odds; for softmax: the normalised
geometric mean of their class probabilities). It is an ordinary ``nn.Module`` with images in and logits out,
so the bundle, ONNX export, predictor and server treat it like a single network; its pooled features (for
the out-of-distribution detector) are the members' side by side.

A bundle stores it as the members' ``model`` config with ``ensemble_size: N`` and weights
``members.<i>.<name>``; :func:`cxrkit.models.factory.create_model` builds it back from that config.
:func:`ensemble_runs` makes such a bundle from ``cxr train`` runs of one recipe (different seeds): its
operating thresholds are fitted on the ensemble's own validation scores. Grad-CAM heatmaps are not
available for an ensemble.

>>> bundle = ensemble_runs(["runs/pneumonia-s0", "runs/pneumonia-s1"], "ensemble.cxr", onnx=True)

From the command line: ``cxr export runs/pneumonia-s0 runs/pneumonia-s1 --out ensemble.cxr --format onnx``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

MEMBERS_PREFIX = "members"


class EnsembleModel(nn.Module):
    """The mean of the members' logits; ``members`` must map the same input to the same outputs."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        first = members[0]
        self.arch = getattr(first, "arch", type(first).__name__)
        self.in_chans = getattr(first, "in_chans", None)
        self.num_classes = getattr(first, "num_classes", None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(images) for member in self.members]).mean(dim=0)

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """The members' pooled backbone features side by side ``[B, sum C]``."""
        return torch.cat([member.pooled_features(images) for member in self.members], dim=1)

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean logits and :meth:`pooled_features` from one pass of every member."""
        logits, features = zip(
            *(member.forward_with_features(images) for member in self.members), strict=True
        )
        return torch.stack(logits).mean(dim=0), torch.cat(features, dim=1)


def create_ensemble(cfg, num_classes: int) -> EnsembleModel:
    """``cfg.ensemble_size`` networks of the model config ``cfg`` (each as ``ensemble_size: 1``)."""
    from omegaconf import OmegaConf

    from cxrkit.models.factory import create_model

    member = OmegaConf.merge(cfg, {"ensemble_size": 1})
    return EnsembleModel([create_model(member, num_classes) for _ in range(int(cfg.ensemble_size))])


def member_weights(weights: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The state dict of an :class:`EnsembleModel` from its members' state dicts, in order."""
    return {
        f"{MEMBERS_PREFIX}.{index}.{name}": value
        for index, state in enumerate(weights)
        for name, value in state.items()
    }


def ensemble_runs(
    runs: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    checkpoint: str = "best",
    threshold_method: str = "youden",
    onnx: bool = False,
    quantize: bool = False,
    max_auroc_drop: float | None = None,
    opset: int = 17,
    ood: bool = True,
    model_id: str | None = None,
    version: str | None = None,
):
    """One bundle holding the networks of ``runs`` as an :class:`EnsembleModel`; written to ``out`` if given.

    The runs must share labels, activation, preprocessing, architecture and data split (seeds may differ).
    Thresholds are chosen on the validation split stored by the first run with ``threshold_method``, from
    the ensemble's scores; ``onnx``, ``quantize`` and ``ood`` add what they add to a single run's bundle
    (:func:`cxrkit.inference.export.add_graphs`; the detector scores the members' pooled features side by
    side).
    """
    from cxrkit.inference.bundle import Bundle, BundleError
    from cxrkit.inference.export import (
        add_graphs,
        run_bundle,
        run_validation,
        validation_thresholds,
        weights_digest,
    )
    from cxrkit.training.run import load_run_config

    if len(runs) < 2:
        raise ValueError(f"an ensemble needs at least two runs, got {len(runs)}")
    members = [run_bundle(run, checkpoint=checkpoint) for run in runs]
    configs = [load_run_config(run) for run in runs]
    first = members[0]
    for run, member, config in zip(runs, members, configs, strict=True):
        _check_compatible(run, member, first, config.data.split, configs[0].data.split, BundleError)
    weights = member_weights([member.weights for member in members])
    bundle = Bundle(
        model_id=model_id or f"{first.model_id}-ensemble{len(members)}",
        version=version or f"{datetime.now(UTC):%Y%m%d}-{weights_digest(weights)[:8]}",
        labels=list(first.labels),
        thresholds=dict(first.thresholds),
        threshold_source="default",
        activation=first.activation,
        preprocess=first.preprocess,
        model_config={**first.model_config, "ensemble_size": len(members)},
        provenance={
            "ensemble": "mean of the members' logits",
            "members": [member.provenance for member in members],
            "config": first.provenance.get("config"),
        },
        weights=weights,
    )
    model = bundle.build_model()
    validation = run_validation(runs[0], bundle.labels)
    bundle.thresholds, bundle.threshold_source = validation_thresholds(
        bundle, model, validation, threshold_method
    )
    add_graphs(
        bundle,
        model,
        validation,
        onnx=onnx,
        quantize=quantize,
        threshold_method=threshold_method,
        max_auroc_drop=max_auroc_drop,
        opset=opset,
        ood=ood,
    )
    if out is not None:
        bundle.save(out)
    return bundle


def _check_compatible(run, member, first, split, first_split, error: type[Exception]) -> None:
    """Members must be interchangeable networks scored on the same validation patients."""
    fields = {
        "labels": (member.labels, first.labels),
        "activation": (member.activation, first.activation),
        "preprocessing": (member.preprocess, first.preprocess),
        "architecture": (_architecture(member.model_config), _architecture(first.model_config)),
        "data split": (split, first_split),
    }
    for name, (value, expected) in fields.items():
        if value != expected:
            raise error(f"run {run} differs from the first run in its {name}: {value} vs {expected}")


def _architecture(model_config: dict) -> dict:
    """What decides the network's shape (initial weights do not)."""
    return {key: value for key, value in model_config.items() if key != "pretrained"}
