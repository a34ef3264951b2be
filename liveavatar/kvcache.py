"""The streaming DiT's keys/values, and the attention's view of them.

Per model copy (one, or one per GPU with one denoising step per GPU):
- `SinkStore`: the prefilled sink, ONE for all the copy's denoising steps. Per layer: the
  reference tokens' un-roped keys (re-roped at each block-step's rolling position, so they
  cannot be shared roped), the motion tokens' keys (roped at fixed positions) and the values of
  all sink tokens.
- `StepRings`: per layer one buffer [steps, ring, heads, head_dim] of keys and one of values:
  each step's ring of the last clip's tokens at that step's noise level, written at
  `token_start` modulo the ring length.
Stored in the compute dtype, or as float8_e4m3fn with one fp32 scale per token (half the bytes).

A block-step attends to three segments: [its reference keys at its rolling position, the
sink's reference values], [motion keys, motion values], [its step's ring up to the tokens
written] (attention.KV). They are handed to liveavatar.attention as they are (never copied
into one buffer in the store); a tick's block-steps of consecutive steps, one sink and equally
full rings go in one call.

The DiT sees only `SinkStore.keep` (prefill) and a `TickKV`'s `write` / `attend` (a forward).
The stores hold tensors only: the model's kernels (kernels.Kernels) and attention choice are
handed in by the DiT with each call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import attention
from .attention import KV
from .kernels import Kernels

FP8 = torch.float8_e4m3fn


def _stored(x: torch.Tensor, fp8: bool, kernels: Kernels) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens x [N, H, D] as the store keeps them: a compact copy, or fp8 + per-token scales."""
    if not fp8:
        whole = x.is_contiguous() and x.untyped_storage().nbytes() == x.numel() * x.element_size()
        return (x if whole else x.contiguous().clone()), None  # a view of a larger tensor would keep it all
    data = torch.empty(x.shape, dtype=FP8, device=x.device)
    scales = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    kernels.write_tokens(x, data, scales)
    return data, scales


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """fp8 tokens as bytes (index_copy_ takes no float8)."""
    return x.view(torch.uint8) if x.dtype == FP8 else x


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class SinkStore:
    """The prefilled sink of one model copy, read by all its steps (see the module docstring).
    `fp8`: all of it stored as fp8 with per-token scales (the reference keys un-roped: they are
    dequantised and roped for every block-step)."""

    def __init__(self, fp8: bool = False):
        self.fp8 = fp8
        self.ref_len = self.length = self.dtype = None
        self.ref_keys, self.ref_key_scales = [], []
        self.motion_keys, self.motion_key_scales, self.values, self.value_scales = [], [], [], []

    def keep(self, layer: int, ref_len: int, keys: torch.Tensor, roped_keys: torch.Tensor, values: torch.Tensor,
             kernels: Kernels):
        """Prefill of `layer` (in layer order): keys [S, H, D] normed, un-roped; roped_keys the same
        roped at the sink positions; values [S, H, D]; the first ref_len tokens are the reference."""
        if layer != len(self.ref_keys):
            raise RuntimeError(f"sink layers must be kept in order: got layer {layer}, expected {len(self.ref_keys)}")
        self.ref_len, self.length, self.dtype = ref_len, keys.shape[0], keys.dtype
        for data, scales, x in ((self.ref_keys, self.ref_key_scales, keys[:ref_len]),
                                (self.motion_keys, self.motion_key_scales, roped_keys[ref_len:]),
                                (self.values, self.value_scales, values)):
            stored, token_scales = _stored(x, self.fp8, kernels)
            data.append(stored)
            scales.append(token_scales)

    def segments(self, layer: int, ref_keys: torch.Tensor) -> list[KV]:
        """The sink's two segments for block-steps whose roped reference keys are ref_keys [B, ref_len, H, D]."""
        r = self.ref_len
        v, v_scale = self.values[layer], self.value_scales[layer]
        one = (lambda t: None if t is None else t.unsqueeze(0))
        return [KV(ref_keys, v[:r].unsqueeze(0), None, one(v_scale[:r] if v_scale is not None else None)),
                KV(self.motion_keys[layer].unsqueeze(0), v[r:].unsqueeze(0), one(self.motion_key_scales[layer]),
                   one(v_scale[r:] if v_scale is not None else None))]

    def roped_reference_keys(self, layer: int, tables: list, kernels: Kernels) -> torch.Tensor:
        """The layer's reference keys roped at each block-step's position: tables [(cos, sin)] per
        block-step -> [B, ref_len, H, D] in the compute dtype (one pass each, straight into place)."""
        source, scales = self.ref_keys[layer], self.ref_key_scales[layer]
        if scales is not None:
            stored = source
            source = torch.empty(stored.shape, dtype=self.dtype, device=stored.device)
            kernels.dequantize_tokens(stored[None], scales[None], source[None])
        out = torch.empty((len(tables), *source.shape), dtype=self.dtype, device=source.device)
        for j, (cos, sin) in enumerate(tables):
            kernels.rope(source, cos, sin, out=out[j])
        return out

    def nbytes(self) -> int:
        return _nbytes(*self.ref_keys, *self.ref_key_scales, *self.motion_keys, *self.motion_key_scales, *self.values,
                       *self.value_scales)


