"""VAE decode overlapped with sampling: a clean block's decode runs on its own CUDA stream
while the DiT works on the next tick, so end-to-end speed approaches DiT-only speed.

    for block, frames in decode_alongside(streamer.blocks(), decoder.decode, vae_device):
        ...   # frames [3, 12, H, W] on the CPU, one block after the sampler produced it
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch


def decode_alongside(blocks: Iterable, decode: Callable[[torch.Tensor], torch.Tensor],
                     device) -> Iterator[tuple[object, torch.Tensor]]:
    """Yield (block, frames on the CPU) for every block of `blocks` in order.

    On CUDA, block b's decode is queued on a side stream of `device` (after the block's
    latents are ready) and handed over only once block b+1 has been queued by the sampler,
    so the host never waits for the DiT and the decode overlaps the next tick. Elsewhere the
    decode runs in line."""
    device = torch.device(device)
    if device.type != "cuda":
        for block in blocks:
            yield block, decode(block.latents).cpu()
        return
    side = torch.cuda.Stream(device)
    pending = None
    for block in blocks:
        queued = _queue_decode(block, decode, device, side)
        if pending is not None:
            yield _collect(*pending)
        pending = (block, *queued)
    if pending is not None:
        yield _collect(*pending)


def _queue_decode(block, decode, device, side):
    latents_ready = torch.cuda.current_stream(block.latents.device).record_event()
    with torch.cuda.device(device), torch.cuda.stream(side):
        side.wait_event(latents_ready)
        latents = block.latents.to(device, non_blocking=True)
        frames = decode(latents)
        host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
        host.copy_(frames, non_blocking=True)
        done = side.record_event()
    block.latents.record_stream(side)  # the sampler's allocator must not reuse it before the decode read it
    return host, done


def _collect(block, host, done):
    done.synchronize()
    return block, host
