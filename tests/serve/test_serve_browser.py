"""The page in a real headless browser (Debian's Chromium through Selenium and chromedriver): upload a
sample image, read the prediction off the page, upload bad files and read the messages.

Skipped with the reason when Chromium, chromedriver or Selenium are missing; ``make setup`` installs them
where apt is available (``make setup-browser``).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import GI

from mics.predict import predict_files
from mics.serve import make_server
from mics.serve.app import MicsServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
LIMIT = 200_000

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no headless browser: install chromium and chromedriver (make setup-browser, needs apt and root)",
)


@pytest.fixture(scope="module")
def server(gi_smoke_run: Path) -> Iterator[MicsServer]:
    srv = make_server(gi_smoke_run, port=0, max_bytes=LIMIT)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')"
    )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def upload(browser, server: MicsServer, path: Path) -> None:
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url)
    browser.find_element(By.ID, "image-input").send_keys(str(path))
    browser.find_element(By.ID, "submit").click()

    # Wait for the answer page itself rather than for the old page to go stale: while the document is
    # being swapped, Chromium sometimes answers a query on the old node with a generic "Node with given id
    # does not belong to the document" error instead of a stale-element error, which failed CI once.
    def answered(driver) -> bool:
        return (
            driver.current_url.rstrip("/").endswith("/predict")
            and driver.execute_script("return document.readyState") == "complete"
            and bool(driver.find_elements(By.CSS_SELECTOR, "#result, #error"))
        )

    WebDriverWait(browser, 120, ignored_exceptions=(WebDriverException,)).until(answered)


def test_upload_a_sample_image_and_read_the_prediction(browser, server, gi_smoke_run):
    from selenium.webdriver.common.by import By

    path = sorted((GI / "polyps").glob("*.jpg"))[5]
    upload(browser, server, path)
    expected = predict_files(gi_smoke_run, [path], device="cpu")[0]
    assert browser.find_element(By.ID, "predicted-class").text == expected["class"]
    assert float(browser.find_element(By.ID, "uncertainty").text) == pytest.approx(
        expected["uncertainty"], abs=1e-3
    )
    bars = browser.find_elements(By.CSS_SELECTOR, "#probabilities .bar-row")
    assert sorted(b.get_attribute("data-class") for b in bars) == sorted(expected["probabilities"])
    shown = {b.get_attribute("data-class"): b.find_element(By.CLASS_NAME, "bar-value").text for b in bars}
    for cls, p in expected["probabilities"].items():
        assert shown[cls] == f"{100 * p:.1f} %"
    flag = browser.find_element(By.ID, "confidence-flag").text
    assert "confidence" in flag.lower()
    partner = browser.find_element(By.ID, "partner-image")
    assert (
        partner.get_attribute("src").startswith("data:image/png")
        and partner.get_attribute("naturalWidth") != "0"
    )
    assert browser.find_elements(By.ID, "error") == []


def test_bad_uploads_show_a_message_and_the_page_keeps_working(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    text = tmp_path / "notes.txt"
    text.write_text("not an image at all")
    upload(browser, server, text)
    assert "notes.txt" in browser.find_element(By.ID, "error").text
    assert "not an image" in browser.find_element(By.ID, "error").text

    big = tmp_path / "huge.jpg"
    big.write_bytes(b"\xff\xd8" + bytes(3 * LIMIT))
    upload(browser, server, big)
    assert "too large" in browser.find_element(By.ID, "error").text

    upload(browser, server, sorted((GI / "normal-cecum").glob("*.jpg"))[0])
    assert browser.find_element(By.ID, "predicted-class").text in ("normal-cecum", "polyps")
    assert browser.find_elements(By.ID, "error") == []
