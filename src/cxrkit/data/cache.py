"""The preprocessing cache: every image decoded once, resized, and stored as uint8 in memory-mappable shards.

Training from 1024² PNGs spends most of its time decoding; the cache pays that once. Layout of ``out_dir``::

    cache.json               settings fixed when the cache was created (image_size, resize_policy,
                             intensity, shard_size); a later prepare asking for others raises
                             CacheMismatchError
    source_manifest.csv      the manifest being cached (+ .labels.json), read by merge_cache
    shards/shard_00000.npy   uint8 (n, S, S): the rows of shard 0 that decoded, in manifest order
    shards/shard_00000.json  that shard's record: input hash, cached rows with their geometry, failures
    manifest.csv             the cached rows: the source manifest plus geometry columns and shard/offset
    failures.csv             row, path, reason for every file that could not be decoded
    meta.json                source manifest hash, settings, cxrkit version, per-shard input hashes, time

Shard ``k`` holds source rows ``[k * shard_size, (k + 1) * shard_size)``. A shard's input hash covers the
paths, sizes and modification times of its files, so a re-run skips finished shards and rebuilds only those
whose files changed. ``shard=(i, n)`` builds the shards with ``k % n == i`` (one cluster array task each);
:func:`merge_cache` then checks every shard is present and writes manifest.csv, failures.csv and meta.json.

Safe to share: other processes (tuning trials, DDP ranks) may read a cache while ``prepare`` runs on it. A
complete, unchanged cache is never rewritten (a re-run only reads it); every file is written to a temporary
file in its own folder, flushed to disk and renamed over the old one, so a reader sees the old file or the
new one, never part of one. When shards must be rebuilt, meta.json (the mark of a complete cache) is removed
first and written last. An interrupted build (Ctrl-C, SIGTERM, a killed process) leaves only finished shards
and resumes from them.

Resize policies (``S`` = image_size; see :class:`cxrkit.data.transforms.Geometry` for mapping coordinates):

* ``letterbox``: the longer side becomes S, aspect kept, zero padding centres the image on an S x S canvas.
* ``crop``: the shorter side becomes S, aspect kept, the centre S x S is kept.
* ``stretch``: both sides become S (aspect not kept).

Resizing is antialiased bilinear (PIL). ``intensity`` (``none``, ``equalize``, ``clahe``) normalises contrast
before resizing (:func:`cxrkit.data.transforms.adjust_intensity`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

import cxrkit
from cxrkit.data.decode import ImageDecodeError, read_image
from cxrkit.data.manifest import Manifest
from cxrkit.data.transforms import (
    GEOMETRY_COLUMNS,
    INTENSITY_MODES,
    RESIZE_POLICIES,
    Geometry,
    adjust_intensity,
    cache_settings,
)
from cxrkit.files import fsync_directory, write_atomic

_FORMAT_VERSION = 1
_IMAP_CHUNKSIZE = 4
_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
_SHARD_FILE = re.compile(r"shard_(?P<index>\d{5})\.(npy|json)")
_TEMP_FILE = re.compile(r"\..+\.tmp-(?P<pid>\d+)")
#: meta.json keys that do not describe the cache's content (a re-merge that differs only there is a no-op).
_VOLATILE_META = ("created", "cxrkit_version")


class CacheMismatchError(ValueError):
    """An existing cache was built with other settings than the ones asked for."""


class CacheIncompleteError(RuntimeError):
    """The cache is missing shards or its final files (merge not done)."""


# ---------------------------------------------------------------- report


@dataclass(frozen=True)
class Failure:
    row: int
    path: str
    reason: str


@dataclass
class CacheReport:
    """What a :func:`prepare_cache` call did. ``n_images``/``failures`` cover the shards it was given."""

    out_dir: Path
    n_images: int = 0
    failures: list[Failure] = field(default_factory=list)
    shards_built: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)
    merged: bool = False
    seconds: float = 0.0

    @property
    def n_failed(self) -> int:
        return len(self.failures)


# ---------------------------------------------------------------- prepare


@dataclass(frozen=True)
class _Settings:
    image_size: int
    resize_policy: str
    shard_size: int
    intensity: str = "none"

    def as_dict(self) -> dict:
        return {
            **cache_settings(self.image_size, self.resize_policy, self.intensity),
            "shard_size": self.shard_size,
        }


@dataclass(frozen=True)
class _ShardPlan:
    index: int
    start: int
    stop: int


def prepare_cache(
    manifest: Manifest,
    out_dir: str | os.PathLike,
    *,
    image_size: int = 256,
    resize_policy: str = "letterbox",
    intensity: str = "none",
    shard_size: int = 1024,
    workers: int = 0,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> CacheReport:
    """Decode, resize and store every image of ``manifest`` under ``out_dir`` (see the module docstring).

    ``workers``: decoding processes (0 = all available cores, 1 = in this process). ``shard=(i, n)``
    builds only shards ``k % n == i`` and leaves the merge to :func:`merge_cache`; ``None`` builds all and
    merges. Files that cannot be decoded are skipped and reported. Raises :class:`CacheMismatchError` when
    ``out_dir`` holds a cache made with another image size, resize policy, intensity or shard size.
    """
    started = time.perf_counter()
    settings = _Settings(int(image_size), str(resize_policy), int(shard_size), str(intensity))
    _check_arguments(manifest, settings, shard)
    out_dir = Path(out_dir)
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    _claim_settings(out_dir, settings)
    _write_source_manifest(out_dir, manifest)

    paths = manifest.frame["path"].astype(str).tolist()
    plans = [
        p
        for p in _plan_shards(len(paths), settings.shard_size)
        if shard is None or p.index % shard[1] == shard[0]
    ]
    hashes = {plan.index: _input_hash(paths[plan.start : plan.stop], plan) for plan in plans}
    pending = [plan for plan in plans if not _shard_is_current(out_dir, plan, hashes[plan.index])]
    if pending:
        _mark_incomplete(out_dir)
    _build_shards(out_dir, paths, pending, hashes, settings, _worker_count(workers), progress)

    report = CacheReport(out_dir=out_dir)
    report.shards_built = [plan.index for plan in pending]
    report.shards_skipped = [plan.index for plan in plans if plan not in pending]
    for plan in plans:
        record = _read_record(out_dir, plan.index)
        report.n_images += len(record["rows"])
        report.failures.extend(Failure(*failure) for failure in record["failures"])
    if shard is None:
        merge_cache(out_dir)
        report.merged = True
    report.seconds = time.perf_counter() - started
    return report


def _check_arguments(manifest: Manifest, settings: _Settings, shard: tuple[int, int] | None) -> None:
    if len(manifest) == 0:
        raise ValueError("cannot cache an empty manifest")
    if settings.resize_policy not in RESIZE_POLICIES:
        raise ValueError(f"resize_policy must be one of {RESIZE_POLICIES}, got {settings.resize_policy!r}")
    if settings.intensity not in INTENSITY_MODES:
        raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {settings.intensity!r}")
    if settings.image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {settings.image_size}")
    if settings.shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {settings.shard_size}")
    if shard is not None and not (len(shard) == 2 and shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")


def _claim_settings(out_dir: Path, settings: _Settings) -> None:
    """Record the settings of a new cache, or raise CacheMismatchError when they differ from the existing."""
    path = out_dir / "cache.json"
    if path.exists():
        existing = json.loads(path.read_text())
        if {**_content_settings(existing), "shard_size": existing.get("shard_size")} != settings.as_dict():
            raise CacheMismatchError(
                f"cache {out_dir} was built with {_describe(existing)}, but this call asks for "
                f"{_describe(settings.as_dict())}; use another directory or delete {out_dir}"
            )
        return
    write_atomic(path, json.dumps({"format": _FORMAT_VERSION, **settings.as_dict()}, indent=2).encode())


def _content_settings(settings: dict) -> dict:
    """The image settings of a cache.json (caches made before ``intensity`` have none)."""
    intensity = settings.get("intensity", "none")
    return cache_settings(settings["image_size"], settings["resize_policy"], intensity)


def _describe(settings: dict) -> str:
    keys = ("image_size", "resize_policy", "intensity", "shard_size")
    return ", ".join(f"{k}={settings.get(k, 'none')!r}" for k in keys)


def _write_source_manifest(out_dir: Path, manifest: Manifest) -> None:
    csv_bytes = manifest.frame.to_csv(index=False).encode()
    target = out_dir / "source_manifest.csv"
    labels_path = target.with_suffix(".csv.labels.json")
    labels_bytes = json.dumps(manifest.labels).encode()
    if _has_bytes(target, csv_bytes) and _has_bytes(labels_path, labels_bytes):
        return
    write_atomic(labels_path, labels_bytes)
    write_atomic(target, csv_bytes)


def _has_bytes(path: Path, data: bytes) -> bool:
    return path.exists() and path.read_bytes() == data


def _mark_incomplete(out_dir: Path) -> None:
    """Remove meta.json (the mark of a complete cache) before any shard of it changes."""
    meta_path = out_dir / "meta.json"
    if meta_path.exists():
        meta_path.unlink(missing_ok=True)
        fsync_directory(out_dir)


def _plan_shards(n_rows: int, shard_size: int) -> list[_ShardPlan]:
    return [
        _ShardPlan(k, start, min(start + shard_size, n_rows))
        for k, start in enumerate(range(0, n_rows, shard_size))
    ]


def _input_hash(paths: Sequence[str], plan: _ShardPlan) -> str:
    """Hash of a shard's row range and each file's path, size and modification time."""
    digest = hashlib.sha256(f"{plan.start}:{plan.stop}\n".encode())
    for path in paths:
        digest.update(f"{path}\0{_file_signature(path)}\n".encode())
    return digest.hexdigest()


def _file_signature(path: str) -> str:
    try:
        if "://" in path:
            filesystem, inner = fsspec.core.url_to_fs(path)
            info = filesystem.info(inner)
            stamp = next(
                (info[k] for k in ("mtime", "LastModified", "last_modified", "ETag", "etag") if k in info), ""
            )
            return f"{info.get('size')}:{stamp}"
        stat = os.stat(path)
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    except (OSError, ValueError):
        return "missing"


def _shard_paths(out_dir: Path, index: int) -> tuple[Path, Path]:
    stem = out_dir / "shards" / f"shard_{index:05d}"
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def _read_record(out_dir: Path, index: int) -> dict:
    return json.loads(_shard_paths(out_dir, index)[1].read_text())


def _shard_is_current(out_dir: Path, plan: _ShardPlan, input_hash: str) -> bool:
    array_path, record_path = _shard_paths(out_dir, plan.index)
    if not (array_path.exists() and record_path.exists()):
        return False
    record = json.loads(record_path.read_text())
    if record.get("input_hash") != input_hash:
        return False
    return np.load(array_path, mmap_mode="r").shape[0] == len(record["rows"])


def _worker_count(workers: int) -> int:
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = all cores), got {workers}")
    if workers:
        return workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------- building shards


def _build_shards(
    out_dir: Path,
    paths: list[str],
    pending: list[_ShardPlan],
    hashes: dict[int, str],
    settings: _Settings,
    workers: int,
    progress: bool,
) -> None:
    if not pending:
        return
    tasks = (
        (row, paths[row], settings.image_size, settings.resize_policy, settings.intensity)
        for p in pending
        for row in range(p.start, p.stop)
    )
    total = sum(plan.stop - plan.start for plan in pending)
    with (
        _sigterm_as_interrupt(),
        _parallel_map(workers) as imap,
        tqdm(total=total, unit="img", desc="cache", disable=not progress) as bar,
    ):
        results = imap(_process_row, tasks)
        for plan in pending:
            writer = _ShardWriter(plan, settings.image_size)
            for _ in range(plan.stop - plan.start):
                writer.add(*next(results))
                bar.update()
            writer.commit(out_dir, hashes[plan.index], settings)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (as Ctrl-C does) so that the build stops cleanly.

    Only where SIGTERM still has its default action (a caller's own handler is kept) and in the main thread.
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def _parallel_map(workers: int) -> Iterator[Callable[[Callable, Iterable], Iterator]]:
    """An ordered, lazy map: the built-in one for one worker, else a process pool's chunked imap.

    Workers come from a fork server where the platform has one (else spawn): a clean single-threaded
    process that imports this module once, so a worker never inherits a lock that one of this process's
    threads (Lightning, MLflow, Optuna, tqdm) held at fork time — the hang a plain fork pool showed. As for
    every non-fork start method, a script that calls :func:`prepare_cache` at import time needs an
    ``if __name__ == "__main__":`` guard. Workers ignore Ctrl-C (the terminal sends SIGINT to the whole
    process group): this process alone stops the pool, which it terminates on any exception; after a
    finished map it closes the pool and waits for the workers (a terminate there once hung in CI).
    """
    if workers <= 1:
        yield map
        return
    context = multiprocessing.get_context(_START_METHOD)
    if _START_METHOD == "forkserver":
        context.set_forkserver_preload([__name__])
    pool = context.Pool(workers, initializer=_init_worker)
    try:
        yield lambda function, items: pool.imap(function, items, chunksize=_IMAP_CHUNKSIZE)
    except BaseException:
        pool.terminate()
        raise
    pool.close()  # finished: workers leave on their own, no SIGTERM racing their last steps
    pool.join()


def _init_worker() -> None:
    """Pool worker signals: ignore SIGINT; exit quietly on SIGTERM (``Pool.terminate`` sends it).

    Exiting through an exception (not the default action) releases the pool's queue locks a worker may hold
    while it waits for a task; a worker killed while holding one would hang ``Pool.terminate`` forever.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_worker)


