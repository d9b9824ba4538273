"""The real page in a real browser: headless Chromium (Debian's chromium + chromedriver) via Selenium, on a
1400x1000 desktop and a 412x915 phone with mobile emulation. A photo is captioned as soon as it arrives
(upload, example tap) and both captions come into view without the visitor scrolling; every word is
shaded by its probability (the value on tap); the page says where greedy and beam search part; the
n-best list holds every beam caption; a bad upload is one message over cleared outputs; a tiny photo
gets a visible warning; the attention view shows every word of a 20-word caption with no inner scroll
and nothing clipped; the Model panel breaks no word; nothing overflows sideways. The page serves the
bundled model where it is present (real captions, real lengths), else a tiny random one.
Screenshots go to ``$STORYTELLER_TEST_ARTIFACTS`` (else a pytest temp folder) for a person to look at.
Skips (with the reason) where selenium or the browser is missing; CI installs them (.ci/run)."""
from __future__ import annotations

import base64
import json
import os
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
SCREENS = {"desktop": (1400, 1000, False), "phone": (412, 915, True)}
EXAMPLES = sorted((REPO / "examples").glob("*.jpg"))
BUNDLED = REPO / "models" / "flickr8k-lite0-ensemble"  # the default: it shows where it looked
SCST = REPO / "models" / "flickr8k-lite0-scst"  # pooled
HUMAN = json.loads((REPO / "examples" / "captions.json").read_text(encoding="utf-8"))["captions"]


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
    """The bundled model where it is here (captions of real length); else a tiny random one, its captions
    cut at 12 words (a Flickr8k caption's length; a random decoder never ends on its own)."""
    if (BUNDLED / "config.json").is_file():
        model_dir = BUNDLED
    else:
        model_dir = save_test_model(tmp_path_factory.mktemp("browser-model") / "tiny-lite0",
                                    extra={"dataset": "test", "decoding": {"max_len": 12}})
    with running_app(model_dir, tmp_path_factory.mktemp("browser-log") / "app.log") as url:
        yield url


def emulate(driver, screen: str) -> None:
    width, height, mobile = SCREENS[screen]
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})


def open_page(driver, url: str) -> None:
    driver.get(url)
    # the whole page rendered: the photo's input and the last output of the captions' column
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo input[type=file]")
                                        and d.find_elements(By.ID, "timing") and d.find_elements(By.ID, "greedy-stats"))


@pytest.fixture(params=list(SCREENS))
def page(request, browser, app_url):
    """The app freshly loaded at one screen size; yields (driver, screen name)."""
    emulate(browser, request.param)
    open_page(browser, app_url)
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


def captions_in_view(driver) -> bool:
    """Both caption boxes wholly inside the screen (as the visitor sees it, without scrolling)."""
    return driver.execute_script("""return ['greedy-caption', 'beam-caption'].every(id => {
        const r = document.getElementById(id).getBoundingClientRect();
        return r.top >= 0 && r.left >= 0 && r.bottom <= window.innerHeight && r.right <= window.innerWidth; });""")


def assert_captions_in_view(driver, calibrated: bool | None = None) -> None:
    WebDriverWait(driver, 10).until(captions_in_view)  # the page brings them into view once they are filled
    badges_in_view(driver, calibrated)


def badges_in_view(driver, calibrated: bool | None = None) -> None:
    """Each caption's confidence badge is in view with it where the served model has a calibrator
    (``calibrated``: its captions carry a confidence); a model without one shows none. None: either, both alike."""
    found = driver.execute_script("""return ['greedy-words', 'beam-words'].map(id => {
        const b = document.querySelector('#' + id + ' .confidence summary');
        if (!b) return null;
        const r = b.getBoundingClientRect();
        return r.top >= 0 && r.bottom <= window.innerHeight && r.width > 0; });""")
    want = {True: [[True, True]], False: [[None, None]], None: [[None, None], [True, True]]}[calibrated]
    assert found in want, found


