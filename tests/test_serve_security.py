"""Access control and patient privacy of the service: bearer tokens (API and page), refusal to listen on
other interfaces without one, uploads never written to disk (watched by an audit hook in a real
``cxr serve`` process, with a control that writes the upload and must be caught), file names not logged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from bundles import tiny_bundle
from cxrkit.serve.app import ServiceSettings, create_app
from cxrkit.serve.auth import AuthConfigError, check_exposure, load_token
from servers import ServeProcess

TOKEN = "s3cret-token-for-tests-0123456789"
PATIENT_NAME = "Doe_Jane_1957-03-02"


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle().save(tmp_path_factory.mktemp("bundle") / "tiny.cxr")


@pytest.fixture(scope="module")
def png(nih_sample: Path) -> bytes:
    return (nih_sample / "images" / "00000002_000.png").read_bytes()


@pytest.fixture(scope="module")
def client(bundle_path: Path) -> TestClient:
    with TestClient(create_app(bundle_path, ServiceSettings(token=TOKEN))) as test_client:
        test_client.app.state.service.ready.wait(120)
        yield test_client


def _predict(client: TestClient, png: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return client.post("/v1/predict", files={"file": ("chest.png", png, "image/png")}, headers=headers)


def test_token_is_required_on_the_api(client: TestClient, png: bytes) -> None:
    for headers in (None, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        response = _predict(client, png, headers)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
        assert client.get("/v1/model", headers=headers).status_code == 401
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert _predict(client, png, good).status_code == 200
    assert client.get("/v1/model", headers=good).json()["labels"]
    assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
    schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["scheme"] == "bearer"


def test_token_sources(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(f"  {TOKEN}\n")
    assert load_token(tmp_path / "token", {}) == TOKEN
    assert load_token(None, {"CXR_SERVE_TOKEN": TOKEN}) == TOKEN
    assert load_token(None, {}) is None
    (tmp_path / "short").write_text("abc")
    with pytest.raises(AuthConfigError, match="at least 16 characters"):
        load_token(tmp_path / "short", {})


def test_exposure_rule() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_exposure(host, None, False)
    check_exposure("0.0.0.0", TOKEN, False)
    check_exposure("0.0.0.0", None, True)
    for host in ("0.0.0.0", "::", "192.168.1.20", "example.org"):
        with pytest.raises(AuthConfigError, match="without a token"):
            check_exposure(host, None, False)


def _cxr(*args: str) -> subprocess.CompletedProcess:
    code = "from cxrkit.cli.main import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_cli_refuses_a_public_address_without_a_token(bundle_path: Path, tmp_path: Path) -> None:
    done = _cxr("serve", str(bundle_path), "--host", "0.0.0.0")
    assert done.returncode == 2, done.stderr
    assert "refusing to serve on 0.0.0.0 without a token" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "short").write_text("abc")
    done = _cxr("serve", str(bundle_path), "--token-file", str(tmp_path / "short"))
    assert done.returncode == 2 and "at least 16 characters" in done.stderr and "Traceback" not in done.stderr


#: Installed before cxrkit is imported: reports every file opened for writing (and renames, removals,
#: directory creations) on stderr as "AUDIT-WRITE <event> <json path>".
AUDIT_PRELUDE = r"""
import json, os, sys
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_MUTATIONS = {"os.rename", "os.replace", "os.remove", "os.unlink", "os.mkdir", "os.truncate", "os.link",
              "os.symlink", "shutil.copyfile", "shutil.move", "shutil.rmtree", "os.rmdir"}
def _audit(event, args):
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int) or not (
            (isinstance(flags, int) and flags & _WRITE_FLAGS) or (mode and any(c in mode for c in "wax+"))):
            return
    elif event not in _MUTATIONS:
        return
    else:
        path = args[0]
    sys.stderr.write("AUDIT-WRITE %s %s\n" % (event, json.dumps(os.fsdecode(path))))
sys.addaudithook(_audit)
"""

#: The control: a service that (wrongly) keeps each upload in a temporary file.
LEAKY_PRELUDE = r"""
import tempfile
import cxrkit.serve.app as _app
_sniff = _app.sniff_format
def _leaky_sniff(upload):
    with tempfile.NamedTemporaryFile(prefix="leaked-upload-", delete=False) as handle:
        handle.write(upload.data)
    return _sniff(upload)
_app.sniff_format = _leaky_sniff
"""


def _writes(log: str, allowed_folder: Path) -> list[str]:
    """Written paths in the audit lines of ``log``, except /dev/null, ``allowed_folder`` and empty
    directories created (torch makes its inductor cache folder on first use)."""
    writes = []
    for line in log.splitlines():
        if line.startswith("AUDIT-WRITE "):
            _, event, path = line.split(" ", 2)
            path = json.loads(path)
            if event != "os.mkdir" and path != "/dev/null" and not path.startswith(str(allowed_folder)):
                writes.append(f"{event} {path}")
    return writes


@pytest.mark.parametrize("leaky", [False, True], ids=["service", "control-that-writes-uploads"])
def test_uploads_never_touch_the_disk_and_names_are_not_logged(
    bundle_path: Path, png: bytes, shared_data: Path, tmp_path: Path, leaky: bool
) -> None:
    dicom = (shared_data / "dicom" / "siim_pneumothorax_sample.dcm").read_bytes()
    prelude = AUDIT_PRELUDE + (LEAKY_PRELUDE if leaky else "")
    args = [str(bundle_path), *(["--log-filenames"] if leaky else [])]
    env = {"MPLCONFIGDIR": str(tmp_path / "mpl"), "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": str(tmp_path)}
    with ServeProcess(args, tmp_path / "serve.log", prelude, env) as server:
        server.wait_ready()
        before = len(server.log())
        uploads = [
            (f"{PATIENT_NAME}.png", png, "image/png", "?heatmaps=true&preview=true"),
            (f"{PATIENT_NAME}.dcm", dicom, "application/dicom", ""),
            (f"{PATIENT_NAME}_cut.png", png[: len(png) // 3], "image/png", ""),
        ]
        with httpx.Client(base_url=server.url, timeout=120) as http:
            statuses = [
                http.post(f"/v1/predict{query}", files={"file": (name, data, kind)}).status_code
                for name, data, kind, query in uploads
            ]
        server.stop()
        log = server.log()
    assert statuses == [200, 200, 422], log[-3000:]
    writes = _writes(log[before:], allowed_folder=tmp_path / "mpl")
    if leaky:  # the watcher sees the control's temporary files: the check below can fail
        assert any("leaked-upload-" in path for path in writes), log[-3000:]
        assert PATIENT_NAME in log  # --log-filenames
    else:
        assert writes == [], writes
        assert PATIENT_NAME not in log, log[-3000:]
        assert "POST /v1/predict" in log  # the access log is there, without file names
