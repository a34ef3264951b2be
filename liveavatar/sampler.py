"""LiveAvatar's few-step streaming sampler.

Flow matching with Euler steps on the shift-3 schedule (diffusers'
FlowMatchEulerDiscreteScheduler(shift=3), which the DMD-distilled LoRA was trained
for), run block by block: each block of 3 latent frames is denoised through all steps
before the next block starts, attending to the sink and to that step's KV ring.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .dit import FRAMES_PER_BLOCK, REFERENCE_TIME, LiveAvatarDiT, StepCache

NUM_TRAIN_TIMESTEPS = 1000
SHIFT = 3.0
MAX_STEPS = 6
VIDEO_FRAMES_PER_LATENT = 4
VIDEO_FRAMES_PER_BLOCK = FRAMES_PER_BLOCK * VIDEO_FRAMES_PER_LATENT  # 12
ROLLING_OFFSET_RANGE = (4, 30)  # the original's random.randint(4, 30)


def flow_schedule(steps: int, shift: float = SHIFT) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [steps], sigmas [steps + 1]) in float32, as diffusers computes them:
    timesteps evenly spaced from sigma_max to sigma_min (in units of 1000), shifted by
    s -> shift*s / (1 + (shift-1)*s), sigmas ending at 0."""
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"sample_steps must be between 1 and {MAX_STEPS} (the distilled model's range), got {steps}")

    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    n = NUM_TRAIN_TIMESTEPS
    sigma_max, sigma_min = shifted(1.0), shifted(1.0 / n)
    ts = torch.linspace(sigma_max * n, sigma_min * n, steps, dtype=torch.float64) / n
    sigmas = shifted(ts)
    timesteps = (sigmas * n).float()
    return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def check_infer_frames(infer_frames: int) -> int:
    if infer_frames <= 0 or infer_frames % VIDEO_FRAMES_PER_BLOCK:
        raise ValueError(f"infer_frames must be a positive multiple of {VIDEO_FRAMES_PER_BLOCK} "
                         f"(blocks of {FRAMES_PER_BLOCK} latent frames), got {infer_frames}")
    return infer_frames


class RollingOffset:
    """The rolling-sink distance d: the reference frame's RoPE time index is kept at
    least d latent frames ahead of the block (max(30, F_cur + d)). The original draws d
    uniformly from [4, 30] per forward with an unseeded RNG; we draw from the run's seed,
    or use a fixed value (parity tests)."""

    def __init__(self, seed: int, fixed: int | None = None):
        self.fixed = fixed
        self.rng = random.Random(seed)

    def next(self) -> int:
        return self.fixed if self.fixed is not None else self.rng.randint(*ROLLING_OFFSET_RANGE)

    @staticmethod
    def reference_time(frame_start: int, offset: int) -> int:
        return REFERENCE_TIME + max(0, frame_start - (REFERENCE_TIME - offset))


SEED_RANGE = 2 ** 64  # torch generators take seeds in [0, 2**64)


def clip_noise(seed: int, clip: int, shape, device) -> torch.Tensor:
    """Initial noise of one clip: a CPU generator seeded with seed + clip, so results do not
    depend on the device. The sum wraps modulo 2**64 (the node's seed goes up to 2**64 - 1)."""
    generator = torch.Generator().manual_seed((seed + clip) % SEED_RANGE)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


@dataclass
class StreamInputs:
    text: torch.Tensor  # [L, text_dim] real-token text embeddings
    ref_latent: torch.Tensor  # [16, 1, h, w]
    motion_latents: torch.Tensor  # [16, 19, h, w]
    audio: torch.Tensor  # [layers, audio_dim, frames at 25 fps], padded to whole clips


@dataclass
class StreamSettings:
    infer_frames: int = 48  # video frames per clip
    num_clip: int = 0  # 0 = until the audio ends
    steps: int = 4
    seed: int = 0
    rolling_offset: int | None = None  # fixed d (parity); None = drawn from the seed
    noise: torch.Tensor | None = None  # [clips, 16, F, h, w] to replace the seeded noise (parity)
    kv_fp8: bool | None = False  # KV caches in fp8 (half the memory); None = only if bf16 would not fit


@dataclass
class Block:
    clip: int
    index: int  # block index within the clip
    latents: torch.Tensor  # [16, 3, h, w] clean latents


def clips_to_generate(settings: StreamSettings, audio_frames: int) -> int:
    covered = math.ceil(audio_frames / settings.infer_frames)
    if covered == 0:
        raise ValueError("the audio features are empty: no clip to generate")
    return min(covered, settings.num_clip) if settings.num_clip > 0 else covered


