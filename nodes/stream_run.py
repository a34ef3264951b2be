"""One LiveAvatar generation as the Sampler and Live Video nodes run it: the inputs checked
before any long work, the model (and VAE) loaded through ComfyUI, a new stream or a continued
one, the block loop with progress and cancel, the cleanup, and the LATENT it returns.

    run = StreamRun("LiveAvatar Sampler", model, positive, ...)   # checks only
    run.start(decode=False)                                       # models loaded, stream set up
    latents = torch.cat([b.latents for b in run.blocks(on_cpu=True)], dim=1)  # copied alongside, previewed
    return run.output(latents)                                    # LATENT (+ what the UI shows)
"""
from __future__ import annotations

import logging
import weakref
from typing import Iterator

import torch

from ..liveavatar import StreamInputs, StreamSettings, Streamer
from ..liveavatar.audio import VIDEO_FPS
from ..liveavatar.decoding import DROPPED_FIRST_FRAMES, PRIMING_LATENTS
from ..liveavatar.dit import FRAMES_PER_BLOCK, MOTION_VIDEO_FRAMES
from ..liveavatar.memory import GIB, vae_decode_bytes
from ..liveavatar.overlap import latents_on_cpu
from ..liveavatar.portrait import parse_area, prepare_portrait
from ..liveavatar.sampler import VIDEO_FRAMES_PER_BLOCK, VIDEO_FRAMES_PER_LATENT, check_infer_frames, flow_schedule
from ..liveavatar.vae import normalised_to_raw, raw_to_normalised

from . import host
from .conditioning import image_tensor, text_embeddings
from .continuation import (APPROXIMATE, EXACT, INFO, SAMPLES, StreamHandle, StreamKey, digest, previous_part,
                           speech_after_video)
from .vae_adapter import encode_portrait, streaming_vae, vae_patcher

log = logging.getLogger("LiveAvatar")
FPS = VIDEO_FPS  # 25 video frames per second
MOTION_LATENTS = (MOTION_VIDEO_FRAMES + VIDEO_FRAMES_PER_LATENT - 1) // VIDEO_FRAMES_PER_LATENT  # 19
SIZE_PRESETS = ["384*256", "688*368", "704*384", "720*400", "custom"]
INFER_FRAMES = {"default": 48, "min": VIDEO_FRAMES_PER_BLOCK, "max": 240, "step": VIDEO_FRAMES_PER_BLOCK}


