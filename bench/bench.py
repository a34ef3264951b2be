"""Full-size (14B, random weights) speed and memory of the streaming DiT on the GPU.

Writes docs/bench_results.json (a list of rows) and prints one table: wall time per
block-step (one denoising step of one 3-latent-frame block, amortised over a tick), FPS at 4
steps DiT only and end to end (streaming VAE decode overlapped), time to the first block,
peak GPU memory, for the pipelined and the sequential schedule, one GPU, offload, several
GPUs; and ours / original where the original was timed in the same run (`--original DIR`
with its public code and run_original.py, never committed).

    python bench/bench.py --sizes 384*256,704*384 --modes bf16,bf16-seq,fp8,offload40,offload40-fp8 --clips 3

`--profile --profile-modes bf16,fp8` adds, per profiled mode and size, a torch.profiler trace of
three steady ticks and its summary (GPU busy/idle, time by kernel kind, copies; trace_summary.py).

Memory caps (issue 17): a mode `fp8@30` runs fp8 weights under memory_cap_gib 30, enforced with
torch.cuda.set_per_process_memory_fraction; the memory planner (liveavatar/memory.py) picks how many
blocks to offload and how to trim the activations. Such rows carry the plan, the weight bytes
crossing the host link per tick and the FPS that allows at 25 and 50 GB/s (modelled: a tick takes
max(compute, copied / bandwidth), compute from the uncapped row of the same weights and size):

    python bench/bench.py --sizes '704*384,384*256' --modes fp8,fp8@40,fp8@30,fp8@22,fp8@14 --clips 3 --skip-vae
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from liveavatar.dit import DiTConfig  # noqa: E402
from liveavatar.loading import build_dit  # noqa: E402
from liveavatar.overlap import decode_alongside  # noqa: E402
from liveavatar.placement import Offload, OneDevice, Sharded, StepPerGPU  # noqa: E402
from liveavatar.sampler import StreamInputs, StreamSettings, Streamer  # noqa: E402
from liveavatar.settings import RunOptions  # noqa: E402

CONFIG_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_dim=4096, text_len=512, audio_dim=1024)
GIB = 2 ** 30


def random_tensor_for(cfg: DiTConfig, generator_seed=0):
    from liveavatar.loading import expected_tensors
    shapes = {k: tuple(v.shape) for k, v in expected_tensors(cfg).items()}
    g = torch.Generator(device="cuda").manual_seed(generator_seed)

    def tensor_for(name, device):
        """Random values drawn on the GPU (fast), then placed where the placement wants them."""
        shape = shapes[name]
        if len(shape) >= 2:
            fan_in = int(torch.tensor(shape[1:]).prod())
            t = torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16) / fan_in ** 0.5
        elif "norm" in name:
            t = torch.ones(shape, device="cuda", dtype=torch.bfloat16)
        else:
            t = torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02
        return t.to(device), None

    return tensor_for


def build(mode: str, cfg: DiTConfig):
    """Mode names: bf16 | fp8 | offload<N>[-fp8] | sharded[-fp8] | stepgpu[-fp8], each with an
    optional -seq (today's sequential schedule), -nok / -gather / -deq (the model's RunOptions:
    fused kernels off, attention gather, fp8 weights dequantised), -kvbf16 (bf16 KV caches; fp8
    is the default) and @CAP (memory_cap_gib; one GPU, blocks offloaded as the memory plan says)."""
    storage = "fp8" if "fp8" in mode.replace("kvfp8", "") else "bf16"
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if "@" in mode:
        placement = Offload("cuda", blocks=0, num_layers=cfg.num_layers)  # the planner moves blocks to fit
    elif mode.startswith("offload"):
        blocks = int(mode.removeprefix("offload").split("-")[0] or cfg.num_layers)
        placement = Offload("cuda", blocks=blocks, num_layers=cfg.num_layers)
    elif mode.startswith("sharded"):
        placement = Sharded(gpus, cfg.num_layers)
    elif mode.startswith("stepgpu"):
        placement = StepPerGPU(gpus)
    else:
        placement = OneDevice("cuda")
    gpus_used = len(gpus) if mode.startswith(("sharded", "stepgpu")) else 1
    return build_dit(cfg, random_tensor_for(cfg), storage, placement, options=options_for(mode)), gpus_used


def options_for(mode: str) -> RunOptions:
    return RunOptions(kernels="off" if "-nok" in mode else "auto", attention="gather" if "-gather" in mode else "auto",
                      fp8_compute="dequantize" if "-deq" in mode else "auto")


def inputs_for(size: str, cfg: DiTConfig, clips: int, infer_frames: int = 48):
    width, height = (int(v) for v in size.split("*"))  # LiveAvatar writes sizes as W*H
    h, w = height // 8, width // 8
    g = torch.Generator().manual_seed(1)
    return StreamInputs(text=torch.randn(20, cfg.text_dim, generator=g),
                        ref_latent=torch.randn(16, 1, h, w, generator=g),
                        motion_latents=torch.randn(16, 19, h, w, generator=g),
                        audio=torch.randn(cfg.audio_layers, cfg.audio_dim, infer_frames * clips, generator=g))


def time_stream(model, inputs, settings, vae=None):
    """Wall seconds per block-step in steady state: the median interval between consecutive
    clean blocks, divided by the steps S (the pipelined schedule completes one block per full
    tick of S block-steps, the sequential one per S block-steps).
    DiT only, the GPU is synchronised at every block, so the host cannot run ahead of it
    (a small bubble per tick is counted against us). With `vae`, every block is also decoded,
    overlapped on its own stream, and the interval is end to end (frames on the host).
    Also: seconds to the first block, the memory plan."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    streamer = Streamer(model, inputs, settings)
    blocks = streamer.blocks()
    if vae is not None:
        decoder = vae.stream_decoder()
        decoder.decode(inputs.motion_latents[:, :7].to(vae.device))  # LiveAvatar's priming
        blocks = decode_alongside(blocks, decoder.decode, vae.device)
    marks = []
    for _ in blocks:
        if vae is None:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
    torch.cuda.synchronize()
    # Full ticks only: the pipeline fills over the first S-1 ticks and drains over the last
    # S-1 (fewer block-steps per tick there). Block k is clean at tick k + S - 1, so the
    # interval ending at block k is a full tick for S <= k <= blocks - S.
    steps, count = settings.steps, len(marks)
    full = range(steps, count - steps + 1) if settings.pipelined else range(1, count)
    intervals = [marks[k] - marks[k - 1] for k in full]
    plan = streamer.plan
    streamer.close()
    return statistics.median(intervals) / settings.steps, marks[0] - start, plan


