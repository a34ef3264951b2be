"""Attention of queries to keys/values held in several segments (the sink's parts and a
step's ring), without joining the segments in the cache.

A segment is a `KV`: keys/values [b, L, heads, head_dim] where b is the number B of block-steps
in the call or 1 (one segment read by all of them), in the compute dtype, or float8_e4m3fn with
one fp32 scale per token ([b, L]; value = stored * scale).

`attend(q, segments, kernels, gather_all)` is softmax(q K^T / sqrt(head_dim)) V over the union of
the segments' tokens, for each of the B block-steps: q [B, n, H, D] -> [B, n, H, D], with the
model's kernels (kernels.Kernels: the fused dequantise / merge passes, and which attention with
log-sum-exp works on a device, probed once per device). By default (RunOptions.attention auto):
- segments in the compute dtype with batch B (the rings of a bf16 cache) are attended where
  they lie; the others (the sink's parts, shared by the block-steps) are copied into one
  buffer per call; the partial results are merged exactly by their log-sum-exp
  (out = sum_i exp(lse_i - lse) out_i, lse = log sum_i exp(lse_i));
- with fp8 segments everything is dequantised into that buffer (PyTorch's attention takes no
  fp8, so the dequantised copy is made anyway) and attended in one call.
With gather_all=True (attention "gather") every segment is copied into that buffer and attended in
one call, no log-sum-exp merge (for comparing speed). Either way a call's extra memory is one
buffer of the segments it copies, freed on return.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import layers
from .kernels import Kernels

FP8 = getattr(torch, "float8_e4m3fn", None)


@dataclass
class KV:
    """One segment: k/v [b, L, H, D]; scales [b, L] fp32 for fp8 tokens, else None."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.k.shape[1]

    @property
    def quantised(self) -> bool:
        return self.k_scale is not None or self.v_scale is not None

    def values(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) in dtype (dequantised): the plain-PyTorch reading, for references and tests."""
        return tuple(x.to(dtype) if s is None else (x.float() * s[..., None, None].float()).to(dtype)
                     for x, s in ((self.k, self.k_scale), (self.v, self.v_scale)))


def attend(q: torch.Tensor, segments: list[KV], kernels: Kernels, gather_all: bool = False) -> torch.Tensor:
    batch = q.shape[0]
    if len(segments) == 1 and not segments[0].quantised and segments[0].k.dtype == q.dtype:
        return _sdpa(q, segments[0].k, segments[0].v)
    in_place = [s for s in segments if not s.quantised and s.k.shape[0] == batch == s.v.shape[0] and s.k.dtype == q.dtype]
    if in_place and not gather_all and _has_lse(q, kernels):
        ring = max(in_place, key=lambda s: s.length)  # the largest stays where it is
        rest = [s for s in segments if s is not ring]
        return merge([sdpa_lse(q, *gather(rest, batch, q.dtype, kernels), kernels),
                      sdpa_lse(q, ring.k, ring.v, kernels)], kernels)
    return _sdpa(q, *gather(segments, batch, q.dtype, kernels))


def attend_repeated_last(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, count: int,
                         kernels: Kernels) -> torch.Tensor:
    """Softmax attention of q [N, H, D] to k/v [L, H, D] whose last row stands for `count`
    identical rows (count 0: no such row; the prompt's padding): that key's weight is
    count * exp(score), i.e. its log-sum-exp is score + log(count), merged exactly with the
    attention over the other rows."""
    if count == 0:
        return layers.attend(q, k, v)
    queries = q.unsqueeze(0)
    repeated = v[-1].to(q.dtype).expand(queries.shape)
    if k.shape[0] == 1:  # only padding: every weight on the one value
        return repeated[0]
    if not _has_lse(queries, kernels):
        expanded = [torch.cat([t[:-1], t[-1:].expand(count, *t.shape[1:])]) for t in (k, v)]
        return layers.attend(q, *expanded)
    # the padding key's score in fp32, as the attention kernel computes it (its log-sum-exp over one key)
    _, score = sdpa_lse(queries, k[None, -1:], v[None, -1:], kernels)
    return merge([sdpa_lse(queries, k[None, :-1], v[None, :-1], kernels), (repeated, score + math.log(count))],
                 kernels)[0]


def gather(segments: list[KV], batch: int, dtype, kernels: Kernels) -> tuple[torch.Tensor, torch.Tensor]:
    """The segments' tokens one after another in one buffer [batch, sum L, H, D] of dtype:
    copied, broadcast from b=1, dequantised from fp8 (one pass each)."""
    first = segments[0].k
    length = sum(s.length for s in segments)
    shape = (batch, length, *first.shape[2:])
    k, v = (torch.empty(shape, dtype=dtype, device=first.device) for _ in range(2))
    start = 0
    for s in segments:
        rows = slice(start, start + s.length)
        for out, x, scale in ((k, s.k, s.k_scale), (v, s.v, s.v_scale)):
            if scale is None:
                out[:, rows].copy_(x)
            else:
                kernels.dequantize_tokens(x, scale, out[:, rows])
        start += s.length
    return k, v


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)  # [B, L, H, D] -> [B, H, L, D], the layout the fused SDPA kernels take


def _sdpa(q, k, v) -> torch.Tensor:
    if k.shape[0] != q.shape[0]:
        k, v = k.expand(q.shape[0], *k.shape[1:]), v.expand(q.shape[0], *v.shape[1:])
    return F.scaled_dot_product_attention(_heads_first(q), _heads_first(k), _heads_first(v)).transpose(1, 2)


# ---- attention with its log-sum-exp, and the exact merge ------------------------------------------
def sdpa_lse(q, k, v, kernels: Kernels) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q k^T / sqrt(D)) v [B, n, H, D], log-sum-exp of the scaled scores [B, H, n] fp32)."""
    op = _lse_op(q, kernels)
    out, lse = op(_heads_first(q), _heads_first(k), _heads_first(v))
    batch, heads, n = q.shape[0], q.shape[2], q.shape[1]
    return out.transpose(1, 2), lse.reshape(batch, heads, -1)[..., :n].float()


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]], kernels: Kernels) -> torch.Tensor:
    """Attention over the union of disjoint key sets from the attention over each: the outputs
    weighted by exp(lse_i - lse), lse = logsumexp_i lse_i (exact up to rounding)."""
    return kernels.merge_attention(parts)


