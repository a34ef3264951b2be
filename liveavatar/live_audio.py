"""A live session's audio: 16 kHz mono PCM chunks from a page, as they come, to a live
Streamer's blocks.

    intake = PcmIntake(token)                       # the web route: intake.push(token, offset, data)
    feed = LiveAudioFeed(intake, StreamingAudioEncoder(encoder), streamer, Pacing())
    for block in streamer.blocks(on_audio=feed):    # the feed appends each block's features
        ...

The timeline: every chunk says where it starts in the page's capture (`offset`, in samples),
so the session keeps the page's time. The first chunk sets the clock (timeline sample 0 at its
arrival minus its length; a chunk that comes early moves it earlier). Audio later than
`Pacing.late_s` is replaced by silence (idle "silence": the avatar goes on moving while nobody
speaks, generation never stalls); when the late chunk comes, its part already filled is dropped
and the rest goes on where it belongs. A gap in the offsets (a lost chunk) is silence too. The
timeline (speech, fills, gaps) is exactly what wav2vec2 hears (`on_pcm` gets every sample, for
the mp4), so picture and sound stay in sync however the audio came.

The session ends (the feed ends the Streamer's audio, after the last speech is encoded) when the
page asks (stop), when no chunk came for `disconnect_s` (tab closed, connection lost), when the
first chunk does not come within `first_chunk_s`, or at `max_seconds` of timeline.

PcmIntake is the only part touched by two threads (the server's, which pushes; the generation
thread, which takes); it bounds what a page may send: the token, chunk size, rate, and the
audio waiting to be taken.
"""
from __future__ import annotations

import math
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from .audio import SAMPLE_RATE, VIDEO_FPS

BYTES_PER_SAMPLE = 2  # chunks are 16-bit little-endian PCM
IDLE_MODES = ("silence", "pause")  # late audio: silence in its place, or the video waits for it


@dataclass(frozen=True)
class IntakeLimits:
    max_chunk_s: float = 1.0  # audio in one chunk
    max_rate: float = 1.5  # sustained rate, times real time (room for a page catching up after a stall)
    burst_s: float = 3.0  # audio that may come at once above that rate
    max_backlog_s: float = 30.0  # audio received and not yet taken by the generation
    max_gap_s: float = 10.0  # how far a chunk may start past the end of the last one

    @property
    def max_chunk_bytes(self) -> int:
        return int(self.max_chunk_s * SAMPLE_RATE) * BYTES_PER_SAMPLE


