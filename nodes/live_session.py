"""A live session: speech from a page, the avatar's video back to it while it is spoken.

LiveSession drives one. The live stream (a StreamRun started with live=True) asks for its audio
block by block; the engine's LiveAudioFeed takes the page's chunks from the intake, lays them on
the timeline (late audio: silence) and encodes them (StreamingAudioEncoder); each clean block is
decoded alongside the sampling (DecodeQueue) and appended, with the very PCM that drove it
(LivePcm), to the fragmented mp4 the node's player plays (LiveView). Every message to the page
carries the session's state: latency (chunk received -> its frame written), whether generation
keeps up, the audio, silence and dropped seconds. The node (session.py) opens it; tests drive it
directly.

    session = LiveSession(run, encoder, intake, view, pcm, Pacing(...), lookahead_s=0.5)
    session.run()   # until the page stops, goes quiet, max_seconds, cancel or an error
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import replace

import numpy as np

from ..liveavatar.audio import SAMPLE_RATE
from ..liveavatar.audio_stream import StreamingAudioEncoder
from ..liveavatar.decoding import VideoDecoder
from ..liveavatar.live_audio import LiveAudioFeed, Pacing, PcmIntake
from ..liveavatar.overlap import DecodeQueue
from ..liveavatar.sampler import VIDEO_FRAMES_PER_BLOCK

from . import host
from .decode import video_to_images
from .live import LiveView
from .stream_run import FPS, StreamRun

log = logging.getLogger("LiveAvatar")
KEEP_UP_S = 1.0  # audio waiting for the generation (intake + features not started) beyond this: behind
SPEED_WINDOW_S = 5.0  # generation speed over this much wall time
REPORT_EVERY_S = 0.5  # state messages while no block comes (waiting for speech)
PACE_NOTE_EVERY_S = 10.0  # "cannot keep up" / "caught up" notes at most this often


class LivePcm:
    """The PCM that drove a session's video, as the FragmentedMp4Writer reads it (`rate`,
    `channels`, `read`): appended as the feed lays it on the timeline, dropped once read (the
    writer reads forward only)."""

    channels = 1

    def __init__(self, rate: int = SAMPLE_RATE):
        self.rate = rate
        self.parts: deque = deque()
        self.start = self.end = 0

    def append(self, pcm: np.ndarray):
        self.parts.append(np.asarray(pcm, np.float32))
        self.end += len(pcm)

    def read(self, start: int, end: int) -> np.ndarray:
        """Samples start .. end - 1 [1, end - start]; silence past what came."""
        while self.parts and self.start + len(self.parts[0]) <= start:
            self.start += len(self.parts.popleft())
        out, first = np.zeros((1, end - start), np.float32), self.start
        for part in self.parts:
            lo, hi = max(start, first), min(end, first + len(part))
            if lo < hi:
                out[0, lo - start:hi - start] = part[lo - first:hi - first]
            first += len(part)
            if first >= end:
                break
        return out


class LiveSession:
    def __init__(self, run: StreamRun, encoder, intake: PcmIntake, view: LiveView, pcm: LivePcm,
                 pacing: Pacing = Pacing(), lookahead_s: float = 0.5, session_id: str = "", clock=time.monotonic):
        self.stream_run, self.intake, self.view, self.clock, self.session_id = run, intake, view, clock, session_id
        self.pacing = replace(pacing, pad_frames=run.drop_first)  # the video shows all the speech
        audio = StreamingAudioEncoder(encoder, lookahead_s=lookahead_s)
        audio.warm_up()  # before the page is told to speak: the first block does not pay for it
        self.feed = LiveAudioFeed(intake, audio, run.streamer, self.pacing, on_pcm=pcm.append, clock=clock)
        self.state, self.keeping_up = "waiting", True
        self.speed_marks: deque = deque()  # (time, frames shown)
        self.decodes, self.last_report, self.last_pace_note = None, clock(), -math.inf
        view.details = self.details  # every message to the page carries the session's state

    def run(self) -> "LiveSession":
        run = self.stream_run
        decoder = VideoDecoder(run.vae, run.priming, None, on_step=host.check_interrupted, drop_first=run.drop_first)
        self.decodes = DecodeQueue(decoder.decode, run.vae.device, prepare=decoder.prime)
        self.view.update()
        blocks = run.blocks(on_audio=self._on_audio, progress_steps=self._progress_steps())
        try:
            for block in blocks:
                self.feed.stages.mark(self._block_number(block), "clean", self.clock())
                self.decodes.put(block)
                self._show(self.decodes.ready())
            self._show(self.decodes.ready(wait=True))
        except BaseException:
            self._rescue()
            raise
        finally:
            blocks.close()
            self.intake.close("the session stopped")
            self.state = "ended"
        return self

    # ---- the stream's on_audio: what runs while it waits for speech ----
    def _on_audio(self, wait: bool):
        host.check_interrupted()
        self._show(self.decodes.ready(wait))  # nothing waits for the next block's speech to show this one
        self.feed(wait)
        if self.state == "waiting" and self.intake.first_arrival is not None:
            self.state = "live"
        if self.feed.ended is not None:
            self.state = "ending"
        if self.clock() - self.last_report >= REPORT_EVERY_S:
            self.view.update()

    def _show(self, decoded):
        for block, video in decoded:
            frames = video_to_images(video)
            if self.feed.ended is not None:  # the last blocks: the video ends with the speech
                frames = frames[:max(0, self.feed.speech_frames - self.view.frames)]
            if len(frames):
                self.view.append(frames)
                self._check_pace()
            self.feed.stages.mark(self._block_number(block), "shown", self.clock())

    def _block_number(self, block) -> int:
        return block.clip * self.stream_run.streamer.blocks_per_clip + block.index

    def _rescue(self):
        """Stopped by an error or a cancel: the blocks already decoding still reach the file."""
        try:
            self._show(self.decodes.ready(wait=True) if self.decodes is not None else [])
        except Exception as error:
            log.warning("LiveAvatar: a block decoded before the session stopped could not be written: %s", error)

    # ---- the state the page sees ----
    def details(self) -> dict:
        now = self.clock()
        self.last_report = now
        self.feed.latency.shown(self.view.frames, now)
        self.speed_marks.append((now, self.view.frames))
        while now - self.speed_marks[0][0] > SPEED_WINDOW_S:
            self.speed_marks.popleft()
        feed = self.feed
        return {"session": {
            "id": self.session_id, "state": self.state, "ended": feed.ended, "max_seconds": self.pacing.max_seconds,
            "audio_s": round(feed.fed / SAMPLE_RATE, 3), "silence_s": round(feed.silence / SAMPLE_RATE, 3),
            "dropped_s": round(feed.dropped / SAMPLE_RATE, 3), "waiting_s": round(self.waiting_s(), 3),
            "keeping_up": self.keeping_up, "speed_fps": self.speed_fps(), **feed.latency.summary(),
            **feed.stages.summary()}}

    def waiting_s(self) -> float:
        """Speech received and not yet being generated: in the intake, not encoded yet, or encoded
        but its block not started."""
        streamer = self.stream_run.streamer
        features = max(0, streamer.audio.end - streamer.next_block * VIDEO_FRAMES_PER_BLOCK)
        return self.intake.queued_s + self.feed.pending_s + features / FPS

    def speed_fps(self) -> float | None:
        (t0, f0), (t1, f1) = self.speed_marks[0], self.speed_marks[-1]
        return round((f1 - f0) / (t1 - t0), 2) if t1 - t0 >= 1.0 else None

    def _check_pace(self):
        keeping_up = self.waiting_s() <= KEEP_UP_S
        now = self.clock()
        if keeping_up == self.keeping_up or now - self.last_pace_note < PACE_NOTE_EVERY_S:
            return
        self.keeping_up, self.last_pace_note = keeping_up, now
        speed = self.speed_fps()
        if keeping_up:
            self.stream_run.notes.add("the session caught up with the speech")
        else:
            self.stream_run.notes.add(f"generation cannot keep up with the speech ({speed or '?'} video frames per second "
                               f"for {FPS} of speech): {self.waiting_s():.1f} s of speech wait and the video falls "
                               "behind (the saved mp4 stays in sync). A smaller size, fewer steps or fp8 weights "
                               "make it faster")
        self.view.update()

    def _progress_steps(self) -> int:
        """The progress bar's length: the block-steps of a session of max_seconds."""
        blocks = math.ceil(self.pacing.max_seconds * FPS / VIDEO_FRAMES_PER_BLOCK)
        return blocks * len(self.stream_run.streamer.step_sizes)

    def summary(self) -> str:
        feed, latency = self.feed, self.feed.latency.summary()
        late = f", {feed.dropped / SAMPLE_RATE:.1f} s came too late and was left out" if feed.dropped else ""
        timing = (f"; latency (chunk received -> its frame written) median {latency['latency_p50_s']} s, "
                  f"95% {latency['latency_p95_s']} s" if latency["latency_p50_s"] is not None else "")
        return (f"session ended: {feed.ended or 'stopped'}. {feed.fed / SAMPLE_RATE:.1f} s of audio "
                f"({feed.silence / SAMPLE_RATE:.1f} s of it silence in place of audio that came late or not at all"
                f"{late}), {self.view.frames} frames{timing}")
