"""The live session's whole loop on tiny models on the CPU: the node queued, a page (a thread)
that gets the session's token by the node's message and sends its speech in real time through
the route's request handling, frames coming back while it speaks, and the saved mp4 holding the
video with the speech that drove it, however the session ends (stop, quiet page, cancel, error);
what the route refuses; one session per model; what the node refuses before any work."""
import threading
import time

import av
import numpy as np
import pytest
import torch

from liveavatar.audio import Wav2Vec2Encoder
from liveavatar.live_audio import IntakeLimits
from liveavatar.testing import WAV2VEC2_TINY, speech_like, write_tiny_wav2vec2
from nodes import host, live_session
from nodes.session import SESSION_EVENT, LiveAvatarSession
from nodes.session_route import (OFFSET_HEADER, SESSIONS, TOKEN_HEADER, SessionRegistry, find_session, push_audio,
                                 stop_session)
from test_live import tiny_models
from test_live_faults import AAC_FRAME, mp4_tracks
from test_session_audio import as_received, covered_frames, int16

RATE, FPS = 16000, 25
CHUNK = 1600  # 0.1 s


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    root = tmp_path_factory.mktemp("session")
    with pytest.MonkeyPatch.context() as mp:
        m = tiny_models(root, mp)
        inputs = dict(model=m["model"], positive=m["positive"], image=m["image"], vae=m["vae"], audio_encoder=m["encoder"],
                      size="custom", width=64, height=64, infer_frames=24, sample_steps=2, seed=7, max_seconds=60,
                      idle="pause until speech", filename_prefix="session", lookahead_s=0.25, late_audio_s=0.5,
                      disconnect_s=3.0)
        yield inputs, root / "output"


class Server:
    """Stands where ComfyUI's PromptServer is for the node (host.prompt_server): the registry on
    its app, the client id of the page that queued the prompt, and the messages sent."""

    def __init__(self, client_id="page-1"):
        self.app = {SESSIONS: SessionRegistry()}
        self.client_id = client_id
        self.messages = []

    def send_sync(self, event, data, sid):
        self.messages.append((event, data, sid))

    @property
    def registry(self) -> SessionRegistry:
        return self.app[SESSIONS]

    def session_messages(self):
        return [data for event, data, _ in list(self.messages) if event == SESSION_EVENT]

    def frames_shown(self) -> int:
        return max([m.get("frames", 0) for m in self.session_messages()], default=0)