def peak_gib() -> float:
    return max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) / GIB


def reset_peaks():
    for d in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(d)


def bench_dit(mode, sizes, clips, args, vaes):
    cfg = DiTConfig(**CONFIG_14B)
    torch.cuda.empty_cache()
    reset_peaks()
    load_start = time.perf_counter()
    model, gpus = build(mode, cfg)
    load_s = time.perf_counter() - load_start
    total = torch.cuda.get_device_properties(0).total_memory
    rows = []
    for size in sizes:
        if mode.startswith("offload") and size not in args.offload_sizes.split(","):
            continue
        cap = float(mode.partition("@")[2]) if "@" in mode else (
            args.memory_cap_gib if mode.startswith("offload") and size in args.cap_sizes.split(",") else None)
        torch.cuda.set_per_process_memory_fraction(cap * GIB / total if cap else 1.0)
        torch.cuda.empty_cache()
        reset_peaks()
        settings = StreamSettings(infer_frames=48, steps=4, seed=0, kv_fp8=False if "-kvbf16" in mode else None,
                                  pipelined="-seq" not in mode, memory_cap_gib=cap,
                                  adapt_offload="@" in mode)  # offload<N> modes keep their N
        inputs = inputs_for(size, cfg, clips)
        block_step, first, plan = time_stream(model, inputs, settings)
        peak = peak_gib()
        e2e = None
        if vaes is not None and not cap and "-seq" not in mode and "-nok" not in mode:
            e2e_block_step, _, _ = time_stream(model, inputs, settings, vae=vaes[gpus - 1])
            e2e = 12 / (4 * e2e_block_step)
        rows.append(dict(size=size, mode=mode, gpus=gpus, steps=settings.steps, pipelined=settings.pipelined,
                         block_step_s=block_step, fps4=12 / (4 * block_step), end_to_end_fps4=e2e, first_block_s=first,
                         load_s=load_s, peak_gib=peak, memory_cap_gib=cap, kv_cache="fp8" if plan.kv_fp8 else "bf16",
                         offload_blocks=plan.offload_blocks, plan=plan.summary(),
                         estimate_gib=max(d.total for d in plan.devices) / GIB,
                         copied_gb_per_tick=plan.copied_per_tick / 1e9, kernels=model.kernels.status()))
        print(json.dumps(rows[-1]), flush=True)
        if args.profile and mode in args.profile_modes.split(","):
            profile(model, inputs, settings, Path(args.out_dir), f"{mode}_{size.replace('*', 'x')}")
    del model
    gc.collect()  # the model must be gone before the next mode measures its own memory
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()
    return rows


