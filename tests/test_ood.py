"""Out-of-distribution detector (cxrkit.inference.ood): cosine distance to the k-th nearest training image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from scipy.spatial.distance import cdist

from cxrkit.config import load_config
from cxrkit.data.decode import read_image
from cxrkit.data.transforms import PreprocessSpec
from cxrkit.inference.ood import OODDetector, OutdatedDetector, pooled_features
from cxrkit.models.factory import create_model


def _features(n: int, dim: int = 40, seed: int = 0, centre: int = 0) -> np.ndarray:
    """Non-negative, correlated features around one of two directions (like pooled ReLU features)."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(dim, dim)) / np.sqrt(dim)
    mean = np.random.default_rng(100 + centre).uniform(0.0, 2.0, size=dim)
    return np.abs(mean + 0.3 * rng.normal(size=(n, dim)) @ mixing)


def test_threshold_is_the_validation_quantile_and_far_points_are_flagged():
    detector = OODDetector.fit(_features(400, seed=1), _features(1000, seed=2), quantile=0.99)
    assert detector.flag(_features(1000, seed=2)).mean() == pytest.approx(0.01, abs=0.002)
    assert detector.flag(_features(4000, seed=3)).mean() < 0.03  # unseen in-distribution points: about 1 %
    assert detector.flag(_features(200, seed=4, centre=1)).mean() > 0.95
    assert detector.n_fit == 400 and detector.n_calibration == 1000 and detector.k == 20  # 5 %


def test_score_is_the_cosine_distance_to_the_kth_nearest_training_image():
    train = _features(300)
    detector = OODDetector.fit(train, _features(50, seed=5), k=7)
    points = _features(5, seed=6)
    expected = np.sort(cdist(points, train, metric="cosine"), axis=1)[:, 6]
    np.testing.assert_allclose(detector.score(points), expected, atol=2e-3)  # the bank is kept in float16
    np.testing.assert_allclose(detector.score(points * 10), detector.score(points), atol=1e-6)  # scale-free


def test_k_is_capped_at_the_bank_and_more_dimensions_than_images_fit():
    detector = OODDetector.fit(_features(30, dim=100), _features(30, dim=100, seed=7), k=50)
    assert detector.k == 30 and np.isfinite(detector.threshold)
    assert np.isfinite(detector.score(_features(3, dim=100))).all()
    assert detector.score(np.zeros((1, 100)))[0] == pytest.approx(1.0)  # no direction: orthogonal to all


def test_save_and_load_plain_arrays_round_trip(tmp_path):
    detector = OODDetector.fit(_features(100), _features(40, seed=8), k=5)
    arrays, meta = detector.save(tmp_path / "ood")
    info = json.loads(meta.read_text())
    assert arrays.name == "ood.safetensors" and info["threshold"] == detector.threshold and info["k"] == 5
    loaded = OODDetector.load(tmp_path / "ood")
    points = _features(10, seed=9)
    np.testing.assert_array_equal(loaded.score(points), detector.score(points))
    assert (loaded.quantile, loaded.k, loaded.n_fit) == (detector.quantile, 5, 100)


def test_bad_input_and_files_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="finite"):
        OODDetector.fit(np.full((5, 3), np.nan), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="feature sizes"):
        OODDetector.fit(_features(10, dim=3), _features(5, dim=4))
    with pytest.raises(ValueError, match="quantile"):
        OODDetector.fit(_features(10), _features(5), quantile=1.0)
    with pytest.raises(ValueError, match="k must be"):
        OODDetector.fit(_features(10), _features(5), k=0)
    detector = OODDetector.fit(_features(50), _features(20, seed=3))
    with pytest.raises(ValueError, match="expected 40 features"):
        detector.score(np.zeros((1, 3)))
    with pytest.raises(FileNotFoundError, match=r"absent\.safetensors"):
        OODDetector.load(tmp_path / "absent")
    detector.save(tmp_path / "ood")
    save_file({"bank": np.zeros((3, 40), np.float16)}, str(tmp_path / "ood.safetensors"))
    with pytest.raises(ValueError, match="bank of shape"):
        OODDetector.load(tmp_path / "ood")
    save_file({"mean": np.zeros(40)}, str(tmp_path / "ood.safetensors"))
    with pytest.raises(ValueError, match="needs a 'bank'"):
        OODDetector.load(tmp_path / "ood")
    (tmp_path / "ood.json").write_text(json.dumps({"format": "cxrkit-ood-mahalanobis/1"}))
    with pytest.raises(OutdatedDetector, match="earlier cxrkit"):
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
