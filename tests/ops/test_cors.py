"""`--cors-origin` in a real browser: a page served from another origin (another port of
127.0.0.1, which the browser treats as another origin) classifies a photo through the API with
an API key, when that origin is allowed; without `--cors-origin`, or with another origin
allowed, the browser blocks the call. Preflights are answered without the key.
"""
import http.server
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
import requests
from selenium.webdriver.support.ui import WebDriverWait

from server import MODEL, data_dir, start_server, stop_server

API_KEY = "cors-test-key"

PAGE = """<!doctype html><meta charset="utf-8"><title>pending</title>
<script>
async function classify(api, key) {
  try {
    const photo = await (await fetch("chelsea.jpg")).blob();
    const answer = await fetch(api + "/v1/classify?top_k=1", {
      method: "POST", body: photo,
      headers: {"Content-Type": "image/jpeg", "Authorization": "Bearer " + key}});
    const body = await answer.json();
    document.title = "answered " + answer.status + " " + (body.results ? body.results[0].predictions[0].label
      : body.error_type) + " timing:" + (answer.headers.get("server-timing") ? "readable" : "hidden");
  } catch (e) {
    document.title = "blocked " + e.name;
  }
}
</script>"""


@pytest.fixture(scope="module")
def page_origin():
    """A static server on its own port: the page and the photo it posts."""
    root = Path(tempfile.mkdtemp(prefix="visionserve-cors-"))
    (root / "index.html").write_text(PAGE)
    shutil.copy(data_dir() / "photos" / "chelsea.jpg", root / "chelsea.jpg")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()
    shutil.rmtree(root, ignore_errors=True)


def classify_from_page(browser, page_origin, api) -> str:
    browser.get(page_origin + "/index.html")
    browser.execute_script(f"classify({api!r}, {API_KEY!r})")
    WebDriverWait(browser, 20).until(lambda d: d.title != "pending")
    return browser.title


@pytest.mark.parametrize("allowed", ["page", "any", "none", "another"])
def test_a_page_on_another_origin_classifies_only_when_its_origin_is_allowed(browser, page_origin, allowed):
    flags = {"page": ["--cors-origin", page_origin], "any": ["--cors-origin", "*"], "none": [],
             "another": ["--cors-origin", "https://elsewhere.example"]}[allowed]
    srv = start_server(["--api-key", API_KEY, *flags])
    try:
        api = f"http://{srv.http}"
        title = classify_from_page(browser, page_origin, api)
        if allowed in ("page", "any"):
            # The server's answer, and Server-Timing exposed to the page.
            direct = requests.post(f"{api}/v1/classify?top_k=1", timeout=30,
                                   data=(data_dir() / "photos" / "chelsea.jpg").read_bytes(),
                                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "image/jpeg"})
            label = direct.json()["results"][0]["predictions"][0]["label"]
            assert title == f"answered 200 {label} timing:readable", title
        else:
            assert title == "blocked TypeError", title
        # The preflight the browser sent, by hand: answered without a key when allowed.
        preflight = requests.options(f"{api}/v1/classify", timeout=10, headers={
            "Origin": page_origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        allow = preflight.headers.get("access-control-allow-origin")
        if allowed == "page":
            assert preflight.status_code == 200 and allow == page_origin
            assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        elif allowed == "any":
            assert allow == "*"
        else:
            assert allow is None
        # Errors carry the headers too, so a page can read a refusal.
        refused = requests.post(f"{api}/v1/classify", data=b"x", timeout=10, headers={"Origin": page_origin})
        assert refused.status_code == 401
        assert (refused.headers.get("access-control-allow-origin") is not None) == (allowed in ("page", "any"))
    finally:
        stop_server(srv)


def test_a_bad_origin_is_refused_at_start_up():
    binary = os.environ.get("VISIONSERVE_BIN", str(Path(__file__).resolve().parents[2] / "target/release/visionserve"))
    done = subprocess.run([binary, "--model", f"{MODEL}=x", "--cors-origin", "https://app.example.com/"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "e.g. https://app.example.com" in done.stderr
