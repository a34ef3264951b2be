"""Fused element-wise kernels for the DiT block's hot path, each with a plain-PyTorch
reference of the same signature (used on CPU, without Triton, or when switched off).

The block spends about a third of a block-step in memory-bound passes around the matrix
products: fp32 LayerNorm + per-frame modulation, q/k RMSNorm + RoPE, gated residual adds,
fp8 activation quantisation, KV ring writes. Each kernel here does one of those in a single
read and write of the activations (kernels_triton.py): modulated_norm (optionally straight to
per-row fp8 for the next fp8 linear), add_norm (a residual update and the next modulated or
affine norm in one pass), rms_norm (q of the cross- and audio attention), rms_norm_rope (q/k
norm + RoPE, optionally written into a KV ring slice), rope, gated_add, gelu (+ fp8) and
quantize_rows; fp8_linear_rows multiplies the fp8 rows with torch._scaled_mm's per-row scales.

Shapes are generic: leading dims are flattened, so x [G, n, dim] with per-group (frame)
modulation [G, 1, dim] works for any G (frames, or batch*frames).

Each model has its own `Kernels` (made from its RunOptions, settings.py): whether the kernels
run for it (auto: on for CUDA tensors when Triton imports and a one-time self-check on the GPU
passes; on; off), whether its fp8 weights are multiplied as fp8, and what it found out about
each device. Nothing here is process-wide: two models can run with different choices.

This module imports nothing from the pack, so bench/kernels_check.py can load it alone.
"""
from __future__ import annotations

import importlib
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
ROW_ALIGN = 16  # torch._scaled_mm wants the row count of its fp8 operand a multiple of 16


# ---- fp8 activations quantised per row ---------------------------------------------------
@dataclass
class Fp8Rows:
    """Activations [..., dim] as fp8 e4m3 rows with one fp32 scale per row (value = data *
    scale), ready for an fp8 linear. data [R, dim], scales [R, 1] with R = rows rounded up
    to 16 (pad rows are zero, scale 1); `shape` is the logical shape of the activation."""

    data: torch.Tensor
    scales: torch.Tensor
    shape: tuple

    @property
    def rows(self) -> int:
        return int(torch.Size(self.shape[:-1]).numel())

    @property
    def device(self) -> torch.device:
        return self.data.device

    def flatten(self, start: int = 0, end: int = -1) -> "Fp8Rows":
        """Reshape the logical leading dims like Tensor.flatten (the rows stay as they are)."""
        return Fp8Rows(self.data, self.scales, tuple(torch.empty(self.shape, device="meta").flatten(start, end).shape))

    def dequantize(self, dtype=torch.bfloat16) -> torch.Tensor:
        rows = self.rows
        return (self.data[:rows].float() * self.scales[:rows]).to(dtype).reshape(self.shape)


def _empty_fp8_rows(rows: int, dim: int, shape, device) -> Fp8Rows:
    padded = rows + (-rows % ROW_ALIGN)
    data = torch.empty(padded, dim, dtype=FP8, device=device)
    scales = torch.empty(padded, 1, dtype=torch.float32, device=device)
    if padded > rows:
        data[rows:].zero_()
        scales[rows:].fill_(1.0)
    return Fp8Rows(data, scales, tuple(shape))


def quantize_rows_reference(x: torch.Tensor) -> Fp8Rows:
    """Per-row fp8: scale = amax(|row|) / 448 (at least 1e-12 / 448), data = row / scale."""
    rows2 = x.reshape(-1, x.shape[-1]).float()
    out = _empty_fp8_rows(rows2.shape[0], rows2.shape[1], x.shape, x.device)
    scale = rows2.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    out.data[:rows2.shape[0]] = (rows2 / scale).to(FP8)
    out.scales[:rows2.shape[0]] = scale
    return out


# ---- references: today's numerics, written out -------------------------------------------
def modulated_norm_reference(x, shift, scale, eps: float, dtype, fp8: bool = False):
    """LayerNorm(x) (no affine, fp32 statistics) * (1 + scale) + shift in fp32, cast to dtype.
    fp8=True: per-row fp8 of the fp32 result instead (Fp8Rows)."""
    y = F.layer_norm(x.float(), (x.shape[-1],), eps=eps) * (1 + scale) + shift
    return quantize_rows_reference(y) if fp8 else y.to(dtype)


