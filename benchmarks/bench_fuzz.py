"""Long fuzzing run of the decoders: mutated real PNG/JPEG/DICOM bytes through `read_image` and, with
`--service`, `/v1/predict` (FastAPI TestClient over a tiny random-weight bundle). Prints JSON.

The mutations are those of tests/test_fuzz.py (tests/fuzz_inputs.py), drawn from a seeded generator so a
run is reproducible. Each case runs in a worker process with a time limit, so a hang is measured (and
killed) rather than stalling the run. A failure is any exception other than ImageDecodeError (read_image)
or any answer other than 200 / 4xx JSON (service); failing inputs are saved with `--save DIR`.

Target (issue): no undocumented exception, no case slower than 5 s.

    python benchmarks/bench_fuzz.py [--cases 2000] [--seed 0] [--service] [--save fuzz-failures/]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
import traceback
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the shared mutations and the tiny test bundle

from fuzz_inputs import mutations, seed_files  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data"
HANG_SECONDS = 5.0

_client = None  # the worker's TestClient (service mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared real-data folder")
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--service", action="store_true", help="post each case to /v1/predict as well")
    parser.add_argument("--save", type=Path, default=None, help="folder for failing and slowest inputs")
    args = parser.parse_args()
    if not (args.data / "nih" / "images").is_dir():
        sys.exit(f"real data not found at {args.data} (see ../shared/data/README.md)")

    seeds = seed_files(args.data)
    rng = np.random.default_rng(args.seed)
    names = sorted(seeds)
    outcomes: Counter[str] = Counter()
    failures: list[dict] = []
    slowest = {"seconds": 0.0}
    started = time.perf_counter()
    executor = _executor(args.service)
    for case in range(args.cases):
        name = names[int(rng.integers(len(names)))]
        payload = mutations(seeds[name], name, lambda low, high: int(rng.integers(low, high + 1)))
        future = executor.submit(_run_case, name, payload, args.service)
        try:
            outcome, detail, seconds = future.result(timeout=HANG_SECONDS * 4)
        except FutureTimeout:
            outcome, detail, seconds = "hang", f"no answer within {HANG_SECONDS * 4:.0f} s", HANG_SECONDS * 4
            _kill(executor)
            executor = _executor(args.service)
        if seconds > HANG_SECONDS and outcome != "hang":
            outcome, detail = "slow", f"{detail} (took {seconds:.1f} s)"
        outcomes[outcome] += 1
        record = {"case": case, "seed_file": name, "bytes": len(payload), "seconds": round(seconds, 3)}
        if outcome in ("failure", "hang", "slow"):
            failures.append({**record, "outcome": outcome, "detail": detail})
            _save(args.save, f"{outcome}-{case:05d}-{name}", payload)
        if seconds > slowest["seconds"]:
            slowest = {**record, "outcome": outcome}
            _save(args.save, f"slowest-{name}", payload)
    _kill(executor)
    elapsed = time.perf_counter() - started
    result = {
        "target": "read_image" + (" + /v1/predict" if args.service else ""),
        "cases": args.cases,
        "seed": args.seed,
        "seed_files": {name: len(data) for name, data in seeds.items()},
        "outcomes": dict(outcomes),
        "failures": len(failures),
        "failure_examples": failures[:20],
        "failure_kinds": dict(Counter(f["detail"].split(":")[0] for f in failures).most_common(10)),
        "slowest_case": slowest,
        "seconds": round(elapsed, 1),
        "cases_per_s": round(args.cases / elapsed, 1),
        "hang_limit_s": HANG_SECONDS,
        "target_met": not failures,
    }
    print(json.dumps(result, indent=2))


def _executor(service: bool) -> ProcessPoolExecutor:
    """A one-process pool, started (imports, service) before any case is timed."""
    context = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(1, mp_context=context, initializer=_init_worker, initargs=(service,))
    executor.submit(_ready).result(timeout=600)
    return executor


def _ready() -> bool:
    return True


def _kill(executor: ProcessPoolExecutor) -> None:
    for process in list(getattr(executor, "_processes", {}).values()):
        process.kill()
    executor.shutdown(wait=False, cancel_futures=True)


def _init_worker(service: bool) -> None:
    warnings.simplefilter("ignore")  # pydicom warns about each malformed element
    if not service:
        return
    import tempfile

    from fastapi.testclient import TestClient

    from bundles import tiny_bundle
    from cxrkit.serve.app import ServiceSettings, create_app

    global _client
    bundle = tiny_bundle(onnx=False).save(Path(tempfile.mkdtemp(prefix="cxrkit-fuzz-")) / "tiny.cxr")
    _client = TestClient(create_app(bundle, ServiceSettings()))
    _client.__enter__()
    deadline = time.monotonic() + 120
    while _client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)


def _run_case(name: str, payload: bytes, service: bool) -> tuple[str, str, float]:
    """("decoded" | "refused" | "failure", detail, seconds) of one case."""
    from cxrkit.data.decode import ImageDecodeError, read_image

    started = time.perf_counter()
    try:
        image = read_image(payload, name=name)
        outcome, detail = "decoded", f"{image.shape}"
        if image.ndim != 2 or image.dtype != np.uint8:
            outcome, detail = "failure", f"wrong output {image.dtype} {image.shape}"
    except ImageDecodeError as error:
        outcome, detail = "refused", error.reason
    except Exception as error:  # the finding: an undocumented exception
        outcome = "failure"
        detail = f"read_image {type(error).__name__}: {error} | {_where(error)}"
    if service and outcome != "failure":
        response = _client.post("/v1/predict", files={"file": (name, payload, "application/octet-stream")})
        if not (response.status_code == 200 or 400 <= response.status_code < 500) or not _is_json(response):
            outcome, detail = "failure", f"service {response.status_code}: {response.text[:300]}"
    return outcome, detail, time.perf_counter() - started


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-4:]))


def _is_json(response) -> bool:
    try:
        response.json()
    except ValueError:
        return False
    return True


def _save(folder: Path | None, name: str, payload: bytes) -> None:
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(payload)


if __name__ == "__main__":
    main()
