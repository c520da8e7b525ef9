"""Scheduling of the service's work: admission by memory and micro-batching of model calls.

:class:`MemoryBudget` admits a request only while the bytes it will hold (the upload as it streams in,
then the decode estimated from the image header, before any pixel is decoded) fit in a fixed budget;
otherwise the request is refused at once (the app answers 503 with Retry-After) instead of queueing work
that would grow the process. :class:`MicroBatcher` gathers single-image model calls from concurrent
requests into batches.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from cxrkit.data.decode import ImageDecodeError, ImageHeader, ImplausibleImageError, Plausibility, probe_image
from cxrkit.serve.schemas import ApiError
from cxrkit.serve.upload import Upload

MIB = 1024 * 1024


class BudgetExceeded(Exception):
    """A reservation that does not fit in what is left of the budget now."""

    def __init__(self, requested: int, in_use: int, limit: int) -> None:
        super().__init__(f"{requested:,} bytes requested, {in_use:,} of {limit:,} in use")
        self.requested, self.in_use, self.limit = requested, in_use, limit


class MemoryBudget:
    """A byte budget shared by concurrent requests; each holds a :class:`Reservation` while it runs."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"memory budget must be positive, got {limit}")
        self.limit = limit
        self._in_use = 0
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        return self._in_use

    def reservation(self) -> Reservation:
        return Reservation(self)

    def _take(self, amount: int) -> None:
        with self._lock:
            if self._in_use + amount > self.limit:
                raise BudgetExceeded(amount, self._in_use, self.limit)
            self._in_use += amount

    def _give_back(self, amount: int) -> None:
        with self._lock:
            self._in_use -= amount


class Reservation:
    """Bytes held from a :class:`MemoryBudget`, grown step by step and all given back on exit."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.held = 0

    def grow(self, amount: int) -> None:
        """Hold ``amount`` more bytes, or raise :class:`BudgetExceeded` (holding nothing more)."""
        self.budget._take(amount)
        self.held += amount

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.budget._give_back(self.held)
        self.held = 0


def admit_decode(
    upload: Upload, reservation: Reservation, *, max_pixels: int, plausibility: Plausibility
) -> ImageHeader:
    """Check the upload's header (plausible shape: else 422; pixel limit: else 422) and hold the memory
    its decode needs in ``reservation`` (422 when it can never fit the budget, :class:`BudgetExceeded`
    when it does not fit now)."""
    try:
        header = probe_image(upload.data, name=upload.filename)
        plausibility.check(header.width, header.height, upload.filename)
    except ImplausibleImageError as error:
        raise ApiError(422, "implausible_image", f"{upload.filename}: {error.reason}") from error
    except ImageDecodeError as error:
        raise ApiError(422, "undecodable_image", f"{upload.filename}: {error.reason}") from error
    if header.pixels > max_pixels:
        raise ApiError(
            422,
            "undecodable_image",
            f"{upload.filename}: header declares {header.width} x {header.height} = {header.pixels:,} "
            f"pixels, more than this service accepts ({max_pixels:,}; decompression bomb guard)",
        )
    limit = reservation.budget.limit
    if header.decode_bytes > limit:
        raise ApiError(
            422,
            "image_too_large",
            f"{upload.filename}: decoding this {header.width} x {header.height} image needs about "
            f"{header.decode_bytes / MIB:.0f} MiB, more than the service's decode budget of "
            f"{limit / MIB:.0f} MiB",
        )
    reservation.grow(header.decode_bytes)
    return header


def busy_error(error: BudgetExceeded, retry_after_s: int) -> ApiError:
    """The 503 (with Retry-After) of a request refused by a full budget."""
    return ApiError(
        503,
        "busy",
        f"the service's decode memory is in use by other uploads ({error.in_use / MIB:.0f} of "
        f"{error.limit / MIB:.0f} MiB); retry in {retry_after_s} s",
        headers={"Retry-After": str(retry_after_s)},
    )


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
