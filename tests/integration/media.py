"""What an output file holds, read back with PyAV, and the frame counts the speech implies."""
from __future__ import annotations

from pathlib import Path

import av

RATE, FPS, DROPPED_FIRST = 16000, 25, 3


def speech_frames(seconds: float, infer_frames: int = 48) -> tuple[int, int]:
    """(video frames carrying speech, clips generated), hand-derived from the speech length:
    wav2vec2 gives floor((n - 400) / 320) + 1 frames at 50 Hz for n samples at 16 kHz;
    int(T50 * 30 / 50) at 30 Hz; video frame i (25 fps) carries speech while round(1.2 i) < T30;
    int(T30 / (1.2 infer_frames)) + 1 clips of infer_frames frames are generated."""
    t50 = (int(round(seconds * RATE)) - 400) // 320 + 1
    t30 = int(t50 * 30 / 50)
    covered = sum(1 for i in range(10 ** 5) if round(1.2 * i) < t30)
    return covered, int(t30 / (1.2 * infer_frames)) + 1


def video_frames(seconds: float, infer_frames: int = 48, continues: bool = False) -> int:
    """Frames of a video for that speech: the covered frames, at most what the clips hold
    (a video's first 3 decoded frames are dropped, not a continuation's)."""
    covered, clips = speech_frames(seconds, infer_frames)
    return min(covered, clips * infer_frames - (0 if continues else DROPPED_FIRST))


def probe(path: Path) -> dict:
    """Streams, size, and the frames and audio seconds actually decoded from the file."""
    with av.open(str(path)) as container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        info = {"video_codec": video.codec_context.name if video else None,
                "audio_codec": audio.codec_context.name if audio else None,
                "height": video.height if video else None, "width": video.width if video else None,
                "fps": float(video.average_rate) if video and video.average_rate else None}
    frames, samples, rate = 0, 0, None
    with av.open(str(path)) as container:
        for frame in container.decode(*container.streams.video, *container.streams.audio):
            if isinstance(frame, av.VideoFrame):
                frames += 1
            else:
                samples, rate = samples + frame.samples, frame.sample_rate
    info["frames"] = frames
    info["audio_seconds"] = samples / rate if rate else 0.0
    return info
