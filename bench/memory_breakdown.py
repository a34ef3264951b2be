"""Where a streaming run's GPU memory goes, measured, next to the memory planner's estimate.

On CUDA (full-size 14B, random weights, as bench.py builds it): PyTorch's allocator records
every allocation with its Python stack (torch.cuda.memory._record_memory_history) from before
the model is built; the trace is replayed to the moment of peak allocated memory and each
block live then is put in a category by the first frame that names one (weights, offload
slots, KV rings, sink, text/audio context, tick activations, sink prefill, VAE, other).
Pinned host memory (offloaded blocks) is summed from the tensors. Each run: 2 clips (the
switch to the refreshed sink included), a streaming VAE decode alongside when --vae.

    python bench/memory_breakdown.py --sizes '704*384,384*256' \
        --runs fp8,fp8-kvbf16,bf16,fp8@40,fp8@30,fp8@22,fp8@14,stepgpu4-fp8 --vae --out-dir $OUT/memory

Run names: `fp8` / `bf16` weights on one GPU; `-kvbf16` caches in bf16 (default fp8);
`@CAP` a memory cap in GiB (memory_cap_gib, enforced with set_per_process_memory_fraction;
the planner picks the offloaded blocks and trimming); `stepgpuN` one denoising step per GPU
over N GPUs, emulated on one GPU when fewer are visible (N copies there, their forwards run one
after another; per GPU = one copy's weights, rings, sink and context + the largest forward's
activations).

`--dry` runs the same on CPU with a tiny model (no allocator trace there: the categories
are the known tensors' bytes, the activations the peak of live tensor bytes inside a tick,
tracked by a TorchDispatchMode); tests/test_memory_plan.py runs it.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from liveavatar.memory import GIB  # noqa: E402
from liveavatar.sampler import StreamInputs, StreamSettings, Streamer  # noqa: E402

CATEGORIES = ["weights", "offload slots", "KV rings", "sink", "text/audio context", "tick activations",
              "sink prefill", "VAE", "audio encoder", "other"]
# (file suffix, function) -> category; the innermost frame that matches decides
FRAME_RULES = [
    ("placement.py", "_make_slots", "offload slots"),
    ("placement.py", "set_blocks", "weights"),
    ("placement.py", "attach", "weights"),
    ("loading.py", "build_dit", "weights"),
    ("loading.py", "replicate", "weights"),
    ("bench.py", "random_tensor_for", "weights"),
    ("kvcache.py", "__init__", "KV rings"),
    ("kvcache.py", "keep", "sink"),
    ("dit.py", "text_context", "text/audio context"),
    ("dit.py", "time_modulation", "text/audio context"),
    ("dit.py", "audio_condition", "text/audio context"),
    ("rope.py", "grid_tables", "text/audio context"),
    ("dit.py", "prefill_sink", "sink prefill"),
    ("dit.py", "denoise", "tick activations"),
    ("vae.py", "", "VAE"),
    ("decoding.py", "", "VAE"),
    ("audio.py", "", "audio encoder"),
]


def category_of(frames) -> str:
    """frames: innermost first, dicts with filename and name (the allocator's format)."""
    for frame in frames:
        for suffix, name, category in FRAME_RULES:
            if frame.get("filename", "").endswith(suffix) and (not name or frame.get("name") == name):
                if category == "text/audio context" and frame.get("name") == "grid_tables" and not any(
                        f.get("name") == "denoise" for f in frames):
                    continue
                return category
    return "other"


# ---- CUDA: the allocator's trace --------------------------------------------------------------
def start_recording():
    """Record every allocation with its Python stack, the history cleared (a run's trace starts
    here; blocks allocated before keep the stacks recorded then)."""
    kwargs = dict(enabled="all", context="alloc", stacks="python", max_entries=5_000_000, clear_history=True)
    try:
        torch.cuda.memory._record_memory_history(**kwargs, skip_actions=["free_requested", "snapshot"])
    except TypeError:  # an older torch without skip_actions
        torch.cuda.memory._record_memory_history(**kwargs)


def peak_breakdown(snapshot, device: int = 0) -> tuple[int, dict]:
    """Replay one device's trace since the last start_recording(): (peak allocated bytes,
    category -> bytes live at that moment). What was allocated before the trace started is live
    from its start: the blocks active at the end that the trace never allocates (their stacks
    are in the snapshot), and the blocks the trace frees before allocating them."""
    events = snapshot["device_traces"][device]
    allocated = {e["addr"] for e in events if e["action"] == "alloc"}
    before = {b["address"]: (b["size"], b.get("frames", [])) for seg in snapshot["segments"]
              if seg.get("device", device) == device for b in seg["blocks"]
              if b["state"] == "active_allocated" and b["address"] not in allocated}
    seen = set()
    for e in events:
        if e["action"] == "alloc":
            seen.add(e["addr"])
        elif e["action"] == "free_completed" and e["addr"] not in seen and e["addr"] not in before:
            before[e["addr"]] = (e["size"], e.get("frames", []))

    def replay(stop=None):
        live = dict(before)
        now = sum(size for size, _ in live.values())
        peak, peak_at = now, -1
        for i, e in enumerate(events if stop is None else events[:stop + 1]):
            if e["action"] == "alloc":
                live[e["addr"]] = (e["size"], e.get("frames", []))
                now += e["size"]
                if now > peak:
                    peak, peak_at = now, i
            elif e["action"] == "free_completed" and e["addr"] in live:
                now -= live.pop(e["addr"])[0]
        return peak, peak_at, live

    peak, peak_at, _ = replay()
    _, _, live = replay(peak_at)
    parts = dict.fromkeys(CATEGORIES, 0)
    for size, frames in live.values():
        parts[category_of(frames)] += size
    return peak, parts


# ---- CPU: live tensor bytes ------------------------------------------------------------------------
class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of tensor storages allocated by the ops run inside (fresh results, not views or
    writes into existing memory), counted while a Python tensor refers to them: now and peak."""

    def __init__(self):
        super().__init__()
        self.live = {}  # storage address -> [bytes, tensors referring to it]
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outs = out if isinstance(out, (tuple, list)) and len(returns) > 1 else [out]
        for ret, value in zip(returns, outs):
            for t in torch.utils._pytree.tree_flatten(value)[0]:
                if isinstance(t, torch.Tensor):
                    self._track(t, fresh=ret.alias_info is None)
        return out

    def _track(self, t, fresh: bool):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        if key not in self.live:
            if not fresh:
                return  # a view of, or a write into, memory from before (weights, caches)
            self.live[key] = [storage.nbytes(), 0]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        self.live[key][1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key):
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.live[key]


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def known_tensors(streamer) -> dict:
    """Category -> bytes of the run's long-lived tensors (CPU dry mode; also pinned host memory)."""
    model = streamer.model
    params = [t for c in model.copies() for t in list(c.parameters()) + list(c.buffers())]
    placement = model.placement
    slots = [t for slot in getattr(placement, "slots", []) for t in slot]
    groups = {id(c.group): c.group for c in streamer.caches}
    rings = [t for g in groups.values() for t in g.keys + g.values + (g.key_scales or []) + (g.value_scales or [])]
    sinks = [s for r in streamer.replicas for s in r.sinks.values()]
    sink = [t for s in sinks for t in s.ref_keys + s.ref_key_scales + s.motion_keys + s.values + s.motion_key_scales
            + s.value_scales]
    text = [t for r in streamer.replicas for layer in r.text_kv for t in layer if isinstance(t, torch.Tensor)]
    pinned = [t for t in params if t.device.type == "cpu" and t.is_pinned()]
    resident = [t for t in params if not (t.device.type == "cpu" and model.device.type != "cpu")]
    host_offloaded = [t for layer in getattr(placement, "offloaded", []) for t in
                      list(model.blocks[layer].parameters()) + list(model.blocks[layer].buffers())]
    weights = _nbytes(resident) - (_nbytes(host_offloaded) if model.device.type == "cpu" else 0)
    return {"weights": weights, "offload slots": _nbytes(slots), "KV rings": _nbytes(rings), "sink": _nbytes(sink),
            "text/audio context": _nbytes(text), "pinned host": _nbytes(pinned)}


# ---- runs ------------------------------------------------------------------------------------------------
def parse_run(name: str) -> dict:
    """fp8 | bf16 [-kvbf16] [@CAP] | stepgpuN-fp8 ..."""
    base, _, cap = name.partition("@")
    run = {"name": name, "weights": "fp8" if "fp8" in base.replace("kvbf16", "") else "bf16",
           "kv_fp8": "kvbf16" not in base, "cap": float(cap) if cap else None, "copies": 1}
    if base.startswith("stepgpu"):
        run["copies"] = int(base.removeprefix("stepgpu").split("-")[0] or 2)
    return run


def build_model(run, cfg, device, tensor_for, gpus: int):
    from liveavatar.loading import build_dit
    from liveavatar.placement import Offload, StepPerGPU
    if run["copies"] > 1:
        devices = [f"cuda:{i}" for i in range(run["copies"])] if gpus >= run["copies"] else [device] * run["copies"]
        placement = StepPerGPU(devices)
    else:
        placement = Offload(device, blocks=0, num_layers=cfg.num_layers)  # the planner may offload blocks under a cap
    return build_dit(cfg, tensor_for, run["weights"], placement)


def inputs_for(size: str, cfg, clips: int, infer_frames: int, latent_scale: int = 8) -> StreamInputs:
    width, height = (int(v) for v in size.split("*"))
    h, w = height // latent_scale, width // latent_scale
    g = torch.Generator().manual_seed(1)
    return StreamInputs(text=torch.randn(20, cfg.text_dim, generator=g), ref_latent=torch.randn(16, 1, h, w, generator=g),
                        motion_latents=torch.randn(16, 19, h, w, generator=g),
                        audio=torch.randn(cfg.audio_layers, cfg.audio_dim, infer_frames * clips, generator=g))


def serial_ticks(streamer):
    """Emulating several GPUs on one: the model copies' forwards one after another (their
    activations would otherwise overlap on the one GPU)."""
    def tick(in_flight, on_step):
        groups = {}
        for job in in_flight:
            groups.setdefault(id(streamer.step_replica[job.step]), []).append(job)
        streamer.offsets.at((in_flight[-1].index + 1) * len(streamer.timesteps))
        for jobs in groups.values():
            streamer._advance(jobs)
    streamer._tick = tick


def run_one(run, size, cfg, args, model, vae=None) -> dict:
    device = model.device
    clips, infer_frames = 2, args.infer_frames
    settings = StreamSettings(infer_frames=infer_frames, steps=args.steps, seed=0, num_clip=clips,
                              kv_fp8=run["kv_fp8"], memory_cap_gib=run["cap"],
                              reserve_gib=_vae_reserve(size) if vae is not None else 0.0)
    inputs = inputs_for(size, cfg, clips, infer_frames, 8 if not args.dry else args.latent_scale)
    cuda = device.type == "cuda"
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, run["cap"] * GIB / total) if run["cap"] else 1.0)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    streamer = Streamer(model, inputs, settings)
    emulated = run["copies"] > 1 and (not cuda or torch.cuda.device_count() < run["copies"])
    if emulated:
        serial_ticks(streamer)
    plan = streamer.plan
    blocks = streamer.blocks()
    if vae is not None:
        from liveavatar.overlap import decode_alongside
        decoder = vae.stream_decoder()
        decoder.decode(inputs.motion_latents[:, :7].to(vae.device))
        blocks = decode_alongside(blocks, decoder.decode, vae.device)
    tracker = LiveBytes() if not cuda else None
    with tracker or torch.no_grad():  # CPU: the peak of what the ticks allocate
        for _ in blocks:
            pass
    known = known_tensors(streamer)
    # the refreshed sink is made during the run too: not an activation
    activations = max(0, tracker.peak - known["sink"]) if tracker is not None else 0
    row = {"run": run["name"], "size": size, "device": str(device), "plan": plan.summary(),
           "offload_blocks": plan.offload_blocks, "kv_fp8": plan.kv_fp8, "memory_cap_gib": run["cap"],
           "estimate": {d.device: d.parts for d in plan.devices}, "host_pinned": known.pop("pinned host"),
           "copied_gb_per_tick": plan.copied_per_tick / 1e9, "emulated": emulated}
    if cuda:
        torch.cuda.synchronize(device)
        row["peak_allocated"] = torch.cuda.max_memory_allocated(device)
        row["peak_reserved"] = torch.cuda.max_memory_reserved(device)
    else:
        row["measured"] = {**known, "tick activations": activations}
    streamer.close()
    row["seconds"] = time.perf_counter() - started
    return row


