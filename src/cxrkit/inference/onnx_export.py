"""Export a network to ONNX (dynamic batch) and run it with ONNX Runtime.

The graph takes ``image``: float32 ``[batch, 1, crop, crop]`` in [0, 1] (normalisation is inside the network,
as in PyTorch) and returns ``logits``: float32 ``[batch, num_classes]``; bundles' graphs also return
``features``: float32 ``[batch, C]``, the pooled backbone features the out-of-distribution detector scores
(:mod:`cxrkit.inference.ood`), from the same forward pass. A bundle's spatial size is fixed, so TF-style
"SAME" padding (timm's ``*Same`` layers, e.g. in ``tf_efficientnet_*``) is exported as constant padding,
not as the per-call shape arithmetic that ONNX Runtime cannot fold and that slows fp32 and int8 alike.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrkit.extras import require
from cxrkit.inference.ood import has_features

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
FEATURES_NAME = "features"
MIN_OPSET = 17


class _WithFeatures(nn.Module):
    """A CXRModel returning its logits and its pooled backbone features from one forward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_with_features(images)


class _ConstantPadThen(nn.Module):
    """``layer`` (a timm ``*Same`` layer, whose own padding is 0) after a constant ``pads`` padding: the
    padding its forward computes from the input size, fixed for one size."""

    def __init__(self, layer: nn.Module, pads: tuple[int, int, int, int], value: float) -> None:
        super().__init__()
        self.layer, self.pads, self.value = layer, pads, value
        self.torch_layer = next(cls for cls in type(layer).__mro__ if cls.__module__.startswith("torch.nn"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.torch_layer.forward(self.layer, F.pad(x, self.pads, value=self.value))


def _same_padding_layers() -> dict[type, float]:
    """timm's dynamic "SAME" layers and the value each pads with."""
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

    return {Conv2dSame: 0.0, AvgPool2dSame: 0.0, MaxPool2dSame: float("-inf")}


def with_static_padding(model: nn.Module, crop_size: int) -> nn.Module:
    """A copy of ``model`` whose dynamic "SAME" layers pad by constants fixed for ``crop_size`` inputs
    (the same numbers; ``model`` itself is left as it is)."""
    from timm.layers.padding import pad_same_arg

    values = _same_padding_layers()
    model = copy.deepcopy(model).eval()
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            sizes[name] = tuple(args[0].shape[-2:])

        return hook

    hooks = [
        module.register_forward_pre_hook(record(name))
        for name, module in model.named_modules()
        if type(module) in values
    ]
    if not hooks:
        return model
    with torch.no_grad():
        model(torch.zeros(1, 1, crop_size, crop_size))
    for hook in hooks:
        hook.remove()
    for name, size in sizes.items():
        parent_name, _, child = name.rpartition(".")
        parent, layer = model.get_submodule(parent_name), model.get_submodule(name)
        dilation = getattr(layer, "dilation", (1, 1))
        pads = pad_same_arg(list(size), list(layer.kernel_size), list(layer.stride), list(dilation))
        setattr(parent, child, _ConstantPadThen(layer, tuple(pads), values[type(layer)]))
    return model


def export_onnx(
    model: nn.Module, path: str | Path, crop_size: int, opset: int = MIN_OPSET, features: bool = False
) -> Path:
    """Trace ``model`` (eval mode, on CPU) to an ONNX file with a dynamic batch axis and check the graph;
    ``features`` adds the ``features`` output (when the model has ``forward_with_features``)."""
    if opset < MIN_OPSET:
        raise ValueError(f"ONNX opset must be >= {MIN_OPSET}, got {opset}")
    onnx = require("onnx", "ONNX export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = with_static_padding(model.eval().cpu(), crop_size)
    example = torch.rand(2, 1, crop_size, crop_size)
    outputs = [OUTPUT_NAME]
    if features and has_features(model):
        model, outputs = _WithFeatures(model).eval(), [OUTPUT_NAME, FEATURES_NAME]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
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
        source = initializers[node.input[0]]
        copy = type(source)()  # an onnx.TensorProto
        copy.CopyFrom(source)
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
    ort = require("onnxruntime", "ONNX inference")
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


def has_features_output(session: ort.InferenceSession) -> bool:
    """Whether the graph returns the pooled ``features`` next to its logits."""
    return FEATURES_NAME in {output.name for output in session.get_outputs()}


def run_session_features(session: ort.InferenceSession, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits and pooled features of a float32 batch ``[B, 1, H, W]`` (a graph with ``features``)."""
    batch = np.ascontiguousarray(images, dtype=np.float32)
    logits, features = session.run([OUTPUT_NAME, FEATURES_NAME], {INPUT_NAME: batch})
    return logits, features
