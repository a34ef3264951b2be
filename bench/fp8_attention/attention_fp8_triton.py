"""Triton kernels behind liveavatar.attention_fp8 (imported only when the fp8 attention first
runs, so importing the pack never imports or compiles Triton).

Forward attention softmax(q k^T * scale) v over one or two key/value segments with fp8 e4m3
keys and values (one fp32 scale per token, shared by all heads: the KV cache's format), on
Hopper's fp8 tensor cores. One program = one block of BLOCK_M queries of one (batch item,
head); it streams the keys of segment 1, then of segment 2, through one online softmax, so the
result is the exact softmax over their union without joining them in memory.

Scaling, in the log2 domain (c = scale * log2(e)):
- q: quantised in the prologue per (token, head): q = sq[m] * q8, sq = amax / 448.
- QK^T: qk = q8 . k8 on fp8 tensor cores (fp32 accumulation). With per-token K scales sk[n]
  the true score is s = sq[m] * t[m, n], t = qk * (sk[n] * c): one multiply per score for
  the K scale (a column vector); sq[m] > 0 is folded into the FMA of the exponent below
  (max_n s = sq[m] * max_n t), so the per-query scale is free.
- P: p = exp2(s - m + 8) with m the running row max: at most 2^8, so after the per-key V
  weight (<= 1, below) P fits e4m3 (max 448) with headroom, and the 2^8 lifts small
  probabilities out of e4m3's subnormal range (down to 2^-17 of the row max survive; a plain
  p <= 1 would flush everything below 2^-9). The 2^8 cancels in acc / l.
- Per-token V scales sv[n] (values v = sv[n] * v8[n, :]) cannot be applied to the fp8 V
  tile inside the tensor-core product, so they go into P: P'[m, n] = p * sv[n] / cv with
  cv = max sv over the tile, i.e. the weights are <= 1 (no overflow) and the largest key of
  every tile keeps the full range (no underflow from a global normaliser when scales differ
  between tiles). acc is kept in units of the current tile's cv: acc <- acc * alpha *
  cv_old / cv_new + P'8 . v8, and the epilogue multiplies by cv / l. A weighted P' below
  e4m3's smallest subnormal (2^-9) rounds to zero; since l >= 2^8, such a key's lost share
  of the output is below 2^-17 of the largest value magnitude in its tile (448 cv).
- l (the softmax denominator) sums the unquantised fp32 p, as FlashAttention-3 does.

PV_FP32_SUM (with PV_FP8): each tile's P.V is summed on tensor cores from zero and added to
acc in fp32, instead of accumulating into acc inside the MMA (whose fp8 accumulation keeps
~14 bits; over ~480 MMA steps per row at 15k keys its truncation can bias the output by
percents). ptxas fits the extra accumulator without more spills at the autotuned launches;
the cost is that the product is waited for within the iteration (less MMA overlap).

PV_FP8=False runs P.V in bf16 instead (V dequantised to bf16 in registers, exact for e4m3
values): fp8 QK^T only, P rounded to bf16 (2^-9 relative instead of e4m3's 2^-4).

Operand layouts: on sm90 fp8 wgmma reads both operands "K-major" (the reduction dim
contiguous). For QK^T the reduction is head_dim, contiguous in the cache [.., tokens, H, D]:
fine as stored. For P.V the reduction runs over keys: V transposed, keys contiguous
([.., H, D, tokens]; V_KMAJOR), streams into shared memory by cp.async as the MMA wants it;
V as stored also works (Triton then loads each tile to registers and writes it transposed
into shared memory). bf16 P.V reads V as stored (wgmma takes 16-bit operands either way).

Casts to fp8 / bf16 ask for round-to-nearest-even explicitly: that is the GPU's default, and
it makes Triton's CPU interpreter (used by the tests) round like PyTorch.
"""
import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)  # largest finite float8_e4m3fn
P_SHIFT = tl.constexpr(8.0)  # log2 of the headroom factor of P (see the module docstring)


