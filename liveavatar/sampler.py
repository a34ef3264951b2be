"""LiveAvatar's few-step streaming sampler.

Flow matching with Euler steps on the shift-3 schedule (diffusers'
FlowMatchEulerDiscreteScheduler(shift=3), which the DMD-distilled LoRA was trained
for), run block by block: each block of 3 latent frames is denoised through all steps,
attending to the sink and to that step's KV ring; consecutive blocks overlap in a
diagonal schedule (see Streamer).
"""
from __future__ import annotations

import math
import random
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch

from .dit import FRAMES_PER_BLOCK, MOTION_BUCKETS, REFERENCE_TIME, BlockStep, LiveAvatarDiT
from .feature_timeline import FeatureTimeline
from .graphs import TickGraphs
from .kvcache import BlockStepKV, SinkStore, StepRings
from .memory import GIB, MemoryPlan, RunShape, plan_memory
from .placement import OneDevice
from .vae import LATENT_CHANNELS

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
    in block-then-step order whatever order the block-steps run in (so the pipelined and
    sequential schedules, and a continued run, see the same draws), or use a fixed value."""

    def __init__(self, seed: int, fixed: int | None = None):
        self.fixed = fixed
        self.rng = random.Random(seed)
        self.draws: list[int] = []

    def at(self, index: int) -> int:
        """d of the index-th block-step in sequential order (block * steps + step)."""
        if self.fixed is not None:
            return self.fixed
        while len(self.draws) <= index:
            self.draws.append(self.rng.randint(*ROLLING_OFFSET_RANGE))
        return self.draws[index]

    @staticmethod
    def reference_time(frame_start: int, offset: int) -> int:
        return REFERENCE_TIME + max(0, frame_start - (REFERENCE_TIME - offset))


SEED_RANGE = 2 ** 64  # torch generators take seeds in [0, 2**64)


def clip_noise(seed: int, clip: int, shape, device) -> torch.Tensor:
    """Initial noise of one clip: a CPU generator seeded with seed + clip, so results do not
    depend on the device. The sum wraps modulo 2**64 (the node's seed goes up to 2**64 - 1)."""
    generator = torch.Generator().manual_seed((seed + clip) % SEED_RANGE)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return _to_device(noise, torch.device(device))


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor to `device` without a stream sync (through pinned memory on CUDA)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass
class StreamInputs:
    text: torch.Tensor  # [L, text_dim] real-token text embeddings
    ref_latent: torch.Tensor  # [16, 1, h, w]
    motion_latents: torch.Tensor  # [16, 19, h, w]
    # [layers, audio_dim, frames at 25 fps], padded to whole clips; a live stream's: the whole
    # blocks it starts with (may be none), the rest comes by Streamer.append_audio
    audio: torch.Tensor


@dataclass
class StreamSettings:
    infer_frames: int = 48  # video frames per clip
    num_clip: int = 0  # 0 = until the audio ends
    steps: int = 4
    seed: int = 0
    rolling_offset: int | None = None  # fixed d (parity); None = drawn from the seed
    noise: torch.Tensor | None = None  # [clips, 16, F, h, w] to replace the seeded noise (parity)
    kv_fp8: bool | None = None  # KV caches in fp8 (half the memory); None = fp8 for 16-bit models (bf16/fp8 weights)
    pipelined: bool = True  # diagonal schedule (see Streamer); False = one block's steps after another
    # The first block's steps run alone, the others join once it is clean: its latents come out
    # after 4 one-block ticks instead of the 1+2+3+4 block-steps of the diagonal ramp, and no
    # later block is later than in the plain diagonal (block 1 is clean after the same work).
    first_block_alone: bool = True
    memory_cap_gib: float | None = None  # GPU memory the run may use, per GPU (None/0: the free memory)
    reserve_gib: float = 0.0  # the caller's working memory on the main GPU meanwhile (VAE decode, audio encoder)
    adapt_offload: bool = True  # an Offload placement may move blocks between host and GPU to fit (memory.py)


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


@dataclass
class _Replica:
    """What one model copy holds for a run, on its own devices: text K/V, the modulation of
    the steps it runs, and the sinks by phase (0: the portrait; 1: refreshed after clip 0)."""

    model: LiveAvatarDiT
    text_kv: list
    step_mods: dict
    sinks: dict = field(default_factory=dict)


@dataclass
class _Job:
    """A block in flight: its global index, the next step it runs, its latents and audio."""

    index: int
    step: int
    x: torch.Tensor
    audio: tuple
    rope_cache: dict = field(default_factory=dict)  # the block's RoPE tables, built at its first step


class Streamer:
    """One streaming generation: prefilled sink, per-step KV rings, and the block loop.

    Block g at step s needs the sink and the step-s K/V of blocks < g, which block g-1
    wrote at its own step s. So the schedule is diagonal (LiveAvatar's timestep-forcing
    pipeline): at every tick each block in flight advances one step and a new block enters
    at step 0; the tick's block-steps (up to one per step) run as one batched forward per
    model copy, so offloaded weights are streamed once per tick and several GPUs (one
    copy each) work on different steps at once. Clip 1 waits for block 0 to be clean: its
    first frame becomes the refreshed sink. Results equal the sequential order
    (`pipelined=False`) up to float rounding.

    Build it, iterate `blocks()`; `extend()` appends audio for more clips and the next
    `blocks()` goes on from the same state (a continued video); `predict` runs one
    block-step (tests).

    Live (`live=True`): the audio comes while the stream runs, a block at a time
    (`append_audio`, 12 frames each), until `end_audio()`. Each block starts at the first tick
    at which the schedule lets it start and its audio is in (asking `blocks(on_audio=...)`
    for more first); the loop is the same, so the same features give the same latents
    whether they came at once or block by block in time."""

    def __init__(self, model: LiveAvatarDiT, inputs: StreamInputs, settings: StreamSettings, live: bool = False):
        self.model, self.inputs, self.settings = model, inputs, settings
        infer_frames = check_infer_frames(settings.infer_frames)
        self.timesteps, sigmas = flow_schedule(settings.steps)
        self.step_sizes = (sigmas[1:] - sigmas[:-1]).tolist()  # Euler: x += (sigma_next - sigma) * v
        self.latent_frames = infer_frames // VIDEO_FRAMES_PER_LATENT
        self.blocks_per_clip = self.latent_frames // FRAMES_PER_BLOCK
        self.live = self.audio_open = live  # audio_open: a live stream's audio may still come
        self.audio = FeatureTimeline(inputs.audio)
        if live:
            _check_whole_blocks(inputs.audio)
            self.num_clips = math.ceil(self.audio.end / infer_frames)  # clips with audio so far
        else:
            self.num_clips = clips_to_generate(settings, inputs.audio.shape[-1])
        self.next_block = 0  # global index of the next block to start
        self.failed = False
        self.first_clean_frame = None  # [16, 1, h, w] once block 0 is clean: the refreshed sink's reference
        self._pool = None  # threads driving several model copies, made on first use
        self.graphs = None  # the steady ticks' CUDA graphs (TickGraphs), where they apply
        self.offsets = RollingOffset(settings.seed, settings.rolling_offset)
        _, _, h, w = inputs.ref_latent.shape
        self.latent_size = (h, w)
        self._noise = {}
        self.plan = self._plan_memory(model, settings, h, w)  # before any long work: a clear error if it cannot fit
        with torch.no_grad():
            self._prepare(model, inputs, settings, h * w // 4)
        self.graphs = self._tick_graphs()

    def _plan_memory(self, model, settings, h: int, w: int) -> MemoryPlan:
        shape = RunShape(h, w, settings.infer_frames, len(self.timesteps), settings.pipelined, refresh=self._multi_clip(),
                         text_tokens=min(self.inputs.text.shape[0] + 1, model.cfg.text_len))
        kv_fp8 = settings.kv_fp8 if settings.kv_fp8 is not None else _sixteen_bit(model)
        plan = plan_memory(model, shape, kv_fp8, settings.memory_cap_gib, int(settings.reserve_gib * GIB),
                           settings.adapt_offload)
        plan.apply(model)
        return plan

    def _prepare(self, model, inputs, settings, frame_tokens: int):
        self.frame_tokens = frame_tokens
        self.kv_fp8 = self.plan.kv_fp8
        self._build_replicas(model, inputs)
        self._build_caches(model.cfg, ring=self.latent_frames * frame_tokens)

    def _build_replicas(self, model, inputs):
        """Per model copy: text K/V, the portrait's sink, the modulation of the steps it runs."""
        step_models = model.step_models(len(self.timesteps))
        replicas = {}
        for step, (m, t) in enumerate(zip(step_models, self.timesteps)):
            if id(m) not in replicas:
                text_kv = m.text_context(inputs.text)
                sink = m.prefill_sink(inputs.ref_latent, inputs.motion_latents, text_kv, SinkStore(self.kv_fp8))
                replicas[id(m)] = _Replica(m, text_kv, {}, {0: sink})
            replicas[id(m)].step_mods[step] = m.time_modulation(t.repeat(FRAMES_PER_BLOCK))
        self.replicas = list(replicas.values())
        self.step_replica = [replicas[id(m)] for m in step_models]

    def _build_caches(self, cfg, ring: int):
        """A ring per step, in one StepRings per model copy (on its layer devices)."""
        layer_devices = [[r.model.layer_device(i) for i in range(len(r.model.blocks))] for r in self.step_replica]
        dtype = self.replicas[0].sinks[0].dtype  # the compute dtype
        self.caches = [None] * len(self.step_replica)
        for replica in self.replicas:
            steps = self._steps_of(replica)
            group = StepRings(len(steps), ring, cfg.num_heads, cfg.head_dim, layer_devices[steps[0]], dtype, self.kv_fp8)
            for step, view in zip(steps, group.views()):
                self.caches[step] = view

    def _tick_graphs(self) -> TickGraphs | None:
        """CUDA graphs of the steady ticks (graphs.py), where they apply: one model copy on one GPU,
        all its layers in place, room for the graphs' activations in the memory plan."""
        model = self.model
        if (model.options.cuda_graphs == "off" or model.device.type != "cuda" or len(self.replicas) != 1
                or not (model.placement is None or isinstance(model.placement, OneDevice))
                or not self.plan.room_for_graphs()):
            return None
        replica = self.replicas[0]
        return TickGraphs(replica.model, replica.text_kv, self.plan.ffn_rows, self.plan.attention_items)

    def _steps_of(self, replica: _Replica) -> list[int]:
        return [step for step, r in enumerate(self.step_replica) if r is replica]

    # ---- per block ------------------------------------------------------------------------
    def clip_noise(self, clip: int) -> torch.Tensor:
        if self.settings.noise is not None:
            return self.settings.noise[clip].to(self.model.device, torch.float32)
        shape = (LATENT_CHANNELS, self.latent_frames, *self.latent_size)
        return clip_noise(self.settings.seed, clip, shape, self.model.device)

    def block_audio(self, clip: int, block: int, model: LiveAvatarDiT | None = None):
        start = clip * self.settings.infer_frames + block * VIDEO_FRAMES_PER_BLOCK
        model = model or self.model
        return model.audio_condition(_to_device(self.audio.take(start, VIDEO_FRAMES_PER_BLOCK), model.device))

    def frame_start(self, clip: int, block: int) -> int:
        return (clip * self.blocks_per_clip + block) * FRAMES_PER_BLOCK

    def _block_step(self, job: _Job) -> BlockStep:
        """The DiT input of `job`'s next step, on the devices of that step's model copy."""
        step, replica = job.step, self.step_replica[job.step]
        clip, block = divmod(job.index, self.blocks_per_clip)
        frame_start = self.frame_start(clip, block)
        ref_time = self.offsets.reference_time(frame_start, self.offsets.at(job.index * len(self.timesteps) + step))
        kv = BlockStepKV(self.caches[step], replica.sinks[min(clip, 1)], ref_time, frame_start * self.frame_tokens)
        device = replica.model.device
        # non_blocking: the latents/audio come from another GPU's stream, the host must not wait for it
        return BlockStep(job.x.to(device, non_blocking=True), replica.step_mods[step],
                         tuple(a.to(device, non_blocking=True) for a in job.audio), kv, frame_start, job.rope_cache)

    def predict(self, x, step: int, clip: int, block: int, audio=None) -> torch.Tensor:
        """Flow prediction for one block at one step (writes that step's KV ring)."""
        replica = self.step_replica[step]
        audio = self.block_audio(clip, block, replica.model) if audio is None else audio
        job = _Job(clip * self.blocks_per_clip + block, step, x, audio)
        with torch.no_grad():
            return replica.model.denoise([self._block_step(job)], replica.text_kv, self.plan.ffn_rows,
                                         self.plan.attention_items)[0]

    # ---- the loop ---------------------------------------------------------------------------
    def blocks(self, on_step: Callable[[], None] | None = None,
               on_audio: Callable[[bool], None] | None = None) -> Iterator[Block]:
        """Yield clean latent blocks in order. `on_step` runs after every block-step
        (progress, interruption: raise from it to stop). Live: `on_audio(wait)` runs when the
        next block may start but its audio is not in; it may append audio or end it; with
        `wait` nothing else can run (no block in flight), so it should block a little for
        audio to come (then it is asked again) or raise to stop."""
        if self.failed:
            raise RuntimeError("this Streamer was stopped by an error or a cancel and its caches are inconsistent: "
                               "build a new Streamer to generate again")
        in_flight: list[_Job] = []
        try:
            with torch.no_grad():
                while self._more_to_start() or in_flight:
                    index = self.next_block
                    if self._more_to_start() and self._may_start(index, in_flight) \
                            and self._audio_in(index, on_audio, wait=not in_flight):
                        in_flight.append(self._start(index))
                        self.next_block += 1
                    if not in_flight:  # waiting for a live stream's audio
                        continue
                    self._tick(in_flight, on_step)
                    if in_flight[0].step == len(self.timesteps):
                        yield self._finish(in_flight.pop(0), in_flight)
        except BaseException:
            self.failed = True
            raise

    def _blocks_to_run(self) -> int | None:
        """Blocks this run generates, as far as known (None: a live stream whose audio may still come)."""
        if not self.live:
            return self.num_clips * self.blocks_per_clip
        return None if self.audio_open else self.audio.end // VIDEO_FRAMES_PER_BLOCK

    def _more_to_start(self) -> bool:
        total = self._blocks_to_run()
        return total is None or self.next_block < total

    def _multi_clip(self) -> bool:
        """Whether a clip after the first may run (it needs the refreshed sink)."""
        if self.live:
            return self.audio_open or self.audio.end > self.settings.infer_frames
        return self.num_clips > 1

    def _audio_in(self, index: int, on_audio, wait: bool) -> bool:
        """Whether block `index`'s audio is in, after asking `on_audio` for it on a live stream."""
        needed = (index + 1) * VIDEO_FRAMES_PER_BLOCK
        if not self.live or self.audio.end >= needed:
            return True
        if on_audio is not None:
            on_audio(wait)
        elif wait:
            raise RuntimeError(f"block {index}'s audio is not in and no block is in flight: append it "
                               "(append_audio), end the audio (end_audio), or give blocks() an on_audio callback")
        return self.audio.end >= needed

    def append_audio(self, features: torch.Tensor):
        """Live: append the features [layers, audio_dim, frames] of the next whole blocks (12 frames each)."""
        if not self.live or not self.audio_open:
            raise RuntimeError("append_audio() feeds a live stream whose audio has not ended "
                               "(Streamer(..., live=True), before end_audio())")
        _check_whole_blocks(features)
        self.audio.append(features)
        self.num_clips = math.ceil(self.audio.end / self.settings.infer_frames)

    def end_audio(self):
        """Live: no more audio; the stream ends with the blocks whose audio is in."""
        self.audio_open = False

    def _may_start(self, index: int, in_flight: list[_Job]) -> bool:
        if not self.settings.pipelined or (self.settings.first_block_alone and in_flight and in_flight[0].index == 0):
            return not in_flight
        return index < self.blocks_per_clip or 1 in self.replicas[0].sinks  # clip >= 1 needs the refreshed sink

    def _start(self, index: int) -> _Job:
        clip, block = divmod(index, self.blocks_per_clip)
        if block == 0:
            self._noise[clip] = self.clip_noise(clip)
        noise = self._noise[clip][:, block * FRAMES_PER_BLOCK:(block + 1) * FRAMES_PER_BLOCK]
        if block == self.blocks_per_clip - 1:
            del self._noise[clip]
        audio = self.block_audio(clip, block, self.step_replica[0].model)
        self.audio.release((index + 1) * VIDEO_FRAMES_PER_BLOCK)  # (a live stream's parts: one block each)
        return _Job(index, 0, noise, audio)

    def _tick(self, in_flight: list[_Job], on_step):
        """One step of every block in flight: one batched forward per model copy. Several
        copies (one per GPU) are driven from one thread each, so that every GPU gets its
        kernels queued while the others compute (the host never waits on a GPU here)."""
        self.offsets.at((in_flight[-1].index + 1) * len(self.timesteps))  # draw here, not from the threads
        groups = {}
        for job in in_flight:
            groups.setdefault(id(self.step_replica[job.step]), []).append(job)
        groups = list(groups.values())
        if len(groups) == 1:
            self._advance(groups[0])
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(len(self.replicas), thread_name_prefix="liveavatar-gpu")
            for future in [self._pool.submit(self._advance, jobs) for jobs in groups]:
                future.result()
        for _ in in_flight:
            if on_step:
                on_step()

    def _advance(self, jobs: list[_Job]):
        """Jobs that one model copy runs: their next step, as one forward, then the Euler update."""
        replica = self.step_replica[jobs[0].step]
        device = replica.model.device
        placement = replica.model.placement
        jobs = sorted(jobs, key=lambda job: job.step)  # consecutive steps: one attention call (kvcache.TickKV)
        with torch.no_grad(), (torch.cuda.device(device) if device.type == "cuda" else nullcontext()):
            items = [self._block_step(job) for job in jobs]
            # Layers sharded over GPUs: one item at a time, so that while the last GPU runs
            # item j the first already runs item j+1 (the tick's block-steps pipeline through).
            batches = [[item] for item in items] if placement and placement.micro_batches else [items]
            flows = [flow for batch in batches for flow in self._denoise(replica, batch)]
            for job, item, flow in zip(jobs, items, flows):
                job.x = item.latents + self.step_sizes[job.step] * flow
                job.step += 1

    def _denoise(self, replica: _Replica, items: list[BlockStep]) -> torch.Tensor:
        if self.graphs is not None:
            return self.graphs.denoise(items, lasting=self._lasting(items))
        return replica.model.denoise(items, replica.text_kv, self.plan.ffn_rows, self.plan.attention_items)

    def _lasting(self, items: list[BlockStep]) -> bool:
        """Whether a tick like this may come again (worth a CUDA graph): not while the stream
        drains (each tick a block-step shorter), nor on the portrait's sink about to be replaced."""
        portrait = self.replicas[0].sinks.get(0)
        return self._more_to_start() and not (self._multi_clip() and any(i.kv.sink is portrait for i in items))

    def _finish(self, job: _Job, in_flight: list[_Job]) -> Block:
        clip, block = divmod(job.index, self.blocks_per_clip)
        if job.index == 0:
            self.first_clean_frame = job.x[:, :1]
        clip0_done = self.next_block >= self.blocks_per_clip and not any(j.index < self.blocks_per_clip for j in in_flight)
        # The pipelined schedule refreshes as soon as block 0 is clean (clip 1 waits for it) when
        # the memory plan lets both sinks be held while clip 0 finishes; the sequential one (or a
        # tight plan: the pipeline drains once) after clip 0, as the original does.
        early = self.settings.pipelined and self.plan.sink_overlap
        if self._multi_clip() and 1 not in self.replicas[0].sinks and (early or clip0_done):
            self._refresh_sink(drop_portrait_first=clip0_done)
        elif clip0_done:
            self._drop_portrait_sink()
        return Block(clip, block, job.x)

    def _refresh_sink(self, drop_portrait_first: bool):
        """LiveAvatar's sink refresh (TPP loop): the first generated frame becomes the
        reference, so later clips stay anchored to the generated identity. Clip-0 blocks
        still to run keep the portrait's sink (both are held until they are done); with none,
        it is freed first."""
        if drop_portrait_first:
            self._drop_portrait_sink()
        for replica in self.replicas:
            m = replica.model
            replica.sinks[1] = m.prefill_sink(self.first_clean_frame.to(m.device), self.inputs.motion_latents,
                                              replica.text_kv, SinkStore(self.kv_fp8))

    def _drop_portrait_sink(self):
        for replica in self.replicas:
            sink = replica.sinks.pop(0, None)
            if sink is not None and self.graphs is not None:
                self.graphs.drop_sink(sink)

    def extend(self, audio: torch.Tensor, num_clip: int = 0):
        """Append audio features [layers, audio_dim, frames] (padded to whole clips) for more
        clips; the next `blocks()` continues the video from where the last one stopped, as
        if the whole audio had been given at once."""
        if self.failed or not self.caches:
            raise RuntimeError("this Streamer cannot continue (stopped by an error, a cancel, or closed): start a new one")
        if self.live:
            raise RuntimeError("a live stream takes more audio by append_audio(), not extend()")
        if self.next_block != self.num_clips * self.blocks_per_clip:
            raise RuntimeError("extend() continues a finished run: iterate blocks() to the end first")
        self.audio.truncate(self.num_clips * self.settings.infer_frames)  # features past the last clip run
        self.audio.append(audio.to(self.inputs.audio))
        settings = StreamSettings(infer_frames=self.settings.infer_frames, num_clip=num_clip)
        if self.num_clips == 1:
            with torch.no_grad():
                self._refresh_sink(drop_portrait_first=True)
        self.num_clips += clips_to_generate(settings, audio.shape[-1])

    def close(self):
        """Drop the caches and sinks now (they hold most of the run's GPU memory)."""
        self.caches, self.replicas, self.step_replica, self._noise = [], [], [], {}
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    @property
    def total_block_steps(self) -> int | None:
        """Block-steps of the whole run (None: a live stream whose audio may still come)."""
        blocks = self._blocks_to_run()
        return None if blocks is None else blocks * len(self.step_sizes)

    @property
    def block_steps_done(self) -> int:
        """Block-steps of the blocks already yielded (between runs of blocks(): all started ones)."""
        return self.next_block * len(self.step_sizes)


def _check_whole_blocks(features: torch.Tensor):
    if features.dim() != 3 or features.shape[-1] % VIDEO_FRAMES_PER_BLOCK:
        raise ValueError(f"a live stream's audio features come in whole blocks of {VIDEO_FRAMES_PER_BLOCK} frames "
                         f"([layers, audio_dim, 12 k]), got {tuple(features.shape)}")


def _sixteen_bit(model: LiveAvatarDiT) -> bool:
    """fp8 KV caches by default where the model computes in 16 bits (bf16/fp8 weights): their
    rounding error is of the size of the computation's own; an fp32 model keeps fp32 caches."""
    return model.head.head.compute_dtype in (torch.bfloat16, torch.float16)


def stream(model: LiveAvatarDiT, inputs: StreamInputs, settings: StreamSettings,
           on_step: Callable[[], None] | None = None) -> Iterator[Block]:
    """Convenience: `Streamer(model, inputs, settings).blocks(on_step)`."""
    return Streamer(model, inputs, settings).blocks(on_step)


def warm_up(model: LiveAvatarDiT, height: int, width: int, settings: StreamSettings | None = None,
            clips: int = 2, on_step: Callable[[], None] | None = None) -> int:
    """A throw-away run at a video size (pixels), so that the first real run there finds every
    kernel compiled (Triton), every library handle made (cuBLAS) and every attention plan built
    (cuDNN, one per sequence length: the rings grow through the first clip, then stay full):
    what a first run after start would otherwise pay before its first frame. Synthetic inputs
    (zero prompt, audio and latents); the model is left as it was. Returns the block-steps run."""
    cfg, settings = model.cfg, replace(settings or StreamSettings(), num_clip=clips, seed=0)
    frames = clips * settings.infer_frames
    h, w = height // 8, width // 8  # the VAE's spatial stride
    inputs = StreamInputs(text=torch.zeros(8, cfg.text_dim), ref_latent=torch.zeros(LATENT_CHANNELS, 1, h, w),
                          motion_latents=torch.zeros(LATENT_CHANNELS, sum(MOTION_BUCKETS), h, w),
                          audio=torch.zeros(cfg.audio_layers, cfg.audio_dim, frames))
    streamer = Streamer(model, inputs, settings)
    try:
        for _ in streamer.blocks(on_step):
            pass
        return streamer.total_block_steps
    finally:
        streamer.close()
