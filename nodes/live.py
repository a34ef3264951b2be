"""LiveAvatar Live Video node: sample and decode block by block, appending each block (with its
speech) to a fragmented MP4 that the pack's browser extension plays on the node while the
graph runs."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager

import torch

from ..liveavatar.decoding import VideoDecoder
from ..liveavatar.overlap import decode_alongside
from ..liveavatar.sampler import VIDEO_FRAMES_PER_LATENT

from . import host
from .continuation import with_lead_in
from .decode import FrameCollector, video_to_images
from .live_mp4 import MIME_TYPE, MIME_TYPE_NO_AUDIO, FragmentedMp4Writer
from .sampler import CONTINUE_INPUTS, LiveAvatarSampler
from .stream_run import FPS, StreamRun, portrait_memo
from .video_writer import prepare_audio

LIVE_EVENT = "liveavatar.live"  # websocket message the extension in web/js/live_view.js listens to
log = logging.getLogger("LiveAvatar")


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
                                          "tooltip": "Output all frames as IMAGE. Turn off for long videos (the mp4 "
                                                     "has them all): frames is then a preview, one frame per second, "
                                                     "and fps is 1.0, as with LiveAvatar Decode."}),
        }, "optional": CONTINUE_INPUTS}

    def generate(self, model, positive, image, vae, audio_features, size, width, height, infer_frames, num_clip,
                 sample_steps, seed, audio, filename_prefix, return_frames=True, continue_from=None, keep_state=False):
        # Input checks before the long work: the run's inputs, the file to write, the speech to mux.
        run = StreamRun("LiveAvatar Live Video", model, positive, image, vae, audio_features, size, width, height,
                        infer_frames, num_clip, sample_steps, seed, continue_from, keep_state,
                        portraits=portrait_memo(self))
        path = host.save_path(filename_prefix, "mp4")
        join_notes = []
        if run.previous is not None:  # the speech at the join: see continuation.with_lead_in
            audio, join_notes = with_lead_in(audio, run.lead_in, FPS)
        speech, adjusted = prepare_audio(audio)
        run.notes.add(*join_notes, *adjusted)
        # the mp4 is written on a thread of its own, so the encoder's time is not the GPU's idle time
        view = LiveView(host.executing_node_id(), path, speech, background=True)  # tells the browser a run started
        with view.reporting():
            run.start(decode=True)
            view.total_frames = min(run.video_frames,
                                    run.latent_frames_to_make * VIDEO_FRAMES_PER_LATENT - run.drop_first)
            decoder = VideoDecoder(run.vae, run.priming, run.video_frames, on_step=host.check_interrupted,
                                   drop_first=run.drop_first)

            def decode(latents):  # on the decode's stream: IMAGE frames and the clean latents, both for the CPU
                return video_to_images(decoder.decode(latents)).contiguous(), latents.float()

            frames_out, clean = FrameCollector(return_frames, FPS), []
            blocks = run.blocks()
            try:
                # Each block's decode runs on its own CUDA stream while the DiT works on the next
                # tick, and hands its frames and latents over on that stream: the loop never waits
                # for the tick just queued. Past the speech the decoder returns nothing and the
                # sampling goes on to the end of the clip, so the LATENT output is the sampler's.
                for _, (frames, latents) in decode_alongside(blocks, decode, run.vae.device, decoder.prime):
                    clean.append(latents)
                    if not len(frames):
                        view.close_file()  # the video is complete for the viewer here
                        continue
                    view.append(frames)
                    frames_out.add(frames)
            finally:
                blocks.close()  # the stream's cleanup now, also when the decode failed
        if not return_frames:
            run.notes.add(frames_out.preview_note(path))
        latents = run.output(torch.cat(clean, dim=1))
        return {"ui": {"live_video": [view.file_info()], **run.ui()}, "result": (*frames_out.result(), latents)}


class LiveView:
    """The growing mp4 and the messages that let the browser play it (see web/js/live_view.js):
    file, bytes ready, frames done / total, generation fps, seconds left, and how the run
    stands: status "running", then "finished", "cancelled" or "failed" (with the reason).
    `done` says the file is complete (no more bytes will come).

    background: blocks are encoded on a writer thread (x264 runs without the GIL) while the
    caller goes on; at most WRITES_WAITING wait, a failed write is raised by the next append
    or by close_file, and close_file writes every block handed over first. `frames` counts
    the frames written, and each block's message is sent once its bytes are on disk."""

    WRITES_WAITING = 2  # blocks handed over and not yet written (bounds the memory they hold)

    def __init__(self, node_id, path, audio, total_frames: int | None = None, event: str = LIVE_EVENT,
                 details: dict | None = None, background: bool = False):
        self.node_id, self.total_frames, self.path, self.audio = node_id, total_frames, path, audio
        self.event = event  # the websocket message's type (a live session's page listens to its own)
        # sent with every message (a session's state): a dict, or a function giving it at each message
        self.details = details if details is not None else {}
        self.writer, self.frames, self.started, self.closed = None, 0, time.monotonic(), False
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="liveavatar-mp4") if background else None
        self.writes: deque[Future] = deque()
        self.sending = threading.Lock()  # messages come from the caller's thread and the writer's
        self._send("running")  # the browser drops the previous run's video now, not at our first block

    def append(self, frames: torch.Tensor):
        """Frames [N, H, W, 3] in 0..1 (CPU) for the end of the video."""
        if self.worker is None:
            return self._write(frames)
        while self.writes and (self.writes[0].done() or len(self.writes) >= self.WRITES_WAITING):
            self.writes.popleft().result()  # a failed write stops the run here
        self.writes.append(self.worker.submit(self._write, frames))

    def _write(self, frames: torch.Tensor):
        if self.writer is None:
            self.writer = FragmentedMp4Writer(self.path, FPS, frames.shape[2], frames.shape[1], self.audio)
        self.writer.write_block(frames)
        self.frames += len(frames)
        self._send("running")

    def update(self):
        """Tell the browser how the run stands now (between blocks: a session's state)."""
        self._send("running")

    def close_file(self, announce: bool = True):
        """Finish the mp4 (playable up to its last frame, every block handed over written); the
        run may go on."""
        if self.closed:
            return
        self.closed = True
        try:
            self._finish_writes()
        finally:
            if self.writer is not None:
                self.writer.close()
        if announce:
            self._send("running")

    def _finish_writes(self):
        """Wait for the writer thread's blocks (all of them, also after a failed one), then raise
        the first failure."""
        if self.worker is None:
            return
        writes, self.writes = list(self.writes), deque()
        wait(writes)
        self.worker.shutdown()
        for write in writes:
            write.result()

    @contextmanager
    def reporting(self):
        """Around the run: the file is finished and the browser told how the run ended, also
        when it is cancelled or fails (the blocks written so far stay playable)."""
        try:
            yield self
        except BaseException as error:
            status = "cancelled" if host.is_cancel(error) else "failed"
            try:
                self.close_file(announce=False)
            except Exception as close_error:  # e.g. the disk that stopped the run: the first error is the news
                log.warning("LiveAvatar: %s could not be finished: %s", self.path, close_error)
            self._send(status, "" if status == "cancelled" else _reason(error))
            raise
        try:
            self.close_file(announce=False)
        except Exception as error:
            self._send("failed", _reason(error))
            raise
        self._send("finished")

    def file_info(self) -> dict:
        """Where ComfyUI's /view endpoint serves it from (it answers byte-range requests)."""
        subfolder = self.path.parent.relative_to(host.output_directory()).as_posix()
        return {"filename": self.path.name, "subfolder": "" if subfolder == "." else subfolder, "type": "output"}

    def _send(self, status: str, reason: str = ""):
        with self.sending:  # one message at a time, in the order the counts grew
            elapsed = max(time.monotonic() - self.started, 1e-6)
            speed = self.frames / elapsed  # frames generated per second of wall time
            left = None if self.total_frames is None or not self.frames else round(
                max(self.total_frames - self.frames, 0) / max(speed, 1e-6), 1)
            details = self.details() if callable(self.details) else self.details
            host.send_to_browser(self.event, {
                **details, "node": self.node_id, **self.file_info(), "status": status, "reason": reason,
                "mime": MIME_TYPE if self.audio is not None else MIME_TYPE_NO_AUDIO,
                "bytes": self.writer.bytes_written() if self.writer is not None else 0,
                "frames": self.frames, "total_frames": self.total_frames, "fps": round(speed, 2), "video_fps": FPS,
                "done": self.closed or status != "running", "seconds_left": 0.0 if status != "running" else left})


def _reason(error: BaseException) -> str:
    """One line for the browser: the error's type and the start of its message."""
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:300]
