"""Where the DiT's weights live and where each layer runs.

- `OneDevice(device)`: everything on one device.
- `Sharded(devices)`: whole transformer blocks spread evenly over several GPUs (each audio
  injector goes with the block it follows); activations hop between GPUs, weights never move,
  and each block is loaded straight onto its GPU (no full-model copy anywhere). A tick's
  block-steps go through one by one, so the GPUs work on different block-steps at once.
- `Offload(device, blocks)`: the last `blocks` transformer blocks stay in (pinned) CPU
  memory and are streamed into a few reusable GPU slots (3 by default) ahead of the layer
  that runs, as stored (fp8 stays fp8). The pipelined sampler runs all steps of a tick in
  one forward, so each block's weights cross the bus once per tick, not once per step.
- `StepPerGPU(devices)`: a full copy of the weights on every GPU; the denoising steps are
  dealt out over them (step s on GPU s mod N), each GPU holding its steps' caches and its
  own copy of the sink; a block's latents (a few MB) move GPU to GPU between steps.

The DiT's single layer loop asks `on_layer(i)` for the device, and the sampler asks
`step_models(steps)` which model copy runs each step; nothing else changes.
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch


_BLOCK = re.compile(r"blocks\.(\d+)\.")
_INJECTOR = re.compile(r"audio_injector\.(?:injector|injector_adain_layers)\.(\d+)\.")


def same_device(a, b) -> bool:
    """'cuda' (the current GPU) and 'cuda:0' are the same device here."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index or 0) == (b.index or 0)


class Placement:
    micro_batches = False  # run a tick's block-steps one by one (see Sharded)

    def __init__(self, device):
        self.device = torch.device(device)
        self.model = None
        self.inject_layers = ()  # the DiT layer each audio injector follows (set by bind)

    def layer_device(self, layer: int) -> torch.device:
        return self.device

    def device_for(self, name: str) -> torch.device:
        """Device of parameter `name` at load time."""
        layer = self.layer_of(name)
        return self.device if layer is None else self.layer_device(layer)

    def layer_of(self, name: str) -> int | None:
        if m := _BLOCK.match(name):
            return int(m.group(1))
        if m := _INJECTOR.match(name):
            if not self.inject_layers:
                raise RuntimeError("placement.bind(config) must come before placing audio injector weights")
            return self.inject_layers[int(m.group(1))]
        return None

    def bind(self, cfg):
        """Learn the model's layout before any weight is placed (the injectors go with the
        block they follow)."""
        self.inject_layers = tuple(cfg.audio_inject_layers)

    def attach(self, model):
        self.model = model
        model.placement = self

    def step_models(self, steps: int) -> list:
        return [self.model] * steps

    def copies(self) -> list:
        """Every copy of the weights (one, or one per GPU)."""
        return [self.model]

    @contextmanager
    def on_layer(self, layer: int):
        yield self.layer_device(layer)


class OneDevice(Placement):
    pass