@pytest.fixture(scope="module")
def calibrated(app_url) -> bool:
    """Whether the served model gives its captions a confidence (a calibrator), asked through the API."""
    from gradio_client import Client, handle_file

    out = Client(app_url, verbose=False).predict(handle_file(str(EXAMPLES[0])), api_name="/caption_json")
    return out["beam"]["confidence"] is not None


def no_sideways_overflow(driver) -> None:
    width = driver.execute_script("return window.innerWidth")
    assert driver.execute_script("return document.documentElement.scrollWidth") <= width
    wide = driver.execute_script("""
        const w = window.innerWidth;
        return [...document.querySelectorAll('#examples, #captions, #nbest, #photo, #notice, #beam-changed, #model-info, #attention')]
            .filter(e => e.getBoundingClientRect().right > w + 1).map(e => e.id);""")
    assert wide == [], wide


def screenshot(driver, shots: Path, name: str) -> Path:
    path = shots / f"{name}.png"
    driver.execute_cdp_cmd("Emulation.setScrollbarsHidden", {"hidden": True})
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                              "clip": {"x": 0, "y": 0, "width": size["width"],
                                                                       "height": size["height"], "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.stat().st_size > 10_000
    return path


def check_words(driver, elem_id: str, caption: str) -> None:
    """Every word of the caption is a chip shaded by its probability; tapping one shows the value."""
    chips = driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} .w:not(.end)")
    assert [c.text for c in chips] == caption.split()
    for chip in chips:
        p = float(chip.get_attribute("style").split("--p:")[1].split(";")[0])
        assert 0 < p <= 1 and chip.get_attribute("data-p").endswith("%") and "probability" in chip.get_attribute("title")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", chips[0])
    chips[0].click()  # a tap focuses the word
    shown = driver.execute_script("return getComputedStyle(arguments[0], '::after').content", chips[0])
    assert chips[0].get_attribute("data-p") in shown, shown


def test_upload_captions_in_view_with_word_probabilities_where_they_part_and_every_beam(page, shots, calibrated):
    driver, screen = page
    # before any photo: no numbers that read as results
    assert text(driver, "greedy-stats") == "" and text(driver, "beam-stats") == "" and text(driver, "timing") == ""
    upload(driver, EXAMPLES[0])  # no button press: the upload itself captions
    greedy, beam = wait_for_captions(driver)
    assert_captions_in_view(driver, calibrated)  # with their confidence badges where the model has a calibrator
    for caption in (greedy, beam):
        assert caption.strip() and not any(tok in caption for tok in SPECIAL_TOKENS)
    assert "log-probability" in text(driver, "greedy-stats") and "score" in text(driver, "beam-stats")
    # the visitor's own photo has no human caption: no empty box for one
    assert not [e for e in driver.find_elements(By.ID, "reference") if e.is_displayed()]
    assert driver.find_elements(By.CSS_SELECTOR, "#greedy-caption button, #beam-caption button")  # copy buttons
    font = driver.execute_script("return getComputedStyle(document.querySelector('#beam-caption textarea')).fontSize")
    assert float(font.rstrip("px")) >= 19, font  # large, readable caption text
    check_words(driver, "greedy-words", greedy)
    check_words(driver, "beam-words", beam)
    # greedy and beam search differ on this photo: the page shows where they part and what the model offered there
    assert greedy != beam
    parting = driver.find_element(By.ID, "parting")
    step = int(parting.get_attribute("data-step"))
    assert greedy.split()[:step] == beam.split()[:step] and greedy.split()[step:step + 1] != beam.split()[step:step + 1]
    rows = parting.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) >= 5 and all(r.find_elements(By.CSS_SELECTOR, "td")[1].text.endswith("%") for r in rows)
    assert {"greedy", "beam search"} <= {r.find_elements(By.CSS_SELECTOR, "td")[2].text for r in rows}
    assert not driver.find_elements(By.ID, "agree")

    def tops():
        return driver.execute_script("""return ['greedy-caption', 'beam-caption'].map(
            id => document.querySelector('#' + id + ' textarea').getBoundingClientRect().top)""")

    lefts = driver.execute_script("""return ['greedy-caption', 'beam-caption'].map(
        id => document.querySelector('#' + id).getBoundingClientRect().left)""")
    closed = tops()
    driver.find_element(By.CSS_SELECTOR, "#nbest-accordion button").click()
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#nbest table.nbest tbody tr"))
    opened = tops()
    if screen == "desktop":  # side by side, top-aligned, with the n-best list closed and open
        assert lefts[0] < lefts[1]
        assert abs(closed[0] - closed[1]) < 2 and abs(opened[0] - opened[1]) < 2, (closed, opened)
    else:  # stacked on a phone, greedy above beam
        assert opened[0] < opened[1]
    table = driver.find_element(By.CSS_SELECTOR, "#nbest table.nbest")
    assert "mono" not in table.value_of_css_property("font-family").lower()
    rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == 3  # every caption of the beam (width 3), not just the best
    assert rows[0].find_elements(By.CSS_SELECTOR, "td")[1].text == beam  # the whole caption
    for row in rows:
        for cell in row.find_elements(By.CSS_SELECTOR, "td"):
            assert cell.is_displayed() and cell.rect["x"] + cell.rect["width"] <= driver.execute_script(
                "return window.innerWidth"), cell.text  # scores visible without scrolling
    assert driver.execute_script("const t = document.querySelector('#nbest table.nbest');"
                                 "return t.scrollWidth <= t.parentElement.clientWidth")
    no_sideways_overflow(driver)
    print(f"\nscreenshot: {screenshot(driver, shots, f'{screen}-caption-nbest-open')}")


