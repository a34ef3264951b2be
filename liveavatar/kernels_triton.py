"""Triton kernels behind liveavatar.kernels (imported only when a kernel is first used, so
importing the pack never imports or compiles Triton).

Every DiT kernel handles one row (token) per program with the whole row in registers: rows
are 5120 (model dim) or 13824 (FFN) wide, so one load and one store per element is the whole
memory traffic (the VAE's channel norm takes several of its short rows per program).
Statistics and arithmetic are fp32. Casts to bf16 / fp8 ask for
round-to-nearest-even explicitly: that is the GPU's default, and it makes Triton's CPU
interpreter (used by the tests) round like PyTorch instead of truncating.
"""
import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)  # largest finite float8_e4m3fn (a constexpr: kernels may read it)


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 -> dtype (rounded to nearest even) -> back to fp32: the value a tensor of that
    dtype would hold."""
    if dtype == tl.float32:
        return x
    return x.to(dtype, fp_downcast_rounding="rtne").to(tl.float32)


@triton.jit
def _modulated_norm_kernel(x_ptr, scale_ptr, shift_ptr, out_ptr, q_ptr, q_scale_ptr,
                           y_ptr, gate_ptr, sum_ptr,
                           dim, rows_per_group, x_row_stride, mod_group_stride, eps,
                           gate_rows_per_group, gate_group_stride,
                           ONE_PLUS_SCALE: tl.constexpr, FP8: tl.constexpr,
                           RESIDUAL: tl.constexpr, GATED: tl.constexpr, BLOCK: tl.constexpr):
    """LayerNorm(x) * (1 + scale[g]) + shift[g] (or * scale + shift, an affine LayerNorm) for
    one row of x; g = row // rows_per_group (the row's frame). Writes the row in out's dtype,
    or (FP8) as fp8 e4m3 with one scale per row. RESIDUAL: first x += y * gate[row's gate
    group] (GATED, else x += y) in fp32, stored to sum_ptr, and the sum is normalised."""
    row = tl.program_id(0)
    group = row // rows_per_group
    offs = tl.arange(0, BLOCK)
    mask = offs < dim
    x = tl.load(x_ptr + row.to(tl.int64) * x_row_stride + offs, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        update = tl.load(y_ptr + row.to(tl.int64) * dim + offs, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            gate_row = (row // gate_rows_per_group) * gate_group_stride
            update = update * tl.load(gate_ptr + gate_row + offs, mask=mask, other=0.0)
        x = x + update
        tl.store(sum_ptr + row.to(tl.int64) * dim + offs, x, mask=mask)
    mean = tl.sum(x, axis=0) / dim
    centred = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / dim + eps)
    scale = tl.load(scale_ptr + group * mod_group_stride + offs, mask=mask, other=0.0)
    shift = tl.load(shift_ptr + group * mod_group_stride + offs, mask=mask, other=0.0)
    if ONE_PLUS_SCALE:
        scale = 1.0 + scale
    y = centred * rstd * scale + shift
    if FP8:
        amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0)
        row_scale = tl.maximum(amax, 1e-12) / FP8_MAX
        quantised = (y / row_scale).to(tl.float8e4nv, fp_downcast_rounding="rtne")
        tl.store(q_ptr + row.to(tl.int64) * dim + offs, quantised, mask=mask)
        tl.store(q_scale_ptr + row, row_scale)
    else:
        tl.store(out_ptr + row.to(tl.int64) * dim + offs,
                 y.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


@triton.jit
def _rms_norm_rope_kernel(x_ptr, weight_ptr, cos_ptr, sin_ptr, out_ptr, out_scale_ptr,
                          pairs, half_head, x_row_stride, out_row_stride, eps,
                          NORM: tl.constexpr, ROPE: tl.constexpr, FP8_OUT: tl.constexpr, BLOCK: tl.constexpr):
    """One token: RMSNorm over all heads (fp32 statistics, rounded to x's dtype, times the
    weight in x's dtype), then (ROPE) RoPE on consecutive channel pairs (a, b) -> (a c - b s,
    a s + b c) in fp32 with c, s = cos/sin[token, pair % half_head]. NORM=False: RoPE only.
    FP8_OUT (an fp8 KV cache): the result, rounded to x's dtype, stored as fp8 with one scale
    (amax / 448) in out_scale_ptr[token]. The row is loaded and stored flat (wide, contiguous
    accesses) and viewed as [pairs, 2] for the rotation."""
    row = tl.program_id(0)
    offs = tl.arange(0, 2 * BLOCK)
    mask = offs < 2 * pairs
    x = tl.load(x_ptr + row.to(tl.int64) * x_row_stride + offs, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / (2 * pairs) + eps)
        weight = _round_to(tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32), x_ptr.dtype.element_ty)
        x = _round_to(_round_to(x * rstd, x_ptr.dtype.element_ty) * weight, x_ptr.dtype.element_ty)
    if ROPE:
        a, b = tl.split(tl.reshape(x, (BLOCK, 2)))
        pair = tl.arange(0, BLOCK)
        table = row.to(tl.int64) * half_head + pair % half_head
        c = tl.load(cos_ptr + table, mask=pair < pairs, other=0.0)
        s = tl.load(sin_ptr + table, mask=pair < pairs, other=0.0)
        x = tl.reshape(tl.join(a * c - b * s, a * s + b * c), (2 * BLOCK,))
    if FP8_OUT:
        x = _round_to(x, x_ptr.dtype.element_ty)
        amax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=0)
        token_scale = tl.maximum(amax, 1e-12) / FP8_MAX
        x = x / token_scale
        tl.store(out_scale_ptr + row, token_scale)
    tl.store(out_ptr + row.to(tl.int64) * out_row_stride + offs, x.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
             mask=mask)


@triton.jit
def _gated_add_kernel(x_ptr, y_ptr, gate_ptr, out_ptr, dim, rows_per_group, gate_group_stride,
                      GATED: tl.constexpr, BLOCK: tl.constexpr):
    """out = x + y * gate[g] (fp32) over a BLOCK-wide slice of one row; GATED=False: x + y."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < dim
    at = row.to(tl.int64) * dim + offs
    x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + at, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        y = y * tl.load(gate_ptr + (row // rows_per_group) * gate_group_stride + offs, mask=mask, other=0.0)
    tl.store(out_ptr + at, x + y, mask=mask)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, q_scale_ptr, dim, x_row_stride,
                          GELU: tl.constexpr, BLOCK: tl.constexpr):
    """One row to fp8 e4m3 with its own scale (amax / 448). GELU: first the tanh GELU in fp32,
    rounded to x's dtype (the value an unfused bf16 GELU would hand on)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < dim
    x = tl.load(x_ptr + row.to(tl.int64) * x_row_stride + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        # 0.5 x (1 + tanh(u)) == x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3); sigmoid
        # through exp(-2|u|) <= 1, which cannot overflow (exp(-2u) does for x below about -6)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        e = tl.exp(-2.0 * tl.abs(u))
        x = _round_to(tl.where(u >= 0, x, x * e) / (1.0 + e), x_ptr.dtype.element_ty)
    amax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=0)
    row_scale = tl.maximum(amax, 1e-12) / FP8_MAX
    tl.store(q_ptr + row.to(tl.int64) * dim + offs, (x / row_scale).to(tl.float8e4nv, fp_downcast_rounding="rtne"),
             mask=mask)
    tl.store(q_scale_ptr + row, row_scale)


@triton.jit
def _channel_norm_kernel(x_ptr, gamma_ptr, out_ptr, rows, dim, scale,
                         SILU: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """The VAE's RMSNorm over ROWS rows of channels (channels-last activations): x / max(|x|,
    1e-12) * scale * gamma, then SiLU when asked; the channels are few (96-384), so one program
    takes several rows."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    channel = tl.arange(0, BLOCK)[None, :]
    mask = (row < rows) & (channel < dim)
    x = tl.load(x_ptr + row * dim + channel, mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))[:, None]
    gamma = tl.load(gamma_ptr + channel, mask=channel < dim, other=0.0).to(tl.float32)
    y = x / tl.maximum(norm, 1e-12) * scale * gamma
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(out_ptr + row * dim + channel, y.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def channel_norm(x2, gamma, out2, scale: float, silu: bool):
    """x2/out2 [rows, channels] contiguous, gamma [channels] contiguous."""
    rows, dim = x2.shape
    block = triton.next_power_of_2(dim)
    per_program = max(1, 2048 // block)
    _channel_norm_kernel[(triton.cdiv(rows, per_program),)](x2, gamma, out2, rows, dim, scale, SILU=silu, BLOCK=block,
                                                            ROWS=per_program, num_warps=4)


def _row_launch(dim: int) -> dict:
    """BLOCK covering a whole row and enough warps to keep it at <= 16 fp32 values per thread
    (no register spills at 13824 wide)."""
    block = triton.next_power_of_2(dim)
    return {"BLOCK": block, "num_warps": max(4, min(32, block // 512))}


def modulated_norm(x2, scale2, shift2, rows_per_group, eps, one_plus_scale, out=None, fp8_rows=None,
                   residual=None):
    """x2 [rows, dim] (rows contiguous in the last dim); scale2/shift2 [groups, dim]; writes
    out [rows, dim] or fp8_rows = (q [>= rows, dim], scales [>= rows]). residual = (y2 [rows,
    dim], gate2 [gate groups, dim] or None, rows per gate group, sum2 [rows, dim] fp32):
    normalise x2 + y2 * gate2 and write that sum to sum2 (contiguous)."""
    rows, dim = x2.shape
    dummy = x2 if out is None else out
    q, q_scale = fp8_rows if fp8_rows is not None else (dummy, dummy)
    y2, gate2, gate_rows_per_group, sum2 = residual if residual is not None else (x2, None, 1, x2)
    _modulated_norm_kernel[(rows,)](x2, scale2, shift2, dummy, q, q_scale, y2, gate2 if gate2 is not None else x2, sum2,
                                    dim, rows_per_group, x2.stride(0), scale2.stride(0), eps,
                                    gate_rows_per_group, gate2.stride(0) if gate2 is not None else 0,
                                    ONE_PLUS_SCALE=one_plus_scale, FP8=fp8_rows is not None,
                                    RESIDUAL=residual is not None, GATED=gate2 is not None, **_row_launch(dim))


def rms_norm_rope(x2, weight, cos2, sin2, out3, eps, norm: bool, out_scales=None):
    """x2 [N, dim]; cos2/sin2 [N, half_head] fp32 contiguous; out3 [..., heads, head_dim] with
    contiguous rows and one row stride (a slice of a KV ring works); fp8 out3 with out_scales
    (N contiguous fp32) for an fp8 cache."""
    _rms_norm_rope(x2, weight, cos2, sin2, out3, out3.stride(-3), out3.shape[-1] // 2, eps, norm, True, out_scales)


def rms_norm(x2, weight, out2, eps):
    """RMSNorm alone: x2/out2 [N, dim] (dim even), rows contiguous."""
    _rms_norm_rope(x2, weight, x2, x2, out2, out2.stride(0), 1, eps, True, False, None)


def _rms_norm_rope(x2, weight, cos2, sin2, out, out_row_stride, half_head, eps, norm, rope, out_scales):
    rows, dim = x2.shape
    _rms_norm_rope_kernel[(rows,)](x2, weight if weight is not None else x2, cos2, sin2, out,
                                   out_scales if out_scales is not None else cos2, dim // 2, half_head,
                                   x2.stride(0), out_row_stride, eps, NORM=norm, ROPE=rope,
                                   FP8_OUT=out_scales is not None, BLOCK=triton.next_power_of_2(dim // 2),
                                   num_warps=_row_launch(dim)["num_warps"])


def gated_add(x2, y2, gate2, rows_per_group, out2):
    """x2/out2 [rows, dim] fp32, y2 [rows, dim], gate2 [groups, dim] fp32 or None; all contiguous."""
    rows, dim = x2.shape
    block = min(2048, triton.next_power_of_2(dim))
    grid = (rows, triton.cdiv(dim, block))
    _gated_add_kernel[grid](x2, y2, gate2 if gate2 is not None else x2, out2, dim, rows_per_group,
                            gate2.stride(0) if gate2 is not None else 0, GATED=gate2 is not None, BLOCK=block,
                            num_warps=4)


def quantize_rows(x2, q, q_scale, gelu: bool):
    rows, dim = x2.shape
    _quantize_rows_kernel[(rows,)](x2, q, q_scale, dim, x2.stride(0), GELU=gelu, **_row_launch(dim))


@triton.jit
def _dequantize_tokens_kernel(x_ptr, scale_ptr, out_ptr, dim, x_batch_stride, x_token_stride, scale_batch_stride,
                              scale_token_stride, out_batch_stride, out_token_stride, BLOCK: tl.constexpr):
    """One token of one batch row: fp8 values times the token's scale in fp32, rounded once to
    out's dtype. A zero batch stride broadcasts one segment to every batch row."""
    token = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < dim
    x = tl.load(x_ptr + batch * x_batch_stride + token * x_token_stride + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + batch * scale_batch_stride + token * scale_token_stride)
    tl.store(out_ptr + batch * out_batch_stride + token * out_token_stride + offs,
             (x * scale).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


@triton.jit
def _merge_attention_kernel(o1_ptr, l1_ptr, o2_ptr, l2_ptr, out_ptr, heads, head_dim,
                            o1_b, o1_t, o1_h, o2_b, o2_t, o2_h, l1_b, l1_h, l1_t, l2_b, l2_h, l2_t,
                            out_b, out_t, out_h, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One query token, all heads: (o1 exp(l1 - m) + o2 exp(l2 - m)) / (exp(l1 - m) + exp(l2 - m)),
    m = max(l1, l2), in fp32."""
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    head_mask = h < heads
    mask = head_mask & (d < head_dim)
    a = tl.load(l1_ptr + b * l1_b + h * l1_h + t * l1_t, mask=head_mask, other=0.0)
    c = tl.load(l2_ptr + b * l2_b + h * l2_h + t * l2_t, mask=head_mask, other=0.0)
    top = tl.maximum(a, c)
    wa = tl.exp(a - top)
    wc = tl.exp(c - top)
    x = tl.load(o1_ptr + b * o1_b + t * o1_t + h * o1_h + d, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(o2_ptr + b * o2_b + t * o2_t + h * o2_h + d, mask=mask, other=0.0).to(tl.float32)
    merged = (x * wa + y * wc) / (wa + wc)
    tl.store(out_ptr + b * out_b + t * out_t + h * out_h + d,
             merged.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def dequantize_tokens(x4, scales, out4):
    """x4 fp8 [b, L, H, D] (b = 1 broadcasts), scales [b, L] fp32, out4 [B, L, H, D]; token rows
    contiguous."""
    batch, length = out4.shape[:2]
    dim = out4.shape[-2] * out4.shape[-1]
    shared = x4.shape[0] == 1 and batch > 1
    _dequantize_tokens_kernel[(length, batch)](x4, scales, out4, dim, 0 if shared else x4.stride(0), x4.stride(1),
                                               0 if shared else scales.stride(0), scales.stride(1),
                                               out4.stride(0), out4.stride(1), **_row_launch(dim))


def merge_attention(o1, l1, o2, l2, out):
    """o1/o2/out [B, n, H, D] (D contiguous), l1/l2 [B, H, n] fp32."""
    batch, n, heads, head_dim = out.shape
    block_h, block_d = triton.next_power_of_2(heads), triton.next_power_of_2(head_dim)
    _merge_attention_kernel[(n, batch)](o1, l1, o2, l2, out, heads, head_dim,
                                        o1.stride(0), o1.stride(1), o1.stride(2), o2.stride(0), o2.stride(1), o2.stride(2),
                                        l1.stride(0), l1.stride(1), l1.stride(2), l2.stride(0), l2.stride(1), l2.stride(2),
                                        out.stride(0), out.stride(1), out.stride(2), BLOCK_H=block_h, BLOCK_D=block_d,
                                        num_warps=max(4, min(16, block_h * block_d // 1024)))
