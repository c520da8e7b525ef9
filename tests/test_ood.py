"""Out-of-distribution detector (cxrkit.inference.ood): Mahalanobis distance with Ledoit-Wolf shrinkage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from scipy.spatial.distance import mahalanobis

from cxrkit.config import load_config
from cxrkit.data.decode import read_image
from cxrkit.data.transforms import PreprocessSpec
from cxrkit.inference.ood import OODDetector, pooled_features
from cxrkit.models.factory import create_model


def _gaussian(n: int, dim: int = 40, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(dim, dim)) / np.sqrt(dim)  # correlated features
    return rng.normal(size=(n, dim)) @ mixing + shift


def test_threshold_is_the_validation_quantile_and_far_points_are_flagged():
    detector = OODDetector.fit(_gaussian(400, seed=1), _gaussian(1000, seed=2), quantile=0.99)
    assert detector.flag(_gaussian(1000, seed=2)).mean() == pytest.approx(0.01, abs=0.002)
    fresh = detector.flag(_gaussian(4000, seed=3)).mean()
    assert fresh < 0.03  # unseen in-distribution points: about 1 %
    assert detector.flag(_gaussian(200, seed=4, shift=1.5)).mean() > 0.95
    assert 0 < detector.shrinkage < 1 and detector.n_fit == 400 and detector.n_calibration == 1000


def test_score_is_the_mahalanobis_distance_of_the_shrunk_covariance():
    detector = OODDetector.fit(_gaussian(300), _gaussian(50, seed=5))
    points = _gaussian(5, seed=6)
    expected = [mahalanobis(p, detector.mean, detector.precision) for p in points]
    np.testing.assert_allclose(detector.score(points), expected, rtol=1e-9)


def test_more_dimensions_than_images_still_fit():
    detector = OODDetector.fit(_gaussian(30, dim=100), _gaussian(30, dim=100, seed=7))
    assert np.isfinite(detector.threshold) and np.isfinite(detector.score(_gaussian(3, dim=100))).all()


def test_save_and_load_plain_arrays_round_trip(tmp_path):
    detector = OODDetector.fit(_gaussian(100), _gaussian(40, seed=8))
    arrays, meta = detector.save(tmp_path / "ood")
    assert (
        arrays.name == "ood.safetensors" and json.loads(meta.read_text())["threshold"] == detector.threshold
    )
    loaded = OODDetector.load(tmp_path / "ood")
    points = _gaussian(10, seed=9)
    np.testing.assert_array_equal(loaded.score(points), detector.score(points))
    assert loaded.quantile == detector.quantile


def test_bad_input_and_files_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="finite"):
        OODDetector.fit(np.full((5, 3), np.nan), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="feature sizes"):
        OODDetector.fit(_gaussian(10, dim=3), _gaussian(5, dim=4))
    with pytest.raises(ValueError, match="quantile"):
        OODDetector.fit(_gaussian(10), _gaussian(5), quantile=1.0)
    detector = OODDetector.fit(_gaussian(50), _gaussian(20, seed=3))
    with pytest.raises(ValueError, match="expected 40 features"):
        detector.score(np.zeros((1, 3)))
    with pytest.raises(FileNotFoundError, match=r"absent\.safetensors"):
        OODDetector.load(tmp_path / "absent")
    detector.save(tmp_path / "ood")
    save_file({"mean": np.zeros(40)}, str(tmp_path / "ood.safetensors"))
    with pytest.raises(ValueError, match="precision"):
        OODDetector.load(tmp_path / "ood")
    (tmp_path / "ood.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a cxrkit OOD detector"):
        OODDetector.load(tmp_path / "ood")


def test_pooled_features_average_the_backbone_feature_map(tiny_data_root):
    config = load_config(None, ["model.arch=test_resnet", "model.pretrained.source=none"])
    model = create_model(config.model, 2).eval()
    spec = PreprocessSpec(64, "letterbox", 56, "resize")
    paths = sorted((tiny_data_root / "pneumonia" / "train" / "NORMAL").glob("*.jpeg"))[:3]
    images = spec.model_input(np.stack([spec.cache_image(read_image(p))[0] for p in paths]))
    features = pooled_features(model, images, batch_size=2)
    with torch.inference_mode():
        expected = model.forward_features(torch.from_numpy(images)).mean(dim=(2, 3)).double().numpy()
    assert features.shape == expected.shape and features.dtype == np.float64
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
