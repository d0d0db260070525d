"""The demo page in a real browser (headless Chromium, fake media devices) against the real
stack: the broker, tts/animate/render as processes and the gateway. Typing text makes the
avatar speak; the page's WebRTC video decodes and plays; a screenshot is kept."""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from backbone.kafka_bus import KafkaBus
from backbone.runtime import provision_topics
from backbone.settings import Settings
from backbone.stages import PIPELINE
from replay.reader import read_session
from tests.integration.stage_procs import ROOT, GatewayProcess, StageProcess

pytestmark = pytest.mark.kafka

DEMO_KEY = "demo-key-for-the-browser-test"
SHOTS = ROOT / "docs"


def _chrome() -> webdriver.Chrome:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert binary and driver, "Chromium and chromedriver are required (Debian: chromium " \
                              "chromium-driver)"
    opts = Options()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-background-networking",
                "--disable-dev-shm-usage", "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required",
                "--allow-loopback-in-peer-connection",
                "--disable-features=WebRtcHideLocalIpsWithMdns", "--window-size=1100,760"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.fixture
def stack(kafka_bootstrap, unique_name, tmp_path):
    settings = Settings(bus="kafka", bootstrap=kafka_bootstrap, topic_prefix=f"{unique_name}.",
                        partitions=2)
    provision_topics(settings, PIPELINE)
    procs = [StageProcess(n, settings, tmp_path, "0") for n in ("tts", "animate", "render")]
    gateway = GatewayProcess(settings, tmp_path, {
        "AVATAR_API_KEYS": f"demo:{DEMO_KEY}:integrator", "AVATAR_DEMO_KEY": DEMO_KEY,
        "AVATAR_JWT_SECRET": "browser-test-secret-of-32-bytes-or-more",
        "AVATAR_ICE_LOOPBACK": "1"})
    try:
        yield gateway.base, tmp_path, kafka_bootstrap, settings.topic_prefix
    finally:
        for p in procs:
            p.terminate()
        gateway.terminate()


def test_the_demo_page_shows_the_avatar_speaking(stack):
    base, tmp_path, kafka, prefix = stack
    browser = _chrome()
    try:
        browser.get(base + "/")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = browser.execute_script("return window.avatarDemo")
            if state and (state.get("ready") or state.get("error")):
                break
            time.sleep(0.2)
        assert state and state.get("ready"), (state, (tmp_path / "gateway.log").read_text())
        browser.find_element(By.ID, "speak").click()
        # Frames decode and play: the page counts presented frames.
        deadline = time.monotonic() + 60
        frames = 0
        while time.monotonic() < deadline and frames < 75:
            frames = browser.execute_script("return window.avatarDemo.frames")
            time.sleep(0.2)
        assert frames >= 75, (frames, (tmp_path / "gateway.log").read_text()[-3000:])
        size = browser.execute_script(
            "const v = document.getElementById('video'); return [v.videoWidth, v.videoHeight]")
        assert size == [512, 512]
        # The picture is a face, not black: mean brightness of the decoded frame.
        brightness = browser.execute_script("""
            const v = document.getElementById('video');
            const c = document.createElement('canvas'); c.width = 64; c.height = 64;
            const g = c.getContext('2d'); g.drawImage(v, 0, 0, 64, 64);
            const d = g.getImageData(0, 0, 64, 64).data; let s = 0;
            for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2];
            return s / (64 * 64 * 3);""")
        assert brightness > 30, brightness
        time.sleep(1.0)
        shot = tmp_path / "demo_page.png"
        browser.save_screenshot(str(shot))
        if os.environ.get("AVATAR_SAVE_SCREENSHOT"):
            SHOTS.mkdir(exist_ok=True)
            shutil.copy(shot, SHOTS / "demo_page.png")
        assert shot.stat().st_size > 10_000
        # The microphone (Chromium's fake device: a beep) reaches the user-audio topic.
        browser.find_element(By.ID, "mic").click()
        sid = browser.execute_script("return window.avatarDemo.session")
        settings = Settings(bus="kafka", bootstrap=kafka, topic_prefix=prefix)
        deadline = time.monotonic() + 30
        heard = 0
        while time.monotonic() < deadline and heard < 16000:
            heard = sum(len(r.value.data) // 2 for r in read_session(
                KafkaBus(kafka), settings, sid, "audio.in"))
            time.sleep(0.5)
        assert heard >= 16000, heard  # a second of microphone audio at 16 kHz
    finally:
        browser.quit()


def test_the_js_sdk_example_runs_as_written_from_another_origin(stack, tmp_path):
    """The README's HTML example, served by a plain file server on another port."""
    import functools
    import http.server

    from tests.support.readme import example

    base = stack[0]
    page = example("### JS SDK", "html").replace("http://127.0.0.1:8080", base) \
        .replace("my-api-key", DEMO_KEY)
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(f"<!doctype html><html><body>{page}</body></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    browser = _chrome()
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/index.html")
        deadline = time.monotonic() + 60
        played = 0.0
        while time.monotonic() < deadline and played < 2.0:
            played = browser.execute_script(
                "const v = document.getElementById('v'); return v ? v.currentTime : 0") or 0.0
            time.sleep(0.2)
        logs = browser.get_log("browser") if hasattr(browser, "get_log") else []
        assert played >= 2.0, logs
        width = browser.execute_script("return document.getElementById('v').videoWidth")
        assert width == 512
    finally:
        browser.quit()
        server.shutdown()
