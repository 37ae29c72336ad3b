"""The web page at `/` in a real browser: headless Chromium (Debian's chromium + chromium-driver)
driven by selenium, against the release binary.

It uploads photos through the file input, pastes and drops images, and reads what a person would
read: the top-k labels and scores (checked against POST /v1/models/lite0/classify for the same
bytes), the per-stage timing, and the server's own error message for a file that is no image.
It also checks that the page makes no request to another origin, logs nothing to the console,
has a label on every control and works from the keyboard, and that the API-key field works
against a server started with --api-key.

VISIONSERVE_SCREENSHOT=PATH saves a screenshot of the page after classifying two photos
(docs/web-ui.png in the README).
"""
import os
import re
from pathlib import Path

import pytest
import requests
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from server import MODEL, data_dir, start_server, stop_server

WAIT_S = 20
STAGES = ["decode", "preprocess", "queue", "inference", "total"]
API_KEY = "web-page-test-key"


def photo(name: str) -> Path:
    return data_dir() / "photos" / name


def open_page(driver, base_url: str, model: str = MODEL):
    driver.get(base_url + "/")
    driver.get_log("browser")  # start each test with an empty console log
    if model:
        wait_for(driver, lambda d: model in option_values(d), f"model {model!r} in the select")


def option_values(driver) -> list:
    return [o.get_attribute("value") for o in Select(driver.find_element(By.ID, "model")).options]


def wait_for(driver, condition, what: str, timeout: float = WAIT_S):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        status = driver.find_element(By.ID, "status").text
        notice = driver.find_element(By.ID, "notice").text
        pytest.fail(f"timed out waiting for {what}; status {status!r}, notice {notice!r}, "
                    f"console {driver.get_log('browser')}", pytrace=False)


def finished_cards(driver, count: int):
    """The result cards once `count` of them are finished (done or error), in page order."""
    def ready(d):
        cards = d.find_elements(By.CSS_SELECTOR, "#results .card")
        states = [c.get_attribute("data-state") for c in cards]
        return cards if len(cards) == count and "pending" not in states else False
    return wait_for(driver, ready, f"{count} finished result card(s)")


def upload(driver, *paths):
    driver.find_element(By.ID, "file").send_keys("\n".join(str(p) for p in paths))


def api_classify(base_url: str, data: bytes, content_type: str = "image/jpeg", **headers):
    return requests.post(f"{base_url}/v1/models/{MODEL}/classify?top_k=5", data=data,
                         headers={"Content-Type": content_type, **headers}, timeout=30)


def read_card(card) -> dict:
    """What the card shows: predictions [(label, percent text, score attribute)] and timing."""
    predictions = [
        (li.find_element(By.CSS_SELECTOR, ".label").text,
         li.find_element(By.CSS_SELECTOR, ".score").text,
         float(li.get_attribute("data-score")))
        for li in card.find_elements(By.CSS_SELECTOR, ".preds li")
    ]
    timing = {}
    for row in card.find_elements(By.CSS_SELECTOR, ".timing [data-stage]"):
        text = row.find_element(By.TAG_NAME, "dd").text
        match = re.fullmatch(r"(\d+(?:\.\d+)?) ms", text)
        assert match, f"timing for {row.get_attribute('data-stage')!r} reads {text!r}"
        timing[row.get_attribute("data-stage")] = float(match.group(1))
    return {"predictions": predictions, "timing": timing, "text": card.text}


def assert_matches_api(shown: dict, expected: dict, name: str):
    want = expected["results"][0]["predictions"]
    assert [p[0] for p in shown["predictions"]] == [p["label"] for p in want], name
    for (label, percent, _), p in zip(shown["predictions"], want):
        value = float(percent.rstrip("%").lstrip("<"))
        assert abs(value - 100 * p["score"]) <= 0.11, f"{name}: {label} shows {percent}, API {p['score']}"
    for stage in STAGES + ["round trip"]:
        assert stage in shown["timing"], f"{name}: no {stage!r} timing in {shown['text']!r}"
    assert shown["timing"]["total"] > 0 and shown["timing"]["inference"] > 0
    assert shown["timing"]["total"] >= shown["timing"]["inference"]


