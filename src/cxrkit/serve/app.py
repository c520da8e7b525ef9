"""The HTTP service: ``POST /v1/predict`` on an uploaded X-ray, model card, health probes and a web page.

Endpoints: ``POST /v1/predict`` (multipart field ``file``: PNG, JPEG or DICOM), ``GET /v1/model``,
``GET /healthz`` (the process is up), ``GET /readyz`` (the model is loaded and warmed up), ``GET /`` (the
page in ``static/``), ``/docs`` and ``/redoc`` (OpenAPI, served without a CDN), ``/openapi.json``.
With a token (:mod:`cxrkit.serve.auth`) the ``/v1`` routes need ``Authorization: Bearer <token>``.

A request flows through :mod:`~cxrkit.serve.upload` (streamed into memory within a size limit and a read
timeout), the header check (plausibility, pixel limit, decode memory estimated from the header and
admitted by :class:`~cxrkit.serve.batching.MemoryBudget`: 503 + Retry-After when full), decoding from
memory by the predictor on a thread pool, and :class:`~cxrkit.serve.batching.MicroBatcher`, which gathers
model calls from concurrent requests into batches run by one single-threaded worker per core. Uploads are
never written to disk; every problem with the input is a 4xx JSON ``{"error": {"status", "code",
"message"}}``; upload file names are logged only when ``log_filenames`` is set.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

import cxrkit
from cxrkit.data.decode import Plausibility
from cxrkit.inference.bundle import Bundle
from cxrkit.inference.predictor import Predictor, heatmap_rgba, png_bytes
from cxrkit.inference.runner import PreparedImage
from cxrkit.serve.auth import bearer_guard, check_exposure
from cxrkit.serve.batching import (
    MIB,
    BudgetExceeded,
    MemoryBudget,
    MicroBatcher,
    Reservation,
    admit_decode,
    busy_error,
)
from cxrkit.serve.schemas import (
    ERROR_RESPONSES,
    UPLOAD_BODY,
    ApiError,
    ImageInfo,
    ModelRef,
    OodCheck,
    Prediction,
    PredictResponse,
    Timing,
)
from cxrkit.serve.upload import ACCEPTED_CONTENT_TYPES, Upload, UploadDeadlines, sniff_format

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class ServiceSettings:
    """Limits, batching and access control of the service."""

    max_upload_bytes: int = 32 * MIB
    max_pixels: int = 8192 * 8192  #: larger declared images are refused as decompression bombs
    decode_memory_bytes: int = 512 * MIB  #: uploads and decodes in flight (estimated from headers)
    upload_timeout_s: float = 30.0  #: the whole upload must arrive within this time (else 408)
    retry_after_s: int = 1  #: Retry-After of a 503 when the decode-memory budget is full
    plausibility: Plausibility = field(default_factory=Plausibility)
    max_batch: int = 16
    max_wait_ms: float = 2.0  #: how long a batch waits for more requests after its first
    inference_workers: int | None = None  #: batches run at once (default: one per core)
    inference_threads: int = 1  #: ONNX Runtime threads per batch: requests in parallel beat ops in parallel
    max_in_flight: int = 64  #: requests admitted at once; more get 429
    decode_workers: int | None = None  #: decoding threads (default: two per core; memory is budgeted)
    large_decode_bytes: int = 64 * MIB  #: decodes estimated above this run on a low-priority thread
    preview_max_side: int = 1024
    token: str | None = None  #: bearer token required on /v1 routes (None: open)
    log_filenames: bool = False  #: upload file names often carry patient names


# ---------------------------------------------------------------------- service state


class ModelService:
    """The loaded predictor, its batcher, thread pools, memory budget and readiness."""

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
        self.budget = MemoryBudget(settings.decode_memory_bytes)
        self.decode_pool = ThreadPoolExecutor(
            settings.decode_workers or 2 * (os.cpu_count() or 1), thread_name_prefix="cxr-decode"
        )
        # huge images (seconds of CPU each) yield the cores to ordinary requests
        self.large_decode_pool = ThreadPoolExecutor(
            1, thread_name_prefix="cxr-decode-large", initializer=_lower_thread_priority
        )
        self.heatmap_pool = ThreadPoolExecutor(1, thread_name_prefix="cxr-heatmap")
        self.in_flight = 0
        self.deadlines = UploadDeadlines(settings.upload_timeout_s)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loader = threading.Thread(target=self._load, name="cxr-model-loader", daemon=True)

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._loader.start()

    def stop_uploads(self) -> None:
        """Shutdown has begun: uploads still arriving end now (503) instead of holding the exit up."""
        assert self.loop is not None
        self.deadlines.expire_all(self.loop)

    def _load(self) -> None:
        try:
            predictor = load_predictor(self.source, self.settings, self.predictor_options)
            # the same policy for torch (preprocessing, heatmaps, the torch backend): parallelism comes from
            # concurrent requests; OpenMP wake-ups cost more than these small per-request ops under load
            torch.set_num_threads(self.settings.inference_threads)
            size = predictor.bundle.preprocess.image_size
            predictor.probabilities(np.zeros((1, size, size), dtype=np.uint8))  # warm-up
            self.predictor = predictor
            self.batcher = MicroBatcher(
                predictor.score_rows,
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
        self.large_decode_pool.shutdown(wait=False, cancel_futures=True)
        self.heatmap_pool.shutdown(wait=False, cancel_futures=True)

    def require_predictor(self) -> Predictor:
        if self.predictor is None:
            detail = f"model failed to load: {self.error}" if self.error else "model is still loading"
            raise ApiError(503, "not_ready", detail)
        return self.predictor

    def shown_name(self, upload: Upload) -> str:
        """The upload's file name for logs: hidden unless ``log_filenames``."""
        return upload.filename if self.settings.log_filenames else "<upload>"


