"""The Gradio demo in a real browser (Playwright + Debian chromium, fake microphone from a wav):
a typed turn and a spoken turn both come back as text and audio. Screenshots go to test-artifacts/."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _requirements() -> str | None:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        return "chromium is not installed (apt-get install chromium chromium-driver)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; no `playwright install` needed)"
    return None


SKIP = _requirements()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tiny):
    from voicelm.demo import build_app, launch_app

    app = build_app(tiny)
    port = _free_port()
    launch_app(app, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def mic_wav(tmp_path_factory, speech_16k) -> Path:
    # silence, the question, then a long silence so the VAD ends the turn before the file loops
    audio = np.concatenate([np.zeros(16000, np.float32), speech_16k, np.zeros(16000 * 6, np.float32)])
    path = tmp_path_factory.mktemp("mic") / "speech.wav"
    sf.write(path, audio, 16000, subtype="PCM_16")
    return path


def _chat_text(page) -> str:
    return page.locator("#chat").inner_text()


def _queued_samples(page) -> int:
    return int(page.evaluate("() => Number(document.body.dataset.voicelmSamplesQueued || 0)"))


@pytest.mark.skipif(SKIP is not None, reason=SKIP or "")
def test_demo_in_browser_text_and_microphone(demo_url, mic_wav):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-background-networking", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={mic_wav}",
            "--autoplay-policy=no-user-gesture-required"])
        try:
            context = browser.new_context(permissions=["microphone"])
            page = context.new_page()
            page.goto(demo_url, wait_until="load")
            page.wait_for_selector("#text-in textarea", timeout=60_000)
            assert "RANDOM WEIGHTS" in page.inner_text("body")  # it says which model is loaded

            # typed turn: text streams into the chat, audio reaches the browser's player
            page.fill("#text-in textarea", "what is seven plus five?")
            page.press("#text-in textarea", "Enter")
            page.wait_for_function("() => Number(document.body.dataset.voicelmSamplesQueued || 0) > 0",
                                   timeout=120_000)
            page.wait_for_selector("#latency :text('first_audio')", timeout=120_000)
            assert "what is seven plus five?" in _chat_text(page)
            typed_samples = _queued_samples(page)
            page.screenshot(path=str(ARTIFACTS / "demo_text_turn.png"), full_page=True)

            # spoken turn through the fake microphone: VAD ends the turn, the answer plays
            page.locator("#mic").get_by_role("button", name="Record").first.click()
            page.wait_for_function(
                "() => document.querySelector('#chat').innerText.includes('s of speech')", timeout=120_000)
            page.wait_for_function(
                f"() => Number(document.body.dataset.voicelmSamplesQueued || 0) > {typed_samples}", timeout=120_000)
            page.screenshot(path=str(ARTIFACTS / "demo_voice_turn.png"), full_page=True)
            stop = page.locator("#mic").get_by_role("button", name="Stop")
            if stop.count():
                stop.first.click()
            time.sleep(1.0)
            assert "🎤" in _chat_text(page)
        finally:
            browser.close()
