"""The LightningModule that trains, validates and tests a chest X-ray classifier.

Batches are ``(images float [B, 1, H, W] in [0, 1], targets float [B, L] with NaN = unknown)``. Validation and
test log ``<split>/loss``, ``<split>/auroc/<label>`` (AUROC per label on the known targets only) and
``<split>/auroc_mean``, the mean over the findings that have both classes among their known targets ("No
Finding" is reported but left out of the mean unless it is the only label: the rule of the evaluation
report's mean, :func:`cxrkit.evaluation.metrics.mean_label_mask`). Labels without both classes are skipped
and named in the log.

Optimisers: ``adam``, ``adamw``, ``sgd`` (momentum), ``rmsprop``; biases and normalisation weights get no
weight decay. Schedules: ``cosine`` (linear warm-up then cosine decay) and ``onecycle``, stepped every
optimiser step; ``plateau`` (reduce the learning rate when ``train.monitor`` stops improving, stepped right
after each validation so its state is in the same checkpoint as the weights); ``none``. Staged fine-tuning is
applied at each epoch start (see :mod:`cxrkit.training.stages`). With ``train.tta`` the test step averages
the probabilities of deterministic views (the image, its 90 % centre crop and four 90 % corner crops, resized
back); no flips, because left and right are not interchangeable on a chest X-ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau
from torchmetrics import MeanMetric, Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

from cxrkit.data.labels import as_rows
from cxrkit.evaluation.metrics import mean_label_mask
from cxrkit.inference.runner import activate
from cxrkit.training.callbacks import monitor_mode
from cxrkit.training.losses import build_loss
from cxrkit.training.stages import (
    apply_stage,
    frozen_batchnorms,
    resolve_stages,
    stage_at,
    staged_lr_lambda,
    total_epochs,
)

OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd", "rmsprop")
TTA_CROP_FRACTION = 0.9
CHECKPOINT_METADATA_KEY = "cxrkit"


class MaskedMultilabelAUROC(Metric):
    """AUROC per label over the entries whose target is known (not NaN); synchronised across processes."""

    full_state_update = False

    def __init__(self, labels: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.labels = list(labels)
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, targets: Tensor) -> None:
        self.probs.append(probs.detach().float())
        self.targets.append(targets.detach().float())

    def compute(self) -> dict[str, Tensor]:
        """AUROC of every label with both classes among its known targets (labels without are left out)."""
        if isinstance(self.probs, list) and not self.probs:  # after a distributed sync the states are tensors
            return {}
        probs, targets = dim_zero_cat(self.probs), dim_zero_cat(self.targets)
        results = {}
        for index, label in enumerate(self.labels):
            known = ~torch.isnan(targets[:, index])
            label_targets = targets[known, index].long()
            if label_targets.numel() and 0 < int(label_targets.sum()) < label_targets.numel():
                results[label] = binary_auroc(probs[known, index], label_targets)
        return results


def mean_over_findings(aurocs: dict[str, Tensor], labels: Sequence[str]) -> Tensor:
    """Mean AUROC over the defined labels that the report's mean counts (``No Finding`` only when it is the
    only label); NaN when none is defined."""
    counted = [label for label, keep in zip(labels, mean_label_mask(labels), strict=True) if keep]
    findings = [aurocs[label] for label in counted if label in aurocs]
    return torch.stack(findings).mean() if findings else torch.tensor(float("nan"))


def tta_views(images: Tensor, fraction: float = TTA_CROP_FRACTION) -> list[Tensor]:
    """The image, its centre crop and its four corner crops (``fraction`` of each side), resized back."""
    height, width = images.shape[-2:]
    crop_h, crop_w = round(height * fraction), round(width * fraction)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    origins = [
        (top, left),
        (0, 0),
        (0, width - crop_w),
        (height - crop_h, 0),
        (height - crop_h, width - crop_w),
    ]
    views = [images]
    for y, x in origins:
        crop = images[..., y : y + crop_h, x : x + crop_w]
        views.append(F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False))
    return views


def build_optimizer(optimizer_cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser of ``train.optimizer`` over all parameters of ``model`` (frozen ones get no gradient)."""
    name, lr, decay = optimizer_cfg.name, float(optimizer_cfg.lr), float(optimizer_cfg.weight_decay)
    groups = param_groups_weight_decay(model, weight_decay=decay) if decay > 0 else model.parameters()
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(optimizer_cfg.betas), weight_decay=decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optimizer_cfg.betas), weight_decay=decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(optimizer_cfg.momentum), weight_decay=decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=float(optimizer_cfg.momentum), weight_decay=decay)
    raise ValueError(f"train.optimizer.name must be one of {list(OPTIMIZERS)}, got {name!r}")


