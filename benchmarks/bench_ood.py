"""Out-of-distribution flag on images that are not chest radiographs; prints JSON.

    .venv/bin/python benchmarks/bench_ood.py [--run RUN_DIR] [--fit 800] [--calibration 300] [--holdout 300]

The detector (:mod:`cxrkit.inference.ood`; ``--detector`` measures a saved one) is fitted on pooled backbone
features of pneumonia training images (the recipe's train split of ``../shared/data/pneumonia/train``), its
threshold set at the 99.5 % quantile of the recipe's validation split; it is then measured on chest X-rays it
never saw (the recipe's test split, ``pneumonia/test`` from another site, the adult NIH sample) and on images
that are not chest radiographs: scikit-image's bundled photos, the CT and MR files inside pydicom's package
data, rendered text and noise. Features come from the ImageNet-pretrained EfficientNet-Lite0 of the offline
recipe (``configs/pneumonia_lite0_offline.yaml``) unless ``--run`` names a trained run or bundle.

``--bundle B [--backend onnx-int8]`` measures what a bundle serves instead: its own detector (fitted at
export) on the scores of the graph ``cxr predict``/``cxr serve`` run (:meth:`Predictor.scores`), no refit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from cxrkit.config import load_config
from cxrkit.data.build import build_manifest
from cxrkit.data.decode import read_image
from cxrkit.data.transforms import PreprocessSpec
from cxrkit.inference.ood import OODDetector, pooled_features
from cxrkit.inference.predictor import Predictor
from cxrkit.models.factory import create_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RECIPE = REPO / "configs" / "pneumonia_lite0_offline.yaml"
SKIMAGE_PHOTOS = (
    "astronaut", "binary_blobs", "brick", "camera", "cat", "checkerboard", "clock", "coffee", "coins",
    "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "logo", "microaneurysms", "moon", "page",
    "retina", "rocket", "text", "immunohistochemistry", "chelsea", "motorcycle_left",
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default=None, help="a trained run or bundle (default: ImageNet Lite0)")
    parser.add_argument("--fit", type=int, default=800, help="training images the Gaussian is fitted on")
    parser.add_argument("--calibration", type=int, default=300, help="validation images for the threshold")
    parser.add_argument("--holdout", type=int, default=300, help="unseen test-split images measured")
    parser.add_argument("--quantile", type=float, default=0.995)
    parser.add_argument("--out", default=None, help="also save the detector at this prefix")
    parser.add_argument("--detector", default=None, help="measure a detector saved by --out (no refit)")
    parser.add_argument("--nih", type=int, default=205, help="NIH sample images measured")
    parser.add_argument("--bundle", default=None, help="measure this bundle's own detector as it is served")
    parser.add_argument("--backend", default="auto", help="with --bundle: auto, torch, onnx or onnx-int8")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    config = load_config(RECIPE, [f"data.sources.0.root={DATA / 'pneumonia' / 'train'}"])
    frame = build_manifest(config.data).frame
    split_paths = {
        split: _sample(frame.loc[frame["split"] == split, "path"].astype(str).tolist(), n)
        for split, n in (("train", args.fit), ("val", args.calibration), ("test", args.holdout))
    }
    if args.bundle:
        predictor = Predictor.from_bundle(args.bundle, backend=args.backend)
        if predictor.ood is None:
            raise SystemExit(f"{args.bundle} has no out-of-distribution detector")
        detector, source = predictor.ood, f"bundle {args.bundle} ({predictor.backend} graph)"

        def flags(images: Iterator[np.ndarray]) -> np.ndarray:
            return _served_scores(predictor, images) > detector.threshold
    else:
        model, spec, source = _model(config, args.run)
        if args.detector:
            detector = OODDetector.load(args.detector)
        else:
            fit, val = (_features(model, spec, _read_files(split_paths[split])) for split in ("train", "val"))
            detector = OODDetector.fit(fit, val, args.quantile)
            if args.out:
                detector.save(args.out)

        def flags(images: Iterator[np.ndarray]) -> np.ndarray:
            return detector.flag(_features(model, spec, images))

    nih_paths = _files(DATA / "nih" / "images")[: args.nih]
    chest = {
        "held-out test split": lambda: _read_files(split_paths["test"]),
        "pneumonia/test (other site)": lambda: _read_files(_files(DATA / "pneumonia" / "test")),
        "NIH sample (adults, other dataset)": lambda: _read_files(nih_paths),
    }
    not_chest = {
        "scikit-image photos": _skimage_photos,
        "pydicom CT and MR": _pydicom_ct_mr,
        "rendered text": lambda: _rendered_text(12),
        "noise": lambda: _noise(12),
    }
    rates, not_chest_flags = {}, []
    for name, images in {**not_chest, **chest}.items():
        flagged = flags(images())
        rates[name] = _rate(flagged)
        if name in not_chest:
            not_chest_flags.append(flagged)
        print(json.dumps({name: rates[name]}), file=sys.stderr, flush=True)  # partial results survive
    report = {
        "features": source,
        "detector": detector.info(),
        "flagged": rates,
        "not_chest_flagged": _rate(np.concatenate(not_chest_flags)),
        "targets": {"not_chest_flagged_min": 0.95, "chest_flagged_max": 0.02},
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(report, indent=2))


def _model(config, run: str | None) -> tuple[torch.nn.Module, PreprocessSpec, str]:
    if run is not None:
        from cxrkit.inference.loading import load_model

        loaded = load_model(run)
        return loaded.model.eval(), loaded.preprocess, f"trained model {run}"
    model = create_model(config.model, 1).eval()
    spec = PreprocessSpec.from_data_config(config.data)
    return (
        model,
        spec,
        f"ImageNet-pretrained {config.model.arch} ({config.model.pretrained.source}), untrained head",
    )


def _sample(paths: list[str], n: int) -> list[str]:
    order = np.random.default_rng(0).permutation(len(paths))[:n]
    return [paths[i] for i in sorted(order)]


def _files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})


def _read_files(paths: list[str]) -> Iterator[np.ndarray]:
    for path in paths:
        yield read_image(path)


def _served_scores(predictor: Predictor, images: Iterator[np.ndarray]) -> np.ndarray:
    """Out-of-distribution scores of decoded images as the bundle's predictor computes them, 32 at a time."""
    cache_images = [predictor.preprocess(image)[0] for image in images]
    parts = [predictor.scores(np.stack(cache_images[i : i + 32]))[1] for i in range(0, len(cache_images), 32)]
    return np.concatenate(parts)


