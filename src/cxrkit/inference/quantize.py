"""Optional int8 dynamic quantisation of the ONNX graph, kept only if validation AUROC barely moves."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

from cxrkit.inference.onnx_export import create_session, run_session

log = logging.getLogger(__name__)

MAX_AUROC_DROP = 0.005
Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class QuantizationReport:
    """Validation AUROC (mean over labels with both classes present) before and after quantisation."""

    auroc_fp32: float
    auroc_int8: float
    max_drop: float
    n_images: int
    labels_scored: list[str]

    @property
    def drop(self) -> float:
        return self.auroc_fp32 - self.auroc_int8

    @property
    def accepted(self) -> bool:
        return accept_quantization(self.auroc_fp32, self.auroc_int8, self.max_drop)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "drop": self.drop, "accepted": self.accepted}


def accept_quantization(auroc_fp32: float, auroc_int8: float, max_drop: float = MAX_AUROC_DROP) -> bool:
    """The gate: keep the int8 graph only if mean AUROC drops by strictly less than ``max_drop``."""
    if not (np.isfinite(auroc_fp32) and np.isfinite(auroc_int8)):
        return False
    return auroc_fp32 - auroc_int8 < max_drop


def mean_auroc(targets: np.ndarray, scores: np.ndarray, labels: Sequence[str]) -> tuple[float, list[str]]:
    """Mean AUROC over the labels whose known targets hold both classes (NaN targets = unknown, ignored)."""
    from cxrkit.evaluation.metrics import auroc  # scikit-learn: loaded only when a gate is evaluated

    values, scored = [], []
    for column, label in enumerate(labels):
        value = auroc(targets[:, column], scores[:, column])
        if np.isfinite(value):
            values.append(value)
            scored.append(label)
    if not values:
        raise ValueError("no label has both positive and negative validation images: AUROC is undefined")
    return float(np.mean(values)), scored


def quantize_onnx(fp32_model: bytes, weight_type: QuantType = QuantType.QInt8) -> bytes:
    """Dynamic (weights int8, activations quantised on the fly) quantisation of an ONNX graph."""
    with tempfile.TemporaryDirectory(prefix="cxrkit-quant-") as folder, _quiet_root_logger():
        source, prepared, target = (
            Path(folder) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx")
        )
        source.write_bytes(fp32_model)
        quant_pre_process(source, prepared, skip_symbolic_shape=True)  # shape inference + graph clean-up
        quantize_dynamic(prepared, target, weight_type=weight_type)
        return target.read_bytes()


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantiser logs one INFO line per tensor on the root logger; keep warnings only."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def _scores(model: bytes, images: np.ndarray, batch_size: int, transform: Transform | None) -> np.ndarray:
    session = create_session(model)
    logits = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        logits.append(run_session(session, transform(batch) if transform else batch))
    return np.concatenate(logits)


def evaluate_quantization(
    fp32_model: bytes,
    int8_model: bytes,
    images: np.ndarray,
    targets: np.ndarray,
    labels: Sequence[str],
    max_drop: float = MAX_AUROC_DROP,
    batch_size: int = 16,
    transform: Transform | None = None,
) -> QuantizationReport:
    """Score both graphs on validation ``images`` with ``targets`` [N,L] (1/0/NaN).

    ``images`` are model input (float [N,1,H,W] in [0, 1]) or anything ``transform`` turns, batch by
    batch, into it (e.g. uint8 cache images through :meth:`PreprocessSpec.model_input`). AUROC is
    rank-based, so logits serve as scores for sigmoid and softmax heads alike.
    """
    targets = np.asarray(targets, dtype=np.float64)
    auroc_fp32, scored = mean_auroc(targets, _scores(fp32_model, images, batch_size, transform), labels)
    auroc_int8, _ = mean_auroc(targets, _scores(int8_model, images, batch_size, transform), labels)
    report = QuantizationReport(auroc_fp32, auroc_int8, max_drop, len(images), scored)
    log.info(
        "int8 quantisation: validation AUROC %.4f -> %.4f (drop %.4f, limit %.4f) on %d images: %s",
        auroc_fp32,
        auroc_int8,
        report.drop,
        max_drop,
        len(images),
        "accepted" if report.accepted else "rejected",
    )
    return report
