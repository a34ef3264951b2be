"""Full-size (14B, random weights) speed and memory of the streaming DiT on the GPU.

Prints one table: per block-step latency (one denoising step of one 3-latent-frame block),
FPS at 4 and 3 steps (DiT only), time to first frame block, peak GPU memory, the streaming
VAE decode per block, end-to-end FPS, and ours / original where the original was timed in
the same run (`--original DIR` with its public code and run_original.py, never committed).

    python bench/bench.py --sizes 384*256,704*384 --modes bf16,fp8,offload40 --clips 3
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from liveavatar.dit import DiTConfig  # noqa: E402
from liveavatar.loading import build_dit  # noqa: E402
from liveavatar.placement import Offload, OneDevice, Sharded  # noqa: E402
from liveavatar.sampler import StreamInputs, StreamSettings, Streamer  # noqa: E402

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
    storage = "fp8" if "fp8" in mode else "bf16"
    if mode.startswith("offload"):
        blocks = int(mode.removeprefix("offload").split("-")[0] or cfg.num_layers)
        placement = Offload("cuda", blocks=blocks, num_layers=cfg.num_layers)
    elif mode.startswith("sharded"):
        placement = Sharded([f"cuda:{i}" for i in range(torch.cuda.device_count())], cfg.num_layers, cfg.audio_inject_layers)
    else:
        placement = OneDevice("cuda")
    return build_dit(cfg, random_tensor_for(cfg), storage, placement)


def inputs_for(size: str, cfg: DiTConfig, clips: int, infer_frames: int = 48):
    width, height = (int(v) for v in size.split("*"))  # LiveAvatar writes sizes as W*H
    h, w = height // 8, width // 8
    g = torch.Generator().manual_seed(1)
    return StreamInputs(text=torch.randn(20, cfg.text_dim, generator=g),
                        ref_latent=torch.randn(16, 1, h, w, generator=g),
                        motion_latents=torch.randn(16, 19, h, w, generator=g),
                        audio=torch.randn(cfg.audio_layers, cfg.audio_dim, infer_frames * clips, generator=g))


def time_stream(model, inputs, settings):
    """Median block-step seconds (CUDA events, first block excluded), first-block seconds,
    all step times, whether the KV caches were fp8."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    streamer = Streamer(model, inputs, settings)
    events = []

    def on_step():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        events.append(event)

    first_block = None
    begin = torch.cuda.Event(enable_timing=True)
    begin.record()
    for block in streamer.blocks(on_step):
        if first_block is None:
            torch.cuda.synchronize()
            first_block = time.perf_counter() - start
    torch.cuda.synchronize()
    marks = [begin] + events
    steps = [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]
    kv_fp8 = streamer.kv_fp8
    streamer.close()
    return statistics.median(steps[settings.steps:]), first_block, steps, kv_fp8


def bench_dit(mode, sizes, clips, args):
    cfg = DiTConfig(**CONFIG_14B)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    from liveavatar.layers import Fusion
    Fusion.compile("compile" in mode)
    model = build(mode, cfg)
    weights_gib = torch.cuda.memory_allocated() / GIB
    total = torch.cuda.get_device_properties(0).total_memory
    rows = []
    for size in sizes:
        capped = mode.startswith("offload") and size in args.cap_sizes.split(",")
        torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * GIB / total if capped else 1.0)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        # offload runs under a memory cap that mem_get_info does not see: fp8 caches there, else auto
        kv = True if mode.startswith("offload") or "kvfp8" in mode else None
        settings = StreamSettings(infer_frames=48, steps=4, seed=0, kv_fp8=kv)
        block_step, first, _, kv_fp8 = time_stream(model, inputs_for(size, cfg, clips), settings)
        rows.append(dict(size=size, mode=mode + ("+kvfp8" if kv_fp8 and "kvfp8" not in mode else ""),
                         block_step_s=block_step, fps4=12 / (4 * block_step), fps3=12 / (3 * block_step),
                         first_block_s=first, peak_gib=torch.cuda.max_memory_allocated() / GIB, weights_gib=weights_gib))
        rows[-1]["memory_cap_gib"] = args.memory_cap_gib if capped else None
        print(json.dumps(rows[-1]), flush=True)
        if args.profile and mode in args.profile_modes.split(","):
            profile(model, inputs_for(size, cfg, 1), settings, Path(args.out_dir) / f"profile_{mode}_{size.replace('*', 'x')}.txt")
    del model
    gc.collect()  # the model must be gone before the next mode measures its own memory
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()
    return rows