class ChunkRefused(Exception):
    """A chunk or request the intake does not take; `kind` says why (the web route maps it to
    an HTTP status): token, too_large, bad_chunk, too_fast, behind, ended."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Chunk:
    offset: int  # first sample's index in the page's capture
    pcm: np.ndarray  # float32 [n] in [-1, 1]
    arrived: float  # clock time


class PcmIntake:
    """What the page sends, held until the generation thread takes it (thread-safe)."""

    def __init__(self, token: str, limits: IntakeLimits = IntakeLimits(), clock=time.monotonic):
        self.token, self.limits, self.clock = token, limits, clock
        self._cond = threading.Condition()
        self._chunks: deque[Chunk] = deque()
        self._queued = 0  # samples held
        self.received = 0  # samples taken in
        self.page_end = 0  # end of the furthest chunk in the page's capture
        self.first_arrival = self.last_arrival = None
        self.stop_reason = self.closed = None
        self._allowance, self._refilled = limits.burst_s, None

    # ---- the server's side ----
    def check_token(self, token):
        if not isinstance(token, str) or not secrets.compare_digest(token.encode(), self.token.encode()):
            raise ChunkRefused("token", "wrong or missing session token: this session takes audio only from the page "
                                        "that queued it")

    def push(self, token, offset, data: bytes) -> dict:
        """One chunk: `data` 16-bit little-endian mono PCM at 16 kHz (may be empty: a keep-alive),
        starting at sample `offset` of the page's capture."""
        self.check_token(token)
        pcm = self._decode(offset, data)
        with self._cond:
            if self.closed is not None:
                raise ChunkRefused("ended", f"the session has ended ({self.closed}): start a new one")
            now = self.clock()
            self._take_allowance(now, len(pcm) / SAMPLE_RATE)
            if len(pcm):
                self._chunks.append(Chunk(int(offset), pcm, now))
                self._queued += len(pcm)
                self.received += len(pcm)
                self.page_end = max(self.page_end, int(offset) + len(pcm))
                self.first_arrival = self.first_arrival if self.first_arrival is not None else now
            self.last_arrival = now
            self._cond.notify_all()
            return {"received_s": round(self.received / SAMPLE_RATE, 3), "queued_s": round(self.queued_s, 3)}

    def check_size(self, nbytes: int):
        limit = self.limits.max_chunk_bytes
        if nbytes > limit:
            raise ChunkRefused("too_large", f"a chunk holds at most {self.limits.max_chunk_s:g} s of audio "
                                            f"({limit} bytes of 16-bit PCM at 16 kHz), got {nbytes} bytes: "
                                            "send smaller chunks")

    def _decode(self, offset, data: bytes) -> np.ndarray:
        self.check_size(len(data))
        if len(data) % BYTES_PER_SAMPLE:
            raise ChunkRefused("bad_chunk", f"a chunk is 16-bit PCM (an even number of bytes), got {len(data)} bytes")
        if isinstance(offset, str) and offset.strip().isdigit():
            offset = int(offset)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ChunkRefused("bad_chunk", f"the chunk's offset must be its first sample's index in the capture "
                                            f"(a whole number >= 0), got {offset!r}")
        if offset > self.page_end + self.limits.max_gap_s * SAMPLE_RATE:
            raise ChunkRefused("bad_chunk", f"the chunk starts at sample {offset}, more than {self.limits.max_gap_s:g} s "
                                            f"after the last one ended ({self.page_end}): offsets count the samples "
                                            "captured since the session started")
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0

    def _take_allowance(self, now: float, seconds: float):
        """A token bucket: `max_rate` seconds of audio per second, up to `burst_s` at once."""
        if self._refilled is not None:
            self._allowance = min(self.limits.burst_s, self._allowance + (now - self._refilled) * self.limits.max_rate)
        self._refilled = now
        if seconds > self._allowance + 1e-6:
            raise ChunkRefused("too_fast", f"audio is coming faster than real time (more than "
                                           f"{self.limits.max_rate:g}x, beyond a {self.limits.burst_s:g} s burst): "
                                           "send 16 kHz PCM as it is captured or played")
        if (self._queued + seconds * SAMPLE_RATE) / SAMPLE_RATE > self.limits.max_backlog_s:
            raise ChunkRefused("behind", f"{self.queued_s:.1f} s of audio wait to be turned into video: generation "
                                         "cannot keep up at these settings (smaller size, fewer steps, fp8)")
        self._allowance -= seconds

    def request_stop(self, token, reason: str = "stopped from the page"):
        self.check_token(token)
        self.stop(reason)

    def stop(self, reason: str):
        with self._cond:
            self.stop_reason = self.stop_reason or reason
            self._cond.notify_all()

    # ---- the generation thread's side ----
    def take(self, wait_s: float = 0.0) -> list[Chunk]:
        """Every chunk held (waiting up to `wait_s` for one)."""
        with self._cond:
            if not self._chunks and wait_s > 0 and self.stop_reason is None:
                self._cond.wait(wait_s)
            chunks = list(self._chunks)
            self._chunks.clear()
            self._queued = 0
            return chunks

    def close(self, reason: str):
        """No chunk is taken any more."""
        with self._cond:
            self.closed = self.closed or reason
            self._cond.notify_all()

    @property
    def queued_s(self) -> float:
        return self._queued / SAMPLE_RATE


@dataclass(frozen=True)
class Pacing:
    late_s: float = 1.0  # audio this late is replaced by silence (idle "silence")
    idle: str = "silence"  # or "pause": no fill, the video waits for the audio
    disconnect_s: float = 5.0  # no chunk for this long: the page is gone
    first_chunk_s: float = 120.0  # the page's first chunk must come within this
    max_seconds: float = 600.0  # the session's length (timeline)
    poll_s: float = 0.05  # a waiting loop's wait for a chunk
    pad_frames: int = 0  # frames of silence features after the speech (what the decoder drops at the start)

    def __post_init__(self):
        if self.idle not in IDLE_MODES:
            raise ValueError(f"idle must be one of {IDLE_MODES}, got {self.idle!r}")
        for name in ("late_s", "disconnect_s", "first_chunk_s", "max_seconds", "poll_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")


