"""The inference core: real NIH images through prepare_image and the Runner (PyTorch and ONNX Runtime) give
the probabilities of the network called directly on the training preprocessing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from bundles import tiny_bundle
from cxrkit.data.augment import eval_transform
from cxrkit.data.decode import Plausibility, read_image
from cxrkit.inference.bundle import Bundle
from cxrkit.inference.runner import Runner, activate, batches, prepare_image


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return tiny_bundle()


@pytest.fixture(scope="module")
def nih_files(nih_sample: Path) -> list[Path]:
    return sorted((nih_sample / "images").glob("*.png"))[:5]


@pytest.fixture(scope="module")
def cache_images(bundle: Bundle, nih_files: list[Path]) -> np.ndarray:
    return np.stack([bundle.preprocess.cache_image(read_image(path))[0] for path in nih_files])


def _direct(model: torch.nn.Module, cache_images: np.ndarray, crop: int) -> np.ndarray:
    """The network on the data module's evaluation input (uint8 / 255, eval_transform), sigmoid."""
    batch = eval_transform(torch.from_numpy(cache_images).float().div(255)[:, None], crop)
    with torch.no_grad():
        return torch.sigmoid(model.eval()(batch).double()).numpy()


def test_torch_and_onnx_runners_match_the_network_on_real_images(
    bundle: Bundle, cache_images: np.ndarray
) -> None:
    model = bundle.build_model()
    expected = _direct(model, cache_images, bundle.preprocess.crop_size)
    eager = Runner.from_torch(model, bundle.preprocess, "sigmoid")
    graph = Runner.from_onnx(bundle.onnx, bundle.preprocess, "sigmoid", threads=1)
    assert (eager.backend, graph.backend) == ("torch", "onnx")
    for runner, tolerance in ((eager, 1e-6), (graph, 1e-5)):
        scores = runner.predict(batches(cache_images, 2))  # 2 + 2 + 1: the short last batch too
        assert scores.shape == (len(cache_images), len(bundle.labels)) and scores.dtype == np.float64
        np.testing.assert_allclose(scores, expected, atol=tolerance)
        np.testing.assert_allclose(runner.probabilities(cache_images), expected, atol=tolerance)
    np.testing.assert_allclose(eager.logits(cache_images), graph.logits(cache_images), atol=1e-4)


def test_views_are_scored_per_view_and_softmax_rows_sum_to_one(
    bundle: Bundle, cache_images: np.ndarray
) -> None:
    model = bundle.build_model()
    runner = Runner.from_torch(model, bundle.preprocess, "softmax")
    views = runner.predict_views(batches(cache_images, 3), lambda batch: [batch, batch.flip(-1)])
    assert views.shape == (2, len(cache_images), len(bundle.labels))
    np.testing.assert_allclose(views.sum(axis=2), 1.0, atol=1e-12)
    np.testing.assert_allclose(views[0], runner.predict(batches(cache_images, 4)), atol=1e-12)
    flipped = cache_images[:, :, ::-1].copy()  # the eval transform commutes with a horizontal flip
    np.testing.assert_allclose(views[1], runner.predict(batches(flipped, 4)), atol=1e-5)
    assert not np.allclose(views[0], views[1])


def test_activate_is_sigmoid_or_softmax_and_nothing_else() -> None:
    logits = torch.tensor([[0.0, 2.0, -1.0]], dtype=torch.float64)
    assert torch.allclose(activate(logits, "sigmoid"), torch.sigmoid(logits))
    assert torch.allclose(activate(logits, "softmax"), torch.softmax(logits, dim=1))
    with pytest.raises(ValueError, match="activation must be one of"):
        activate(logits, "relu")


def test_runner_needs_one_backend_and_a_known_activation(bundle: Bundle) -> None:
    model = bundle.build_model()
    with pytest.raises(ValueError, match="activation"):
        Runner.from_torch(model, bundle.preprocess, "tanh")
    with pytest.raises(ValueError, match="exactly one"):
        Runner(bundle.preprocess, "sigmoid")
    with pytest.raises(ValueError, match="no images"):
        Runner.from_torch(model, bundle.preprocess, "sigmoid").predict(batches(np.zeros((0, 80, 80)), 2))


def test_prepare_image_reads_paths_bytes_and_file_objects_alike(
    bundle: Bundle, nih_files: list[Path]
) -> None:
    path = nih_files[0]
    data = path.read_bytes()
    from_path = prepare_image(path, str(path), bundle.preprocess, keep_image=True)
    assert from_path.error is None and from_path.image is not None
    with path.open("rb") as stream:
        for source in (data, bytearray(data), memoryview(data), io.BytesIO(data), stream):
            prepared = prepare_image(source, "upload.png", bundle.preprocess)
            assert prepared.error is None and prepared.source == "upload.png" and prepared.image is None
            assert np.array_equal(prepared.cache_image, from_path.cache_image)
            assert prepared.geometry == from_path.geometry
    truncated = prepare_image(data[:3000], "cut.png", bundle.preprocess)
    assert truncated.source == "cut.png" and truncated.cache_image is None and truncated.error
    tiny = prepare_image(
        np.zeros((20, 30), np.uint8), "array", bundle.preprocess, plausibility=Plausibility()
    )
    assert tiny.error is not None and "too small" in tiny.error
