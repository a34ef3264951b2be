"""The live session inside the real ComfyUI (CPU), driven as its page drives it: the session
workflow queued with POST /prompt, the session's token taken from the websocket message that
only the queuing client gets, 16 kHz PCM POSTed in real time to the pack's route while the
prompt runs, frames coming back (liveavatar.session messages) while the speech is still being
sent, and the saved mp4 holding the video with that speech. Also: what the route refuses, cancel
by /interrupt, and a page that goes quiet.

As in test_comfyui_http.py the two loaders are swapped for the test ones and the session node
runs at custom 128*128 (api_prompt.cpu_sized); everything else is the shipped workflow."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid

import numpy as np

from .api_prompt import cpu_sized, nodes_of, to_api, with_test_loaders
from .media import FPS, probe, speech_frames
from .model_files import speech

RATE = 16000
CHUNK = 1600
EVENT = "liveavatar.session"


def session_prompt(comfyui, shipped) -> tuple[dict, str]:
    prompt = cpu_sized(with_test_loaders(to_api(shipped["session"], comfyui.object_info())))
    return prompt, nodes_of(prompt, "LiveAvatarSession")[0]


def post(comfyui, path: str, body: bytes, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(comfyui.url + path, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


class Page(threading.Thread):
    """Sends `pcm` (int16) in 0.1 s chunks in real time to the session named by `ready` through
    the /api route, then asks to stop (unless stop is off), noting the frames the websocket had
    reported when each chunk went."""

    def __init__(self, comfyui, ready: dict, pcm: np.ndarray, frames_seen, stop=True):
        super().__init__(daemon=True)
        self.comfyui, self.ready, self.pcm, self.frames_seen, self.stop = comfyui, ready, pcm, frames_seen, stop
        self.answers, self.frames_at_chunk = [], []

    def send(self, offset: int, data: bytes, token=None):
        headers = {"X-LiveAvatar-Token": token or self.ready["token"], "X-LiveAvatar-Offset": str(offset),
                   "Content-Type": "application/octet-stream"}
        return post(self.comfyui, "/api" + self.ready["audio_url"], data, headers)

    def run(self):
        started = time.monotonic()
        for offset in range(0, len(self.pcm), CHUNK):
            piece = self.pcm[offset:offset + CHUNK]
            time.sleep(max(0.0, started + (offset + len(piece)) / RATE - time.monotonic()))
            self.answers.append(self.send(offset, piece.astype("<i2").tobytes()))
            self.frames_at_chunk.append(self.frames_seen())
        if self.stop:
            self.answers.append(post(self.comfyui, "/api" + self.ready["stop_url"], b"",
                                     {"X-LiveAvatar-Token": self.ready["token"]}))


def run_session(comfyui, shipped, pcm: np.ndarray, on_ready=None, stop=True, on_message=None):
    """Queue the session, start a Page when it is ready; (run, page, session node id)."""
    prompt, node = session_prompt(comfyui, shipped)
    state = {"page": None, "frames": 0}

    def watch(run, kind, data):
        if kind == EVENT and "ready" in data and state["page"] is None:
            assert data["node"] == node
            state["page"] = Page(comfyui, data["ready"], pcm, lambda: state["frames"], stop)
            if on_ready is not None:
                on_ready(state["page"])
            state["page"].start()
        elif kind == EVENT:
            state["frames"] = max(state["frames"], data.get("frames", 0))
        if on_message is not None:
            on_message(run, kind, data, state["page"])

    run = comfyui.run(prompt, timeout=1800, on_message=watch)
    if state["page"] is not None:
        state["page"].join(120)
    return run, state["page"], node


def covered(samples: int) -> int:
    return speech_frames(samples / RATE)[0]


def test_session_over_http_streams_while_speaking_and_saves_the_session(comfyui, shipped):
    pcm = speech(6.0, seed=3)
    other = comfyui.websocket_for(uuid.uuid4().hex)  # another page, open all along

    def refusals(page):  # what the route refuses, tried before the speech
        assert page.send(0, pcm[:CHUNK].tobytes(), token="not-the-token")[0] == 403
        status, answer = post(comfyui, "/api/liveavatar/session/nosuchsession/audio", b"\0\0",
                              {"X-LiveAvatar-Token": page.ready["token"], "X-LiveAvatar-Offset": "0"})
        assert status == 404 and "no LiveAvatar session" in answer["error"]
        status, answer = page.send(0, bytes(2 * RATE + 2))
        assert status == 413 and "at most 1 s" in answer["error"]
        status, answer = page.send(0, b"\1")
        assert status == 400 and "even number of bytes" in answer["error"]

    run, page, node = run_session(comfyui, shipped, pcm, on_ready=refusals)
    assert run.outcome == "execution_success", run.messages[-5:]
    assert all(status == 200 for status, _ in page.answers), page.answers[-3:]
    assert page.frames_at_chunk[-1] > 0  # frames came back while the speech was still being sent
    events = run.of(EVENT)
    ready = [e for e in events if "ready" in e]
    assert len(ready) == 1 and ready[0]["ready"]["sample_rate"] == RATE
    last = events[-1]
    assert (last["status"], last["done"], last["session"]["ended"]) == ("finished", True, "stopped from the page")
    state = last["session"]
    # the timeline is the speech, with silence where (only if) it came more than late_audio_s late
    timeline = round((len(pcm) / RATE + state["silence_s"] - state["dropped_s"]) * RATE)
    assert state["audio_s"] * RATE == timeline and state["silence_s"] < 0.5
    frames = covered(timeline)
    history = comfyui.history(run.prompt_id)
    file = history["outputs"][node]["live_video"][0]
    path = comfyui.output_file(file)
    info = probe(path)
    assert (info["video_codec"], info["audio_codec"], info["height"], info["width"]) == ("h264", "aac", 128, 128)
    assert info["frames"] == last["frames"] == frames and info["fps"] == FPS
    assert abs(info["audio_seconds"] - frames / FPS) < 0.2, info  # AAC at 16 kHz: 64 ms packets, one of priming
    # only the page that queued the session was told its token
    assert not [m for m in other.drain() if m.get("type") == EVENT]
    other.close()
    # the session is over: the route says so
    assert page.send(len(pcm), pcm[:CHUNK].tobytes())[0] == 404


def test_session_interrupt_ends_it_and_keeps_the_video(comfyui, shipped):
    pcm = speech(6.0, seed=4)
    sent = []

    def interrupt_after_frames(run, kind, data, page):
        if kind == EVENT and data.get("frames", 0) >= 9 and not sent:
            sent.append(1)
            comfyui.post("/interrupt", {})

    run, page, node = run_session(comfyui, shipped, pcm, on_message=interrupt_after_frames)
    assert run.outcome == "execution_interrupted"
    assert run.of("execution_interrupted")[0]["node_id"] == node
    last = run.of(EVENT)[-1]
    assert last["status"] == "cancelled" and last["frames"] >= 9
    info = probe(comfyui.output_file(last))
    assert info["frames"] == last["frames"] and info["audio_codec"] == "aac"
    refused = [answer for status, answer in page.answers if status != 200]
    assert refused and all(answer["kind"] in ("ended", "unknown") for answer in refused)


def test_session_ends_when_the_page_goes_quiet(comfyui, shipped):
    pcm = speech(1.5, seed=5)
    run, page, node = run_session(comfyui, shipped, pcm, stop=False)
    assert run.outcome == "execution_success"
    last = run.of(EVENT)[-1]
    assert last["status"] == "finished"
    assert last["session"]["ended"].startswith("no audio came from the page for 5 s")
    # the shipped idle (keep moving) filled quiet seconds with silence until the page was let go
    # (as the generation asked for them: on this CPU it is slower than real time)
    assert last["session"]["silence_s"] > 0.5
    assert probe(comfyui.output_file(last))["frames"] == last["frames"] == covered(round(last["session"]["audio_s"] * RATE))