def test_example_tap_captions_in_view_and_shows_the_whole_human_caption(page, shots):
    driver, screen = page
    thumbs = WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#examples .gallery-item"))
    assert len(thumbs) == len(EXAMPLES)
    assert driver.execute_script("return arguments[0].getBoundingClientRect().height", thumbs[0]) <= 120  # compact
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", thumbs[1])  # at the bottom of the page
    driver.execute_script("arguments[0].click()", thumbs[1])
    wait_for_captions(driver)  # no button press
    assert_captions_in_view(driver)
    want = HUMAN[EXAMPLES[1].name][0].strip().rstrip(" .")
    WebDriverWait(driver, 10).until(lambda d: value(d, "reference") == want)  # the whole human caption
    ref = driver.find_element(By.CSS_SELECTOR, "#reference textarea")
    assert ref.get_property("scrollHeight") <= ref.get_property("clientHeight") + 2  # shown whole, no inner scroll
    no_sideways_overflow(driver)
    print(f"\nscreenshot: {screenshot(driver, shots, f'{screen}-example')}")


def test_a_second_photo_given_while_the_first_is_captioned_gets_its_own_captions(browser, app_url):
    """Two example taps 0.1 s apart (the second before the first is captioned): the page ends on the second
    photo's captions, not the first's (the events once dropped the second photo's captioning)."""
    from gradio_client import Client, handle_file

    want = Client(app_url, verbose=False).predict(handle_file(str(EXAMPLES[4])), api_name="/caption_json")["beam"]["text"]
    first = Client(app_url, verbose=False).predict(handle_file(str(EXAMPLES[0])), api_name="/caption_json")["beam"]["text"]
    assert want != first  # the test needs photos with different captions
    emulate(browser, "phone")
    open_page(browser, app_url)
    thumbs = WebDriverWait(browser, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#examples .gallery-item"))
    browser.execute_script("arguments[0].click()", thumbs[0])
    time.sleep(0.1)
    browser.execute_script("arguments[0].click()", thumbs[4])
    WebDriverWait(browser, WAIT_S).until(lambda d: value(d, "beam-caption") == want)
    time.sleep(2)  # and it stays
    assert value(browser, "beam-caption") == want
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_bad_upload_is_one_message_over_cleared_outputs(page, shots, tmp_path):
    driver, screen = page
    upload(driver, EXAMPLES[1])
    wait_for_captions(driver)
    upload(driver, write_bad_inputs(tmp_path)["not_an_image.jpg"])
    wait = WebDriverWait(driver, WAIT_S)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#notice .notice-error"))
    assert len(driver.find_elements(By.CSS_SELECTOR, ".notice")) == 1
    assert "not an image" in text(driver, "notice") and "Pillow" not in text(driver, "notice")
    assert value(driver, "greedy-caption") == value(driver, "beam-caption") == ""  # the old captions are gone
    assert text(driver, "greedy-stats") == text(driver, "beam-stats") == text(driver, "timing") == ""
    assert text(driver, "greedy-words") == text(driver, "beam-changed") == ""
    body = driver.find_element(By.TAG_NAME, "body").text
    assert "Error" not in body.split(), body  # no error pill on every output, no toast
    no_sideways_overflow(driver)
    print(f"\nscreenshot: {screenshot(driver, shots, f'{screen}-bad-upload')}")
    upload(driver, EXAMPLES[2])  # the page keeps working, and the message goes
    wait_for_captions(driver)
    assert not driver.find_elements(By.CSS_SELECTOR, "#notice .notice")


def test_the_button_without_a_photo_says_what_to_do(page):
    driver, _ = page
    driver.find_element(By.CSS_SELECTOR, "#settings button").click()  # open the Settings accordion
    button = WebDriverWait(driver, WAIT_S).until(lambda d: [b for b in d.find_elements(By.ID, "caption-button")
                                                             if b.is_displayed()])[0]
    button.click()
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#notice .notice-error"))
    assert "Upload, paste or take a photo first" in text(driver, "notice")


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


def test_the_model_panel_breaks_no_word(page, shots):
    driver, screen = page
    driver.find_element(By.CSS_SELECTOR, "#model-accordion button").click()
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "model-info").is_displayed())
    driver.execute_script("document.getElementById('model-info').scrollIntoView()")
    broken = driver.execute_script("""
        const out = [];
        const walker = document.createTreeWalker(document.getElementById('model-info'), NodeFilter.SHOW_TEXT);
        for (let node = walker.nextNode(); node; node = walker.nextNode()) {
          const re = /[^\\s-]+/g;  // a word: breaking at a space or a hyphen is fine, inside a word is not
          for (let m = re.exec(node.data); m; m = re.exec(node.data)) {
            const range = document.createRange();
            range.setStart(node, m.index); range.setEnd(node, m.index + m[0].length);
            const lines = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
            if (lines.size > 1) out.push(m[0]);
          }
        }
        return out;""")
    assert broken == [], broken
    no_sideways_overflow(driver)
    print(f"\nscreenshot: {screenshot(driver, shots, f'{screen}-model-panel')}")


