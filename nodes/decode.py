"""LiveAvatar streaming decode node: latents -> frames, one block at a time."""
from __future__ import annotations

import torch

from ..liveavatar.vae import raw_to_normalised

from . import host
from .vae_adapter import streaming_vae
from .video_writer import Mp4Writer

LATENTS_PER_BLOCK = 3
WARMUP_MOTION_LATENTS = 7  # the original primes the decoder with its first 7 motion latents
DROPPED_FIRST_FRAMES = 3  # ... and drops the first block's first 3 frames


class LiveAvatarDecode:
    DESCRIPTION = ("Decodes LiveAvatar latents block by block with the VAE's causal cache carried, so GPU memory "
                   "stays flat however long the video. Can write the mp4 (with the speech) as it goes, for videos "
                   "too long to hold as frames.")
    CATEGORY = "LiveAvatar"
    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("frames", "fps")
    FUNCTION = "decode"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latents": ("LATENT", {"tooltip": "From LiveAvatar Sampler."}),
            "vae": ("VAE", {"tooltip": "wan_2.1_vae.safetensors from VAELoader."}),
            "save_mp4": ("BOOLEAN", {"default": False,
                                     "tooltip": "Also write an H.264 mp4 (with the audio, if connected) into the "
                                                "output folder while decoding."}),
            "return_frames": ("BOOLEAN", {"default": True,
                                          "tooltip": "Output all frames as IMAGE. Turn off for long videos written "
                                                     "to mp4: a 5-minute 704*384 video is ~24 GB of frames; only "
                                                     "the last frame is then returned."}),
            "filename_prefix": ("STRING", {"default": "LiveAvatar", "tooltip": "mp4 file name prefix."}),
        }, "optional": {
            "audio": ("AUDIO", {"tooltip": "The speech, muxed into the mp4."}),
        }}

    def decode(self, latents, vae, save_mp4, return_frames, filename_prefix, audio=None):
        samples = latents["samples"]
        if samples.dim() != 5 or samples.shape[1] != 16:
            raise ValueError(f"expected Wan video latents [1, 16, frames, h, w], got {tuple(samples.shape)}")
        info = latents.get("liveavatar", {})
        fps = float(info.get("fps", 25))
        engine = streaming_vae(vae, host.torch_device())
        writer = None
        kept, last = [], None
        try:
            normalised = raw_to_normalised(samples[0])  # LATENT holds raw VAE means; the decoder takes normalised
            for frames in stream_frames(engine, normalised, info.get("motion_latents"), info.get("video_frames")):
                if save_mp4 and writer is None:
                    writer = Mp4Writer(_mp4_path(filename_prefix), int(fps), frames.shape[2], frames.shape[1], audio)
                if writer is not None:
                    writer.write(frames)
                if return_frames:
                    kept.append(frames)
                last = frames[-1:]
        finally:
            if writer is not None:
                writer.close()
            host.release_memory()
        images = torch.cat(kept) if kept else last
        ui = {"text": [str(writer.path)]} if writer is not None else {}
        return {"ui": ui, "result": (images, fps)}


def stream_frames(vae, latents: torch.Tensor, motion_latents=None, max_frames=None):
    """Yield decoded frames [N, H, W, 3] in 0..1 (CPU) per block of 3 latents.

    As LiveAvatar's streaming loop does it: with its motion latents known, the decoder is
    first primed with the 7 oldest motion latents (output discarded) and the first block's
    first 3 frames are dropped; otherwise the stream starts at the first latent (1 frame)."""
    decoder = vae.stream_decoder()
    progress = host.Progress(-(-latents.shape[1] // LATENTS_PER_BLOCK), "LiveAvatar decoding")
    remaining = max_frames if max_frames is not None else float("inf")
    if motion_latents is not None:
        decoder.decode(motion_latents[:, :WARMUP_MOTION_LATENTS])
    for start in range(0, latents.shape[1], LATENTS_PER_BLOCK):
        host.check_interrupted()
        frames = decoder.decode(latents[:, start:start + LATENTS_PER_BLOCK])
        if start == 0 and motion_latents is not None:
            frames = frames[:, DROPPED_FIRST_FRAMES:]
        frames = frames[:, :int(min(remaining, frames.shape[1]))]
        remaining -= frames.shape[1]
        progress.step()
        if frames.shape[1]:
            yield ((frames.permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1).cpu()
        if remaining <= 0:
            return


def _mp4_path(prefix: str):
    folder = host.output_directory()
    index = 1
    while (folder / f"{prefix}_{index:05d}.mp4").exists():
        index += 1
    return folder / f"{prefix}_{index:05d}.mp4"
