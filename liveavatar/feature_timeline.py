"""Audio features by video frame, as the Streamer reads them: appended at the end (a whole
speech at once, a continuation's next part, or a live session's blocks as they come) and
released from the start once the blocks that read them have started, so a live session of
any length holds only the features not yet used."""
from __future__ import annotations

from collections import deque

import torch


class FeatureTimeline:
    """Features [layers, audio_dim, frames] of video frames `start` .. `end` - 1 (global frame
    indices, from the first frame the stream ever had)."""

    def __init__(self, features: torch.Tensor):
        self.layout = tuple(features.shape[:2])
        self.parts: deque[torch.Tensor] = deque()
        self.start = self.end = 0
        self.append(features)

    def append(self, features: torch.Tensor):
        if features.dim() != 3 or tuple(features.shape[:2]) != self.layout:
            raise ValueError(f"audio features must be [{self.layout[0]}, {self.layout[1]}, frames] like the stream's, "
                             f"got {tuple(features.shape)}")
        if features.shape[-1]:
            self.parts.append(features)
            self.end += features.shape[-1]

    def take(self, start: int, count: int) -> torch.Tensor:
        """Frames start .. start + count - 1 (a view when they lie in one part)."""
        if start < self.start or start + count > self.end:
            raise IndexError(f"audio features of frames {start}..{start + count - 1} are not held "
                             f"(held: {self.start}..{self.end - 1})")
        pieces, first = [], self.start
        for part in self.parts:
            lo, hi = max(start, first), min(start + count, first + part.shape[-1])
            if lo < hi:
                pieces.append(part[..., lo - first:hi - first])
            first += part.shape[-1]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    def release(self, before: int):
        """Drop the parts that end at or before frame `before` (a part is kept whole while any of
        its frames may still be read)."""
        while self.parts and self.start + self.parts[0].shape[-1] <= before:
            self.start += self.parts.popleft().shape[-1]

    def truncate(self, end: int):
        """Drop the frames from `end` on (features past a run's last clip, before a continuation)."""
        while self.parts and self.end > end:
            last = self.parts.pop()
            keep = max(0, last.shape[-1] - (self.end - end))
            self.end -= last.shape[-1] - keep
            if keep:
                self.parts.append(last[..., :keep])
        self.end = max(self.end, self.start)