def console_errors(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_upload_a_photo_shows_top5_and_timing(browser, base_url):
    open_page(browser, base_url)
    assert Select(browser.find_element(By.ID, "model")).first_selected_option.get_attribute("value") == MODEL
    assert "224×224" in browser.find_element(By.ID, "model-info").text

    upload(browser, photo("rocket.jpg"))
    [card] = finished_cards(browser, 1)
    assert card.get_attribute("data-state") == "done", card.text
    shown = read_card(card)
    expected = api_classify(base_url, photo("rocket.jpg").read_bytes()).json()
    assert_matches_api(shown, expected, "rocket.jpg")
    assert len(shown["predictions"]) == 5
    # The bars are scaled by score and the preview shows the photo.
    widths = browser.execute_script(
        "return [...arguments[0].querySelectorAll('.fill')].map(e => e.getBoundingClientRect().width)", card)
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1], widths
    assert browser.execute_script(
        "const i = arguments[0].querySelector('img'); return i && i.complete && i.naturalWidth", card) > 0
    assert "rocket.jpg" in browser.find_element(By.ID, "status").text
    assert console_errors(browser) == []


def test_two_images_give_two_cards(browser, base_url):
    open_page(browser, base_url)
    names = ["rocket.jpg", "chelsea.jpg"]
    upload(browser, *(photo(n) for n in names))
    cards = finished_cards(browser, 2)
    for name, card in zip(names, cards):
        assert card.get_attribute("data-state") == "done", card.text
        assert card.find_element(By.CSS_SELECTOR, "h3").text == name
        assert_matches_api(read_card(card), api_classify(base_url, photo(name).read_bytes()).json(), name)
    assert console_errors(browser) == []
    shot = os.environ.get("VISIONSERVE_SCREENSHOT")
    if shot:
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        browser.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
        assert browser.save_screenshot(shot), shot


