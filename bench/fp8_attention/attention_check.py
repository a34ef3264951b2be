"""GPU check and benchmark of the fp8 self-attention (liveavatar/attention_fp8.py) at the real
Wan2.2-S2V-14B shapes, against torch SDPA in bf16 and (when importable) two registry fp8/int8
attentions: the cuDNN frontend's fp8 SDPA and comfy-kitchen's int8 attention.

    python bench/attention_check.py --out $OUT/attn.json [--sizes 704*384,384*256] [--batches 4,1]

Shapes (per layer and tick): q [B, n, 40, 128] with n = 3 latent frames x (H/16)(W/16) tokens
(3168 at 704*384, 1152 at 384*256); keys = a sink shared by the B block-steps (2640 / 960) and a
ring per block-step (12672 / 4608). The cache is fp8 e4m3 with one scale per token (the
engine's fp8 KV cache), made from random bf16 keys/values; q ~ N(0, q_std^2) (q_std 2: logits
of standard deviation 2, softer than a trained model's peaks, sharper than N(0, 1)).

Rows (median of triton.testing.do_bench, L2 flushed between calls; TFLOP/s = 4 n keys H D B):
- sdpa_cudnn_bf16 / sdpa_flash_bf16: torch SDPA on the dequantised cache joined per block-step
  ([B, keys, H, D] bf16, the engine's layout): the reference for the errors.
- engine_today_fp8cache: what the engine runs now with an fp8 cache: dequantise to bf16, SDPA.
- triton_fp8: fp8 QK^T and P.V, sink and ring as two segments, V pre-transposed (keys
  contiguous; prep_* rows time that pre-pass: the sink once per clip, the ring per call unless
  the cache stores V transposed); each key tile's P.V added to the accumulator in fp32.
- triton_fp8_fastacc: the same, P.V accumulated inside the tensor cores across tiles (fp8 MMA
  accumulation keeps ~14 bits: compare its error to triton_fp8's).
- triton_fp8_vstored: the same with V as stored (Triton transposes each tile through
  registers into shared memory; no pre-pass).
- triton_bf16pv: fp8 QK^T, bf16 P.V, V read as stored (no pre-pass).
- cudnn_fp8: cuDNN frontend graph.sdpa_fp8 on per-tensor-quantised q/k/v (power-of-two scales
  from the amax), P scale 256, output scale from the reference's amax (calibrated "delayed
  scaling"; Hopper writes fp8 O, dequantised after); time = graph.execute only.
- kitchen_int8: comfy_kitchen.sage_attention.int8_attention (its own int8 quantisation inside
  the call); kitchen_int8_kernel: the same on prequantised inputs.

Errors: rel L2 and max |diff| against sdpa_cudnn_bf16 (full tensor), and rel L2 against an fp32
reference on 4 of the 40 heads (the bf16 SDPA's own error shows there too). Triton rows with a
rel L2 > 0.125 (two e4m3 steps) vs the fp32 reference fail the run (exit status 1).

The Triton kernels autotune over 5 launches each (all 20 compiled in parallel processes first); the whole run takes
about 1.5-2.5 minutes on an H200, most of it compilation. --tiny: a CPU smoke test of this
script under TRITON_INTERPRET=1 (tiny dims; the numbers mean nothing).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attention_fp8 as A  # noqa: E402  (beside this script)

HEADS, HEAD_DIM, FRAMES = 40, 128, 3
FP8 = torch.float8_e4m3fn
REF_HEADS = (0, 13, 26, 39)  # heads of the fp32 reference
FAIL_REL = 0.125  # two e4m3 steps: a layout or scaling bug gives ~1


def shape_of(size: str):
    """(queries per block-step, sink, ring) for a W*H video: 3 latent frames of (H/16)(W/16)
    tokens; the sink holds 2.5 frames' worth (reference + motion), the ring 12 frames."""
    width, height = (int(v) for v in size.split("*"))
    frame = (height // 16) * (width // 16)
    return FRAMES * frame, frame * 5 // 2, 12 * frame


def now(t0):
    return f"[{time.perf_counter() - t0:6.1f} s]"


# ---- timing ----------------------------------------------------------------------------------
def median_ms(fn, cuda: bool) -> float:
    if cuda:
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


# ---- inputs ------------------------------------------------------------------------------------
class Case:
    """One shape: q, the fp8 cache (sink shared, rings per block-step), bf16 views for SDPA."""

    def __init__(self, size, batch, q_std, device, dims=None):
        self.size, self.batch = size, batch
        self.n, self.sink, self.ring = dims or shape_of(size)
        self.keys = self.sink + self.ring
        gen = torch.Generator(device=device).manual_seed(1234 + batch)
        rand = lambda *s: torch.randn(*s, device=device, generator=gen, dtype=torch.float32)  # noqa: E731
        self.q = (rand(batch, self.n, HEADS, HEAD_DIM) * q_std).to(torch.bfloat16)
        bf16 = lambda *s: rand(*s).to(torch.bfloat16)  # noqa: E731
        # The fp8 cache: per-token scales, as the engine's writer makes them (prepare_segment
        # quantises bf16 keys/values exactly that way); V as stored ([.., tokens, H, D]).
        self.sink_seg = A.prepare_segment(A.KVSegment(bf16(self.sink, HEADS, HEAD_DIM), bf16(self.sink, HEADS, HEAD_DIM)), v_kmajor=False)
        self.ring_seg = A.prepare_segment(A.KVSegment(bf16(batch, self.ring, HEADS, HEAD_DIM), bf16(batch, self.ring, HEADS, HEAD_DIM)), v_kmajor=False)
        # The same cache as one buffer per block-step [B, keys, H, D] (today's StepCaches).
        self.k8 = self._join_fp8(self.sink_seg.k, self.ring_seg.k)
        self.v8 = self._join_fp8(self.sink_seg.v, self.ring_seg.v)
        self.k_scale = torch.cat([self.sink_seg.k_scale.expand(batch, -1), self.ring_seg.k_scale], 1).contiguous()
        self.v_scale = torch.cat([self.sink_seg.v_scale.expand(batch, -1), self.ring_seg.v_scale], 1).contiguous()
        self.k, self.v = self.dequantise()
        self.flops = 4.0 * batch * self.n * self.keys * HEADS * HEAD_DIM

    def _join_fp8(self, sink, ring):
        joined = torch.cat([sink.view(torch.uint8).expand(self.batch, -1, -1, -1), ring.view(torch.uint8)], 1)
        return joined.view(FP8)

    def dequantise(self):
        """What the engine does today before SDPA: fp8 * per-token scale, in bf16."""
        return (self.k8.to(torch.bfloat16) * self.k_scale[..., None, None].to(torch.bfloat16),
                self.v8.to(torch.bfloat16) * self.v_scale[..., None, None].to(torch.bfloat16))

    def reference_fp32(self):
        """Exact attention in fp32 for REF_HEADS: [B, n, len(REF_HEADS), D]."""
        heads = [h for h in REF_HEADS if h < HEADS]
        out = torch.empty(self.batch, self.n, len(heads), HEAD_DIM, device=self.q.device)
        for b in range(self.batch):
            for j, h in enumerate(heads):
                scores = (self.q[b, :, h].float() @ self.k[b, :, h].float().T) / math.sqrt(HEAD_DIM)
                out[b, :, j] = scores.softmax(-1) @ self.v[b, :, h].float()
        return out


def sdpa(q, k, v, backend=None):
    """torch SDPA on [B, tokens, H, D] views (as layers.attend runs it)."""
    from torch.nn.attention import sdpa_kernel
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if backend is None:
        return F.scaled_dot_product_attention(*args).transpose(1, 2)
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(*args).transpose(1, 2)


# ---- registry alternatives ----------------------------------------------------------------------
def _pow2_quantise(x):
    """Per-tensor fp8 with a power-of-two scale (cuDNN's recommendation): (x8, descale)."""
    amax = x.abs().amax().float().clamp_min(1e-8)
    multiplier = torch.exp2(torch.floor(torch.log2(448.0 / amax)))
    return (x.float() * multiplier).to(FP8).contiguous(), multiplier.reciprocal().reshape(1, 1, 1, 1)


CUDNN_FORMS = ((False, False), (True, False), (True, True))  # (fp8 output, padded to 128)


def cudnn_fp8_runner(case, out_amax: float, forms=CUDNN_FORMS):
    """Builds a cuDNN frontend sdpa_fp8 graph for the case; returns (run, dequantised output
    fn, info). Tries bf16 output, then fp8 output (Hopper), then token counts padded to 128
    with a padding mask, in case the engine rejects the exact sequence lengths."""
    torch.backends.cudnn.version()  # loads libcudnn into the process: the frontend dlopens it by name
    import cudnn

    device = case.q.device
    q8, dq = _pow2_quantise(case.q)
    k8, dk = _pow2_quantise(case.k)
    v8, dv = _pow2_quantise(case.v)
    s_scale = torch.full((1, 1, 1, 1), 256.0, device=device)  # P <= 1 -> <= 256 in e4m3
    s_descale = s_scale.reciprocal()
    o_scale = torch.exp2(torch.floor(torch.log2(torch.tensor(448.0 / max(out_amax, 1e-8))))).reshape(1, 1, 1, 1).to(device)
    errors = []
    for out_fp8, pad in forms:
        handle = cudnn.create_handle()
        try:
            cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
            B, n, H, D = case.q.shape
            N = case.keys
            nq_p, nk_p = (n + (-n % 128), N + (-N % 128)) if pad else (n, N)
            qq, kk, vv = q8, k8, v8
            if pad:
                qq = torch.zeros(B, nq_p, H, D, dtype=torch.uint8, device=device)
                qq[:, :n] = q8.view(torch.uint8)
                kk = torch.zeros(B, nk_p, H, D, dtype=torch.uint8, device=device)
                kk[:, :N] = k8.view(torch.uint8)
                vv = torch.zeros_like(kk)
                vv[:, :N] = v8.view(torch.uint8)
                qq, kk, vv = qq.view(FP8), kk.view(FP8), vv.view(FP8)
            e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
            graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
            layout = lambda s: dict(dim=[B, H, s, D], stride=[s * H * D, D, H * D, 1])  # noqa: E731  BSHD storage
            tq = graph.tensor(name="q", data_type=e4m3, **layout(nq_p))
            tk = graph.tensor(name="k", data_type=e4m3, **layout(nk_p))
            tv = graph.tensor(name="v", data_type=e4m3, **layout(nk_p))
            scalar = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
            t_dq, t_dk, t_dv, t_ds, t_ss, t_so = (graph.tensor(name=x, **scalar) for x in ("dq", "dk", "dv", "ds", "ss", "so"))
            extra = {}
            if pad:
                t_lq = graph.tensor(name="seq_q", dim=[B, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.INT32)
                t_lk = graph.tensor(name="seq_kv", dim=[B, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.INT32)
                extra = dict(use_padding_mask=True, seq_len_q=t_lq, seq_len_kv=t_lk)
            o, _, amax_s, amax_o = graph.sdpa_fp8(
                q=tq, k=tk, v=tv, descale_q=t_dq, descale_k=t_dk, descale_v=t_dv, descale_s=t_ds,
                scale_s=t_ss, scale_o=t_so, attn_scale=1.0 / math.sqrt(D), use_causal_mask=False,
                generate_stats=False, name="sdpa_fp8", **extra)
            o.set_output(True).set_dim([B, H, nq_p, D]).set_stride([nq_p * H * D, D, H * D, 1]).set_data_type(
                e4m3 if out_fp8 else cudnn.data_type.BFLOAT16)
            for amax in (amax_s, amax_o):
                amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
            graph.validate()
            graph.build_operation_graph()
            graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            graph.check_support()
            graph.build_plans()
            workspace = torch.empty(max(graph.get_workspace_size(), 1), dtype=torch.uint8, device=device)
            out = torch.empty(B, nq_p, H, D, dtype=FP8 if out_fp8 else torch.bfloat16, device=device)
            one = torch.ones(1, 1, 1, 1, device=device)
            pack = {tq: qq, tk: kk, tv: vv, t_dq: dq, t_dk: dk, t_dv: dv, t_ds: s_descale, t_ss: s_scale,
                    t_so: o_scale if out_fp8 else one, o: out, amax_s: torch.empty_like(one), amax_o: torch.empty_like(one)}
            if pad:
                pack[t_lq] = torch.full((B, 1, 1, 1), n, dtype=torch.int32, device=device)
                pack[t_lk] = torch.full((B, 1, 1, 1), N, dtype=torch.int32, device=device)

            def run(graph=graph, pack=pack, workspace=workspace, handle=handle):
                graph.execute(pack, workspace, handle=handle)

            def result(out=out, out_fp8=out_fp8):
                o_ = out[:, :n].float()
                return (o_ / o_scale.reshape(1, 1, 1, 1) if out_fp8 else o_).to(torch.bfloat16)

            run()
            torch.cuda.synchronize()
            info = dict(cudnn_frontend=getattr(cudnn, "__version__", "?"), cudnn_backend=str(cudnn.backend_version()),
                        output="fp8 (scale from reference amax)" if out_fp8 else "bf16", padded_to_128=pad,
                        form=(out_fp8, pad), earlier_attempts=errors)
            return run, result, info
        except Exception as error:  # unsupported on this engine/shape: try the next form
            errors.append(f"out_fp8={out_fp8} pad={pad}: {type(error).__name__}: {str(error)[:300]}")
    raise RuntimeError("cuDNN fp8 SDPA: no graph form supported: " + " | ".join(errors))


def kitchen_runners(case):
    from comfy_kitchen import sage_attention as sage
    if not sage.is_available(case.q.device):
        raise RuntimeError("comfy_kitchen int8 attention unavailable on this GPU/build")
    q, k, v = (t.transpose(1, 2) for t in (case.q, case.k, case.v))
    full = lambda: sage.int8_attention(q, k, v).transpose(1, 2)  # noqa: E731
    packed = sage.prequantize_int8_attention(q, k, v)
    kernel_only = lambda: sage.int8_attention_from_prequantized(packed).transpose(1, 2)  # noqa: E731
    return full, kernel_only


# ---- Triton ------------------------------------------------------------------------------------
TRITON_VARIANTS = (  # method, pv, which prepared segments
    ("triton_fp8", "fp8", "kmajor"),
    ("triton_fp8_fastacc", "fp8_fastacc", "kmajor"),
    ("triton_fp8_vstored", "fp8", "stored"),
    ("triton_bf16pv", "bf16", "stored"),
)


def _compile_one(task):
    """In a spawned process: compile one launch of attention_fp8_kernel into Triton's on-disk
    cache (warmup with dtypes for tensors: nothing runs). The parent's autotuner then finds
    the binary by the same cache key instead of compiling it again."""
    lib_dir, args, grid, kwargs = task
    start = time.perf_counter()
    try:
        sys.path.insert(0, lib_dir)
        import attention_fp8_triton as kernels
        kernels.attention_fp8_kernel.warmup(*args, grid=grid, **kwargs)
    except Exception as error:  # noqa: BLE001  the parent compiles it then
        return f"{kwargs}: {type(error).__name__}: {str(error)[:300]}"
    return time.perf_counter() - start


def precompile(case, segments_by_layout, workers: int, timeout_s: float = 150.0):
    """Compile every autotune launch of every variant at once, in parallel processes
    (Triton's compile holds the GIL: threads do not help). ~15 launches, ~5-10 s each."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, wait
    backend = A._load_backend()
    lib_dir = str(Path(A.__file__).resolve().parent)
    tasks = []
    for _, pv, layout in TRITON_VARIANTS:
        prepared = A._prepared_list(case.q, segments_by_layout[layout], pv)
        _, args, flags = A.kernel_arguments(case.q, prepared, pv)
        args = [a.dtype if isinstance(a, torch.Tensor) else a for a in args]
        for config in backend.attention_fp8_kernel_tuned.configs:
            kwargs = dict(flags, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
            tasks.append((lib_dir, args, (1, 1, 1), kwargs))
    start = time.perf_counter()
    results = []
    pool = ProcessPoolExecutor(max_workers=max(1, min(workers, len(tasks))), mp_context=multiprocessing.get_context("spawn"))
    try:  # a crashed worker breaks the pool (an exception, not a hang); the autotuner then compiles
        futures = [pool.submit(_compile_one, task) for task in tasks]
        done, _ = wait(futures, timeout=timeout_s)
        results = [f.result() if f in done and f.exception() is None else f"{f.exception() if f in done else 'timed out'}"
                   for f in futures]
    except Exception as error:  # noqa: BLE001
        results = [f"pool failed: {type(error).__name__}: {error}"]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    problems = [r for r in results if isinstance(r, str)]
    for p in problems[:4]:
        print("    precompile failed (the autotuner compiles it instead):", p)
    times = [r for r in results if not isinstance(r, str)]
    return dict(wall_s=time.perf_counter() - start, launches=len(tasks), failed=len(problems),
                max_compile_s=max(times) if times else None)


# ---- the run -----------------------------------------------------------------------------------
def errors_vs(got, ref_bf16, ref_fp32):
    got_f = got.float()
    heads = [h for h in REF_HEADS if h < got.shape[2]]
    rel = ((got_f - ref_bf16.float()).norm() / ref_bf16.float().norm()).item()
    max_abs = (got_f - ref_bf16.float()).abs().max().item()
    sub = got_f[:, :, heads]
    rel32 = ((sub - ref_fp32).norm() / ref_fp32.norm()).item()
    finite = bool(torch.isfinite(got_f).all().item())
    return dict(rel_l2_vs_sdpa_bf16=rel, max_abs_vs_sdpa_bf16=max_abs, rel_l2_vs_fp32=rel32, finite=finite)


def run_case(case, cuda, rows, meta, t0):
    from torch.nn.attention import SDPBackend
    label = f"{case.size} B={case.batch}"
    print(f"{now(t0)} {label}: q {tuple(case.q.shape)}, keys {case.sink} sink + {case.ring} ring = {case.keys}")
    ref_fp32 = case.reference_fp32()

    def record(method, fn, out=None, note="", time_it=True):
        try:
            out = fn() if out is None else out
            if cuda:
                torch.cuda.synchronize()
            ms = median_ms(fn, cuda) if time_it else float("nan")
            row = dict(shape=label, method=method, ms=ms, tflops=case.flops / ms / 1e9 if time_it else float("nan"),
                       note=note, **errors_vs(out, ref_bf16, ref_fp32))
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            row = dict(shape=label, method=method, error=f"{type(error).__name__}: {str(error)[:400]}")
        rows.append(row)
        print(f"{now(t0)}   {format_row(row)}")
        return row

    # references: torch SDPA bf16 on the dequantised, joined cache
    if cuda:
        ref_bf16 = sdpa(case.q, case.k, case.v, SDPBackend.CUDNN_ATTENTION)
        record("sdpa_cudnn_bf16", lambda: sdpa(case.q, case.k, case.v, SDPBackend.CUDNN_ATTENTION), out=ref_bf16)
        record("sdpa_flash_bf16", lambda: sdpa(case.q, case.k, case.v, SDPBackend.FLASH_ATTENTION))
        record("engine_today_fp8cache", lambda: sdpa(case.q, *case.dequantise(), SDPBackend.CUDNN_ATTENTION),
               note="dequantise fp8 cache to bf16 + cuDNN SDPA")
    else:
        ref_bf16 = sdpa(case.q, case.k, case.v)
        record("sdpa_math_bf16", lambda: sdpa(case.q, case.k, case.v), out=ref_bf16)

    # Triton: sink + ring as two segments (V transposed for triton_fp8, as stored otherwise)
    sink_t = A.prepare_segment(A.KVSegment(case.sink_seg.k[0], case.sink_seg.values()[0], case.sink_seg.k_scale, case.sink_seg.v_scale), v_kmajor=True)
    ring_t = A.prepare_segment(A.KVSegment(case.ring_seg.k, case.ring_seg.v, case.ring_seg.k_scale, case.ring_seg.v_scale), v_kmajor=True)
    segments_by_layout = dict(kmajor=[sink_t, ring_t], stored=[case.sink_seg, case.ring_seg])
    if cuda and "precompile" not in meta:
        meta["precompile"] = precompile(case, segments_by_layout, workers=meta["workers"])
        print(f"{now(t0)}   precompiled: {meta['precompile']}")
    for method, pv, layout in TRITON_VARIANTS:
        segments = segments_by_layout[layout]
        start = time.perf_counter()
        try:
            A.attention_fp8(case.q, segments, pv=pv)  # autotunes on the first call of a shape
            if cuda:
                torch.cuda.synchronize()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        tune_s = time.perf_counter() - start
        config = A.tuned_config() if cuda else None
        meta.setdefault("tuned", {})[f"{label} {method}"] = dict(config=config, autotune_s=tune_s)
        record(method, lambda pv=pv, segments=segments: A.attention_fp8(case.q, segments, pv=pv),
               note=f"{'V transposed' if layout == 'kmajor' else 'V as stored'}; {config}; tune {tune_s:.1f} s")

    # pre-passes the fp8 P.V needs (V transposed), and the bf16-cache quantisation
    ring_stored = A.KVSegment(case.ring_seg.k, case.ring_seg.v, case.ring_seg.k_scale, case.ring_seg.v_scale)
    prep = {
        "prep_ring_vT": lambda: A.prepare_segment(ring_stored, v_kmajor=True),
        "prep_sink_vT (once per clip)": lambda: A.prepare_segment(
            A.KVSegment(case.sink_seg.k[0], case.sink_seg.v[0], case.sink_seg.k_scale, case.sink_seg.v_scale), v_kmajor=True),
        "prep_bf16_kv_quantise (bf16 cache)": lambda: [A.prepare_segment(A.KVSegment(case.k[:, :case.sink], case.v[:, :case.sink]), v_kmajor=True),
                                                       A.prepare_segment(A.KVSegment(case.k[:, case.sink:], case.v[:, case.sink:]), v_kmajor=True)],
    }
    for name, fn in prep.items():
        try:
            fn()
            ms = median_ms(fn, cuda)
            rows.append(dict(shape=label, method=name, ms=ms, note="pre-pass, memory-bound"))
            print(f"{now(t0)}   {name:38s} {ms:8.3f} ms")
        except Exception as error:  # noqa: BLE001
            rows.append(dict(shape=label, method=name, error=f"{type(error).__name__}: {str(error)[:300]}"))

    if not cuda:
        return
    # registry alternatives (skipped when not importable)
    try:
        if meta.get("cudnn_form") == "none":
            raise RuntimeError("no cuDNN fp8 graph form worked for the first shape")
        form = meta.get("cudnn_form")  # the form that worked before is tried first
        forms = ([tuple(form)] if form else []) + [f for f in CUDNN_FORMS if f != tuple(form or ())]
        try:
            run, result, info = cudnn_fp8_runner(case, float(ref_bf16.float().abs().max()), forms)
        except Exception:
            meta.setdefault("cudnn_form", "none")
            raise
        meta["cudnn_form"] = info["form"]
        meta.setdefault("cudnn_fp8", {})[label] = info
        record("cudnn_fp8", run, out=result(), note=f"per-tensor fp8, output {info['output']}")
    except Exception as error:  # noqa: BLE001
        rows.append(dict(shape=label, method="cudnn_fp8", error=f"{type(error).__name__}: {str(error)[:600]}"))
        print(f"{now(t0)}   cudnn_fp8 skipped: {str(error)[:300]}")
    try:
        full, kernel_only = kitchen_runners(case)
        record("kitchen_int8", full, note="int8 QK/PV incl. its quantisation")
        record("kitchen_int8_kernel", kernel_only, note="prequantized inputs")
    except Exception as error:  # noqa: BLE001
        rows.append(dict(shape=label, method="kitchen_int8", error=f"{type(error).__name__}: {str(error)[:600]}"))
        print(f"{now(t0)}   kitchen_int8 skipped: {str(error)[:300]}")


def format_row(row):
    if "error" in row:
        return f"{row['method']:38s} ERROR {row['error'][:160]}"
    return (f"{row['method']:38s} {row['ms']:8.3f} ms {row['tflops']:7.1f} TFLOP/s  rel L2 {row['rel_l2_vs_sdpa_bf16']:.4f} "
            f"max|d| {row['max_abs_vs_sdpa_bf16']:.4f}  vs fp32 {row['rel_l2_vs_fp32']:.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as json here")
    parser.add_argument("--sizes", default="704*384,384*256")
    parser.add_argument("--batches", default="4,1", help="block-steps per call")
    parser.add_argument("--q-std", type=float, default=2.0)
    parser.add_argument("--budget", type=float, default=165.0, help="seconds; later shapes are skipped past it")
    parser.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)),
                        help="processes compiling the Triton launches in parallel")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test of this script (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.tiny
    global HEADS, HEAD_DIM
    if args.tiny:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--tiny needs TRITON_INTERPRET=1")
            return 2
        HEADS, HEAD_DIM = 2, 32
    elif not cuda:
        print("attention_check: needs a CUDA GPU (or --tiny with TRITON_INTERPRET=1)")
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    import triton
    meta = dict(torch=torch.__version__, triton=triton.__version__, q_std=args.q_std, workers=args.workers,
                device=torch.cuda.get_device_name(device) if cuda else "cpu (interpreter)")
    print(f"{now(t0)} {meta}")
    rows = []
    cases = [(s, int(b)) for b in args.batches.split(",") for s in args.sizes.split(",")]
    cases.sort(key=lambda c: -shape_of(c[0])[0] * c[1])  # the largest (most telling) first
    for size, batch in cases:
        if time.perf_counter() - t0 > args.budget:
            print(f"{now(t0)} {size} B={batch}: skipped (time budget)")
            rows.append(dict(shape=f"{size} B={batch}", method="*", error="skipped: time budget"))
            continue
        with torch.no_grad():
            case = Case(size, batch, args.q_std, device, dims=(40, 24, 56) if args.tiny else None)
            run_case(case, cuda, rows, meta, t0)
        del case
        if cuda:
            torch.cuda.empty_cache()

    # (--tiny checks nothing: the interpreter rounds fp8 approximately and multiplies bf16 bit
    # patterns as integers; tests/test_attention_fp8.py patches both for its checks)
    failures = [r for r in rows if cuda and r.get("method", "").startswith("triton") and
                ("error" in r or not r.get("finite", True) or r.get("rel_l2_vs_fp32", 0) > FAIL_REL)]
    print("\n| shape | method | ms | TFLOP/s | rel L2 vs SDPA bf16 | max abs vs SDPA | rel L2 vs fp32 (4 heads) | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['method']} | - | - | - | - | - | {r['error'][:120]} |")
        elif "tflops" not in r:
            print(f"| {r['shape']} | {r['method']} | {r['ms']:.3f} | - | - | - | - | {r.get('note', '')} |")
        else:
            print(f"| {r['shape']} | {r['method']} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['rel_l2_vs_sdpa_bf16']:.4f} | "
                  f"{r['max_abs_vs_sdpa_bf16']:.4f} | {r['rel_l2_vs_fp32']:.4f} | {r.get('note', '')[:80]} |")
    total = time.perf_counter() - t0
    verdict = f"FAILED: {[(r['shape'], r['method']) for r in failures]}" if failures else "Triton checks passed"
    print(f"\ntotal {total:.0f} s; {verdict}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows, total_s=total, failures=len(failures)), indent=1, default=str))
        print(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
