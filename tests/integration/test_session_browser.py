"""The live session in the real ComfyUI frontend, in Debian's chromium with a fake microphone
that plays a speech file (--use-fake-device-for-media-stream --use-fake-ui-for-media-stream
--use-file-for-fake-audio-capture): the session workflow (loaders swapped, the session node at
custom 128*128, as in the HTTP tests) loaded, Start pressed on the node (it queues the workflow,
opens the microphone, sends its audio once the session is ready), frames played on the node
while the microphone still sends, Stop pressed; the saved mp4 holds the video and the speech it
was driven by, and its sound is the microphone's speech.

With LIVEAVATAR_SESSION_PICTURES=1 it also writes docs/session.png (the node talking) and the
template thumbnail workflows/liveavatar_session.jpg."""
from __future__ import annotations

import os
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from .api_prompt import CPU_SIZE
from .comfyui_server import REPO
from .media import FPS, probe, speech_frames
from .model_files import speech
from .test_browser import CHROMIUM, CHROMIUM_ARGS, Page, ours, unavailable

RATE = 16000
SPEECH_S = 3.0


@pytest.fixture(scope="module")
def microphone(tmp_path_factory) -> Path:
    """The fake microphone's speech: a syllable-modulated voice, never silent for long, 16 kHz."""
    path = tmp_path_factory.mktemp("mic") / "speech.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(speech(SPEECH_S, seed=11).tobytes())
    return path


@pytest.fixture(scope="module")
def mic_page(comfyui, microphone):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("pip install -r tests/integration/requirements.txt (playwright)")
    if not Path(CHROMIUM).exists():
        unavailable(f"no chromium at {CHROMIUM}: apt-get install chromium")
    args = [*CHROMIUM_ARGS, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-audio-capture={microphone}"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield Page(browser, comfyui.url)
        finally:
            browser.close()


def wait_for(page: Page, script: str, timeout: float, what: str):
    started = time.time()
    while time.time() - started < timeout:
        value = page.js(script)
        if value:
            return value
        page.page.wait_for_timeout(200)
    raise AssertionError(f"{what} did not happen in {timeout:.0f} s: {page.js('() => window.__session')}")


def test_session_talks_through_the_microphone_in_chromium(comfyui, mic_page, shipped):
    page = mic_page
    page.clear()
    page.open_shipped(shipped["session"], "LiveAvatarSession", CPU_SIZE)
    page.js("""() => {
        window.__session = {end: null, error: null, last: null, ready: false, framesAt: null, playingAt: null};
        const s = window.__session;
        window.app.api.addEventListener('execution_success', () => s.end = performance.now());
        window.app.api.addEventListener('execution_error', (e) => { s.error = JSON.stringify(e.detail); s.end = performance.now(); });
        window.app.api.addEventListener('liveavatar.session', ({detail}) => {
            if (detail.ready) { s.ready = true; return; }
            s.last = detail;
            if (detail.frames > 0 && s.framesAt === null) s.framesAt = performance.now();
        });
        const video = document.querySelector('.liveavatar-session video');
        video.addEventListener('timeupdate', () => {
            if (video.currentTime > 0 && !video.paused && s.playingAt === null) s.playingAt = performance.now(); });
    }""")
    page.page.wait_for_timeout(500)
    page.page.click(".liveavatar-session-start")  # a user's click: queues the workflow and opens the microphone
    wait_for(page, "() => window.__session.ready", 600, "the session's ready message")
    wait_for(page, "() => window.__session.framesAt !== null", 300, "the first frames")
    sent_at_frames = page.js("() => document.querySelector('.liveavatar-session-capture').innerText")
    assert sent_at_frames.startswith("Microphone on"), sent_at_frames
    wait_for(page, "() => window.__session.playingAt !== null", 60, "the player playing")
    page.page.wait_for_timeout(1500)
    sent_later = page.js("() => document.querySelector('.liveavatar-session-capture').innerText")
    assert sent_seconds(sent_later) > sent_seconds(sent_at_frames)  # the microphone still sent after frames came
    if os.environ.get("LIVEAVATAR_SESSION_PICTURES"):
        pictures()[0](page, REPO / "docs" / "session.png")
    page.page.click(".liveavatar-session-stop")
    wait_for(page, "() => window.__session.end !== null", 600, "the end of the run")
    state = page.js("() => window.__session")
    assert state["error"] is None, state["error"]
    last = state["last"]
    assert last["status"] == "finished" and last["session"]["ended"] == "stopped from the page"
    page.page.wait_for_timeout(1000)
    status = page.js("() => document.querySelector('.liveavatar-session .liveavatar-live-status').innerText")
    assert status.startswith(f"Session ended (stopped from the page): {last['frames']} frames"), status
    # the mp4: a frame for every 25 fps frame of the timeline the microphone's audio made, and its sound
    session = last["session"]
    path = comfyui.output_file(last)
    info = probe(path)
    frames = speech_frames(session["audio_s"])[0]
    assert info["frames"] == last["frames"] == frames and (info["height"], info["width"]) == (128, 128)
    assert abs(info["audio_seconds"] - frames / FPS) < 0.2, info
    assert session["silence_s"] < 0.5 < session["audio_s"]
    with av.open(str(path)) as container:
        sound = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    loud = np.sqrt(np.mean(sound[RATE // 2:RATE * 2] ** 2))
    assert loud > 0.02, loud  # the microphone's voice (peak 0.3), not silence
    assert ours(page.errors) == []
    if os.environ.get("LIVEAVATAR_SESSION_PICTURES"):
        page.load(shipped["session"])  # the graph as shipped, for the template browser's card
        page.clear()
        pictures()[1](page, REPO / "workflows" / "liveavatar_session.jpg")


def sent_seconds(text: str) -> float:
    """'Microphone on · 3.4 s sent' -> 3.4"""
    return float(text.split("·")[1].split("s sent")[0])


def pictures():
    """save_screenshot (the live player's node and its surroundings) and save_thumbnail (the whole
    graph) of tests/browser/run_live_view.py, which makes the live view's pictures."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("run_live_view", REPO / "tests" / "browser" / "run_live_view.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.save_screenshot, module.save_thumbnail
