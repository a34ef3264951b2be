"""A live session's audio (liveavatar/live_audio.py): what a page may send (PcmIntake), how the
chunks become the timeline wav2vec2 hears (LiveAudioFeed: in order, late, lost, paused, ended),
and the latency of a chunk to its frame. Clock-driven parts run on a hand-set clock; wav2vec2 is
the tiny test encoder."""
from functools import lru_cache

import numpy as np
import pytest
import torch

from liveavatar.audio import Wav2Vec2Encoder
from liveavatar.audio_stream import StreamingAudioEncoder
from liveavatar.live_audio import (BlockStages, ChunkRefused, IntakeLimits, LatencyMeter, LiveAudioFeed, Pacing,
                                   PcmIntake)
from liveavatar.testing import speech_like, write_tiny_wav2vec2

RATE = 16000
TOKEN = "secret-token"


class Clock:
    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


class Recorder:
    """Stands where the live Streamer is: what the feed appends, and whether it ended the audio."""

    def __init__(self):
        self.blocks, self.ended = [], False

    def append_audio(self, block):
        assert not self.ended
        self.blocks.append(block)

    def end_audio(self):
        self.ended = True


@lru_cache(maxsize=None)
def encoder() -> Wav2Vec2Encoder:
    """The tiny test wav2vec2 (written once into a temporary folder)."""
    import tempfile
    from pathlib import Path
    folder = Path(tempfile.mkdtemp(prefix="session_w2v_"))
    return Wav2Vec2Encoder.load(write_tiny_wav2vec2(folder / "w2v.safetensors"))


def int16(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1, 32767 / 32768) * 32768).round().astype("<i2").tobytes()


def as_received(pcm: np.ndarray) -> np.ndarray:
    """What 16-bit PCM of `pcm` decodes to."""
    return np.frombuffer(int16(pcm), "<i2").astype(np.float32) / 32768


