"""Contrast normalisation in the cache step (``data.cache.intensity``): what it does to real radiographs, that
the training cache and every inference path apply the same one, and that caches and bundles record it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bundles import tiny_bundle
from cxrkit.config import load_config
from cxrkit.data.cache import CacheMismatchError, open_cache
from cxrkit.data.decode import read_image
from cxrkit.data.transforms import INTENSITY_MODES, PreprocessSpec, PreprocessSpecError, adjust_intensity
from cxrkit.inference.loading import load_model
from cxrkit.inference.predictor import Predictor
from cxrkit.inference.runner import prepare_image
from test_cache import build, make_manifest


@pytest.fixture(scope="module")
def nih_images(nih_sample: Path) -> list[Path]:
    return sorted((nih_sample / "images").glob("*.png"))[:2]


@pytest.fixture(scope="module")
def kermany_image(shared_data: Path) -> np.ndarray:
    return read_image(sorted((shared_data / "pneumonia" / "test" / "NORMAL").glob("*.jpeg"))[0])


def _local_contrast(image: np.ndarray, tile: int = 32) -> float:
    """Mean standard deviation of ``tile``-pixel blocks: what adaptive equalisation raises."""
    height, width = (s // tile * tile for s in image.shape)
    blocks = image[:height, :width].reshape(height // tile, tile, width // tile, tile).astype(float)
    return float(blocks.std(axis=(1, 3)).mean())


def test_none_is_the_identity_and_unknown_modes_are_refused(kermany_image: np.ndarray) -> None:
    assert adjust_intensity(kermany_image, "none") is kermany_image
    with pytest.raises(ValueError, match="intensity must be one of"):
        adjust_intensity(kermany_image, "gamma")
    with pytest.raises(PreprocessSpecError, match="intensity"):
        PreprocessSpec(64, "letterbox", 64, intensity="clahe2")


def test_equalisation_spreads_histograms_and_clahe_raises_local_contrast(
    kermany_image: np.ndarray,
) -> None:
    dim = (kermany_image.astype(float) * 0.4 + 60).astype(np.uint8)  # an under-exposed, flat copy
    equalised = adjust_intensity(dim, "equalize")
    assert equalised.shape == dim.shape and equalised.dtype == np.uint8
    assert np.ptp(equalised) > 240 > np.ptp(dim)
    clahe = adjust_intensity(dim, "clahe")
    assert _local_contrast(clahe) > 1.5 * _local_contrast(dim)
    # the same anatomy, not a new image: rank order of intensities is largely kept
    assert np.corrcoef(clahe.ravel(), dim.ravel())[0, 1] > 0.7


@pytest.mark.parametrize("mode", INTENSITY_MODES)
def test_the_cache_and_inference_prepare_an_image_alike(
    mode: str,
    nih_images: list[Path],
    tmp_path: Path,
) -> None:
    build(make_manifest(nih_images), tmp_path / "cache", image_size=48, intensity=mode)
    cache = open_cache(tmp_path / "cache")
    spec = PreprocessSpec(48, "letterbox", 40, intensity=mode)
    assert cache.settings == spec.cache_settings and cache.intensity == mode
    for row, path in enumerate(cache.manifest.frame["path"]):
        prepared = prepare_image(Path(path).read_bytes(), Path(path).name, spec)  # as uploaded
        assert np.array_equal(cache.image(row), prepared.cache_image)


def test_letterbox_padding_stays_black(tmp_path: Path) -> None:
    wide = np.random.default_rng(0).integers(40, 200, (60, 120), dtype=np.uint8)
    cache_image, geometry = PreprocessSpec(64, "letterbox", 64, intensity="clahe").cache_image(wide)
    assert geometry.shift_y > 0 and not cache_image[: geometry.shift_y].any()
    assert not cache_image[geometry.shift_y + geometry.resized_height :].any()


def test_a_cache_is_not_mixed_across_intensities(nih_images: list[Path], tmp_path: Path) -> None:
    manifest = make_manifest(nih_images)
    build(manifest, tmp_path / "cache", image_size=32)
    with pytest.raises(CacheMismatchError, match=r"intensity='none'.*intensity='clahe'"):
        build(manifest, tmp_path / "cache", image_size=32, intensity="clahe")
    # a cache made before the setting existed reads as intensity "none"
    settings = tmp_path / "cache" / "cache.json"
    settings.write_text(
        json.dumps({k: v for k, v in json.loads(settings.read_text()).items() if k != "intensity"})
    )
    meta = tmp_path / "cache" / "meta.json"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "intensity"}))
    assert open_cache(tmp_path / "cache").intensity == "none"
    build(manifest, tmp_path / "cache", image_size=32)


def test_specs_record_their_intensity() -> None:
    spec = PreprocessSpec(64, "letterbox", 56, intensity="clahe")
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    older = {k: v for k, v in spec.to_dict().items() if k != "intensity"}
    assert PreprocessSpec.from_dict(older).intensity == "none"


def test_a_bundle_applies_its_intensity_and_refuses_a_config_without_it(
    shared_data: Path, tmp_path: Path
) -> None:
    path = tiny_bundle(intensity="clahe").save(tmp_path / "clahe.cxr")
    image = sorted((shared_data / "pneumonia" / "test" / "NORMAL").glob("*.jpeg"))[0]
    predictor = Predictor.from_bundle(path, backend="onnx")
    expected = PreprocessSpec(80, "letterbox", 64, intensity="clahe").cache_image(read_image(image))[0]
    assert np.array_equal(predictor.prepare(image, image.name).cache_image, expected)
    plain = load_config(None, ["data.cache.image_size=80", "data.augment.crop_size=64"])
    with pytest.raises(ValueError, match=r"80 px \(letterbox\) but .* expects 80 px \(letterbox, clahe\)"):
        load_model(path, config=plain)


def test_cxr_data_prepare_applies_the_configured_intensity(shared_data: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cxrkit.cli.main import cli

    args = [
        "-c",
        str(Path(__file__).resolve().parents[1] / "configs" / "pneumonia_lite0_offline.yaml"),
        f"data.sources.0.root={shared_data / 'pneumonia' / 'test'}",
        f"data.cache.dir={tmp_path / 'cache'}",
        "data.cache.image_size=64",
        "data.augment.crop_size=56",
        "data.cache.workers=1",
    ]
    result = CliRunner().invoke(cli, ["data", "prepare", *args, "data.cache.intensity=clahe"])
    assert result.exit_code == 0, result.output
    cache = open_cache(tmp_path / "cache")
    assert cache.intensity == "clahe" and len(cache) == 253
    path = cache.manifest.frame["path"].iloc[0]
    expected = PreprocessSpec(64, "letterbox", 56, intensity="clahe").cache_image(read_image(path))[0]
    assert np.array_equal(cache.image(0), expected)
    typo = CliRunner().invoke(cli, ["data", "prepare", *args, "data.cache.intensity=clache"])
    assert typo.exit_code != 0 and "data.cache.intensity" in typo.output
