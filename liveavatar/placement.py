"""Where the DiT's weights live and where each layer runs.

- `OneDevice(device)`: everything on one device.
- `Sharded(devices)`: whole transformer blocks spread evenly over several GPUs (each audio
  injector goes with the block it follows); activations hop between GPUs, weights never move,
  and each block is loaded straight onto its GPU (no full-model copy anywhere).
- `Offload(device, blocks)`: the last `blocks` transformer blocks stay in (pinned) CPU
  memory and are streamed into two reusable GPU slots just before they run, the next one
  copied while the current one computes.

The DiT's single layer loop asks `on_layer(i)` for the device; nothing else changes.
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch

_BLOCK = re.compile(r"blocks\.(\d+)\.")
_INJECTOR = re.compile(r"audio_injector\.(?:injector|injector_adain_layers)\.(\d+)\.")


class Placement:
    def __init__(self, device):
        self.device = torch.device(device)
        self.model = None

    def layer_device(self, layer: int) -> torch.device:
        return self.device

    def device_for(self, name: str) -> torch.device:
        """Device of parameter `name` at load time."""
        layer = self.layer_of(name)
        return self.device if layer is None else self.layer_device(layer)

    def layer_of(self, name: str) -> int | None:
        if m := _BLOCK.match(name):
            return int(m.group(1))
        if (m := _INJECTOR.match(name)) and self.model is not None:
            return self.model.cfg.audio_inject_layers[int(m.group(1))]
        return None

    def attach(self, model):
        self.model = model
        model.placement = self

    @contextmanager
    def on_layer(self, layer: int):
        yield self.layer_device(layer)


class OneDevice(Placement):
    pass


class Sharded(Placement):
    def __init__(self, devices, num_layers: int, inject_layers=()):
        super().__init__(devices[0])
        self.devices = [torch.device(d) for d in devices]
        self.num_layers = num_layers
        self.inject_layers = tuple(inject_layers)

    def layer_device(self, layer: int) -> torch.device:
        return self.devices[layer * len(self.devices) // self.num_layers]

    def layer_of(self, name: str) -> int | None:
        if (m := _INJECTOR.match(name)) and self.inject_layers:
            return self.inject_layers[int(m.group(1))]
        return super().layer_of(name)


class Offload(Placement):
    def __init__(self, device, blocks: int, num_layers: int):
        super().__init__(device)
        if not 0 <= blocks <= num_layers:
            raise ValueError(f"can offload 0 to {num_layers} blocks, not {blocks}")
        self.offloaded = list(range(num_layers - blocks, num_layers))
        self.cuda = self.device.type == "cuda"
        self.slots = []  # two lists of device tensors shaped like one block's tensors
        self.loaded = {}  # slot index -> layer whose weights it holds
        self.current = None  # slot of the layer running now
        self.ready = {}  # slot index -> event: copy into it finished
        self.free = {}  # slot index -> event: last compute using it finished
        self.copy_stream = None  # made at attach: building one needs a CUDA runtime

    def device_for(self, name: str) -> torch.device:
        layer = self.layer_of(name)
        return torch.device("cpu") if layer in self.offloaded and _BLOCK.match(name) else self.device

    def attach(self, model):
        super().attach(model)
        if not self.offloaded:
            return
        for layer in self.offloaded:
            for t in self._tensors(layer):
                if self.cuda:
                    t.data = t.data.pin_memory()
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
        template = self._tensors(self.offloaded[0])
        self.slots = [[torch.empty_like(t, device=self.device) for t in template] for _ in range(2)]

    def _tensors(self, layer: int) -> list[torch.Tensor]:
        block = self.model.blocks[layer]
        return list(block.parameters()) + list(block.buffers())

    @contextmanager
    def on_layer(self, layer: int):
        if layer not in self.offloaded:
            yield self.device
            return
        slot = self.current = self._slot_of(layer)
        tensors = self._tensors(layer)
        host = [t.data for t in tensors]
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        for t, staged in zip(tensors, self.slots[slot]):
            t.data = staged
        self._prefetch(self._next_offloaded(layer))
        try:
            yield self.device
        finally:
            for t, h in zip(tensors, host):
                t.data = h
            self.current = None
            if self.cuda:
                self.free[slot] = torch.cuda.current_stream(self.device).record_event()

    def _slot_of(self, layer: int) -> int:
        for slot, held in self.loaded.items():
            if held == layer:
                return slot
        return self._prefetch(layer)

    def _next_offloaded(self, layer: int) -> int:
        i = self.offloaded.index(layer)
        return self.offloaded[(i + 1) % len(self.offloaded)]

    def _prefetch(self, layer: int) -> int:
        """Start copying `layer`'s weights into the slot not holding the running layer."""
        if layer in self.loaded.values():
            return next(s for s, held in self.loaded.items() if held == layer)
        slot = 1 if self.current == 0 else 0
        self.loaded[slot] = layer
        if not self.cuda:
            for staged, t in zip(self.slots[slot], self._tensors(layer)):
                staged.copy_(t.data)
            return slot
        with torch.cuda.stream(self.copy_stream):
            if slot in self.free:
                self.copy_stream.wait_event(self.free[slot])
            for staged, t in zip(self.slots[slot], self._tensors(layer)):
                staged.copy_(t.data, non_blocking=True)
            self.ready[slot] = self.copy_stream.record_event()
        return slot
