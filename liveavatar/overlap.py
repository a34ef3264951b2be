"""VAE decode overlapped with sampling: a clean block's decode runs on its own CUDA stream
while the DiT works on the next tick, so end-to-end speed approaches DiT-only speed.

    for block, frames in decode_alongside(streamer.blocks(), decoder.decode, vae_device):
        ...   # frames [3, 12, H, W] on the CPU, one block after the sampler produced it

`decode` may return a tuple of tensors (say the frames and the latents as float32): each
reaches the CPU the same way, so the caller never has to read a GPU tensor itself (which
would make the host wait for the tick the sampler has just queued).
"""
from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Callable, Iterable, Iterator

import torch


def decode_alongside(blocks: Iterable, decode: Callable[[torch.Tensor], torch.Tensor],
                     device, prepare: Callable[[], object] | None = None) -> Iterator[tuple[object, torch.Tensor]]:
    """Yield (block, frames on the CPU) for every block of `blocks` in order. `prepare` (the
    decoder's priming) runs first, queued where the decodes run, before the first block is
    asked for: on CUDA it runs alongside the first block's sampling.

    On CUDA, block b's decode is queued on a side stream of `device` (after the block's
    latents are ready) and handed over only once block b+1 has been queued by the sampler,
    so the host never waits for the DiT and the decode overlaps the next tick. The first
    block is the exception: it is handed over as soon as it is decoded (the time to the first
    frame is one tick shorter; the GPU waits for that one decode once). Elsewhere the decode
    runs in line."""
    device = torch.device(device)
    if device.type != "cuda":
        if prepare is not None:
            _queue_prepare(prepare, device, None)
        for block in blocks:
            yield block, _on_cpu(decode(block.latents))
        return
    side = torch.cuda.Stream(device)
    if prepare is not None:
        _queue_prepare(prepare, device, side)
    yield from one_behind(blocks, lambda block: _queue_decode(block, decode, device, side),
                          lambda block, queued: _collect(block, *queued), first_at_once=True)


class DecodeQueue:
    """Blocks decoded alongside the sampling, each handed over as soon as its decode is done,
    not when the next block comes (in a live session the next block may wait for speech).
    On CUDA the decodes are queued on a side stream of `device`; elsewhere they run in line.

        queue.put(block)                      # after the sampler yields it
        for block, frames in queue.ready():   # decodes done by now (wait=True: all of them)
            ..."""

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], device,
                 prepare: Callable[[], object] | None = None):
        """prepare: the decoder's priming, queued at once (it runs while the first block waits)."""
        self.decode, self.device = decode, torch.device(device)
        self.side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pending: deque = deque()
        if prepare is not None:
            _queue_prepare(prepare, self.device, self.side)

    def put(self, block):
        if self.side is None:
            self.pending.append((block, _on_cpu(self.decode(block.latents)), None))
        else:
            self.pending.append((block, *_queue_decode(block, self.decode, self.device, self.side)))

    def ready(self, wait: bool = False) -> list[tuple[object, torch.Tensor]]:
        """(block, frames on the CPU) of the decodes done, in order (all of them with `wait`)."""
        out = []
        while self.pending:
            block, frames, done = self.pending[0]
            if done is not None and not wait and not done.query():
                break
            out.append(_collect(block, frames, done) if done is not None else (block, frames))
            self.pending.popleft()
        return out


def latents_on_cpu(blocks: Iterable) -> Iterator:
    """The blocks (sampler.Block) with their latents replaced by float32 CPU copies. On CUDA each
    copy is queued on a side stream of the latents' GPU once the block is ready and handed over
    once the next block has been queued (the first at once), so the host never waits for the
    tick it has just queued (a plain `.cpu()` would: the GPU then idles while the host queues the
    next tick). Elsewhere the copy is made in line, handed over in the same order."""
    sides: dict = {}

    def start(block):
        device = block.latents.device
        if device.type != "cuda":
            return block.latents.float().cpu(), None
        if device not in sides:
            sides[device] = torch.cuda.Stream(device)
        return _queue_decode(block, torch.Tensor.float, device, sides[device])

    def finish(block, queued):
        latents, done = queued
        if done is not None:
            done.synchronize()
        return replace(block, latents=latents)

    return one_behind(blocks, start, finish, first_at_once=True)


def one_behind(items: Iterable, start: Callable, finish: Callable, first_at_once: bool = False) -> Iterator:
    """finish(item, start(item)) for every item, each finished only once the next one is started
    (so the work started runs alongside the production of the next); with `first_at_once` the
    first item is finished right after it is started. When producing the next item fails (an
    error, a cancel), the item already started is still finished and yielded before the error
    goes on: a block sampled before a cancel is never lost."""
    pending = None
    try:
        for count, item in enumerate(items):
            started = start(item)
            if first_at_once and count == 0:
                yield finish(item, started)
                continue
            if pending is not None:
                last, pending = pending, None
                yield finish(*last)
            pending = (item, started)
    except GeneratorExit:  # the consumer stopped listening: nothing more to hand over
        raise
    except BaseException:
        if pending is not None:
            last, pending = pending, None
            yield finish(*last)
        raise
    if pending is not None:
        yield finish(*pending)


def _queue_prepare(prepare, device, side):
    if side is None:
        prepare()
        return
    side.wait_stream(torch.cuda.current_stream(device))  # its inputs (the portrait's latents) are made there
    with torch.cuda.device(device), torch.cuda.stream(side):
        prepare()


def _queue_decode(block, decode, device, side):
    latents_ready = torch.cuda.current_stream(block.latents.device).record_event()
    with torch.cuda.device(device), torch.cuda.stream(side):
        side.wait_event(latents_ready)
        latents = block.latents.to(device, non_blocking=True)
        decoded = decode(latents)
        host = tuple(map(_pinned_copy, decoded)) if isinstance(decoded, tuple) else _pinned_copy(decoded)
        done = side.record_event()
    block.latents.record_stream(side)  # the sampler's allocator must not reuse it before the decode read it
    return host, done


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy queued on the current (side) stream into page-locked memory: valid once its event is done."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _on_cpu(decoded):
    return tuple(t.cpu() for t in decoded) if isinstance(decoded, tuple) else decoded.cpu()


def _collect(block, host, done):
    done.synchronize()
    return block, host
