"""Running the service for tests: uvicorn in a thread, or ``cxr serve`` in a subprocess, on loopback."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from fastapi import FastAPI

from cxrkit.serve.app import ModelService


class BackgroundServer:
    """Run an app with uvicorn on a free loopback port in a daemon thread.

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


def read_response(connection: socket.socket) -> str:
    """One raw HTTP response off ``connection``: the head, then the body up to its Content-Length (or until
    the peer closes). The head and the body may come in separate segments; one ``recv`` is not enough."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return data.decode(errors="replace")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while match is None or len(body) < int(match.group(1)):
        chunk = connection.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServeProcess:
    """``cxr serve ARGS`` in a subprocess on a free loopback port (``python PRELUDE`` runs first when given:
    a test's audit hook). stderr goes to a file read by :meth:`log`."""

    def __init__(self, args: list[str], log_path: Path, prelude: str = "", env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        code = f"{prelude}\nfrom cxrkit.cli.main import main\nmain()"
        command = [sys.executable, "-c", code, "serve", *args, "--port", str(self.port)]
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def wait_ready(self, timeout: float = 120, headers: dict[str, str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cxr serve exited with {self.process.returncode}: {self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"cxr serve not ready in {timeout} s: {self.log()}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> float:
        """Send ``signum`` and wait for the exit; the seconds it took."""
        start = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return time.monotonic() - start

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()