class LiveAudioFeed:
    """The live Streamer's `on_audio`: takes the intake's chunks, lays them on the timeline
    (module docstring), encodes them and appends the blocks to `streamer`; ends its audio when
    the session ends. Each call encodes until one block is out (the one the stream asked for),
    so that audio that piled up (generation behind) is encoded between the blocks' steps, not
    all before the next block starts. `speech_frames`: video frames the timeline covers (known
    once it has ended)."""

    def __init__(self, intake: PcmIntake, encoder, streamer, pacing: Pacing = Pacing(), on_pcm=None,
                 clock=time.monotonic):
        self.intake, self.encoder, self.streamer, self.pacing = intake, encoder, streamer, pacing
        self.on_pcm, self.clock = on_pcm, clock
        self.started = clock()
        self.origin = None  # clock time of timeline sample 0
        self.fed = self.silence = self.dropped = self.appended_frames = 0  # samples, samples, samples, frames
        self.pending: deque = deque()  # timeline pieces not encoded yet
        self.ended = None  # why the audio ended
        self.latency = LatencyMeter()
        self.stages = BlockStages()
        self.heard = None  # arrival of the last chunk laid on the timeline since the last block
        self._block_shape = None

    def __call__(self, wait: bool = False):
        if self.ended is not None:
            return
        for chunk in self.intake.take(0.0 if self.pending or not wait else self.pacing.poll_s):
            self._place(chunk)
        now = self.clock()
        reason = self._end_reason(now)
        if reason is not None:
            self.end(reason)
            return
        if self.pacing.idle == "silence" and self.origin is not None and not self.pending:
            due = int((now - self.origin - self.pacing.late_s) * SAMPLE_RATE)
            if due > self.fed:  # the audio is late: silence takes its place
                self._feed(np.zeros(due - self.fed, np.float32), silence=True)
        self._encode(until_block=True)

    def end(self, reason: str):
        """The audio ends here: what came before is encoded (the speech's last blocks, their
        frames past the speech silent), the Streamer told."""
        if self.ended is not None:
            return
        self.ended = reason
        self.intake.close(reason)
        for chunk in self.intake.take():
            self._place(chunk)
        self._encode(until_block=False)
        for block in self.encoder.flush():
            self._append(block)
        while self._block_shape is not None and self.appended_frames < self.speech_frames + self.pacing.pad_frames:
            self._append(torch.zeros(self._block_shape))
        self.streamer.end_audio()

    @property
    def speech_frames(self) -> int:
        return self.encoder.speech_frames

    @property
    def pending_s(self) -> float:
        """Audio on the timeline not encoded yet."""
        return sum(len(piece) for piece in self.pending) / SAMPLE_RATE

    def _place(self, chunk: Chunk):
        end = chunk.offset + len(chunk.pcm)
        start_time = chunk.arrived - end / SAMPLE_RATE  # where sample 0 was, by this chunk
        self.origin = start_time if self.origin is None else min(self.origin, start_time)
        if chunk.offset > self.fed:  # a gap: a chunk that never came
            self._feed(np.zeros(chunk.offset - self.fed, np.float32), silence=True)
        head = self.fed - chunk.offset  # its part already on the timeline (filled while it was late)
        self.dropped += min(head, len(chunk.pcm))
        if head < len(chunk.pcm):
            self._feed(chunk.pcm[head:])
            self.latency.mark(self.fed, chunk.arrived)
            self.heard = chunk.arrived

    def _end_reason(self, now: float) -> str | None:
        pacing, intake = self.pacing, self.intake
        if intake.stop_reason is not None:
            return intake.stop_reason
        if self.fed >= pacing.max_seconds * SAMPLE_RATE:
            return f"it reached max_seconds ({pacing.max_seconds:g} s)"
        if intake.last_arrival is None:
            if now - self.started > pacing.first_chunk_s:
                return f"no audio came from the page within {pacing.first_chunk_s:g} s"
        elif now - intake.last_arrival > pacing.disconnect_s:
            return f"no audio came from the page for {pacing.disconnect_s:g} s (tab closed or connection lost)"
        return None

    def _feed(self, pcm: np.ndarray, silence: bool = False):
        """Lay `pcm` on the timeline (up to max_seconds); it is encoded by _encode."""
        pcm = pcm[:max(0, int(self.pacing.max_seconds * SAMPLE_RATE) - self.fed)]
        if not len(pcm):
            return
        self.pending.append(pcm)
        self.fed += len(pcm)
        self.silence += len(pcm) if silence else 0

    def _encode(self, until_block: bool):
        """Encode the pending timeline, a chunk at a time: until a block is out, or all of it."""
        while self.pending:
            pcm = self.pending.popleft()
            if self.on_pcm is not None:
                self.on_pcm(pcm)
            blocks = self.encoder.feed(torch.from_numpy(pcm))
            for block in blocks:
                self._append(block)
            if blocks and until_block:
                return

    def _append(self, block: torch.Tensor):
        self._block_shape = tuple(block.shape)
        self.streamer.append_audio(block)
        block_number = self.appended_frames // block.shape[-1]
        if self.heard is not None:  # a chunk completed this block (not silence, not the zeros at the end)
            self.stages.mark(block_number, "heard", self.heard)
            self.heard = None
        self.stages.mark(block_number, "features", self.clock())
        self.appended_frames += block.shape[-1]


