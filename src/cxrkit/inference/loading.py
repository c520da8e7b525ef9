"""Load a trained network for inference: a ``cxr train`` run directory or a ``cxr export`` bundle.

>>> loaded = load_model("runs/nih-lite0", checkpoint="best")   # or load_model("model.cxr", config=...)
>>> scores = loaded.runner(device="auto").predict(batches(cache_images, 32))

:class:`LoadedModel` carries what every consumer (``cxr evaluate``, ``cxr explain``, external validation)
needs to run the network on its data and read its outputs: labels, activation, preprocessing, the run's
config (whose ``data`` section says where the images are) and, for a bundle, its operating thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cxrkit.config import RunConfig, load_config
from cxrkit.data.transforms import PreprocessSpec, cache_settings, describe_cache_settings
from cxrkit.evaluation.thresholds import OperatingPoints
from cxrkit.inference.bundle import MANIFEST, ZIP_SUFFIXES, Bundle
from cxrkit.inference.runner import Runner, task_for


@dataclass
class LoadedModel:
    """A trained network with what is needed to run it on its data and read its outputs."""

    path: Path
    kind: str  #: ``run`` or ``bundle``
    name: str
    model: nn.Module
    labels: list[str]
    activation: str  #: ``sigmoid`` (multi-label) or ``softmax`` (one label per image)
    preprocess: PreprocessSpec
    config: DictConfig  #: run config; its ``data`` section says where the images are
    tta: bool
    checkpoint: str | None = None  #: ``best``/``last`` for a run
    operating_points: OperatingPoints | None = None  #: the thresholds a bundle carries (for its backend)
    backend: str = "torch"  #: ``torch``, or the bundle's ``onnx`` / ``onnx-int8`` graph that is scored
    graph: bytes | None = None  #: that ONNX graph

    @property
    def task(self) -> str:
        return task_for(self.activation)

    def runner(self, device: str | torch.device = "auto") -> Runner:
        """The :class:`~cxrkit.inference.runner.Runner` of :attr:`backend`: the network on ``device``, or the
        ONNX graph on the CPU."""
        if self.graph is not None:
            return Runner.from_onnx(self.graph, self.preprocess, self.activation)
        return Runner.from_torch(self.model, self.preprocess, self.activation, device)


def is_bundle(path: str | Path) -> bool:
    """A bundle folder (holding bundle.json) or a bundle zip (.cxr / .zip)."""
    path = Path(path)
    return (path.is_dir() and (path / MANIFEST).is_file()) or (
        path.is_file() and path.suffix.lower() in ZIP_SUFFIXES
    )


def load_model(
    path: str | Path,
    checkpoint: str = "best",
    config: str | Path | DictConfig | None = None,
    backend: str = "auto",
) -> LoadedModel:
    """Load a ``cxr train`` run directory or a ``cxr export`` bundle.

    ``config``: a run config (YAML path or loaded) whose ``data`` section replaces the model's own, e.g. to
    evaluate on another dataset; required for a bundle whose provenance holds no training config.
    ``backend``: for a bundle, the graph to score (``auto``: the one ``cxr predict``/``cxr serve`` serve,
    with its own thresholds); a run has only its PyTorch network.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run directory or bundle not found: {path}")
    if is_bundle(path):
        loaded = _load_bundle(path, config, backend)
    elif path.is_dir() and (path / "config.yaml").is_file():
        if backend not in ("auto", "torch"):
            raise ValueError(f"{path} is a run directory (PyTorch only): --backend {backend} needs a bundle")
        loaded = _load_run(path, checkpoint)
    else:
        raise FileNotFoundError(
            f"{path} is neither a cxrkit run directory (no config.yaml) nor a model bundle (no {MANIFEST})"
        )
    if config is not None and loaded.kind == "run":
        loaded.config.data = _as_config(config).data
    return loaded


def _load_run(run_dir: Path, checkpoint: str) -> LoadedModel:
    from cxrkit.training.run import load_run_config, load_trained_model

    trained = load_trained_model(run_dir, checkpoint)
    config = load_run_config(run_dir)
    return LoadedModel(
        path=run_dir,
        kind="run",
        name=str(config.name),
        model=trained.model,
        labels=list(trained.labels),
        activation=trained.activation,
        preprocess=PreprocessSpec.from_data_config(config.data),
        config=config,
        tta=bool(config.train.tta),
        checkpoint=checkpoint,
    )


def _load_bundle(path: Path, config: str | Path | DictConfig | None, backend: str) -> LoadedModel:
    from cxrkit.inference.predictor import choose_backend

    bundle = Bundle.load(path)
    backend = choose_backend(bundle, backend)
    if config is not None:
        run_config = _as_config(config)
    elif bundle.provenance.get("config"):
        run_config = OmegaConf.merge(OmegaConf.structured(RunConfig), bundle.provenance["config"])
    else:
        raise ValueError(
            f"bundle {path} records no training config in its provenance: pass a config whose data "
            "section points at the images to evaluate (--config)"
        )
    cache = run_config.data.cache
    spec = bundle.preprocess
    configured = cache_settings(cache.image_size, cache.resize_policy, cache.get("intensity", "none"))
    if configured != spec.cache_settings:
        raise ValueError(
            f"the data config caches images at {describe_cache_settings(configured)} but bundle {path} "
            f"expects {describe_cache_settings(spec.cache_settings)}; set data.cache.image_size, "
            "resize_policy and intensity to match"
        )
    points = OperatingPoints(
        bundle.thresholds_for(backend),
        "fixed",
        source=f"bundle {bundle.model_id} v{bundle.version} ({backend})",
        extra={"threshold_source": bundle.threshold_source},
    )
    return LoadedModel(
        path=path,
        kind="bundle",
        name=f"{bundle.model_id} v{bundle.version}",
        model=bundle.build_model(),
        labels=list(bundle.labels),
        activation=bundle.activation,
        preprocess=spec,
        config=run_config,
        tta=False,
        operating_points=points,
        backend=backend,
        graph={"onnx": bundle.onnx, "onnx-int8": bundle.onnx_int8}.get(backend),
    )


def _as_config(config: str | Path | DictConfig) -> DictConfig:
    return config if isinstance(config, DictConfig) else load_config(config)
