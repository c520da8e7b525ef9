"""What the service admits: plausible shapes only (422), decode memory estimated from the header against a
budget (503 + Retry-After when full, 422 when it can never fit), uploads within a read timeout (408, the
slot freed), the pixel limit; and `cxr predict` skipping implausible files with the same check."""

from __future__ import annotations

import io
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bundles import tiny_bundle
from cxrkit.data.decode import Plausibility, probe_image
from cxrkit.inference.predictor import Predictor
from cxrkit.serve.app import ServiceSettings, create_app
from cxrkit.serve.batching import MIB
from servers import BackgroundServer, read_response

BUDGET = 64 * MIB


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle().save(tmp_path_factory.mktemp("bundle") / "tiny.cxr")


@pytest.fixture(scope="module")
def client(bundle_path: Path) -> TestClient:
    settings = ServiceSettings(decode_memory_bytes=BUDGET, max_pixels=6000 * 6000)
    with TestClient(create_app(bundle_path, settings)) as test_client:
        assert test_client.app.state.service.ready.wait(120)
        yield test_client


def png_bytes(width: int, height: int, dtype: type = np.uint8) -> bytes:
    pixels = np.zeros((height, width), dtype=dtype)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = np.iinfo(dtype).max // 2
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _post(client: TestClient, name: str, data: bytes) -> tuple[int, dict]:
    response = client.post("/v1/predict", files={"file": (name, data, "image/png")})
    return response.status_code, response.json()


@pytest.mark.parametrize(
    ("width", "height", "problem"),
    [(1, 1, "too small"), (63, 500, "too small"), (2000, 400, "aspect ratio over 4:1"), (300, 1300, "4:1")],
)
def test_implausible_shapes_are_422(client: TestClient, width: int, height: int, problem: str) -> None:
    status, body = _post(client, "odd.png", png_bytes(width, height))
    assert status == 422 and body["error"]["code"] == "implausible_image", body
    assert problem in body["error"]["message"] and "odd.png" in body["error"]["message"]


def test_plausibility_is_configurable(bundle_path: Path) -> None:
    settings = ServiceSettings(plausibility=Plausibility(min_side=1, max_aspect=100))
    with TestClient(create_app(bundle_path, settings)) as client:
        assert client.app.state.service.ready.wait(120)
        assert _post(client, "tiny.png", png_bytes(8, 8))[0] == 200
        assert _post(client, "strip.png", png_bytes(2000, 100))[0] == 200
        assert client.get("/v1/model").json()["input"]["min_side"] == 1


def test_predictor_skips_implausible_files(bundle_path: Path, tmp_path: Path) -> None:
    (tmp_path / "dot.png").write_bytes(png_bytes(1, 1))
    (tmp_path / "chest.png").write_bytes(png_bytes(256, 300))
    results = Predictor.from_bundle(bundle_path).predict([tmp_path / "dot.png", tmp_path / "chest.png"])
    assert not results[0].ok and "too small for a chest radiograph" in results[0].error
    assert results[1].ok


def test_decode_memory_is_estimated_from_the_header_and_budgeted(client: TestClient) -> None:
    sixteen = png_bytes(2000, 2000, np.uint16)  # 4 Mpx of 16 bits: about 23 MiB to decode
    header = probe_image(sixteen)
    assert (header.width, header.height, header.bytes_per_pixel) == (2000, 2000, 2)
    assert 20 * MIB < header.decode_bytes < 30 * MIB
    budget = client.app.state.service.budget
    assert _post(client, "a.png", sixteen)[0] == 200 and budget.in_use == 0
    with budget.reservation() as other_requests:  # the budget is busy with other uploads
        other_requests.grow(BUDGET - 10 * MIB)
        response = client.post("/v1/predict", files={"file": ("a.png", sixteen, "image/png")})
        assert response.status_code == 503 and response.json()["error"]["code"] == "busy"
        assert response.headers["retry-after"] == "1"
        assert _post(client, "small.png", png_bytes(512, 512))[0] == 200  # small ones still fit
    assert _post(client, "a.png", sixteen)[0] == 200 and budget.in_use == 0


def test_an_image_that_can_never_fit_the_budget_is_422(client: TestClient) -> None:
    status, body = _post(client, "huge.png", png_bytes(5000, 5000, np.uint16))  # ~143 MiB > 64 MiB
    assert status == 422 and body["error"]["code"] == "image_too_large", body
    assert "decode budget of 64 MiB" in body["error"]["message"]
    status, body = _post(client, "bomb.png", png_bytes(6100, 6000))
    assert status == 422 and "more than this service accepts" in body["error"]["message"]


def test_slow_upload_gets_408_and_frees_its_slot(bundle_path: Path) -> None:
    settings = ServiceSettings(upload_timeout_s=1.0)
    with BackgroundServer(create_app(bundle_path, settings)) as server:
        server.wait_ready()
        service = server._server.config.app.state.service
        with socket.create_connection((server.host, server.port), timeout=30) as connection:
            head = (
                "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\n\r\n"
                '--b\r\nContent-Disposition: form-data; name="file"; filename="slow.png"\r\n\r\n'
            )
            connection.sendall(head.encode() + b"\x89PNG" + b"\0" * 1000)
            time.sleep(0.3)
            assert service.budget.in_use > 0  # the partial upload holds memory while it trickles in
            started = time.monotonic()
            answer = read_response(connection)
            waited = time.monotonic() - started
        assert answer.startswith("HTTP/1.1 408"), answer
        assert '"code":"upload_timeout"' in answer and waited < 5
        deadline = time.monotonic() + 5
        while service.budget.in_use and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.budget.in_use == 0 and service.in_flight == 0