def covered_frames(samples: int) -> int:
    """Video frames carrying speech for n samples, by hand: wav2vec2's (n - 400) // 320 + 1 frames
    at 50 Hz, int(T50 * 3 / 5) at 30 Hz, frame i while round(1.2 i) < T30."""
    t30 = int(((samples - 400) // 320 + 1) * 30 / 50)
    return sum(1 for i in range(10 ** 5) if round(1.2 * i) < t30)


def feed_for(clock, pacing=Pacing(), limits=IntakeLimits()):
    intake = PcmIntake(TOKEN, limits, clock=clock)
    timeline, sink = [], Recorder()
    feed = LiveAudioFeed(intake, StreamingAudioEncoder(encoder()), sink, pacing, on_pcm=timeline.append, clock=clock)
    return intake, feed, sink, timeline


# ---- the intake: what a page may send -----------------------------------------------------
def test_session_intake_refuses_what_it_should_not_take():
    clock = Clock()
    intake = PcmIntake(TOKEN, IntakeLimits(max_chunk_s=0.5, max_rate=1.0, burst_s=1.0, max_backlog_s=2.0), clock)
    refusals = {}

    def refused(*args):
        with pytest.raises(ChunkRefused) as error:
            intake.push(*args)
        refusals[error.value.kind] = str(error.value)

    chunk = int16(np.zeros(1600))  # 0.1 s
    refused("wrong", 0, chunk)
    refused(None, 0, chunk)
    assert "token" in refusals and "only from the page that queued it" in refusals["token"]
    refused(TOKEN, 0, bytes(2 * 8001))
    assert "at most 0.5 s" in refusals["too_large"]
    refused(TOKEN, 0, b"\x00\x01\x02")
    assert "even number of bytes" in refusals["bad_chunk"]
    for offset in (-1, "x", 1.5, True):
        refused(TOKEN, offset, chunk)
    assert "offset must be" in refusals["bad_chunk"]
    refused(TOKEN, 10 * RATE + 1, chunk)  # more than max_gap_s (10 s) past the last chunk's end
    assert "more than 10 s after" in refusals["bad_chunk"]
    assert intake.received == 0 and intake.take() == []

    # rate: a 1 s burst, then 1x real time
    for i in range(10):
        intake.push(TOKEN, i * 1600, chunk)
    refused(TOKEN, 16000, chunk)
    assert "faster than real time" in refusals["too_fast"]
    clock.now += 0.1
    intake.push(TOKEN, 16000, chunk)  # 0.1 s later, 0.1 s more may come
    assert intake.received == 11 * 1600
    # backlog: 1.1 s held; 2 s at most
    clock.now += 5
    for i in range(9):
        intake.push(TOKEN, 17600 + i * 1600, chunk)
    refused(TOKEN, 32000, chunk)
    assert "cannot keep up" in refusals["behind"]
    assert len(intake.take()) == 20 and intake.queued_s == 0
    intake.push(TOKEN, "32000", b"")  # a keep-alive: no audio, the page is there
    assert intake.last_arrival == clock.now
    intake.close("stopped from the page")
    refused(TOKEN, 32000, chunk)
    assert "has ended (stopped from the page)" in refusals["ended"]
    with pytest.raises(ChunkRefused, match="token"):
        intake.request_stop("wrong")


# ---- the feed: chunks -> timeline -> blocks ------------------------------------------------
def test_session_feed_in_order_gives_the_streams_blocks():
    """Chunks of any size, in order: the blocks are those of the whole PCM fed to the streaming
    encoder directly; when stopped, the rest is encoded and padded with silent frames."""
    clock = Clock()
    intake, feed, sink, timeline = feed_for(clock, Pacing(pad_frames=3))
    speech = speech_like(2.4, seed=4)  # 58 frames of speech: the padding needs a 6th block
    sizes = [1600, 800, 3333, 1600, 4000] * 4
    offset = 0
    for size in sizes:
        piece = speech[offset:offset + size]
        clock.now += len(piece) / RATE
        intake.push(TOKEN, offset, int16(piece))
        offset += len(piece)
        feed(wait=False)
    assert offset == len(speech) and not sink.ended and feed.fed == len(speech)
    during = len(sink.blocks)
    intake.request_stop(TOKEN)
    feed(wait=False)
    direct = StreamingAudioEncoder(encoder())
    expected = direct.feed(torch.from_numpy(as_received(speech))) + direct.flush()
    assert sink.ended and feed.ended == "stopped from the page"
    assert 0 < during < len(expected)  # blocks came while the audio came
    assert torch.equal(torch.cat(sink.blocks[:len(expected)], -1), torch.cat(expected, -1))
    speech_frames = covered_frames(len(speech))
    assert feed.speech_frames == speech_frames
    # padding: whole silent blocks until speech_frames + 3 frames are in
    assert len(sink.blocks) * 12 >= speech_frames + 3 > (len(sink.blocks) - 1) * 12
    assert all(not b.any() for b in sink.blocks[len(expected):])
    assert np.array_equal(np.concatenate(timeline), as_received(speech))
    assert (feed.silence, feed.dropped) == (0, 0)


def test_session_feed_fills_late_audio_with_silence_and_drops_what_came_too_late():
    clock = Clock(100.0)  # (clock values are binary fractions: the sample counts below are exact)
    intake, feed, sink, timeline = feed_for(clock, Pacing(late_s=1.0))
    a, b = speech_like(0.125, seed=1), speech_like(1.0, seed=2)
    clock.now = 100.125
    intake.push(TOKEN, 0, int16(a))  # samples 0..1999 arrive at 100.125: sample 0 was at 100.0
    feed()
    clock.now = 102.0  # nothing since: at 2.0 s, the audio up to 1.0 s is late by the 1 s allowed
    feed()
    assert (feed.fed, feed.silence) == (16000, 14000)
    clock.now = 102.0625
    intake.push(TOKEN, 2000, int16(b))  # samples 2000..17999: 2000..15999 were filled meanwhile
    feed()
    assert (feed.fed, feed.dropped) == (18000, 14000)
    assert np.array_equal(np.concatenate(timeline),
                          np.concatenate([as_received(a), np.zeros(14000, np.float32), as_received(b)[14000:]]))
    clock.now = 102.125
    intake.push(TOKEN, 22000, int16(a))  # a chunk was lost: 18000..21999 is a gap
    feed()
    assert feed.fed == 24000 and feed.silence == 14000 + 4000
    assert np.array_equal(np.concatenate(timeline)[18000:22000], np.zeros(4000, np.float32))
    assert not sink.ended


def test_session_feed_pause_mode_waits_for_the_audio():
    clock = Clock()
    intake, feed, sink, _ = feed_for(clock, Pacing(idle="pause", disconnect_s=30))
    intake.push(TOKEN, 0, int16(speech_like(0.5)))
    feed()
    clock.now += 20
    feed()
    assert (feed.fed, feed.silence, sink.ended) == (8000, 0, False)


def test_session_feed_ends_when_the_page_is_quiet_too_long():
    clock = Clock()
    intake, feed, sink, _ = feed_for(clock, Pacing(disconnect_s=5, late_s=0.5))
    for i in range(3):  # 0.25 s chunks in real time
        clock.now += 0.25
        intake.push(TOKEN, i * 4000, int16(speech_like(0.25, seed=i)))
        feed()
    clock.now += 4.75
    feed()
    assert feed.ended is None and feed.silence > 0  # silence while the page is quiet
    clock.now += 0.5
    feed()
    assert feed.ended == "no audio came from the page for 5 s (tab closed or connection lost)" and sink.ended
    with pytest.raises(ChunkRefused, match="has ended"):
        intake.push(TOKEN, 12000, b"")


def test_session_feed_ends_without_a_first_chunk():
    clock = Clock()
    intake, feed, sink, _ = feed_for(clock, Pacing(first_chunk_s=60))
    clock.now += 59
    feed(wait=True)
    assert feed.ended is None
    clock.now += 2
    feed()
    assert feed.ended == "no audio came from the page within 60 s" and sink.ended and sink.blocks == []


def test_session_feed_ends_at_max_seconds():
    clock = Clock()
    intake, feed, sink, timeline = feed_for(clock, Pacing(max_seconds=1.0))
    for i in range(6):  # 1.5 s in 0.25 s chunks, taken at once
        clock.now += 0.25
        intake.push(TOKEN, i * 4000, int16(speech_like(0.25, seed=i)))
    feed()
    assert feed.ended == "it reached max_seconds (1 s)" and sink.ended
    assert feed.fed == RATE == sum(len(t) for t in timeline)  # the timeline stops at 1 s
    assert feed.speech_frames == covered_frames(RATE)


def test_session_latency_is_arrival_to_the_frame_of_the_chunks_last_sample():
    meter = LatencyMeter()
    meter.mark(640, 10.0)  # samples ..639: video frame 0 (0..0.04 s)
    meter.mark(641, 10.1)  # its last sample, 640, is in frame 1
    meter.mark(16000, 10.5)  # last sample 15999: frame 24
    meter.shown(1, 11.0)
    assert list(meter.recent) == [pytest.approx(1.0)]
    meter.shown(24, 11.2)
    assert len(meter.recent) == 2 and meter.recent[1] == pytest.approx(1.1)
    meter.shown(25, 11.3)
    assert [round(v, 3) for v in meter.recent] == [1.0, 1.1, 0.8]
    assert meter.summary() == {"latency_s": 0.8, "latency_p50_s": 1.0, "latency_p95_s": 1.09}


def test_session_block_stages_are_medians_over_the_blocks_shown():
    stages = BlockStages(window=2)
    stages.mark(0, "heard", -0.1)
    stages.mark(0, "features", 0.0)
    stages.mark(0, "clean", 0.3)
    assert stages.summary() == {"encode_p50_s": None, "sampling_p50_s": None, "decode_p50_s": None}  # none shown
    stages.mark(0, "shown", 0.5)
    for block, (heard, features, clean, shown) in enumerate([(0.4, 0.5, 0.9, 1.0), (0.7, 1.0, 1.2, 1.6)], start=1):
        stages.mark(block, "heard", heard)
        stages.mark(block, "features", features)
        stages.mark(block, "clean", clean)
        stages.mark(block, "shown", shown)
    # the last two blocks (window 2): encode 0.1 and 0.3, sampling 0.4 and 0.2, decode 0.1 and 0.4
    assert stages.summary() == {"encode_p50_s": 0.2, "sampling_p50_s": 0.3, "decode_p50_s": 0.25}
    stages.mark(3, "clean", 2.0)
    stages.mark(3, "shown", 2.1)  # the zeros after the speech: no audio heard, no features; its decode counts
    assert stages.summary() == {"encode_p50_s": 0.3, "sampling_p50_s": 0.2, "decode_p50_s": 0.25} and not stages.open