def _math_lse(q, k, v):
    """Reference (any device/dtype): explicit scores in fp32."""
    scores = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype), lse


def _cpu_flash(q, k, v):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)


def _cuda_cudnn(q, k, v):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]


def _cuda_flash(q, k, v):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]


def _cuda_efficient(q, k, v):
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]


_CANDIDATES = {"cpu": (_cpu_flash,), "cuda": (_cuda_cudnn, _cuda_flash, _cuda_efficient)}


def _has_lse(q, kernels: Kernels) -> bool:
    return _lse_op(q, kernels, probe=True) is not None


def _lse_op(q, kernels: Kernels, probe: bool = False):
    """The first candidate that works for q's device and dtype (probed once, kept by `kernels`)."""
    op = kernels.probed(f"attention with log-sum-exp, {q.dtype}", q.device,
                        lambda: next((op for op in _CANDIDATES.get(q.device.type, ())
                                      if _lse_op_works(op, q.device, q.dtype)), None))
    if op is None and not probe:
        raise RuntimeError(f"no attention with log-sum-exp for {q.dtype} on {q.device}")
    return op


def _lse_op_works(op, device, dtype) -> bool:
    """One small attention against the fp32 math (output and log-sum-exp), in the [B, L, H, D]
    -> [B, H, L, D] transposed views the real calls pass; False on any error."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, length, 3, 64, generator=g).to(device, dtype) for length in (40, 56, 56))
    try:
        out, lse = op(_heads_first(q), _heads_first(k), _heads_first(v))
        want, want_lse = _math_lse(_heads_first(q), _heads_first(k), _heads_first(v))
        lse = lse.reshape(2, 3, -1)[..., :40].float()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        return bool(((out.float() - want.float()).norm() / want.float().norm()) < tol
                    and (lse - want_lse).abs().max() < 10 * tol)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
