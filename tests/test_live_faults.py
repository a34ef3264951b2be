"""Live Video node: bad inputs refused before the long work, the speech muxed as Decode muxes
it, and every way a run can end (finished, cancelled, failed) told to the browser, with the
blocks made so far kept playable. Rows of docs/reliability.md; tiny models, CPU."""
import errno
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from liveavatar import decoding
from nodes import host, live
from nodes.live import LiveAvatarLiveVideo
from nodes.live_mp4 import FragmentedMp4Writer
from nodes.video_writer import prepare_audio
from test_live import speech, tiny_graph  # noqa: F401  (the module's tiny models and inputs)

SPOKEN = 21  # the tiny graph's speech covers 21 frames: a first block of 9, then one of 12
AAC_FRAME = 1024  # samples per AAC packet


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Run:
    """One Live Video run: its result or error, and the messages the browser got."""

    def __init__(self, graph, monkeypatch, prefix="faults", audio=None, return_frames=True, cancel_when=None):
        inputs, speech_audio, self.output, _ = graph
        self.messages = []
        monkeypatch.setattr(host, "send_to_browser", lambda event, data: self.messages.append(data))
        if cancel_when is not None:  # the user presses cancel once the browser has seen this
            monkeypatch.setattr(host, "check_interrupted", lambda: self._cancel_if(cancel_when))
        self.result = self.error = None
        try:
            self.result = LiveAvatarLiveVideo().generate(**inputs, audio=speech_audio if audio is None else audio,
                                                         filename_prefix=prefix, return_frames=return_frames)
        except BaseException as error:  # noqa: B036 (the cancel stand-in is a KeyboardInterrupt)
            self.error = error

    def _cancel_if(self, seen):
        if seen(self.messages):
            raise KeyboardInterrupt  # ComfyUI's InterruptProcessingException standalone; host.is_cancel knows both

    @property
    def last(self) -> dict:
        return self.messages[-1]

    @property
    def path(self) -> Path:
        return self.output / self.messages[0]["subfolder"] / self.messages[0]["filename"]