def activation_for(loss_name: str) -> str:
    """``softmax`` for the single-label ``ce`` loss, ``sigmoid`` for every multi-label loss."""
    return "softmax" if loss_name == "ce" else "sigmoid"


class CXRClassifier(LightningModule):
    """Wraps a network (images -> logits over ``labels``) with losses, metrics, optimisation and stages.

    ``label_frequencies`` (positive fraction per label on the training split) is needed by ``weighted_bce``;
    ``metadata`` (labels, resolved run config) is stored in every checkpoint under ``"cxrkit"`` so a
    checkpoint can be used on its own.
    """

    def __init__(
        self,
        model: nn.Module,
        labels: Sequence[str],
        train_cfg: Any,
        label_frequencies: Sequence[float] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.labels = list(labels)
        self.train_cfg = train_cfg
        self.stages = resolve_stages(train_cfg)
        self.losses = nn.ModuleList(build_loss(stage.loss, label_frequencies) for stage in self.stages)
        activations = {activation_for(stage.loss.name) for stage in self.stages}
        if len(activations) > 1:
            raise ValueError("train.stages mix the single-label 'ce' loss with multi-label losses")
        self.activation = activations.pop()
        self.metadata = {"labels": self.labels, "activation": self.activation, **(metadata or {})}
        self.val_auroc = MaskedMultilabelAUROC(self.labels)
        self.test_auroc = MaskedMultilabelAUROC(self.labels)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.stage_index = 0
        self._announced_stage = -1
        self._frozen_bn: list[nn.Module] = []
        self.plateau: ReduceLROnPlateau | None = None
        self._plateau_state: dict[str, Any] | None = None
        monitors = ["val/loss", "val/auroc_mean", *(f"val/auroc/{label}" for label in self.labels)]
        if train_cfg.monitor not in monitors:
            raise ValueError(
                f"train.monitor must be val/loss, val/auroc_mean or val/auroc/<label> with a label of "
                f"{self.labels}; got {train_cfg.monitor!r}"
            )
        if train_cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        if self.train_cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def probabilities(self, logits: Tensor) -> Tensor:
        return activate(logits.float(), self.activation)

    def predict_probabilities(self, images: Tensor, tta: bool = False) -> Tensor:
        """Class probabilities, averaged over :func:`tta_views` when ``tta``."""
        probs = self.probabilities(self(images))
        return self._average_over_views(images, probs) if tta else probs

    def _average_over_views(self, images: Tensor, probs: Tensor) -> Tensor:
        """Mean of ``probs`` (those of ``images`` itself) and the probabilities of the other TTA views."""
        others = [self.probabilities(self(view)) for view in tta_views(images)[1:]]
        return torch.stack([probs, *others]).mean(dim=0)

    @property
    def loss_fn(self) -> nn.Module:
        return self.losses[self.stage_index]

    # ---- stages --------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.train_cfg.compile:
            self.model.compile()

    def on_train_start(self) -> None:
        self._enter_stage(self.current_epoch, set_lr=False)

    def on_train_epoch_start(self) -> None:
        stage = stage_at(self.stages, self.current_epoch)
        self._enter_stage(self.current_epoch, set_lr=self.current_epoch == stage.start_epoch)
        self.log("train/stage", float(stage.index), on_step=False, on_epoch=True)

    def _enter_stage(self, epoch: int, set_lr: bool) -> None:
        stage = stage_at(self.stages, epoch)
        self.stage_index = stage.index
        trainable, frozen = apply_stage(self.model, stage)
        self._frozen_bn = frozen_batchnorms(self.model) if stage.freeze_bn_stats else []
        self.train(self.training)
        if set_lr and self.train_cfg.scheduler.name in ("plateau", "none"):
            for group in self.trainer.optimizers[0].param_groups:
                group["lr"] = stage.lr
            if self.plateau is not None:
                self.plateau.best = self.plateau.mode_worse
                self.plateau.num_bad_epochs = 0
                self.plateau.cooldown_counter = 0
        if stage.index != self._announced_stage and len(self.stages) > 1:
            self._announced_stage = stage.index
            rank_zero_info(
                f"stage {stage.index} '{stage.name}' (epochs {stage.start_epoch}-{stage.end_epoch - 1}):"
                f" {trainable:,} trainable and {frozen:,} frozen parameters, lr {stage.lr:g},"
                f" loss {stage.loss.name}"
            )

    def train(self, mode: bool = True) -> CXRClassifier:
        super().train(mode)
        for layer in self._frozen_bn:
            layer.eval()
        return self

    # ---- steps ---------------------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        loss = self.loss_fn(self(images), targets)
        self.log(
            "train/loss",
            loss,
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(images),
            sync_dist=True,
        )
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate_batch(batch, self.val_loss, self.val_auroc, tta=False)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate_batch(batch, self.test_loss, self.test_auroc, tta=self.train_cfg.tta)

    def _evaluate_batch(
        self, batch: tuple[Tensor, Tensor], loss_metric: MeanMetric, auroc_metric: Metric, tta: bool
    ) -> None:
        images, targets = batch
        logits = self(images)
        loss_metric.update(self.loss_fn(logits, targets), weight=len(images))
        probs = self.probabilities(logits)
        if tta:
            probs = self._average_over_views(images, probs)
        auroc_metric.update(probs, as_rows(targets, probs.shape[1]))  # ce: each class against the rest

    def on_validation_epoch_end(self) -> None:
        metrics = self._log_epoch_metrics("val", self.val_loss, self.val_auroc)
        if self.plateau is not None and not self.trainer.sanity_checking:
            self.plateau.step(float(metrics[self.train_cfg.monitor]))

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test", self.test_loss, self.test_auroc)

    def _log_epoch_metrics(
        self, split: str, loss_metric: MeanMetric, auroc_metric: MaskedMultilabelAUROC
    ) -> dict[str, Tensor]:
        """Log ``<split>/loss``, ``<split>/auroc/<label>`` (NaN when skipped) and ``<split>/auroc_mean``."""
        aurocs = auroc_metric.compute()
        nan = torch.tensor(float("nan"), device=self.device)
        metrics = {f"{split}/auroc/{label}": aurocs.get(label, nan) for label in self.labels}
        metrics[f"{split}/auroc_mean"] = mean_over_findings(aurocs, self.labels)
        metrics[f"{split}/loss"] = loss_metric.compute()
        auroc_metric.reset()
        loss_metric.reset()
        for name, value in metrics.items():
            self.log(name, value, sync_dist=True)  # already equal on every rank; silences Lightning's warning
        skipped = [label for label in self.labels if label not in aurocs]
        if skipped and not self.trainer.sanity_checking:
            rank_zero_info(f"{split} AUROC skipped for labels without both classes: {', '.join(skipped)}")
        return metrics

    # ---- optimisation --------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.train_cfg.optimizer, self.model)
        scheduler_cfg = self.train_cfg.scheduler
        if scheduler_cfg.name in ("cosine", "onecycle"):
            steps_per_epoch = max(
                1, int(self.trainer.estimated_stepping_batches) // total_epochs(self.stages)
            )
            schedule = staged_lr_lambda(
                scheduler_cfg, self.stages, float(self.train_cfg.optimizer.lr), steps_per_epoch
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"},
            }
        if scheduler_cfg.name == "plateau":
            self.plateau = ReduceLROnPlateau(
                optimizer,
                mode=monitor_mode(self.train_cfg.monitor),
                factor=scheduler_cfg.factor,
                patience=scheduler_cfg.patience,
                min_lr=scheduler_cfg.min_lr,
            )
            if self._plateau_state is not None:
                self.plateau.load_state_dict(self._plateau_state)
        return optimizer

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_METADATA_KEY] = {**self.metadata, "stage_index": self.stage_index}
        if self.plateau is not None:
            checkpoint["plateau_scheduler"] = self.plateau.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._plateau_state = checkpoint.get("plateau_scheduler")
        self.stage_index = checkpoint.get(CHECKPOINT_METADATA_KEY, {}).get("stage_index", 0)
