"""fp8 self-attention over an fp8 KV cache on Hopper's fp8 tensor cores (issue 18: attention
is half of a 704*384 tick in bf16; fp8 halves its tensor-core time).

    out = attention_fp8(q, [KVSegment(sink_k, sink_v, sink_k_scale, sink_v_scale),
                            KVSegment(ring_k, ring_v, ring_k_scale, ring_v_scale)])

computes softmax(q k^T * scale) v over the union of the segments' keys (exactly: one online
softmax streams through both), q [B, n, H, D] bf16 -> [B, n, H, D] bf16. A segment's k/v are
[B, N, H, D] (one per batch item: the ring of each block-step) or [N, H, D] (shared by the
whole batch: the sink, read once per head from L2 by all batch items), as float8_e4m3fn with
one fp32 scale per token (any shape holding B*N or N values, e.g. the cache's
[steps, tokens, 1, 1]) or bf16/fp16 without scales (quantised per token in a pre-pass).

pv="fp8" runs both products on fp8 tensor cores, each key tile's P.V summed in fp32 (Hopper's
fp8 MMA accumulates with ~14 bits); pv="fp8_fastacc" lets the tensor cores accumulate across
tiles (FlashAttention-3 / Triton-tutorial style: fewer registers, a few percent of bias
possible at 15k keys). Both read V fastest transposed (keys contiguous, see
attention_fp8_triton.py), which prepare_segment() writes in a pre-pass (~one read + write of
V); PreparedSegments with V as stored work too (Triton then transposes each tile on chip).
Callers that keep a segment for several calls (the sink: static for a whole clip) prepare it
once and pass the PreparedSegment. pv="bf16" runs P.V in bf16 on V as stored (no pre-pass for
an fp8 cache: the kernel reads the cache in place), more accurate, slower tensor-core work.

attention_fp8_reference() has the same signature: dequantise, exact attention in fp32 (the
CPU path, and the check of the kernel). This module imports nothing from the pack (the bench
loads it alone) and Triton only on first use.
"""
from __future__ import annotations

import importlib
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0
HEAD_DIMS = (32, 64, 128)  # fp8 tensor-core products need a reduction of >= 32; 256 would spill
TOKEN_ALIGN = 16  # keys-contiguous V rows padded to 16 bytes (aligned, vectorised loads)
PV_MODES = ("fp8", "fp8_fastacc", "bf16")