def _exit_worker(signum: int, _frame: object) -> None:
    sys.exit(128 + signum)


def _process_row(
    task: tuple[int, str, int, str, str],
) -> tuple[int, str, np.ndarray | None, Geometry | None, str]:
    """Decode, normalise and resize one image (in a worker); a decoding failure is returned, not raised."""
    row, path, size, policy, intensity = task
    try:
        image = read_image(path)
    except ImageDecodeError as exc:
        return row, path, None, None, exc.reason
    geometry = Geometry.fit(image.shape[0], image.shape[1], size, policy)
    return row, path, geometry.apply(adjust_intensity(image, intensity)), geometry, ""


class _ShardWriter:
    """Collects one shard's images in a single buffer and writes it atomically."""

    def __init__(self, plan: _ShardPlan, size: int) -> None:
        self.plan = plan
        self.buffer = np.empty((plan.stop - plan.start, size, size), dtype=np.uint8)
        self.rows: list[list] = []
        self.failures: list[list] = []

    def add(
        self, row: int, path: str, image: np.ndarray | None, geometry: Geometry | None, reason: str
    ) -> None:
        if image is None or geometry is None:
            self.failures.append([row, path, reason])
            return
        self.buffer[len(self.rows)] = image
        self.rows.append([row, path, *geometry.columns().values()])

    def commit(self, out_dir: Path, input_hash: str, settings: _Settings) -> None:
        array_path, record_path = _shard_paths(out_dir, self.plan.index)
        record_path.unlink(missing_ok=True)  # the record marks a finished shard: drop it before the array
        record = {
            "index": self.plan.index,
            "start": self.plan.start,
            "stop": self.plan.stop,
            "input_hash": input_hash,
            **settings.as_dict(),
            "columns": ["row", "path", *GEOMETRY_COLUMNS],
            "rows": self.rows,
            "failures": self.failures,
        }
        try:
            write_atomic(array_path, lambda file: np.save(file, self.buffer[: len(self.rows)]))
            write_atomic(record_path, json.dumps(record).encode())
        except BaseException:  # interrupted between the two: no array without its record
            if not record_path.exists():
                array_path.unlink(missing_ok=True)
            raise