def _vae_reserve(size: str) -> float:
    from liveavatar.memory import vae_decode_bytes
    width, height = (int(v) for v in size.split("*"))
    return vae_decode_bytes(width, height) / GIB


def per_copy(row, run) -> None:
    """One step per GPU emulated on one: one GPU's share of the measured peak and of the
    estimate (the copies' own tensors divided evenly; the activations are one forward's)."""
    copies = run["copies"]
    if copies <= 1 or row.get("emulated") is False:
        return
    for key, out in (("measured", "per_gpu"), ("estimate", "estimate")):
        parts = row.get(key)
        if key == "estimate" and parts:
            device, parts = next(iter(parts.items()))
        if parts:
            shared = ("tick activations", "sink prefill", "caller (VAE, audio)", "allocator reserve")
            share = {k: (v if k in shared else v // copies) for k, v in parts.items()}
            row[out] = {device: share} if key == "estimate" else share


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="704*384,384*256")
    parser.add_argument("--runs", default="fp8,fp8-kvbf16,bf16,fp8@40,fp8@30,fp8@22,fp8@14,stepgpu4-fp8")
    parser.add_argument("--infer-frames", type=int, default=48)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--vae", action="store_true", help="decode every block alongside (as Live Video does)")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny model: the categories from the known tensors")
    parser.add_argument("--latent-scale", type=int, default=32, help="--dry: pixels per latent (smaller grids)")
    parser.add_argument("--out-dir", default="docs/memory")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = dry_runs(args) if args.dry else cuda_runs(args)
    (out / "memory_breakdown.json").write_text(json.dumps(rows, indent=1, default=str))
    text = markdown(rows)
    (out / "memory_breakdown.md").write_text(text)
    print(text)
    return rows