@dataclass(frozen=True)
class KVSegment:
    """Keys/values of one run of tokens: k, v [B, N, H, D] or [N, H, D] (shared by the batch);
    fp8 with per-token fp32 scales (k_scale/v_scale hold B*N or N values), or bf16/fp16 with
    scales None."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


@dataclass(frozen=True)
class PreparedSegment:
    """A segment in the kernel's format: k [Bk, N, H, D] fp8 (head_dim contiguous), k_scale /
    v_scale [Bk, N] fp32 (contiguous), v fp8 either as stored [Bk, N, H, D] (v_kmajor False) or
    transposed [Bk, H, D, >=N] with keys contiguous (v_kmajor True; fastest for the fp8 P.V).
    Bk is 1 for a segment shared by the batch."""

    k: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor
    v_kmajor: bool

    @property
    def tokens(self) -> int:
        return self.k.shape[1]

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    def values(self) -> torch.Tensor:
        """V as [Bk, N, H, D] fp8 whatever its layout (a view)."""
        return self.v[..., :self.tokens].permute(0, 3, 1, 2) if self.v_kmajor else self.v


# ---- checks ---------------------------------------------------------------------------------
def _check_q(q: torch.Tensor):
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"attention_fp8: q must be a tensor [batch, queries, heads, head_dim], got "
                         f"{getattr(q, 'shape', type(q).__name__)}")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"attention_fp8: q must be bfloat16/float16/float32, got {q.dtype}; cast it with q.to(torch.bfloat16)")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"attention_fp8: head_dim {q.shape[-1]} not supported (one of {HEAD_DIMS})")
    if min(q.shape) < 1:
        raise ValueError(f"attention_fp8: q {tuple(q.shape)} is empty")


def _scales(scale, name: str, batch: int, tokens: int, device) -> torch.Tensor:
    """Per-token scales as [batch, tokens] fp32 with unit stride along tokens."""
    if scale is None:
        raise ValueError(f"attention_fp8: {name} is missing: an fp8 segment needs one fp32 scale per token")
    if scale.numel() != batch * tokens:
        raise ValueError(f"attention_fp8: {name} holds {scale.numel()} values, expected one per token "
                         f"({batch} x {tokens})")
    if scale.device != device:
        raise ValueError(f"attention_fp8: {name} is on {scale.device}, its segment on {device}; move it there")
    out = scale.reshape(batch, tokens).float()
    return out if out.stride(-1) == 1 else out.contiguous()


def _check_segment(seg: KVSegment, index: int, q: torch.Tensor) -> tuple[int, bool]:
    """Validates one segment against q; returns (Bk, fp8)."""
    name = f"segments[{index}]"
    if not isinstance(seg, KVSegment):
        raise TypeError(f"attention_fp8: {name} must be a KVSegment or PreparedSegment, got {type(seg).__name__}")
    k, v = seg.k, seg.v
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"attention_fp8: {name} k {tuple(k.shape)} {k.dtype} and v {tuple(v.shape)} {v.dtype} "
                         "must have the same shape and dtype")
    if k.dim() not in (3, 4) or k.shape[-2:] != q.shape[-2:]:
        raise ValueError(f"attention_fp8: {name} k/v must be [B, N, heads, head_dim] or [N, heads, head_dim] "
                         f"with heads, head_dim = {tuple(q.shape[-2:])} of q, got {tuple(k.shape)}")
    batch = 1 if k.dim() == 3 else k.shape[0]
    if batch not in (1, q.shape[0]):
        raise ValueError(f"attention_fp8: {name} has batch {batch}; q has {q.shape[0]} (use {q.shape[0]}, "
                         "or one shared segment [N, H, D])")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"attention_fp8: {name} is on {k.device}, q on {q.device}; move it there")
    fp8 = k.dtype == FP8
    if fp8:
        for scale_name in ("k_scale", "v_scale"):
            _scales(getattr(seg, scale_name), f"{name}.{scale_name}", batch, k.shape[-3], k.device)
    else:
        if k.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"attention_fp8: {name} k/v dtype {k.dtype} (float8_e4m3fn with scales, or bf16/fp16/fp32)")
        if seg.k_scale is not None or seg.v_scale is not None:
            raise ValueError(f"attention_fp8: {name} has scales but {k.dtype} keys/values; scales belong "
                             "to float8_e4m3fn segments only")
    return batch, fp8


def _check_prepared(seg: PreparedSegment, index: int, q: torch.Tensor):
    name = f"segments[{index}] (prepared)"
    n = seg.tokens
    ok = (seg.k.dtype == FP8 and seg.v.dtype == FP8 and seg.k.dim() == 4 and seg.k.shape[-2:] == q.shape[-2:]
          and seg.k.stride(-1) == 1 and seg.batch in (1, q.shape[0])
          and seg.k_scale.shape == (seg.batch, n) and seg.v_scale.shape == (seg.batch, n)
          and seg.k_scale.dtype == torch.float32 and seg.v_scale.dtype == torch.float32
          and seg.k_scale.stride(-1) == 1 and seg.v_scale.stride(-1) == 1)
    if seg.v_kmajor:
        ok = ok and seg.v.shape[:3] == (seg.batch, q.shape[2], q.shape[3]) and seg.v.shape[3] >= n and seg.v.stride(-1) == 1
    else:
        ok = ok and seg.v.shape == seg.k.shape and seg.v.stride(-1) == 1
    if not ok:
        raise ValueError(f"attention_fp8: {name} is not in the kernel's format (see PreparedSegment); "
                         "make it with prepare_segment()")
    if seg.k.device != q.device:
        raise ValueError(f"attention_fp8: {name} is on {seg.k.device}, q on {q.device}; move it there")


# ---- preparation (pre-pass) -----------------------------------------------------------------
def _batched(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0) if t.dim() == 3 else t


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _kmajor_empty(batch: int, tokens: int, heads: int, head_dim: int, device) -> torch.Tensor:
    """V^T storage [batch, heads, head_dim, tokens rounded up to 16]."""
    padded = tokens + (-tokens % TOKEN_ALIGN)
    return torch.empty(batch, heads, head_dim, max(padded, TOKEN_ALIGN), dtype=FP8, device=device)


def prepare_segment(seg: KVSegment, v_kmajor: bool, q: torch.Tensor | None = None) -> PreparedSegment:
    """The segment in the kernel's format: bf16 keys/values quantised per token (the cache's
    scheme: scale = amax over heads and head_dim / 448); with v_kmajor V written transposed
    (keys contiguous). fp8 input with v_kmajor False is used in place (views, no copy).
    Pass q to check the segment against it."""
    if q is not None:
        _check_segment(seg, 0, q)
    k, v = _batched(seg.k), _batched(seg.v)
    batch, tokens, heads, head_dim = k.shape
    if k.dtype == FP8:
        k_scale = _scales(seg.k_scale, "k_scale", batch, tokens, k.device)
        v_scale = _scales(seg.v_scale, "v_scale", batch, tokens, k.device)
        k = _unit_last(k)
        if not v_kmajor:
            return PreparedSegment(k, k_scale, _unit_last(v), v_scale, False)
        vt = _kmajor_empty(batch, tokens, heads, head_dim, k.device)
        _relayout(_unit_last(v), vt, None, kmajor=True)
        return PreparedSegment(k, k_scale, vt, v_scale, True)
    k8 = torch.empty(k.shape, dtype=FP8, device=k.device)
    k_scale = torch.empty(batch, tokens, dtype=torch.float32, device=k.device)
    _relayout(_unit_last(k), k8, k_scale, kmajor=False)
    v8 = _kmajor_empty(batch, tokens, heads, head_dim, k.device) if v_kmajor else torch.empty_like(k8)
    v_scale = torch.empty_like(k_scale)
    _relayout(_unit_last(v), v8, v_scale, kmajor=v_kmajor)
    return PreparedSegment(k8, k_scale, v8, v_scale, v_kmajor)


def _relayout(x: torch.Tensor, out: torch.Tensor, scales: torch.Tensor | None, kmajor: bool):
    """x [B, N, H, D] -> out (fp8; [B, N, H, D], or [B, H, D, >=N] when kmajor); scales given:
    x is quantised per token into them, else x is fp8 already and only moved."""
    batch, tokens, heads, head_dim = x.shape
    if tokens == 0:
        return
    if not _use_triton(x):
        if scales is not None:
            scale = x.float().abs().amax(dim=(-2, -1)).clamp_min(1e-12) / FP8_MAX
            scales.copy_(scale)
            x = (x.float() / scale[..., None, None]).to(FP8)
        (out[..., :tokens] if kmajor else out).copy_(x.permute(0, 2, 3, 1) if kmajor else x)
        return
    backend = _load_backend()
    if kmajor:  # out [B, H, D, Np]: tokens contiguous
        stride_oh, stride_o = out.stride(1), out.stride(2)
    else:  # out [B, N, H, D]
        stride_oh, stride_o = out.stride(2), out.stride(1)
    block_t = 64
    grid = (triton_cdiv(tokens, block_t), batch)
    backend.quantize_tokens_kernel[grid](
        x, out, scales if scales is not None else out, tokens, heads,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), stride_oh, stride_o,
        scales.stride(0) if scales is not None else 0,
        HEAD_DIM=head_dim, BLOCK_T=block_t, QUANTIZE=scales is not None, OUT_KMAJOR=kmajor, num_warps=4)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- Triton loading ---------------------------------------------------------------------------
_backend = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or _interpreting()


def _load_backend():
    global _backend
    if _backend is None:
        name = f"{__package__}.attention_fp8_triton" if __package__ else "attention_fp8_triton"
        _backend = importlib.import_module(name)
    return _backend


def available(device) -> str | None:
    """None when the fp8 kernel can run on `device`, else why not (for logs / fallbacks)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None if _interpreting() else "fp8 attention runs on CUDA GPUs (or Triton's interpreter)"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return "fp8 attention needs fp8 tensor cores (compute capability 8.9+, best on 9.0 Hopper)"
    try:
        _load_backend()
    except Exception as error:  # no Triton, or one that does not import with this torch
        return f"Triton unavailable: {error}"
    return None