# ---------------------------------------------------------------- merge


def merge_cache(out_dir: str | os.PathLike) -> Path:
    """Check every shard is present and write manifest.csv, failures.csv and meta.json; return out_dir.

    Raises :class:`CacheIncompleteError` naming the missing shards, or when a shard was built from rows that
    are not those of the source manifest.
    """
    out_dir = Path(out_dir)
    settings_path, source_path = out_dir / "cache.json", out_dir / "source_manifest.csv"
    if not settings_path.exists() or not source_path.exists():
        raise CacheIncompleteError(f"{out_dir} is not a cache directory (no cache.json/source_manifest.csv)")
    settings = json.loads(settings_path.read_text())
    source = Manifest.load(source_path)
    plans = _plan_shards(len(source), int(settings["shard_size"]))
    missing = [p.index for p in plans if not all(path.exists() for path in _shard_paths(out_dir, p.index))]
    if missing:
        raise CacheIncompleteError(
            f"cache {out_dir} is missing {len(missing)} of {len(plans)} shards "
            f"(indices {_abbreviate(missing)}); run prepare_cache for them "
            "(shard=(i, n) builds indices k % n == i)"
        )
    records = [_read_record(out_dir, plan.index) for plan in plans]
    _check_records(out_dir, records, plans, source)
    failures = [failure for record in records for failure in record["failures"]]
    meta = {
        "format": _FORMAT_VERSION,
        "cxrkit_version": cxrkit.__version__,
        **_content_settings(settings),
        "shard_size": settings["shard_size"],
        "source_manifest_sha256": hashlib.sha256(source_path.read_bytes()).hexdigest(),
        "n_source_rows": len(source),
        "n_images": sum(len(record["rows"]) for record in records),
        "n_failed": len(failures),
        "labels": source.labels,
        "shards": [_shard_meta(out_dir, record) for record in records],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if _is_merged(out_dir, meta):
        return out_dir  # complete and unchanged: never rewritten under its readers
    _mark_incomplete(out_dir)
    _remove_stale_files(out_dir, len(plans))
    cached = _cached_manifest(source, records).frame
    write_atomic(out_dir / "manifest.csv.labels.json", json.dumps(source.labels).encode())
    write_atomic(out_dir / "manifest.csv", cached.to_csv(index=False).encode())
    failures_csv = pd.DataFrame(failures, columns=["row", "path", "reason"]).to_csv(index=False)
    write_atomic(out_dir / "failures.csv", failures_csv.encode())
    write_atomic(out_dir / "meta.json", json.dumps(meta, indent=2).encode())  # last: marks it complete
    return out_dir


def _is_merged(out_dir: Path, meta: dict) -> bool:
    """Whether ``out_dir`` already holds the merge described by ``meta`` (its time and version aside)."""
    finals = [out_dir / name for name in ("manifest.csv", "manifest.csv.labels.json", "failures.csv")]
    meta_path = out_dir / "meta.json"
    if not (meta_path.exists() and all(path.exists() for path in finals)):
        return False
    try:
        existing = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    return _content(existing) == _content(meta)


def _content(meta: dict) -> dict:
    return {key: value for key, value in meta.items() if key not in _VOLATILE_META}


def _shard_meta(out_dir: Path, record: dict) -> dict:
    array_path = _shard_paths(out_dir, record["index"])[0]
    return {
        "file": array_path.relative_to(out_dir).as_posix(),
        "rows": len(record["rows"]),
        "input_hash": record["input_hash"],
    }


def _abbreviate(indices: list[int], limit: int = 20) -> str:
    shown = ", ".join(map(str, indices[:limit]))
    return shown + (f", ... ({len(indices) - limit} more)" if len(indices) > limit else "")


def _check_records(out_dir: Path, records: list[dict], plans: list[_ShardPlan], source: Manifest) -> None:
    paths = source.frame["path"].astype(str).tolist()
    for record, plan in zip(records, plans, strict=True):
        entries = [(row, path) for row, path, *_ in record["rows"]] + [
            (r, p) for r, p, _ in record["failures"]
        ]
        same_rows = (record["start"], record["stop"]) == (plan.start, plan.stop)
        if (
            not same_rows
            or any(paths[row] != path for row, path in entries)
            or len(entries) != plan.stop - plan.start
        ):
            raise CacheIncompleteError(
                f"shard {plan.index} of cache {out_dir} was built from other rows than source_manifest.csv; "
                "run prepare_cache again with the current manifest"
            )


def _remove_stale_files(out_dir: Path, n_shards: int) -> None:
    """Remove shards beyond the manifest's end and temporary files left by processes no longer running."""
    for path in [*(out_dir / "shards").iterdir(), *out_dir.iterdir()]:
        shard = _SHARD_FILE.fullmatch(path.name)
        temp = _TEMP_FILE.fullmatch(path.name)
        if (shard and int(shard["index"]) >= n_shards) or (temp and not _is_running(int(temp["pid"]))):
            path.unlink(missing_ok=True)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cached_manifest(source: Manifest, records: list[dict]) -> Manifest:
    rows = [
        (record["index"], offset, entry) for record in records for offset, entry in enumerate(record["rows"])
    ]
    source_rows = [entry[0] for _, _, entry in rows]
    frame = source.frame.iloc[source_rows].reset_index(drop=True)
    geometry = np.array([entry[2:] for _, _, entry in rows], dtype=np.float64).reshape(
        len(rows), len(GEOMETRY_COLUMNS)
    )
    for i, column in enumerate(GEOMETRY_COLUMNS):
        frame[column] = geometry[:, i] if column.startswith("scale") else geometry[:, i].astype(np.int64)
    frame["shard"] = np.array([shard for shard, _, _ in rows], dtype=np.int64)
    frame["offset"] = np.array([offset for _, offset, _ in rows], dtype=np.int64)
    return Manifest(frame, list(source.labels))


# ---------------------------------------------------------------- reading


class Cache:
    """A finished cache: its manifest (with geometry and shard/offset columns) and memory-mapped images."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        meta_path = self.out_dir / "meta.json"
        if not meta_path.exists():
            raise CacheIncompleteError(
                f"{self.out_dir} is not a finished cache (no meta.json): run prepare_cache, or merge_cache "
                "after building every shard"
            )
        self.meta: dict = json.loads(meta_path.read_text())
        self.manifest = Manifest.load(self.out_dir / "manifest.csv")
        if len(self.manifest) != int(self.meta["n_images"]):
            raise CacheIncompleteError(
                f"cache {self.out_dir} changed while it was being opened (a prepare is rebuilding it): "
                "open it again when that prepare has finished"
            )
        self.image_size = int(self.meta["image_size"])
        self.resize_policy = str(self.meta["resize_policy"])
        self.intensity = str(self.meta.get("intensity", "none"))
        self._shard_files = [self.out_dir / shard["file"] for shard in self.meta["shards"]]
        self._shard_of = self.manifest.frame["shard"].to_numpy(dtype=np.int64)
        self._offset_of = self.manifest.frame["offset"].to_numpy(dtype=np.int64)
        self._memmaps: list[np.ndarray] | None = None

    @property
    def settings(self) -> dict[str, Any]:
        """Image size, resize policy and intensity: what a model's preprocessing must match."""
        return cache_settings(self.image_size, self.resize_policy, self.intensity)

    def __len__(self) -> int:
        return len(self.manifest)

    def __getstate__(self) -> dict:  # memmaps are reopened in each process, never pickled as arrays
        return {**self.__dict__, "_memmaps": None}

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.labels)

    @property
    def targets(self) -> np.ndarray:
        """Label matrix (n_images x n_labels), float32 with NaN for unknown."""
        return self.manifest.targets

    @property
    def shards(self) -> list[np.ndarray]:
        """The shard arrays, memory-mapped read-only, each (n, S, S) uint8."""
        if self._memmaps is None:
            memmaps = [np.load(path, mmap_mode="r") for path in self._shard_files]
            for array, shard in zip(memmaps, self.meta["shards"], strict=True):
                if array.shape[0] != shard["rows"]:
                    raise CacheIncompleteError(
                        f"cache {self.out_dir}: {shard['file']} was rebuilt since the cache was opened "
                        "(a prepare is changing it): open the cache again when that prepare has finished"
                    )
            self._memmaps = memmaps
        return self._memmaps

    def image(self, index: int) -> np.ndarray:
        """The (S, S) uint8 image of row ``index`` (a read-only view into its shard)."""
        return self.shards[self._shard_of[index]][self._offset_of[index]]

    def images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The images of ``indices`` as one new (B, S, S) uint8 array, gathered shard by shard."""
        indices = np.asarray(indices, dtype=np.int64)
        shard_ids, offsets = self._shard_of[indices], self._offset_of[indices]
        if len(indices) and (shard_ids == shard_ids[0]).all():  # the usual case: one shard, one gather
            return np.asarray(np.take(self.shards[shard_ids[0]], offsets, axis=0))
        out = np.empty((len(indices), self.image_size, self.image_size), dtype=np.uint8)
        for shard_id in np.unique(shard_ids):
            positions = np.flatnonzero(shard_ids == shard_id)
            out[positions] = np.take(self.shards[shard_id], offsets[positions], axis=0)
        return out

    def geometry(self, index: int) -> Geometry:
        """How row ``index``'s original image maps to its cache image."""
        return Geometry.from_row(self.manifest.frame.iloc[index], self.image_size)


def open_cache(out_dir: str | os.PathLike) -> Cache:
    """Open a finished cache written by :func:`prepare_cache` / :func:`merge_cache`."""
    return Cache(out_dir)
