"""GPU check and microbenchmark of the fused kernels (liveavatar/kernels.py) at the real
Wan2.2-S2V-14B shapes: each kernel against its PyTorch reference (errors printed, exit status
1 on any mismatch), then kernel vs reference time (CUDA events, warm-up, median).

    python bench/kernels_check.py [--reps 20] [--sizes 384*256,704*384] [--batches 1,4]

Needs only torch + triton and a CUDA GPU; loads kernels.py and rope.py on their own (not the
pack), so it depends on nothing in dit.py. Tokens per block-step = 3 latent frames x
(H/16)*(W/16): 384*256 -> 3 x 384, 704*384 -> 3 x 1056; batch b stacks b block-steps.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "liveavatar"))
import kernels  # noqa: E402  (liveavatar/kernels.py, standalone)
import rope  # noqa: E402

DIM, HEADS, HEAD_DIM, FFN, EPS = 5120, 40, 128, 13824, 1e-6
FRAMES = 3
BF16_STEP = 2.0 ** -7
FP8_HALF_STEP = 2.0 ** -4


def token_grid(size: str) -> tuple[int, int]:
    """(rows, columns) of one latent frame's tokens: the VAE divides by 8, the patchify by 2."""
    width, height = (int(v) for v in size.split("*"))
    return height // 16, width // 16


class Report:
    def __init__(self):
        self.failures = []
        self.rows = []

    def check(self, name, ok, detail):
        print(f"  {'ok  ' if ok else 'FAIL'} {name:34s} {detail}")
        if not ok:
            self.failures.append(name)


def bf16_errors(got, want):
    """(max |diff|, max diff in bf16 steps of |want|, share exactly equal)."""
    diff = (got.float() - want.float()).abs()
    steps = diff / (want.float().abs() * BF16_STEP).clamp_min(1e-30)
    return diff.max().item(), steps.max().item(), (got == want).float().mean().item()


def check_bf16(report, name, got, want, rotated: bool = False):
    """Within one bf16 step of the reference (and >= 99% identical). rotated (RoPE output): one
    bf16 step of the pair's length instead, since a one-step difference in an intermediate
    bf16 value (the normed input, rounded like the reference) is rotated into both channels."""
    max_abs, max_steps, equal = bf16_errors(got, want)
    magnitude = want.float().abs()
    if rotated:
        pair_length = want.float().unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True)
        magnitude = pair_length.expand(*pair_length.shape[:-1], 2).flatten(-2)
    floor = 1e-6 * want.float().pow(2).mean().sqrt()
    within = ((got.float() - want.float()).abs() <= magnitude * BF16_STEP * 1.0001 + floor).all().item()
    ok = within and equal >= 0.99 and torch.isfinite(got).all().item()
    report.check(name, ok, f"max abs {max_abs:.3e}, max {max_steps:.2f} bf16 steps, {100 * equal:.3f}% identical")


def check_rotated(report, name, got, want):
    check_bf16(report, name, got, want, rotated=True)


def add_norm_reference(x, y, gate, shift, scale):
    total = kernels.gated_add_reference(x, y, gate)
    return total, kernels.modulated_norm_reference(total, shift, scale, EPS, torch.bfloat16)


def check_add_norm(report, name, got, want):
    check_fp32(report, name + " (sum)", got[0], want[0])
    check_bf16(report, name + " (norm)", got[1], want[1])


def check_fp32(report, name, got, want, rtol=1e-5):
    """fp32 to rtol, relative to each value or (where a sum cancels) to the tensor's RMS."""
    scale = torch.maximum(want.abs(), want.pow(2).mean().sqrt().expand_as(want))
    rel = ((got - want).abs() / scale).max().item()
    report.check(name, rel <= rtol, f"max error {rel:.2e} of max(|value|, RMS) (tol {rtol:.0e})")


