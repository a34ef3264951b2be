"""Streaming audio features: wav2vec2 over a sliding window, one block of video frames at a time.

A live session feeds 16 kHz mono PCM as it arrives and gets, for every block of
`block_frames` video frames (12 = 0.48 s at 25 fps, one DiT block), the features
`AudioFeatures.per_frame` would give those frames: [layers + 1, hidden, block_frames].

Block b's frames i take 30 Hz features j = round(1.2 i) (as per_frame_features), each the
linear blend of 50 Hz frames floor(p) and floor(p) + 1 at p = j * step. The block runs
wav2vec2 over those 50 Hz frames plus `left_context_s` before and `lookahead_s` after, cut at
320-sample hops so the frames are the one-pass frames' positions; it is emitted as soon as
that audio is in. So the latency from the end of a block's 0.48 s of audio to its features is
`lookahead_s` (rounded up to 20 ms frames) - 15 ms to + 5 ms (the last frame's 30 Hz feature
sits 1/25 s before the block's end, its 50 Hz neighbour and receptive field 20-45 ms after it;
`ready_sample`, `latency_s`) + one wav2vec2 run over the window (left context + 0.48 s +
lookahead). Memory: the PCM of one window plus the chunk being fed.

What differs from the one-pass features (docs/audio.md has the measured sizes):
- context: wav2vec2 attends over the whole clip; here over the window only.
- normalisation: one pass scales the whole clip to zero mean, unit variance, which a stream
  cannot know. "running" (default) uses the mean and variance of all audio up to the window's
  end; "window" those of the window; or a fixed `NormStats` (e.g. from a calibration take).
- 30 Hz grid: the original's step, (T50 - 1) / (T30 - 1), depends on the clip's length. With
  `total_samples` given the grid is the original's; without it (live) it is 5/3, which moves
  the last 30 Hz features by at most 2 50 Hz frames (40 ms) against a one-pass run over the
  same audio, less earlier on (the offset grows linearly from zero).

Output for any split of the PCM into chunks is the same: which audio a block sees, and the
statistics its normalisation uses, depend only on the block's index and the total length.

    stream = StreamingAudioEncoder(encoder, left_context_s=4.0, lookahead_s=0.5)
    for pcm in microphone:                 # float32 in [-1, 1] or int16, any chunk size
        for block in stream.feed(pcm):     # [layers + 1, hidden, 12]
            ...
    for block in stream.flush():           # the rest; frames past the speech are zeros
        ...
    stream.speech_frames                   # video frames carrying speech (per_frame's `covered`)
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .audio import (FEATURE_RATE, HOP, RECEPTIVE_FIELD, RESAMPLED_RATE, SAMPLE_RATE, VIDEO_FPS, NormStats,
                    Wav2Vec2Encoder, apply_normalisation, count_30hz, feature_count, lerp_frames, positions_30hz)

BLOCK_FRAMES = 12  # video frames per DiT block (3 latent frames)
LEFT_CONTEXT_S = 4.0
LOOKAHEAD_S = 0.5
MIN_STD = 0.01  # -40 dBFS: a running or window normalisation never amplifies quieter audio more
NORMALISATIONS = ("running", "window")


def frame_indices(first: int, count: int) -> np.ndarray:
    """30 Hz feature of video frames first .. first + count - 1: round(i * 30 / 25), as
    per_frame_features (1.2 i is never near a half, so the rounding is unambiguous)."""
    return np.round(np.arange(first, first + count) / VIDEO_FPS * RESAMPLED_RATE).astype(np.int64)


class RunningStats:
    """Mean and variance of all samples added so far (float64, Chan's pairwise update)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, samples: torch.Tensor):
        n = samples.numel()
        if n == 0:
            return
        x = samples.double()
        mean = float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    def stats(self) -> NormStats:
        return NormStats.of_moments(self.mean, self.m2 / max(self.count, 1))


class StreamingAudioEncoder:
    """PCM in, per-video-frame features out, one block of frames at a time (module docstring)."""

    def __init__(self, encoder: Wav2Vec2Encoder, left_context_s: float = LEFT_CONTEXT_S,
                 lookahead_s: float = LOOKAHEAD_S, block_frames: int = BLOCK_FRAMES,
                 normalisation: str | NormStats = "running", total_samples: int | None = None,
                 min_std: float = MIN_STD):
        if left_context_s < 0 or lookahead_s < 0:
            raise ValueError(f"left_context_s and lookahead_s must be >= 0, got {left_context_s}, {lookahead_s}")
        if int(block_frames) != block_frames or block_frames <= 0:
            raise ValueError(f"block_frames must be a positive whole number, got {block_frames}")
        if not isinstance(normalisation, NormStats) and normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS} or a NormStats, got {normalisation!r}")
        if total_samples is not None and total_samples < RECEPTIVE_FIELD:
            raise ValueError(f"total_samples must be at least {RECEPTIVE_FIELD}, got {total_samples}")
        self.encoder, self.block_frames, self.normalisation = encoder, int(block_frames), normalisation
        self.min_std = float(min_std)
        self.left = _frames_at_least(left_context_s)  # 50 Hz frames
        self.lookahead = _frames_at_least(lookahead_s)
        self.total_samples = total_samples
        self.t50 = feature_count(total_samples) if total_samples is not None else None  # known at flush if not here
        self.grid_t50 = self.t50  # the 30 Hz grid: the original's for this length, or 5/3 (None) for good
        self.chunks = []  # PCM samples buffer_start .. received - 1, joined when a block needs them
        self.buffer_start = self.received = 0
        self.running, self.stats_end = RunningStats(), 0
        self.next_block, self.finished, self.speech_frames = 0, False, 0
        self._last_plan = (None, None)
        self.cuda_stream = None  # after warm_up on a GPU: the CUDA stream wav2vec2 runs on

    def warm_up(self):
        """wav2vec2 once on silence at the windows of the first block and of a block with its whole
        left context, before any speech: the GPU's first-use costs (kernel loading) are paid here,
        not by the first spoken block. On a GPU the runs after it go on a stream of their own
        (Wav2Vec2Encoder.run): its weights are ready for it once this run is done. The stream's
        state is untouched."""
        steady = math.ceil(self.left * VIDEO_FPS / FEATURE_RATE / self.block_frames) + 1
        for block in (0, steady):
            _, lo, hi = self._new_plan(block)
            self.encoder.run(torch.zeros(HOP * (hi - lo) + RECEPTIVE_FIELD))  # its .cpu() waits for the run
        if self.encoder.device.type == "cuda":
            self.cuda_stream = torch.cuda.Stream(self.encoder.device)

    # ---- the plan of block b: which 30 Hz features, which 50 Hz frames, which audio ----
    def _covered_t30(self) -> int:
        """30 Hz features that exist for sure: all of the clip's once its length is known."""
        return count_30hz(self.t50) if self.t50 is not None else count_30hz(feature_count(self.received))

    def _plan(self, block: int):
        """(30 Hz indices of the block's frames, 50 Hz frames lo .. hi the run covers)."""
        key = (block, self.t50)
        if self._last_plan[0] != key:  # asked again at every feed until the block is out
            self._last_plan = (key, self._new_plan(block))
        return self._last_plan[1]

    def _new_plan(self, block: int):
        indices = frame_indices(block * self.block_frames, self.block_frames)
        positions = positions_30hz(indices, self.grid_t50)
        lo = max(0, int(math.floor(positions[0])) - self.left)
        hi = int(math.floor(positions[-1])) + 1 + self.lookahead
        if self.t50 is not None:
            hi = min(hi, self.t50 - 1)
        return indices, lo, hi

    def ready_sample(self, block: int) -> int:
        """Samples that must be in before `block` is emitted (without a flush)."""
        _, _, hi = self._plan(block)
        return HOP * hi + RECEPTIVE_FIELD

    def latency_s(self, block: int = 1) -> float:
        """Seconds from the end of `block`'s audio (its last frame's 1/25 s) to when it can be
        emitted, not counting the wav2vec2 run."""
        return self.ready_sample(block) / SAMPLE_RATE - (block + 1) * self.block_frames / VIDEO_FPS

    # ---- feeding ----
    def feed(self, pcm) -> list[torch.Tensor]:
        """Append mono 16 kHz PCM (float in [-1, 1], or integer PCM); return the blocks now
        complete, each [layers + 1, hidden, block_frames]."""
        if self.finished:
            raise RuntimeError("this audio stream was flushed: start a new StreamingAudioEncoder")
        samples = _as_float_pcm(pcm)
        if self.total_samples is not None and self.received + samples.numel() > self.total_samples:
            raise ValueError(f"more PCM than total_samples={self.total_samples}")
        self.chunks.append(samples)
        self.received += samples.numel()
        blocks = []
        while self._ready(self.next_block):
            blocks.append(self._emit(self.next_block))
        return blocks

    def flush(self) -> list[torch.Tensor]:
        """The stream has ended: the remaining blocks with speech, frames past it zeros (the
        one-pass per_frame layout, cut after the last block with speech)."""
        if self.finished:
            return []
        if self.total_samples is not None and self.received != self.total_samples:
            raise ValueError(f"the stream ended after {self.received} samples, total_samples said "
                             f"{self.total_samples}")
        self.finished = True
        if self.t50 is None:
            self.t50 = feature_count(self.received)
        t30 = count_30hz(self.t50)
        blocks = []
        while frame_indices(self.next_block * self.block_frames, 1)[0] < t30:
            blocks.append(self._emit(self.next_block))
        self.chunks = []
        return blocks

    def _ready(self, block: int) -> bool:
        indices, _, hi = self._plan(block)
        return indices[-1] < self._covered_t30() and self.received >= HOP * hi + RECEPTIVE_FIELD

    def _emit(self, block: int) -> torch.Tensor:
        indices, lo, hi = self._plan(block)
        covered = indices < count_30hz(self.t50) if self.finished else np.ones(len(indices), dtype=bool)
        end = HOP * hi + RECEPTIVE_FIELD
        states = self.encoder.run(self._normalised(HOP * lo, end), self.cuda_stream)
        if states.shape[1] != hi - lo + 1:
            raise RuntimeError(f"wav2vec2 gave {states.shape[1]} frames, expected {hi - lo + 1}")
        features = lerp_frames(states, positions_30hz(indices[covered], self.grid_t50), lo, hi)  # [layers, m, C]
        out = features.new_zeros(features.shape[0], features.shape[2], self.block_frames)
        out[:, :, :int(covered.sum())] = features.transpose(1, 2)
        self.speech_frames = block * self.block_frames + int(covered.sum())
        self.next_block = block + 1
        self._drop_consumed()
        return out

    def _pcm(self) -> torch.Tensor:
        if len(self.chunks) != 1:
            self.chunks = [torch.cat(self.chunks) if self.chunks else torch.zeros(0)]
        return self.chunks[0]

    def _normalised(self, start: int, end: int) -> torch.Tensor:
        pcm = self._pcm()
        segment = pcm[start - self.buffer_start:end - self.buffer_start]
        if isinstance(self.normalisation, NormStats):
            return apply_normalisation(segment, self.normalisation)
        if self.normalisation == "window":
            stats = NormStats.of_moments(segment.double().mean(), segment.double().var(unbiased=False))
        else:
            if end > self.stats_end:  # running: every sample up to the window's end, added once
                self.running.add(pcm[self.stats_end - self.buffer_start:end - self.buffer_start])
                self.stats_end = end
            stats = self.running.stats()
        return apply_normalisation(segment, NormStats(stats.mean, max(stats.scale, self.min_std)))

    def _drop_consumed(self):
        """Keep the PCM from the next block's window start (and what the running statistics
        have not seen yet)."""
        keep = min(HOP * self._plan(self.next_block)[1], self.stats_end if self.normalisation == "running"
                   else self.received)
        keep = max(keep, self.buffer_start)
        self.chunks = [self._pcm()[keep - self.buffer_start:].clone()]
        self.buffer_start = keep

    @property
    def buffered_samples(self) -> int:
        return self.received - self.buffer_start


def _frames_at_least(seconds: float) -> int:
    """Whole 50 Hz frames covering `seconds` (0.25 s -> 13 frames, 0.26 s)."""
    return math.ceil(seconds * FEATURE_RATE - 1e-9)


def _as_float_pcm(pcm) -> torch.Tensor:
    """One chunk -> float32 [n]: integers by their full scale (as float_pcm), floats as they
    are (no per-chunk peak scaling, which would change the level from chunk to chunk)."""
    samples = torch.as_tensor(np.asarray(pcm) if not isinstance(pcm, torch.Tensor) else pcm).detach().cpu()
    if samples.dim() != 1:
        raise ValueError(f"PCM chunks must be mono [samples], got shape {tuple(samples.shape)}")
    if samples.dtype == torch.uint8:
        samples = (samples.float() - 128) / 128
    elif not samples.is_floating_point():
        samples = samples.float() / float(2 ** (torch.iinfo(samples.dtype).bits - 1))
    samples = samples.float()
    if not torch.isfinite(samples).all():
        raise ValueError("the PCM chunk contains NaN or infinite samples")
    return samples
