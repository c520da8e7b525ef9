"""The int8 ONNX graph for CPU serving: what is served is what was evaluated.

* Static (QDQ) quantisation (``onnxruntime.quantization.quantize_static``): weights and activations int8,
  activation ranges calibrated on images of the run's **training** split (never validation, which judges it).
* The gate: the int8 graph is kept only when **every** finding's validation AUROC drops by at most
  ``max_drop`` (0.005); a mean would hide one finding that collapses.
* Its own operating thresholds, re-chosen on validation from the int8 graph's probabilities with the same
  method as the fp32 ones: int8 shifts probabilities, so an fp32 threshold is another operating point there.
* Its measured speed: throughput of both graphs at batch 16 on this machine, so that ``backend=auto`` prefers
  int8 only when it was accepted **and** measured faster.

Parameters follow ONNX Runtime's CPU guidance: uint8 activations, int8 per-channel weights, QDQ format, and
7-bit weights (``reduce_range``) on x86 CPUs without VNNI, whose 8-bit dot products can saturate.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrkit.extras import require
from cxrkit.inference.onnx_export import create_session, run_session

log = logging.getLogger(__name__)

MAX_AUROC_DROP = 0.005
CALIBRATION_IMAGES = 128
SPEED_BATCH = 16
#: uint8 cache images [B, S, S] -> float32 model input [B, 1, crop, crop]
Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class QuantizationReport:
    """The int8 graph against the fp32 one on validation, its thresholds and its measured speed."""

    auroc_fp32: dict[str, float]  #: per finding (NaN where validation lacks a class)
    auroc_int8: dict[str, float]
    max_drop: float
    n_images: int  #: validation images scored
    n_calibration: int  #: training images the activation ranges were calibrated on
    thresholds: dict[str, float]  #: operating thresholds chosen on validation for the int8 graph
    threshold_method: str
    images_per_s_fp32: float  #: ONNX Runtime, batch SPEED_BATCH, this machine at export time
    images_per_s_int8: float
    settings: dict[str, Any]

    @property
    def drops(self) -> dict[str, float]:
        """AUROC lost per finding scored (fp32 − int8)."""
        return {
            label: self.auroc_fp32[label] - self.auroc_int8[label]
            for label in self.auroc_fp32
            if np.isfinite(self.auroc_fp32[label])
        }

    @property
    def worst_drop(self) -> float:
        return max(self.drops.values(), default=float("nan"))

    @property
    def accepted(self) -> bool:
        return accept_quantization(self.auroc_fp32, self.auroc_int8, self.max_drop)

    @property
    def speedup(self) -> float:
        return self.images_per_s_int8 / self.images_per_s_fp32

    @property
    def preferred(self) -> bool:
        """Whether ``backend=auto`` serves the int8 graph: accepted and measured faster than fp32."""
        return self.accepted and self.speedup > 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "drops": self.drops,
            "worst_drop": self.worst_drop,
            "accepted": self.accepted,
            "speedup": self.speedup,
            "preferred": self.preferred,
        }


def accept_quantization(
    auroc_fp32: dict[str, float], auroc_int8: dict[str, float], max_drop: float = MAX_AUROC_DROP
) -> bool:
    """The gate: every finding scored on validation loses at most ``max_drop`` AUROC (and one is scored);
    a drop equal to the limit up to float rounding passes."""
    scored = [label for label, value in auroc_fp32.items() if np.isfinite(value)]
    return bool(scored) and all(
        np.isfinite(auroc_int8[label]) and auroc_fp32[label] - auroc_int8[label] <= max_drop + 1e-12
        for label in scored
    )


def per_finding_auroc(targets: np.ndarray, scores: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """AUROC per label (NaN targets = unknown, ignored; NaN where a label lacks a class)."""
    from cxrkit.evaluation.metrics import auroc

    values = {
        label: float(auroc(targets[:, column], scores[:, column])) for column, label in enumerate(labels)
    }
    if not any(np.isfinite(value) for value in values.values()):
        raise ValueError("no label has both positive and negative validation images: AUROC is undefined")
    return values


def has_vnni() -> bool:
    """Whether this x86 CPU has 8-bit dot-product instructions (AVX-512 VNNI or AVX-VNNI)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text().split()
        return "avx512_vnni" in flags or "avx_vnni" in flags
    return False


class CalibrationImages:
    """An ONNX Runtime ``CalibrationDataReader`` over uint8 cache images, as model input batches."""

    def __init__(self, images: np.ndarray, transform: Transform, input_name: str, batch_size: int = 16):
        self.images, self.transform, self.input_name, self.batch_size = (
            images,
            transform,
            input_name,
            batch_size,
        )
        self.start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= len(self.images):
            return None
        batch = self.images[self.start : self.start + self.batch_size]
        self.start += self.batch_size
        return {self.input_name: np.ascontiguousarray(self.transform(batch), dtype=np.float32)}

    def rewind(self) -> None:
        self.start = 0