@pytest.fixture(scope="module")
def pooled_app_url(tmp_path_factory):
    """A pooled model (the shipped pooled SCST model where it is here, else a tiny random one): no attention view."""
    model_dir = SCST if (SCST / "config.json").is_file() else save_test_model(
        tmp_path_factory.mktemp("browser-pooled-model") / "tiny-pooled", extra={"decoding": {"max_len": 12}})
    with running_app(model_dir, tmp_path_factory.mktemp("browser-pooled-log") / "app.log") as url:
        yield url


@pytest.fixture(scope="module")
def attention_app_url(tmp_path_factory):
    """A tiny random attention model: it never ends, so its captions are 20 words (the slider's default)."""
    model_dir = save_test_model(tmp_path_factory.mktemp("browser-att-model") / "tiny-att", attention=True)
    with running_app(model_dir, tmp_path_factory.mktemp("browser-att-log") / "app.log") as url:
        yield url


@pytest.mark.parametrize("screen", list(SCREENS))
def test_attention_view_shows_every_word_unclipped_and_is_absent_for_pooled_models(browser, pooled_app_url,
                                                                                   attention_app_url, shots, screen):
    emulate(browser, screen)
    try:
        open_page(browser, pooled_app_url)  # pooled model: no attention view at all
        upload(browser, EXAMPLES[0])
        wait_for_captions(browser)
        assert not browser.find_elements(By.ID, "attention")

        open_page(browser, attention_app_url)
        upload(browser, EXAMPLES[0])
        _, beam = wait_for_captions(browser)
        assert_captions_in_view(browser)
        words = beam.split()
        assert len(words) == 20
        WebDriverWait(browser, WAIT_S).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attention .att-tile")) == len(words))
        gallery = browser.find_element(By.ID, "attention")
        assert gallery.is_displayed()
        labels = [e.text.strip() for e in gallery.find_elements(By.CSS_SELECTOR, ".att-tile summary > figure > figcaption")]
        assert labels == words, (labels, words)  # one tile per word, in order, the word under it
        browser.execute_script("arguments[0].scrollIntoView()", gallery)
        view = browser.execute_script("""
            const g = document.getElementById('attention'), w = window.innerWidth, gb = g.getBoundingClientRect();
            const pics = [...g.querySelectorAll('.att-tile summary > figure > .att-pic')];
            const imgs = pics.map(i => i.getBoundingClientRect());
            const covered = pics.filter(p => { const c = p.nextElementSibling.getBoundingClientRect(),
                                                      r = p.getBoundingClientRect(); return c.top < r.bottom - 1; });
            return {clipped: imgs.filter(r => r.left < 0 || r.right > w || r.left < gb.left - 1 || r.right > gb.right + 1
                                          || r.bottom > gb.bottom + 1 || r.height < 20).length,
                    covered: covered.length,
                    unpainted: pics.filter(p => (getComputedStyle(p).backgroundImage.match(/url\(/g) || []).length != 2).length,
                    inner: [...g.querySelectorAll('*')].filter(e => e.scrollHeight > e.clientHeight + 2
                             && ['auto', 'scroll'].includes(getComputedStyle(e).overflowY)).length};""")
        # every tile whole and painted (the word's heat layer over the photo), labels below, no inner scroll
        assert view == {"clipped": 0, "covered": 0, "unpainted": 0, "inner": 0}, view
        assert gallery.find_element(By.CSS_SELECTOR, ".att-legend").is_displayed()
        assert "Show-Attend-Tell" in gallery.find_element(By.CSS_SELECTOR, ".att-note").text
        tile = gallery.find_elements(By.CSS_SELECTOR, ".att-tile summary")[1]
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", tile)
        tile.click()  # a tap enlarges
        big = WebDriverWait(browser, 10).until(lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, ".att-tile[open] .att-big .att-pic")
                                                         if e.is_displayed()])[0]
        rect = browser.execute_script("return arguments[0].getBoundingClientRect().toJSON()", big)
        assert rect["width"] >= 400 and rect["left"] >= -1 and rect["right"] <= browser.execute_script(
            "return window.innerWidth") + 1, rect
        print(f"\nscreenshot: {screenshot(browser, shots, f'{screen}-attention-enlarged')}")
        big.click()  # a second tap closes it
        WebDriverWait(browser, 10).until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".att-tile[open]"))
        if screen == "desktop":  # greedy and beam stay side by side
            lefts = browser.execute_script("""return ['greedy-caption', 'beam-caption'].map(
                id => document.querySelector('#' + id).getBoundingClientRect().left)""")
            assert lefts[0] < lefts[1]
        no_sideways_overflow(browser)
        print(f"\nscreenshot: {screenshot(browser, shots, f'{screen}-attention')}")
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
