"""Write frames to an H.264 mp4 as they arrive, muxing the speech track (PyAV)."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch


class Mp4Writer:
    def __init__(self, path: Path, fps: int, width: int, height: int, audio: dict | None = None):
        import av
        self.av = av
        self.path = path
        self.container = av.open(str(path), mode="w")
        self.video = self.container.add_stream("libx264", rate=fps)
        self.video.width, self.video.height = width - width % 2, height - height % 2  # yuv420p needs even sides
        self.video.pix_fmt = "yuv420p"
        self.video.options = {"crf": "18"}
        self.fps, self.frames = fps, 0
        self.audio = audio
        if audio is not None:  # every stream must exist before the first packet is written
            channels = torch.as_tensor(audio["waveform"]).shape[1]
            self.audio_stream = self.container.add_stream("aac", rate=int(audio["sample_rate"]))
            self.audio_stream.layout = "stereo" if channels >= 2 else "mono"

    def write(self, frames: torch.Tensor):
        """frames [N, H, W, 3] float 0..1 (CPU)."""
        pixels = (frames[:, :self.video.height, :self.video.width].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        for image in pixels:
            frame = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            for packet in self.video.encode(frame):
                self.container.mux(packet)
        self.frames += len(pixels)

    def close(self) -> Path:
        for packet in self.video.encode():
            self.container.mux(packet)
        if self.audio is not None and self.frames:
            self._write_audio()
        self.container.close()
        return self.path

    def _write_audio(self):
        """The speech, cut to the video's duration, as AAC."""
        wave = torch.as_tensor(self.audio["waveform"])[0].float()  # [channels, samples]
        rate = int(self.audio["sample_rate"])
        wave = wave[:, :int(self.frames / self.fps * rate)].clamp(-1, 1)
        stream = self.audio_stream
        layout = stream.layout.name
        wave = wave[:2] if layout == "stereo" else wave[:1]
        frame = self.av.AudioFrame.from_ndarray(wave.numpy().reshape(1, -1) if layout == "mono" else
                                                np.ascontiguousarray(wave.t().numpy()).reshape(1, -1),
                                                format="flt", layout=layout)
        frame.sample_rate = rate
        frame.time_base = Fraction(1, rate)
        frame.pts = 0
        for packet in stream.encode(frame):
            self.container.mux(packet)
        for packet in stream.encode():
            self.container.mux(packet)