def layer_norm_affine_reference(x, weight, bias, eps: float, dtype):
    """fp32 LayerNorm with weight and bias (the cross-attention norm3), cast to dtype."""
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(dtype)


def write_tokens(out, tokens, out_scales=None):
    """Copy tokens [N, heads, head_dim] into out; an fp8 out (KV cache) gets them quantised per
    token: scale = amax over heads and channels / 448 into out_scales (N values)."""
    if out_scales is None:
        return out.copy_(tokens)
    scale = tokens.float().abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12) / FP8_MAX
    out.copy_((tokens.float() / scale).to(out.dtype))
    out_scales.copy_(scale.reshape(out_scales.shape))
    return out


def rope_reference(x, cos, sin, out=None, out_scales=None):
    """x [N, heads, head_dim]: consecutive channel pairs (a, b) times (cos + i sin), in fp32,
    cast back to x's dtype (rope.apply_rope); optionally written into out (write_tokens)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    roped = torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).to(x.dtype)
    return roped if out is None else write_tokens(out, roped, out_scales)


def rms_norm_reference(x, weight, eps: float):
    """Wan's RMSNorm over the whole feature dim: fp32 statistics, the result cast to x's dtype,
    times the weight in x's dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight.to(x.dtype)


def channel_norm_reference(x, gamma, scale: float, silu: bool = False):
    """The Wan VAE's RMSNorm of x [B, C, ...] over C: L2-normalised, times scale (sqrt(C)) and
    gamma (broadcast over C); then SiLU when asked. In x's dtype, step by step."""
    y = F.normalize(x, dim=1) * scale * gamma
    return F.silu(y) if silu else y


def rms_norm_rope_reference(x, weight, eps: float, cos, sin, heads: int, out=None, out_scales=None):
    """rms_norm_reference, then RoPE per head. x [N, dim] -> [N, heads, dim/heads]."""
    normed = rms_norm_reference(x, weight, eps)
    return rope_reference(normed.unflatten(-1, (heads, -1)), cos, sin, out, out_scales)


def gated_add_reference(x, y, gate=None, inplace: bool = False):
    """Residual update in fp32: x + y * gate (x + y without a gate). y is viewed as x."""
    update = y.reshape(x.shape).float()
    if gate is not None:
        update = update * gate
    return x.add_(update) if inplace else x + update


def gelu_reference(x, fp8: bool = False):
    """tanh GELU in x's dtype; fp8=True: then quantised per row (Fp8Rows)."""
    y = F.gelu(x, approximate="tanh")
    return quantize_rows_reference(y) if fp8 else y


def dequantize_tokens_reference(x, scales, out):
    """fp8 tokens x [b, L, H, D] with scales [b, L] -> out [B, L, H, D] (b = B, or 1: broadcast)
    in out's dtype: x * scale in fp32, rounded once."""
    return out.copy_(x.float() * scales.float()[..., None, None])


def merge_attention_reference(parts):
    """Attention over disjoint key sets merged: parts [(out_i [B, n, H, D], lse_i [B, H, n] fp32)]
    -> sum_i out_i * exp(lse_i - lse), lse = logsumexp_i lse_i, in fp32, cast to out_0's dtype."""
    lse = torch.logsumexp(torch.stack([l for _, l in parts]), dim=0)
    total = sum(o.float() * (l - lse).exp().transpose(1, 2).unsqueeze(-1) for o, l in parts)
    return total.to(parts[0][0].dtype)


