"""Write frames to an H.264 mp4 as they arrive, then add the speech track (PyAV).

The frames go to `<name>.partial.mp4` while decoding. At the end the speech is muxed in
as AAC by copying those video packets (no re-encode) into the final file; if that fails
for any reason the video-only file becomes the final file and the reason is reported, so
an audio problem never costs the decoded frames. The audio is checked and converted
before decoding starts (`prepare_audio`): integer or too-loud PCM scaled into [-1, 1],
NaN replaced by silence, rates AAC encoders refuse resampled. The Live Video node's
fragmented writer (live_mp4.py) takes the same prepared audio.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ..liveavatar.audio import comfy_audio_waveform

from . import host

log = logging.getLogger("LiveAvatar")
AAC_RATES = (44100, 48000)  # what every AAC encoder and player takes; other rates -> 48 kHz
AAC_DEFAULT_RATE = 48000


@dataclass
class MuxAudio:
    wave: np.ndarray  # [channels (1 or 2), samples] float32 in [-1, 1]
    rate: int

    @property
    def channels(self) -> int:
        return self.wave.shape[0]

    def read(self, start: int, end: int) -> np.ndarray:
        """Samples start .. end - 1 [channels, end - start], silence past the end of the speech."""
        chunk = self.wave[:, start:end]
        return np.pad(chunk, ((0, 0), (0, end - start - chunk.shape[1]))) if chunk.shape[1] < end - start else chunk


def prepare_audio(audio: dict | None) -> tuple[MuxAudio | None, list[str]]:
    """A ComfyUI AUDIO -> (what to mux or None, notes for the user on what was changed). What
    cannot be an AUDIO at all is a ValueError naming the audio input (comfy_audio_waveform),
    raised before any long work."""
    if audio is None:
        return None, []
    notes = []
    wave, rate = comfy_audio_waveform(audio, notes)
    if wave.shape[1] == 0:
        return None, [*notes, f"the audio input is empty (0 samples at {rate} Hz): the mp4 has no sound"]
    wave = wave[:2]  # AAC here: mono or stereo (of more channels, the front left and right)
    if not torch.isfinite(wave).all():
        notes.append("the audio input has NaN/infinite samples; they are silent in the mp4")
        wave = torch.nan_to_num(wave, nan=0.0, posinf=0.0, neginf=0.0)
    samples = wave.numpy()
    if rate not in AAC_RATES:
        import librosa
        samples = librosa.resample(samples, orig_sr=rate, target_sr=AAC_DEFAULT_RATE)
        rate = AAC_DEFAULT_RATE
    return MuxAudio(np.ascontiguousarray(samples.clip(-1, 1), dtype=np.float32), rate), notes


class Mp4Writer:
    def __init__(self, path: Path, fps: int, width: int, height: int, audio: MuxAudio | None = None):
        import av
        self.av = av
        self.path = path
        self.partial = path.with_name(path.stem + ".partial.mp4")
        self.broken = False  # a write failed: the file cannot be finished
        with writing(self.partial, self):
            self.container = av.open(str(self.partial), mode="w")
        self.video = self.container.add_stream("libx264", rate=fps)
        self.video.width, self.video.height = width - width % 2, height - height % 2  # yuv420p needs even sides
        self.video.pix_fmt = "yuv420p"
        self.video.options = {"crf": "18"}
        self.fps, self.frames = fps, 0
        self.audio = audio
        self.notes: list[str] = []  # what the user should know about the file (e.g. no sound)

    def write(self, frames: torch.Tensor):
        """frames [N, H, W, 3] float 0..1 (CPU)."""
        pixels = (frames[:, :self.video.height, :self.video.width].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        with writing(self.partial, self):
            for image in pixels:
                frame = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                for packet in self.video.encode(frame):
                    self.container.mux(packet)
        self.frames += len(pixels)

    def abort(self):
        """After an error or cancel: keep what was written as far as the file can be finished,
        never raising over the error that stopped the run."""
        try:
            self.close()
        except Exception as error:
            log.warning("LiveAvatar: %s could not be finished after the run stopped: %s", self.partial, error)

    def close(self) -> Path | None:
        """Finish the file (also after an error or cancel: the frames so far are kept). After a
        failed write nothing can be kept: a plain mp4 without its index at the end does not
        play, so the partial file is removed (on a full disk, that space comes back)."""
        if self.broken:
            close_quietly(self.container, self.partial)
            self.partial.unlink(missing_ok=True)
            return None
        try:
            with writing(self.partial, self):
                for packet in self.video.encode():
                    self.container.mux(packet)
                self.container.close()
        except Exception:
            self.close()  # broken now: the unplayable partial file goes
            raise
        if self.audio is not None and self.frames:
            try:
                self._mux_audio()
                self.partial.unlink()
                return self.path
            except Exception as error:  # PyAV/FFmpeg raise many types; the video must survive all of them
                self.path.unlink(missing_ok=True)
                self.notes.append(f"the sound could not be added ({type(error).__name__}: {error}); "
                                  "the mp4 is the video without sound")
                log.warning("LiveAvatar: %s: %s", self.path, self.notes[-1])
        self.partial.replace(self.path)
        return self.path

    def _mux_audio(self):
        """The video packets copied, the speech cut to the video's duration, as AAC."""
        wave = self.audio.wave[:, :int(self.frames / self.fps * self.audio.rate)]
        layout = "stereo" if wave.shape[0] == 2 else "mono"
        with self.av.open(str(self.partial)) as source, self.av.open(str(self.path), mode="w") as target:
            video_in = source.streams.video[0]
            video_out = _copy_of(target, video_in)
            sound = target.add_stream("aac", rate=self.audio.rate, layout=layout)
            for packet in source.demux(video_in):
                if packet.dts is None:  # the demuxer's end-of-stream marker
                    continue
                packet.stream = video_out
                target.mux(packet)
            frame = self.av.AudioFrame.from_ndarray(np.ascontiguousarray(wave.T).reshape(1, -1), format="flt",
                                                    layout=layout)
            frame.sample_rate, frame.time_base, frame.pts = self.audio.rate, Fraction(1, self.audio.rate), 0
            for packet in (*sound.encode(frame), *sound.encode()):
                target.mux(packet)


@contextmanager
def writing(path: Path, writer=None):
    """A failed write (a full disk, a folder removed) as one error naming the file and the fix
    instead of the muxer's bare errno. The writer is marked broken: after a failed write the
    muxer is in no state to take more (PyAV can even crash), it may only be closed."""
    try:
        yield
    except Exception as error:
        if writer is not None:
            writer.broken = True
        if isinstance(error, OSError):
            raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}. "
                                       f"{host.write_advice(error)}") from None
        raise


def close_quietly(container, path: Path):
    """Release a broken writer's container; what it says goes to the log only."""
    try:
        container.close()
    except Exception as error:
        log.warning("LiveAvatar: %s could not be finished after a failed write: %s", path, error)


def _copy_of(container, stream):
    """An output stream taking `stream`'s packets unchanged (PyAV >= 14 names it differently)."""
    if hasattr(container, "add_stream_from_template"):
        return container.add_stream_from_template(stream)
    return container.add_stream(template=stream)