# ---- the attention -----------------------------------------------------------------------------
def _prepared_list(q, segments, pv: str) -> list[PreparedSegment]:
    _check_q(q)
    if pv not in PV_MODES:
        raise ValueError(f"attention_fp8: pv must be one of {PV_MODES}, got {pv!r}")
    if not isinstance(segments, (list, tuple)) or len(segments) not in (1, 2):
        raise ValueError("attention_fp8: segments must be a list of one or two KVSegment/PreparedSegment")
    prepared = []
    for i, seg in enumerate(segments):
        if isinstance(seg, PreparedSegment):
            _check_prepared(seg, i, q)
            prepared.append(seg)
        else:
            _check_segment(seg, i, q)
            prepared.append(prepare_segment(seg, v_kmajor=pv != "bf16"))
    if len({p.v_kmajor for p in prepared}) > 1:
        raise ValueError("attention_fp8: prepared segments mix V layouts (v_kmajor); prepare all alike")
    if sum(p.tokens for p in prepared) < 1:
        raise ValueError("attention_fp8: the segments hold no keys")
    return prepared


def attention_fp8(q: torch.Tensor, segments, pv: str = "fp8", scale: float | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over the union of 1-2 segments (module docstring); scale
    defaults to 1/sqrt(head_dim). config (BLOCK_M, BLOCK_N, num_warps, num_stages) fixes the
    launch instead of autotuning (the interpreter always uses a small fixed one)."""
    prepared = _prepared_list(q, segments, pv)
    if not _use_triton(q):
        raise RuntimeError("attention_fp8: the kernel needs a CUDA tensor (or TRITON_INTERPRET=1); "
                           "use attention_fp8_reference on CPU")
    backend = _load_backend()
    out, args, flags = kernel_arguments(q, prepared, pv, scale)
    n_q, batch_heads = q.shape[1], q.shape[0] * q.shape[2]
    if config is None and _interpreting():
        config = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)
    with _on_device_of(q):
        if config is None:
            grid = lambda meta: (triton_cdiv(n_q, meta["BLOCK_M"]), batch_heads)  # noqa: E731
            backend.attention_fp8_kernel_tuned[grid](*args, **flags)
        else:
            grid = (triton_cdiv(n_q, config["BLOCK_M"]), batch_heads)
            backend.attention_fp8_kernel[grid](*args, **flags, **config)
    return out


def kernel_arguments(q: torch.Tensor, prepared: list[PreparedSegment], pv: str, scale: float | None = None):
    """(out, positional arguments, constexpr flags) of attention_fp8_kernel for checked,
    prepared segments (also what bench/attention_check.py precompiles with)."""
    batch, n_q, heads, head_dim = q.shape
    q = _unit_last(q)
    out = torch.empty(q.shape, dtype=q.dtype if q.dtype != torch.float32 else torch.bfloat16, device=q.device)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    first, second = prepared[0], prepared[-1]
    args = [q, out]
    for seg in (first, second):
        args += [seg.k, seg.k_scale, seg.v, seg.v_scale]
    args += [n_q, first.tokens, second.tokens if len(prepared) == 2 else 0, heads, scale * math.log2(math.e)]
    args += [q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2)]
    for seg in (first, second):
        shared = seg.batch == 1  # one copy read by every batch item: batch stride 0
        k_bs = 0 if shared else seg.k.stride(0)
        v_bs = 0 if shared else seg.v.stride(0)
        s_bs = 0 if shared else seg.k_scale.stride(0)
        vs_bs = 0 if shared else seg.v_scale.stride(0)
        if seg.v_kmajor:  # [Bk, H, D, Np]
            v_h, v_n, v_d = seg.v.stride(1), 1, seg.v.stride(2)
        else:  # [Bk, N, H, D]
            v_h, v_n, v_d = seg.v.stride(2), seg.v.stride(1), 1
        args += [k_bs, seg.k.stride(1), seg.k.stride(2), s_bs, v_bs, v_h, v_n, v_d, vs_bs]
    flags = dict(HEAD_DIM=head_dim, PV_FP8=pv != "bf16", PV_FP32_SUM=pv == "fp8", V_KMAJOR=first.v_kmajor,
                 TWO_SEGMENTS=len(prepared) == 2)
    return out, args, flags


def _on_device_of(t: torch.Tensor):
    """Launch on t's GPU whatever the current device is."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return nullcontext()


def tuned_config() -> dict | None:
    """The autotuner's choice for the last autotuned call (for bench reports)."""
    backend = _load_backend()
    best = getattr(backend.attention_fp8_kernel_tuned, "best_config", None)
    if best is None:
        return None
    return dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)


