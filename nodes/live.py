"""LiveAvatar Live Video node: sample and decode block by block, appending each block (with its
speech) to a fragmented MP4 that the pack's browser extension plays on the node while the
graph runs."""
from __future__ import annotations

import time

import torch

from ..liveavatar import StreamInputs, StreamSettings, Streamer
from ..liveavatar.decoding import DROPPED_FIRST_FRAMES, VideoDecoder
from ..liveavatar.overlap import decode_alongside
from ..liveavatar.sampler import VIDEO_FRAMES_PER_LATENT
from ..liveavatar.vae import normalised_to_raw

from . import host
from .conditioning import text_embeddings
from .live_mp4 import FragmentedMp4Writer
from .sampler import FPS, LiveAvatarSampler, portrait_latents

LIVE_EVENT = "liveavatar.live"  # websocket message the extension in web/js/live_view.js listens to


class LiveAvatarLiveVideo:
    DESCRIPTION = ("Sampler + streaming decode in one: every block of 12 frames is decoded as soon as it is clean "
                   "and appended, with its speech, to an mp4 in the output folder that plays on this node while "
                   "the video is generated (frames done, generation speed and time left below it).")
    CATEGORY = "LiveAvatar"
    RETURN_TYPES = ("IMAGE", "FLOAT", "LATENT")
    RETURN_NAMES = ("frames", "fps", "latents")
    FUNCTION = "generate"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        sampler = LiveAvatarSampler.INPUT_TYPES()["required"]  # the same settings, kept in step
        return {"required": {
            **sampler,
            "audio": ("AUDIO", {"tooltip": "The speech (as given to LiveAvatar Audio Encode), muxed into the video."}),
            "filename_prefix": ("STRING", {"default": "LiveAvatar_live", "tooltip": "mp4 file name prefix."}),
            "return_frames": ("BOOLEAN", {"default": True,
                                          "tooltip": "Output all frames as IMAGE (turn off for long videos: only the "
                                                     "last frame is then returned; the mp4 has them all)."}),
        }}

    def generate(self, model, positive, image, vae, audio_features, size, width, height, infer_frames, num_clip,
                 sample_steps, seed, audio, filename_prefix, return_frames=True):
        text = text_embeddings(positive, model.dit.cfg.text_len)  # input checks before the long work
        features, speech_frames = audio_features.per_frame(infer_frames)
        model.prepare()  # our DiT on the GPU via ComfyUI's model management, at this LoRA strength
        vae_engine, ref_latent, motion_latents = portrait_latents(vae, image, size, width, height)
        inputs = StreamInputs(text, ref_latent, motion_latents, features)
        settings = StreamSettings(infer_frames=infer_frames, num_clip=num_clip, steps=sample_steps, seed=seed,
                                  kv_fp8=model.kv_fp8)
        streamer = Streamer(model.dit, inputs, settings)
        latent_frames = streamer.num_clips * streamer.latent_frames
        total_frames = min(speech_frames, latent_frames * VIDEO_FRAMES_PER_LATENT - DROPPED_FIRST_FRAMES)
        view = LiveView(host.executing_node_id(), host.save_path(filename_prefix, "mp4"), total_frames)
        decoder = VideoDecoder(vae_engine, motion_latents, speech_frames, on_step=host.check_interrupted)
        progress = host.Progress(streamer.total_block_steps, "LiveAvatar live video")
        kept, last, clean = [], None, []

        def on_step():
            host.check_interrupted()
            progress.step()

        try:
            # Each block's decode runs on its own CUDA stream while the DiT works on the next
            # tick; past the speech the decoder returns nothing and the sampling goes on to the
            # end of the clip, so the LATENT output is the sampler's.
            for block, video in decode_alongside(streamer.blocks(on_step), decoder.decode, vae_engine.device):
                clean.append(block.latents.float().cpu())
                if not video.shape[1]:
                    view.close()  # the video is complete for the viewer here
                    continue
                frames = ((video.permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)
                view.append(frames, audio)
                if return_frames:
                    kept.append(frames)
                last = frames[-1:]
        finally:
            view.close()
            progress.close()
            streamer.close()
            host.release_memory()
        latents = {"samples": normalised_to_raw(torch.cat(clean, dim=1)).unsqueeze(0),
                   "liveavatar": {"motion_latents": motion_latents.cpu(), "video_frames": speech_frames, "fps": FPS}}
        return {"ui": {"live_video": [view.file_info()]},
                "result": (torch.cat(kept) if kept else last, float(FPS), latents)}


class LiveView:
    """The growing mp4 and the progress messages that let the browser play it (see
    web/js/live_view.js): file, bytes ready, frames done / total, generation fps, seconds left."""

    def __init__(self, node_id, path, total_frames: int):
        self.node_id, self.total_frames, self.path = node_id, total_frames, path
        self.writer, self.frames, self.started, self.closed = None, 0, time.monotonic(), False

    def append(self, frames: torch.Tensor, audio):
        if self.writer is None:
            self.writer = FragmentedMp4Writer(self.path, FPS, frames.shape[2], frames.shape[1], audio)
        self.writer.write_block(frames)
        self.frames += len(frames)
        self._send(done=False)

    def close(self):
        if self.writer is not None and not self.closed:
            self.writer.close()
            self.closed = True
            self._send(done=True)

    def file_info(self) -> dict:
        """Where ComfyUI's /view endpoint serves it from (it answers byte-range requests)."""
        subfolder = self.path.parent.relative_to(host.output_directory()).as_posix()
        return {"filename": self.path.name, "subfolder": "" if subfolder == "." else subfolder, "type": "output"}

    def _send(self, done: bool):
        elapsed = max(time.monotonic() - self.started, 1e-6)
        speed = self.frames / elapsed  # frames generated per second of wall time
        host.send_to_browser(LIVE_EVENT, {
            "node": self.node_id, **self.file_info(), "mime": self.writer.mime_type,
            "bytes": self.writer.bytes_written(), "frames": self.frames, "total_frames": self.total_frames,
            "fps": round(speed, 2), "video_fps": FPS, "done": done,
            "seconds_left": 0.0 if done else round(max(self.total_frames - self.frames, 0) / max(speed, 1e-6), 1)})
