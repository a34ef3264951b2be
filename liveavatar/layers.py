"""Small building blocks shared by the DiT: a Linear that knows its compute dtype
(including fp8 e4m3fn weight storage), RMSNorm, and attention over [..., L, heads, dim].

Modules with element-wise work hold a `kernels` (kernels.Kernels): their own default one until
the model they belong to hands them its own (`bind_kernels`, LiveAvatarDiT.use_options).
"""
import torch
import torch.nn.functional as F
from torch import nn

from .kernels import Fp8Rows, Kernels, rowwise_weight_scale

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


class Linear(nn.Linear):
    """nn.Linear whose input is cast to the weight's compute dtype.

    Weights stored in fp8 (e4m3fn) carry a per-tensor `scale_weight` (ComfyUI's
    fp8_scaled convention: real weight = stored * scale) and are computed in bf16.
    """

    fp8_compute_dtype = torch.bfloat16

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kernels = Kernels()

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.fp8_compute_dtype if self.weight.dtype in FP8_DTYPES else self.weight.dtype

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        weight = self.weight.to(dtype)
        scale = getattr(self, "scale_weight", None)
        return weight * scale.to(dtype) if scale is not None else weight

    @property
    def takes_fp8_rows(self) -> bool:
        """Whether forward() multiplies Fp8Rows input on the fp8 tensor cores as it is (fp8
        weights on a GPU where the fused kernels and per-row scaled matmuls work, fp8_compute
        auto): then the producer of the input (norm, GELU) can quantise it in the same pass."""
        return self.weight.dtype in FP8_DTYPES and self.kernels.takes_fp8_rows(self.weight)

    def forward(self, x) -> torch.Tensor:
        """x: a tensor [..., in] (any float dtype) or Fp8Rows from a fused producer. fp8 weights
        are multiplied as fp8 where the kernels say so (fp8_products_on), else dequantised."""
        dtype = self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        if isinstance(x, Fp8Rows):
            if self.takes_fp8_rows:
                return self._fp8_rows_product(x, bias)
            x = x.dequantize(dtype)  # e.g. a bf16 layer sharing a quantised input
        if self.weight.dtype in FP8_DTYPES and x.is_cuda and self.kernels.fp8_products_on(x.device):
            if self.takes_fp8_rows:  # one fused pass: per-row scales instead of amax, divide, cast
                return self._fp8_rows_product(self.kernels.quantize_rows(x), bias)
            return fp8_linear(x.to(dtype), self.weight, self.scale_weight, bias)
        return F.linear(x.to(dtype), self.weight_as(dtype), bias)

    def forward_gelu(self, x) -> torch.Tensor:
        """tanh-GELU(forward(x)). On CUDA with bf16/fp16 weights and a bias the GELU runs in the
        matmul's epilogue (cuBLASLt GELU_BIAS, the tanh form): no separate pass over the FFN's
        widest activation."""
        dtype = self.compute_dtype
        if (isinstance(x, torch.Tensor) and x.is_cuda and self.bias is not None and self.weight.dtype == dtype
                and dtype in (torch.bfloat16, torch.float16)):
            rows = x.reshape(-1, x.shape[-1]).to(dtype)
            return torch._addmm_activation(self.bias, rows, self.weight.t(), use_gelu=True).reshape(*x.shape[:-1], -1)
        return F.gelu(self(x), approximate="tanh")

    def _fp8_rows_product(self, rows: Fp8Rows, bias) -> torch.Tensor:
        scale = rowwise_weight_scale(self.scale_weight, self.weight.shape[0])
        return self.kernels.fp8_linear_rows(rows, self.weight, scale, bias, self.compute_dtype)

    def forward_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """Full-precision path for the small conditioning MLPs the original runs in fp32."""
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight_as(torch.float32), bias)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias) -> torch.Tensor:
    """x @ W^T on the fp8 tensor cores: activations quantised per tensor on the fly (scale =
    amax / 448, kept on the GPU: no host sync), rows padded to the multiple of 16 the kernel
    needs. Output in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    pad = -rows.shape[0] % 16
    if pad:
        rows = F.pad(rows, (0, 0, 0, pad))
    quantised, scale = quantize(rows, weight.dtype)
    out = torch._scaled_mm(quantised, weight.t(), scale_a=scale, scale_b=weight_scale.float(), bias=bias,
                           out_dtype=x.dtype)
    return out[:out.shape[0] - pad].reshape(*x.shape[:-1], -1)


class RMSNorm(nn.Module):
    """Wan's RMSNorm over the full (all heads) feature dim: normalise in fp32, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernels = Kernels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)

    def forward_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, out=None,
                     out_scales=None):
        """forward() then rope.apply_rope per head, in one pass on CUDA: x [N, dim] -> [N, heads,
        dim/heads]; cos/sin [N, 1, head_dim/2]. `out` (e.g. a KV ring slice) gets the result: in
        x's dtype, or fp8 with per-token scales into out_scales (an fp8 cache)."""
        return self.kernels.rms_norm_rope(x, self.weight, self.eps, cos, sin, heads, out, out_scales)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Affine-free LayerNorm in fp32 (the modulated norms of the DiT blocks and head)."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


def modulated_norm(x, shift, scale, eps: float, dtype: torch.dtype):
    """adaLN: LayerNorm(x) * (1 + scale) + shift in fp32, handed on in `dtype`."""
    return (layer_norm(x, eps) * (1 + scale) + shift).to(dtype)


def quantize(rows: torch.Tensor, dtype: torch.dtype):
    """Per-tensor fp8 quantisation: (rows / scale in fp8, scale = amax / 448), scale on device."""
    scale = rows.abs().amax().float().clamp_min(1e-12) / 448.0
    return (rows.float() / scale).to(dtype), scale


def gated_add(x, y, gate=None):
    """Residual update x + y * gate in fp32 (the original's autocast-fp32 region); x + y without a gate."""
    return x + (y.float() if gate is None else y.float() * gate)


def bind_kernels(module: nn.Module, kernels: Kernels):
    """Make `kernels` the one every sub-module with element-wise work uses (one model, one Kernels)."""
    for sub in module.modules():
        if isinstance(getattr(sub, "kernels", None), Kernels):
            sub.kernels = kernels


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention, no mask. q [..., Lq, H, D], k/v [..., Lk, H, D] -> [..., Lq, H, D].
    Run as 4-D [batch, heads, tokens, dim]: the fused (flash / memory-efficient) SDPA kernels
    take only that layout; anything else falls back to the slow fp32 math path."""
    batch_dims = q.shape[:-3]
    q, k, v = (t.reshape(-1, *t.shape[-3:]).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(*batch_dims, *out.shape[2:3], out.shape[1], out.shape[3])


def conv_fp32(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a Conv1d/Conv3d in fp32 whatever its storage dtype."""
    bias = None if conv.bias is None else conv.bias.float()
    weight = conv.weight.float()
    if isinstance(conv, nn.Conv1d):
        return F.conv1d(x.float(), weight, bias, conv.stride, 0, conv.dilation)
    return F.conv3d(x.float(), weight, bias, conv.stride)