class Sharded(Placement):
    micro_batches = True  # GPU k runs block-step j while GPU k+1 runs block-step j-1

    def __init__(self, devices, num_layers: int):
        super().__init__(devices[0])
        self.devices = [torch.device(d) for d in devices]
        self.num_layers = num_layers

    def layer_device(self, layer: int) -> torch.device:
        return self.devices[layer * len(self.devices) // self.num_layers]


class Offload(Placement):
    """`slots` reusable GPU copies of one block's tensors, filled in the order the layers run:
    while layer k computes, layers k+1 .. k+slots-1 are being copied (a side stream waits
    only for the compute that last used the slot). Weights cross the bus and compute in
    their storage dtype (fp8 storage: half the bytes and the fp8 matmuls)."""

    def __init__(self, device, blocks: int, num_layers: int, slots: int = 3):
        super().__init__(device)
        if not 0 <= blocks <= num_layers:
            raise ValueError(f"can offload 0 to {num_layers} blocks, not {blocks}")
        if slots < 2:
            raise ValueError(f"offload needs at least 2 weight slots (one computing, one loading), not {slots}")
        self.offloaded = list(range(num_layers - blocks, num_layers))
        self.slot_count = slots
        self.cuda = self.device.type == "cuda"
        self.slots = []  # per slot: device tensors shaped like one block's tensors
        self.loaded = {}  # slot index -> layer whose weights it holds (or is receiving)
        self.loads = 0  # copies started so far; the next one goes into slot loads % slots
        self.ready = {}  # slot index -> event: copy into it finished
        self.free = {}  # slot index -> event: last compute using it finished
        self.copy_stream = None  # made at attach: building one needs a CUDA runtime

    def device_for(self, name: str) -> torch.device:
        layer = self.layer_of(name)
        return torch.device("cpu") if layer in self.offloaded and _BLOCK.match(name) else self.device

    def attach(self, model):
        super().attach(model)
        for layer in self.offloaded:
            self._to_host(layer)
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
        self._make_slots()

    def set_blocks(self, blocks: int):
        """Change how many of the last blocks live in host memory, between runs (a memory plan:
        liveavatar.memory): blocks leaving the set are copied to the GPU, blocks joining it to
        pinned host memory (their GPU copies freed); the slots follow."""
        layers = len(self.model.blocks)
        if not 0 <= blocks <= layers:
            raise ValueError(f"can offload 0 to {layers} blocks, not {blocks}")
        wanted = list(range(layers - blocks, layers))
        self.slots = []  # freed before blocks come to the GPU and the new slots are made
        for layer in sorted(set(wanted) - set(self.offloaded)):
            self._to_host(layer)
        for layer in sorted(set(self.offloaded) - set(wanted)):
            for t in self._tensors(layer):
                t.data = t.data.to(self.device)
        self.offloaded = wanted
        self._make_slots()

    def _to_host(self, layer: int):
        for t in self._tensors(layer):
            host = t.data.to("cpu")
            t.data = host.pin_memory() if self.cuda else host

    def _make_slots(self):
        self.loaded, self.loads, self.ready, self.free = {}, 0, {}, {}
        if not self.offloaded:
            self.slots = []
            return
        template = self._tensors(self.offloaded[0])
        count = min(self.slot_count, len(self.offloaded))
        self.slots = [[torch.empty_like(t, device=self.device) for t in template] for _ in range(count)]

    def _tensors(self, layer: int) -> list[torch.Tensor]:
        block = self.model.blocks[layer]
        return list(block.parameters()) + list(block.buffers())

    @contextmanager
    def on_layer(self, layer: int):
        if layer not in self.offloaded:
            yield self.device
            return
        slot = self._prefetch(layer)
        tensors = self._tensors(layer)
        host = [t.data for t in tensors]
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        for t, staged in zip(tensors, self.slots[slot]):
            t.data = staged
        for ahead in self._following(layer):
            self._prefetch(ahead)
        try:
            yield self.device
        finally:
            for t, h in zip(tensors, host):
                t.data = h
            if self.cuda:
                self.free[slot] = torch.cuda.current_stream(self.device).record_event()

    def _following(self, layer: int) -> list[int]:
        """The offloaded layers that run next (cyclically: the next tick starts over), one
        per slot not used by `layer`."""
        i = self.offloaded.index(layer)
        ahead = min(len(self.slots), len(self.offloaded)) - 1
        return [self.offloaded[(i + k) % len(self.offloaded)] for k in range(1, ahead + 1)]

    def _prefetch(self, layer: int) -> int:
        """The slot holding (or receiving) `layer`'s weights; starts the copy if none does.
        Copies go round the slots in the order they are started, so the slot taken is the
        one whose layer ran longest ago."""
        for slot, held in self.loaded.items():
            if held == layer:
                return slot
        slot = self.loads % len(self.slots)
        self.loads += 1
        self.loaded[slot] = layer
        if not self.cuda:
            self._copy_into(slot, layer)
            return slot
        with torch.cuda.stream(self.copy_stream):
            if slot in self.free:
                self.copy_stream.wait_event(self.free[slot])
            self._copy_into(slot, layer)
            self.ready[slot] = self.copy_stream.record_event()
        return slot

    def _copy_into(self, slot: int, layer: int):
        for staged, t in zip(self.slots[slot], self._tensors(layer)):
            staged.copy_(t.data, non_blocking=self.cuda)


class StepPerGPU(Placement):
    def __init__(self, devices):
        if len(devices) < 2:
            raise ValueError(f"one denoising step per GPU needs at least 2 GPUs, got {len(devices)}")
        super().__init__(devices[0])
        self.devices = [torch.device(d) for d in devices]
        self.replicas = []

    def attach(self, model):
        """`model` was built on the first GPU; copy it, tensor by tensor, to the others."""
        from .loading import replicate  # loading builds models and imports nothing from here

        super().attach(model)
        self.replicas = [model] + [replicate(model, OneDevice(device)) for device in self.devices[1:]]

    def copies(self) -> list:
        return list(self.replicas)

    def step_models(self, steps: int) -> list:
        if steps < len(self.replicas):
            raise ValueError(f"{len(self.replicas)} GPUs with one denoising step each need at least "
                             f"{len(self.replicas)} steps, got {steps}")
        return [self.replicas[s % len(self.replicas)] for s in range(steps)]
