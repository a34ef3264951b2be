"""fp8 attention (bench/fp8_attention/attention_fp8.py) against independent PyTorch computations.

On CPU Triton's interpreter runs the kernels (conftest.py selects it), with exact casts (the
interpreter's own fp32 -> fp8 rounding is approximate) and bf16 products widened to fp32
(the interpreter multiplies bf16 bit patterns as integers). Shapes are small: B=2 block-steps,
n=48 queries (one partial query block of 64, or two of 32), 2 heads, a shared "sink" of 40
keys and per-item "rings" of 72 (key tiles of 32: full and partial tiles in both segments).

Checks:
- tile-exact emulation: the kernel's designed numerics (q per (token, head) in e4m3, scores
  with per-token K scales, P = exp2(s - m + 8) weighted by sv / max-sv-of-tile in e4m3 or bf16,
  fp32 accumulation, bf16 output) written out in torch tile by tile. Only summation order and
  exp2 ulps may differ (flipping a rare rounding): the interpreter's output is bit-identical
  (measured: 0 to 2e-5 relative, one element in 12k off by one bf16 step); asserted < 1e-4,
  or one bf16 step (2^-8) on a GPU (ex2.approx, wgmma summation order).
- accuracy vs exact attention (fp64) on the dequantised cache: the error of computing in fp8.
- accuracy vs exact attention on the original bf16 keys/values (the cache's rounding too).
"""
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# The kernel lives with its benchmark, not in the engine: on an H200 it is slower than cuDNN's
# bf16 attention at the model's shapes (docs/benchmarks.md), so nothing in the pack runs it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "fp8_attention"))
import attention_fp8 as A  # noqa: E402
from test_kernels import exact_interpreter_casts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
E4M3_STEP = 2.0 ** -4  # e4m3 keeps 4 significant bits: rounding error <= 2^-4 relative
BLOCK_N = 32  # the interpreter's fixed launch (attention_fp8.attention_fp8)
EMULATION_TOL = 1e-4 if DEVICE == "cpu" else 2.0 ** -8
B, N_Q, HEADS, SINK, RING = 2, 48, 2, 40, 72


@pytest.fixture
def interpreter(monkeypatch):
    pytest.importorskip("triton")
    if DEVICE == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no GPU and Triton's interpreter not selected (see conftest.py)")
        exact_interpreter_casts(monkeypatch)
        widened_bf16_products(monkeypatch)


def widened_bf16_products(monkeypatch):
    """The interpreter keeps bf16 as raw uint16 and its tl.dot multiplies those integers;
    hand it the fp32 values instead (exact: every bf16 is an fp32)."""
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def launch(block_m: int = 64) -> dict:
    """A fixed launch with key tiles of BLOCK_N (what emulate() reproduces). On a GPU query
    blocks stay >= 64 (one warpgroup's tensor-core tile)."""
    return dict(BLOCK_M=block_m if DEVICE == "cpu" else 64, BLOCK_N=BLOCK_N, num_warps=4,
                num_stages=1 if DEVICE == "cpu" else 2)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.bfloat16)


def case(head_dim: int, seed: int):
    """q and bf16 segments: the sink shared by the batch, a ring per batch item."""
    q = randn(B, N_Q, HEADS, head_dim, seed=seed)
    sink = A.KVSegment(randn(SINK, HEADS, head_dim, seed=seed + 1), randn(SINK, HEADS, head_dim, seed=seed + 2))
    ring = A.KVSegment(randn(B, RING, HEADS, head_dim, seed=seed + 3), randn(B, RING, HEADS, head_dim, seed=seed + 4))
    return q, [sink, ring]


