"""The HTTP service: ``POST /v1/predict`` on an uploaded X-ray, model card, health probes and a web page.

Endpoints: ``POST /v1/predict`` (multipart field ``file``: PNG, JPEG or DICOM), ``GET /v1/model``,
``GET /healthz`` (the process is up), ``GET /readyz`` (the model is loaded and warmed up), ``GET /`` (the
page in ``static/``), ``/docs`` and ``/redoc`` (OpenAPI, served without a CDN), ``/openapi.json``.

Uploads are streamed into memory and the size limit is enforced as the bytes arrive; they are decoded from
memory and never written to disk. Every problem with the input is a 4xx JSON ``{"error": {"status",
"code", "message"}}``. Decoding runs on a thread pool; model calls from concurrent requests are gathered
by a micro-batching queue into batches of up to ``max_batch``, run by one single-threaded inference worker
per core (throughput under concurrent load comes from running requests side by side).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel, Field
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException

import cxrkit
from cxrkit.inference.bundle import Bundle
from cxrkit.inference.predictor import Predictor, PreparedImage, heatmap_rgba, png_bytes

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
ACCEPTED_CONTENT_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "application/dicom",
        "application/octet-stream",
        "",
    }
)
_MULTIPART_SLACK = 64 * 1024  # room for part headers and boundaries on top of the file itself
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class ServiceSettings:
    """Limits and batching of the service."""

    max_upload_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 8192 * 8192  #: larger declared images are refused as decompression bombs
    max_batch: int = 16
    max_wait_ms: float = 2.0  #: how long a batch waits for more requests after its first
    inference_workers: int | None = None  #: batches run at once (default: one per core)
    inference_threads: int = 1  #: ONNX Runtime threads per batch: requests in parallel beat ops in parallel
    max_in_flight: int = 64  #: requests admitted at once; more get 429
    decode_workers: int | None = None  #: decoding threads (default: one per core)
    preview_max_side: int = 1024


class ApiError(Exception):
    """A client error returned as JSON ``{"error": {"status", "code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# ---------------------------------------------------------------------- response schema


class ModelRef(BaseModel):
    id: str
    version: str
    runtime: str = Field(description="onnx, onnx-int8 or torch")


class Prediction(BaseModel):
    label: str
    probability: float
    threshold: float = Field(description="operating threshold chosen on validation data")
    positive: bool = Field(description="probability >= threshold")


class ImageInfo(BaseModel):
    filename: str
    format: str = Field(description="PNG, JPEG or DICOM (from the file's content)")
    width: int
    height: int


class Timing(BaseModel):
    upload: float
    decode: float = Field(description="decoding and preprocessing")
    inference: float = Field(description="queueing and the (batched) model call")
    heatmaps: float = 0.0
    total: float


class PredictResponse(BaseModel):
    model: ModelRef
    image: ImageInfo
    findings: list[str] = Field(description="labels at or above their threshold, most probable first")
    predictions: list[Prediction] = Field(description="every label, most probable first")
    probabilities: dict[str, float]
    thresholds: dict[str, float]
    heatmaps: dict[str, str] | None = Field(
        None, description="label → base64 RGBA PNG overlay (Grad-CAM) aligned with the preview image"
    )
    preview_png: str | None = Field(
        None, description="base64 PNG of the decoded image (longer side at most preview_max_side)"
    )
    timing_ms: Timing


class ErrorBody(BaseModel):
    status: int
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "malformed request (no file part, broken multipart body, empty file)",
        413: "upload larger than max_upload_bytes",
        415: "not multipart, or a file that is not PNG, JPEG or DICOM",
        422: "the image cannot be decoded (truncated, corrupt, decompression bomb, DICOM without pixels)",
        429: "too many requests in flight",
        503: "the model is still loading",
    }.items()
}

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "PNG, JPEG or DICOM"}
                    },
                }
            }
        },
    }
}


# ---------------------------------------------------------------------- upload reading


@dataclass
class Upload:
    filename: str
    content_type: str
    data: bytes