def dry_runs(args) -> list:
    from liveavatar.dit import LiveAvatarDiT
    from liveavatar.testing import tiny_dit_config
    cfg = tiny_dit_config()
    reference = LiveAvatarDiT(cfg).state_dict()
    g = torch.Generator().manual_seed(0)
    values = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in reference.items()}
    rows = []
    for size in args.sizes.split(","):
        for name in args.runs.split(","):
            run = parse_run(name)
            run["weights"] = "fp32" if run["weights"] == "bf16" else "bf16"  # CPU: fp32 / bf16 stand-ins
            model = build_model(run, cfg, "cpu", lambda n, d: (values[n].to(d), None), gpus=0)
            with torch.no_grad():
                row = run_one(run, size, cfg, args, model)
            per_copy(row, run)
            rows.append(row)
    return rows


def cuda_runs(args) -> list:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import CONFIG_14B, random_tensor_for
    from liveavatar.dit import DiTConfig
    torch.cuda.init()
    cfg = DiTConfig(**CONFIG_14B)
    vae = None
    if args.vae:
        from liveavatar.vae import VideoVAE, WanVAE
        with torch.device("cuda:0"):
            vae = WanVAE(VideoVAE(), "cuda:0", torch.bfloat16)
    rows, models = [], {}
    runs = [parse_run(name) for name in args.runs.split(",")]
    order = list(dict.fromkeys((r["weights"], r["copies"]) for r in runs))
    start_recording()  # before any model is built: the weights' blocks carry their stacks
    for run in sorted(runs, key=lambda r: order.index((r["weights"], r["copies"]))):  # one build per model
        name, key = run["name"], (run["weights"], run["copies"])
        if key not in models:
            models.clear()
            gc.collect()
            torch.cuda.empty_cache()
            models[key] = build_model(run, cfg, "cuda:0", random_tensor_for(cfg), torch.cuda.device_count())
        for size in args.sizes.split(","):
            try:
                gc.collect()
                torch.cuda.empty_cache()
                start_recording()
                with torch.no_grad():
                    row = run_one(run, size, cfg, args, models[key], vae)
                peak, parts = peak_breakdown(torch.cuda.memory._snapshot())
                row["trace_peak"] = peak
                row["measured"] = parts
            except Exception as error:  # an OOM or a plan error must not lose the other rows
                row = {"run": name, "size": size, "error": f"{type(error).__name__}: {error}"}
            per_copy(row, run)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("estimate", "measured")}, default=str),
                  flush=True)
            torch.cuda.set_per_process_memory_fraction(1.0)
            gc.collect()
            torch.cuda.empty_cache()
    torch.cuda.memory._record_memory_history(enabled=None)
    return rows