class Streamer:
    """One streaming generation: prefilled sink, per-step KV rings, and the clip/block loop.

    Build it, then iterate `blocks()`; or call `predict` for a single block-step (tests)."""

    def __init__(self, model: LiveAvatarDiT, inputs: StreamInputs, settings: StreamSettings):
        self.model, self.inputs, self.settings = model, inputs, settings
        infer_frames = check_infer_frames(settings.infer_frames)
        self.timesteps, sigmas = flow_schedule(settings.steps)
        self.step_sizes = (sigmas[1:] - sigmas[:-1]).tolist()  # Euler: x += (sigma_next - sigma) * v
        self.latent_frames = infer_frames // VIDEO_FRAMES_PER_LATENT
        self.blocks_per_clip = self.latent_frames // FRAMES_PER_BLOCK
        self.num_clips = clips_to_generate(settings, inputs.audio.shape[-1])
        self.offsets = RollingOffset(settings.seed, settings.rolling_offset)
        _, _, h, w = inputs.ref_latent.shape
        self.latent_size = (h, w)
        with torch.no_grad():
            self.text_kv = model.text_context(inputs.text)
            self.step_mods = [model.time_modulation(t.repeat(FRAMES_PER_BLOCK)) for t in self.timesteps]
            self.sink = model.prefill_sink(inputs.ref_latent, inputs.motion_latents, self.text_kv)
            devices = [model.layer_device(i) for i in range(len(model.blocks))]
            ring = self.latent_frames * (h // 2) * (w // 2)
            dtype = self.sink.values[0].dtype
            fp8 = settings.kv_fp8 if settings.kv_fp8 is not None else not _fits(
                len(self.timesteps) * (self.sink.length + ring) * 2 * model.cfg.dim * dtype.itemsize, devices)
            self.kv_fp8 = fp8
            self.caches = [StepCache(self.sink.length, ring, model.cfg.num_heads, model.cfg.head_dim, devices, dtype, fp8)
                           for _ in self.timesteps]
            self._load_sink()

    def _load_sink(self):
        for cache in self.caches:
            cache.load_sink(self.sink)

    def clip_noise(self, clip: int) -> torch.Tensor:
        if self.settings.noise is not None:
            return self.settings.noise[clip].to(self.model.device, torch.float32)
        return clip_noise(self.settings.seed, clip, (16, self.latent_frames, *self.latent_size), self.model.device)

    def block_audio(self, clip: int, block: int):
        start = clip * self.settings.infer_frames + block * VIDEO_FRAMES_PER_BLOCK
        return self.model.audio_condition(self.inputs.audio[..., start:start + VIDEO_FRAMES_PER_BLOCK])

    def frame_start(self, clip: int, block: int) -> int:
        return (clip * self.blocks_per_clip + block) * FRAMES_PER_BLOCK

    def predict(self, x, step: int, clip: int, block: int, audio=None) -> torch.Tensor:
        """Flow prediction for one block at one step (writes that step's KV ring)."""
        audio = self.block_audio(clip, block) if audio is None else audio
        frame_start = self.frame_start(clip, block)
        ref_time = self.offsets.reference_time(frame_start, self.offsets.next())
        with torch.no_grad():
            return self.model.denoise_block(x, self.step_mods[step], audio, self.text_kv, self.sink,
                                            self.caches[step], frame_start, ref_time)

    def blocks(self, on_step: Callable[[], None] | None = None) -> Iterator[Block]:
        """Yield clean latent blocks in order. `on_step` runs after every block-step
        (progress, interruption: raise from it to stop)."""
        for clip in range(self.num_clips):
            noise = self.clip_noise(clip)
            for b in range(self.blocks_per_clip):
                audio = self.block_audio(clip, b)
                x = noise[:, b * FRAMES_PER_BLOCK:(b + 1) * FRAMES_PER_BLOCK]
                for step, dt in enumerate(self.step_sizes):
                    x = x + dt * self.predict(x, step, clip, b, audio)
                    if on_step:
                        on_step()
                yield Block(clip, b, x)
                if clip == 0 and b == 0:
                    first_clean_frame = x[:, :1]
            if clip == 0 and self.num_clips > 1:
                # Sink refresh (LiveAvatar's TPP loop): the first generated frame becomes the
                # reference, so later clips stay anchored to the generated identity.
                self.sink = None  # free the old sink first: peak memory stays that of clip 0
                with torch.no_grad():
                    self.sink = self.model.prefill_sink(first_clean_frame, self.inputs.motion_latents, self.text_kv)
                self._load_sink()

    def close(self):
        """Drop the caches and sink now (they hold most of the run's GPU memory)."""
        self.caches, self.sink, self.text_kv, self.step_mods = [], None, None, None

    @property
    def total_block_steps(self) -> int:
        return self.num_clips * self.blocks_per_clip * len(self.step_sizes)


def _fits(bytes_per_layer: int, devices, headroom: float = 0.85) -> bool:
    """Would KV caches of this size per layer fit in the free memory of each GPU?"""
    for device in set(devices):
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if bytes_per_layer * sum(d == device for d in devices) > headroom * free:
                return False
    return True


def stream(model: LiveAvatarDiT, inputs: StreamInputs, settings: StreamSettings,
           on_step: Callable[[], None] | None = None) -> Iterator[Block]:
    """Convenience: `Streamer(model, inputs, settings).blocks(on_step)`."""
    return Streamer(model, inputs, settings).blocks(on_step)
