"""Triton kernels behind liveavatar.kernels (imported only when a kernel is first used, so
importing the pack never imports or compiles Triton).

Every kernel handles one row (token) per program with the whole row in registers: rows are
5120 (model dim) or 13824 (FFN) wide, so one load and one store per element is the whole
memory traffic. Statistics and arithmetic are fp32. Casts to bf16 / fp8 ask for
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
