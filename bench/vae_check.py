"""Streaming VAE decode variants on the GPU: what makes a block's decode (3 latents, 12 frames)
cheaper, with each variant's frames checked against the baseline.

    python bench/vae_check.py --sizes 384*256,704*384 --out $OUT/vae.json

Variants: `latent` (one latent per decoder pass, as the original), `block` (the 3 latents of a
block in one pass: the causal caches make it the same function), each with cuDNN's autotuner
(`cudnn.benchmark`) off/on, and the causal 3-D convolutions as
- `conv3d` (the engine's GPU path) in contiguous or channels-last-3d memory format,
- `taps`: one conv2d per time tap, summed (the engine's CPU path),
- `folded`: the time taps folded into the input channels, one channels-last conv2d with a
  reduction 3x as deep (x.unfold over time; the weight [out, in, 3, kh, kw] read as
  [out, in*3, kh, kw], a view),
each checked against the first variant; the work of a block (TFLOP, from torch's flop counter)
gives each variant's TFLOP/s; a torch.profiler table of one block's decode per convolution
variant (GPU time by op); and the portrait encode (the time to the first frame's largest part
after the model's first block) with each convolution.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from liveavatar.vae import CausalConv3d, TimeCache, VideoVAE, WanVAE  # noqa: E402

ENGINE_CONVOLVE = CausalConv3d.convolve
FOLDED_WEIGHTS: dict = {}  # id(conv) -> its weight as [out, in * taps, kh, kw], channels-last


def convolve_by_taps(conv, x):
    return conv._conv_by_time_taps(x)


def convolve_folded(conv, x):
    """conv3d of the padded x [B, C, T, H, W] as one conv2d over frames whose channels are the
    kt consecutive input frames (channel c * kt + k = frame t + k's channel c)."""
    taps, stride = conv.kernel_size[0], conv.stride[0]
    b, c, _, h, w = x.shape
    windows = x.unfold(2, taps, stride)  # [B, C, T_out, H, W, taps]
    frames = windows.shape[2]
    stacked = windows.permute(0, 2, 3, 4, 1, 5).reshape(b * frames, h, w, c * taps).permute(0, 3, 1, 2)
    if id(conv) not in FOLDED_WEIGHTS:
        out_ch, _, _, kh, kw = conv.weight.shape
        FOLDED_WEIGHTS[id(conv)] = conv.weight.reshape(out_ch, c * taps, kh, kw).contiguous(
            memory_format=torch.channels_last)
    y = F.conv2d(stacked, FOLDED_WEIGHTS[id(conv)], conv.bias, conv.stride[1:])
    return rearrange(y, "(b t) c h w -> b c t h w", t=frames)


CONVOLUTIONS = {"conv3d": ENGINE_CONVOLVE, "taps": convolve_by_taps, "folded": convolve_folded}


def decode_stream(vae: WanVAE, latents: torch.Tensor, per_pass: int, memory_format) -> list[torch.Tensor]:
    """Priming latent alone, then `per_pass` latents per decoder pass; frames of every pass."""
    net, cache = vae.net, TimeCache()
    x = net.conv2(vae.denormalise(latents))
    x = x.contiguous(memory_format=memory_format)
    outs, start = [], 0
    with torch.no_grad():
        while start < x.shape[2]:
            size = 1 if start == 0 else per_pass
            cache.rewind()
            outs.append(net.decoder(x[:, :, start:start + size], cache))
            start += size
    return outs


def set_format(net, memory_format):
    """Conv3d weights in the memory format (2-D convs and norms keep theirs)."""
    for module in net.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=memory_format)


def time_variant(vae, latents, per_pass, memory_format, repeats=5):
    times = []
    out = None
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = decode_stream(vae, latents, per_pass, memory_format)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), torch.cat(out, dim=2).float()


VARIANTS = (("conv3d", "contiguous", torch.contiguous_format), ("conv3d", "channels_last_3d", torch.channels_last_3d),
            ("taps", "contiguous", torch.contiguous_format), ("folded", "contiguous", torch.contiguous_format))