def check_fp8(report, name, rows: kernels.Fp8Rows, want_fp32):
    if not isinstance(rows, kernels.Fp8Rows):
        print(f"  skip {name:34s} no fp8 rows: torch._scaled_mm takes no row-wise scales here")
        return
    want = want_fp32.reshape(-1, want_fp32.shape[-1]).float()
    count = want.shape[0]
    scales = rows.scales[:count]
    scale_rel = ((scales - want.abs().amax(1, keepdim=True) / 448.0).abs() / scales).max().item()
    got = rows.data[:count].float() * scales
    # half an fp8 step, plus one bf16 step where the input went through a bf16 rounding that
    # may differ by a step (the GELU), plus the subnormal spacing
    bound = want.abs() * (FP8_HALF_STEP + BF16_STEP) + scales * 2.0 ** -9 * 1.01
    within = ((got - want).abs() <= bound).float().mean().item()
    same = (rows.data[:count].view(torch.uint8) == kernels.quantize_rows_reference(want).data[:count].view(torch.uint8))
    same = same.float().mean().item()
    ok = scale_rel <= 1e-5 and within == 1.0 and same >= 0.99
    report.check(name, ok, f"scales rel {scale_rel:.1e}, {100 * within:.3f}% within fp8 rounding, "
                           f"{100 * same:.3f}% bytes = reference")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn, reps: int) -> float:
    """Median of reps timed calls after 3 warm-up calls (CUDA events; wall clock on CPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - begin))
    return statistics.median(times)


def first_call_s(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def rope_tables(frames: int, grid, device):
    """Real RoPE tables of a block: frames x (h/2 x w/2) token grid from latent frame 5 on."""
    positions = rope.grid_positions(range(5, 5 + frames), range(grid[0]), range(grid[1]))
    return rope.rope_tables(positions.to(device), HEAD_DIM)


def per_tensor_fp8_linear(x, weight_fp8, weight_scale, bias):
    """Today's layers.fp8_linear: amax, divide, cast passes then _scaled_mm (per-tensor scales)."""
    scale = x.abs().amax().float().clamp_min(1e-12) / 448.0
    quantised = (x.float() / scale).to(torch.float8_e4m3fn)
    return torch._scaled_mm(quantised, weight_fp8.t(), scale_a=scale, scale_b=weight_scale, bias=bias,
                            out_dtype=torch.bfloat16)


def run_shape(fx, report, label, groups, grid, reps, device):
    n = grid[0] * grid[1]
    rows = groups * n
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = rand(groups, n, DIM, scale=4.0) + rand(1, 1, DIM)  # residual stream: offset per channel
    shift, scale, gate = rand(groups, 1, DIM, scale=0.5), rand(groups, 1, DIM, scale=0.5), rand(groups, 1, DIM, scale=0.5)
    proj = rand(rows, DIM, dtype=torch.bfloat16, scale=2.0)
    norm_weight = 1.0 + rand(DIM, scale=0.2)
    cos, sin = rope_tables(groups, grid, device)
    y = rand(groups, n, DIM, dtype=torch.bfloat16)
    hidden = rand(rows, FFN, dtype=torch.bfloat16, scale=2.0)
    ring = torch.zeros(rows + 4 * n, HEADS, HEAD_DIM, dtype=torch.bfloat16, device=device)

    cases = [  # name, kernel, reference, check
        ("modulated_norm -> bf16", lambda: fx.modulated_norm(x, shift, scale, EPS, torch.bfloat16),
         lambda: kernels.modulated_norm_reference(x, shift, scale, EPS, torch.bfloat16), check_bf16),
        ("modulated_norm -> fp8 rows", lambda: fx.modulated_norm(x, shift, scale, EPS, torch.bfloat16, fp8=True),
         lambda: kernels.modulated_norm_reference(x, shift, scale, EPS, torch.bfloat16, fp8=True), None),
        ("rms_norm + rope (q/k)", lambda: fx.rms_norm_rope(proj, norm_weight, EPS, cos, sin, HEADS),
         lambda: kernels.rms_norm_rope_reference(proj, norm_weight, EPS, cos, sin, HEADS), check_rotated),
        ("rms_norm + rope -> ring slice", lambda: fx.rms_norm_rope(proj, norm_weight, EPS, cos, sin, HEADS, out=ring[n:n + rows]),
         lambda: ring[n:n + rows].copy_(kernels.rms_norm_rope_reference(proj, norm_weight, EPS, cos, sin, HEADS)), None),
        ("rope (reference keys)", lambda: fx.rope(proj.view(rows, HEADS, HEAD_DIM), cos, sin),
         lambda: kernels.rope_reference(proj.view(rows, HEADS, HEAD_DIM), cos, sin), check_rotated),
        ("gated_add", lambda: fx.gated_add(x, y, gate), lambda: kernels.gated_add_reference(x, y, gate), check_fp32),
        ("add_norm: gated add + mod. norm", lambda: fx.add_norm(x, y, gate, shift, scale, EPS, torch.bfloat16),
         lambda: add_norm_reference(x, y, gate, shift, scale), check_add_norm),
        ("gelu -> fp8 rows (FFN)", lambda: fx.gelu(hidden, fp8=True),
         lambda: kernels.quantize_rows_reference(F.gelu(hidden, approximate="tanh")), None),
        ("quantize_rows (bf16 -> fp8)", lambda: fx.quantize_rows(proj), lambda: kernels.quantize_rows_reference(proj), None),
    ]
    print(f"\n{label}: {groups} frames x {n} tokens = {rows} rows")
    for name, kernel, reference, check in cases:
        compile_s = first_call_s(kernel)
        got, want = kernel(), reference()
        if check is not None:
            check(report, name, got, want)
        report.rows.append((label, name, time_ms(reference, reps), time_ms(kernel, reps), compile_s))
    ring.zero_()
    fx.rms_norm_rope(proj, norm_weight, EPS, cos, sin, HEADS, out=ring[n:n + rows])
    check_rotated(report, "rms_norm + rope -> ring slice", ring[n:n + rows],
                  kernels.rms_norm_rope_reference(proj, norm_weight, EPS, cos, sin, HEADS))
    report.check("ring outside the slice untouched", bool((ring[:n] == 0).all() and (ring[n + rows:] == 0).all()), "")
    fp8_cache_case(fx, report, label, proj, norm_weight, cos, sin, rows, reps, device)
    check_fp8(report, "modulated_norm -> fp8 rows", fx.modulated_norm(x, shift, scale, EPS, torch.bfloat16, fp8=True),
              kernels.modulated_norm_reference(x, shift, scale, EPS, torch.float32))
    check_fp8(report, "gelu -> fp8 rows", fx.gelu(hidden, fp8=True), F.gelu(hidden, approximate="tanh").float())
    check_fp8(report, "quantize_rows", fx.quantize_rows(proj), proj.float())
    if device.type == "cuda":
        fp8_linear_case(fx, report, label, rows, rand, reps)
    layer_chain_case(fx, report, label, groups, grid, rand, reps, device)