class _MultipartCollector:
    """Feeds a multipart body to python-multipart and keeps the file part in memory, within a limit."""

    def __init__(self, boundary: bytes, limit: int) -> None:
        self.limit = limit
        self.parts: list[tuple[dict[bytes, bytes], bytearray]] = []
        self._field, self._value = bytearray(), bytearray()
        self._headers: dict[bytes, bytes] = {}
        callbacks = {
            "on_part_begin": self._begin,
            "on_part_data": self._data,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
        }
        self.parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]

    def _begin(self) -> None:
        self._headers = {}
        self.parts.append((self._headers, bytearray()))

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _data(self, data: bytes, start: int, end: int) -> None:
        buffer = self.parts[-1][1]
        buffer.extend(data[start:end])
        if len(buffer) > self.limit:
            raise ApiError(413, "upload_too_large", f"file is larger than the limit of {self.limit:,} bytes")

    def file(self) -> Upload:
        for headers, data in self.parts:
            _, options = parse_options_header(headers.get(b"content-disposition", b""))
            if options.get(b"name") == b"file" or b"filename" in options:
                content_type = (
                    headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
                )
                filename = options.get(b"filename", b"upload").decode("utf-8", "replace")
                return Upload(Path(filename).name or "upload", content_type, bytes(data))
        raise ApiError(
            400, "missing_file", "multipart body has no file part (send the image as field 'file')"
        )


async def read_upload(request: Request, limit: int) -> Upload:
    """The uploaded file, streamed from the request with the size limit checked chunk by chunk."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the image as multipart/form-data with a file field named 'file'",
        )
    body_limit = limit + _MULTIPART_SLACK
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > body_limit:
        raise ApiError(
            413,
            "upload_too_large",
            f"request body of {int(declared):,} bytes exceeds the limit of {limit:,} bytes for the file",
        )
    collector = _MultipartCollector(options[b"boundary"], limit)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise ApiError(413, "upload_too_large", f"request body exceeds the limit of {limit:,} bytes")
            collector.parser.write(chunk)
        collector.parser.finalize()
    except ApiError:
        raise
    except Exception as error:  # python-multipart raises several types for broken bodies
        raise ApiError(400, "malformed_multipart", f"cannot parse the multipart body: {error}") from error
    return collector.file()


def sniff_format(upload: Upload) -> str:
    """PNG, JPEG or DICOM from the file's bytes (and, for DICOM without preamble, its declared type)."""
    data = upload.data
    if upload.content_type not in ACCEPTED_CONTENT_TYPES:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"{upload.filename}: content type {upload.content_type!r} is not accepted "
            "(send image/png, image/jpeg or application/dicom)",
        )
    if not data:
        raise ApiError(400, "empty_file", f"{upload.filename}: the uploaded file is empty")
    if data.startswith(_PNG_MAGIC):
        return "PNG"
    if data.startswith(_JPEG_MAGIC):
        return "JPEG"
    declared_dicom = upload.content_type == "application/dicom" or upload.filename.lower().endswith(
        (".dcm", ".dicom", ".dic")
    )
    if data[128:132] == b"DICM" or declared_dicom:
        return "DICOM"
    raise ApiError(415, "not_an_image", f"{upload.filename}: the file is not a PNG, JPEG or DICOM image")


# ---------------------------------------------------------------------- micro-batching


class MicroBatcher:
    """Gathers single-image model calls from many requests into batches run by ``workers`` threads.

    A free worker takes the first waiting item, then whatever arrives within ``max_wait_s`` up to
    ``max_batch`` items, runs ``infer`` on the stacked batch and resolves each caller's future.
    """

    def __init__(
        self, infer: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait_s: float, workers: int = 1
    ) -> None:
        self._infer = infer
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._queue: queue.SimpleQueue[tuple[np.ndarray, Future] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"cxr-batcher-{index}", daemon=True)
            for index in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, item: np.ndarray) -> Future:
        future: Future = Future()
        self._queue.put((item, future))
        return future

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=10)

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            batch, stop = self._gather(first)
            self._execute(batch)
            if stop:
                return

    def _gather(self, first: tuple[np.ndarray, Future]) -> tuple[list[tuple[np.ndarray, Future]], bool]:
        batch = [first]
        deadline = time.monotonic() + self._max_wait_s
        while len(batch) < self._max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _execute(self, batch: list[tuple[np.ndarray, Future]]) -> None:
        try:
            outputs = self._infer(np.stack([item for item, _ in batch]))
        except Exception as error:  # handed to every waiting request
            for _, future in batch:
                future.set_exception(error)
            return
        for (_, future), output in zip(batch, outputs, strict=True):
            future.set_result(output)