def mp4_tracks(path: Path) -> dict:
    """Frames decoded, and where the picture and the speech end (seconds), from the packets."""
    with av.open(str(path)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    ends = {}
    with av.open(str(path)) as container:
        for packet in container.demux():
            if packet.size:
                end = float((packet.pts + packet.duration) * packet.time_base)
                kind = packet.stream.type
                ends[kind] = max(ends.get(kind, 0.0), end)
        rate = container.streams.audio[0].rate if container.streams.audio else None
    return {"frames": frames, "video_end": ends.get("video"), "audio_end": ends.get("audio"), "rate": rate}


def sine(rate: int, amplitude=0.5, dtype=torch.float32, seconds=1.0) -> dict:
    t = torch.arange(int(seconds * rate)) / rate
    return {"waveform": (amplitude * torch.sin(2 * torch.pi * 440 * t)).to(dtype)[None, None], "sample_rate": rate}


# ---- checked before the long work -------------------------------------------------------
@pytest.fixture
def long_work(monkeypatch):
    """Records whether the run got as far as loading the models and encoding the portrait."""
    started = []
    monkeypatch.setattr(live.StreamRun, "start", lambda *a, **k: started.append(1) or pytest.fail("long work"))
    return started


@pytest.mark.parametrize("prefix, says", [
    ("../x", "points outside the output folder"),
    ("clip\x00name", "characters a file name cannot"),
    ("", "has no file name"),
    ("x" * 300, "longer than 255 bytes"),
], ids=["outside", "nul", "empty", "too-long"])
def test_bad_prefix_is_refused_before_any_work(prefix, says, tiny_graph, monkeypatch, long_work):
    run = Run(tiny_graph, monkeypatch, prefix=prefix)
    assert isinstance(run.error, ValueError) and says in str(run.error) and repr(prefix) in str(run.error)
    assert long_work == [] and run.messages == []


@pytest.mark.parametrize("audio, says", [
    ({"sample_rate": 16000}, "the audio input is not a ComfyUI AUDIO"),
    ({"waveform": torch.zeros(2, 16000), "sample_rate": 16000}, "add the batch dimension"),
    ({"waveform": torch.zeros(1, 16000, 2), "sample_rate": 16000}, "swap the last two dimensions"),
    ({"waveform": torch.zeros(1, 1, 16000), "sample_rate": float("nan")}, "sample_rate is nan"),
], ids=["no-waveform", "no-batch", "channels-last", "nan-rate"])
def test_bad_audio_is_refused_before_any_work(audio, says, tiny_graph, monkeypatch, long_work):
    run = Run(tiny_graph, monkeypatch, audio=audio)
    assert isinstance(run.error, ValueError) and says in str(run.error)
    assert long_work == [] and run.messages == []


# ---- the speech in the mp4 ------------------------------------------------------------------
def test_nan_samples_at_7khz_are_muxed_as_silence_at_48khz(tiny_graph, monkeypatch):
    audio = sine(7000)
    audio["waveform"][..., :500] = float("nan")
    run = Run(tiny_graph, monkeypatch, audio=audio)
    mp4 = mp4_tracks(run.path)
    assert run.error is None and (mp4["frames"], mp4["rate"]) == (SPOKEN, 48000)
    assert any("NaN" in line for line in run.result["ui"]["text"])
    assert run.last["status"] == "finished"


def test_int16_at_192khz_is_scaled_not_clipped(tiny_graph, monkeypatch):
    run = Run(tiny_graph, monkeypatch, audio=sine(192000, 16384, torch.int16))
    with av.open(str(run.path)) as container:
        assert container.streams.audio[0].rate == 48000
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    steady = audio[len(audio) // 4: 3 * len(audio) // 4]
    # a sine of amplitude 0.5 has mean level 0.5 * 2 / pi = 0.32; clipped (a square wave) ~0.9
    assert abs(np.abs(steady).mean() - 0.5 * 2 / np.pi) < 0.1


# ---- how a run ends ------------------------------------------------------------------------
def test_finished_run_with_return_frames_off_gives_a_one_per_second_preview(tiny_graph, monkeypatch):
    """As LiveAvatar Decode: frames 0 (and 25, 50, ...) at fps 1.0, and a note saying so."""
    run = Run(tiny_graph, monkeypatch, return_frames=False)
    full = Run(tiny_graph, monkeypatch)
    preview, fps, _ = run.result["result"]
    assert (fps, len(preview)) == (1.0, 1) and torch.equal(preview, full.result["result"][0][:1])
    assert any("return_frames is off: frames is a preview" in line for line in run.result["ui"]["text"])
    assert [m["status"] for m in run.messages][-1] == "finished"


def test_cancel_tells_the_browser_and_keeps_the_first_block(tiny_graph, monkeypatch):
    """Cancel while the second block samples, once the first is decoded (on CUDA its decode
    is queued alongside that sampling and handed over only after it: it must still come out)."""
    decode, decoded = decoding.VideoDecoder.decode, []
    monkeypatch.setattr(decoding.VideoDecoder, "decode",
                        lambda self, latents: (decode(self, latents), decoded.append(1))[0])
    run = Run(tiny_graph, monkeypatch, cancel_when=lambda messages: bool(decoded))
    assert isinstance(run.error, KeyboardInterrupt)
    assert (run.last["status"], run.last["done"], run.last["frames"], run.last["total_frames"]) == \
        ("cancelled", True, 9, SPOKEN)
    assert run.last["bytes"] == run.path.stat().st_size
    mp4 = mp4_tracks(run.path)
    assert mp4["frames"] == 9 and mp4["video_end"] == pytest.approx(9 / 25)
    # the speech ends with the picture (within one AAC packet and the encoder's priming one),
    # not a quarter of a second later over a frozen frame
    assert mp4["video_end"] <= mp4["audio_end"] <= mp4["video_end"] + 2 * AAC_FRAME / mp4["rate"]


def test_cancel_before_the_first_block_says_so_and_writes_nothing(tiny_graph, monkeypatch):
    run = Run(tiny_graph, monkeypatch, cancel_when=lambda messages: True)
    assert isinstance(run.error, KeyboardInterrupt)
    assert [m["status"] for m in run.messages] == ["running", "cancelled"]
    assert (run.last["frames"], run.last["bytes"], run.last["done"]) == (0, 0, True) and not run.path.exists()


def test_failure_in_the_second_block_keeps_the_first(tiny_graph, monkeypatch):
    decode = decoding.VideoDecoder.decode
    calls = []

    def fail_on_second(self, latents):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("VAE exploded")
        return decode(self, latents)

    monkeypatch.setattr(decoding.VideoDecoder, "decode", fail_on_second)
    run = Run(tiny_graph, monkeypatch)
    assert isinstance(run.error, RuntimeError)
    assert (run.last["status"], run.last["reason"], run.last["frames"]) == ("failed", "RuntimeError: VAE exploded", 9)
    assert mp4_tracks(run.path)["frames"] == 9


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_is_named_and_told(tiny_graph, monkeypatch):
    """The mp4 is a link to /dev/full, where every write fails as on a full disk (ENOSPC)."""
    save_path = host.save_path

    def on_full_disk(*args, **kwargs):
        path = save_path(*args, **kwargs)
        path.symlink_to("/dev/full")
        return path

    monkeypatch.setattr(host, "save_path", on_full_disk)
    run = Run(tiny_graph, monkeypatch)
    assert isinstance(run.error, OSError) and run.error.errno == errno.ENOSPC
    assert str(run.path) in str(run.error) and "Free space on that disk" in str(run.error)
    assert run.last["status"] == "failed" and "No space left on device" in run.last["reason"]


# ---- the fragmented writer on its own ---------------------------------------------------------
@pytest.mark.parametrize("seconds", [3.0, 0.2], ids=["speech-longer", "speech-shorter"])
def test_live_mp4_speech_ends_with_the_picture(seconds, tmp_path):
    """Closed after two blocks (as on a cancel): the speech stops where the frames stop; speech
    shorter than the video goes on as silence (so the muxer never waits for it)."""
    path = tmp_path / "live.mp4"
    writer = FragmentedMp4Writer(path, 25, 64, 48, prepare_audio(speech(seconds))[0])
    for n in (9, 12):
        writer.write_block(torch.rand(n, 48, 64, 3))
        with av.open(str(path)) as partial:  # the block is on disk at once (but its last frame)
            assert sum(1 for p in partial.demux(video=0) if p.size) == writer.frames - 1
    writer.close()
    mp4 = mp4_tracks(path)
    assert mp4["frames"] == 21 and mp4["video_end"] == pytest.approx(21 / 25)
    assert mp4["video_end"] <= mp4["audio_end"] <= mp4["video_end"] + 2 * AAC_FRAME / mp4["rate"]


# ---- the writer thread of Live Video ------------------------------------------------------------
def test_background_view_goes_on_while_a_block_is_encoded_and_writes_all_on_close(tiny_graph, monkeypatch):
    """LiveView(background=True): append returns while the encoder works (the sampler's next
    tick is not held up by it), at most WRITES_WAITING blocks wait, each block's message comes
    once its bytes are on disk, and close_file writes every block handed over."""
    import threading
    release, writing = threading.Event(), threading.Event()
    write_block = FragmentedMp4Writer.write_block

    def slow_write(writer, frames):
        writing.set()
        assert release.wait(30)
        return write_block(writer, frames)

    monkeypatch.setattr(FragmentedMp4Writer, "write_block", slow_write)
    messages = []
    monkeypatch.setattr(host, "send_to_browser", lambda event, data: messages.append(data))
    path = host.save_path("background", "mp4")
    view = live.LiveView(None, path, None, background=True)
    view.append(torch.rand(9, 48, 64, 3))
    assert writing.wait(30) and view.frames == 0  # handed over, being encoded, not yet counted
    view.append(torch.rand(12, 48, 64, 3))  # one more may wait without holding the caller up
    third = threading.Thread(target=view.append, args=(torch.rand(12, 48, 64, 3),))
    third.start()
    third.join(0.5)
    assert third.is_alive()  # a third waits for the first write: the blocks held stay bounded
    release.set()
    third.join(30)
    view.close_file(announce=False)
    assert [m["frames"] for m in messages] == [0, 9, 21, 33]
    assert [m["bytes"] for m in messages[1:]] == sorted(m["bytes"] for m in messages[1:])
    assert mp4_tracks(path)["frames"] == 33