def _lower_thread_priority() -> None:
    """Nice the calling thread by 10 (Linux schedules threads separately; elsewhere a no-op)."""
    with suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def load_predictor(
    source: str | os.PathLike | Bundle | Predictor,
    settings: ServiceSettings,
    predictor_options: dict[str, Any],
) -> Predictor:
    """The predictor the service runs: ``source`` itself, or one built on the bundle it names."""
    if isinstance(source, Predictor):
        return source
    bundle = source if isinstance(source, Bundle) else Bundle.load(source)
    options = {"threads": settings.inference_threads, **predictor_options}
    return Predictor(bundle, max_pixels=settings.max_pixels, plausibility=settings.plausibility, **options)


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
    authorised = [Depends(bearer_guard(settings.token))]

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
        responses={status: ERROR_RESPONSES[status] for status in (401, 503)},
        dependencies=authorised,
    )
    async def model_card() -> dict[str, Any]:
        return _model_card(service.require_predictor(), settings)

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=UPLOAD_BODY,
        summary="Findings for one uploaded chest X-ray",
        dependencies=authorised,
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
    def error_response(
        status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> JSONResponse:
        return JSONResponse(
            {"error": {"status": status, "code": code, "message": message}},
            status_code=status,
            headers=headers,
        )

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.code, error.message, error.headers)

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
        "thresholds": predictor.thresholds,  # the served graph's own (int8 has its own)
        "threshold_source": bundle.threshold_source,
        "activation": bundle.activation,
        "architecture": bundle.model_config,
        "input": {
            "content_types": sorted(t for t in ACCEPTED_CONTENT_TYPES if t),
            "formats": ["PNG", "JPEG", "DICOM"],
            "max_upload_bytes": settings.max_upload_bytes,
            "max_pixels": settings.max_pixels,
            "min_side": settings.plausibility.min_side,
            "max_aspect": settings.plausibility.max_aspect,
            "preprocess": bundle.preprocess.to_dict(),
        },
        "provenance": bundle.provenance,
        "quantization": bundle.quantization,
        "ood": predictor.ood.info() if predictor.ood is not None else None,  # the served graph's threshold
    }


def _ood_check(predictor: Predictor, score: float | None) -> OodCheck | None:
    if score is None or predictor.ood is None:
        return None
    return OodCheck(score=score, threshold=predictor.ood.threshold, flagged=bool(predictor.ood_flag(score)))