def profile(model, inputs, settings, path):
    """Where the time of one clip goes: CUDA kernels by total time (written to `path`)."""
    from torch.profiler import ProfilerActivity
    settings = StreamSettings(infer_frames=settings.infer_frames, steps=settings.steps, num_clip=1, kv_fp8=settings.kv_fp8)
    streamer = Streamer(model, inputs, settings)
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in streamer.blocks():
            pass
        torch.cuda.synchronize()
    streamer.close()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    path.write_text(table)
    print(table[:6000], flush=True)


def bench_vae(sizes, blocks: int = 6):
    """Streaming Wan2.1 VAE decode (real size, random weights, bf16): median s per block of
    3 latents (12 frames) after the 7-latent priming, and peak memory."""
    from liveavatar.vae import VideoVAE, WanVAE
    with torch.device("cuda"):
        net = VideoVAE()
    vae = WanVAE(net, "cuda", torch.bfloat16)
    rows = {}
    for size in sizes:
        width, height = (int(v) for v in size.split("*"))
        latents = torch.randn(16, 7 + 3 * blocks, height // 8, width // 8, device="cuda")
        decoder = vae.stream_decoder()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        decoder.decode(latents[:, :7])
        times = []
        for b in range(blocks):
            torch.cuda.synchronize()
            start = time.perf_counter()
            decoder.decode(latents[:, 7 + 3 * b:10 + 3 * b])
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rows[size] = dict(decode_block_s=statistics.median(times[1:]), vae_peak_gib=torch.cuda.max_memory_allocated() / GIB)
        print(json.dumps({size: rows[size]}), flush=True)
    del vae, net
    torch.cuda.empty_cache()
    return rows


def bench_peak_vs_clips(size, clip_counts, mode="bf16"):
    """Peak GPU memory of whole runs of 1 and of many clips (caches must not grow)."""
    cfg = DiTConfig(**CONFIG_14B)
    model = build(mode, cfg)
    peaks = {}
    for clips in clip_counts:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        settings = StreamSettings(infer_frames=48, steps=4, seed=0, num_clip=clips, kv_fp8=None)
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
    parser.add_argument("--profile", action="store_true", help="kernel time breakdown of one clip (bf16)")
    parser.add_argument("--profile-modes", default="bf16")
    parser.add_argument("--skip-vae", action="store_true")
    parser.add_argument("--peak-clips", default="", help="e.g. 1,20: peak memory of bf16 runs of that many clips")
    parser.add_argument("--original", help="folder with the original's code and run_original.py (not committed)")
    parser.add_argument("--out-dir", default=".")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    vae = {} if args.skip_vae else bench_vae(sizes)
    rows = []
    for mode in filter(None, args.modes.split(",")):
        try:
            rows += bench_dit(mode, sizes, args.clips, args)
        except Exception as error:  # one failing mode must not lose the others' numbers
            print(f"mode {mode} failed: {type(error).__name__}: {error}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    if args.peak_clips:
        bench_peak_vs_clips(sizes[0], [int(c) for c in args.peak_clips.split(",")])
    original = {r["size"]: r for r in bench_original(sizes, args.clips, args)} if args.original else {}
    Path(args.out_dir, "bench.json").write_text(json.dumps({"ours": rows, "original": original, "vae": vae}, indent=1))
    print_table(rows, original, vae)


FLOOR_S = {"384*256": 0.046, "704*384": 0.154}  # bf16 arithmetic floor per block-step at ~790 TFLOP/s


def print_table(rows, original, vae):
    print("\n| size | mode | s / block-step | FPS @4 | FPS @3 | first block s | peak GiB | FPS @4 with decode "
          "| time vs original | floor / time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows + [dict(o, mode="original bf16", size=size, first_block_s=o["first_block_s"])
                     for size, o in original.items()]:
        o = original.get(r["size"])
        ratio = f"{r['block_step_s'] / o['block_step_s']:.2f}" if o else "-"
        floor = f"{100 * FLOOR_S[r['size']] / r['block_step_s']:.0f}%" if r["size"] in FLOOR_S else "-"
        decode = vae.get(r["size"], {}).get("decode_block_s")
        e2e = f"{12 / (4 * r['block_step_s'] + decode):.1f}" if decode else "-"
        print(f"| {r['size']} | {r['mode']} | {r['block_step_s']:.3f} | {12 / (4 * r['block_step_s']):.1f} | "
              f"{12 / (3 * r['block_step_s']):.1f} | {r['first_block_s']:.2f} | {r['peak_gib']:.1f} | {e2e} | {ratio} | {floor} |")
    for size, v in vae.items():
        print(f"\nVAE streaming decode {size}: {v['decode_block_s']:.3f} s per 12 frames, peak {v['vae_peak_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
