"""A fragmented MP4 (H.264 + AAC) that a browser can play while it is still being written.

Layout: ftyp + an empty moov (no samples) first, then moof + mdat fragments. The muxer cuts a
fragment at each keyframe and we force one on the last frame of every block, so when a block
is written all its frames but that last one are on disk (the last follows with the next block
or on close). A player that appends the file's new bytes to a Media Source buffer thus plays
each block right after it is decoded.

The speech goes in with the frames it covers, never ahead of them: the AAC encoder is fed a
little ahead (it gives its packets ~1024 samples late), but a packet is muxed only once the
frames reach its start. So a file closed after a cancel or an error ends with its last frame,
speech and picture together; speech shorter than the video goes on as silence.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .video_writer import MuxAudio, close_quietly, writing

MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"
# What the browser's Media Source needs to know: H.264 High profile + AAC-LC.
# The muxer interleaves by time: it holds video packets until audio packets of a later time
# exist. AAC comes out ~1024 samples late, so the encoder is fed this far ahead of the frames.
AUDIO_LEAD_SECONDS = 0.25
MIME_TYPE = 'video/mp4; codecs="avc1.640028, mp4a.40.2"'
MIME_TYPE_NO_AUDIO = 'video/mp4; codecs="avc1.640028"'


class FragmentedMp4Writer:
    def __init__(self, path: Path, fps: int, width: int, height: int, audio: MuxAudio | None = None):
        """audio: as video_writer.prepare_audio gives it (float32 in [-1, 1], 44.1 or 48 kHz), or
        any object with its `rate`, `channels` and `read(start, end)` (a live session's PCM, read
        as the frames it drove are written)."""
        import av
        self.av, self.path, self.fps = av, Path(path), fps
        # flush_packets: bytes reach the file as soon as the muxer writes them, so the size
        # we report to the browser is always a prefix it can fetch. make_non_negative: shift
        # for the AAC priming delay without stretching the first video frame.
        self.broken = False  # a write failed: the file can only be closed as it is
        with writing(self.path, self):
            self.container = av.open(str(path), mode="w", format="mp4",
                                     options={"movflags": MOVFLAGS, "flush_packets": "1",
                                              "avoid_negative_ts": "make_non_negative"})
        self.video = self.container.add_stream("libx264", rate=fps)
        self.video.width, self.video.height = width - width % 2, height - height % 2  # yuv420p needs even sides
        self.video.pix_fmt = "yuv420p"
        # zerolatency: no lookahead or B-frames, each frame's packet comes out at once;
        # keyframes only where we force them (block ends), so fragments follow blocks.
        self.video.options = {"crf": "20", "preset": "veryfast", "tune": "zerolatency", "profile": "high",
                              "x264-params": "keyint=10000:min-keyint=10000:scenecut=0:forced-idr=1"}
        self.frames = 0
        self.audio, self.audio_stream = audio, None
        if audio is not None:  # every stream must exist before the first packet
            self.audio_stream = self.container.add_stream("aac", rate=audio.rate)
            self.audio_stream.layout = "stereo" if audio.channels >= 2 else "mono"
            self.audio_encoded = 0  # samples given to the encoder
            self.audio_held = []  # encoded packets that start after the last frame written

    @property
    def mime_type(self) -> str:
        return MIME_TYPE if self.audio is not None else MIME_TYPE_NO_AUDIO

    def write_block(self, frames: torch.Tensor) -> int:
        """Append frames [N, H, W, 3] float 0..1 (CPU) as one fragment, with the speech they
        cover. Returns the bytes on disk so far."""
        pixels = (frames[:, :self.video.height, :self.video.width].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        with writing(self.path, self):
            if self.audio is not None:
                self._encode_audio_until((self.frames + len(pixels)) / self.fps + AUDIO_LEAD_SECONDS)
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
            if self.audio is not None:
                # Speech up to the frames' end: the interleaver now holds an audio packet later
                # than the block's last frame, so it hands that keyframe on and the fragment is cut.
                self._mux_audio_before(self.frames / self.fps)
        return self.bytes_written()

    def bytes_written(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def close(self) -> Path:
        """Finish the file where the frames end (also after a cancel or an error). After a failed
        write it is only closed: its complete fragments still play."""
        if self.broken:
            close_quietly(self.container, self.path)
            return self.path
        with writing(self.path, self):
            self._mux(self._with_duration(self.video.encode()))
            if self.audio_stream is not None:
                self.audio_held += self.audio_stream.encode()  # the encoder's last packets
                self._mux_audio_before(self.frames / self.fps)  # later speech has no picture: dropped
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

    def _encode_audio_until(self, seconds: float):
        """Feed the encoder the speech up to `seconds`, silence past its end; its packets are held."""
        end = int(round(seconds * self.audio.rate))
        if end <= self.audio_encoded:
            return
        chunk = self.audio.read(self.audio_encoded, end)  # past the end of the speech: silence
        layout = self.audio_stream.layout.name
        packed = chunk[:1].reshape(1, -1) if layout == "mono" else np.ascontiguousarray(chunk[:2].T).reshape(1, -1)
        frame = self.av.AudioFrame.from_ndarray(np.ascontiguousarray(packed, dtype=np.float32), format="flt",
                                                layout=layout)
        frame.sample_rate = self.audio.rate
        frame.time_base = Fraction(1, self.audio.rate)
        frame.pts = self.audio_encoded
        self.audio_held += self.audio_stream.encode(frame)
        self.audio_encoded = end

    def _mux_audio_before(self, seconds: float):
        """Mux the held packets that start before `seconds` (the frames' end)."""
        ready = [p for p in self.audio_held if p.pts is None or p.pts * p.time_base < seconds]
        self.audio_held = [p for p in self.audio_held if not (p.pts is None or p.pts * p.time_base < seconds)]
        self._mux(ready)