# ---------------------------------------------------------------------- service state


class ModelService:
    """The loaded predictor, its batcher and thread pools, and readiness."""

    def __init__(
        self,
        source: str | os.PathLike | Bundle | Predictor,
        settings: ServiceSettings,
        predictor_options: dict[str, Any],
    ) -> None:
        self.source = source
        self.settings = settings
        self.predictor_options = predictor_options
        self.predictor: Predictor | None = None
        self.batcher: MicroBatcher | None = None
        self.error: str | None = None
        self.ready = threading.Event()
        self.decode_pool = ThreadPoolExecutor(
            settings.decode_workers or os.cpu_count() or 1, thread_name_prefix="cxr-decode"
        )
        self.heatmap_pool = ThreadPoolExecutor(1, thread_name_prefix="cxr-heatmap")
        self.in_flight = 0
        self._loader = threading.Thread(target=self._load, name="cxr-model-loader", daemon=True)

    def start(self) -> None:
        self._loader.start()

    def _load(self) -> None:
        try:
            if isinstance(self.source, Predictor):
                predictor = self.source
            else:
                bundle = self.source if isinstance(self.source, Bundle) else Bundle.load(self.source)
                options = {"threads": self.settings.inference_threads, **self.predictor_options}
                predictor = Predictor(bundle, max_pixels=self.settings.max_pixels, **options)
            # the same policy for torch (preprocessing, heatmaps, the torch backend): parallelism comes from
            # concurrent requests; OpenMP wake-ups cost more than these small per-request ops under load
            torch.set_num_threads(self.settings.inference_threads)
            size = predictor.bundle.preprocess.image_size
            predictor.probabilities(np.zeros((1, size, size), dtype=np.uint8))  # warm-up
            self.predictor = predictor
            self.batcher = MicroBatcher(
                predictor.probabilities,
                self.settings.max_batch,
                self.settings.max_wait_ms / 1000,
                self.settings.inference_workers or os.cpu_count() or 1,
            )
            self.ready.set()
            log.info(
                "model %s v%s ready (%s)",
                predictor.bundle.model_id,
                predictor.bundle.version,
                predictor.backend,
            )
        except Exception as error:  # reported by /readyz
            self.error = f"{type(error).__name__}: {error}"
            log.exception("model failed to load")

    def close(self) -> None:
        self._loader.join(timeout=60)
        if self.batcher is not None:
            self.batcher.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.heatmap_pool.shutdown(wait=False, cancel_futures=True)

    def require_predictor(self) -> Predictor:
        if self.predictor is None:
            detail = f"model failed to load: {self.error}" if self.error else "model is still loading"
            raise ApiError(503, "not_ready", detail)
        return self.predictor


# ---------------------------------------------------------------------- the app


def create_app(
    source: str | os.PathLike | Bundle | Predictor,
    settings: ServiceSettings | None = None,
    **predictor_options: Any,
) -> FastAPI:
    """The FastAPI application serving a bundle path, a loaded Bundle or a ready Predictor."""
    settings = settings or ServiceSettings()
    service = ModelService(source, settings, predictor_options)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        service.close()

    app = FastAPIOffline(
        title="cxrkit chest X-ray service",
        version=cxrkit.__version__,
        description="Findings on chest radiographs from a cxrkit model bundle. Research use only.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _install_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Readiness: the model is loaded and warmed up",
        responses={503: {"description": "still loading or failed"}},
    )
    async def readyz() -> JSONResponse:
        if service.ready.is_set():
            return JSONResponse({"status": "ready"})
        status = "failed" if service.error else "loading"
        return JSONResponse({"status": status, "error": service.error}, status_code=503)

    @app.get(
        "/v1/model",
        summary="Labels, operating thresholds, input spec and provenance",
        responses={503: _ERRORS[503]},
    )
    async def model_card() -> dict[str, Any]:
        return _model_card(service.require_predictor(), settings)

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=_ERRORS,
        openapi_extra=_UPLOAD_BODY,
        summary="Findings for one uploaded chest X-ray",
    )
    async def predict(
        request: Request,
        heatmaps: bool = Query(False, description="add Grad-CAM overlays for the positive findings"),
        heatmap_top: int = Query(0, ge=0, le=50, description="also explain this many top-ranked others"),
        heatmap_labels: str | None = Query(None, description="comma-separated labels to explain"),
        preview: bool = Query(False, description="return the decoded image as a PNG preview"),
    ) -> PredictResponse:
        return await _predict(service, request, heatmaps, heatmap_top, heatmap_labels, preview)

    return app