class PortraitMemo:
    """A node's last portrait encoding, kept on the node object between runs (as ComfyUI's
    LoraLoader keeps its last file): a run with the same VAE and the same portrait pixels (after
    the crop to the size) takes the latents again instead of encoding 73 still frames once more
    (the largest part of the time to the first frame at 704*384). Kept in CPU memory."""

    def __init__(self):
        self.pixels, self.vae, self.latents = None, None, None  # vae: a weak reference, set with the latents

    def encode(self, core_vae, vae, portrait: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = digest(portrait)
        if self.latents is not None and self.pixels == pixels and self.vae() is core_vae:
            return tuple(t.to(vae.device) for t in self.latents)
        latents = encode_portrait(vae, portrait)
        self.pixels, self.vae, self.latents = pixels, weakref.ref(core_vae), tuple(t.cpu() for t in latents)
        return latents


def portrait_memo(node) -> PortraitMemo:
    """The PortraitMemo a node object keeps between runs."""
    return node.__dict__.setdefault("portrait_memo", PortraitMemo())


class StreamRun:
    """A Sampler or Live Video run (see module docstring). After start(): `streamer`, `mode`
    (None for a first part, "exact" or "approximate" for a continuation), `notes` (what the
    user should know), `vae` (the engine VAE, when asked for or needed), `priming` (the
    latents the decoder starts from) and `video_frames` (frames of this part that carry speech)."""

    def __init__(self, label, model, positive, image, vae, audio_features, size, width, height, infer_frames,
                 num_clip, sample_steps, seed, continue_from=None, keep_state=False, live=False, portraits=None):
        cfg = model.dit.cfg
        self.label, self.model, self.core_vae, self.keep, self.live = label, model, vae, keep_state, live
        self.portraits = portraits or PortraitMemo()  # the node's last portrait encoding (portrait_memo)
        self.text = text_embeddings(positive, cfg.text_len)
        check_infer_frames(infer_frames)
        flow_schedule(sample_steps)  # the steps' range
        if live:  # a live session's stream: no audio yet, its blocks come as they are spoken
            self.features, self.speech_frames, self.speech = torch.zeros(cfg.audio_layers, cfg.audio_dim, 0), 0, None
        else:
            self.features, self.speech_frames = audio_features.per_frame(infer_frames)
            check_audio_width(self.features, cfg)
            self.speech = getattr(audio_features, "speech", None)
        self.previous = previous_part(continue_from)
        self.notes = host.NodeNotes()  # what the user should know, shown on the node as it comes
        picture = image_tensor(image, self.notes)
        self.portrait = prepare_portrait(picture, width * height if size == "custom" else parse_area(size))
        self.settings = StreamSettings(infer_frames=infer_frames, num_clip=num_clip, steps=sample_steps, seed=seed,
                                       kv_fp8=model.kv_fp8, memory_cap_gib=model.memory_cap_gib)
        self.key = StreamKey(model.lora_strength, digest(self.text), digest(picture),
                             tuple(self.portrait.shape[:-3:-1]), infer_frames, sample_steps, tuple(self.features.shape[:2]))
        self.streamer = self.mode = self.vae = self.handle = self.priming = None

    # ---- set-up ------------------------------------------------------------------------
    def start(self, decode: bool = False, also=()) -> "StreamRun":
        """Load the models through ComfyUI (the VAE too when decoding or encoding the portrait,
        and the ComfyUI models in `also`, in the same request) and set up the stream: a new one
        from the portrait, the kept state of the run this one continues, or (without it) a new
        one from that run's last latents."""
        fresh = self.previous is None
        if decode:  # the VAE decodes alongside the DiT: the memory plan leaves it its working memory
            height, width = self.portrait.shape[-2:]
            self.settings.reserve_gib = vae_decode_bytes(width, height) / GIB
        self.model.prepare(also=[vae_patcher(self.core_vae), *also] if decode or fresh else list(also))
        if decode or fresh:
            self.vae = streaming_vae(self.core_vae)
        if fresh:
            ref_latent, motion_latents = self.portraits.encode(self.core_vae, self.vae, self.portrait)
            self.streamer = self._new_stream(ref_latent, motion_latents)
            self.priming = motion_latents
        else:
            self.priming = raw_to_normalised(self.previous[SAMPLES][0, :, -PRIMING_LATENTS:])
            self._continue()
        if self.keep:
            self.notes.add("keep_state: the streaming state stays in GPU memory for an exact continuation, until "
                              "its LATENT is dropped, a continuation uses it, or ComfyUI frees memory")
        return self

    def _new_stream(self, ref_latent, motion_latents) -> Streamer:
        return Streamer(self.model.dit, StreamInputs(self.text, ref_latent, motion_latents, self.features),
                        self.settings, live=self.live)

    def _continue(self):
        handle = self.previous.get("state")
        if not isinstance(handle, StreamHandle):  # None, or a LATENT saved by an older version
            streamer, why = None, "the run it continues did not keep its state (keep_state was off)"
        else:
            streamer, why = self.model.weights.kept.take(handle, self.key)
        if streamer is not None:
            try:
                streamer.extend(self.features, self.settings.num_clip)
            except BaseException:
                streamer.close()
                raise
            self.streamer, self.mode = streamer, EXACT
            self.notes.add("continued exactly: the run it continues kept its state; the two parts equal one run "
                              "over the whole speech")
            if streamer.settings.seed != self.settings.seed:
                self.notes.add(f"the seed input ({self.settings.seed}) is not used: the continued stream keeps "
                                  f"the seed it started with ({streamer.settings.seed})")
            return
        reference, motion = approximate_history(self.previous)
        self.streamer, self.mode = self._new_stream(reference, motion), APPROXIMATE
        self.notes.add(f"continued approximately, from the last {MOTION_LATENTS} latents and the reference frame "
                          f"of the video it continues (not the same video one run gives), because its exact state "
                          f"could not be used: {why}")

    # ---- the loop ----------------------------------------------------------------------
    def blocks(self, on_cpu: bool = False, on_audio=None, progress_steps: int | None = None) -> Iterator:
        """The stream's clean blocks (progress, cancel, cleanup, `on_cpu`: stream_blocks); once
        all are out, the state is kept if asked (its handle goes into the LATENT). A live stream
        asks `on_audio` for its audio (Streamer.blocks)."""
        yield from stream_blocks(self.streamer, self.label, keep=self.keep, on_cpu=on_cpu, on_audio=on_audio,
                                 progress_steps=progress_steps)
        if self.keep:
            self.handle = self.model.weights.kept.keep(self.streamer, self.key)

    @property
    def latent_frames_to_make(self) -> int:
        streamer = self.streamer
        return (streamer.num_clips * streamer.blocks_per_clip - streamer.next_block) * FRAMES_PER_BLOCK

    @property
    def lead_in(self) -> dict | None:
        """The speech before this part's own (a continuation's: the previous part's last)."""
        return self.previous.get("speech_after_video") if self.previous is not None else None

    @property
    def drop_first(self) -> int:
        """Frames the decoder drops after its priming: LiveAvatar's first 3 after the portrait;
        none after the end of the video this part continues (its next frames follow)."""
        return DROPPED_FIRST_FRAMES if self.previous is None else 0

    @property
    def video_frames(self) -> int:
        """Frames of this part's video that carry speech: a continued part's video starts
        DROPPED_FIRST_FRAMES before its speech (with the previous part's last speech)."""
        return self.speech_frames + (DROPPED_FIRST_FRAMES if self.previous is not None else 0)

    # ---- the output --------------------------------------------------------------------
    def output(self, latents: torch.Tensor) -> dict:
        """The LATENT for clean latents [16, frames, h, w] of this run. ComfyUI's LATENT holds
        raw VAE means (its Wan latent format normalises inside the model); the DiT works in
        normalised space, so they are converted here."""
        continues = self.previous is not None
        reference = self.previous.get("reference") if continues else None
        info = {"fps": FPS, "video_frames": self.video_frames,
                # the refreshed-sink reference of the whole video, for an approximate continuation
                "reference": (reference if reference is not None else self.streamer.first_clean_frame).float().cpu(),
                # what the decoder is primed with: the portrait, or the end of the video this one continues
                "motion_latents": self.priming.float().cpu(), "continues": continues,
                "continuation": self.mode, "note": " ".join(self.notes.lines),
                "speech_after_video": speech_after_video(self.speech, latents.shape[1] * VIDEO_FRAMES_PER_LATENT, FPS),
                "lead_in_audio": self.lead_in}
        if self.handle is not None:
            info["state"] = self.handle
        return {SAMPLES: normalised_to_raw(latents).unsqueeze(0), INFO: info}

    def ui(self) -> dict:
        """Its notes for the output message (they were shown under the node as they came)."""
        if not self.notes.lines:
            return {}
        return {"text": [f"{self.label}: " + " ".join(self.notes.lines)]}


def check_audio_width(features: torch.Tensor, cfg):
    """Per-frame features [layers, width, frames] must be what the model's audio encoder takes."""
    layers, width = features.shape[:2]
    if (layers, width) != (cfg.audio_layers, cfg.audio_dim):
        raise ValueError(f"audio_features hold {layers} hidden states of width {width}, but this model takes "
                         f"{cfg.audio_layers} of width {cfg.audio_dim} (from the audio encoder it was trained "
                         "with): encode the speech with wav2vec2_large_english_fp16.safetensors in AudioEncoderLoader")


def approximate_history(previous: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference and motion latents for a continuation without the kept state: the previous
    run's reference (its first generated frame, as LiveAvatar's sink refresh uses) and its
    last 19 latents as motion history, as LiveAvatar carries them between clips."""
    latents = raw_to_normalised(previous[SAMPLES][0].float())
    reference = previous.get("reference")
    if reference is None:
        reference = latents[:, :1]
    return reference, latents[:, -MOTION_LATENTS:]


def stream_blocks(streamer: Streamer, label: str, keep: bool = False, on_cpu: bool = False, on_audio=None,
                  progress_steps: int | None = None) -> Iterator:
    """Yield `streamer.blocks(on_audio=on_audio)`, ticking the progress bar every block-step,
    stopping cleanly on cancel; the caches are freed either way (unless kept for a continuation
    after a complete run), and ComfyUI's cached memory is returned. Close the generator (or run
    it to the end) to clean up at once. The bar's length: the run's block-steps, or
    `progress_steps` (a live stream's, whose length is not known). `on_cpu`: each block comes
    with its latents as a float32 CPU copy made alongside the next tick (overlap.latents_on_cpu:
    one block behind, the first at once) and a latent preview of it on the bar."""
    progress = host.Progress(progress_steps if progress_steps is not None
                             else streamer.total_block_steps - streamer.block_steps_done, label)
    previewer = host.latent_previewer() if on_cpu else None

    def on_step():
        host.check_interrupted()
        progress.step()

    done = False
    try:
        blocks = streamer.blocks(on_step, on_audio)
        for block in latents_on_cpu(blocks) if on_cpu else blocks:
            if previewer is not None:
                progress.show(previewer(block.latents))
            yield block
        done = True
    finally:
        progress.close()
        if not (keep and done):
            streamer.close()
        host.release_memory()


def run_stream(streamer: Streamer, keep: bool = False) -> torch.Tensor:
    """The clean latent blocks of a whole run of `streamer`, concatenated in time on the CPU:
    [16, frames, h, w] (see stream_blocks)."""
    return torch.cat([b.latents for b in stream_blocks(streamer, "LiveAvatar sampling", keep, on_cpu=True)], dim=1)