def profile(model, inputs, settings, out_dir: Path, name: str, ticks: int = 3):
    """Where the time of `ticks` steady-state ticks goes: a Chrome trace (gzipped) and its
    summary (trace_summary.py), written to out_dir and printed. The profiler starts once the
    pipeline is full (S + 1 blocks out) and stops after `ticks` more blocks (one per tick)."""
    from torch.profiler import ProfilerActivity

    from trace_summary import load, summarize
    streamer = Streamer(model, inputs, settings)
    blocks = streamer.blocks()
    for _ in range(settings.steps + 1):
        next(blocks)
    torch.cuda.synchronize()
    prof = torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    prof.start()
    for _ in range(ticks):
        next(blocks)
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)
    prof.stop()
    blocks.close()
    streamer.close()
    trace = str(out_dir / f"trace_{name}.json.gz")
    prof.export_chrome_trace(trace)  # gzipped by torch for a .gz path
    per = ticks if settings.pipelined else ticks * settings.steps
    text = summarize(load(trace), label=name, per=per, per_name="tick" if settings.pipelined else "block-step")
    (out_dir / f"profile_{name}.md").write_text(text)
    print(text, flush=True)


def real_size_vaes():
    """A real-size Wan2.1 VAE (random weights, bf16) on every GPU: end-to-end runs decode on
    the last GPU the DiT uses."""
    from liveavatar.vae import VideoVAE, WanVAE
    vaes = []
    for d in range(torch.cuda.device_count()):
        with torch.device(f"cuda:{d}"):
            vaes.append(WanVAE(VideoVAE(), f"cuda:{d}", torch.bfloat16))
    return vaes