class LatencyMeter:
    """Seconds from a chunk's arrival to the video frame holding its last sample being shown
    (video frame k shows timeline time k / 25 s); the last `window` of them."""

    def __init__(self, window: int = 200):
        self.marks: deque = deque()  # (timeline end sample, arrival) of chunks not yet shown
        self.recent: deque = deque(maxlen=window)

    def mark(self, end_sample: int, arrived: float):
        self.marks.append(((end_sample - 1) * VIDEO_FPS // SAMPLE_RATE, arrived))

    def shown(self, frames: int, now: float):
        """`frames` video frames are shown now."""
        while self.marks and self.marks[0][0] < frames:
            self.recent.append(now - self.marks.popleft()[1])

    def summary(self) -> dict:
        if not self.recent:
            return {"latency_s": None, "latency_p50_s": None, "latency_p95_s": None}
        values = np.array(self.recent)
        return {"latency_s": round(float(values[-1]), 3), "latency_p50_s": round(float(np.percentile(values, 50)), 3),
                "latency_p95_s": round(float(np.percentile(values, 95)), 3)}


class BlockStages:
    """Where a session's latency goes, block by block: when the chunk that completed a block's
    audio (its lookahead included) came ("heard"), when the block's features were appended to the
    stream ("features"), when the sampler handed the block over ("clean": its last step queued on
    the GPU, not necessarily run) and when its frames were written ("shown"); medians of each
    stage over the last `window` blocks shown that have both its ends."""

    SPANS = {"encode_p50_s": ("heard", "features"), "sampling_p50_s": ("features", "clean"),
             "decode_p50_s": ("clean", "shown")}

    def __init__(self, window: int = 50):
        self.open: dict = {}  # block -> {stage: time} until it is shown
        self.done: deque = deque(maxlen=window)

    def mark(self, block: int, stage: str, now: float):
        times = self.open.setdefault(block, {})
        times[stage] = now
        if stage == "shown":
            self.done.append(self.open.pop(block))

    def summary(self) -> dict:
        """Median seconds of each span: the wait for the feed to be asked and wav2vec2's run
        (encode), the host queueing the block's steps and waiting for the GPU where it must
        (sampling), the GPU finishing the steps, the decode and the copy to the CPU (decode)."""
        out = {}
        for name, (start, end) in self.SPANS.items():
            spans = [t[end] - t[start] for t in self.done if start in t and end in t]
            out[name] = round(float(np.median(spans)), 3) if spans else None
        return out
