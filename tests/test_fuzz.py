"""Property-based fuzzing of the decoders: mutated real PNG, JPEG and DICOM bytes through `read_image`,
`cxr predict` and `/v1/predict`. Only the documented errors may escape: ImageDecodeError from read_image,
a listed skip from `cxr predict`, a 4xx JSON answer from the service; no case may take 5 s.

A bounded, derandomised run (a few seconds); benchmarks/bench_fuzz.py runs the same mutations for long.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bundles import tiny_bundle
from cxrkit.cli.main import cli
from cxrkit.data.decode import ImageDecodeError, read_image
from cxrkit.serve.app import ServiceSettings, create_app
from fuzz_inputs import mutations, seed_files

#: No input may take longer than this to be decoded or refused.
MAX_SECONDS = 5.0
#: Smaller than the default limit so that a mutated header cannot make CI allocate gigabytes.
MAX_PIXELS = 2048 * 2048
FUZZ = settings(
    max_examples=40,
    deadline=timedelta(seconds=MAX_SECONDS),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def seeds(shared_data: Path) -> dict[str, bytes]:
    return seed_files(shared_data)


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(onnx=False).save(tmp_path_factory.mktemp("bundle") / "tiny.cxr")


def mutated(data: st.DataObject, seeds: dict[str, bytes]) -> tuple[str, bytes]:
    name = data.draw(st.sampled_from(sorted(seeds)), label="seed")
    return name, mutations(seeds[name], name, lambda low, high: data.draw(st.integers(low, high)))


def test_every_seed_decodes(seeds: dict[str, bytes]) -> None:
    for name, data in seeds.items():
        image = read_image(data, name=name)
        assert image.ndim == 2 and image.dtype == np.uint8 and image.size > 0, name


@FUZZ
@given(data=st.data())
def test_read_image_returns_an_image_or_raises_image_decode_error(
    seeds: dict[str, bytes], data: st.DataObject
) -> None:
    name, payload = mutated(data, seeds)
    started = time.perf_counter()
    try:
        image = read_image(payload, name=name, max_pixels=MAX_PIXELS)
    except ImageDecodeError as error:
        assert name in str(error) and error.reason
    else:
        assert image.ndim == 2 and image.dtype == np.uint8 and image.flags.c_contiguous
    assert time.perf_counter() - started < MAX_SECONDS


@pytest.fixture(scope="module")
def client(bundle_path: Path) -> TestClient:
    app = create_app(bundle_path, ServiceSettings(max_upload_bytes=4 * 2**20, max_pixels=MAX_PIXELS))
    with TestClient(app) as test_client:
        deadline = time.monotonic() + 120
        while test_client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, test_client.get("/readyz").json()
            time.sleep(0.05)
        yield test_client


@FUZZ
@given(data=st.data())
def test_service_answers_mutated_uploads_with_200_or_4xx_json(
    client: TestClient, seeds: dict[str, bytes], data: st.DataObject
) -> None:
    name, payload = mutated(data, seeds)
    started = time.perf_counter()
    response = client.post("/v1/predict", files={"file": (name, payload, "application/octet-stream")})
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    body = response.json()
    if response.status_code != 200:
        assert isinstance(body, dict) and body, body
    assert time.perf_counter() - started < MAX_SECONDS


@settings(FUZZ, max_examples=4, deadline=None)  # a call loads the model; the files are timed by the service
@given(data=st.data())
def test_cxr_predict_lists_mutated_files_as_skipped(
    bundle_path: Path, seeds: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "intact.png").write_bytes(seeds["nih_small.png"])
    names = []
    for i in range(3):
        name, payload = mutated(data, seeds)
        names.append(f"{i}_{name}")
        (folder / names[-1]).write_bytes(payload)
    out = folder / "predictions.csv"

    result = CliRunner().invoke(
        cli, ["predict", str(bundle_path), str(folder), "-o", str(out), "--backend", "torch"]
    )
    assert result.exit_code == 0 and result.exception is None, result.output
    predicted = {Path(path).name for path in pd.read_csv(out)["path"]}
    assert "intact.png" in predicted
    for name in names:  # each mutated file is predicted or listed as skipped with its reason
        assert name in predicted or f"{name}: " in result.output, (name, result.output)