def block_tflop(vae, latents) -> float:
    """TFLOP of one block's decode (3 latents after the priming latent), by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode
    net, cache = vae.net, TimeCache()
    x = net.conv2(vae.denormalise(latents[:, :4]))
    with torch.no_grad():
        net.decoder(x[:, :, :1], cache)
        with FlopCounterMode(display=False) as counter:
            for i in range(1, 4):
                cache.rewind()
                net.decoder(x[:, :, i:i + 1], cache)
    return counter.get_total_flops() / 1e12


def portrait_tflop(vae, image) -> float:
    """TFLOP of the portrait's encode (the reference frame, then 73 still frames)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        vae.encode_portrait(image)
    return counter.get_total_flops() / 1e12


def profile_block(vae, latents) -> str:
    """GPU time by op of a stream's decode (the priming latent and two blocks), after one
    unprofiled decode of the same (kernels chosen, memory cached)."""
    from torch.profiler import ProfilerActivity, profile
    decode_stream(vae, latents[:, :7], 3, torch.contiguous_format)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        decode_stream(vae, latents[:, :7], 3, torch.contiguous_format)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=14)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="384*256,704*384")
    parser.add_argument("--blocks", type=int, default=4, help="blocks of 3 latents after the priming latent")
    parser.add_argument("--out", default="vae_check.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = WanVAE(VideoVAE(), "cuda", torch.bfloat16)
    rows = []
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.split("*"))
        latents = torch.randn(16, 1 + 3 * args.blocks, height // 8, width // 8, device="cuda")
        tflop = block_tflop(vae, latents)
        baseline = None
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            for per_pass in (1, 3):
                for conv, name, fmt in VARIANTS:
                    set_format(vae.net, fmt)
                    CausalConv3d.convolve = CONVOLUTIONS[conv]
                    torch.cuda.reset_peak_memory_stats()
                    seconds, frames = time_variant(vae, latents, per_pass, fmt)
                    baseline = frames if baseline is None else baseline
                    error = ((frames - baseline).norm() / baseline.norm()).item()
                    row = dict(size=size, cudnn_benchmark=benchmark, latents_per_pass=per_pass, convolution=conv,
                               memory_format=name, s_per_block=seconds / args.blocks, tflop_per_block=tflop,
                               tflops=tflop / (seconds / args.blocks), rel_l2_vs_baseline=error,
                               peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        for conv in CONVOLUTIONS:
            CausalConv3d.convolve = CONVOLUTIONS[conv]
            print(f"\n{size}, {conv}, cudnn.benchmark on: GPU time of one block's decode by op", flush=True)
            print(profile_block(vae, latents), flush=True)
        CausalConv3d.convolve = ENGINE_CONVOLVE
        set_format(vae.net, torch.contiguous_format)
        image = torch.rand(3, 1, height, width, device="cuda") * 2 - 1
        encode_tflop = portrait_tflop(vae, image)
        reference = None
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            for conv in CONVOLUTIONS:
                CausalConv3d.convolve = CONVOLUTIONS[conv]
                times = []
                for _ in range(3):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    motion = vae.encode_portrait(image)[1]
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                reference = motion if reference is None else reference
                seconds = statistics.median(times[1:])
                rows.append(dict(size=size, cudnn_benchmark=benchmark, convolution=conv, portrait_encode_s=seconds,
                                 first_s=times[0], tflops=encode_tflop / seconds,
                                 rel_l2_vs_baseline=((motion - reference).norm() / reference.norm()).item()))
                print(json.dumps(rows[-1]), flush=True)
        CausalConv3d.convolve = ENGINE_CONVOLVE
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("\n| size | cudnn.benchmark | latents/pass | convolution | format | s per block | TFLOP/s | rel L2 | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "s_per_block" in r:
            print(f"| {r['size']} | {r['cudnn_benchmark']} | {r['latents_per_pass']} | {r['convolution']} | "
                  f"{r['memory_format']} | {r['s_per_block']:.4f} | {r['tflops']:.0f} | {r['rel_l2_vs_baseline']:.1e} | "
                  f"{r['peak_gib']:.1f} |")
        else:
            print(f"| {r['size']} | {r['cudnn_benchmark']} | portrait encode | {r['convolution']} | | "
                  f"{r['portrait_encode_s']:.3f} s (first {r['first_s']:.2f} s) | {r['tflops']:.0f} | "
                  f"{r['rel_l2_vs_baseline']:.1e} | |")


if __name__ == "__main__":
    main()
