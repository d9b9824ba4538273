"""The real page in a real browser: headless Chromium (Debian's chromium + chromedriver) via Selenium, on a
1400x1000 desktop and a 412-px-wide phone screen. A photo is captioned as soon as it arrives (upload,
example click), the two captions sit side by side on the desktop whatever is open, the n-best list is
readable whole, a bad upload is one message over cleared outputs, a tiny photo gets a visible warning,
and nothing overflows sideways. Screenshots go to ``$STORYTELLER_TEST_ARTIFACTS`` (else a pytest temp
folder) for a person to look at. Skips (with the reason) where selenium or the browser is missing;
CI installs them (.ci/run)."""
from __future__ import annotations

import json
import os
import shutil
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
SCREENS = {"desktop": (1400, 1000, False), "phone": (412, 915, True)}
EXAMPLES = sorted((REPO / "examples").glob("*.jpg"))


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("STORYTELLER_TEST_ARTIFACTS")
    if folder:
        path = Path(folder) / "screenshots"
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Chromium and ChromeDriver not found; install them with "
                    "`apt-get install -y chromium chromium-driver` (CI does)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--no-first-run", "--window-size=1400,1000", "--hide-scrollbars",
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


@pytest.fixture(params=list(SCREENS))
def page(request, browser, app_url):
    """The app freshly loaded at one screen size; yields (driver, screen name)."""
    width, height, mobile = SCREENS[request.param]
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
    browser.get(app_url)
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"))
    yield browser, request.param
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def value(driver, elem_id: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea").get_property("value") or ""


def text(driver, elem_id: str) -> str:
    return driver.find_element(By.ID, elem_id).text.strip()


def upload(driver, path: Path) -> None:
    driver.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(str(path))


def wait_for_captions(driver) -> tuple[str, str]:
    WebDriverWait(driver, WAIT_S).until(lambda d: value(d, "greedy-caption").strip() and value(d, "beam-caption").strip()
                                        and text(d, "timing"))
    return value(driver, "greedy-caption"), value(driver, "beam-caption")


def no_sideways_overflow(driver) -> None:
    width = driver.execute_script("return window.innerWidth")
    assert driver.execute_script("return document.documentElement.scrollWidth") <= width
    wide = driver.execute_script("""
        const w = window.innerWidth;
        return [...document.querySelectorAll('#examples, #captions, #nbest, #photo, #notice')]
            .filter(e => e.getBoundingClientRect().right > w + 1).map(e => e.id);""")
    assert wide == [], wide


def screenshot(driver, shots: Path, name: str) -> Path:
    path = shots / f"{name}.png"
    driver.execute_cdp_cmd("Emulation.setScrollbarsHidden", {"hidden": True})
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics["cssContentSize"]
    import base64

    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                              "clip": {"x": 0, "y": 0, "width": size["width"],
                                                                       "height": size["height"], "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.stat().st_size > 10_000
    return path


def test_upload_captions_at_once_side_by_side_with_a_readable_n_best_list(page, shots):
    driver, screen = page
    # before any photo: no numbers that read as results
    assert text(driver, "greedy-stats") == "" and text(driver, "beam-stats") == "" and text(driver, "timing") == ""
    upload(driver, EXAMPLES[0])  # no button press: the upload itself captions
    greedy, beam = wait_for_captions(driver)
    for caption in (greedy, beam):
        assert caption.strip() and not any(tok in caption for tok in SPECIAL_TOKENS)
    assert "log-probability" in text(driver, "greedy-stats") and "score" in text(driver, "beam-stats")
    assert driver.find_elements(By.CSS_SELECTOR, "#greedy-caption button, #beam-caption button")  # copy buttons
    font = driver.execute_script("return getComputedStyle(document.querySelector('#beam-caption textarea')).fontSize")
    assert float(font.rstrip("px")) >= 19, font  # large, readable caption text

    def tops():
        return driver.execute_script("""return ['greedy-caption', 'beam-caption'].map(
            id => document.querySelector('#' + id + ' textarea').getBoundingClientRect().top)""")

    def lefts():
        return driver.execute_script("""return ['greedy-caption', 'beam-caption'].map(
            id => document.querySelector('#' + id).getBoundingClientRect().left)""")

    closed = tops()
    driver.find_element(By.CSS_SELECTOR, "#nbest-accordion button").click()
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#nbest table.nbest tbody tr"))
    opened = tops()
    if screen == "desktop":  # side by side, top-aligned, with the n-best list closed and open
        assert lefts()[0] < lefts()[1]
        assert abs(closed[0] - closed[1]) < 2 and abs(opened[0] - opened[1]) < 2, (closed, opened)
    else:  # stacked on a phone, greedy above beam
        assert opened[0] < opened[1]
    table = driver.find_element(By.CSS_SELECTOR, "#nbest table.nbest")
    assert "mono" not in table.value_of_css_property("font-family").lower()
    rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert rows[0].find_elements(By.CSS_SELECTOR, "td")[1].text == beam  # the whole caption
    for row in rows:
        for cell in row.find_elements(By.CSS_SELECTOR, "td"):
            assert cell.is_displayed() and cell.rect["x"] + cell.rect["width"] <= driver.execute_script(
                "return window.innerWidth"), cell.text  # scores visible without scrolling
    assert driver.execute_script("const t = document.querySelector('#nbest table.nbest');"
                                 "return t.scrollWidth <= t.parentElement.clientWidth")
    no_sideways_overflow(driver)
    print(f"\nscreenshot: {screenshot(driver, shots, f'{screen}-caption-nbest-open')}")


def test_example_click_captions_and_fills_the_human_caption(page, shots):
    driver, screen = page
    rows = WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#examples tbody tr"))
    assert len(rows) == len(EXAMPLES)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", rows[0])
    driver.execute_script("arguments[0].click()", rows[0].find_element(By.CSS_SELECTOR, "td"))
    wait_for_captions(driver)  # no button press
    human = json.loads((REPO / "examples" / "captions.json").read_text(encoding="utf-8"))["captions"]
    assert any(value(driver, "reference") in caps[0] for caps in human.values()) and value(driver, "reference")
    no_sideways_overflow(driver)
    print(f"\nscreenshot: {screenshot(driver, shots, f'{screen}-example')}")


def test_bad_upload_is_one_message_over_cleared_outputs(page, shots, tmp_path):
    driver, screen = page
    upload(driver, EXAMPLES[1])
    wait_for_captions(driver)
    upload(driver, write_bad_inputs(tmp_path)["not_an_image.jpg"])
    wait = WebDriverWait(driver, WAIT_S)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#notice .notice-error"))
    assert len(driver.find_elements(By.CSS_SELECTOR, ".notice")) == 1
    assert "not an image" in text(driver, "notice")
    assert value(driver, "greedy-caption") == value(driver, "beam-caption") == ""  # the old captions are gone
    assert text(driver, "greedy-stats") == text(driver, "beam-stats") == text(driver, "timing") == ""
    body = driver.find_element(By.TAG_NAME, "body").text
    assert "Error" not in body.split(), body  # no error pill on every output, no toast
    no_sideways_overflow(driver)
    print(f"\nscreenshot: {screenshot(driver, shots, f'{screen}-bad-upload')}")
    upload(driver, EXAMPLES[2])  # the page keeps working, and the message goes
    wait_for_captions(driver)
    assert not driver.find_elements(By.CSS_SELECTOR, "#notice .notice")


def test_tiny_photo_is_captioned_with_a_visible_warning(page, shots, tmp_path):
    from PIL import Image

    driver, screen = page
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(tiny)
    upload(driver, tiny)
    wait_for_captions(driver)
    notice = driver.find_element(By.CSS_SELECTOR, "#notice .notice-warning")
    assert notice.is_displayed() and "1x1 pixels" in notice.text
    no_sideways_overflow(driver)
    print(f"\nscreenshot: {screenshot(driver, shots, f'{screen}-tiny-photo')}")


@pytest.fixture(scope="module")
def attention_app_url(tmp_path_factory):
    model_dir = save_test_model(tmp_path_factory.mktemp("browser-att-model") / "tiny-att", attention=True)
    with running_app(model_dir, tmp_path_factory.mktemp("browser-att-log") / "app.log") as url:
        yield url


@pytest.mark.parametrize("screen", list(SCREENS))
def test_attention_view_shows_one_overlay_per_word_and_is_absent_for_pooled_models(browser, app_url, attention_app_url,
                                                                                   shots, screen):
    width, height, mobile = SCREENS[screen]
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
    try:
        browser.get(app_url)  # pooled model: no attention view at all
        WebDriverWait(browser, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"))
        upload(browser, EXAMPLES[0])
        wait_for_captions(browser)
        assert not [e for e in browser.find_elements(By.ID, "attention") if e.is_displayed()]

        browser.get(attention_app_url)
        WebDriverWait(browser, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"))
        upload(browser, EXAMPLES[0])
        _, beam = wait_for_captions(browser)
        words = beam.split()
        wait = WebDriverWait(browser, WAIT_S)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attention img")) == len(words))
        gallery = browser.find_element(By.ID, "attention")
        assert gallery.is_displayed()
        labels = [e.text.strip() for e in gallery.find_elements(By.CSS_SELECTOR, ".caption-label, figcaption") if e.text.strip()]
        assert labels == words, (labels, words)  # one overlay per word, in order, the word under it
        # greedy and beam stay side by side on the desktop
        if screen == "desktop":
            lefts = browser.execute_script("""return ['greedy-caption', 'beam-caption'].map(
                id => document.querySelector('#' + id).getBoundingClientRect().left)""")
            assert lefts[0] < lefts[1]
        no_sideways_overflow(browser)
        print(f"\nscreenshot: {screenshot(browser, shots, f'{screen}-attention')}")
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