@triton.jit
def _attend_tile(acc, m_i, l_i, v_norm, q8, q_scale,
                 k_base, ks_base, v_base, vs_base, start, n_keys,
                 stride_kn, stride_vn, stride_vd, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr,
                 PV_FP32_SUM: tl.constexpr, V_KMAJOR: tl.constexpr, MASKED: tl.constexpr):
    """One tile of BLOCK_N keys starting at `start`: online-softmax update of (acc, m_i, l_i,
    v_norm). MASKED: the last, partial tile of a segment (keys >= n_keys are left out)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]  # K^T tile [D, BLOCK_N]
    if V_KMAJOR:
        v_ptrs = v_base + offs_n[:, None] + offs_d[None, :] * stride_vd  # keys contiguous
    else:
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]  # head_dim contiguous
    if MASKED:
        valid = offs_n < n_keys
        k = tl.load(k_ptrs, mask=valid[None, :], other=0.0)
        k_scale = tl.load(ks_base + offs_n, mask=valid, other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
        v_scale = tl.load(vs_base + offs_n, mask=valid, other=0.0)
    else:
        k = tl.load(k_ptrs)
        k_scale = tl.load(ks_base + offs_n)
        v = tl.load(v_ptrs)
        v_scale = tl.load(vs_base + offs_n)

    t = tl.dot(q8, k) * (k_scale * qk_scale)[None, :]  # scores / sq, log2 units
    if MASKED:
        t = tl.where(valid[None, :], t, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(t, 1) * q_scale)
    p = tl.math.exp2(t * q_scale[:, None] - (m_new - P_SHIFT)[:, None])  # <= 2^8
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)

    tile_norm = tl.maximum(tl.max(v_scale, 0), 1e-30)  # largest V scale of the tile
    weighted = p * (v_scale / tile_norm)[None, :]  # per-key V scales moved into P, <= 2^8
    rescale = alpha * (v_norm / tile_norm)  # acc now in units of tile_norm
    v_norm = tl.zeros_like(l_i) + tile_norm  # carried per row (a loop-carried block, like m_i)
    if PV_FP8:
        p8 = weighted.to(tl.float8e4nv, fp_downcast_rounding="rtne")
        if PV_FP32_SUM:
            # Hopper's fp8 MMA keeps ~14 bits when it adds into its accumulator; fed the running
            # acc it would do that ~4 times per tile over ~120 tiles. Instead the tile's sum is
            # formed on tensor cores from zero and added here in fp32 (DeepSeek-V3's promotion).
            acc = acc * rescale[:, None] + tl.dot(p8, v)
        else:
            acc = tl.dot(p8, v, acc * rescale[:, None])
    else:
        acc = tl.dot(weighted.to(tl.bfloat16, fp_downcast_rounding="rtne"), v.to(tl.bfloat16), acc * rescale[:, None])
    return acc, m_new, l_i, v_norm


@triton.jit
def _attend_segment(acc, m_i, l_i, v_norm, q8, q_scale,
                    k_base, ks_base, v_base, vs_base, n_keys,
                    stride_kn, stride_vn, stride_vd, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr,
                    PV_FP32_SUM: tl.constexpr, V_KMAJOR: tl.constexpr):
    """All keys of one segment: full tiles unmasked (the hot loop), then the partial one."""
    full = (n_keys // BLOCK_N) * BLOCK_N
    for start in range(0, full, BLOCK_N):
        acc, m_i, l_i, v_norm = _attend_tile(
            acc, m_i, l_i, v_norm, q8, q_scale, k_base, ks_base, v_base, vs_base, start, n_keys,
            stride_kn, stride_vn, stride_vd, qk_scale, HEAD_DIM, BLOCK_N, PV_FP8, PV_FP32_SUM, V_KMAJOR, False)
    if full < n_keys:
        acc, m_i, l_i, v_norm = _attend_tile(
            acc, m_i, l_i, v_norm, q8, q_scale, k_base, ks_base, v_base, vs_base, full, n_keys,
            stride_kn, stride_vn, stride_vd, qk_scale, HEAD_DIM, BLOCK_N, PV_FP8, PV_FP32_SUM, V_KMAJOR, True)
    return acc, m_i, l_i, v_norm


@triton.jit
def attention_fp8_kernel(
        q_ptr, out_ptr,
        k1_ptr, ks1_ptr, v1_ptr, vs1_ptr, k2_ptr, ks2_ptr, v2_ptr, vs2_ptr,
        n_q, n1, n2, heads, qk_scale,
        stride_qb, stride_qn, stride_qh, stride_ob, stride_on, stride_oh,
        stride_k1b, stride_k1n, stride_k1h, stride_ks1b,
        stride_v1b, stride_v1h, stride_v1n, stride_v1d, stride_vs1b,
        stride_k2b, stride_k2n, stride_k2h, stride_ks2b,
        stride_v2b, stride_v2h, stride_v2n, stride_v2d, stride_vs2b,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PV_FP8: tl.constexpr, PV_FP32_SUM: tl.constexpr, V_KMAJOR: tl.constexpr, TWO_SEGMENTS: tl.constexpr):
    """out[b, m, h] = softmax over the keys of both segments. Grid (cdiv(n_q, BLOCK_M),
    batch * heads): the query blocks of one (b, h) are neighbours in launch order, so they
    read that head's keys/values while they are in L2. A segment shared by the whole batch
    (the sink) has batch stride 0."""
    block_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < n_q
    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    # Per (token, head) fp8 quantisation in registers: once per program, BLOCK_M x D values.
    q_scale = tl.maximum(tl.max(tl.abs(q), 1), 1e-12) / FP8_MAX
    q8 = (q / q_scale[:, None]).to(tl.float8e4nv, fp_downcast_rounding="rtne")

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    v_norm = tl.full([BLOCK_M], 1.0, dtype=tl.float32)  # units of acc (see the docstring)
    acc, m_i, l_i, v_norm = _attend_segment(
        acc, m_i, l_i, v_norm, q8, q_scale,
        k1_ptr + b * stride_k1b + h * stride_k1h, ks1_ptr + b * stride_ks1b,
        v1_ptr + b * stride_v1b + h * stride_v1h, vs1_ptr + b * stride_vs1b, n1,
        stride_k1n, stride_v1n, stride_v1d, qk_scale, HEAD_DIM, BLOCK_N, PV_FP8, PV_FP32_SUM, V_KMAJOR)
    if TWO_SEGMENTS:
        acc, m_i, l_i, v_norm = _attend_segment(
            acc, m_i, l_i, v_norm, q8, q_scale,
            k2_ptr + b * stride_k2b + h * stride_k2h, ks2_ptr + b * stride_ks2b,
            v2_ptr + b * stride_v2b + h * stride_v2h, vs2_ptr + b * stride_vs2b, n2,
            stride_k2n, stride_v2n, stride_v2d, qk_scale, HEAD_DIM, BLOCK_N, PV_FP8, PV_FP32_SUM, V_KMAJOR)

    out = acc * (v_norm / l_i)[:, None]
    o_ptrs = out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=row_ok[:, None])


def _sm90_configs():
    """A small autotune space for H100/H200 (bench/attention_check.py must tune within its
    time budget). BLOCK_M 128 with 8 warps = two warpgroups of 64 query rows per CTA (one CTA
    per SM: ptxas takes 255 registers); BLOCK_M 64 with 4 warps = one warpgroup, two CTAs per
    SM whose softmax and tensor-core phases interleave. BLOCK_N 128 halves the per-score cost
    of the accumulator rescale against 64. Stages: K/V tiles prefetched by cp.async."""
    shapes = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


attention_fp8_kernel_tuned = triton.autotune(
    configs=_sm90_configs(), key=["n_q", "n1", "n2", "HEAD_DIM", "PV_FP8", "PV_FP32_SUM", "V_KMAJOR", "TWO_SEGMENTS"],
)(attention_fp8_kernel)


@triton.jit
def quantize_tokens_kernel(x_ptr, out_ptr, scale_ptr, n_tokens, heads,
                           stride_xb, stride_xn, stride_xh, stride_ob, stride_oh, stride_o, stride_sb,
                           HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, QUANTIZE: tl.constexpr,
                           OUT_KMAJOR: tl.constexpr):
    """Tokens [B, N, heads, D] -> fp8 out, laid out [B, N, heads, D] (stride_o: token stride)
    or, OUT_KMAJOR, transposed [B, heads, D, >=N] with tokens contiguous (stride_o: head_dim
    stride). QUANTIZE: x is bf16/fp16/fp32, quantised per token over all heads (scale = amax /
    448 into scale_ptr[b, n], the KV cache's format); else x is fp8 already and only
    re-laid-out. Grid (cdiv(N, BLOCK_T), B); two passes over the heads (amax, then quantise):
    the second reads BLOCK_T x heads x D values just read, mostly from L2. The unit strides
    are literal so that Triton vectorises both the loads and the (transposed) stores."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = offs_t < n_tokens
    x_ptrs = x_ptr + b * stride_xb + offs_t[:, None] * stride_xn + offs_d[None, :]
    if OUT_KMAJOR:
        o_ptrs = out_ptr + b * stride_ob + offs_t[:, None] + offs_d[None, :] * stride_o
    else:
        o_ptrs = out_ptr + b * stride_ob + offs_t[:, None] * stride_o + offs_d[None, :]
    if QUANTIZE:
        amax = tl.zeros([BLOCK_T], dtype=tl.float32)
        for h in range(heads):
            x = tl.load(x_ptrs + h * stride_xh, mask=valid[:, None], other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), 1))
        scale = tl.maximum(amax, 1e-12) / FP8_MAX
        tl.store(scale_ptr + b * stride_sb + offs_t, scale, mask=valid)
    for h in range(heads):
        x = tl.load(x_ptrs + h * stride_xh, mask=valid[:, None], other=0.0)
        if QUANTIZE:
            x = (x.to(tl.float32) / scale[:, None]).to(tl.float8e4nv, fp_downcast_rounding="rtne")
        tl.store(o_ptrs + h * stride_oh, x, mask=valid[:, None])