def test_a_file_that_is_no_image_shows_the_servers_message(browser, base_url, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("these are notes, not a photo\n")
    expected = api_classify(base_url, notes.read_bytes(), "application/octet-stream")
    assert expected.status_code == 415
    error = expected.json()
    message = error["error"].removeprefix("image 0: ").lower()  # the page capitalises it

    open_page(browser, base_url)
    upload(browser, notes)
    [card] = finished_cards(browser, 1)
    assert card.get_attribute("data-state") == "error"
    text = card.find_element(By.CSS_SELECTOR, ".error").text
    assert message in text.lower(), text
    assert error["error_type"] in text and "415" in text, text
    for junk in ("undefined", "null", "[object", "Traceback", "TypeError", "SyntaxError"):
        assert junk not in card.text, card.text
    assert message in browser.find_element(By.ID, "status").text.lower()
    # The refused request is the only console entry (Chromium logs failed loads).
    assert all("415" in e["message"] for e in console_errors(browser))


def test_paste_and_drop_classify(browser, base_url):
    open_page(browser, base_url)
    # A PNG drawn on a canvas, handed to the page as a clipboard paste and as a drop.
    browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const c = document.createElement('canvas'); c.width = 64; c.height = 48;
        const g = c.getContext('2d'); g.fillStyle = '#c33'; g.fillRect(0, 0, 64, 48);
        g.fillStyle = '#fc3'; g.fillRect(16, 12, 32, 24);
        c.toBlob((blob) => {
          const fire = (make) => { const dt = new DataTransfer();
            dt.items.add(new File([blob], 'image.png', {type: 'image/png'})); document.body.dispatchEvent(make(dt)); };
          fire((dt) => new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true}));
          fire((dt) => new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
          done();
        }, 'image/png');
    """)
    cards = finished_cards(browser, 2)
    assert [c.get_attribute("data-state") for c in cards] == ["done", "done"], [c.text for c in cards]
    titles = sorted(c.find_element(By.CSS_SELECTOR, "h3").text for c in cards)
    assert titles == ["Pasted image 1", "image.png"], titles
    for card in cards:
        assert len(read_card(card)["predictions"]) == 5
    assert console_errors(browser) == []


def test_keyboard_labels_and_no_other_origin(browser, base_url):
    open_page(browser, base_url)
    upload(browser, photo("chelsea.jpg"))
    finished_cards(browser, 1)

    # Every request the page made (the page, the model list, the upload) went to this server.
    names = browser.execute_script(
        "return performance.getEntriesByType('navigation').concat("
        "performance.getEntriesByType('resource')).map(e => e.name)")
    assert any("/v1/models" in n for n in names), names
    assert all(n.startswith(base_url + "/") for n in names), names
    # ...and the page refers to nothing elsewhere (its only absolute URLs would be links out).
    html = requests.get(base_url + "/", timeout=10)
    assert html.headers["content-type"].startswith("text/html")
    # The page runs under a strict policy (its own script and style by hash, requests to this
    # server only); the other tests fail on any console error, a blocked script included.
    policy = html.headers["content-security-policy"]
    for directive in ["default-src 'none'", "script-src 'sha256-", "connect-src 'self'",
                      "frame-ancestors 'none'"]:
        assert directive in policy, policy
    assert "unsafe-inline" not in policy
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", html.text), "an external reference"
    assert "@import" not in html.text and "url(http" not in html.text
    assert len(html.content) < 25_000, len(html.content)

    # Every control has a label with text; the file input's label is the drop zone.
    unlabelled = browser.execute_script("""
        return [...document.querySelectorAll('input, select, button, textarea')]
          .filter(e => !e.hidden)
          .filter(e => !(e.getAttribute('aria-label') ||
                         [...(e.labels || [])].some(l => l.textContent.trim()) ||
                         (e.tagName === 'BUTTON' && e.textContent.trim())))
          .map(e => e.outerHTML)""")
    assert unlabelled == []
    assert browser.find_element(By.CSS_SELECTOR, "label[for=file]").get_attribute("id") == "drop"
    assert browser.find_element(By.ID, "status").get_attribute("aria-live") == "polite"

    # Tab reaches the model, top-k, API key and the drop zone, in that order, with a visible ring.
    browser.execute_script("document.activeElement.blur(); window.focus()")
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.TAB)
    order = []
    for _ in range(8):
        active = browser.switch_to.active_element
        order.append(active.get_attribute("id"))
        if order[-1] == "drop":
            break
        active.send_keys(Keys.TAB)
    assert order[:4] == ["model", "topk", "apikey", "drop"], order
    drop = browser.switch_to.active_element
    outline = browser.execute_script("return getComputedStyle(arguments[0]).outlineStyle", drop)
    assert outline not in ("", "none"), outline

    # Enter and Space on the drop zone open the file picker (counted instead of opened here).
    browser.execute_script("""
        window.pickerOpened = 0;
        document.getElementById('file').click = () => { window.pickerOpened++; };""")
    drop.send_keys(Keys.ENTER)
    drop.send_keys(Keys.SPACE)
    assert browser.execute_script("return window.pickerOpened") == 2

    # The model can be chosen from the keyboard too.
    browser.find_element(By.ID, "model").send_keys(Keys.END)
    assert Select(browser.find_element(By.ID, "model")).first_selected_option.get_attribute("value") == MODEL
    assert console_errors(browser) == []


@pytest.fixture(scope="module")
def keyed_url():
    # Batches of one: the model warms up once, so this second server is ready in a few seconds.
    srv = start_server(["--api-key", API_KEY, "--max-batch-size", "1"])
    yield f"http://{srv.http}"
    stop_server(srv)


def test_api_key_is_asked_for_and_kept_in_the_tab(browser, keyed_url):
    open_page(browser, keyed_url, model=None)
    notice = wait_for(browser, lambda d: d.find_element(By.ID, "notice").text, "the API-key notice")
    assert "API key" in notice, notice
    assert browser.switch_to.active_element.get_attribute("id") == "apikey"

    # Without the key an upload shows the server's refusal as a clear message.
    upload(browser, photo("chelsea.jpg"))
    [card] = finished_cards(browser, 1)
    assert card.get_attribute("data-state") == "error"
    assert "needs an API key" in card.text and "401" in card.text, card.text

    key = browser.find_element(By.ID, "apikey")
    key.send_keys(API_KEY, Keys.TAB)  # change event: the models are listed with the key
    wait_for(browser, lambda d: MODEL in option_values(d), "the models, listed with the key")
    assert browser.find_element(By.ID, "notice").text == ""
    upload(browser, photo("chelsea.jpg"))
    cards = finished_cards(browser, 2)
    assert cards[0].get_attribute("data-state") == "done", cards[0].text
    expected = api_classify(keyed_url, photo("chelsea.jpg").read_bytes(),
                            Authorization=f"Bearer {API_KEY}").json()
    assert_matches_api(read_card(cards[0]), expected, "chelsea.jpg with a key")
    # Kept for this tab only: sessionStorage, never localStorage or a cookie.
    stored = browser.execute_script(
        "return [sessionStorage.getItem('visionserve.apiKey'), JSON.stringify(localStorage), document.cookie]")
    assert stored == [API_KEY, "{}", ""], stored
    browser.execute_script("sessionStorage.clear()")
