"""The web service: predictions on real uploads, every bad-upload case as 4xx JSON, probes, OpenAPI, the page,
and 8 concurrent clients against a real uvicorn server on loopback."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bundles import LABELS, THRESHOLDS, tiny_bundle
from cxrkit.serve.app import STATIC_DIR, ServiceSettings, create_app
from servers import BackgroundServer

LIMIT = 3 * 1024 * 1024


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle().save(tmp_path_factory.mktemp("bundle") / "tiny.cxr")


def _settings() -> ServiceSettings:
    return ServiceSettings(max_upload_bytes=LIMIT, max_pixels=4096 * 4096)


@pytest.fixture(scope="module")
def client(bundle_path: Path) -> TestClient:
    with TestClient(create_app(bundle_path, _settings())) as test_client:
        deadline = time.monotonic() + 120
        while test_client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, test_client.get("/readyz").json()
            time.sleep(0.05)
        yield test_client


@pytest.fixture(scope="module")
def png(nih_sample: Path) -> bytes:
    return (nih_sample / "images" / "00000002_000.png").read_bytes()


def _upload(client: TestClient, name: str, data: bytes, content_type: str, query: str = "") -> httpx.Response:
    return client.post(f"/v1/predict{query}", files={"file": (name, data, content_type)})


def test_predicts_a_real_png(client: TestClient, png: bytes) -> None:
    response = _upload(client, "chest.png", png, "image/png")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"id": "tiny", "version": "1.0", "runtime": "onnx"}
    assert body["image"] == {"filename": "chest.png", "format": "PNG", "width": 1024, "height": 1024}
    probabilities = [p["probability"] for p in body["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True) and len(probabilities) == 3
    assert "Effusion" in body["findings"] and "Atelectasis" not in body["findings"]
    assert body["thresholds"] == THRESHOLDS
    assert body["heatmaps"] is None and body["preview_png"] is None
    assert body["timing_ms"]["total"] >= body["timing_ms"]["inference"] > 0


def test_dicom_and_jpeg_uploads_with_preview_and_heatmaps(client: TestClient, shared_data: Path) -> None:
    dicom = (shared_data / "dicom" / "siim_pneumothorax_sample.dcm").read_bytes()
    response = _upload(client, "study.dcm", dicom, "application/dicom", "?heatmaps=true&preview=true")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"]["format"] == "DICOM"
    preview = Image.open(io.BytesIO(base64.b64decode(body["preview_png"])))
    assert preview.format == "PNG" and preview.size == (1024, 1024)
    assert set(body["heatmaps"]) == set(body["findings"])
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmaps"]["Effusion"])))
    assert overlay.mode == "RGBA" and overlay.size == preview.size
    jpeg = sorted((shared_data / "pneumonia" / "train" / "NORMAL").glob("*.jpeg"))[0].read_bytes()
    response = _upload(client, "child.jpeg", jpeg, "image/jpeg", "?heatmap_labels=Atelectasis")
    assert response.status_code == 200
    assert list(response.json()["heatmaps"]) == ["Atelectasis"]


def _bomb_png() -> bytes:
    """A valid 1x1 PNG whose header claims 60000 x 60000 pixels."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", 60000, 60000) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", 60000, 60000)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def _dicom_without_pixels() -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.PatientID = "anon"
    dataset.Modality = "DX"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