class StepRings:
    """The rings of the denoising steps one model copy runs: per layer keys and values
    [steps, ring_len, heads, head_dim] on that layer's device (+ per-token scales [steps,
    ring_len] fp32 when fp8), so consecutive steps' rings are one slice of one buffer."""

    def __init__(self, steps: int, ring_len: int, heads: int, head_dim: int, devices, dtype, fp8: bool = False):
        self.ring_len, self.dtype, self.fp8, self.count = ring_len, dtype, fp8, steps
        size = (steps, ring_len, heads, head_dim)
        store = FP8 if fp8 else dtype
        self.keys = [torch.zeros(size, dtype=store, device=d) for d in devices]
        self.values = [torch.zeros(size, dtype=store, device=d) for d in devices]
        self.key_scales = [torch.ones(size[:2], device=d) for d in devices] if fp8 else None
        self.value_scales = [torch.ones(size[:2], device=d) for d in devices] if fp8 else None

    def views(self) -> list["StepRing"]:
        """One StepRing per step (made on request: a list kept here would be a reference cycle,
        and the buffers would wait for the garbage collector after a run)."""
        return [StepRing(self, i) for i in range(self.count)]

    def _scales(self, layer: int, index, rows):
        if not self.fp8:
            return None, None
        return self.key_scales[layer][index, rows], self.value_scales[layer][index, rows]

    def rows(self, index: int, token_start: int, count: int, device) -> torch.Tensor:
        """Where tokens token_start .. + count of step `index` go, as rows of a layer's buffer seen
        as [steps * ring_len, ...] ([count] int64 on `device`, made there)."""
        return torch.arange(count, device=device) + (index * self.ring_len + token_start % self.ring_len)

    def valid_after(self, token_start: int, count: int) -> int:
        """Ring tokens valid once tokens token_start .. + count are written."""
        return self.ring_len if token_start >= self.ring_len else token_start + count

    def write(self, layer: int, rows: torch.Tensor, norm_k, k, v, cos, sin, kernels: Kernels):
        """Tokens of any of this group's steps into their rows (`rows` [N] from StepRings.rows, a
        tensor so that a tick replayed as a CUDA graph writes where its blocks go): keys k [N, dim]
        straight from the projection, normed and roped in one pass; values [N, H, D]."""
        n, keys, values = k.shape[0], self.keys[layer].flatten(0, 1), self.values[layer].flatten(0, 1)
        new_k = torch.empty((n, *keys.shape[1:]), dtype=keys.dtype, device=k.device)
        k_scales = torch.empty(n, device=k.device) if self.fp8 else None
        norm_k.forward_rope(k, cos, sin, keys.shape[1], out=new_k, out_scales=k_scales)
        _bytes(keys).index_copy_(0, rows, _bytes(new_k))
        if not self.fp8:
            values.index_copy_(0, rows, v)
            return
        new_v, v_scales = torch.empty(v.shape, dtype=FP8, device=v.device), torch.empty(n, device=v.device)
        kernels.write_tokens(v, new_v, v_scales)
        _bytes(values).index_copy_(0, rows, _bytes(new_v))
        self.key_scales[layer].view(-1).index_copy_(0, rows, k_scales)
        self.value_scales[layer].view(-1).index_copy_(0, rows, v_scales)

    def segment(self, layer: int, index, valid: int) -> KV:
        """Ring tokens [0, valid) of step(s) `index` (an int, or a slice of consecutive steps)."""
        batch = index if isinstance(index, slice) else slice(index, index + 1)
        k_scales, v_scales = self._scales(layer, batch, slice(0, valid))
        return KV(self.keys[layer][batch, :valid], self.values[layer][batch, :valid], k_scales, v_scales)

    def nbytes(self) -> int:
        return _nbytes(*self.keys, *self.values, *(self.key_scales or ()), *(self.value_scales or ()))


