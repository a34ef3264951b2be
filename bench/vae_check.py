"""Streaming VAE decode variants on the GPU: what makes a block's decode (3 latents, 12 frames)
cheaper, with each variant's frames checked against the baseline.

    python bench/vae_check.py --sizes 384*256,704*384 --out $OUT/vae.json

Variants: `latent` (one latent per decoder pass, as the original), `block` (the 3 latents of a
block in one pass: the causal caches make it the same function), each with cuDNN's autotuner
(`cudnn.benchmark`) off/on and in channels-last-3d memory format; and the portrait encode.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from liveavatar.vae import TimeCache, VideoVAE, WanVAE  # noqa: E402


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
        baseline = None
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            for per_pass in (1, 3):
                for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last_3d", torch.channels_last_3d)):
                    set_format(vae.net, fmt)
                    torch.cuda.reset_peak_memory_stats()
                    seconds, frames = time_variant(vae, latents, per_pass, fmt)
                    baseline = frames if baseline is None else baseline
                    error = ((frames - baseline).norm() / baseline.norm()).item()
                    row = dict(size=size, cudnn_benchmark=benchmark, latents_per_pass=per_pass, memory_format=name,
                               s_per_block=seconds / args.blocks, rel_l2_vs_baseline=error,
                               peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        set_format(vae.net, torch.contiguous_format)
        image = torch.rand(3, 1, height, width, device="cuda") * 2 - 1
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            times = []
            for _ in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                vae.encode_portrait(image)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            rows.append(dict(size=size, cudnn_benchmark=benchmark, portrait_encode_s=statistics.median(times[1:]),
                             first_s=times[0]))
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("\n| size | cudnn.benchmark | latents/pass | format | s per block | rel L2 | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "s_per_block" in r:
            print(f"| {r['size']} | {r['cudnn_benchmark']} | {r['latents_per_pass']} | {r['memory_format']} | "
                  f"{r['s_per_block']:.4f} | {r['rel_l2_vs_baseline']:.1e} | {r['peak_gib']:.1f} |")
        else:
            print(f"| {r['size']} | {r['cudnn_benchmark']} | portrait encode {r['portrait_encode_s']:.3f} s (first {r['first_s']:.2f} s) |")


if __name__ == "__main__":
    main()