BAD_UPLOADS = {
    "wrong content type": ("notes.txt", b"plain text", "text/plain", 415, "unsupported_media_type"),
    "not an image": ("fake.png", b"GIF89a" + b"\0" * 64, "image/png", 415, "not_an_image"),
    "empty file": ("empty.png", b"", "image/png", 400, "empty_file"),
    "decompression bomb": ("bomb.png", "bomb", "image/png", 422, "undecodable_image"),
    "dicom without pixels": ("empty.dcm", "nopixels", "application/dicom", 422, "undecodable_image"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_are_4xx_json(client: TestClient, case: str) -> None:
    name, data, content_type, status, code = BAD_UPLOADS[case]
    data = {"bomb": _bomb_png, "nopixels": _dicom_without_pixels}[data]() if isinstance(data, str) else data
    response = _upload(client, name, data, content_type)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["status"] == status and error["message"]


def test_truncated_file_names_the_problem(client: TestClient, png: bytes) -> None:
    response = _upload(client, "cut.png", png[: len(png) // 3], "image/png")
    assert response.status_code == 422
    assert (
        "truncated" in response.json()["error"]["message"]
        and "cut.png" in response.json()["error"]["message"]
    )
    assert "bomb" in _upload(client, "bomb.png", _bomb_png(), "image/png").json()["error"]["message"]
    assert "no pixel data" in _upload(client, "x.dcm", _dicom_without_pixels(), "application/dicom").text


def test_oversize_upload_is_refused_while_reading(client: TestClient, png: bytes) -> None:
    big = png + b"\0" * LIMIT
    response = _upload(client, "big.png", big, "image/png")
    assert response.status_code == 413 and response.json()["error"]["code"] == "upload_too_large"

    def stream():  # no Content-Length: the limit must hold while the body streams in
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        yield b"Content-Type: image/png\r\n\r\n"
        for _ in range(8):
            yield b"\0" * (LIMIT // 4)
        yield b"\r\n--b--\r\n"

    response = client.post(
        "/v1/predict", content=stream(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "upload_too_large"


def test_malformed_requests(client: TestClient, png: bytes) -> None:
    raw = client.post("/v1/predict", content=png, headers={"content-type": "image/png"})
    assert raw.status_code == 415 and raw.json()["error"]["code"] == "unsupported_media_type"
    no_file = client.post("/v1/predict", data={"comment": "hello"}, files={"other": (None, b"x")})
    assert no_file.status_code == 400 and no_file.json()["error"]["code"] == "missing_file"
    broken = client.post(
        "/v1/predict",
        content=b"--zz\r\ngarbage",
        headers={"content-type": "multipart/form-data; boundary=zz"},
    )
    assert broken.status_code == 400, broken.text
    bad_query = _upload(client, "a.png", png, "image/png", "?heatmaps=perhaps")
    assert bad_query.status_code == 422 and bad_query.json()["error"]["code"] == "invalid_parameters"
    unknown = _upload(client, "a.png", png, "image/png", "?heatmap_labels=Nodule")
    assert unknown.status_code == 422 and "Nodule" in unknown.json()["error"]["message"]


def test_uploads_are_never_written_to_served_folders(client: TestClient, png: bytes) -> None:
    before = sorted(p.name for p in STATIC_DIR.rglob("*"))
    assert _upload(client, "chest.png", png, "image/png").status_code == 200
    assert sorted(p.name for p in STATIC_DIR.rglob("*")) == before
    assert client.get("/static/chest.png").status_code == 404


def test_model_card_and_probes(client: TestClient) -> None:
    card = client.get("/v1/model").json()
    assert card["labels"] == LABELS and card["thresholds"] == THRESHOLDS
    assert card["input"]["preprocess"]["crop_size"] == 64 and card["input"]["max_upload_bytes"] == LIMIT
    assert card["input"]["formats"] == ["PNG", "JPEG", "DICOM"]
    assert card["model"] == {"id": "tiny", "version": "1.0"} and card["runtime"] == "onnx"
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_not_ready_until_loaded(tmp_path: Path) -> None:
    with TestClient(create_app(tmp_path / "missing.cxr")) as test_client:
        deadline = time.monotonic() + 30
        while (ready := test_client.get("/readyz")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert ready.status_code == 503 and "bundle not found" in ready.json()["error"]
        assert test_client.get("/healthz").status_code == 200
        assert test_client.get("/v1/model").status_code == 503


def test_openapi_docs_and_page(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    upload = schema["paths"]["/v1/predict"]["post"]
    assert "multipart/form-data" in upload["requestBody"]["content"]
    assert {"200", "413", "415", "422"} <= set(upload["responses"])
    assert {"/v1/model", "/healthz", "/readyz"} <= set(schema["paths"])
    docs = client.get("/docs").text
    assert "swagger-ui" in docs and "cdn" not in docs.lower()
    script = docs.split('src="')[1].split('"')[0]
    assert client.get(script).status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and 'id="drop-zone"' in page.text and "cdn" not in page.text.lower()
    for asset in ("static/app.js", "static/style.css"):
        assert client.get(f"/{asset}").status_code == 200


def test_eight_concurrent_clients_on_loopback(bundle_path: Path, png: bytes, shared_data: Path) -> None:
    dicom = (shared_data / "dicom" / "siim_pneumothorax_sample.dcm").read_bytes()
    with BackgroundServer(create_app(bundle_path, _settings())) as server:
        server.wait_ready()

        def client_session(index: int) -> list[int]:
            statuses = []
            with httpx.Client(base_url=server.url, timeout=60) as http:
                for request in range(4):
                    name, data, kind = (
                        ("a.dcm", dicom, "application/dicom") if request % 2 else ("a.png", png, "image/png")
                    )
                    response = http.post("/v1/predict", files={"file": (name, data, kind)})
                    statuses.append(response.status_code)
                    assert response.json()["findings"][0] in LABELS
            return statuses

        with ThreadPoolExecutor(8) as pool:
            statuses = [status for result in pool.map(client_session, range(8)) for status in result]
    assert statuses == [200] * 32


def test_micro_batcher_groups_concurrent_requests() -> None:
    from cxrkit.serve.batching import MicroBatcher

    sizes = []

    def infer(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        time.sleep(0.05)
        return batch.sum(axis=(1, 2))[:, None]

    batcher = MicroBatcher(infer, max_batch=4, max_wait_s=0.02)
    futures = [batcher.submit(np.full((2, 2), i, dtype=np.float64)) for i in range(10)]
    results = [future.result(timeout=10)[0] for future in futures]
    batcher.close()
    assert results == [4.0 * i for i in range(10)]
    assert max(sizes) == 4 and sum(sizes) == 10 and len(sizes) < 10