@dataclass
class StepRing:
    """One denoising step's rows of a StepRings."""

    group: StepRings
    index: int


@dataclass
class BlockStepKV:
    """What one block-step reads and writes: its step's ring, the sink of its clip, the RoPE time
    of the reference tokens now (rolling sink), and where its tokens go (frame_start * frame tokens)."""

    ring: StepRing
    sink: SinkStore
    ref_time: int
    token_start: int


class TickKV:
    """The caches as one forward of B block-steps sees them (the DiT's whole interface to them).
    `ref_tables`: per item the RoPE tables (cos, sin) of the reference tokens at its rolling
    position; `ring_rows` [B, n]: the ring rows each item's tokens go to (StepRings.rows); both
    on the model's device. `attention_items` caps the block-steps per attention call (0: no cap)
    to bound the buffer an attention call copies into; `kernels` and `gather_all` are the
    model's (its Kernels and RunOptions.attention == "gather")."""

    def __init__(self, items: list[BlockStepKV], ref_tables: list, ring_rows: torch.Tensor, kernels: Kernels,
                 attention_items: int = 0, gather_all: bool = False):
        self.items, self.kernels, self.gather_all = items, kernels, gather_all
        self.attention_items = attention_items or len(items)
        self.valid = [0] * len(items)
        self._inputs = {ring_rows.device: (ref_tables, ring_rows)}  # device -> (tables, rows) there

    def write(self, layer: int, norm_k, k, v, cos, sin):
        """k [B*n, dim] (projections), v [B*n, H, D], cos/sin per token: each item's rows into its
        ring, in one pass (a forward's items are one model copy's: one StepRings)."""
        group = self.items[0].ring.group
        if any(item.ring.group is not group for item in self.items):
            raise RuntimeError("the block-steps of one forward write the rings of one model copy")
        group.write(layer, self._on(k.device)[1].flatten(), norm_k, k, v, cos, sin, self.kernels)
        n = k.shape[0] // len(self.items)
        self.valid = [group.valid_after(item.token_start, n) for item in self.items]

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q [B, n, H, D] (roped) -> attention over each item's sink and ring, [B, n, H, D]."""
        tables = self._on(q.device)[0]
        groups = self._groups()
        out = None if len(groups) == 1 else torch.empty(q.shape, dtype=q.dtype, device=q.device)
        for group in groups:
            first = self.items[group[0]]
            ref_keys = first.sink.roped_reference_keys(layer, [tables[j] for j in group], self.kernels)
            index = slice(first.ring.index, first.ring.index + len(group))
            segments = first.sink.segments(layer, ref_keys) + [first.ring.group.segment(layer, index, self.valid[group[0]])]
            result = attention.attend(q[group[0]:group[-1] + 1], segments, self.kernels, self.gather_all)
            if out is None:
                return result
            out[group[0]:group[-1] + 1] = result
            del ref_keys, segments, result  # one group's buffers at a time
        return out

    def _groups(self) -> list[list[int]]:
        """Runs of items attended in one call: consecutive steps of one StepRings, one sink,
        equally many valid ring tokens (full rings: every tick after the first clip), at most
        attention_items long."""
        groups = []
        for j, item in enumerate(self.items):
            if groups:
                last = self.items[groups[-1][-1]]
                if (len(groups[-1]) < self.attention_items and item.ring.group is last.ring.group
                        and item.ring.index == last.ring.index + 1 and item.sink is last.sink
                        and self.valid[j] == self.valid[groups[-1][-1]]):
                    groups[-1].append(j)
                    continue
            groups.append([j])
        return groups

    def _on(self, device) -> tuple:
        if device not in self._inputs:  # layers sharded over GPUs: copied once per GPU
            tables, rows = next(iter(self._inputs.values()))
            self._inputs[device] = ([tuple(t.to(device, non_blocking=True) for t in pair) for pair in tables],
                                    rows.to(device, non_blocking=True))
        return self._inputs[device]
