"""The video LiveAvatar shows: its latent blocks decoded as its streaming loop does.

LiveAvatar does not start the VAE decoder cold on the first generated latent. It first
decodes the 7 oldest motion latents (the portrait held still) and throws those frames
away, so the decoder's causal cache holds the portrait's past; it then drops the first 3
frames of the first generated block (they continue that primed past); and the video ends
with the speech, not with the last whole clip. Both the decode node and Python API users
go through `VideoDecoder`, so they get the same frames.

Public API:
    VideoDecoder(vae, motion_latents=None, spoken_frames=None, on_step=None)
        .decode(latents [16, t, h, w]) -> frames [3, T, H, W] in [-1, 1] (T may be 0 at the end)
        .prime()        the priming decode ahead of the first block (else the first decode does it)
        .finished      True once `spoken_frames` frames have been returned
        .steps(latents) latents the VAE will decode (priming included) for a stream of that
                        many latents fed in blocks of 3: the progress total
"""
from __future__ import annotations

import torch

PRIMING_LATENTS = 7  # the original primes the decoder with its 7 oldest motion latents
DROPPED_FIRST_FRAMES = 3  # ... and drops the first generated block's first 3 frames
LATENTS_PER_BLOCK = 3
FRAMES_PER_LATENT = 4  # after the stream's first latent, which gives 1 frame


class VideoDecoder:
    """Streaming decode with LiveAvatar's priming, dropping and trimming.

    motion_latents: the sampler's 19 motion latents [16, 19, h, w] (normalised); without
    them the stream starts cold at the first latent (1 frame), as a plain VAE decode.
    spoken_frames: video frames carrying speech; later frames are not returned.
    on_step: called once per latent the VAE decodes, after its pass (progress; raise from it to cancel).
    drop_first: frames dropped after the priming: LiveAvatar's 3 after the portrait; 0 when
    the priming latents are the end of the video this one continues (its next frames follow)."""

    def __init__(self, vae, motion_latents: torch.Tensor | None = None, spoken_frames: int | None = None,
                 on_step=None, drop_first: int = DROPPED_FIRST_FRAMES):
        if spoken_frames is not None and spoken_frames < 1:
            raise ValueError(f"spoken_frames must be at least 1, got {spoken_frames}")
        self.stream = vae.stream_decoder()
        self.motion = motion_latents
        self.remaining = spoken_frames
        self.on_step = on_step
        self.drop_first = drop_first if motion_latents is not None else 0
        self.started = self.primed = False

    @property
    def finished(self) -> bool:
        return self.remaining is not None and self.remaining <= 0

    def prime(self):
        """Decode the priming latents now (done by the first decode() otherwise): they depend on
        the portrait alone, so this may run while the first block is still being sampled."""
        if not self.primed and self.motion is not None:
            self.stream.decode(self.motion[:, :PRIMING_LATENTS], on_step=self.on_step)  # output discarded
        self.primed = True

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [16, t, h, w] (the next ones of the stream) -> the frames to show."""
        self.prime()
        if self.finished:  # past the speech: nothing more to decode
            return latents.new_zeros(3, 0, latents.shape[2] * 8, latents.shape[3] * 8).float()
        frames = self.stream.decode(latents, on_step=self.on_step)
        if not self.started:
            frames = frames[:, self.drop_first:]
        self.started = True
        if self.remaining is not None:
            frames = frames[:, :self.remaining]
            self.remaining -= frames.shape[1]
        return frames

    def steps(self, latents: int) -> int:
        """Latents the VAE will decode for a stream of `latents` fed in blocks of 3, stopping
        once the spoken frames are out, priming included (call before decoding starts)."""
        decoded, frames = 0, 0
        while decoded < latents and (self.remaining is None or frames < self.remaining):
            block = min(LATENTS_PER_BLOCK, latents - decoded)
            # 4 frames a latent; the first block gives 3 fewer: a cold stream's first latent
            # makes 1 frame, a primed stream drops its first 3.
            lost = self.drop_first if self.motion is not None else FRAMES_PER_LATENT - 1
            frames += FRAMES_PER_LATENT * block - lost * (decoded == 0)
            decoded += block
        return decoded + (min(PRIMING_LATENTS, self.motion.shape[1]) if self.motion is not None else 0)
