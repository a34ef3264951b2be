"""CUDA graphs of a run's steady ticks.

Queueing one tick costs the host ~1300 kernel launches and their Python (about 0.12 s at
384*256 on an H100: more than the GPU needs for one block-step, so a live session, whose
ticks carry one or two block-steps, ran at the host's pace). Once the first clip has filled
the rings, a tick is fixed by its shape and by what it reads and writes: for each block-step
its step's ring and its sink. Everything else is a value in its inputs (dit.TickInputs:
latents, RoPE tables, the ring rows its block writes, timestep modulation, audio). So each
kind of steady tick (with 4 steps at most 15: the sets of steps a tick can hold) is captured
as a CUDA graph the first time it comes, then replayed with the inputs of each later one
copied into the graph's: the host queues a few copies and one graph.

By then the first clip has run every kernel, library plan and workspace of the run's shapes
(the full rings' included, at its last block), and a model's first capture is preceded by one
tick run on its capture stream (the matrix libraries keep a workspace per stream): a capture
makes nothing that outlives it. A tick that will not come again (the stream draining, the
portrait's sink about to be replaced) is not captured (the caller says so).

Graphs are captured into one memory pool and replayed one at a time on the run's stream, each
output read before the next replay is queued: the pool holds about one tick's activations (the
memory plan's "tick activations") beside the eager ticks' own.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .kvcache import BlockStepKV

log = logging.getLogger("LiveAvatar")


@dataclass
class _Graph:
    graph: object  # torch.cuda.CUDAGraph (or a test's stand-in with replay())
    inputs: object  # the TickInputs it reads
    output: torch.Tensor  # the flow it writes
    sinks: list  # the sinks it reads (kept alive while it may replay)


class TickGraphs:
    """The steady ticks of one run of `model` (one GPU, everything in place), captured and
    replayed; any other tick runs as it is. `capture(fn) -> (graph, output)` records fn's GPU
    work (CUDA by default; tests pass a stand-in that calls fn again at replay)."""

    def __init__(self, model, text_kv: list, ffn_rows: int, attention_items: int, capture=None):
        self.model, self.text_kv, self.ffn_rows, self.attention_items = model, text_kv, ffn_rows, attention_items
        if capture is None:
            if model.capture_stream is None or model.capture_stream.stream.device != model.device:
                model.capture_stream = CaptureStream(model.device)
            capture = CudaCapture(model.capture_stream)
        self.capture = capture
        self.graphs: dict = {}
        self.retired: list = []  # graphs of a freed sink, never replayed: while one lives, so does the shared pool
        self.failed = False
        self.replays = 0

    def denoise(self, items: list, lasting: bool = True) -> torch.Tensor:
        """As model.denoise(items, ...). `lasting`: a tick like this one may come again (worth a capture)."""
        inputs = self.model.tick_inputs(items)
        kvs = [item.kv for item in items]
        key = None if self.failed else steady_key(kvs, inputs)
        graph = self.graphs.get(key)
        if graph is None and key is not None and lasting:
            graph = self._capture(key, inputs, kvs)
        if graph is None:
            return self._run(inputs, kvs)
        for static, new in zip(graph.inputs.tensors(), inputs.tensors()):
            static.copy_(new)
        graph.graph.replay()
        self.replays += 1
        return graph.output

    def _run(self, inputs, kvs):
        return self.model.run_tick(inputs, kvs, self.text_kv, self.ffn_rows, self.attention_items)

    def _capture(self, key, inputs, kvs) -> _Graph | None:
        static = type(inputs)(*(t.clone() for t in inputs.tensors()))
        try:
            graph, output = self.capture(lambda: self._run(static, kvs))
        except Exception as error:  # an operation that cannot be captured: the run goes on without graphs
            self.failed = True
            self.graphs.clear()
            log.warning("LiveAvatar: CUDA graphs are off for this run (a tick could not be captured: %s)", error)
            return None
        self.graphs[key] = _Graph(graph, static, output, [kv.sink for kv in kvs])
        return self.graphs[key]

    def drop_sink(self, sink):
        """Drop the graphs that read `sink` (freed by the run: the portrait's, once the first clip
        is done): their tensors go, the CUDA graphs are kept until close (PyTorch cannot capture
        into a pool again once no graph of it lives)."""
        for key, g in list(self.graphs.items()):
            if any(s is sink for s in g.sinks):
                self.retired.append(self.graphs.pop(key).graph)

    def close(self):
        self.graphs.clear()
        self.retired.clear()


def steady_key(kvs: list[BlockStepKV], inputs) -> tuple | None:
    """What fixes a tick's graph, or None when a ring is still filling (the first clip: the
    attention's lengths change from tick to tick)."""
    tokens = inputs.ring_rows.shape[1]  # each block-step's
    if any(kv.token_start + tokens < kv.ring.group.ring_len for kv in kvs):
        return None
    return tuple(inputs.latents.shape), tuple((id(kv.ring.group), kv.ring.index, id(kv.sink)) for kv in kvs)


class CaptureStream:
    """The stream a model's ticks are captured on, one for the model's life; `warm` once a tick
    has run on it outside any capture (the libraries' per-stream workspaces made there)."""

    def __init__(self, device):
        self.stream = torch.cuda.Stream(device)
        self.warm = False


class CudaCapture:
    """Captures one run's graphs on the model's CaptureStream into one memory pool."""

    def __init__(self, on: CaptureStream):
        self.on = on
        self.pool = None

    def __call__(self, fn):
        graph, stream = torch.cuda.CUDAGraph(), self.on.stream
        current = torch.cuda.current_stream(stream.device)
        stream.wait_stream(current)  # the graph's inputs are made on the run's stream
        try:
            with torch.cuda.stream(stream):
                if not self.on.warm:
                    fn()  # its rings' writes are rewritten by the replay that follows the capture
                    self.on.warm = True
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                # thread_local: the audio encoder and the mp4 writer may call CUDA from other threads meanwhile
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    output = fn()
                finally:
                    graph.capture_end()
        finally:
            current.wait_stream(stream)  # the run goes on after what ran here, also after a failure
        return graph, output