def _install_error_handlers(app: FastAPI) -> None:
    def error_response(status: int, code: str, message: str) -> JSONResponse:
        return JSONResponse(
            {"error": {"status": status, "code": code, "message": message}}, status_code=status
        )

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.code, error.message)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return error_response(422, "invalid_parameters", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, "http_error", str(error.detail))


def _model_card(predictor: Predictor, settings: ServiceSettings) -> dict[str, Any]:
    bundle = predictor.bundle
    return {
        "model": {"id": bundle.model_id, "version": bundle.version},
        "runtime": predictor.backend,
        "labels": bundle.labels,
        "thresholds": bundle.thresholds,
        "threshold_source": bundle.threshold_source,
        "activation": bundle.activation,
        "architecture": bundle.model_config,
        "input": {
            "content_types": sorted(t for t in ACCEPTED_CONTENT_TYPES if t),
            "formats": ["PNG", "JPEG", "DICOM"],
            "max_upload_bytes": settings.max_upload_bytes,
            "max_pixels": settings.max_pixels,
            "preprocess": bundle.preprocess.to_dict(),
        },
        "provenance": bundle.provenance,
        "quantization": bundle.quantization,
    }


async def _predict(
    service: ModelService,
    request: Request,
    heatmaps: bool,
    heatmap_top: int,
    heatmap_labels: str | None,
    preview: bool,
) -> PredictResponse:
    started = time.perf_counter()
    predictor = service.require_predictor()
    if service.in_flight >= service.settings.max_in_flight:
        raise ApiError(429, "too_many_requests", "the service is busy; retry shortly")
    service.in_flight += 1
    try:
        requested = _requested_labels(predictor, heatmap_labels)
        upload = await read_upload(request, service.settings.max_upload_bytes)
        image_format = sniff_format(upload)
        uploaded = time.perf_counter()
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(
            service.decode_pool, _decode_upload, predictor, upload, image_format
        )
        decoded = time.perf_counter()
        assert service.batcher is not None and prepared.cache_image is not None
        scores = await asyncio.wrap_future(service.batcher.submit(prepared.cache_image))
        inferred = time.perf_counter()
        probabilities = {label: float(p) for label, p in zip(predictor.labels, scores, strict=True)}
        explain = (
            requested
            if requested is not None
            else _default_heatmap_labels(predictor, probabilities, heatmaps, heatmap_top)
        )
        overlays: dict[str, str] = {}
        preview_png = None
        if explain or preview:
            overlays, preview_png = await loop.run_in_executor(
                service.heatmap_pool if explain else service.decode_pool,
                _render,
                predictor,
                prepared,
                explain,
                preview,
                service.settings.preview_max_side,
            )
        finished = time.perf_counter()
    finally:
        service.in_flight -= 1
    geometry = prepared.geometry
    assert geometry is not None
    ranked = sorted(probabilities.items(), key=lambda item: -item[1])
    thresholds = predictor.thresholds
    return PredictResponse(
        model=ModelRef(
            id=predictor.bundle.model_id, version=predictor.bundle.version, runtime=predictor.backend
        ),
        image=ImageInfo(
            filename=upload.filename,
            format=image_format,
            width=geometry.orig_width,
            height=geometry.orig_height,
        ),
        findings=[label for label, p in ranked if p >= thresholds[label]],
        predictions=[
            Prediction(
                label=label, probability=p, threshold=thresholds[label], positive=p >= thresholds[label]
            )
            for label, p in ranked
        ],
        probabilities=probabilities,
        thresholds=thresholds,
        heatmaps=overlays if (explain or heatmaps) else None,
        preview_png=preview_png,
        timing_ms=Timing(
            upload=_ms(started, uploaded),
            decode=_ms(uploaded, decoded),
            inference=_ms(decoded, inferred),
            heatmaps=_ms(inferred, finished) if explain else 0.0,
            total=_ms(started, finished),
        ),
    )


