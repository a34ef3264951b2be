"""The streaming VAE decode on the GPU, as the engine runs it and with each of its choices
undone, every variant's frames checked against the engine's.

    python bench/vae_check.py --sizes 384*256,704*384 --out $OUT/vae.json [--before old_vae.py]

Variants of one block's decode (3 latents, 12 frames, after the stream's first latent):
- `engine`: activations channels-last, a block's latents in one decoder pass, each RMSNorm and
  the SiLU after it in one Triton pass;
- `contiguous`: activations and weights in PyTorch's default layout (cuDNN then transposes
  around every convolution);
- `one per pass`: one latent per decoder pass, one 4-frame chunk per encoder pass (the
  original's loops);
- `unfused norms`: the RMSNorm + SiLU pairs step by step in PyTorch instead of one Triton pass;
- `before`: the engine's vae.py of an earlier commit (`git show REV:liveavatar/vae.py >
  old_vae.py`), when given, with the same weights.
TFLOP/s from torch's flop counter over a block; a torch.profiler table of the engine's decode
(GPU time by op); the portrait encode (the largest part of the time to the first frame after
the model's first block) in each variant.

Measured before on an H100 (docs/benchmarks.md, "The streaming VAE decode"): cuDNN's autotuner
(`cudnn.benchmark`) changed nothing; one conv2d per time tap and the time taps folded into the
channels of one conv2d were both slower than cuDNN's conv3d.
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
from liveavatar import vae as vae_module  # noqa: E402
from liveavatar.kernels import Kernels  # noqa: E402
from liveavatar.vae import VideoVAE, WanVAE  # noqa: E402

def load_before(path: str):
    """An earlier vae.py, imported as a module of this pack (its relative imports resolve)."""
    import importlib.util
    import liveavatar
    spec = importlib.util.spec_from_file_location("liveavatar.vae_before", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = liveavatar.__name__
    spec.loader.exec_module(module)
    return module


def decode_stream(vae, latents: torch.Tensor) -> torch.Tensor:
    """The stream's first latent, then one block (3 latents) per call, as Live Video decodes."""
    decoder = vae.stream_decoder()
    chunks = [latents[:, :1]] + [latents[:, i:i + 3] for i in range(1, latents.shape[1], 3)]
    return torch.cat([decoder.decode(chunk, clamp=False) for chunk in chunks], dim=1)


def time_decode(vae, latents, repeats=5):
    times, frames = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        frames = decode_stream(vae, latents)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), frames


def decode_variants(vae, before):
    """(name, vae, setup, undo) for each variant; setup/undo switch one engine choice."""
    per_pass, chunks, layout, fused = vae_module.LATENTS_PER_PASS, vae_module.CHUNKS_PER_PASS, vae.layout, vae.kernels

    def one_per_pass(latents, encoder_chunks):
        vae_module.LATENTS_PER_PASS, vae_module.CHUNKS_PER_PASS = latents, encoder_chunks

    yield "engine", vae, lambda: None, lambda: None
    yield "contiguous", vae, lambda: vae.set_layout(torch.contiguous_format), lambda: vae.set_layout(layout)
    yield "one per pass", vae, lambda: one_per_pass(1, 1), lambda: one_per_pass(per_pass, chunks)
    yield "unfused norms", vae, lambda: vae.use_kernels(Kernels("off")), lambda: vae.use_kernels(fused)
    if before is not None:
        yield "before", before, lambda: None, lambda: None


def block_tflop(vae, latents) -> float:
    """TFLOP of one block's decode (3 latents after the stream's first), by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode
    decoder = vae.stream_decoder()
    decoder.decode(latents[:, :1])
    with FlopCounterMode(display=False) as counter:
        decoder.decode(latents[:, 1:4])
    return counter.get_total_flops() / 1e12


def portrait_tflop(vae, image) -> float:
    """TFLOP of the portrait's encode (the reference frame, then 73 still frames)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        vae.encode_portrait(image)
    return counter.get_total_flops() / 1e12


def profile_block(vae, latents) -> str:
    """GPU time by op of a stream's decode (its first latent and two blocks), after one
    unprofiled decode of the same (kernels chosen, memory cached)."""
    from torch.profiler import ProfilerActivity, profile
    decode_stream(vae, latents[:, :7])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        decode_stream(vae, latents[:, :7])
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=16)


def relative_l2(got, want) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def measure_decodes(vae, before, size, latents, blocks, tflop):
    rows, reference = [], None
    for name, model, setup, undo in decode_variants(vae, before):
        setup()
        torch.cuda.reset_peak_memory_stats()
        seconds, frames = time_decode(model, latents)
        undo()
        reference = frames if reference is None else reference
        rows.append(dict(size=size, variant=name, s_per_block=seconds / blocks, tflop_per_block=tflop,
                         tflops=tflop / (seconds / blocks), rel_l2_vs_engine=relative_l2(frames, reference),
                         peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def measure_encodes(vae, before, size, image):
    rows, reference = [], None
    encode_tflop = portrait_tflop(vae, image)
    for name, model, setup, undo in decode_variants(vae, before):
        setup()
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            motion = model.encode_portrait(image)[1]
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        undo()
        reference = motion if reference is None else reference
        seconds = statistics.median(times[1:])
        rows.append(dict(size=size, variant=name, portrait_encode_s=seconds, first_s=times[0],
                         tflops=encode_tflop / seconds, rel_l2_vs_engine=relative_l2(motion, reference)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def print_table(rows):
    print("\n| size | variant | s per block / portrait encode | TFLOP/s | rel L2 vs engine | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "s_per_block" in r:
            print(f"| {r['size']} | {r['variant']} | {r['s_per_block']:.4f} | {r['tflops']:.0f} | "
                  f"{r['rel_l2_vs_engine']:.1e} | {r['peak_gib']:.1f} |")
        else:
            print(f"| {r['size']} | {r['variant']}, portrait encode | {r['portrait_encode_s']:.3f} s "
                  f"(first {r['first_s']:.2f} s) | {r['tflops']:.0f} | {r['rel_l2_vs_engine']:.1e} | |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="384*256,704*384")
    parser.add_argument("--blocks", type=int, default=4, help="blocks of 3 latents after the stream's first latent")
    parser.add_argument("--before", help="an earlier liveavatar/vae.py to time beside the engine's")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--out", default="vae_check.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        net = VideoVAE()
    vae = WanVAE(net, "cuda", torch.bfloat16)
    before = None
    if args.before:
        old = load_before(args.before)
        # the same weights in PyTorch's default layout, as the earlier code loaded them
        weights = {name: t.contiguous() for name, t in vae.net.state_dict().items()}
        before = old.WanVAE.from_state_dict(weights, "cuda", torch.bfloat16)
    rows = []
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.split("*"))
        latents = torch.randn(16, 1 + 3 * args.blocks, height // 8, width // 8, device="cuda")
        rows += measure_decodes(vae, before, size, latents, args.blocks, block_tflop(vae, latents))
        if not args.no_profile:
            print(f"\n{size}, engine: GPU time of a stream's first latent and two blocks by op", flush=True)
            print(profile_block(vae, latents), flush=True)
        rows += measure_encodes(vae, before, size, torch.rand(3, 1, height, width, device="cuda") * 2 - 1)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print_table(rows)


if __name__ == "__main__":
    main()
