"""How much GPU memory a streaming run needs, and the settings that make it fit a cap.

`plan_memory(model, shape, ...)` estimates, per GPU the placement uses, the bytes of:
weights (as placed; offloaded blocks' GPU slots apart), KV rings, the sink (two during the
switch to the refreshed sink when the pipelined schedule overlaps them), text/audio context,
the activations of a tick (by the block's phases, below), the caller's working memory (the VAE
decoding alongside, an audio encoder: `reserve_bytes`) and an allocator reserve; and the pinned
host memory of offloaded blocks. Against a limit per GPU (`memory_cap_gib`, else the free
memory) it picks, fastest first, the first setting that fits. A cap stands for a card of that
size: tensors of other models in the process (allocated on that GPU and not the model's own)
count against it. The settings, in order:
1. the fewest offloaded blocks (an `Offload` placement; more blocks cross the host link per tick);
2. then the least activation trimming: both sinks held during the switch; only one (the
   refreshed sink waits until clip 0 is done: the pipeline drains once); one attention call
   per block-step instead of one per tick; the feed-forward in row chunks.
The KV dtype is what the run asks for (default fp8 for 16-bit models). When nothing fits,
`MemoryPlanError` says what the run needs where, and which setting to change.

Tick activations (bytes; X = tokens of the tick * dim; e_c compute itemsize, e_h itemsize of
a block's normed inputs: 1 for fp8 weights on a GPU with the fused kernels and fp8 products
(fp8 rows), else e_c). The fp32 residual
stream (4X) is held by the layer loop while a block makes the next one, so a block holds
two or three of them; the largest phases:
- self-attention: 4X + e_h X + e_c X (q) + the buffer one attention call copies into
  (2 g (sink [+ ring for an fp8 cache]) dim e_c, g block-steps per call) + the call's output
  (+ the tick's output when there are several calls; + the two partial outputs merged by
  log-sum-exp for a bf16 cache) + the re-roped reference keys;
- q/k/v: 4X + e_h X + 3 e_c X;
- second residual update and norm: 3 * 4X + 2 e_h X + e_c X;
- feed-forward: 2 * 4X + e_h X + rows * ffn_dim * (e_c + e_gelu) (+ e_c X assembling chunks;
  + two compute-dtype copies of the weight when fp8 weights are dequantised on a GPU);
- gated residual update: 3 * 4X + e_c X.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .settings import RunOptions

GIB = 2 ** 30
ALLOCATOR_RESERVE = (GIB // 2, 0.03)  # fixed + share of the limit: library workspaces, the allocator's rounding
FRAMES_PER_BLOCK = 3
MOTION_LATENTS = (1, 2, 16)  # FramePack buckets (dit.MOTION_BUCKETS): 1x, 2x, 4x patches
VAE_DECODE_GIB = (0.0, 1.48e-5)  # streaming decode peak ~ a + b * pixels, from docs/benchmarks.md (Wan2.1 VAE, bf16)


class MemoryPlanError(ValueError):
    """The run cannot fit the memory it may use; the message names the settings to change."""


@dataclass(frozen=True)
class RunShape:
    """What a run asks of the DiT's memory."""

    latent_h: int
    latent_w: int
    infer_frames: int = 48
    steps: int = 4
    pipelined: bool = True
    refresh: bool = True  # more than one clip: the sink is refreshed after clip 0
    text_tokens: int | None = None  # cross-attention keys per layer (None: the model's text_len)

    @property
    def frame_tokens(self) -> int:
        return (self.latent_h // 2) * (self.latent_w // 2)

    @property
    def motion_tokens(self) -> int:
        """FramePack: 1 latent as 1x2x2 patches, 2 as 2x4x4, 16 as 4x8x8 (dit.FramePacker)."""
        h, w = self.latent_h, self.latent_w
        one, two, four = MOTION_LATENTS
        return one * (h // 2) * (w // 2) + two // 2 * (h // 4) * (w // 4) + four // 4 * (h // 8) * (w // 8)

    @property
    def sink_tokens(self) -> int:
        return self.frame_tokens + self.motion_tokens

    @property
    def ring_tokens(self) -> int:
        return self.infer_frames // 4 * self.frame_tokens

    @property
    def block_tokens(self) -> int:
        return FRAMES_PER_BLOCK * self.frame_tokens

    def describe(self) -> str:
        return (f"{self.latent_w * 8}*{self.latent_h * 8} ({self.frame_tokens} tokens per latent frame), "
                f"infer_frames {self.infer_frames}, {self.steps} steps")


ATTENTION_BUFFER = GIB // 2  # untrimmed: block-steps per attention call while its copied buffer stays under this


@dataclass(frozen=True)
class Trim:
    """Activation trimming, least first (see the module docstring)."""

    sink_overlap: bool = True
    attention_items: int = 0  # block-steps per attention call; 0 = as many as ATTENTION_BUFFER allows
    ffn_chunks: int = 1  # the feed-forward's rows in this many chunks

    def ffn_rows(self, tokens: int) -> int:
        return 0 if self.ffn_chunks <= 1 else math.ceil(tokens / self.ffn_chunks)

    def items_per_call(self, shape: "RunShape", dim: int, ring_copied: bool, compute_itemsize: int) -> int:
        """Block-steps per attention call: the buffer a call copies (sink, + ring when fp8 or
        gathered, keys and values) is one block-step's at 704*384 (313 MB) and all four at
        384*256 (456 MB); a big call is as efficient alone as batched, small ones gain from batching."""
        if self.attention_items:
            return self.attention_items
        copied = 2 * (shape.sink_tokens + (shape.ring_tokens if ring_copied else 0)) * dim * compute_itemsize
        return max(1, min(shape.steps, ATTENTION_BUFFER // copied))


TRIMS = (Trim(), Trim(sink_overlap=False), Trim(False, 1), Trim(False, 1, 4), Trim(False, 1, 8))


@dataclass
class DeviceMemory:
    device: str
    parts: dict = field(default_factory=dict)  # category -> bytes
    limit: int | None = None
    limit_source: str = ""  # "memory_cap_gib 30" or "free memory"

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.limit is None or self.total <= self.limit


@dataclass
class MemoryPlan:
    """The chosen settings and the estimate they were chosen by."""

    shape: RunShape
    kv_fp8: bool
    trim: Trim
    offload_blocks: int | None  # None: the placement offloads nothing
    devices: list  # DeviceMemory per GPU (or CPU device) the model uses
    host_pinned: int  # offloaded blocks' pinned host copies
    copied_per_tick: int  # weight bytes crossing the host link per tick (pipelined) / per forward
    attention_items: int = 0  # block-steps per attention call (Trim.items_per_call)

    @property
    def ffn_rows(self) -> int:
        return self.trim.ffn_rows(self.shape.steps * self.shape.block_tokens)

    @property
    def sink_overlap(self) -> bool:
        return self.trim.sink_overlap

    def room_for_graphs(self) -> bool:
        """Whether the main GPU holds another tick's activations beside the plan (the memory pool of
        a run's CUDA graphs, graphs.py)."""
        main = self.devices[0]
        return main.limit is None or main.total + main.parts.get("tick activations", 0) <= main.limit

    def apply(self, model):
        """Set the placement's offloaded blocks to the plan's (between runs)."""
        placement = model.placement
        if self.offload_blocks is not None and len(placement.offloaded) != self.offload_blocks:
            placement.set_blocks(self.offload_blocks)

    def table(self) -> str:
        """Markdown: the estimate per device and category, in GiB."""
        names = list(dict.fromkeys(k for d in self.devices for k in d.parts))
        lines = ["| part | " + " | ".join(d.device for d in self.devices) + " |",
                 "|---" * (len(self.devices) + 1) + "|"]
        for name in names:
            lines.append(f"| {name} | " + " | ".join(f"{d.parts.get(name, 0) / GIB:.2f}" for d in self.devices) + " |")
        lines.append("| **total** | " + " | ".join(f"**{d.total / GIB:.2f}**" for d in self.devices) + " |")
        lines.append("| limit | " + " | ".join("-" if d.limit is None else f"{d.limit / GIB:.2f} ({d.limit_source})"
                                              for d in self.devices) + " |")
        return "\n".join(lines)

    def summary(self) -> str:
        offload = "" if self.offload_blocks is None else f", {self.offload_blocks} blocks offloaded"
        return (f"KV cache {'fp8' if self.kv_fp8 else 'compute dtype'}{offload}, sinks overlapped: "
                f"{self.trim.sink_overlap}, block-steps per attention call: {self.attention_items}, "
                f"feed-forward chunks: {self.trim.ffn_chunks}; peak estimate "
                + ", ".join(f"{d.device} {d.total / GIB:.1f} GiB" for d in self.devices))


# ---- the model as placed ------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """What the estimate needs of a model: its config, dtypes, and where weights, steps and
    layers are. From a built model (`of_model`) or, before loading, from the config, the weight
    storage and the placement (`of_config`)."""

    cfg: object
    compute_itemsize: int
    fp8_weights: bool  # fp8 linear weights
    gpu: bool  # runs on GPUs (fused kernels; False: CPU reference paths)
    devices: list  # torch.device per device used
    weights: dict  # device -> bytes resident (all copies), offloaded blocks and slots excluded
    block_bytes: list  # per layer: bytes of its block's tensors
    layer_devices: list  # per copy: per layer device
    copy_steps: list  # per copy: how many steps it runs
    micro_batches: bool  # a tick's block-steps go one by one (sharded)
    offload: object = None  # the Offload placement, if any
    main: torch.device = None
    fp8_rows: bool = False  # fp8 weights fed fp8 rows (GPU, fused kernels, fp8 products)
    fp8_dequantized: bool = False  # fp8 weights dequantised for each product on a GPU (fp8_compute)
    gather_all: bool = False  # attention copies the ring too (RunOptions.attention "gather")
    loaded: bool = False  # the weights (and offload slots) are in GPU memory already (of_model)

    @classmethod
    def of_model(cls, model, steps: int) -> "ModelSpec":
        placement = model.placement
        copies = model.copies()
        offload = placement if placement is not None and hasattr(placement, "set_blocks") else None
        weights, seen = {}, set()
        for copy in copies:
            for t in _tensors(copy):
                if t.data_ptr() not in seen and (t.device.type != "cpu" or model.device.type == "cpu"):
                    seen.add(t.data_ptr())
                    weights[t.device] = weights.get(t.device, 0) + t.numel() * t.element_size()
        if offload is not None and model.device.type == "cpu":  # a CPU stand-in for the GPU (tests)
            weights[model.device] -= sum(t.numel() * t.element_size() for layer in offload.offloaded
                                         for t in _tensors(model.blocks[layer]))
        step_models = model.step_models(steps)
        weight = model.blocks[0].ffn[0].weight
        return cls._make(model.cfg, _itemsize(model.head.head.compute_dtype), weight.dtype == torch.float8_e4m3fn,
                         model.device, weights, [sum(t.numel() * t.element_size() for t in _tensors(b))
                                                 for b in model.blocks],
                         [[c.layer_device(i) for i in range(len(c.blocks))] for c in copies],
                         [sum(1 for m in step_models if m is c) for c in copies], placement, offload,
                         model.options, loaded=True)

    @classmethod
    def of_config(cls, cfg, storage: str, placement, steps: int, options: RunOptions = RunOptions()) -> "ModelSpec":
        """Before loading: bytes from the parameter shapes and the storage rules of loading.py."""
        from .dit import LiveAvatarDiT
        from .loading import STORAGE_DTYPES, _fp8_eligible
        placement.bind(cfg)
        copies = len(getattr(placement, "devices", [])) if hasattr(placement, "replicas") else 1
        copy_devices = placement.devices if copies > 1 else [placement.device]
        weights, blocks = {}, [0] * cfg.num_layers
        with torch.device("meta"):
            meta = LiveAvatarDiT(cfg, options)
        for name, tensor in meta.state_dict().items():
            module_name, _, attr = name.rpartition(".")
            dtype = STORAGE_DTYPES[storage]
            if dtype == torch.float8_e4m3fn:  # as loading._set_tensor stores it: fp8 + a scale, or bf16
                fp8 = _fp8_eligible(module_name, meta.get_submodule(module_name), attr)
                size = tensor.numel() + 4 if fp8 else tensor.numel() * 2
            else:
                size = tensor.numel() * dtype.itemsize
            if name.startswith("blocks."):
                blocks[int(name.split(".")[1])] += size
            for device in copy_devices:
                where = placement.device_for(name) if copies == 1 else torch.device(device)
                if where.type != "cpu" or placement.device.type == "cpu":
                    weights[where] = weights.get(where, 0) + size
        offload = placement if hasattr(placement, "set_blocks") else None
        if offload is not None and placement.device.type == "cpu":
            weights[placement.device] -= sum(blocks[i] for i in offload.offloaded)
        if copies > 1:
            layer_devices = [[torch.device(d)] * cfg.num_layers for d in copy_devices]
            copy_steps = [len(range(c, steps, copies)) for c in range(copies)]
        else:
            layer_devices, copy_steps = [[placement.layer_device(i) for i in range(cfg.num_layers)]], [steps]
        compute = STORAGE_DTYPES[storage] if storage in ("fp16", "fp32") else torch.bfloat16
        return cls._make(cfg, _itemsize(compute), storage == "fp8", placement.device, weights, blocks, layer_devices,
                         copy_steps, placement, offload, options)

    @classmethod
    def _make(cls, cfg, compute_itemsize, fp8, main, weights, blocks, layer_devices, copy_steps, placement, offload,
              options: RunOptions, loaded: bool = False):
        layer_devices = [[_indexed(d) for d in per_copy] for per_copy in layer_devices]
        weights = {_indexed(d): v for d, v in weights.items()}
        devices = list(dict.fromkeys(d for per_copy in layer_devices for d in per_copy))
        for d in devices:
            weights.setdefault(d, 0)
        main = _indexed(main)
        gpu = main.type != "cpu"
        fp8_products = fp8 and gpu and options.fp8_compute == "auto"  # assumed to work, as the kernels are
        return cls(cfg, compute_itemsize, fp8, gpu, devices, weights, blocks, layer_devices, copy_steps,
                   bool(placement and placement.micro_batches), offload, main,
                   fp8_rows=fp8_products and options.kernels != "off", fp8_dequantized=fp8 and gpu and not fp8_products,
                   gather_all=options.attention == "gather", loaded=loaded)


def _indexed(device) -> torch.device:
    """'cuda' and 'cuda:0' name one GPU: the plan keys its parts by the indexed name, as tensors report it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _tensors(module) -> list:
    return list(module.parameters()) + list(module.buffers())


def _itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---- the estimate -------------------------------------------------------------------------------------
def kv_ring_bytes(shape: RunShape, dim: int, steps: int, layers: int, kv_fp8: bool, compute_itemsize: int) -> int:
    """Keys + values of `steps` rings over `layers` layers (+ one fp32 scale per token when fp8)."""
    per_token = dim * (1 if kv_fp8 else compute_itemsize) + (4 if kv_fp8 else 0)
    return steps * layers * 2 * shape.ring_tokens * per_token


def sink_bytes(shape: RunShape, dim: int, layers: int, kv_fp8: bool, compute_itemsize: int) -> int:
    """One SinkStore: keys (reference un-roped, motion roped) and values of the sink's tokens."""
    per_token = dim * (1 if kv_fp8 else compute_itemsize) + (4 if kv_fp8 else 0)
    return layers * 2 * shape.sink_tokens * per_token


def context_bytes(shape: RunShape, cfg, layers: int, copy_steps: int, compute_itemsize: int) -> int:
    """Text keys/values of every layer + the steps' modulation (fp32) + the RoPE tables of the
    blocks in flight (fp32 cos/sin, kept per block)."""
    text = layers * 2 * (shape.text_tokens or cfg.text_len) * cfg.dim * compute_itemsize
    modulation = copy_steps * FRAMES_PER_BLOCK * 7 * cfg.dim * 4
    rope = copy_steps * shape.block_tokens * cfg.head_dim * 4
    return text + modulation + rope


def activation_bytes(shape: RunShape, cfg, items: int, trim: Trim, ring_copied: bool, compute_itemsize: int,
                     normed_itemsize: int, gelu_itemsize: int, weight_copies: int = 0) -> int:
    """Peak bytes of one forward of `items` block-steps (see the module docstring), or of the
    sink prefill if larger. ring_copied: attention copies the ring too (an fp8 cache, or
    attention "gather"), else it merges two partial outputs."""
    n = shape.block_tokens
    tokens = items * n
    x = tokens * cfg.dim
    e_c, e_h = compute_itemsize, normed_itemsize
    per_call = min(trim.items_per_call(shape, cfg.dim, ring_copied, compute_itemsize), items)
    calls = math.ceil(items / per_call)
    copied_tokens = shape.sink_tokens + (shape.ring_tokens if ring_copied else 0)
    attention = (4 + e_h + e_c) * x + 2 * per_call * copied_tokens * cfg.dim * e_c + per_call * n * cfg.dim * e_c
    attention += per_call * shape.frame_tokens * cfg.dim * e_c  # re-roped reference keys
    if not ring_copied:
        attention += 2 * per_call * n * cfg.dim * e_c  # the two partial outputs merged by log-sum-exp
    if calls > 1:
        attention += e_c * x
    qkv = (4 + e_h + 3 * e_c) * x
    residual = (12 + 2 * e_h + e_c) * x
    rows = trim.ffn_rows(tokens) or tokens
    ffn = (8 + e_h) * x + rows * cfg.ffn_dim * (e_c + gelu_itemsize) + (e_c * x if rows < tokens else 0) + weight_copies
    gated = (12 + e_c) * x
    s = shape.sink_tokens * cfg.dim
    prefill = (12 + 2 * e_c) * s + 4 * e_c * s  # one forward of the sink's tokens, its q/k/v/roped keys
    frames = items * FRAMES_PER_BLOCK
    per_forward = 2 * tokens * cfg.head_dim // 2 * 4 + 2 * frames * 6 * cfg.dim * 4  # RoPE tables, modulation (fp32)
    return per_forward + max(attention, qkv, residual, ffn, gated, prefill)


def vae_decode_bytes(width: int, height: int) -> int:
    """Working memory of the streaming VAE decode of one block alongside the DiT (Live Video):
    measured peaks 1.3 GiB at 384*256 and 3.0 GiB at 704*384 decoding a latent per pass (bench.py,
    Wan2.1 VAE in bf16, weights included), +0.1 and +1.0 GiB since a block's 3 latents share a pass
    (vae_check.py), as a + b * pixels through those two points (1.45 / 4.0 GiB)."""
    a, b = VAE_DECODE_GIB
    return int((a + b * width * height) * GIB)


def _estimate(spec: ModelSpec, shape: RunShape, kv_fp8: bool, trim: Trim, offload_blocks, reserve: dict,
              limits: dict) -> MemoryPlan:
    cfg, layout = spec.cfg, spec
    e_c = spec.compute_itemsize
    # fp8 weights with the kernels on a GPU hand their normed inputs and GELU output on as fp8 rows
    e_h = 1 if spec.fp8_rows else e_c
    # 16-bit weights on a GPU: GELU in the matmul's epilogue (one tensor); elsewhere GELU makes a second one
    e_gelu = 1 if spec.fp8_rows else (0 if spec.gpu and not spec.fp8_weights else e_c)
    weight_copies = 2 * cfg.dim * cfg.ffn_dim * e_c if spec.fp8_dequantized else 0
    ring_copied = kv_fp8 or spec.gather_all
    device_parts = {d: {} for d in layout.devices}
    for d in layout.devices:
        device_parts[d]["weights"] = layout.weights.get(d, 0)
    host, copied = 0, 0
    if layout.offload is not None and offload_blocks is not None:
        now = set(layout.offload.offloaded)
        planned = set(range(cfg.num_layers - offload_blocks, cfg.num_layers))
        main = layout.main
        device_parts[main]["weights"] += sum(layout.block_bytes[i] for i in now - planned)
        device_parts[main]["weights"] -= sum(layout.block_bytes[i] for i in planned - now)
        slots = min(layout.offload.slot_count, offload_blocks)
        device_parts[main]["offload slots"] = slots * max((layout.block_bytes[i] for i in planned), default=0)
        host = copied = sum(layout.block_bytes[i] for i in planned)
    for copy, (layer_devices, steps) in enumerate(zip(layout.layer_devices, layout.copy_steps)):
        items = 1 if layout.micro_batches or not shape.pipelined else steps
        for d in dict.fromkeys(layer_devices):
            layers = layer_devices.count(d)
            parts = device_parts[d]
            sinks = 2 if shape.refresh and trim.sink_overlap and shape.pipelined else 1
            add = {"KV rings": kv_ring_bytes(shape, cfg.dim, steps, layers, kv_fp8, e_c),
                   "sink": sinks * sink_bytes(shape, cfg.dim, layers, kv_fp8, e_c),
                   "text/audio context": context_bytes(shape, cfg, layers, steps, e_c)}
            for k, v in add.items():
                parts[k] = parts.get(k, 0) + v
            act = activation_bytes(shape, cfg, items, trim, ring_copied, e_c, e_h, e_gelu, weight_copies)
            parts["tick activations"] = max(parts.get("tick activations", 0), act)
    devices = []
    for d in layout.devices:
        parts = device_parts[d]
        if reserve.get(d):
            parts["caller (VAE, audio)"] = reserve[d]
        limit, source = limits.get(d, (None, ""))
        fixed, share = ALLOCATOR_RESERVE
        if d.type != "cpu":
            parts["allocator reserve"] = int(fixed + share * (limit or sum(parts.values())))
        devices.append(DeviceMemory(str(d), parts, limit, source))
    return MemoryPlan(shape, kv_fp8, trim, offload_blocks, devices, host, copied,
                      trim.items_per_call(shape, cfg.dim, ring_copied, e_c))


# ---- limits -----------------------------------------------------------------------------------------------
def free_bytes(device: torch.device) -> int:
    """What a run may use on a GPU: the driver's free memory plus what PyTorch's allocator holds
    unused (a previous run's caches, freed but kept reserved)."""
    unused_reserve = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return torch.cuda.mem_get_info(device)[0] + unused_reserve


def _limits(layout: ModelSpec, memory_cap_gib: float | None) -> dict:
    """device -> (bytes, what set them). A cap applies to every GPU; without one the GPUs' free
    memory (plus the model's own weights already there); CPU devices have no limit unless capped."""
    limits = {}
    for d in layout.devices:
        available = others = None
        if d.type == "cuda":
            own = layout.weights.get(d, 0) + _slot_bytes(layout, d) if layout.loaded else 0
            available = free_bytes(d) + own
            others = max(0, torch.cuda.memory_allocated(d) - own)
        if memory_cap_gib:
            cap, source = int(memory_cap_gib * GIB), f"memory_cap_gib {memory_cap_gib:g}"
            if others:  # the cap stands for the whole card: other models' tensors in this process count
                cap -= others
                source += f", less {others / GIB:.1f} GiB of other tensors (other models) on {d}"
            if available is not None and available < cap:
                limits[d] = (available, f"{source}, but only {available / GIB:.1f} GiB free")
            else:
                limits[d] = (cap, source)
        elif available is not None:
            limits[d] = (available, "free memory")
    return limits


def _slot_bytes(layout: ModelSpec, device) -> int:
    if layout.offload is None or device != layout.main:
        return 0
    return sum(t.numel() * t.element_size() for slot in layout.offload.slots for t in slot)


# ---- the plan ----------------------------------------------------------------------------------------------
def plan_memory(model, shape: RunShape, kv_fp8: bool, memory_cap_gib: float | None = None,
                reserve_bytes: int | dict = 0, adapt_offload: bool = True) -> MemoryPlan:
    """The fastest settings that fit (module docstring), or MemoryPlanError. `model`: the DiT,
    or a ModelSpec (e.g. ModelSpec.of_config before loading, to pick a placement).
    `reserve_bytes`: the caller's working memory on the model's main device (or a dict device
    -> bytes). An Offload placement may move blocks between host and GPU (`adapt_offload`):
    with a cap to any split, without one only to more offloaded blocks than it has (its count
    is the user's choice)."""
    spec = model if isinstance(model, ModelSpec) else ModelSpec.of_model(model, shape.steps)
    limits = _limits(spec, memory_cap_gib)
    if isinstance(reserve_bytes, dict):
        reserve = {_indexed(k): v for k, v in reserve_bytes.items()}
    else:
        reserve = {spec.main: reserve_bytes}
    counts = [None]
    if spec.offload is not None:
        now = len(spec.offload.offloaded)
        lowest = 0 if memory_cap_gib else now
        counts = list(range(lowest, spec.cfg.num_layers + 1)) if adapt_offload and limits else [now]
    if not limits:  # nothing to fit (CPU, no cap): as the run asks, untrimmed
        return _estimate(spec, shape, kv_fp8, TRIMS[0], counts[0], reserve, limits)
    for count in counts:
        for trim in TRIMS:
            plan = _estimate(spec, shape, kv_fp8, trim, count, reserve, limits)
            if all(d.fits for d in plan.devices):
                return plan
    raise MemoryPlanError(_explain(spec, shape, kv_fp8, counts[-1], reserve, limits, memory_cap_gib))


def _explain(spec, shape, kv_fp8, count, reserve, limits, memory_cap_gib) -> str:
    """What the leanest setting still needs, where, and what to change."""
    lean = _estimate(spec, shape, kv_fp8, TRIMS[-1], count, reserve, limits)
    worst = max((d for d in lean.devices if d.limit is not None), key=lambda d: d.total - d.limit)
    parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in worst.parts.items() if v >= GIB // 100)
    rings = worst.parts.get("KV rings", 0)
    fixes = []
    if not kv_fp8:
        fixes.append(f"set kv_cache fp8 (saves about {rings / 2 / GIB:.1f} GiB)")
    if spec.offload is None and len(spec.devices) == 1 and not spec.micro_batches:
        per_block, slots = max(spec.block_bytes), 3  # Offload's default GPU slots
        blocks = math.ceil((worst.total - worst.limit) / per_block) + slots
        if blocks <= spec.cfg.num_layers:
            fixes.append(f"use placement 'offload blocks to CPU' (offload_blocks {blocks} or more)")
    fixes.append(f"lower the size or infer_frames (every 12 frames of infer_frames hold "
                 f"{rings * 12 / max(shape.infer_frames, 1) / GIB:.1f} GiB of KV rings here)")
    fixes.append("raise memory_cap_gib" if memory_cap_gib else "free GPU memory (other models), or use more GPUs")
    return (f"LiveAvatar: this run does not fit {worst.device} ({worst.limit / GIB:.1f} GiB: {worst.limit_source}). "
            f"At {shape.describe()}, even with the activations trimmed"
            f"{' and every block offloaded' if spec.offload is not None and count == spec.cfg.num_layers else ''}, "
            f"it needs {worst.total / GIB:.1f} GiB there ({parts} GiB). To fit: " + "; ".join(fixes) + ".")