# ---------------------------------------------------------------------- one prediction


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
        with service.budget.reservation() as reservation:
            upload, image_format = await _receive(request, service, reservation)
            uploaded = time.perf_counter()
            keep_image = preview or heatmaps or bool(requested)
            prepared = await _decode(service, predictor, upload, reservation, keep_image)
            decoded = time.perf_counter()
            assert service.batcher is not None and prepared.cache_image is not None
            scores, ood_score = await asyncio.wrap_future(service.batcher.submit(prepared.cache_image))
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
                overlays, preview_png = await asyncio.get_running_loop().run_in_executor(
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
    timing = Timing(
        upload=_ms(started, uploaded),
        decode=_ms(uploaded, decoded),
        inference=_ms(decoded, inferred),
        heatmaps=_ms(inferred, finished) if explain else 0.0,
        total=_ms(started, finished),
    )
    shown = overlays if (explain or heatmaps) else None
    return _response(
        predictor,
        upload.filename,
        image_format,
        prepared,
        probabilities,
        shown,
        preview_png,
        timing,
        ood_score,
    )


def _response(
    predictor: Predictor,
    filename: str,
    image_format: str,
    prepared: PreparedImage,
    probabilities: dict[str, float],
    heatmaps: dict[str, str] | None,
    preview_png: str | None,
    timing: Timing,
    ood_score: float | None = None,
) -> PredictResponse:
    geometry = prepared.geometry
    assert geometry is not None
    ranked = sorted(probabilities.items(), key=lambda item: -item[1])
    thresholds = predictor.thresholds
    bundle = predictor.bundle
    return PredictResponse(
        model=ModelRef(id=bundle.model_id, version=bundle.version, runtime=predictor.backend),
        image=ImageInfo(
            filename=filename, format=image_format, width=geometry.orig_width, height=geometry.orig_height
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
        ood=_ood_check(predictor, ood_score),
        heatmaps=heatmaps,
        preview_png=preview_png,
        timing_ms=timing,
    )


async def _receive(request: Request, service: ModelService, reservation: Reservation) -> tuple[Upload, str]:
    """The upload and its format, received within the read timeout and the memory budget."""
    try:
        upload = await service.deadlines.read(request, service.settings.max_upload_bytes, reservation)
    except BudgetExceeded as error:
        raise busy_error(error, service.settings.retry_after_s) from error
    image_format = sniff_format(upload)
    if service.settings.log_filenames:
        log.info("upload %s (%s, %d bytes)", upload.filename, image_format, len(upload.data))
    return upload, image_format


async def _decode(
    service: ModelService, predictor: Predictor, upload: Upload, reservation: Reservation, keep_image: bool
) -> PreparedImage:
    """Admit the decode by its header, then decode on a pool (huge images on the low-priority one)."""
    settings = service.settings
    try:
        header = admit_decode(
            upload, reservation, max_pixels=settings.max_pixels, plausibility=settings.plausibility
        )
    except BudgetExceeded as error:
        raise busy_error(error, settings.retry_after_s) from error
    large = header.decode_bytes > service.settings.large_decode_bytes
    return await asyncio.get_running_loop().run_in_executor(
        service.large_decode_pool if large else service.decode_pool,
        _decode_upload,
        service,
        predictor,
        upload,
        keep_image,
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


def _decode_upload(
    service: ModelService, predictor: Predictor, upload: Upload, keep_image: bool
) -> PreparedImage:
    """Decode from memory and preprocess; errors become 422."""
    try:
        prepared = predictor.prepare(upload.data, upload.filename, keep_image=keep_image)
    except Exception as error:  # any decoder failure on untrusted input is the input's fault
        log.warning("decoding %s failed unexpectedly", service.shown_name(upload), exc_info=True)
        prepared = PreparedImage(upload.filename, error=f"cannot decode the image: {error}")
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


# ---------------------------------------------------------------------- running it


def serve(
    bundle: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServiceSettings | None = None,
    insecure_no_auth: bool = False,
    **predictor_options: Any,
) -> None:
    """Load the bundle (its errors are raised here, before anything listens), then run the service with
    uvicorn until SIGINT/SIGTERM; requests still running get a few seconds to finish."""
    import uvicorn

    settings = settings or ServiceSettings()
    check_exposure(host, settings.token, insecure_no_auth)
    app = create_app(load_predictor(bundle, settings, predictor_options), settings)
    service: ModelService = app.state.service

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if service.loop is not None:
                service.loop.call_soon_threadsafe(service.stop_uploads)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=3)
    Server(config).run()
