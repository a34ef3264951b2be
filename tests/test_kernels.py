"""Fused kernels (liveavatar/kernels.py) against independent PyTorch references.

On a GPU the compiled Triton kernels run; on CPU Triton's interpreter runs them (conftest.py
selects it). Without Triton those tests skip; the reference paths are tested either way.
Shapes are small (interpreter speed) with a non-power-of-two dim so the masking is exercised.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import kernels_switched_on
from liveavatar import kernels, layers, rope
from liveavatar.kernels import Kernels
from liveavatar.layers import Linear, RMSNorm

BF16_STEP = 2.0 ** -7  # bf16 keeps 8 significant bits: neighbours differ by <= 2^-7 relative
FP8_HALF_STEP = 2.0 ** -4  # e4m3 keeps 4: rounding error <= 2^-4 relative (normal range)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def fx(monkeypatch):
    """A Kernels switched on: compiled on a GPU; on CPU run by Triton's interpreter (conftest
    selects it before triton is imported), with per-row fp8 matmuls taken as available so the
    fp8 producers hand out Fp8Rows."""
    fused = kernels_switched_on()
    if DEVICE == "cpu":
        fused.probes[("row-wise fp8", torch.device("cpu"))] = True
        exact_interpreter_casts(monkeypatch)
    assert fused.active_for(torch.zeros(1, device=DEVICE)), fused.status()
    return fused


def exact_interpreter_casts(monkeypatch):
    """Triton's interpreter rounds float down-casts approximately (ties away from zero, a
    mantissa carry can land in the wrong exponent bit); the GPU rounds to nearest even. Let the
    interpreter cast through torch instead so it rounds like the hardware (and like PyTorch)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    as_torch = {tl.float32: torch.float32, tl.bfloat16: torch.bfloat16, tl.float16: torch.float16,
                tl.float8e4nv: torch.float8_e4m3fn}
    as_bits = {1: torch.int8, 2: torch.int16, 4: torch.int32}
    approximate = interpreter._convert_float

    def convert(data, src, dst, rounding_mode):
        if src not in as_torch or dst not in as_torch or rounding_mode == interpreter._ir.ROUNDING_MODE.RTZ:
            return approximate(data, src, dst, rounding_mode)
        raw = torch.from_numpy(np.ascontiguousarray(data).view(f"int{data.dtype.itemsize * 8}"))
        out = raw.view(as_torch[src]).to(as_torch[dst])
        bits = out.view(as_bits[out.element_size()]).numpy()
        return bits.view(f"uint{bits.dtype.itemsize * 8}").reshape(data.shape)

    monkeypatch.setattr(interpreter, "_convert_float", convert)


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def assert_within_bf16_step(got, want, rotated: bool = False):
    """Equal up to one bf16 rounding step of the expected value. rotated (RoPE output): one
    step of the channel pair's length, since on a GPU a one-step difference in the rounded
    normed input (fp32 sums in another order) is rotated into both channels of the pair."""
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = (got.float() - want.float()).abs()
    magnitude = want.float().abs()
    if rotated:
        pair_length = want.float().unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True)
        magnitude = pair_length.expand(*pair_length.shape[:-1], 2).flatten(-2)
    floor = 1e-6 * want.float().pow(2).mean().sqrt()
    assert (diff <= magnitude * BF16_STEP * 1.0001 + floor).all(), float(diff.max())
    assert (got == want).float().mean() > 0.95  # nearly all exactly equal


def assert_fp8_rows_close(rows: kernels.Fp8Rows, want_fp32):
    """Dequantised rows within one fp8 rounding of the fp32 values, scales = amax / 448."""
    want = want_fp32.reshape(-1, want_fp32.shape[-1]).float()
    count = want.shape[0]
    scales = rows.scales[:count]
    torch.testing.assert_close(scales, want.abs().amax(1, keepdim=True) / 448.0, rtol=1e-6, atol=0)
    got = rows.data[:count].float() * scales
    assert ((got - want).abs() <= want.abs() * (FP8_HALF_STEP + BF16_STEP) + scales * 2.0 ** -9 * 1.01).all()
    assert rows.data.shape[0] % 16 == 0 and (rows.data[count:].float() == 0).all() and (rows.scales[count:] == 1).all()


# ---- kernels (interpreted on CPU) against the references ----------------------------------
def test_modulated_norm_kernel_matches_fp32_layer_norm(fx):
    x, shift, scale = randn(3, 20, 96) * 3 + 1, randn(3, 1, 96, seed=1), randn(3, 1, 96, seed=2)
    want = layers.modulated_norm(x, shift, scale, 1e-6, torch.float32)
    torch.testing.assert_close(fx.modulated_norm(x, shift, scale, 1e-6, torch.float32), want, rtol=1e-5, atol=1e-5)
    assert_within_bf16_step(fx.modulated_norm(x, shift, scale, 1e-6, torch.bfloat16),
                            layers.modulated_norm(x, shift, scale, 1e-6, torch.bfloat16))


