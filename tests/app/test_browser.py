"""As a new user would: open /docs in headless Chromium, upload a phantom through the Swagger UI's
file picker, read the statistics, and download the mask.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and ``selenium``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app.main import create_app
from tests.app.conftest import LiveServer, make_settings

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None, reason="Debian's chromium and chromium-driver are not installed"
)
def test_swagger_ui_upload_and_mask_download(phantom_case: Path, tmp_path: Path) -> None:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM  # type: ignore[assignment]
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,2400",
    ):
        opts.add_argument(arg)
    opts.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    service = webdriver.ChromeService(executable_path=DRIVER)
    with LiveServer(create_app(make_settings(tmp_path, precision="fp32"))) as srv:
        driver = webdriver.Chrome(options=opts, service=service)
        try:
            wait = WebDriverWait(driver, 120)
            driver.get(f"{srv.url}/docs")
            op = wait.until(
                ec.element_to_be_clickable((By.CSS_SELECTOR, "#operations-segmentation-segment_segment_post"))
            )
            op.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
            wait.until(
                ec.element_to_be_clickable(
                    (By.CSS_SELECTOR, "#operations-segmentation-segment_segment_post .try-out__btn")
                )
            ).click()
            file_input = wait.until(
                ec.presence_of_element_located(
                    (By.CSS_SELECTOR, "#operations-segmentation-segment_segment_post input[type=file]")
                )
            )
            file_input.send_keys(str(phantom_case / "imaging.nii.gz"))
            driver.find_element(By.CSS_SELECTOR, "#operations-segmentation-segment_segment_post .execute").click()
            body_sel = (
                "#operations-segmentation-segment_segment_post .live-responses-table .response-col_description pre"
            )
            wait.until(lambda d: "mask_url" in d.find_element(By.CSS_SELECTOR, body_sel).text)
            status = driver.find_element(
                By.CSS_SELECTOR,
                "#operations-segmentation-segment_segment_post .live-responses-table tbody .response-col_status",
            ).text
            assert status.strip().startswith("200"), status
            result = json.loads(driver.find_element(By.CSS_SELECTOR, body_sel).text)
            assert [c["name"] for c in result["classes"]] == ["kidney", "tumor"]
            assert result["classes"][0]["present"] is True
            # Download the mask the way a user would: follow mask_url in the browser.
            driver.get(srv.url + result["mask_url"])
            # Chromium reserves the final name as an empty file and writes into a ``.crdownload``
            # beside it, then renames; the download is done only when no partial file is left.
            deadline = time.time() + 30
            files: list[Path] = []
            while time.time() < deadline:
                entries = list(downloads.iterdir())
                files = [p for p in entries if p.name.endswith(".nii.gz") and p.stat().st_size > 0]
                if files and not any(p.name.endswith(".crdownload") for p in entries):
                    break
                time.sleep(0.2)
            else:
                files = []
            assert files, f"no complete mask downloaded; got {sorted(p.name for p in downloads.iterdir())}"
            mask = nib.load(str(files[0]))
            assert mask.shape == nib.load(str(phantom_case / "imaging.nii.gz")).shape
            assert np.asanyarray(mask.dataobj).max() >= 1
        finally:
            driver.quit()