def per_tensor_fp8(t):
    """Today's activation quantisation for an fp8 linear: amax, divide, cast (three passes)."""
    scale = t.abs().amax().float().clamp_min(1e-12) / 448.0
    return (t.float() / scale).to(torch.float8_e4m3fn), scale


def layer_chain_case(fx, report, label, groups, grid, rand, reps, device):
    """All element-wise work of one DiT layer's self-attention, cross-attention and FFN around
    the matrix products (random stand-ins for their outputs), today's ops vs the fused kernels,
    reported x40 layers = per block-step. Also today's chain on a transposed residual stream
    (what dit._patchify hands on today: column-major x) and the fp8 quantisation work."""
    n = grid[0] * grid[1]
    rows, bf16 = groups * n, torch.bfloat16
    x = rand(groups, n, DIM, scale=4.0)
    x_transposed = x.reshape(rows, DIM).t().contiguous().t().view(groups, n, DIM)
    mods = [rand(groups, 1, DIM, scale=0.5) for _ in range(5)]  # shift1, scale1, gate1, shift2/scale2, gate2
    w3, b3 = 1.0 + rand(DIM, scale=0.1), rand(DIM, scale=0.1)
    wq, wk = 1.0 + rand(DIM, scale=0.1), 1.0 + rand(DIM, scale=0.1)
    qp, kp, vp, o_out, cross_out, ffn_out = (rand(rows, DIM, dtype=bf16) for _ in range(6))
    hidden = rand(rows, FFN, dtype=bf16)
    cos, sin = rope_tables(groups, grid, device)
    ref_keys, ref_cos, ref_sin = rand(n, HEADS, HEAD_DIM, dtype=bf16), cos[:n], sin[:n]
    ring_k, ring_v = (torch.zeros(2 * n + rows, HEADS, HEAD_DIM, dtype=bf16, device=device) for _ in range(2))
    slot = slice(2 * n, 2 * n + rows)
    s1, sc1, g1, s2, g2 = mods

    def rms_then_rope(p, w, c, s):
        normed = F.rms_norm(p.float(), (DIM,), eps=EPS).to(bf16) * w.to(bf16)
        return kernels.rope_reference(normed.unflatten(-1, (HEADS, HEAD_DIM)), c, s)

    def today(x, fp8=False):
        h = kernels.modulated_norm_reference(x, s1, sc1, EPS, bf16).flatten(0, 1)
        ring_k[slot].copy_(rms_then_rope(kp, wk, cos, sin))
        q = rms_then_rope(qp, wq, cos, sin)
        ring_k[:n].copy_(kernels.rope_reference(ref_keys, ref_cos, ref_sin))
        ring_v[slot].copy_(vp.view(rows, HEADS, HEAD_DIM))
        x = x + o_out.view_as(x).float() * g1
        n3 = F.layer_norm(x.float(), (DIM,), w3, b3, EPS).to(bf16)
        x = x + cross_out.view_as(x).float()
        h2 = kernels.modulated_norm_reference(x, s2, sc1, EPS, bf16)
        act = F.gelu(hidden, approximate="tanh")
        if fp8:  # q, k, v each quantise h; o, cross q, cross o, ffn in/out theirs
            for t in (h, h, h, o_out, n3, cross_out, h2, act):
                per_tensor_fp8(t)
        return x + ffn_out.view_as(x).float() * g2, q

    def fused(x, fp8=False):
        h = fx.modulated_norm(x, s1, sc1, EPS, bf16, fp8=fp8)
        fx.rms_norm_rope(kp, wk, EPS, cos, sin, HEADS, out=ring_k[slot])
        q = fx.rms_norm_rope(qp, wq, EPS, cos, sin, HEADS)
        fx.rope(ref_keys, ref_cos, ref_sin, out=ring_k[:n])
        ring_v[slot].copy_(vp.view(rows, HEADS, HEAD_DIM))
        x, n3 = fx.add_norm(x, o_out, g1, b3, w3, EPS, bf16, fp8=fp8, affine=True)
        x, h2 = fx.add_norm(x, cross_out, None, s2, sc1, EPS, bf16, fp8=fp8)
        act = fx.gelu(hidden, fp8=True) if fp8 else F.gelu(hidden, approximate="tanh")
        if fp8:  # the o and cross-attention o inputs come from attention: quantised in one pass each
            fx.quantize_rows(o_out), fx.quantize_rows(cross_out)
        return fx.gated_add(x, ffn_out, g2), q

    got, want = fused(x), today(x)
    check_fp32(report, "layer chain: residual out", got[0], want[0])
    check_rotated(report, "layer chain: roped q", got[1], want[1])
    for name, reference, kernel in (
            ("layer chain x40 (bf16)", lambda: today(x), lambda: fused(x)),
            ("layer chain x40, transposed x today", lambda: today(x_transposed), lambda: fused(x)),
            ("layer chain x40 (+fp8 quantisation)", lambda: today(x, fp8=True), lambda: fused(x, fp8=True))):
        compile_s = first_call_s(kernel)
        report.rows.append((label, name, 40 * time_ms(reference, reps), 40 * time_ms(kernel, reps), compile_s))


