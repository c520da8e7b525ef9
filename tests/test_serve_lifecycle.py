"""`cxr serve` starts only with a model it can load (else one clear line and exit 1) and stops within
seconds on SIGINT or SIGTERM, even with an upload still trickling in."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bundles import tiny_bundle
from servers import ServeProcess, read_response


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle().save(tmp_path_factory.mktemp("bundle") / "tiny.cxr")


def test_a_run_folder_is_not_served(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {arch: resnet18}\n")
    code = "from cxrkit.cli.main import main; main()"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code, "serve", str(run)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and f"cannot serve {run}" in errors[0] and "not a cxrkit bundle" in errors[0]
    assert "Traceback" not in done.stderr and time.monotonic() - started < 60


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signals_stop_the_server_within_seconds(bundle_path: Path, tmp_path: Path, signum: int) -> None:
    with ServeProcess([str(bundle_path)], tmp_path / "serve.log") as server:
        server.wait_ready()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as slow_client:
            slow_client.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
            )
            time.sleep(0.5)
            elapsed = server.stop(signum, timeout=30)
            answer = read_response(slow_client)
        log = server.log()
    assert server.process.returncode is not None and elapsed < 10, log[-2000:]
    assert answer.startswith("HTTP/1.1 503") and "shutting_down" in answer, answer
    assert "Traceback" not in log, log[-3000:]
