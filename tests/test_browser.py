"""The real page in a real browser: headless Chromium (Debian's chromium + chromedriver) via Selenium uploads a
photo, presses Caption, waits for both captions, and saves a screenshot. Skips (with the reason) where
selenium or the browser is not installed; CI installs them (.ci/run)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from storyteller.vocab import SPECIAL_TOKENS
from tests.helpers_images import write_bad_inputs
from tests.helpers_models import save_test_model
from tests.helpers_server import REPO, running_app

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -r requirements-dev.txt)")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_S = 90


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Chromium and ChromeDriver not found; install them with "
                    "`apt-get install -y chromium chromium-driver` (CI does)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--no-first-run", "--window-size=1400,1100",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    model_dir = save_test_model(tmp_path_factory.mktemp("browser-model") / "tiny-lite0")
    with running_app(model_dir, tmp_path_factory.mktemp("browser-log") / "app.log") as url:
        yield url


def textarea_value(driver, elem_id: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea").get_property("value") or ""


def upload_and_caption(driver, url: str, photo: Path) -> None:
    driver.get(url)
    wait = WebDriverWait(driver, WAIT_S)
    file_input = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#photo input[type=file]"))
    file_input.send_keys(str(photo))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo img"))  # uploaded and previewed
    driver.find_element(By.ID, "caption-button").click()


def test_upload_caption_and_screenshot(browser, app_url, tmp_path):
    photo = sorted((REPO / "examples").glob("*.jpg"))[0]
    upload_and_caption(browser, app_url, photo)
    wait = WebDriverWait(browser, WAIT_S)
    wait.until(lambda d: textarea_value(d, "greedy-caption").strip() and textarea_value(d, "beam-caption").strip())
    greedy, beam = textarea_value(browser, "greedy-caption"), textarea_value(browser, "beam-caption")
    for text in (greedy, beam):
        assert text.strip() and not any(tok in text for tok in SPECIAL_TOKENS), text
    timing = browser.find_element(By.ID, "timing").text
    assert "backbone" in timing and "beam search" in timing
    shot = tmp_path / "app.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"\nscreenshot: {shot}\ngreedy: {greedy}\nbeam: {beam}")


def test_example_click_fills_photo_and_human_caption(browser, app_url, tmp_path):
    import json

    browser.get(app_url)
    wait = WebDriverWait(browser, WAIT_S)
    rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#examples tbody tr"))
    assert len(rows) == len(list((REPO / "examples").glob("*.jpg")))
    rows[0].click()
    wait.until(lambda d: textarea_value(d, "reference").strip() and d.find_elements(By.CSS_SELECTOR, "#photo img"))
    human = json.loads((REPO / "examples" / "captions.json").read_text())["captions"]
    assert any(textarea_value(browser, "reference") in caps[0] for caps in human.values())
    browser.find_element(By.ID, "caption-button").click()
    wait.until(lambda d: textarea_value(d, "beam-caption").strip() and textarea_value(d, "greedy-caption").strip())
    browser.save_screenshot(str(tmp_path / "example.png"))
    print(f"\nscreenshot: {tmp_path / 'example.png'}")


def test_bad_upload_shows_an_error_and_the_page_keeps_working(browser, app_url, tmp_path):
    bad = write_bad_inputs(tmp_path)["truncated.jpg"]
    browser.get(app_url)
    wait = WebDriverWait(browser, WAIT_S)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#photo input[type=file]")).send_keys(str(bad))
    time.sleep(1.0)  # the browser cannot preview a broken JPEG, so there is no <img> to wait for
    browser.find_element(By.ID, "caption-button").click()
    wait.until(lambda d: "truncated" in d.find_element(By.TAG_NAME, "body").text)
    browser.save_screenshot(str(tmp_path / "error.png"))
    upload_and_caption(browser, app_url, sorted((REPO / "examples").glob("*.jpg"))[1])
    wait.until(lambda d: textarea_value(d, "beam-caption").strip())
