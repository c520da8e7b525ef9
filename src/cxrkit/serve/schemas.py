"""What the service answers: response models, the JSON error body and its OpenAPI descriptions."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ApiError(Exception):
    """A client error returned as JSON ``{"error": {"status", "code", "message"}}`` (plus ``headers``)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


class ModelRef(BaseModel):
    id: str
    version: str
    runtime: str = Field(description="onnx, onnx-int8 or torch")


class Prediction(BaseModel):
    label: str
    probability: float
    threshold: float = Field(description="operating threshold chosen on validation data")
    positive: bool = Field(description="probability >= threshold")


class OodCheck(BaseModel):
    score: float = Field(
        description="cosine distance of the pooled image features to the k-th nearest training image"
    )
    threshold: float = Field(description="a high quantile of the validation images' scores (set at export)")
    flagged: bool = Field(description="score > threshold: this does not look like the training chest X-rays")


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
    ood: OodCheck | None = Field(
        None, description="out-of-distribution check (null when the bundle has no detector)"
    )
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


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "malformed request (no file part, broken multipart body, empty file)",
        401: "missing or wrong bearer token (when the service requires one)",
        408: "the upload did not arrive within the read timeout",
        413: "upload larger than max_upload_bytes",
        415: "not multipart, or a file that is not PNG, JPEG or DICOM",
        422: "the image cannot be decoded (truncated, corrupt, decompression bomb, DICOM without pixels, "
        "more pixels than the service accepts) or is implausible as a chest X-ray (too small, too elongated)",
        429: "too many requests in flight",
        503: "the model is still loading, or the decode-memory budget is full (see Retry-After)",
    }.items()
}

UPLOAD_BODY: dict[str, Any] = {
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
