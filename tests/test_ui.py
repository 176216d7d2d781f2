"""The web UI (`anymodal serve`): HTTP API checks, and end to end in a real headless chromium.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install -y
chromium chromium-driver``) and the ``selenium`` package; it is skipped, with the reason, when
they are missing.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the web UI needs starlette (pip install 'anymodal[ui]')")
pytest.importorskip("uvicorn", reason="the web UI needs uvicorn (pip install 'anymodal[ui]')")

from _taught import taught_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return taught_pipeline()


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    """The app served by uvicorn on 127.0.0.1 in a thread; yields its base URL."""
    yield from _serving(pipe, tmp_path_factory.mktemp("ui-media"))


def _serving(pipe, media_dir: Path, **options):
    import uvicorn

    from anymodal.ui import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(pipe, media_dir=media_dir, seed=0, **options)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail("the UI server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((12, 12, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes() -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.sin(np.linspace(0, 400, 8000)).astype(np.float32) * 0.1, 16000, format="WAV")
    return buf.getvalue()


# ---------------------------------------------------------------- HTTP API (no browser)
def test_api_turns_media_and_errors(server):
    import json
    import urllib.error
    import urllib.request

    def post(path, data=None, headers=None):
        req = urllib.request.Request(server + path, data=data or b"", headers=headers or {}, method="POST")
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    status, body = post("/api/sessions")
    assert status == 200 and sorted(body["accepts"]) == ["audio", "image", "video"]
    sid = body["id"]
    boundary = "XyZ"
    parts = [("text", None, b"show and play")]
    payload = b"".join(
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"".encode()
        + (f"; filename=\"{fn}\"".encode() if fn else b"") + b"\r\n\r\n" + data + b"\r\n"
        for name, fn, data in parts) + f"--{boundary}--\r\n".encode()
    status, body = post(f"/api/sessions/{sid}/send", payload, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, body
    assert body["reply"]["text"] == "both <image> and <audio>"
    kinds = [m["kind"] for m in body["reply"]["media"]]
    assert kinds == ["image", "audio"]
    with urllib.request.urlopen(server + body["reply"]["media"][0]["url"]) as r:
        assert Image.open(io.BytesIO(r.read())).size == (16, 16)
    # nothing but the session's own files is served
    for bad in (f"/media/{sid}/..%2F..%2Fetc%2Fpasswd", f"/media/{sid}/session.json", "/media/nope/x.png"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server + bad)
        assert e.value.code == 404
    status, body = post(f"/api/sessions/{sid}/send", b"", {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 400 and "nothing to send" in body["error"]
    garbage = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n"
               f"not a png\r\n--{boundary}--\r\n").encode()
    status, body = post(f"/api/sessions/{sid}/send", garbage, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 415 and body["error"].startswith("cannot read image 'x.png': not an image file"), body
    status, body = post("/api/sessions/nope/send")
    assert status == 404
    with urllib.request.urlopen(f"{server}/api/sessions/{sid}") as r:
        assert len(json.loads(r.read())["turns"]) == 2


def _post(url, data=b"", headers=None):
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url):
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url) as r:
            body = r.read()
            return r.status, json.loads(body) if r.headers.get_content_type() == "application/json" else body
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_restarted_server_carries_on_its_sessions(pipe, tmp_path):
    media_dir = tmp_path / "media"
    boundary = "XyZ"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nshow and play\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"up.png\"\r\n\r\n"
            ).encode() + png_bytes() + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    first = _serving(pipe, media_dir)
    url = next(first)
    status, body = _post(url + "/api/sessions")
    sid = body["id"]
    assert _post(f"{url}/api/sessions/{sid}/send", form, headers)[0] == 200
    status, before = _get(f"{url}/api/sessions/{sid}")
    assert status == 200 and len(before["turns"]) == 2
    next(first, None)  # stop the server: the sessions in its memory are gone

    second = _serving(pipe, media_dir)
    url = next(second)
    status, after = _get(f"{url}/api/sessions/{sid}")
    assert status == 200 and after == before  # the same turns, the same media URLs
    for item in after["turns"][0]["media"] + after["turns"][1]["media"]:
        assert _get(url + item["url"])[0] == 200
    status, body = _post(f"{url}/api/sessions/{sid}/send", form, headers)  # and the conversation goes on
    assert status == 200 and len(_get(f"{url}/api/sessions/{sid}")[1]["turns"]) == 4
    for bad in ("0" * 32, "..", "session"):
        assert _get(f"{url}/api/sessions/{bad}")[0] == 404
    assert _get(f"{url}/media/{sid}/{'web.json'}")[0] == 404  # only the session's media are served
    next(second, None)


def test_serve_binds_to_loopback_by_default():
    from anymodal.cli import build_parser

    args = build_parser().parse_args(["serve", "--config", "tiny"])
    assert (args.host, args.port) == ("127.0.0.1", 7860)


# ---------------------------------------------------------------- the browser
def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    if browser is None or driver is None:
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("needs selenium: pip install 'anymodal[test]'")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.mark.browser
def test_browser_chat_shows_generated_image_and_playable_audio(browser, server, tmp_path):  # browser first: skip early
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(server + "/")
    wait.until(lambda d: d.execute_script("return sessionStorage.getItem('anymodal-session')"))

    # turn 1: text in; an image and an audio clip out
    browser.find_element(By.ID, "text").send_keys("show and play")
    browser.find_element(By.ID, "send").click()
    reply = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".turn.assistant")))
    img = wait.until(lambda d: reply.find_element(By.TAG_NAME, "img"))
    audio = reply.find_element(By.TAG_NAME, "audio")
    assert "both" in reply.text and "and" in reply.text
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 16)
    # the browser decoded the WAV: its duration is known and it plays
    wait.until(lambda d: d.execute_script("return arguments[0].readyState", audio) >= 1)
    assert browser.execute_script("return arguments[0].duration", audio) > 0
    browser.execute_script("arguments[0].muted = true; return arguments[0].play()", audio)
    wait.until(lambda d: d.execute_script("return arguments[0].currentTime", audio) > 0 or
               d.execute_script("return arguments[0].ended", audio))

    # turn 2: upload an image, an audio file and a video with the message; both turns stay visible
    import imageio.v3 as iio

    (tmp_path / "up.png").write_bytes(png_bytes())
    (tmp_path / "up.wav").write_bytes(wav_bytes())
    frames = np.zeros((8, 32, 32, 3), np.uint8)
    for t in range(8):
        frames[t, 12:20, 2 + 3 * t: 10 + 3 * t] = (255, 0, 0)  # a red square moving right
    iio.imwrite(tmp_path / "up.webm", frames, extension=".webm", codec="libvpx", fps=4, macro_block_size=1)
    browser.find_element(By.ID, "image").send_keys(str(tmp_path / "up.png"))
    browser.find_element(By.ID, "audio").send_keys(str(tmp_path / "up.wav"))
    browser.find_element(By.ID, "video").send_keys(str(tmp_path / "up.webm"))
    browser.find_element(By.ID, "text").send_keys("hello")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn")) == 4)
    user2 = browser.find_elements(By.CSS_SELECTOR, ".turn.user")[1]
    assert "hello" in user2.text
    assert user2.find_element(By.TAG_NAME, "img") and user2.find_element(By.TAG_NAME, "audio")
    video = user2.find_element(By.TAG_NAME, "video")  # the browser decoded the uploaded WebM
    wait.until(lambda d: d.execute_script("return arguments[0].readyState", video) >= 1)
    assert browser.execute_script("return arguments[0].videoWidth", video) == 32
    assert browser.find_element(By.ID, "status").text == ""

    # a reload shows the same conversation
    browser.refresh()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn")) == 4)
    if os.environ.get("ANYMODAL_UI_SCREENSHOT"):
        browser.save_screenshot(os.environ["ANYMODAL_UI_SCREENSHOT"])