def _ms(start: float, end: float) -> float:
    return round(1000 * (end - start), 2)


def _requested_labels(predictor: Predictor, heatmap_labels: str | None) -> list[str] | None:
    if heatmap_labels is None:
        return None
    labels = [label.strip() for label in heatmap_labels.split(",") if label.strip()]
    unknown = [label for label in labels if label not in predictor.labels]
    if unknown:
        raise ApiError(
            422, "unknown_label", f"unknown heatmap labels {unknown}; the model predicts {predictor.labels}"
        )
    return labels


def _default_heatmap_labels(
    predictor: Predictor, probabilities: dict[str, float], heatmaps: bool, top: int
) -> list[str]:
    if not heatmaps:
        return []
    ranked = sorted(probabilities, key=lambda label: -probabilities[label])
    positives = [label for label in ranked if probabilities[label] >= predictor.thresholds[label]]
    others = [label for label in ranked if label not in positives][:top]
    return positives + others


def _decode_upload(predictor: Predictor, upload: Upload, image_format: str) -> PreparedImage:
    """Decode in memory (an fsspec memory file, removed at once) and preprocess; errors become 422."""
    suffix = ".dcm" if image_format == "DICOM" else f".{image_format.lower()}"
    url = f"memory://cxrkit-uploads/{uuid.uuid4().hex}{suffix}"
    memory = fsspec.filesystem("memory")
    memory.pipe(url, upload.data)
    try:
        prepared = predictor.prepare(url, upload.filename, keep_image=True)
    except Exception as error:  # any decoder failure on untrusted input is the input's fault
        log.warning("decoding %s failed unexpectedly", upload.filename, exc_info=True)
        prepared = PreparedImage(upload.filename, error=f"cannot decode the image: {error}")
    finally:
        memory.rm(url)
    if prepared.error is not None:
        raise ApiError(422, "undecodable_image", f"{upload.filename}: {prepared.error}")
    return prepared


def _render(
    predictor: Predictor, prepared: PreparedImage, labels: list[str], preview: bool, max_side: int
) -> tuple[dict[str, str], str | None]:
    """Heatmap overlays and the preview, both at the preview size, as base64 PNGs."""
    assert prepared.image is not None and prepared.geometry is not None and prepared.cache_image is not None
    height, width = prepared.image.shape
    factor = min(1.0, max_side / max(height, width))
    shape = (max(1, round(height * factor)), max(1, round(width * factor)))
    overlays = {}
    for label, heatmap in predictor.explain(prepared.cache_image, labels).items():
        mapped = predictor.heatmap_to_image(heatmap, prepared.geometry, shape)
        overlays[label] = base64.b64encode(png_bytes(heatmap_rgba(mapped))).decode()
    preview_png = None
    if preview:
        image = prepared.image
        if factor < 1.0:
            image = np.asarray(Image.fromarray(image).resize(shape[::-1], Image.Resampling.BILINEAR))
        preview_png = base64.b64encode(png_bytes(image)).decode()
    return overlays, preview_png


class BackgroundServer:
    """Run an app with uvicorn on a free loopback port in a daemon thread (tests, notebooks, benchmarks).

    >>> with BackgroundServer(create_app("model.cxr")) as server:
    ...     httpx.get(server.url + "/healthz")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = self._socket.getsockname()[:2]
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="cxr-uvicorn", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()

    def wait_ready(self, timeout: float = 120) -> None:
        """Block until the app's model is loaded (``/readyz`` would answer 200)."""
        service: ModelService = self._server.config.app.state.service
        if not service.ready.wait(timeout):
            raise RuntimeError(f"model not ready after {timeout} s: {service.error or 'still loading'}")


def serve(
    bundle: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServiceSettings | None = None,
    **predictor_options: Any,
) -> None:
    """Run the service with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(bundle, settings, **predictor_options), host=host, port=port, log_level="info")
