"""A fragmented MP4 (H.264 + AAC) that a browser can play while it is still being written.

Layout: ftyp + an empty moov (no samples) first, then moof + mdat fragments. The muxer cuts a
fragment at each keyframe and we force one on the last frame of every block, so when a block
is written all its frames but that last one are on disk (the last follows with the next block
or on close). A player that appends the file's new bytes to a Media Source buffer thus plays
each block right after it is decoded. The speech is encoded block by block along the frames it covers.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"
# What the browser's Media Source needs to know: H.264 High profile + AAC-LC.
# The muxer interleaves by time: it holds video packets until audio packets of a later time
# exist. AAC comes out ~1024 samples late, so the speech is encoded this far ahead of the frames.
AUDIO_LEAD_SECONDS = 0.25
MIME_TYPE = 'video/mp4; codecs="avc1.640028, mp4a.40.2"'
MIME_TYPE_NO_AUDIO = 'video/mp4; codecs="avc1.640028"'


class FragmentedMp4Writer:
    def __init__(self, path: Path, fps: int, width: int, height: int, audio: dict | None = None):
        import av
        self.av, self.path, self.fps = av, Path(path), fps
        # flush_packets: bytes reach the file as soon as the muxer writes them, so the size
        # we report to the browser is always a prefix it can fetch. make_non_negative: shift
        # for the AAC priming delay without stretching the first video frame.
        self.container = av.open(str(path), mode="w", format="mp4",
                                 options={"movflags": MOVFLAGS, "flush_packets": "1", "avoid_negative_ts": "make_non_negative"})
        self.video = self.container.add_stream("libx264", rate=fps)
        self.video.width, self.video.height = width - width % 2, height - height % 2  # yuv420p needs even sides
        self.video.pix_fmt = "yuv420p"
        # zerolatency: no lookahead or B-frames, each frame's packet comes out at once;
        # keyframes only where we force them (block ends), so fragments follow blocks.
        self.video.options = {"crf": "20", "preset": "veryfast", "tune": "zerolatency", "profile": "high",
                              "x264-params": "keyint=10000:min-keyint=10000:scenecut=0:forced-idr=1"}
        self.frames = 0
        self.audio, self.audio_stream = _audio_samples(audio), None
        if self.audio is not None:  # every stream must exist before the first packet
            self.audio_stream = self.container.add_stream("aac", rate=self.audio.rate)
            self.audio_stream.layout = "stereo" if self.audio.wave.shape[0] >= 2 else "mono"
            self.audio_written = 0

    @property
    def mime_type(self) -> str:
        return MIME_TYPE if self.audio is not None else MIME_TYPE_NO_AUDIO

    def write_block(self, frames: torch.Tensor) -> int:
        """Append frames [N, H, W, 3] float 0..1 (CPU) as one fragment, with the speech they
        cover. Returns the bytes on disk so far."""
        if self.audio is not None:
            self._write_audio_until((self.frames + len(frames)) / self.fps + AUDIO_LEAD_SECONDS)
        pixels = (frames[:, :self.video.height, :self.video.width].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        for i, image in enumerate(pixels):
            frame = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = self.frames + i
            frame.time_base = Fraction(1, self.fps)
            if i == len(pixels) - 1:
                # A keyframe cuts a fragment: the muxer writes all of this block but this last
                # frame now, instead of waiting for the next block.
                frame.pict_type = self.av.video.frame.PictureType.I
            self._mux(self._with_duration(self.video.encode(frame)))
        self.frames += len(pixels)
        return self.bytes_written()

    def bytes_written(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def close(self) -> Path:
        self._mux(self._with_duration(self.video.encode()))
        if self.audio_stream is not None:
            self._mux(self.audio_stream.encode())
        self.container.close()
        return self.path

    def _with_duration(self, packets):
        """Each video packet lasts one frame: with a fragment per frame the muxer cannot learn
        a sample's duration from the next one, and guessed durations break the timestamps."""
        for packet in packets:
            packet.duration = int(round(1 / (self.fps * packet.time_base)))
            yield packet

    def _mux(self, packets):
        for packet in packets:
            self.container.mux(packet)

    def _write_audio_until(self, seconds: float):
        end = min(int(round(seconds * self.audio.rate)), self.audio.wave.shape[1])
        if end <= self.audio_written:
            return
        chunk = self.audio.wave[:, self.audio_written:end]
        layout = self.audio_stream.layout.name
        packed = chunk[:1].reshape(1, -1) if layout == "mono" else np.ascontiguousarray(chunk[:2].T).reshape(1, -1)
        frame = self.av.AudioFrame.from_ndarray(packed, format="flt", layout=layout)
        frame.sample_rate = self.audio.rate
        frame.time_base = Fraction(1, self.audio.rate)
        frame.pts = self.audio_written
        self._mux(self.audio_stream.encode(frame))
        self.audio_written = end


class _Speech:
    def __init__(self, wave: np.ndarray, rate: int):
        self.wave, self.rate = wave, rate


def _audio_samples(audio: dict | None) -> _Speech | None:
    """ComfyUI AUDIO {'waveform': [1, channels, samples], 'sample_rate'} -> float32 [channels, samples]."""
    if audio is None:
        return None
    wave = torch.as_tensor(audio["waveform"])[0].float().clamp(-1, 1).numpy().astype(np.float32)
    return _Speech(np.ascontiguousarray(wave), int(audio["sample_rate"]))