# ---- helpers of the dispatch ---------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _on_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's (layers sharded over GPUs run
    on cuda:1 etc. without switching the current device)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return nullcontext()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., dim] as [rows, dim] with unit stride in dim (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _per_group(mod: torch.Tensor, x: torch.Tensor):
    """Modulation [..., 1, dim] matching x [..., n, dim] (or [dim]: one group) as [groups, dim]
    and rows per group; None when it broadcasts some other way (then the reference runs)."""
    dim = x.shape[-1]
    if mod.dim() == 1 and mod.shape[0] == dim:
        return mod.reshape(1, dim).float().contiguous(), x.numel() // dim
    if mod.dim() == x.dim() and mod.shape[-2] == 1 and mod.shape[:-2] == x.shape[:-2] and mod.shape[-1] == dim:
        return _rows(mod.float()), x.shape[-2]
    return None


def _scale_vector(out_scales):
    return None if out_scales is None else out_scales.view(-1)


def _rope_fits(x, rows: int, cos, out, out_scales=None) -> bool:
    """Whether the kernel takes these: one cos/sin row per token, out like x with contiguous
    rows (or fp8 with a contiguous per-token scale vector)."""
    if out_scales is not None and not (out is not None and out.dtype == FP8 and out_scales.is_contiguous()
                                       and out_scales.numel() == rows and out_scales.dtype == torch.float32):
        return False
    out_dtype_ok = out is None or out.dtype == (FP8 if out_scales is not None else x.dtype)
    ok_out = out is None or (out.dim() == 3 and out_dtype_ok and out.stride(-1) == 1 and out.stride(-2) == out.shape[-1])
    same_device = cos.device == x.device and (out is None or out.device == x.device)
    return (x.dtype in (torch.bfloat16, torch.float16, torch.float32) and cos.numel() // cos.shape[-1] == rows
            and ok_out and same_device)


def _table(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).float().contiguous()


def _token_rows(t) -> bool:
    return t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]