def bench_vae(vae, sizes, blocks: int = 6):
    """Streaming decode alone: median s per block of 3 latents (12 frames) after the
    7-latent priming, and peak memory."""
    rows = {}
    for size in sizes:
        width, height = (int(v) for v in size.split("*"))
        latents = torch.randn(16, 7 + 3 * blocks, height // 8, width // 8, device=vae.device)
        decoder = vae.stream_decoder()
        torch.cuda.synchronize()
        reset_peaks()
        decoder.decode(latents[:, :7])
        times = []
        for b in range(blocks):
            torch.cuda.synchronize()
            start = time.perf_counter()
            decoder.decode(latents[:, 7 + 3 * b:10 + 3 * b])
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rows[size] = dict(decode_block_s=statistics.median(times[1:]), vae_peak_gib=peak_gib())
        print(json.dumps({size: rows[size]}), flush=True)
    torch.cuda.empty_cache()
    return rows


def bench_peak_vs_clips(size, clip_counts, mode="bf16"):
    """Peak GPU memory of whole runs of 1 and of many clips (caches must not grow)."""
    cfg = DiTConfig(**CONFIG_14B)
    model, _ = build(mode, cfg)
    peaks = {}
    for clips in clip_counts:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        settings = StreamSettings(infer_frames=48, steps=4, seed=0, num_clip=clips)
        time_stream(model, inputs_for(size, cfg, clips), settings)
        peaks[clips] = torch.cuda.max_memory_allocated() / GIB
        print(json.dumps({"size": size, "mode": mode, "clips": clips, "peak_gib": peaks[clips]}), flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return peaks


def bench_original(sizes, clips, args):
    out = Path(args.out_dir) / "original.json"
    cfg = dict(json.loads(Path(args.original, "config_14b.json").read_text()))
    cfg_file = Path(args.out_dir) / "original_config.json"
    cfg_file.write_text(json.dumps(cfg))
    subprocess.run([sys.executable, str(Path(args.original) / "run_original.py"), str(cfg_file), str(out),
                    ",".join(sizes), "--clips", str(clips)], check=True)
    return json.loads(out.read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="384*256,704*384")
    parser.add_argument("--modes", default="bf16,fp8,offload40")
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--memory-cap-gib", type=float, default=22.0, help="per-process GPU memory cap for offload modes")
    parser.add_argument("--cap-sizes", default="384*256", help="sizes at which offload modes run under the cap")
    parser.add_argument("--offload-sizes", default="384*256,704*384", help="sizes at which offload modes run at all")
    parser.add_argument("--profile", action="store_true", help="trace + time breakdown of 3 steady ticks per profiled mode")
    parser.add_argument("--profile-modes", default="bf16")
    parser.add_argument("--skip-vae", action="store_true")
    parser.add_argument("--peak-clips", default="", help="e.g. 1,20: peak memory of bf16 runs of that many clips")
    parser.add_argument("--original", help="folder with the original's code and run_original.py (not committed)")
    parser.add_argument("--out-dir", default=".", help="profiles and the original's raw output")
    parser.add_argument("--results", default="docs/bench_results.json", help="the rows, as a JSON list")
    args = parser.parse_args()
    torch.cuda.init()  # the memory-stat calls below need an initialised CUDA
    sizes = args.sizes.split(",")
    rows = []
    if any("@" in m or m.startswith("offload") for m in args.modes.split(",")):
        print(json.dumps({"host_link_gbps": host_link_gbps()}), flush=True)
    if args.original:  # first, on a GPU nothing else has touched yet
        try:
            rows += [dict(r, mode="original bf16", gpus=1, steps=4, pipelined=False, end_to_end_fps4=None,
                          memory_cap_gib=None) for r in bench_original(sizes, args.clips, args)]
        except Exception:  # keep going with ours
            print(f"original failed:\n{traceback.format_exc()}", flush=True)
    vaes = None if args.skip_vae else real_size_vaes()
    vae = {} if vaes is None else bench_vae(vaes[0], sizes)
    for mode in filter(None, args.modes.split(",")):
        try:
            rows += bench_dit(mode, sizes, args.clips, args, vaes)
        except Exception:  # one failing mode must not lose the others' numbers
            print(f"mode {mode} failed:\n{traceback.format_exc()}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        save_rows(rows, vae, args.results)  # after every mode: a run cut short keeps what it measured
    if args.peak_clips:
        bench_peak_vs_clips(sizes[0], [int(c) for c in args.peak_clips.split(",")])
    print_table(rows, vae)


def save_rows(rows, vae, path):
    for r in rows:
        r["decode_block_s"] = vae.get(r["size"], {}).get("decode_block_s")
    modelled_fps(rows)
    Path(path).write_text(json.dumps(rows, indent=1))


def modelled_fps(rows):
    """FPS an offloading row allows at a 25 / 50 GB/s host link: a pipelined tick (one block of 12
    frames) takes max(compute, copied bytes / bandwidth); compute = the tick of the uncapped row
    of the same weights and size (else this row's own tick)."""
    for r in rows:
        if not r.get("copied_gb_per_tick"):
            continue
        weights = r["mode"].split("@")[0].replace("-kvbf16", "")
        base = next((o for o in rows if o["size"] == r["size"] and o["mode"] == weights), r)
        compute = 4 * base["block_step_s"]
        for gbps in (25, 50):
            r[f"modelled_fps_{gbps}gbps"] = 12 / max(compute, r["copied_gb_per_tick"] / gbps)


def host_link_gbps(gib: float = 1.0) -> float:
    """Pinned host -> GPU copy bandwidth (GB/s), the link offloaded blocks cross."""
    host = torch.empty(int(gib * GIB), dtype=torch.uint8, pin_memory=True)
    device = torch.empty_like(host, device="cuda")
    device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * host.numel() / (time.perf_counter() - start) / 1e9


FLOOR_S = {"384*256": 0.046, "704*384": 0.154}  # bf16 arithmetic floor per block-step at ~790 TFLOP/s


def print_table(rows, vae):
    original = {r["size"]: r for r in rows if r["mode"].startswith("original")}
    capped = [r for r in rows if r.get("memory_cap_gib")]
    if capped:
        print("\n| size | mode | memory_cap_gib | peak GiB | estimate GiB | steady FPS @4 | blocks offloaded "
              "| copied GB / tick | modelled FPS @25 GB/s | modelled FPS @50 GB/s | plan |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in capped:
            fps = [f"{r[k]:.1f}" if r.get(k) else "-" for k in ("modelled_fps_25gbps", "modelled_fps_50gbps")]
            print(f"| {r['size']} | {r['mode']} | {r['memory_cap_gib']:g} | {r['peak_gib']:.1f} | "
                  f"{r.get('estimate_gib', 0):.1f} | {r['fps4']:.1f} | {r.get('offload_blocks')} | "
                  f"{r.get('copied_gb_per_tick', 0):.2f} | {fps[0]} | {fps[1]} | {r.get('plan', '')} |")
    print("\n| size | mode | GPUs | schedule | s / block-step | FPS @4 | FPS @4 with decode | first block s "
          "| peak GiB | cap GiB | time vs original | floor / time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o = original.get(r["size"])
        ratio = f"{r['block_step_s'] / o['block_step_s']:.2f}" if o else "-"
        floor = f"{100 * FLOOR_S[r['size']] / r['block_step_s']:.0f}%" if r["size"] in FLOOR_S else "-"
        e2e = f"{r['end_to_end_fps4']:.1f}" if r.get("end_to_end_fps4") else "-"
        schedule = "pipelined" if r.get("pipelined") else "sequential"
        print(f"| {r['size']} | {r['mode']} | {r['gpus']} | {schedule} | {r['block_step_s']:.3f} | {r['fps4']:.1f} | "
              f"{e2e} | {r['first_block_s']:.2f} | {r['peak_gib']:.1f} | {r.get('memory_cap_gib') or '-'} | {ratio} | {floor} |")
    for size, v in vae.items():
        print(f"\nVAE streaming decode {size}: {v['decode_block_s']:.3f} s per 12 frames, peak {v['vae_peak_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