def _features(model: torch.nn.Module, spec: PreprocessSpec, images: Iterator[np.ndarray]) -> np.ndarray:
    """Pooled features of decoded grayscale images, through the recipe's preprocessing, in batches of 32."""
    parts, batch = [], []
    for image in images:
        batch.append(spec.cache_image(image)[0])
        if len(batch) == 32:
            parts.append(pooled_features(model, spec.model_input(np.stack(batch))))
            batch = []
    if batch:
        parts.append(pooled_features(model, spec.model_input(np.stack(batch))))
    return np.concatenate(parts)


def _skimage_photos() -> Iterator[np.ndarray]:
    """The photos bundled with scikit-image (those that need a download are skipped), as uint8 gray."""
    import skimage.data
    from skimage.color import rgb2gray, rgba2rgb
    from skimage.util import img_as_ubyte

    for name in SKIMAGE_PHOTOS:
        try:
            image = getattr(skimage.data, name)()
        except Exception:  # a sample that needs the network (pooch) or is absent
            continue
        if isinstance(image, tuple):
            image = image[0]
        if image.ndim == 3 and image.shape[-1] == 4:
            image = rgba2rgb(image)
        if image.ndim == 3:
            image = rgb2gray(image)
        if image.ndim == 2:
            yield img_as_ubyte(image.astype(float) / max(float(image.max()), 1e-9))


def _pydicom_ct_mr() -> Iterator[np.ndarray]:
    """Every CT and MR image file of pydicom's test data that cxrkit's decoder reads."""
    from pydicom.data import get_testdata_files

    for path in get_testdata_files():
        name = Path(path).name
        if Path(path).is_file() and ("CT" in path or "MR" in path) and not name.endswith((".gz", ".zip")):
            try:
                yield read_image(path)
            except Exception:  # truncated or deliberately broken test files
                continue


def _rendered_text(n: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(1)
    words = [
        "chest",
        "radiograph",
        "pneumonia",
        "normal",
        "the",
        "quick",
        "brown",
        "fox",
        "report",
        "findings",
        "impression",
    ]
    font = ImageFont.load_default(size=28)
    for _ in range(n):
        page = Image.new("L", (512, 512), color=int(rng.integers(200, 256)))
        draw = ImageDraw.Draw(page)
        for line in range(12):
            text = " ".join(rng.choice(words, 4))
            draw.text((20, 20 + 40 * line), text, fill=int(rng.integers(0, 60)), font=font)
        yield np.asarray(page)


def _noise(n: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(2)
    for index in range(n):
        if index % 2:
            yield rng.integers(0, 256, (256, 256), dtype=np.uint8)  # uniform
        else:
            yield np.clip(rng.normal(128, 40, (256, 256)), 0, 255).astype(np.uint8)  # gaussian


def _rate(flagged: np.ndarray) -> dict:
    return {"n": len(flagged), "flagged": int(flagged.sum()), "rate": round(float(flagged.mean()), 4)}


if __name__ == "__main__":
    main()
