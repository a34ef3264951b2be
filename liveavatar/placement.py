"""Where the DiT's weights live and where each layer runs.

- `OneDevice(device)`: everything on one device.
- `Sharded(devices)`: whole transformer blocks spread evenly over several GPUs (each audio
  injector goes with the block it follows); activations hop between GPUs, weights never move,
  and each block is loaded straight onto its GPU (no full-model copy anywhere). A tick's
  block-steps go through one by one, so the GPUs work on different block-steps at once.
- `Offload(device, blocks)`: the last `blocks` transformer blocks stay in (pinned) CPU
  memory and are streamed into two reusable GPU slots just before they run, the next one
  copied while the current one computes. The pipelined sampler runs all steps of a tick in
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

from .layers import FP8_DTYPES

_BLOCK = re.compile(r"blocks\.(\d+)\.")
_INJECTOR = re.compile(r"audio_injector\.(?:injector|injector_adain_layers)\.(\d+)\.")


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
        self.scale_of = {}  # tensor index of an fp8 weight -> index of its scale (fp8 storage)
        self.staging = []  # per slot: device buffers the fp8 weights land in before the upcast

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
        self._plan_upcast(self.offloaded[0])
        template = self._tensors(self.offloaded[0])
        scales = set(self.scale_of.values())
        self.slots = [[torch.ones((), device=self.device) if i in scales else
                       torch.empty_like(t, device=self.device, dtype=torch.bfloat16 if i in self.scale_of else t.dtype)
                       for i, t in enumerate(template)] for _ in range(2)]
        self.staging = [{i: torch.empty_like(template[i], device=self.device) for i in self.scale_of} for _ in range(2)]

    def _plan_upcast(self, layer: int):
        """fp8 storage: the weights cross the bus as fp8 (half the bytes) and are upcast to
        bf16 in the slot, so the block computes with plain bf16 matmuls; the slot's scale then
        reads 1. (Chosen before the fused fp8 kernels existed; fp8 compute in the slot is
        untested here and may be faster now.)"""
        names = self._names(layer)
        index = {name: i for i, name in enumerate(names)}
        tensors = self._tensors(layer)
        for i, name in enumerate(names):
            scale = index.get(name.removesuffix(".weight") + ".scale_weight")
            if name.endswith(".weight") and scale is not None and tensors[i].dtype in FP8_DTYPES:
                self.scale_of[i] = scale

    def _names(self, layer: int) -> list[str]:
        block = self.model.blocks[layer]
        return [n for n, _ in block.named_parameters()] + [n for n, _ in block.named_buffers()]

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
            self._copy_into(slot, layer)
            return slot
        with torch.cuda.stream(self.copy_stream):
            if slot in self.free:
                self.copy_stream.wait_event(self.free[slot])
            self._copy_into(slot, layer)
            self.ready[slot] = self.copy_stream.record_event()
        return slot

    def _copy_into(self, slot: int, layer: int):
        host = self._tensors(layer)
        scales = set(self.scale_of.values())
        for i, (staged, t) in enumerate(zip(self.slots[slot], host)):
            if i in self.scale_of:
                fp8 = self.staging[slot][i]
                fp8.copy_(t.data, non_blocking=self.cuda)
                scale = host[self.scale_of[i]].data.to(self.device, non_blocking=self.cuda)
                torch.mul(fp8.to(torch.bfloat16), scale.to(torch.bfloat16), out=staged)  # Linear.weight_as's math
            elif i not in scales:
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