def exact(q, kv_pairs, dtype=torch.float64):
    """softmax(q k^T / sqrt(D)) v in fp64 over the joined segments ([B, N, H, D] pairs)."""
    k = torch.cat([k.to(dtype) for k, _ in kv_pairs], 1)
    v = torch.cat([v.to(dtype) for _, v in kv_pairs], 1)
    scores = torch.einsum("bnhd,bkhd->bhnk", q.to(dtype), k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhnk,bkhd->bnhd", scores.softmax(-1), v)


def emulate(q, prepared, pv: str, block_n: int = BLOCK_N):
    """The kernel's numerics (attention_fp8_triton.py docstring) in torch fp32, tile by tile."""
    fp8 = torch.float8_e4m3fn
    qf = q.float()
    q_scale = qf.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448.0  # [B, n, H, 1]
    q8 = (qf / q_scale).to(fp8).float()
    q_scale = q_scale[..., 0].transpose(1, 2)  # [B, H, n]
    c = 1.0 / math.sqrt(q.shape[-1]) * math.log2(math.e)  # rounded to fp32 like the kernel's argument
    acc = torch.zeros(B, HEADS, N_Q, q.shape[-1], device=q.device)
    m = torch.full((B, HEADS, N_Q), float("-inf"), device=q.device)
    l = torch.zeros(B, HEADS, N_Q, device=q.device)
    v_norm = torch.ones(B, 1, 1, device=q.device)
    for seg in prepared:
        k = seg.k.float().expand(B, -1, -1, -1)
        v = seg.values().float().expand(B, -1, -1, -1)
        ks, vs = seg.k_scale.expand(B, -1), seg.v_scale.expand(B, -1)
        for start in range(0, seg.tokens, block_n):
            tile = slice(start, start + block_n)
            t = torch.einsum("bnhd,bkhd->bhnk", q8, k[:, tile]) * (ks[:, tile] * c)[:, None, None, :]
            m_new = torch.maximum(m, t.amax(-1) * q_scale)
            p = torch.exp2(t * q_scale[..., None] - (m_new - 8.0)[..., None])
            alpha = torch.exp2(m - m_new)
            l = l * alpha + p.sum(-1)
            tile_norm = vs[:, tile].amax(-1).clamp_min(1e-30)[:, None, None]  # [B, 1, 1]
            weighted = p * (vs[:, tile][:, None, None, :] / tile_norm[..., None])
            weighted = weighted.to(torch.bfloat16 if pv == "bf16" else fp8).float()
            acc = acc * (alpha * (v_norm / tile_norm))[..., None] + torch.einsum("bhnk,bkhd->bhnd", weighted, v[:, tile])
            m, v_norm = m_new, tile_norm
    return (acc * (v_norm / l)[..., None]).transpose(1, 2)


def rel_l2(got, want) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.isfinite(got).all()
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_fp8_attention_matches_its_emulation_and_exact_attention(interpreter, head_dim):
    q, segments = case(head_dim, seed=10 * head_dim)
    prepared = [A.prepare_segment(s, v_kmajor=True) for s in segments]
    # fp8_fastacc differs only on a GPU (where P.V accumulates inside the tensor cores)
    pv = "fp8_fastacc" if head_dim == 32 else "fp8"
    out = A.attention_fp8(q, prepared, pv=pv, config=launch(block_m=32 if head_dim == 64 else 64))
    assert out.shape == q.shape and out.dtype == torch.bfloat16

    # 1. The designed numerics, tile by tile.
    assert rel_l2(out, emulate(q, prepared, "fp8").bfloat16()) < EMULATION_TOL
    # 2. vs exact attention on the cache's values: q and P rounded to e4m3 (<= 2^-4 relative
    # each, partly averaging out over keys and channels) -- measured 0.034-0.036 for D 32-128
    # and three seeds; the bound is one e4m3 step: no worse than rounding the output to e4m3.
    dequantised = [A.dequantized(p, B, torch.float64) for p in prepared]
    err_cache = rel_l2(out, exact(q, dequantised))
    assert err_cache < E4M3_STEP
    # 3. vs exact attention on the original bf16 keys/values: the cache's per-token e4m3
    # rounding of K and V adds about as much again -- measured 0.048-0.055; bound two steps.
    original = [(s.k.expand(B, -1, -1, -1) if s.k.dim() == 3 else s.k,
                 s.v.expand(B, -1, -1, -1) if s.v.dim() == 3 else s.v) for s in segments]
    assert rel_l2(out, exact(q, original)) < 2 * E4M3_STEP


def test_bf16_pv_is_closer_than_fp8_pv(interpreter):
    """pv="bf16" reads the fp8 cache as stored (no transposed V) and rounds P to bf16 only."""
    q, segments = case(128, seed=7)
    fp8_cache = [A.prepare_segment(s, v_kmajor=False) for s in segments]  # an fp8 cache as the engine stores it
    cache = [A.KVSegment(p.k[0] if s.k.dim() == 3 else p.k, p.v[0] if s.k.dim() == 3 else p.v, p.k_scale, p.v_scale)
             for p, s in zip(fp8_cache, segments)]
    out = A.attention_fp8(q, cache, pv="bf16", config=launch())
    assert rel_l2(out, emulate(q, fp8_cache, "bf16").bfloat16()) < EMULATION_TOL
    reference = exact(q, [A.dequantized(p, B, torch.float64) for p in fp8_cache])
    err_bf16 = rel_l2(out, reference)
    err_fp8 = rel_l2(A.attention_fp8(q, cache, pv="fp8"), reference)
    # bf16 P removes P's e4m3 rounding, leaving q's: measured 0.021-0.026 vs 0.034-0.036.
    assert err_bf16 < err_fp8 < E4M3_STEP


def test_shared_sink_equals_the_sink_given_per_item(interpreter):
    """A segment [N, H, D] shared by the batch (batch stride 0) reads exactly what the same
    keys/values repeated per batch item give; one segment is the other's special case too."""
    q, (sink, ring) = case(64, seed=3)
    per_item = A.KVSegment(sink.k.expand(B, -1, -1, -1).contiguous(), sink.v.expand(B, -1, -1, -1).contiguous())
    shared = A.attention_fp8(q, [sink, ring])
    assert torch.equal(shared, A.attention_fp8(q, [per_item, ring]))
    alone = A.attention_fp8(q, [ring])
    assert rel_l2(alone, exact(q, [(ring.k, ring.v)])) < 2 * E4M3_STEP


def test_prepare_quantises_per_token_and_transposes_v(interpreter):
    _, (sink, ring) = case(64, seed=5)
    prepared = A.prepare_segment(ring, v_kmajor=True)
    x = ring.k.float()
    scale = x.abs().amax(dim=(-2, -1)).clamp_min(1e-12) / 448.0
    assert torch.equal(prepared.k_scale, scale)
    assert torch.equal(prepared.k.view(torch.uint8), (x / scale[..., None, None]).to(torch.float8_e4m3fn).view(torch.uint8))
    v_scale = ring.v.float().abs().amax(dim=(-2, -1)).clamp_min(1e-12) / 448.0
    v8 = (ring.v.float() / v_scale[..., None, None]).to(torch.float8_e4m3fn)
    assert prepared.v.shape == (B, HEADS, 64, 80)  # 72 tokens padded to 16
    assert torch.equal(prepared.values().contiguous().view(torch.uint8), v8.view(torch.uint8))
    # fp8 input is only re-laid-out (bytes unchanged), scales passed through.
    again = A.prepare_segment(A.KVSegment(prepared.k, prepared.values(), prepared.k_scale, prepared.v_scale), v_kmajor=True)
    assert torch.equal(again.v.view(torch.uint8)[..., :RING], prepared.v.view(torch.uint8)[..., :RING])
    assert torch.equal(again.v_scale, prepared.v_scale)


def test_reference_is_exact_attention_on_dequantised_values(interpreter):
    q, segments = case(32, seed=11)
    prepared = [A.prepare_segment(s, v_kmajor=False) for s in segments]
    got = A.attention_fp8_reference(q, prepared)
    want = exact(q, [A.dequantized(p, B, torch.float64) for p in prepared])
    assert rel_l2(got, want) < 2.0 ** -8  # fp32 math, bf16 output


@pytest.mark.parametrize("bad, message", [
    (lambda q, s: (q[..., :16], s), "head_dim 16"),
    (lambda q, s: (q, [A.KVSegment(s[0].k[:, :1], s[0].v[:, :1])]), "heads, head_dim"),
    (lambda q, s: (q, [A.KVSegment(s[0].k.to(torch.float8_e4m3fn), s[0].v.to(torch.float8_e4m3fn))]), "k_scale is missing"),
    (lambda q, s: (q, [A.KVSegment(s[0].k, s[0].v, torch.ones(SINK), torch.ones(SINK))]), "scales belong"),
    (lambda q, s: (q, [A.KVSegment(torch.cat([s[1].k] * 2), torch.cat([s[1].v] * 2))]), "has batch 4"),
    (lambda q, s: (q, s * 2), "one or two"),
    (lambda q, s: (q, s[:1]), "pv must be"),
])
def test_bad_inputs_name_the_input(bad, message):
    q, segments = case(32, seed=1)
    q, segments = bad(q, segments)
    pv = "fp16" if message == "pv must be" else "fp8"
    if pv == "fp8":  # the reference ignores pv
        with pytest.raises((ValueError, TypeError), match=message):
            A.attention_fp8_reference(q, segments)
    with pytest.raises((ValueError, TypeError), match=message):
        A.attention_fp8(q, segments, pv=pv)