def fp8_cache_write(tokens, out, scales):
    """StepCache._write today for an fp8 cache: per-token amax / 448, divide, cast, copy."""
    scale = tokens.float().abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-12) / 448.0
    out.copy_((tokens.float() / scale).to(out.dtype))
    scales.copy_(scale)


def fp8_cache_case(fx, report, label, proj, norm_weight, cos, sin, rows, reps, device):
    """Keys (norm + RoPE) and values written into an fp8 KV ring with per-token scales in one
    pass each, against today's RoPE + quantise-and-copy."""
    ring = torch.zeros(rows, HEADS, HEAD_DIM, dtype=torch.float8_e4m3fn, device=device)
    scales = torch.ones(rows, 1, 1, device=device)
    want_ring, want_scales = ring.clone(), scales.clone()
    values = proj.view(rows, HEADS, HEAD_DIM)

    def fused_keys():
        fx.rms_norm_rope(proj, norm_weight, EPS, cos, sin, HEADS, out=ring, out_scales=scales)

    def today_keys():
        fp8_cache_write(kernels.rms_norm_rope_reference(proj, norm_weight, EPS, cos, sin, HEADS), want_ring, want_scales)

    # keys: a token's largest roped value may round one bf16 step apart (fp32 sums in another
    # order before the bf16 rounding of the normed input), so its scale may differ by 2^-7
    for name, fused, today, scale_tol in (
            ("q/k norm + rope -> fp8 ring", fused_keys, today_keys, BF16_STEP),
            ("values -> fp8 ring", lambda: fx.quantize_rows(values, ring, scales),
             lambda: fp8_cache_write(values, want_ring, want_scales), 1e-6)):
        compile_s = first_call_s(fused)
        today()
        scale_rel = ((scales - want_scales).abs() / want_scales).max().item()
        same = (ring.view(torch.uint8) == want_ring.view(torch.uint8)).float().mean().item()
        report.check(name, scale_rel <= scale_tol * 1.001 and same >= 0.99,
                     f"token scales rel {scale_rel:.1e}, {100 * same:.3f}% bytes = reference")
        report.rows.append((label, name, time_ms(today, reps), time_ms(fused, reps), compile_s))