class Page(threading.Thread):
    """The page that queued the session: waits for its token, then sends `speech` in chunks of
    0.1 s in real time, then asks to stop (unless `stop` is off: it just goes quiet). `pause` =
    (after s, for s): a stall in which its capture goes on but nothing is sent (those samples are
    lost). Records the frames shown when each chunk went."""

    def __init__(self, server: Server, speech: np.ndarray, pause=None, stop=True, at_once=False):
        super().__init__(daemon=True)
        self.server, self.speech, self.stop, self.at_once = server, speech, stop, at_once  # at_once: no waits
        self.pause = (int(pause[0] * RATE), int(pause[1] * RATE)) if pause else (len(speech), 0)
        self.frames_at_chunk, self.answers, self.ready, self.error = [], [], None, None

    def run(self):
        try:
            self.ready = self._wait_ready()
            started, offset = time.monotonic(), 0
            while offset < len(self.speech):
                piece = self.speech[offset:offset + CHUNK]
                skip = self.pause[1] if offset >= self.pause[0] else 0  # capture offsets go on through a stall
                if not self.at_once:
                    time.sleep(max(0.0, started + (offset + skip + len(piece)) / RATE - time.monotonic()))
                self.answers.append(self.send(offset + skip, int16(piece)))
                self.frames_at_chunk.append(self.server.frames_shown())
                offset += len(piece)
            if self.stop:
                self.answers.append(stop_session(self.server.registry, self.ready["session"],
                                                 {TOKEN_HEADER: self.ready["token"]}, b""))
        except Exception as error:  # the test reads it
            self.error = error

    def _wait_ready(self, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for data in self.server.session_messages():
                if "ready" in data:
                    return data["ready"]
            time.sleep(0.02)
        raise TimeoutError("no ready message")

    def send(self, offset, data, token=None):
        headers = {TOKEN_HEADER: token or self.ready["token"], OFFSET_HEADER: str(offset)}
        ticket, status, error = find_session(self.server.registry, self.ready["session"], headers)
        return (status, error) if ticket is None else push_audio(ticket, headers, data)


def run_node(graph, monkeypatch, page_speech, **options):
    """The node run with a page speaking: (result or error, server, page)."""
    inputs, output = graph
    server = Server()
    monkeypatch.setattr(host, "prompt_server", lambda: server)
    page = Page(server, page_speech, **{k: options.pop(k) for k in ("pause", "stop") if k in options})
    page.start()
    try:
        result = LiveAvatarSession().run_session(**{**inputs, **options})
    except BaseException as error:  # noqa: B036 (a cancel is a KeyboardInterrupt here)
        result = error
    page.join(60)
    assert page.error is None, page.error
    return result, server, page


def mp4(path):
    with av.open(str(path)) as container:
        frames = sum(1 for _ in container.decode(video=0))
        size = (container.streams.video[0].height, container.streams.video[0].width)
    with av.open(str(path)) as container:
        sound = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
        rate = container.streams.audio[0].rate
    return {"frames": frames, "size": size, "sound": sound, "rate": rate}


def loudness(sound, rate, start_s, end_s):
    return float(np.sqrt(np.mean(sound[int(start_s * rate):int(end_s * rate)] ** 2)))


def test_session_whole_loop_streams_while_speaking_and_saves_the_session(graph, monkeypatch):
    speech = speech_like(3.0, seed=5)
    result, server, page = run_node(graph, monkeypatch, speech)
    path, frames = result["result"]
    messages = server.session_messages()
    # only the page that queued it got the token, and the routes were told where to send
    ready = [(d, sid) for e, d, sid in server.messages if "ready" in d]
    assert len(ready) == 1 and ready[0][1] == "page-1" and ready[0][0]["ready"]["sample_rate"] == RATE
    assert all("token" not in str(m) for m in messages if "ready" not in m)
    assert all(status == 200 for status, _ in page.answers)
    # frames came back while the page was still speaking
    assert page.frames_at_chunk[-1] > 0 and page.frames_at_chunk[0] == 0
    # the video holds the whole speech: frames for every 25 fps frame of it (hand-derived from its
    # length), nothing filled (idle: pause), and the sound is the speech
    expected = covered_frames(len(speech))
    info = mp4(path)
    assert frames == info["frames"] == expected and info["size"] == (64, 64)
    tracks = mp4_tracks(path)  # the sound ends with the picture, within the AAC encoder's packets (1024 samples)
    assert info["rate"] == RATE and tracks["video_end"] == pytest.approx(expected / FPS)
    assert tracks["video_end"] <= tracks["audio_end"] <= tracks["video_end"] + 2 * AAC_FRAME / RATE
    heard, spoken = info["sound"], as_received(speech)
    assert abs(loudness(heard, RATE, 0.1, 1.9) - loudness(spoken, RATE, 0.1, 1.9)) < 0.1 * loudness(spoken, RATE, 0.1, 1.9)
    last = messages[-1]
    assert (last["status"], last["done"], last["frames"]) == ("finished", True, expected)
    assert last["session"]["ended"] == "stopped from the page" and last["session"]["silence_s"] == 0
    assert last["session"]["audio_s"] == len(speech) / RATE
    assert last["session"]["latency_p50_s"] > 0
    # where it went: encode, sampling and decode, each part of the latency (after the block's speech is in)
    spans = [last["session"][span] for span in ("encode_p50_s", "sampling_p50_s", "decode_p50_s")]
    assert all(span > 0 for span in spans) and sum(spans) < last["session"]["latency_p50_s"]
    assert result["ui"]["live_video"][0]["filename"] == path.rsplit("/", 1)[-1]
    assert any("session ended: stopped from the page" in line for line in result["ui"]["text"])
    assert len(server.registry) == 0
    # the session is over: its route says so
    assert page.send(len(speech), int16(np.zeros(CHUNK)))[0] == 404


def test_session_object_driven_directly(graph):
    """LiveSession without the node (as Python code would use it): PCM pushed into its intake
    from a thread in real time; frames are written while it still pushes; a stop request ends it."""
    from liveavatar.live_audio import Pacing, PcmIntake
    from nodes.live import LiveView
    from nodes.stream_run import StreamRun
    inputs, _ = graph
    run = StreamRun("session", inputs["model"], inputs["positive"], inputs["image"], inputs["vae"], None, "custom", 64,
                    64, 24, 0, 2, 7, live=True).start(decode=True)
    intake, pcm = PcmIntake("token"), live_session.LivePcm()
    path = host.save_path("direct", "mp4")
    view = LiveView(None, path, pcm, event=SESSION_EVENT)
    session = live_session.LiveSession(run, inputs["audio_encoder"], intake, view, pcm, Pacing(idle="pause"), 0.25)
    speech, frames_while_pushing = speech_like(2.0, seed=12), []

    def push():
        started = time.monotonic()
        for offset in range(0, len(speech), CHUNK):
            time.sleep(max(0.0, started + (offset + CHUNK) / RATE - time.monotonic()))
            intake.push("token", offset, int16(speech[offset:offset + CHUNK]))
            frames_while_pushing.append(view.frames)
        intake.request_stop("token")

    thread = threading.Thread(target=push)
    thread.start()
    with view.reporting():
        session.run()
    thread.join()
    assert frames_while_pushing[-1] > 0
    assert view.frames == mp4(path)["frames"] == covered_frames(len(speech))
    assert session.feed.ended == "stopped from the page"


def test_session_fills_late_audio_with_silence_and_keeps_sync(graph, monkeypatch):
    """The page stalls for 2.5 s after 1 s of speech (idle: keep moving): silence takes the late
    audio's place (generation goes on), the speech after the stall goes where it belongs, and
    the mp4's sound has the silent stretch where the video had it."""
    speech = speech_like(2.0, seed=6)
    speech[:] = np.where(np.abs(speech) < 0.02, 0.05, speech)  # never quiet itself
    result, server, page = run_node(graph, monkeypatch, speech, idle="keep moving on silence", pause=(1.0, 2.5),
                                    late_audio_s=1.0)
    path, frames = result["result"]
    state = server.session_messages()[-1]["session"]
    assert (state["audio_s"], state["silence_s"], state["dropped_s"]) == (4.5, 2.5, 0.0)
    info = mp4(path)
    assert info["frames"] == frames == covered_frames(int(4.5 * RATE))
    sound = info["sound"]
    assert loudness(sound, RATE, 0.2, 0.9) > 0.02 and loudness(sound, RATE, 1.2, 3.3) < 0.003  # the stall: silence
    assert loudness(sound, RATE, 3.6, 4.3) > 0.02  # the speech after it, in its place


def test_session_ends_when_the_page_goes_quiet(graph, monkeypatch):
    speech = speech_like(1.0, seed=7)
    result, server, _ = run_node(graph, monkeypatch, speech, stop=False)
    path, frames = result["result"]
    last = server.session_messages()[-1]
    assert last["status"] == "finished"
    assert last["session"]["ended"] == "no audio came from the page for 3 s (tab closed or connection lost)"
    assert mp4(path)["frames"] == frames == covered_frames(len(speech))  # (idle: pause, nothing filled)


def test_session_cancel_keeps_what_was_made(graph, monkeypatch):
    speech = speech_like(3.0, seed=8)
    inputs, _ = graph
    server = Server()

    def cancel_after_the_first_block():  # the user presses cancel once the page shows a block
        if server.frames_shown() >= 9:
            raise KeyboardInterrupt  # ComfyUI's InterruptProcessingException standalone

    monkeypatch.setattr(host, "check_interrupted", cancel_after_the_first_block)
    monkeypatch.setattr(host, "prompt_server", lambda: server)
    page = Page(server, speech)
    page.start()
    with pytest.raises(KeyboardInterrupt):
        LiveAvatarSession().run_session(**inputs)
    page.join(60)
    last = server.session_messages()[-1]
    assert last["status"] == "cancelled" and last["done"]
    path = graph[1] / last["subfolder"] / last["filename"]
    assert mp4(path)["frames"] == last["frames"] >= 9
    assert len(server.registry) == 0
    refused = [answer for status, answer in page.answers if status != 200]
    assert all(answer["kind"] in ("ended", "unknown") for answer in refused)


def test_session_failure_is_told_and_the_file_kept(graph, monkeypatch):
    from liveavatar import decoding
    decode, calls = decoding.VideoDecoder.decode, []

    def fail_on_third(self, latents):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("VAE exploded")
        return decode(self, latents)

    monkeypatch.setattr(decoding.VideoDecoder, "decode", fail_on_third)
    result, server, _ = run_node(graph, monkeypatch, speech_like(3.0, seed=9))
    assert isinstance(result, RuntimeError)
    last = server.session_messages()[-1]
    assert (last["status"], last["reason"], last["frames"]) == ("failed", "RuntimeError: VAE exploded", 21)
    assert mp4(graph[1] / last["subfolder"] / last["filename"])["frames"] == 21


def test_session_route_refuses_bad_token_over_rate_and_a_second_session(graph, monkeypatch):
    inputs, _ = graph
    server = Server()
    monkeypatch.setattr(host, "prompt_server", lambda: server)
    speech = speech_like(1.0, seed=10)
    page = Page(server, speech, stop=False)
    node = threading.Thread(target=lambda: LiveAvatarSession().run_session(**{**inputs, "disconnect_s": 2.0}),
                            daemon=True)
    node.start()
    ready = page._wait_ready()
    page.ready = ready
    # a second session on the same model is refused at once, before any work
    with pytest.raises(RuntimeError, match="a live session is already running on this model"):
        LiveAvatarSession().run_session(**inputs)
    status, answer = page.send(0, int16(speech[:CHUNK]), token="not-the-token")
    assert status == 403 and "only from the page that queued it" in answer["error"]
    status, answer = page.send(0, bytes(2 * RATE + 2))
    assert status == 413 and "at most 1 s" in answer["error"]
    status, answer = page.send(0, b"\x01")
    assert status == 400 and "even number of bytes" in answer["error"]
    answers = [page.send(i * CHUNK, int16(speech[:CHUNK])) for i in range(40)]  # 4 s at once
    assert [status for status, _ in answers[:30]] == [200] * 30  # a 3 s burst, then 1.5x real time
    too_fast = [answer for status, answer in answers[30:] if status == 429]
    assert too_fast and "faster than real time" in too_fast[0]["error"]
    assert stop_session(server.registry, ready["session"], {}, b'{"token": "nope"}')[0] == 403
    assert stop_session(server.registry, "no-such-session", {TOKEN_HEADER: ready["token"]}, b"")[0] == 404
    assert stop_session(server.registry, ready["session"], {}, ('{"token": "%s"}' % ready["token"]).encode()) \
        == (200, {"stopping": True})
    node.join(120)
    assert not node.is_alive() and len(server.registry) == 0
    assert server.session_messages()[-1]["session"]["ended"] == "stopped from the page"


def test_session_limits_are_the_intakes_defaults():
    """What the route bounds by default (the docs state these)."""
    limits = IntakeLimits()
    assert (limits.max_chunk_s, limits.max_rate, limits.burst_s, limits.max_backlog_s) == (1.0, 1.5, 3.0, 30.0)


@pytest.mark.parametrize("change, says", [
    ({"idle": "nap"}, "idle must be one of"),
    ({"lookahead_s": 0.1}, "lookahead_s must be from 0.25"),
    ({"late_audio_s": 0}, "late_s must be a number of seconds > 0"),
    ({"max_seconds": float("nan")}, "max_seconds must be"),
    ({"filename_prefix": "../x"}, "points outside the output folder"),
])
def test_session_bad_inputs_are_refused_before_any_work(graph, monkeypatch, change, says):
    inputs, _ = graph
    monkeypatch.setattr(live_session.StreamRun, "start", lambda *a, **k: pytest.fail("long work"))
    with pytest.raises(ValueError, match=says):
        LiveAvatarSession().run_session(**{**inputs, **change})


def test_session_needs_comfyuis_server_and_the_queuing_page(graph, monkeypatch):
    inputs, _ = graph
    monkeypatch.setattr(live_session.StreamRun, "start", lambda *a, **k: pytest.fail("long work"))
    with pytest.raises(RuntimeError, match="run it inside ComfyUI"):
        LiveAvatarSession().run_session(**inputs)
    server = Server(client_id=None)
    monkeypatch.setattr(host, "prompt_server", lambda: server)
    with pytest.raises(ValueError, match="queue it from the ComfyUI page"):
        LiveAvatarSession().run_session(**inputs)


def test_session_refuses_an_audio_encoder_of_another_width(graph, tmp_path):
    inputs, _ = graph
    other = Wav2Vec2Encoder.load(write_tiny_wav2vec2(tmp_path / "w.safetensors",
                                                     config={**WAV2VEC2_TINY, "hidden_size": 48, "intermediate_size": 96}))
    with pytest.raises(ValueError, match="gives 4 hidden states of width 48"):
        LiveAvatarSession().run_session(**{**inputs, "audio_encoder": other})