def quantize_static_onnx(
    fp32_model: bytes, calibration: np.ndarray, transform: Transform, reduce_range: bool | None = None
) -> tuple[bytes, dict[str, Any]]:
    """Static QDQ int8 quantisation of ``fp32_model`` with activation ranges from ``calibration`` (uint8
    cache images through ``transform``); returns the graph and the settings used."""
    quantization = require("onnxruntime.quantization", "int8 quantisation")
    reduce_range = not has_vnni() if reduce_range is None else reduce_range
    settings = {
        "method": "static",
        "format": "QDQ",
        "activations": "uint8",
        "weights": "int8 per channel",
        "reduce_range": reduce_range,
        "calibration": "minmax",
    }
    input_name = create_session(fp32_model, threads=1).get_inputs()[0].name
    with tempfile.TemporaryDirectory(prefix="cxrkit-quant-") as folder, _quiet_root_logger():
        source, prepared, target = (
            Path(folder) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx")
        )
        source.write_bytes(fp32_model)
        quantization.quant_pre_process(source, prepared, skip_symbolic_shape=True)
        quantization.quantize_static(
            prepared,
            target,
            CalibrationImages(calibration, transform, input_name),
            quant_format=quantization.QuantFormat.QDQ,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
            per_channel=True,
            reduce_range=reduce_range,
            calibrate_method=quantization.CalibrationMethod.MinMax,
        )
        return target.read_bytes(), settings


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


def onnx_logits(model: bytes, images: np.ndarray, transform: Transform, batch_size: int = 16) -> np.ndarray:
    """Logits ``[N, L]`` (float64) of an ONNX graph for uint8 cache images ``[N, S, S]``."""
    session = create_session(model)
    outputs = [
        run_session(session, transform(images[start : start + batch_size]))
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(outputs).astype(np.float64)


def throughput(models: Sequence[bytes], batch: np.ndarray, seconds: float = 3.0) -> list[float]:
    """Images per second of each graph on ``batch`` (model input), measured in alternation (a shared CPU's
    load then weighs on all alike); the best of several rounds per graph."""
    sessions = [create_session(model) for model in models]
    for session in sessions:  # warm-up
        run_session(session, batch)
    best = [0.0] * len(sessions)
    deadline = time.perf_counter() + seconds * len(sessions)
    while time.perf_counter() < deadline:
        for index, session in enumerate(sessions):
            start = time.perf_counter()
            run_session(session, batch)
            best[index] = max(best[index], len(batch) / (time.perf_counter() - start))
    return best


def quantize_for_serving(
    fp32_model: bytes,
    calibration: np.ndarray,
    validation: np.ndarray,
    targets: np.ndarray,
    patient_ids: np.ndarray,
    labels: Sequence[str],
    activation: str,
    transform: Transform,
    threshold_method: str = "youden",
    max_drop: float = MAX_AUROC_DROP,
) -> tuple[bytes, QuantizationReport]:
    """The int8 graph of ``fp32_model`` and its report: calibrated on ``calibration`` (uint8 training images),
    judged and given thresholds on ``validation`` (uint8 images, ``targets`` [N, L] with NaN = unknown)."""
    import torch

    from cxrkit.evaluation.metrics import Predictions
    from cxrkit.evaluation.thresholds import OperatingPoints
    from cxrkit.inference.runner import activate, task_for

    if not len(calibration):
        raise ValueError("int8 calibration needs training images; the run's training split is empty")
    int8_model, settings = quantize_static_onnx(fp32_model, calibration, transform)
    targets = np.asarray(targets, dtype=np.float64)
    logits = {
        name: onnx_logits(model, validation, transform)
        for name, model in (("fp32", fp32_model), ("int8", int8_model))
    }
    auroc = {name: per_finding_auroc(targets, values, labels) for name, values in logits.items()}
    probabilities = activate(torch.from_numpy(logits["int8"]), activation).numpy()
    predictions = Predictions(targets, probabilities, patient_ids, list(labels), task=task_for(activation))
    points = OperatingPoints.fit(predictions, method=threshold_method)
    speed_batch = transform(calibration[:SPEED_BATCH]).astype(np.float32)
    fp32_speed, int8_speed = throughput([fp32_model, int8_model], speed_batch)
    report = QuantizationReport(
        auroc["fp32"],
        auroc["int8"],
        max_drop,
        len(validation),
        len(calibration),
        points.thresholds,
        threshold_method,
        fp32_speed,
        int8_speed,
        settings,
    )
    log.info(
        "int8 (static QDQ, %d calibration images): worst per-finding validation AUROC drop %.4f (limit %.4f) "
        "on %d images: %s; %.0f vs %.0f images/s at batch %d (%.2fx)",
        len(calibration),
        report.worst_drop,
        max_drop,
        len(validation),
        "accepted" if report.accepted else "rejected",
        int8_speed,
        fp32_speed,
        len(speed_batch),
        report.speedup,
    )
    return int8_model, report