def fp8_linear_case(fx, report, label, rows, rand, reps):
    """One 5120x5120 fp8 projection: today's per-tensor quantisation passes + _scaled_mm vs the
    fused per-row quantisation + row-wise _scaled_mm, and both against bf16."""
    x = rand(rows, DIM, dtype=torch.bfloat16, scale=2.0)
    weight = rand(DIM, DIM, scale=0.02)
    w_scale = weight.abs().amax() / 448.0
    w_fp8 = (weight / w_scale).to(torch.float8_e4m3fn)
    bias = rand(DIM, dtype=torch.bfloat16, scale=0.1)
    exact = F.linear(x.float(), w_fp8.float() * w_scale, bias.float())
    row_scale = kernels.rowwise_weight_scale(w_scale, DIM)
    if not fx.fp8_rows_supported(x.device):
        report.check("fp8 per-row matmul", False, "torch._scaled_mm rejects row-wise scales on this GPU/torch")
        return
    fused = lambda: fx.fp8_linear_rows(fx.quantize_rows(x), w_fp8, row_scale, bias)  # noqa: E731
    today = lambda: per_tensor_fp8_linear(x, w_fp8, w_scale.float(), bias)  # noqa: E731
    for name, fn in (("fp8 linear, per-row (fused)", fused), ("fp8 linear, per-tensor (today)", today)):
        rel = ((fn().float() - exact).norm() / exact.norm()).item()
        report.check(name, rel < 0.05, f"rel L2 vs fp32 product {rel:.2e} (bias {'on' if fx.probes.get(('row-wise bias', x.device)) else 'added after'})")
    w_bf16 = (w_fp8.float() * w_scale).to(torch.bfloat16)
    bf16 = lambda: F.linear(x, w_bf16, bias)  # noqa: E731
    report.rows.append((label, "fp8 linear 5120^2: today -> fused", time_ms(today, reps), time_ms(fused, reps), 0.0))
    report.rows.append((label, "bf16 linear 5120^2 -> fp8 fused", time_ms(bf16, reps), time_ms(fused, reps), 0.0))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="384*256,704*384")
    parser.add_argument("--batches", default="1,4", help="block-steps stacked in one call")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--tiny", action="store_true",
                        help="smoke test of this script on CPU under TRITON_INTERPRET=1: tiny model dims, "
                             "checks not meaningful (the interpreter rounds approximately)")
    args = parser.parse_args()
    if args.tiny:
        global DIM, HEADS, FFN
        DIM, HEADS, FFN = 256, 2, 512
        args.sizes, args.batches, args.reps = "64*32", "1", 2
    elif not torch.cuda.is_available():
        print("kernels_check: needs a CUDA GPU")
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fx = kernels.Kernels("on")
    start = time.perf_counter()
    active = fx.active_for(torch.zeros(1, device=device))
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU (interpreter)'}; {fx.status()}; "
          f"load + self-check {time.perf_counter() - start:.1f} s")
    if not active:
        return 1
    report = Report()
    for size in args.sizes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            with torch.no_grad():
                run_shape(fx, report, f"{size} x{batch}", batch * FRAMES, token_grid(size), args.reps, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\n| shape | kernel | reference ms | fused ms | speedup | first call s (compile) |\n|---|---|---|---|---|---|")
    for label, name, ref_ms, kernel_ms, compile_s in report.rows:
        print(f"| {label} | {name} | {ref_ms:.3f} | {kernel_ms:.3f} | {ref_ms / kernel_ms:.2f}x | {compile_s:.2f} |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; "
          + (f"FAILED: {sorted(set(report.failures))}" if report.failures else "all checks passed"))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