def test_modulated_norm_fp8_rows(fx):
    x, shift, scale = randn(3, 20, 96), randn(3, 1, 96, seed=1), randn(3, 1, 96, seed=2)
    rows = fx.modulated_norm(x, shift, scale, 1e-6, torch.bfloat16, fp8=True)
    assert isinstance(rows, kernels.Fp8Rows) and rows.shape == (3, 20, 96)
    assert_fp8_rows_close(rows, layers.modulated_norm(x, shift, scale, 1e-6, torch.float32))
    assert rows.flatten(0, 1).shape == (60, 96)


def rope_tables(tokens: int, head_dim: int):
    positions = rope.grid_positions(range(-1, 1), range(2), range(tokens // 4))  # includes negative times
    return tuple(t.to(DEVICE) for t in rope.rope_tables(positions, head_dim))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_rope_kernel_matches_rmsnorm_then_apply_rope(fx, dtype):
    heads, head_dim = 3, 32
    x = (randn(20, heads * head_dim) * 4).to(dtype)
    norm = RMSNorm(heads * head_dim, eps=1e-6)
    norm.weight.data, norm.kernels = randn(heads * head_dim, seed=1), fx
    cos, sin = rope_tables(20, head_dim)
    want = rope.apply_rope(kernels.rms_norm_reference(x, norm.weight, 1e-6).unflatten(-1, (heads, head_dim)), cos, sin)
    got = norm.forward_rope(x, cos, sin, heads)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert_within_bf16_step(got, want, rotated=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_kernel_is_wan_rmsnorm(fx, dtype):
    """x / rms(x) in full precision, rounded to x's dtype, times the weight in x's dtype."""
    x = (randn(3, 20, 96) * 4).to(dtype)
    norm = RMSNorm(96, eps=1e-6)
    norm.weight.data, norm.kernels = randn(96, seed=1), fx
    rms = x.double().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    want = (x.double() / rms).to(dtype) * norm.weight.to(dtype)
    got = norm(x)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert_within_bf16_step(got, want)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_channel_norm_kernel_is_the_vae_rmsnorm_and_silu(fx, dtype, silu):
    """The VAE's norm on channels-last activations [B, C, T, H, W] (C = 12: masked lanes, rows
    spread over programs): x / |x| over C * sqrt(C) * gamma (then SiLU) in double precision,
    rounded once to x's dtype; the layout of x kept."""
    x = (randn(2, 12, 3, 5, 7) * 4).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    gamma = randn(12, 1, 1, 1, seed=1).to(dtype)
    exact = x.double() / x.double().norm(dim=1, keepdim=True) * 12 ** 0.5 * gamma.double()
    if silu:
        exact = exact * torch.sigmoid(exact)
    got = fx.channel_norm(x, gamma, 12 ** 0.5, silu)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    if dtype == torch.float32:
        torch.testing.assert_close(got, exact.float(), rtol=1e-5, atol=1e-5)
    else:
        assert_within_bf16_step(got, exact.to(dtype))


def test_channel_norm_takes_the_reference_for_other_layouts(fx):
    """Activations not channels-last (the CPU's layout) go through the step-by-step reference."""
    x, gamma = randn(1, 12, 2, 4, 4), randn(12, 1, 1, 1, seed=1)
    got = fx.channel_norm(x, gamma, 12 ** 0.5, True)
    assert torch.equal(got, kernels.channel_norm_reference(x, gamma, 12 ** 0.5, True))


def test_rms_norm_rope_writes_into_a_ring_slice(fx):
    heads, head_dim = 2, 32
    x, weight = randn(8, heads * head_dim, dtype=torch.bfloat16), randn(heads * head_dim, seed=1)
    cos, sin = rope_tables(8, head_dim)
    ring = torch.zeros(20, heads, head_dim, dtype=torch.bfloat16, device=DEVICE)
    returned = fx.rms_norm_rope(x, weight, 1e-6, cos, sin, heads, out=ring[4:12])
    assert returned.data_ptr() == ring[4:12].data_ptr()
    assert_within_bf16_step(ring[4:12], kernels.rms_norm_rope_reference(x, weight, 1e-6, cos, sin, heads), rotated=True)
    assert (ring[:4] == 0).all() and (ring[12:] == 0).all()


def test_rms_norm_rope_takes_batched_leading_dims(fx):
    x, weight = randn(2, 8, 64, dtype=torch.bfloat16), randn(64, seed=1)
    cos, sin = rope_tables(16, 32)
    got = fx.rms_norm_rope(x, weight, 1e-6, cos, sin, 2)
    assert got.shape == (2, 8, 2, 32)
    want = kernels.rms_norm_rope_reference(x.flatten(0, 1), weight, 1e-6, cos, sin, 2)
    assert_within_bf16_step(got.flatten(0, 1), want, rotated=True)


def fp8_cache_write(tokens):
    """What StepCache._write stores for an fp8 cache: per-token scale = amax / 448, tokens / scale."""
    scale = tokens.float().abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-12) / 448.0
    return (tokens.float() / scale).to(torch.float8_e4m3fn), scale


def test_fp8_cache_writes_roped_keys_and_values_with_token_scales(fx):
    heads, head_dim = 2, 32
    x, weight = randn(8, heads * head_dim, dtype=torch.bfloat16), randn(heads * head_dim, seed=1)
    cos, sin = rope_tables(8, head_dim)
    ring = torch.zeros(20, heads, head_dim, dtype=torch.float8_e4m3fn, device=DEVICE)
    scales = torch.ones(2, 20, 1, 1, device=DEVICE)  # StepCache's layout: [keys/values, tokens, 1, 1]
    fx.rms_norm_rope(x, weight, 1e-6, cos, sin, heads, out=ring[4:12], out_scales=scales[0, 4:12])
    want, want_scale = fp8_cache_write(kernels.rms_norm_rope_reference(x, weight, 1e-6, cos, sin, heads))
    # on a GPU a token's largest value may round one bf16 step apart (fp32 sums in another order)
    torch.testing.assert_close(scales[0, 4:12], want_scale, rtol=BF16_STEP, atol=0)
    assert (ring[4:12].view(torch.uint8) == want.view(torch.uint8)).float().mean() > 0.99
    assert (ring[:4].float() == 0).all() and (ring[12:].float() == 0).all() and (scales[0, :4] == 1).all()
    keys = randn(4, heads, head_dim, dtype=torch.bfloat16, seed=2)
    fx.rope(keys, cos[:4], sin[:4], out=ring[:4], out_scales=scales[0, :4])
    want, want_scale = fp8_cache_write(rope.apply_rope(keys, cos[:4], sin[:4]))
    torch.testing.assert_close(scales[0, :4], want_scale, rtol=1e-6, atol=0)
    assert (ring[:4].view(torch.uint8) == want.view(torch.uint8)).float().mean() > 0.99
    values = randn(8, heads, head_dim, dtype=torch.bfloat16, seed=3)
    fx.write_tokens(values, ring[12:20], scales[1, 12:20])
    want, want_scale = fp8_cache_write(values)
    torch.testing.assert_close(scales[1, 12:20], want_scale, rtol=1e-6, atol=0)
    assert torch.equal(ring[12:20].view(torch.uint8), want.view(torch.uint8))


def test_rope_kernel_matches_apply_rope(fx):
    x = randn(8, 2, 32, dtype=torch.bfloat16)
    cos, sin = rope_tables(8, 32)
    assert_within_bf16_step(fx.rope(x, cos, sin), rope.apply_rope(x, cos, sin), rotated=True)


def test_gated_add_kernel(fx):
    x, y, gate = randn(3, 20, 96), randn(60, 96, dtype=torch.bfloat16, seed=1), randn(3, 1, 96, seed=2)
    want = x + y.float().view_as(x) * gate
    torch.testing.assert_close(fx.gated_add(x, y.view_as(x), gate), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fx.gated_add(x, y.view_as(x)), x + y.float().view_as(x), rtol=1e-6, atol=1e-6)
    inplace = x.clone()
    assert fx.gated_add(inplace, y, gate, inplace=True) is inplace
    torch.testing.assert_close(inplace, want, rtol=1e-6, atol=1e-6)


def test_add_norm_kernel_is_gated_add_then_norm(fx):
    x, y = randn(3, 20, 96) * 3, randn(60, 96, dtype=torch.bfloat16, seed=1)
    gate, shift, scale = randn(3, 1, 96, seed=2), randn(3, 1, 96, seed=3), randn(3, 1, 96, seed=4)
    total, normed = fx.add_norm(x, y, gate, shift, scale, 1e-6, torch.bfloat16)
    want_total = x + y.float().view_as(x) * gate
    torch.testing.assert_close(total, want_total, rtol=1e-6, atol=1e-6)
    assert_within_bf16_step(normed, layers.modulated_norm(want_total, shift, scale, 1e-6, torch.bfloat16))
    weight, bias = randn(96, seed=5), randn(96, seed=6)  # cross-attention norm3 after an ungated add
    total, normed = fx.add_norm(x, y, None, bias, weight, 1e-6, torch.float32, affine=True)
    want_total = x + y.float().view_as(x)
    torch.testing.assert_close(total, want_total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normed, F.layer_norm(want_total, (96,), weight, bias, 1e-6), rtol=1e-5, atol=1e-5)
    rows = fx.add_norm(x, y, gate, shift, scale, 1e-6, torch.bfloat16, fp8=True)[1]
    assert_fp8_rows_close(rows, layers.modulated_norm(x + y.float().view_as(x) * gate, shift, scale, 1e-6, torch.float32))


def test_gelu_fp8_rows_and_quantize_rows(fx):
    h = randn(20, 200, dtype=torch.bfloat16) * 3
    gelu = F.gelu(h, approximate="tanh")
    rows = fx.gelu(h, fp8=True)
    assert_fp8_rows_close(rows, gelu.float())
    reference = kernels.quantize_rows_reference(gelu)
    assert (rows.data.view(torch.uint8) == reference.data.view(torch.uint8)).float().mean() > 0.98
    assert_fp8_rows_close(fx.quantize_rows(h), h.float())


def test_linear_takes_fp8_rows_on_cpu_by_dequantising(fx):
    linear = Linear(96, 48).to(DEVICE)
    linear.kernels = fx
    x = randn(20, 96)
    rows = fx.quantize_rows(x)
    torch.testing.assert_close(linear(rows), F.linear(rows.dequantize(torch.float32), linear.weight, linear.bias))


# ---- the switch and the references ---------------------------------------------------------
def test_self_check_passes(fx):
    assert fx._self_check(torch.device(DEVICE)) is None


def test_kernels_off_on_cpu_by_default_and_when_switched_off():
    x = torch.zeros(2, 4, 16)
    assert not Kernels().active_for(x)  # auto: CUDA tensors only
    off = Kernels("off")
    assert not off.active_for(x) and off.status() == "fused kernels: off (switched off)"
    with pytest.raises(ValueError, match="kernels must be one of auto, on, off, got 'yes'"):
        Kernels("yes")


def test_references_match_todays_layers():
    fx = Kernels("off")
    x, shift, scale = randn(2, 5, 64), randn(2, 1, 64, seed=1), randn(2, 1, 64, seed=2)
    assert torch.equal(fx.modulated_norm(x, shift, scale, 1e-6, torch.bfloat16),
                       layers.modulated_norm(x, shift, scale, 1e-6, torch.bfloat16))
    y, gate = randn(10, 64, dtype=torch.bfloat16), randn(2, 1, 64)
    assert torch.equal(fx.gated_add(x, y, gate), layers.gated_add(x, y.view_as(x), gate))
    q, weight = randn(8, 64, dtype=torch.bfloat16), randn(64)
    cos, sin = rope_tables(8, 32)
    norm = RMSNorm(64, 1e-6)
    norm.weight.data, norm.kernels = weight, fx
    assert torch.equal(norm.forward_rope(q, cos, sin, 2), rope.apply_rope(norm(q).unflatten(-1, (2, 32)), cos, sin))
    assert torch.equal(fx.gelu(q, fp8=True), F.gelu(q, approximate="tanh"))  # no fp8 rows off the kernels
    total, normed = fx.add_norm(x, y, gate, shift, scale, 1e-6, torch.bfloat16, fp8=True)
    assert torch.equal(total, layers.gated_add(x, y.view_as(x), gate))
    assert torch.equal(normed, layers.modulated_norm(total, shift, scale, 1e-6, torch.bfloat16))


def test_fp8_linear_multiplies_fp8_rows_from_the_norm(fx):
    """Modulated norm quantised in the same pass, then the fp8 linear's per-row scaled product:
    close to the bf16-free fp32 computation (fp8 rounding of activations and weights only)."""
    from liveavatar.loading import quantize_fp8

    linear = Linear(96, 48).to(DEVICE)
    linear.kernels = fx
    weight, bias = randn(48, 96, seed=3) * 0.1, randn(48, seed=4)
    linear.weight.data, linear.scale_weight = quantize_fp8(weight)
    linear.bias.data = bias
    assert linear.takes_fp8_rows
    x, shift, scale = randn(3, 20, 96), randn(3, 1, 96, seed=1), randn(3, 1, 96, seed=2)
    rows = fx.modulated_norm(x, shift, scale, 1e-6, torch.bfloat16, fp8=True).flatten(0, 1)
    got = linear(rows)
    want = F.linear(layers.modulated_norm(x, shift, scale, 1e-6, torch.float32).flatten(0, 1), weight, bias)
    assert got.shape == (60, 48) and got.dtype == torch.bfloat16
    assert ((got.float() - want).norm() / want.norm()) < 0.05
