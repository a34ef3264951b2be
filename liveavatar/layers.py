"""Small building blocks shared by the DiT: a Linear that knows its compute dtype
(including fp8 e4m3fn weight storage), RMSNorm, and attention over [..., L, heads, dim].
"""
import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


class Linear(nn.Linear):
    """nn.Linear whose input is cast to the weight's compute dtype.

    Weights stored in fp8 (e4m3fn) carry a per-tensor `scale_weight` (ComfyUI's
    fp8_scaled convention: real weight = stored * scale) and are computed in bf16.
    """

    fp8_compute_dtype = torch.bfloat16

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.fp8_compute_dtype if self.weight.dtype in FP8_DTYPES else self.weight.dtype

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        weight = self.weight.to(dtype)
        scale = getattr(self, "scale_weight", None)
        return weight * scale.to(dtype) if scale is not None else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.weight.dtype in FP8_DTYPES and x.is_cuda:
            return fp8_linear(x.to(dtype), self.weight, self.scale_weight, bias)
        return F.linear(x.to(dtype), self.weight_as(dtype), bias)

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
    scale = rows.abs().amax().float().clamp_min(1e-12) / 448.0
    quantised = (rows / scale.to(rows.dtype)).to(weight.dtype)
    out = torch._scaled_mm(quantised, weight.t(), scale_a=scale, scale_b=weight_scale.float(), bias=bias,
                           out_dtype=x.dtype)
    return out[:out.shape[0] - pad].reshape(*x.shape[:-1], -1)


class RMSNorm(nn.Module):
    """Wan's RMSNorm over the full (all heads) feature dim: normalise in fp32, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return normed * self.weight.to(x.dtype)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Affine-free LayerNorm in fp32 (the modulated norms of the DiT blocks and head)."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


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
