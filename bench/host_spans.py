"""Where the generation thread's time goes, cheap enough to leave on for a whole run (torch.profiler
slows the host several times over and changes what it measures).

Chosen methods are wrapped for the run: each call's wall time on the thread that made it, and for
the sampler's ticks the number of block-steps and the GPU time from the tick's first to its last
queued kernel (CUDA events on the sampler's stream; their gaps are the GPU's wait between ticks).

    spans = HostSpans(pack)
    with spans:
        ...run the node...
    spans.summary(since, until)   # per method: calls, seconds, share of the window; ticks by size
"""
from __future__ import annotations

import functools
import threading
import time
from collections import defaultdict

import numpy as np
import torch


def targets(pack) -> dict:
    """name -> (class, method) of what a live run's generation thread does besides the DiT."""
    la, nodes = pack.liveavatar, pack.nodes
    return {
        "tick": (la.sampler.Streamer, "_tick"),
        "graph capture": (la.graphs.TickGraphs, "_capture"),
        "feed (audio in + encode)": (la.live_audio.LiveAudioFeed, "__call__"),
        "wav2vec2 run": (la.audio.Wav2Vec2Encoder, "run"),
        "show (frames out)": (nodes.live_session.LiveSession, "_show"),
        "mp4 append": (nodes.live.LiveView, "append"),
        "page message": (nodes.live.LiveView, "update"),
        "decode queued": (la.overlap.DecodeQueue, "put"),
        "decodes collected": (la.overlap.DecodeQueue, "ready"),
    }


class HostSpans:
    def __init__(self, pack):
        self.targets = targets(pack)
        self.calls = []  # (name, thread, start, end)
        self.ticks = []  # (host start, host end, block-steps, start event, end event)
        self._saved = {}

    def __enter__(self):
        for name, (cls, attr) in self.targets.items():
            original = cls.__dict__[attr]
            self._saved[name] = original
            setattr(cls, attr, self._wrap(name, original))
        return self

    def __exit__(self, *exc):
        for name, (cls, attr) in self.targets.items():
            setattr(cls, attr, self._saved[name])

    def _wrap(self, name, original):
        gpu = torch.cuda.is_available() and name == "tick"

        @functools.wraps(original)
        def timed(obj, *args, **kwargs):
            events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if gpu else None
            start = time.perf_counter()
            if events:
                events[0].record()
            try:
                return original(obj, *args, **kwargs)
            finally:
                if events:
                    events[1].record()
                end = time.perf_counter()
                self.calls.append((name, threading.get_ident(), start, end))
                if name == "tick":
                    self.ticks.append((start, end, len(args[0]), *(events or (None, None))))
        return timed

    def summary(self, since: float = -np.inf, until: float = np.inf) -> dict:
        """Per method: calls, total seconds and share of the window on the thread that ran the ticks
        (nested methods count in their callers too); ticks by block-steps: host and GPU ms (p50)
        and the GPU's idle ms before each tick (p50: the gap from the last tick's end)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        calls = [c for c in self.calls if since <= c[2] < until]
        window = max((c[3] for c in calls), default=0) - min((c[2] for c in calls), default=0)
        generation = max(set(c[1] for c in calls if c[0] == "tick"), default=None,
                         key=lambda t: sum(c[0] == "tick" for c in calls if c[1] == t))
        totals = defaultdict(lambda: [0, 0.0])
        for name, thread, start, end in calls:
            if thread == generation:
                totals[name][0] += 1
                totals[name][1] += end - start
        methods = {name: {"calls": n, "s": round(s, 3), "share": round(s / window, 3) if window else None}
                   for name, (n, s) in totals.items()}
        return {"window_s": round(window, 3), "methods": methods, "ticks": self._ticks(since, until)}

    def _ticks(self, since, until) -> dict:
        by_size = defaultdict(lambda: defaultdict(list))
        previous_end = None
        for start, end, size, e0, e1 in self.ticks:
            inside = since <= start < until
            if inside:
                row = by_size[size]
                row["host_ms"].append((end - start) * 1e3)
                if e0 is not None:
                    row["gpu_ms"].append(e0.elapsed_time(e1))
                    if previous_end is not None:
                        row["gpu_idle_before_ms"].append(previous_end.elapsed_time(e0))
            previous_end = e1
        return {size: {"count": len(row["host_ms"]),
                       **{key: round(float(np.median(values)), 2) for key, values in row.items() if values}}
                for size, row in sorted(by_size.items())}