def markdown(rows) -> str:
    """One table per size: measured GiB at the peak by category (estimate in brackets)."""
    lines = []
    for size in dict.fromkeys(r["size"] for r in rows):
        group = [r for r in rows if r["size"] == size]
        lines += [f"\n### {size}\n", "| part | " + " | ".join(r["run"] for r in group) + " |",
                  "|---" * (len(group) + 1) + "|"]
        for category in CATEGORIES + ["caller (VAE, audio)", "allocator reserve"]:
            cells, any_value = [], False
            for r in group:
                measured = (r.get("per_gpu") or r.get("measured") or {}).get(category)
                estimate = next(iter(r.get("estimate", {}).values()), {}).get(category)
                any_value |= bool(measured or estimate)
                cells.append(f"{_gib(measured)} ({_gib(estimate)})" if estimate is not None else _gib(measured))
            if any_value:
                lines.append(f"| {category} | " + " | ".join(cells) + " |")
        lines.append("| **peak allocated** | " + " | ".join(
            f"**{_gib(r.get('peak_allocated'))}**" if "error" not in r else r["error"][:60] for r in group) + " |")
        lines.append("| estimate total | " + " | ".join(
            _gib(sum(next(iter(r["estimate"].values())).values())) if "estimate" in r else "-" for r in group) + " |")
        lines.append("| pinned host | " + " | ".join(_gib(r.get("host_pinned")) for r in group) + " |")
        lines.append("| plan | " + " | ".join(r.get("plan", "-").split("; peak")[0] for r in group) + " |")
    return "\n".join(lines) + "\n"


def _gib(value) -> str:
    if value is None:
        return "-"
    return f"{value / GIB:.2f}" if value >= GIB // 100 else f"{value / 2 ** 20:.2f} MiB"


if __name__ == "__main__":
    main()
