"""LiveAvatar streaming decode node: latents -> frames, one block at a time."""
from __future__ import annotations

import torch

from ..liveavatar.audio import VIDEO_FPS
from ..liveavatar.decoding import DROPPED_FIRST_FRAMES, LATENTS_PER_BLOCK, VideoDecoder
from ..liveavatar.vae import LATENT_CHANNELS, raw_to_normalised

from . import host
from .continuation import with_lead_in
from .vae_adapter import loaded_vae
from .video_writer import Mp4Writer, prepare_audio

PREVIEW_FPS = 1.0  # return_frames off: one frame per second comes out, with this fps


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
                                                     "to mp4 with save_mp4 (a 5-minute 704*384 video is ~24 GB of "
                                                     "frames): frames "
                                                     "is then a preview, one frame per second, and fps is 1.0, so "
                                                     "CreateVideo -> SaveVideo still make a video of the same length "
                                                     "in sync with the audio."}),
            "filename_prefix": ("STRING", {"default": "LiveAvatar",
                                           "tooltip": "mp4 file name prefix, inside the output folder; may contain "
                                                      "subfolders (videos/LiveAvatar)."}),
        }, "optional": {
            "audio": ("AUDIO", {"tooltip": "The speech, muxed into the mp4."}),
        }}

    def decode(self, latents, vae, save_mp4, return_frames, filename_prefix, audio=None):
        samples = checked_latents(latents)
        info = latents.get("liveavatar", {})
        fps = float(info.get("fps", VIDEO_FPS))
        continues = info.get("continues", False)
        # Everything that can fail without decoding fails now: the settings, the path, the
        # folder, the audio.
        if not save_mp4 and not return_frames:
            raise ValueError("save_mp4 and return_frames are both off: the decoded video would go nowhere. Turn on "
                             "save_mp4 (long videos: the mp4 holds every frame) or return_frames")
        path = host.save_path(filename_prefix, "mp4") if save_mp4 else None
        notes = []
        if save_mp4 and continues:  # the speech at the join: see continuation.with_lead_in
            audio, notes = with_lead_in(audio, info.get("lead_in_audio"), int(fps))
        mux_audio, audio_notes = prepare_audio(audio) if save_mp4 else (None, [])
        notes += audio_notes
        if audio is not None and not save_mp4:
            notes.append("the audio input goes only into the mp4, and save_mp4 is off: it is not used")
        engine = loaded_vae(vae)
        frames_out = FrameCollector(return_frames, fps)
        writer = None
        try:
            for frames in stream_frames(engine, raw_to_normalised(samples[0]), info.get("motion_latents"),
                                        info.get("video_frames"), continues=continues):
                if path is not None and writer is None:
                    writer = Mp4Writer(path, int(fps), frames.shape[2], frames.shape[1], mux_audio)
                if writer is not None:
                    writer.write(frames)
                frames_out.add(frames)
        except BaseException:
            if writer is not None:
                writer.abort()  # the frames decoded so far stay in the mp4
            raise
        finally:
            host.release_memory()
        if writer is not None:
            writer.close()
            notes += writer.notes
        result = frames_out.result()
        if not return_frames:
            notes.append(frames_out.preview_note(writer.path))
        host.NodeNotes().add(*notes)
        ui = {"text": [str(writer.path), *notes]} if writer is not None else {}
        return {"ui": ui, "result": result}


def checked_latents(latents) -> torch.Tensor:
    """The LATENT's samples [1, 16, frames >= 1, h, w], or a ValueError saying what came instead."""
    samples = latents.get("samples") if isinstance(latents, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.dim() != 5 or samples.shape[1] != LATENT_CHANNELS:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"the latents input must be Wan video latents [1, {LATENT_CHANNELS}, frames, h, w] from "
                         f"LiveAvatar Sampler, got {shape}")
    if samples.shape[2] == 0 or samples.shape[3] == 0 or samples.shape[4] == 0:
        raise ValueError(f"the latents input is empty ({tuple(samples.shape)}): nothing to decode; check the "
                         "sampler's inputs (num_clip, audio)")
    return samples


class FrameCollector:
    """The IMAGE output: every frame, or (return_frames off) one frame per second with fps
    1.0, so downstream CreateVideo/SaveVideo still make a same-length, in-sync video."""

    def __init__(self, every_frame: bool, fps: float):
        self.stride = 1 if every_frame else max(1, round(fps / PREVIEW_FPS))
        self.fps = fps if every_frame else fps / self.stride
        self.kept, self.seen = [], 0

    def add(self, frames: torch.Tensor):
        first = (-self.seen) % self.stride  # index in this batch of the next frame to keep
        self.kept.append(frames[first::self.stride])
        self.seen += len(frames)

    def result(self) -> tuple[torch.Tensor, float]:
        return torch.cat(self.kept), self.fps

    def preview_note(self, video) -> str:
        """What the frames output holds with return_frames off, and where the video is."""
        kept = sum(len(frames) for frames in self.kept)
        return (f"return_frames is off: frames is a preview, {kept} frame{'s' * (kept != 1)} (one per second of the "
                f"{self.seen}-frame video) at fps {self.fps:g}, which CreateVideo -> SaveVideo turn into a preview in "
                f"sync with the audio, in whole seconds. The full video is {video}; turn return_frames on for "
                "every frame")


def stream_frames(vae, latents: torch.Tensor, motion_latents=None, max_frames=None, continues=False):
    """Yield the frames LiveAvatar shows [N, H, W, 3] in 0..1 (CPU), a block of 3 latents at a
    time (priming, dropping and trimming: liveavatar.decoding.VideoDecoder). Progress and
    cancel run once per latent the VAE decodes (after its pass), the priming's included."""
    def on_step():
        host.check_interrupted()
        progress.step()

    decoder = VideoDecoder(vae, motion_latents, max_frames, on_step, drop_first=0 if continues else DROPPED_FIRST_FRAMES)
    progress = host.Progress(decoder.steps(latents.shape[1]), "LiveAvatar decoding")
    try:
        for start in range(0, latents.shape[1], LATENTS_PER_BLOCK):
            frames = decoder.decode(latents[:, start:start + LATENTS_PER_BLOCK])
            if frames.shape[1]:
                yield video_to_images(frames).cpu()
            if decoder.finished:
                break
        progress.finish()
    finally:
        progress.close()


def video_to_images(video: torch.Tensor) -> torch.Tensor:
    """Decoded video [3, T, H, W] in [-1, 1] -> ComfyUI IMAGE frames [T, H, W, 3] in 0..1."""
    return ((video.permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)
