"""Reading an upload: the multipart body streamed into memory within a size limit, a deadline and the
memory budget, and the image format sniffed from the file's bytes. Nothing is written to disk."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from cxrkit.serve.schemas import ApiError

if TYPE_CHECKING:
    from cxrkit.serve.batching import Reservation

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


class UploadDeadlines:
    """Uploads must arrive within ``timeout_s`` (else 408); at shutdown, :meth:`expire_all` ends those
    still arriving (503) instead of letting them hold the exit up."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.stopping = False
        self._active: set[asyncio.Timeout] = set()

    async def read(self, request: Request, limit: int, reservation: Reservation) -> Upload:
        """:func:`read_upload` within the deadline."""
        try:
            async with asyncio.timeout(self.timeout_s) as deadline:
                self._active.add(deadline)
                try:
                    return await read_upload(request, limit, reservation)
                finally:
                    self._active.discard(deadline)
        except TimeoutError as error:
            if self.stopping:
                raise ApiError(
                    503, "shutting_down", "the service is stopping; send it again later"
                ) from error
            raise ApiError(
                408, "upload_timeout", f"the upload did not arrive within {self.timeout_s:g} s"
            ) from error

    def expire_all(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called on ``loop`` when shutdown begins."""
        self.stopping = True
        for deadline in list(self._active):
            deadline.reschedule(loop.time())


async def read_upload(request: Request, limit: int, reservation: Reservation) -> Upload:
    """The uploaded file, streamed from the request with the size limit checked chunk by chunk.

    Its bytes are held in ``reservation`` twice (the body as received, then the file's own copy), so a
    full budget refuses it mid-stream (:class:`~cxrkit.serve.batching.BudgetExceeded`).
    """
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
    async for chunk in request.stream():
        received += len(chunk)
        if received > body_limit:
            raise ApiError(413, "upload_too_large", f"request body exceeds the limit of {limit:,} bytes")
        reservation.grow(2 * len(chunk))
        _parse(collector.parser.write, chunk)
    _parse(collector.parser.finalize)
    return collector.file()


def _parse(step: Callable[..., object], *args: bytes) -> None:
    try:
        step(*args)
    except ApiError:
        raise
    except Exception as error:  # python-multipart raises several types for broken bodies
        raise ApiError(400, "malformed_multipart", f"cannot parse the multipart body: {error}") from error


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
