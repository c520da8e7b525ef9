"""The web page in a real headless Chromium: upload a real X-ray, read the findings off the page, toggle a
heatmap, take a screenshot. Needs Debian's ``chromium`` and ``chromium-driver`` (skipped without them)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

from bundles import LABELS, THRESHOLDS, tiny_bundle
from cxrkit.serve.app import ServiceSettings, create_app
from servers import BackgroundServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
)
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "headless Chromium is absent: apt-get install chromium chromium-driver", allow_module_level=True
    )

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    bundle = tiny_bundle(model_id="tiny-browser", version="2.1")
    path = bundle.save(tmp_path_factory.mktemp("bundle") / "tiny.cxr")
    with BackgroundServer(create_app(path)) as running:
        running.wait_ready()
        yield running


@pytest.fixture
def browser(tmp_path: Path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    )
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def _upload(browser, server, path: Path, model_id: str = "tiny-browser") -> list:
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: model_id in d.find_element(By.ID, "model-info").text)
    browser.find_element(By.ID, "file-input").send_keys(str(path))
    wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "Done"))
    return browser.find_elements(By.CSS_SELECTOR, "#findings li.finding")


def test_upload_shows_findings_thresholds_and_heatmaps(
    browser, server, nih_sample: Path, tmp_path: Path
) -> None:
    image = nih_sample / "images" / "00000211_000.png"
    rows = _upload(browser, server, image)
    shown = {row.get_attribute("data-label"): float(row.get_attribute("data-probability")) for row in rows}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        api = http.post("/v1/predict", files={"file": (image.name, image.read_bytes(), "image/png")}).json()
    assert list(shown) == [p["label"] for p in api["predictions"]]  # sorted by probability
    assert shown == pytest.approx(api["probabilities"], abs=1e-9)
    percent = rows[0].find_element(By.CSS_SELECTOR, ".probability").text
    assert percent == f"{100 * api['predictions'][0]['probability']:.1f}%"
    for row in rows:  # the threshold tick sits at the label's threshold, the bar fill at the probability
        label = row.get_attribute("data-label")
        tick, fill = (row.find_element(By.CSS_SELECTOR, selector) for selector in (".threshold", ".fill"))
        position = browser.execute_script(
            "const r = arguments[0].getBoundingClientRect();"
            "const bar = arguments[0].parentElement.getBoundingClientRect();"
            "return (r.left + r.width / 2 - bar.left) / bar.width;",
            tick,
        )
        assert position == pytest.approx(THRESHOLDS[label], abs=0.01)
        width = browser.execute_script(
            "const bar = arguments[0].parentElement.getBoundingClientRect();"
            "return arguments[0].getBoundingClientRect().width / bar.width;",
            fill,
        )
        assert width == pytest.approx(shown[label], abs=0.01)
    flagged = [row for row in rows if "positive" in row.get_attribute("class").split()]
    assert {row.get_attribute("data-label") for row in flagged} == set(api["findings"])
    assert "Flagged: " in browser.find_element(By.ID, "summary").text

    xray = browser.find_element(By.ID, "xray")
    assert browser.execute_script("return arguments[0].naturalWidth", xray) == 1024
    overlay = browser.find_element(By.ID, "overlay")
    assert overlay.is_displayed()  # the first positive finding's heatmap is shown
    active = browser.find_element(By.CSS_SELECTOR, "#findings li.active")
    assert active.get_attribute("data-label") == api["findings"][0]
    browser.save_screenshot(str(tmp_path / "page.png"))
    active.click()
    assert not overlay.is_displayed()
    mapped = browser.find_elements(By.CSS_SELECTOR, "#findings li.has-heatmap")
    mapped[-1].click()
    assert overlay.is_displayed() and "active" in mapped[-1].get_attribute("class")
    assert (tmp_path / "page.png").stat().st_size > 20_000


def test_dicom_is_previewed_and_bad_files_show_the_error(
    browser, server, shared_data: Path, tmp_path: Path
) -> None:
    rows = _upload(browser, server, shared_data / "dicom" / "siim_pneumothorax_sample.dcm")
    assert len(rows) == len(LABELS)
    assert "DICOM" in browser.find_element(By.ID, "image-caption").text
    xray = browser.find_element(By.ID, "xray")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", xray) == 1024

    broken = tmp_path / "broken.png"
    broken.write_bytes((shared_data / "nih" / "images" / "00000002_000.png").read_bytes()[:4000])
    browser.find_element(By.ID, "file-input").send_keys(str(broken))
    deadline = time.monotonic() + 60
    status = browser.find_element(By.ID, "status")
    while "error" not in status.get_attribute("class"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status.text.count("broken.png") == 1 and "truncated" in status.text
    assert not browser.find_element(By.ID, "viewer").is_displayed()  # no stale image next to the error
    browser.save_screenshot(str(tmp_path / "error.png"))


TOKEN = "browser-token-0123456789abcdef"


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory):
    bundle = tiny_bundle(model_id="tiny-guarded", version="3.0")
    path = bundle.save(tmp_path_factory.mktemp("bundle") / "tiny.cxr")
    with BackgroundServer(create_app(path, ServiceSettings(token=TOKEN))) as running:
        running.wait_ready()
        yield running


def test_the_page_asks_for_the_token_once(browser, guarded_server, nih_sample: Path) -> None:
    wait = WebDriverWait(browser, 120)
    browser.get(guarded_server.url + "/")
    form = browser.find_element(By.ID, "token-form")
    wait.until(lambda d: form.is_displayed())
    assert "access token required" in browser.find_element(By.ID, "model-info").text
    browser.find_element(By.ID, "token-input").send_keys("wrong-token-0123456789")
    browser.find_element(By.ID, "token-submit").click()
    wait.until(lambda d: form.is_displayed() and "not accepted" in d.find_element(By.ID, "status").text)
    browser.find_element(By.ID, "token-input").send_keys(TOKEN)
    browser.find_element(By.ID, "token-submit").click()
    wait.until(lambda d: "tiny-guarded" in d.find_element(By.ID, "model-info").text)
    assert not form.is_displayed()
    browser.refresh()  # the same tab keeps the token: no second question
    rows = _upload(browser, guarded_server, nih_sample / "images" / "00000211_000.png", "tiny-guarded")
    assert len(rows) == len(LABELS)
    assert not browser.find_element(By.ID, "token-form").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('cxrkit-token')") == TOKEN
