"""LiveAvatar Live Video node: sample and decode block by block, appending each block (with its
speech) to a fragmented MP4 that the pack's browser extension plays on the node while the
graph runs."""
from __future__ import annotations

import time

import torch

from ..liveavatar.decoding import VideoDecoder
from ..liveavatar.overlap import decode_alongside
from ..liveavatar.sampler import VIDEO_FRAMES_PER_LATENT

from . import host
from .continuation import with_lead_in
from .live_mp4 import FragmentedMp4Writer
from .sampler import CONTINUE_INPUTS, LiveAvatarSampler
from .stream_run import FPS, StreamRun

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
        }, "optional": CONTINUE_INPUTS}

    def generate(self, model, positive, image, vae, audio_features, size, width, height, infer_frames, num_clip,
                 sample_steps, seed, audio, filename_prefix, return_frames=True, continue_from=None, keep_state=False):
        run = StreamRun("LiveAvatar Live Video", model, positive, image, vae, audio_features, size, width, height,
                        infer_frames, num_clip, sample_steps, seed, continue_from, keep_state)
        path = host.save_path(filename_prefix, "mp4")  # input checks before the long work
        mux_audio, notes = with_lead_in(audio, run.lead_in, FPS) if run.previous else (audio, [])
        run.start(decode=True)
        run.notes += notes
        total_frames = min(run.video_frames, run.latent_frames_to_make * VIDEO_FRAMES_PER_LATENT - run.drop_first)
        view = LiveView(host.executing_node_id(), path, total_frames)
        decoder = VideoDecoder(run.vae, run.priming, run.video_frames, on_step=host.check_interrupted,
                               drop_first=run.drop_first)
        kept, last, clean = [], None, []
        blocks = run.blocks()
        try:
            # Each block's decode runs on its own CUDA stream while the DiT works on the next
            # tick; past the speech the decoder returns nothing and the sampling goes on to the
            # end of the clip, so the LATENT output is the sampler's.
            for block, video in decode_alongside(blocks, decoder.decode, run.vae.device):
                clean.append(block.latents.float().cpu())
                if not video.shape[1]:
                    view.close()  # the video is complete for the viewer here
                    continue
                frames = ((video.permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)
                view.append(frames, mux_audio)
                if return_frames:
                    kept.append(frames)
                last = frames[-1:]
        finally:
            blocks.close()  # the stream's cleanup now, also when the decode failed
            view.close()
        latents = run.output(torch.cat(clean, dim=1))
        return {"ui": {"live_video": [view.file_info()], **run.ui()},
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
