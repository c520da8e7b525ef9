"""The model bundle: everything needed to run a trained model, and nothing that executes on load.

A bundle is a folder or a zip file (``model.cxr``) holding:

=====================  ==============================================================================
``bundle.json``        manifest: model id and version, labels, operating thresholds (and where they came
                       from), output activation, preprocessing spec, architecture (the ``model`` config
                       section), training provenance, SHA-256 of every other file, quantisation report
``weights.safetensors`` network weights (state dict of :func:`cxrkit.models.factory.create_model`)
``model.onnx``         optional ONNX graph, opset >= 17: ``image`` [B,1,crop,crop] → ``logits`` (dynamic B)
``model.int8.onnx``    optional static int8 graph, present only if it passed the per-finding AUROC gate; its
                       own thresholds and measured speed are in the manifest's quantisation report
``ood.safetensors``    optional out-of-distribution detector (:mod:`cxrkit.inference.ood`): the unit
``ood.json``           pooled features of training images, k, threshold and quantile; a bundle without them
                       (or with an earlier detector format) loads and reports no out-of-distribution score
=====================  ==============================================================================

Loading reads JSON, safetensors and ONNX bytes only (never pickle), checks every file's SHA-256 and ignores
nothing silently: an unknown member, a missing field or a digest mismatch is an error naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from cxrkit.data.transforms import PreprocessSpec, PreprocessSpecError
from cxrkit.inference.ood import OODDetector, OutdatedDetector
from cxrkit.inference.runner import ACTIVATIONS
from cxrkit.models.config import ModelConfig

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "cxrkit-bundle"
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
WEIGHTS = "weights.safetensors"
ONNX = "model.onnx"
ONNX_INT8 = "model.int8.onnx"
OOD_ARRAYS = "ood.safetensors"
OOD_META = "ood.json"
MEMBERS = (MANIFEST, WEIGHTS, ONNX, ONNX_INT8, OOD_ARRAYS, OOD_META)
ZIP_SUFFIXES = (".cxr", ".zip")


class BundleError(ValueError):
    """A bundle that is missing, malformed or fails its integrity checks."""


@dataclass
class Bundle:
    """A loaded bundle: metadata, weights (CPU tensors) and optional ONNX graphs (bytes)."""

    model_id: str
    version: str
    labels: list[str]
    thresholds: dict[str, float]
    threshold_source: str
    activation: str
    preprocess: PreprocessSpec
    model_config: dict[str, Any]
    provenance: dict[str, Any]
    weights: dict[str, torch.Tensor]
    onnx: bytes | None = None
    onnx_int8: bytes | None = None
    quantization: dict[str, Any] | None = None
    onnx_parity: float | None = None
    ood: OODDetector | None = None
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.labels = [str(label) for label in self.labels]
        missing = [label for label in self.labels if label not in self.thresholds]
        if missing:
            raise BundleError(f"bundle has no operating threshold for labels {missing}")
        if self.activation not in ACTIVATIONS:
            raise BundleError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        self.thresholds = {label: float(self.thresholds[label]) for label in self.labels}

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def int8_preferred(self) -> bool:
        """Whether ``backend=auto`` serves the int8 graph: it passed the gate and was measured faster."""
        return self.onnx_int8 is not None and bool((self.quantization or {}).get("preferred"))

    def thresholds_for(self, backend: str) -> dict[str, float]:
        """The operating thresholds of the graph ``backend`` serves: the int8 graph's own (chosen on
        validation for it at export), else :attr:`thresholds`."""
        if backend != "onnx-int8":
            return dict(self.thresholds)
        own = (self.quantization or {}).get("thresholds")
        if not isinstance(own, dict) or any(label not in own for label in self.labels):
            raise BundleError(
                f"bundle {self.source}: its int8 graph has no operating thresholds of its own (exported "
                "by an older cxrkit); re-export it with --quantize"
            )
        return {label: float(own[label]) for label in self.labels}

    def ood_for(self, backend: str) -> OODDetector | None:
        """The out-of-distribution detector as the graph ``backend`` serves it. The int8 graph's features
        differ a little from fp32's, so it has its own threshold (the same validation quantile of its own
        scores, chosen at export: ``quantization["ood_threshold"]``); older bundles keep the shared one."""
        own = (self.quantization or {}).get("ood_threshold")
        if self.ood is None or backend != "onnx-int8" or own is None:
            return self.ood
        return dataclasses.replace(self.ood, threshold=float(own))

    def network_config(self) -> Any:
        """The ``model`` config section as a validated OmegaConf object, with pretrained loading disabled
        (the bundle's weights replace any initialisation)."""
        config = OmegaConf.merge(OmegaConf.structured(ModelConfig), self.model_config)
        config.pretrained.source = "none"
        return config

    def build_model(self) -> nn.Module:
        """The PyTorch network with the bundle's weights, in eval mode (strict key and shape match)."""
        from cxrkit.models.factory import create_model

        model = create_model(self.network_config(), self.num_classes)
        try:
            model.load_state_dict(self.weights, strict=True)
        except RuntimeError as error:
            arch = self.model_config.get("arch")
            raise BundleError(f"weights do not fit architecture {arch!r}: {error}") from error
        return model.eval()

    def manifest(self, digests: dict[str, str]) -> dict[str, Any]:
        """The ``bundle.json`` content; ``digests`` maps member names to their SHA-256."""
        return {
            "format": BUNDLE_FORMAT,
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "version": self.version,
            "labels": self.labels,
            "activation": self.activation,
            "thresholds": self.thresholds,
            "threshold_source": self.threshold_source,
            "preprocess": self.preprocess.to_dict(),
            "model": self.model_config,
            "provenance": self.provenance,
            "onnx_parity_max_abs_logit_diff": self.onnx_parity,
            "quantization": self.quantization,
            "files": {name: {"sha256": digest} for name, digest in digests.items()},
        }

    def members(self) -> dict[str, bytes]:
        """File name → bytes of everything but the manifest."""
        files = {WEIGHTS: save_safetensors({k: v.contiguous() for k, v in self.weights.items()})}
        if self.onnx is not None:
            files[ONNX] = self.onnx
        if self.onnx_int8 is not None:
            files[ONNX_INT8] = self.onnx_int8
        if self.ood is not None:
            files[OOD_ARRAYS], files[OOD_META] = self.ood.to_bytes()
        return files

    def save(self, path: str | Path) -> Path:
        """Write a zip when ``path`` ends in .cxr or .zip, else a folder."""
        path = Path(path)
        files = self.members()
        digests = {name: _sha256(data) for name, data in files.items()}
        files[MANIFEST] = json.dumps(self.manifest(digests), indent=2, sort_keys=False).encode()
        if path.suffix.lower() in ZIP_SUFFIXES:
            path.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for name in MEMBERS:
                    if name in files:
                        archive.writestr(name, files[name])
        else:
            path.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (path / name).write_bytes(data)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        """Read a bundle folder or zip (JSON + safetensors + ONNX bytes; nothing is unpickled)."""
        files = _read_members(Path(path))
        manifest = _parse_manifest(files.pop(MANIFEST), path)
        declared = manifest["files"]
        for name, data in files.items():
            expected = declared.get(name, {}).get("sha256")
            if expected is None:
                raise BundleError(f"{path}: member {name} is not listed in {MANIFEST}")
            if _sha256(data) != expected:
                raise BundleError(f"{path}: {name} is corrupt (SHA-256 does not match {MANIFEST})")
        absent = [name for name in declared if name not in files]
        if absent:
            raise BundleError(f"{path}: files listed in {MANIFEST} are missing: {absent}")
        try:
            preprocess = PreprocessSpec.from_dict(manifest["preprocess"])
        except PreprocessSpecError as error:
            raise BundleError(f"{path}: {MANIFEST} preprocess: {error}") from error
        return cls(
            model_id=manifest["model_id"],
            version=manifest["version"],
            labels=manifest["labels"],
            thresholds=manifest["thresholds"],
            threshold_source=manifest["threshold_source"],
            activation=manifest["activation"],
            preprocess=preprocess,
            model_config=manifest["model"],
            provenance=manifest["provenance"],
            weights=load_safetensors(files[WEIGHTS]),
            onnx=files.get(ONNX),
            onnx_int8=files.get(ONNX_INT8),
            quantization=manifest.get("quantization"),
            onnx_parity=manifest.get("onnx_parity_max_abs_logit_diff"),
            ood=_read_ood(files, path),
            source=str(path),
        )


def _read_ood(files: dict[str, bytes], path: str | Path) -> OODDetector | None:
    """The out-of-distribution detector members, None when the bundle has none or an outdated one (older
    bundles; a warning says so)."""
    present = [name for name in (OOD_ARRAYS, OOD_META) if name in files]
    if not present:
        return None
    if len(present) == 1:
        raise BundleError(f"{path}: {present[0]} without ({OOD_ARRAYS} and {OOD_META} together)")
    try:
        return OODDetector.from_bytes(files[OOD_ARRAYS], files[OOD_META], f"{path}: {OOD_META}")
    except OutdatedDetector as error:
        log.warning("%s; predictions carry no out-of-distribution flag until it is re-exported", error)
        return None
    except (ValueError, KeyError) as error:
        raise BundleError(f"{path}: out-of-distribution detector: {error}") from error


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_REQUIRED = (
    "format",
    "format_version",
    "model_id",
    "version",
    "labels",
    "activation",
    "thresholds",
    "threshold_source",
    "preprocess",
    "model",
    "provenance",
    "files",
)


def _parse_manifest(data: bytes, path: str | Path) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{path}: {MANIFEST} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a cxrkit bundle ({MANIFEST} lacks format={BUNDLE_FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {manifest.get('format_version')} is not supported "
            f"(this cxrkit reads version {FORMAT_VERSION})"
        )
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise BundleError(f"{path}: {MANIFEST} is missing fields {missing}")
    if WEIGHTS not in manifest["files"]:
        raise BundleError(f"{path}: {MANIFEST} lists no {WEIGHTS}")
    return manifest


def _read_members(path: Path) -> dict[str, bytes]:
    """Known members of a zip or folder, read into memory (nothing is extracted to disk)."""
    if not path.exists():
        raise BundleError(f"bundle not found: {path}")
    if path.is_dir():
        names = {child.name for child in path.iterdir() if child.is_file()}
        _check_names(names, path)
        return {name: (path / name).read_bytes() for name in MEMBERS if name in names}
    if not zipfile.is_zipfile(path):
        raise BundleError(f"{path} is neither a bundle folder nor a zip file")
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        _check_names(names, path)
        return {name: archive.read(name) for name in MEMBERS if name in names}


def _check_names(names: set[str], path: Path) -> None:
    if MANIFEST not in names:
        raise BundleError(f"{path}: no {MANIFEST} (not a cxrkit bundle)")
    unknown = sorted(names - set(MEMBERS))
    if unknown:
        raise BundleError(f"{path}: unexpected files {unknown} (a bundle holds only {list(MEMBERS)})")
