"""The upload page warns, visibly, when an image does not look like the training chest X-rays (real headless
Chromium; skipped without it, as tests/test_browser.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import test_browser
import test_ood_bundle
from cxrkit.inference.bundle import Bundle
from cxrkit.serve.app import create_app
from servers import BackgroundServer

WARNING = "this does not look like a chest X-ray the model was trained on"

browser = test_browser.browser  # the headless Chromium fixture
ood_bundle = test_ood_bundle.ood_bundle
chest_paths = test_ood_bundle.chest_paths
text_png = test_ood_bundle.text_png


@pytest.fixture(scope="module")
def ood_server(ood_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory):
    path = ood_bundle.save(tmp_path_factory.mktemp("bundle") / "ood.cxr")
    with BackgroundServer(create_app(path)) as running:
        running.wait_ready()
        yield running


def test_flagged_upload_shows_the_warning_and_a_chest_x_ray_does_not(
    browser, ood_server, text_png: bytes, chest_paths: list[Path], tmp_path: Path
) -> None:
    By = test_browser.By
    text_file = tmp_path / "page-of-text.png"
    text_file.write_bytes(text_png)
    test_browser._upload(browser, ood_server, text_file, model_id="lite0")
    warning = browser.find_element(By.ID, "ood-warning")
    assert warning.is_displayed() and WARNING in warning.text
    test_browser._upload(browser, ood_server, chest_paths[60], model_id="lite0")
    assert not browser.find_element(By.ID, "ood-warning").is_displayed()