# ---- reference ---------------------------------------------------------------------------------
def dequantized(seg, batch: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v) of a KVSegment or PreparedSegment as [batch, N, H, D] in dtype: fp8 times the
    per-token scale, or the bf16 values as given."""
    if isinstance(seg, PreparedSegment):
        k, v, k_scale, v_scale = seg.k, seg.values(), seg.k_scale, seg.v_scale
    else:
        k, v, k_scale, v_scale = _batched(seg.k), _batched(seg.v), seg.k_scale, seg.v_scale
    if k.dtype == FP8:
        n = k.shape[1]
        k = k.to(dtype) * k_scale.reshape(-1, n, 1, 1).to(dtype)
        v = v.to(dtype) * v_scale.reshape(-1, n, 1, 1).to(dtype)
    else:
        k, v = k.to(dtype), v.to(dtype)
    return k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:])


def attention_fp8_reference(q: torch.Tensor, segments, pv: str = "fp8", scale: float | None = None,
                            config: dict | None = None) -> torch.Tensor:
    """attention_fp8's result without the fp8 compute: the segments dequantised, joined, and
    exact softmax attention in fp32 (q unquantised), cast to the kernel's output dtype. pv and
    config are accepted for the same signature (no effect)."""
    _check_q(q)
    if not isinstance(segments, (list, tuple)) or len(segments) not in (1, 2):
        raise ValueError("attention_fp8: segments must be a list of one or two KVSegment/PreparedSegment")
    for i, seg in enumerate(segments):
        if isinstance(seg, PreparedSegment):
            _check_prepared(seg, i, q)
        else:
            _check_segment(seg, i, q)
    parts = [dequantized(seg, q.shape[0]) for seg in segments]
    k = torch.cat([p[0] for p in parts], dim=1)
    v = torch.cat([p[1] for p in parts], dim=1)
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    out_dtype = q.dtype if q.dtype != torch.float32 else torch.bfloat16
    return out.transpose(1, 2).to(out_dtype)