def rowwise_weight_scale(weight_scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """The per-tensor weight scale as the [1, out_features] fp32 row _scaled_mm's row-wise mode takes."""
    return weight_scale.float().reshape(1, 1).expand(1, out_features).contiguous()


def _relative_error(got, want) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


# ---- one model's kernels ---------------------------------------------------------------------
class Kernels:
    """The element-wise work of one model (its RunOptions' `kernels` and `fp8_compute`): each
    method runs the fused Triton kernel where this object's kernels are active for the tensor,
    the PyTorch reference otherwise, with the same arguments and result either way.

    Active (`active_for`): mode auto or on, a CUDA tensor (or, mode on, a CPU tensor under
    Triton's interpreter, TRITON_INTERPRET=1), Triton imported and the self-check passed on
    that device. Triton is imported, and the kernels compiled, only on first use. Facts of the
    hardware (self-check, fp8 products) are found once per device and kept in `probes`."""

    MODES = ("auto", "on", "off")
    FP8_COMPUTE = ("auto", "dequantize")

    def __init__(self, mode: str = "auto", fp8_compute: str = "auto"):
        if mode not in self.MODES:
            raise ValueError(f"kernels must be one of {', '.join(self.MODES)}, got {mode!r}")
        if fp8_compute not in self.FP8_COMPUTE:
            raise ValueError(f"fp8_compute must be one of {', '.join(self.FP8_COMPUTE)}, got {fp8_compute!r}")
        self.mode, self.fp8_compute = mode, fp8_compute
        self.backend = None  # kernels_triton once imported
        self.failure: str | None = None  # why Triton is unavailable, once known
        self.probes: dict = {}  # (what, device) -> result, found once (tests may preset them)

    def __repr__(self):
        return f"Kernels({self.mode!r}, fp8_compute={self.fp8_compute!r})"

    # ---- whether the kernels run ----------------------------------------------------------
    def active_for(self, t) -> bool:
        """Whether the Triton kernels run for tensors like t."""
        if self.mode == "off" or self.failure is not None:
            return False
        if not t.is_cuda and not (self.mode == "on" and _interpreting()):
            return False
        return self._ready(t.device)

    def status(self) -> str:
        """One line for logs: whether the kernels are used, and if not why."""
        if self.mode == "off":
            return "fused kernels: off (switched off)"
        if self.failure is not None:
            return f"fused kernels: off ({self.failure})"
        failed = {str(device): problem for (what, device), problem in self.probes.items()
                  if what == "self-check" and problem}
        if failed:
            return f"fused kernels: off on {', '.join(failed)} (self-check failed: {'; '.join(failed.values())})"
        if self.backend is None:
            return "fused kernels: not loaded yet (loaded on the first CUDA block)"
        rowwise = any(result for (what, _), result in self.probes.items() if what == "row-wise fp8")
        return f"fused kernels: on (Triton {self.backend.triton.__version__}; fp8 per-row matmul: {rowwise})"

    def probed(self, what: str, device, test):
        """test() once per device, kept: a fact of the hardware (`what` names it)."""
        key = (what, torch.device(device))
        if key not in self.probes:
            self.probes[key] = test()
        return self.probes[key]

    def _ready(self, device) -> bool:
        if self.backend is None and not self._load_backend():
            return False
        if device.type != "cuda":
            return True
        problem = self.probed("self-check", device, lambda: self._self_check(device))
        if problem:
            return False
        if self.fp8_compute == "auto":
            self.fp8_rows_supported(device)  # probed now, not in the middle of a forward
        return True

    def _load_backend(self) -> bool:
        try:
            name = f"{__package__}.kernels_triton" if __package__ else "kernels_triton"
            self.backend = importlib.import_module(name)
        except Exception as error:  # no Triton, or one that does not import with this torch
            self.failure = f"Triton unavailable: {error}"
            return False
        return True

    # ---- the element-wise pieces ---------------------------------------------------------
    def modulated_norm(self, x, shift, scale, eps: float, dtype, fp8: bool = False):
        """x [..., n, dim] fp32, shift/scale [..., 1, dim] fp32 -> LayerNorm(x) * (1 + scale) + shift
        in dtype (fp32 statistics); fp8=True asks for Fp8Rows for an fp8 linear instead (given only
        when the kernels run and the GPU can multiply per-row scaled fp8; otherwise dtype)."""
        if self.active_for(x):
            shift_g, scale_g = _per_group(shift, x), _per_group(scale, x)
            if shift_g is not None and scale_g is not None and shift_g[1] == scale_g[1]:
                return self._modulated_norm_triton(x, shift_g[0], scale_g[0], scale_g[1], eps, dtype, fp8,
                                                   one_plus=True)
        return modulated_norm_reference(x, shift, scale, eps, dtype)

    def _modulated_norm_triton(self, x, shift_g, scale_g, rows_per_group, eps, dtype, fp8, one_plus, residual=None):
        x2 = _rows(x)
        if fp8 and self.fp8_rows_supported(x.device):
            out = _empty_fp8_rows(x2.shape[0], x2.shape[1], x.shape, x.device)
            with _on_device_of(x):
                self.backend.modulated_norm(x2, scale_g, shift_g, rows_per_group, eps, one_plus,
                                            fp8_rows=(out.data, out.scales), residual=residual)
            return out
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        with _on_device_of(x):
            self.backend.modulated_norm(x2, scale_g, shift_g, rows_per_group, eps, one_plus,
                                        out=out.view(-1, x.shape[-1]), residual=residual)
        return out

    def add_norm(self, x, y, gate, shift, scale, eps: float, dtype, fp8: bool = False, affine: bool = False):
        """The residual update followed by the next norm, in one pass over x:
        x + y * gate (fp32; gate [..., 1, dim] or None for x + y), then the norm of that sum:
        LayerNorm * (1 + scale) + shift (scale/shift [..., 1, dim]), or with affine=True the
        LayerNorm with weight=scale, bias=shift ([dim]). Returns (sum fp32 [like x], normed in
        dtype, or Fp8Rows with fp8=True where the kernels run)."""
        if self.active_for(x) and x.dtype == torch.float32 and y.numel() == x.numel():
            if affine:
                rows = x.numel() // x.shape[-1]
                mods = (shift.float().reshape(1, -1), rows), (scale.float().reshape(1, -1), rows)
            else:
                mods = _per_group(shift, x), _per_group(scale, x)
            gate_g = _per_group(gate, x) if gate is not None else (None, 1)
            if None not in mods and gate_g is not None and mods[0][1] == mods[1][1]:
                total = torch.empty(x.shape, dtype=torch.float32, device=x.device)
                residual = (_rows(y).contiguous(), gate_g[0], gate_g[1], total.view(-1, x.shape[-1]))
                normed = self._modulated_norm_triton(x, mods[0][0], mods[1][0], mods[1][1], eps, dtype, fp8,
                                                     one_plus=not affine, residual=residual)
                return total, normed
        total = gated_add_reference(x, y, gate)
        if affine:
            return total, layer_norm_affine_reference(total, scale, shift, eps, dtype)
        return total, modulated_norm_reference(total, shift, scale, eps, dtype)

    def rms_norm(self, x, weight, eps: float):
        """rms_norm_reference in one pass on the GPU: x [..., dim] -> the same shape and dtype."""
        if self.active_for(x) and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and x.shape[-1] % 2 == 0:
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            with _on_device_of(x):
                self.backend.rms_norm(_rows(x), weight, out.view(-1, x.shape[-1]), eps)
            return out
        return rms_norm_reference(x, weight, eps)

    def channel_norm(self, x, gamma, scale: float, silu: bool = False):
        """channel_norm_reference in one pass on the GPU, for channels-last x [B, C, ...] (the
        VAE's activations there): fp32 statistics and arithmetic, rounded once."""
        if (self.active_for(x) and x.movedim(1, -1).is_contiguous() and gamma.numel() == x.shape[1]
                and x.dtype in (torch.bfloat16, torch.float16, torch.float32)):
            return self._channel_norm_triton(x, gamma, scale, silu)
        return channel_norm_reference(x, gamma, scale, silu)

    def _channel_norm_triton(self, x, gamma, scale: float, silu: bool):
        """x [B, C, ...] with C innermost in memory: its rows [N, C] through the kernel."""
        channels = x.shape[1]
        out = torch.empty_like(x)  # same strides: channels-last too
        with _on_device_of(x):
            self.backend.channel_norm(x.movedim(1, -1).view(-1, channels), gamma.reshape(-1).contiguous(),
                                      out.movedim(1, -1).view(-1, channels), scale, silu)
        return out

    def rms_norm_rope(self, x, weight, eps: float, cos, sin, heads: int, out=None, out_scales=None):
        """q/k RMSNorm over the whole dim + RoPE: x [N, dim] (the projection output), weight [dim],
        cos/sin [N, 1, head_dim/2] fp32 -> [N, heads, head_dim] in x's dtype. `out` (e.g. this
        block's slice of the KV ring) receives the result directly: in x's dtype, or fp8 e4m3 with
        one scale per token into out_scales (an fp8 cache, see write_tokens)."""
        if self.active_for(x) and _rope_fits(x, x.numel() // x.shape[-1], cos, out, out_scales):
            if out is None:  # [..., dim] -> [..., heads, head_dim]
                out = x.new_empty(*x.shape[:-1], heads, x.shape[-1] // heads)
            with _on_device_of(x):
                self.backend.rms_norm_rope(_rows(x), weight, _table(cos), _table(sin), out, eps, norm=True,
                                           out_scales=_scale_vector(out_scales))
            return out
        return rms_norm_rope_reference(x, weight, eps, cos, sin, heads, out, out_scales)

    def rope(self, x, cos, sin, out=None, out_scales=None):
        """RoPE alone on x [N, heads, head_dim] (e.g. the reference keys, re-roped each block),
        optionally written straight into `out` (x's dtype, or fp8 with out_scales, as rms_norm_rope)."""
        if self.active_for(x) and _rope_fits(x, x.numel() // (x.shape[-2] * x.shape[-1]), cos, out, out_scales):
            out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
            with _on_device_of(x):
                self.backend.rms_norm_rope(_rows(x.flatten(-2)), None, _table(cos), _table(sin), out, 0.0, norm=False,
                                           out_scales=_scale_vector(out_scales))
            return out
        return rope_reference(x, cos, sin, out, out_scales)

    def gated_add(self, x, y, gate=None, inplace: bool = False):
        """x [..., n, dim] fp32 + y (any float dtype, same number of elements) * gate [..., 1, dim]
        fp32, in fp32; without gate x + y. inplace=True writes into x."""
        if (self.active_for(x) and x.dtype == torch.float32 and (x.is_contiguous() or not inplace)
                and y.numel() == x.numel()):
            gate_g = _per_group(gate, x) if gate is not None else (None, 1)
            if gate_g is not None:
                x = x.contiguous()  # a transposed residual stream (from a permuted patchify) comes out row-major
                out = x if inplace else torch.empty_like(x)
                x2 = x.view(-1, x.shape[-1])
                with _on_device_of(x):
                    self.backend.gated_add(x2, y.reshape(x2.shape).contiguous(), gate_g[0], gate_g[1], out.view(x2.shape))
                return out
        return gated_add_reference(x, y, gate, inplace)

    def gelu(self, x, fp8: bool = False):
        """tanh GELU. fp8=True asks for Fp8Rows for the FFN's second (fp8) linear: GELU and
        quantisation in one pass (when the kernels run; otherwise the plain GELU)."""
        if fp8 and self.active_for(x) and self.fp8_rows_supported(x.device):
            return self._quantize_rows_triton(x, gelu=True)
        return F.gelu(x, approximate="tanh")

    def quantize_rows(self, x, out=None, out_scales=None):
        """Per-row fp8 quantisation (one pass) of x [..., dim] -> Fp8Rows; or, with out (fp8, rows
        contiguous, e.g. a KV ring slice [N, heads, head_dim]) and out_scales (N fp32), written there
        (the values of an fp8 KV cache, see write_tokens) and out returned."""
        if out is not None:
            tokens = out.shape[0]
            if (self.active_for(x) and out.is_contiguous() and out_scales.is_contiguous() and out.dtype == FP8
                    and x.numel() == out.numel() and out_scales.numel() == tokens):
                with _on_device_of(x):  # one row per token: [N, heads * head_dim]
                    self.backend.quantize_rows(x.reshape(tokens, -1).contiguous(), out.view(tokens, -1),
                                               out_scales.view(-1), False)
                return out
            return write_tokens(out, x.reshape(out.shape), out_scales)
        if self.active_for(x):
            return self._quantize_rows_triton(x, gelu=False)
        return quantize_rows_reference(x)

    def write_tokens(self, x, out, out_scales=None):
        """Copy tokens [N, heads, head_dim] into a cache slice; fp8 (out_scales given): quantised
        per token (scale = amax / 448) in the same pass."""
        if out_scales is None:
            return out.copy_(x)
        return self.quantize_rows(x, out, out_scales)

    def _quantize_rows_triton(self, x, gelu: bool) -> Fp8Rows:
        x2 = _rows(x)
        out = _empty_fp8_rows(x2.shape[0], x2.shape[1], x.shape, x.device)
        with _on_device_of(x):
            self.backend.quantize_rows(x2, out.data, out.scales, gelu)
        return out

    def dequantize_tokens(self, x, scales, out):
        """dequantize_tokens_reference in one pass on the GPU (fp8 cache segments into the
        compute-dtype buffer attention reads). Token rows (H*D) must be contiguous."""
        batch = out.shape[0]
        if (self.active_for(x) and x.dtype == FP8 and x.dim() == 4 and out.dim() == 4 and x.shape[0] in (1, batch)
                and _token_rows(x) and _token_rows(out) and scales.dtype == torch.float32):
            with _on_device_of(x):
                self.backend.dequantize_tokens(x, scales, out)
            return out
        return dequantize_tokens_reference(x, scales, out)

    def merge_attention(self, parts):
        """merge_attention_reference; two parts in one pass on the GPU."""
        if len(parts) == 2 and self.active_for(parts[0][0]):
            (out1, lse1), (out2, lse2) = parts
            if out1.stride(-1) == 1 and out2.stride(-1) == 1 and out1.shape == out2.shape:
                out = torch.empty(out1.shape, dtype=out1.dtype, device=out1.device)
                with _on_device_of(out1):
                    self.backend.merge_attention(out1, lse1, out2, lse2, out)
                return out
        return merge_attention_reference(parts)

    # ---- fp8 matrix products ----------------------------------------------------------------
    def fp8_products_on(self, device) -> bool:
        """Whether fp8 weights are multiplied as fp8 (torch._scaled_mm) on this device:
        fp8_compute auto and a GPU that takes fp8 operands (probed once)."""
        device = torch.device(device)
        return (self.fp8_compute == "auto" and device.type == "cuda"
                and self.probed("fp8 matmul", device, lambda: _fp8_product_works(device, False, self.probes)))

    def fp8_rows_supported(self, device) -> bool:
        """Whether torch._scaled_mm takes per-row activation scales on this GPU (sm90 and newer
        with recent torch); checked once with a tiny product."""
        device = torch.device(device)
        return self.probed("row-wise fp8", device, lambda: device.type == "cuda" and _fp8_product_works(device, True, self.probes))

    def takes_fp8_rows(self, weight) -> bool:
        """Whether an fp8 weight like this one multiplies Fp8Rows as they are (per-row scaled
        fp8 product): fp8 products wanted, the kernels active and the GPU able."""
        return (self.fp8_compute == "auto" and self.active_for(weight) and self.fp8_rows_supported(weight.device))

    def fp8_linear_rows(self, a: Fp8Rows, weight, weight_scale_row, bias=None, out_dtype=torch.bfloat16):
        """a (Fp8Rows [..., in]) @ weight^T (fp8 [out, in], scale row [1, out]) + bias -> [..., out]."""
        return fp8_linear_rows(a, weight, weight_scale_row, bias, out_dtype, self.probes)

    # ---- one-time self-check on a GPU -------------------------------------------------------
    def _self_check(self, device) -> str | None:
        """Each kernel against its reference on small random inputs; returns what failed, or None."""
        gen = torch.Generator(device="cpu").manual_seed(0)

        def rand(*shape, dtype=torch.float32):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        try:
            for name, got, want, tol in self.self_check_cases(rand):
                err = _relative_error(got, want)
                if not err <= tol:  # also catches NaN
                    problem = f"{name}: relative error {err:.2e} > {tol:.0e}"
                    break
            else:
                return None
        except Exception as error:  # a Triton/driver problem: fall back rather than fail the run
            problem = f"{type(error).__name__}: {error}"
        warnings.warn(f"liveavatar: fused Triton kernels disabled on {device}, using PyTorch ({problem})")
        return problem

    def self_check_cases(self, rand):
        """(name, kernel output, reference output, relative L2 tolerance) on small shapes."""
        backend = self.backend
        x, shift, scale = rand(2, 24, 256), rand(2, 1, 256), rand(2, 1, 256)
        yield ("modulated_norm", self._modulated_norm_triton(x, _rows(shift), _rows(scale), 24, 1e-6, torch.bfloat16,
                                                             False, True),
               modulated_norm_reference(x, shift, scale, 1e-6, torch.bfloat16), 1e-2)
        q, w, cos, sin = rand(48, 256, dtype=torch.bfloat16), rand(256), rand(48, 1, 64), rand(48, 1, 64)
        out = q.new_empty(48, 2, 128)
        with _on_device_of(x):
            backend.rms_norm_rope(q, w, _table(cos), _table(sin), out, 1e-6, norm=True)
        yield "rms_norm_rope", out, rms_norm_rope_reference(q, w, 1e-6, cos, sin, 2), 1e-2
        plain = torch.empty_like(q)
        with _on_device_of(x):
            backend.rms_norm(q, w, plain, 1e-6)
        yield "rms_norm", plain, rms_norm_reference(q, w, 1e-6), 1e-2
        q8, s8 = torch.empty(48, 256, dtype=FP8, device=x.device), torch.empty(48, 1, device=x.device)
        with _on_device_of(x):
            backend.modulated_norm(_rows(x), _rows(scale), _rows(shift), 24, 1e-6, True, fp8_rows=(q8, s8))
        yield ("modulated_norm fp8", (q8.float() * s8).view_as(x),
               modulated_norm_reference(x, shift, scale, 1e-6, torch.float32), 0.1)
        y, gate = rand(2, 24, 256, dtype=torch.bfloat16), rand(2, 1, 256)
        total = torch.empty_like(x)
        normed = self._modulated_norm_triton(x, _rows(shift), _rows(scale), 24, 1e-6, torch.bfloat16, False, True,
                                             residual=(_rows(y).contiguous(), _rows(gate), 24, total.view(-1, 256)))
        want_total = gated_add_reference(x, y, gate)
        yield "add_norm (sum)", total, want_total, 1e-5
        yield "add_norm (norm)", normed, modulated_norm_reference(want_total, shift, scale, 1e-6, torch.bfloat16), 1e-2
        out = torch.empty_like(x)
        with _on_device_of(x):
            backend.gated_add(x.view(-1, 256), y.view(-1, 256), _rows(gate), 24, out.view(-1, 256))
        yield "gated_add", out, gated_add_reference(x, y, gate), 1e-5
        h = rand(40, 512, dtype=torch.bfloat16)
        yield "gelu_fp8", self._quantize_rows_triton(h, gelu=True).dequantize(torch.float32), gelu_reference(h), 0.1
        tokens = rand(3, 10, 4, 32)
        token_scales = tokens.abs().amax(dim=(-2, -1)) / FP8_MAX
        stored = (tokens / token_scales[..., None, None]).to(FP8)
        got = torch.empty(3, 10, 4, 32, dtype=torch.bfloat16, device=x.device)
        with _on_device_of(x):
            backend.dequantize_tokens(stored, token_scales, got)
        yield "dequantize_tokens", got, dequantize_tokens_reference(stored, token_scales, torch.empty_like(got)), 1e-2
        outs = [rand(2, 10, 4, 32, dtype=torch.bfloat16) for _ in range(2)]
        lses = [rand(2, 4, 10) * 3 for _ in range(2)]
        merged = torch.empty_like(outs[0])
        with _on_device_of(x):
            backend.merge_attention(outs[0], lses[0], outs[1], lses[1], merged)
        yield "merge_attention", merged, merge_attention_reference(list(zip(outs, lses))), 1e-2
        video = rand(1, 96, 2, 6, 5, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
        gamma = rand(96, 1, 1, 1, dtype=torch.bfloat16)
        yield ("channel_norm", self._channel_norm_triton(video, gamma, 96 ** 0.5, silu=True),
               channel_norm_reference(video.float(), gamma.float(), 96 ** 0.5, silu=True), 1e-2)


# ---- fp8 matrix product with per-row activation scales -----------------------------------
def fp8_linear_rows(a: Fp8Rows, weight, weight_scale_row, bias=None, out_dtype=torch.bfloat16, probes=None):
    """a (Fp8Rows [..., in]) @ weight^T (fp8 [out, in], scale row [1, out]) + bias -> [..., out].
    `probes` (a Kernels' probes) remembers per device whether _scaled_mm takes the bias with
    row-wise scales (some torch builds do not: then it is added after)."""
    probes = {} if probes is None else probes
    key = ("row-wise bias", a.device)
    b = weight.t()
    out = None
    if bias is not None and probes.get(key) is not False:
        try:
            out = torch._scaled_mm(a.data, b, scale_a=a.scales, scale_b=weight_scale_row,
                                   bias=bias.to(out_dtype), out_dtype=out_dtype)
            probes[key] = True
        except RuntimeError:
            probes[key] = False
    if out is None:
        out = torch._scaled_mm(a.data, b, scale_a=a.scales, scale_b=weight_scale_row, out_dtype=out_dtype)
        if bias is not None:
            out = out + bias.to(out_dtype)
    return out[:a.rows].reshape(*a.shape[:-1], weight.shape[0])


def _fp8_product_works(device, rowwise: bool, probes: dict) -> bool:
    """A tiny fp8 product on `device` against the fp32 one: per-row activation scales and a bias
    (rowwise; also settles whether the bias can go into _scaled_mm), or one scale per tensor."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(32, 64, generator=gen).to(device)
    w = torch.randn(48, 64, generator=gen).to(device)
    bias = torch.randn(48, generator=gen).to(device)
    w_scale = w.abs().amax() / FP8_MAX
    w8 = (w / w_scale).to(FP8)
    try:
        if rowwise:
            got = fp8_linear_rows(quantize_rows_reference(a), w8, rowwise_weight_scale(w_scale, 48), bias, probes=probes)
        else:
            a_scale = a.abs().amax() / FP8_MAX
            got = torch._scaled_mm((a / a_scale).to(FP8), w8.t(), scale_a=a_scale.float(), scale_b=w_scale.float(),
                                   bias=bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
    except (RuntimeError, TypeError):
        return False
    return _relative_error(got, a @ w.t() + bias) < 0.1
