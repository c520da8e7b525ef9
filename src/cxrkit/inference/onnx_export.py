"""Export a network to ONNX (dynamic batch) and run it with ONNX Runtime.

The graph takes ``image``: float32 ``[batch, 1, crop, crop]`` in [0, 1] (normalisation is inside the network,
as in PyTorch) and returns ``logits``: float32 ``[batch, num_classes]``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
MIN_OPSET = 17


def export_onnx(model: nn.Module, path: str | Path, crop_size: int, opset: int = MIN_OPSET) -> Path:
    """Trace ``model`` (eval mode, on CPU) to an ONNX file with a dynamic batch axis and check the graph."""
    if opset < MIN_OPSET:
        raise ValueError(f"ONNX opset must be >= {MIN_OPSET}, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    example = torch.rand(2, 1, crop_size, crop_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    graph = onnx.load(str(path))
    _inline_identity_initializers(graph.graph)
    onnx.save(graph, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return path


def _inline_identity_initializers(graph: onnx.GraphProto) -> None:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer.

    The exporter deduplicates equal weights (e.g. zero-initialised residual branches) through Identity
    nodes; operators reached that way have no initializer of their own, which ONNX Runtime's quantiser
    requires.
    """
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    aliases = [node for node in graph.node if node.op_type == "Identity" and node.input[0] in initializers]
    for node in aliases:
        copy = onnx.TensorProto()
        copy.CopyFrom(initializers[node.input[0]])
        copy.name = node.output[0]
        graph.initializer.append(copy)
        graph.node.remove(node)


def create_session(
    model: str | Path | bytes, threads: int | None = None, spinning: bool = False
) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with all graph optimisations and one intra-op thread per core.

    ``spinning`` lets idle pool threads busy-wait for the next call: slightly lower latency on an otherwise
    idle machine, but it takes cores from image decoding running alongside, so it is off by default.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def run_session(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    """Logits for a float32 batch ``[B, 1, H, W]``."""
    batch = np.ascontiguousarray(images, dtype=np.float32)
    return session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


def max_logit_difference(model: nn.Module, session: ort.InferenceSession, images: np.ndarray) -> float:
    """Largest |logit(PyTorch) - logit(ONNX Runtime)| over a batch of preprocessed images."""
    with torch.no_grad():
        reference = model.eval()(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).numpy()
    return float(np.abs(reference - run_session(session, images)).max())
