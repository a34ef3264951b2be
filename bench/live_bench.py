"""The nodes as a graph calls them, at full size (14B, random weights), on the GPU.

Loader -> Audio Encode -> Live Video (or Sampler -> Decode), outside ComfyUI through the
pack's standalone fallbacks, with a random 14B checkpoint in ComfyUI's fp8_scaled layout
written once to --models (bf16 rows load the same file upcast). Per case it reports:

- steady_fps: frames after the first block / seconds after the first frame (what the viewer
  of the live player sees), ttff_s: node start -> the first block handed to the player;
- peak_gib (max allocated) and peak_reserved_gib, under memory_cap_gib when the case sets one
  (the loader's cap, and the same cap on PyTorch's allocator so a miss cannot hide);
- for offload cases: copied_gb_per_tick (the offloaded blocks cross the bus once per tick)
  and the FPS the bus allows at 25 and 50 GB/s, capped by the same-size compute-bound FPS
  measured in this run (modelled_fps_25gbps / modelled_fps_50gbps).

    python bench/live_bench.py --models /tmp/la_models --out $OUT/live.json \
        --cases live-fp8-704,live-fp8-384 [--ttff-cold live-fp8-384]

A case name is live[-sd]-<weights>-<size>[-s<steps>][-cap<GiB>][-off<blocks>][-stepgpu][-nok][-gather][-deq][-nog][-warm]:
`-sd` runs Sampler -> Decode instead of Live Video; `-nok`, `-gather`, `-deq`, `-nog` set the loader's kernels off,
attention gather, fp8_compute dequantize, cuda_graphs off (otherwise auto); `-warm` sets the loader's warm_up to the case's
size (otherwise off: the loader time then holds no warm-up); `-again` reports the second run of the same Live
Video node object with a new seed (the node keeps its portrait's encoding: a user's next run), the first
run's TTFF as ttff_first_run_s. The first Live Video call of a process also pays
what a first run after ComfyUI starts pays; --ttff-cold CASE runs CASE again in a fresh
process (compile caches on disk present) and reports ttff_cold_s.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from host_spans import HostSpans

REPO = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
CHECKPOINT = "liveavatar_bench_14B_fp8_scaled.safetensors"
CONFIG_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_dim=4096, text_len=512, audio_dim=1024)
SIZES = {"384": "384*256", "704": "704*384"}
SPEECH_S = 8.0  # 199 video frames at 25 fps
INFER_FRAMES = 48


def import_pack():
    spec = importlib.util.spec_from_file_location("liveavatar_pack", REPO / "__init__.py")
    pack = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    return pack


# ---- inputs ---------------------------------------------------------------------------------
def write_checkpoint(path: Path, pack, config: dict, device: str):
    """Random DiT in ComfyUI's fp8_scaled layout: block/injector Linear weights fp8 e4m3 with a
    per-tensor scale_weight, the rest bf16. Drawn on `device`, saved from the CPU."""
    from safetensors.torch import save_file
    la = pack.liveavatar
    cfg = la.dit.DiTConfig(**config)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.device("meta"):
        model = la.dit.LiveAvatarDiT(cfg)
    out = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for name, meta in model.state_dict().items():
        module_name = name.rpartition(".")[0]
        shape = tuple(meta.shape)
        if len(shape) >= 2:
            t = torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16) / math.prod(shape[1:]) ** 0.5
        elif "norm" in name:
            t = torch.ones(shape, device=device, dtype=torch.bfloat16)
        else:
            t = torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16) * 0.02
        if la.loading._fp8_eligible(module_name, model.get_submodule(module_name), name.rpartition(".")[2]):
            t, scale = la.loading.quantize_fp8(t)
            out[module_name + ".scale_weight"] = scale.float().cpu()
        out[name] = t.cpu()
    meta = {f: getattr(cfg, f) for f in ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "text_len",
                                         "audio_dim", "num_audio_token", "cond_dim", "in_dim", "out_dim", "freq_dim")}
    meta["audio_inject_layers"] = list(cfg.audio_inject_layers)
    save_file(out, str(path), metadata={"config": json.dumps(meta)})


def graph_inputs(pack, device, tiny: bool, seconds: float):
    """What the graph's other nodes would hand over: a real-size random wav2vec2 and Wan2.1 VAE
    (engine objects, which the nodes accept as the core loaders' outputs), the prompt's
    CONDITIONING, a 512x512 portrait IMAGE and 8 s of AUDIO. `tiny`: the test-size models."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    la = pack.liveavatar
    torch.manual_seed(0)
    config = la.testing.WAV2VEC2_TINY if tiny else dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
    half = torch.float16 if device == "cuda" else torch.float32
    wav2vec = la.audio.Wav2Vec2Encoder(Wav2Vec2Model(Wav2Vec2Config(**config)), device, half)
    with torch.device(device):
        vae = la.vae.WanVAE(la.vae.VideoVAE(dim=4 if tiny else 96), device, torch.bfloat16 if device == "cuda" else torch.float32)
    cond = torch.zeros(1, 512, 4096)
    cond[0, :20] = torch.randn(20, 4096) * 0.2
    mask = torch.zeros(1, 512, dtype=torch.long)
    mask[0, :20] = 1
    rate = 16000
    t = torch.arange(int(seconds * rate)) / rate
    wave = 0.2 * torch.sin(2 * math.pi * 140 * t) * (torch.sin(2 * math.pi * 3.5 * t).clamp(min=0) ** 0.5)
    return dict(wav2vec=wav2vec, vae=vae, positive=[[cond, {"attention_mask": mask}]],
                image=torch.rand(1, 512, 512, 3), audio={"waveform": wave[None, None], "sample_rate": rate})


# ---- cases ----------------------------------------------------------------------------------
def parse_case(name: str) -> dict:
    m = re.fullmatch(r"live(-sd)?-(fp8|bf16)-(384|704)(?:-s(\d))?(?:-cap(\d+(?:\.\d+)?))?(?:-off(\d+))?(-stepgpu)?"
                     r"(-nok)?(-gather)?(-deq)?(-nog)?(-warm)?(-again)?", name)
    if not m:
        raise SystemExit(f"bad case name {name!r} (see the module docstring)")
    sd, weights, size, steps, cap, off, stepgpu, nok, gather, deq, nog, warm, again = m.groups()
    if sd and again:
        raise SystemExit(f"{name}: -again times the Live Video node's next run (not Sampler -> Decode)")
    placement = "one denoising step per GPU" if stepgpu else ("offload blocks to CPU" if off else "one GPU")
    return dict(mode=name, graph="sampler+decode" if sd else "live video", weight_dtype="fp8_e4m3fn" if weights == "fp8" else "bf16",
                size=SIZES[size], steps=int(steps or 4), memory_cap_gib=float(cap) if cap else 0.0,
                offload_blocks=int(off or 0), placement=placement, warm_up=SIZES[size] if warm else "off",
                kernels="off" if nok else "auto", attention="gather" if gather else "auto",
                fp8_compute="dequantize" if deq else "auto", cuda_graphs="off" if nog else "auto", again=bool(again))


def call(node, function: str, instance=None, **values):
    """A node's FUNCTION with the inputs its INPUT_TYPES declares (others dropped), as ComfyUI
    passes them; declared inputs missing here get their defaults. `instance`: the node object
    to call (ComfyUI keeps one per graph node between runs); a new one otherwise."""
    declared = node.INPUT_TYPES()
    specs = {**declared.get("required", {}), **declared.get("optional", {})}
    kwargs = {k: v for k, v in values.items() if k in specs}
    for key, spec in declared.get("required", {}).items():
        if key not in kwargs and len(spec) > 1 and "default" in spec[1]:
            kwargs[key] = spec[1]["default"]
    out = getattr(instance or node(), function)(**kwargs)
    return out["result"] if isinstance(out, dict) else out  # nodes that also show text return {"ui", "result"}


class BlockClock:
    """Times the blocks handed to the player: wraps the websocket sender of the Live Video node
    (standalone it sends nothing) and records (time, frames) of every block message."""

    def __init__(self, host):
        self.host, self.marks, self.original = host, [], host.send_to_browser
        self.on_mark = lambda count: None

    def __enter__(self):
        def record(event, data):
            # block messages only: the node's first "running" message (no frames yet) is not a frame
            done = self.marks[-1][1] if self.marks else 0
            if data.get("status", "running") == "running" and data.get("frames", 0) > done:
                self.marks.append((time.perf_counter(), data["frames"]))
                self.on_mark(len(self.marks))
            self.original(event, data)
        self.host.send_to_browser = record
        return self

    def __exit__(self, *exc):
        self.host.send_to_browser = self.original


class ProfileWindow:
    """A torch.profiler trace of `blocks` steady blocks of the node (from its `first`-th block
    message to `blocks` messages later): where the GPU idles and what the host does meanwhile,
    written as a Chrome trace, its GPU summary (trace_summary.py) and the host's top ops."""

    def __init__(self, clock: "BlockClock", out_dir: Path, name: str, first: int = 5, blocks: int = 3):
        self.clock, self.out_dir, self.name, self.first, self.blocks = clock, out_dir, name, first, blocks
        self.prof = None
        out_dir.mkdir(parents=True, exist_ok=True)
        original = clock.on_mark
        clock.on_mark = lambda count: (original(count), self.at(count))

    def at(self, count: int):
        from torch.profiler import ProfilerActivity
        if count == self.first:
            self.prof = torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.start()
        elif count == self.first + self.blocks:
            self.close()

    def close(self):
        if self.prof is not None:
            Gpu.sync()
            self.prof.stop()
            self.write()
            self.prof = None

    def write(self):
        sys.path.insert(0, str(REPO / "bench"))
        from trace_summary import load, summarize
        trace = self.out_dir / f"trace_{self.name}.json.gz"
        self.prof.export_chrome_trace(str(trace))
        text = summarize(load(str(trace)), label=self.name, per=self.blocks, per_name="block")
        host_ops = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        (self.out_dir / f"profile_{self.name}.md").write_text(text + "\n```\n" + host_ops + "\n```\n")
        print(text, host_ops, sep="\n", flush=True)


class Gpu:
    """Memory stats and syncs on CUDA; nothing on the CPU (--tiny smoke runs)."""

    on = torch.cuda.is_available()

    @classmethod
    def start(cls, cap_gib: float):
        gc.collect()
        if cls.on:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total) if cap_gib else 1.0)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    @classmethod
    def sync(cls):
        if cls.on:
            torch.cuda.synchronize()

    @classmethod
    def peaks(cls) -> dict:
        if not cls.on:
            return dict(peak_gib=0.0, peak_reserved_gib=0.0)
        # allocator: "native" or "cudaMallocAsync" (ComfyUI's default; PYTORCH_CUDA_ALLOC_CONF picks it)
        return dict(peak_gib=torch.cuda.max_memory_allocated() / GIB, peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
                    allocator=torch.cuda.get_allocator_backend())


class Phases:
    """Where the time to the first frame goes, in the Live Video node: the GPU is synchronised at
    each mark (phases only: the mark itself costs a little overlap). Wraps, where the node module
    has them, its portrait encode and its Streamer (setup, first clean block)."""

    def __init__(self, live_module):
        self.module, self.marks, self.saved = live_module, {}, {}

    def mark(self, name):
        Gpu.sync()
        self.marks.setdefault(name, time.perf_counter())

    def __enter__(self):
        phases = self
        encode = getattr(self.module, "encode_portrait", None)
        streamer = getattr(self.module, "Streamer", None)
        if encode is not None:
            def timed_encode(*args, **kwargs):
                out = encode(*args, **kwargs)
                phases.mark("portrait_encoded")
                return out
            self.saved["encode_portrait"] = encode
            self.module.encode_portrait = timed_encode
        if streamer is not None:
            class TimedStreamer(streamer):
                def __init__(self, *args, **kwargs):
                    super().__init__(*args, **kwargs)
                    phases.mark("streamer_ready")

                def blocks(self, *args, **kwargs):
                    for block in super().blocks(*args, **kwargs):
                        phases.mark("first_block_clean")
                        yield block
            self.saved["Streamer"] = streamer
            self.module.Streamer = TimedStreamer
        return self

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            setattr(self.module, name, value)

    def relative(self, start: float) -> dict:
        return {f"{k}_s": v - start for k, v in self.marks.items()}


def run_case(pack, case: dict, inputs: dict, model_name: str, phases: bool = False,
             profile_dir: Path | None = None, spans: bool = False) -> dict:
    nodes, host = pack.nodes, pack.nodes.host
    cap = case["memory_cap_gib"]
    Gpu.start(cap)
    start = time.perf_counter()
    (model,) = call(nodes.loader.LiveAvatarModelLoader, "load", model_name=model_name, lora_name="None",
                    lora_strength=1.0, weight_dtype=case["weight_dtype"], placement=case["placement"],
                    offload_blocks=case["offload_blocks"], kv_cache="auto", memory_cap_gib=cap,
                    warm_up=case["warm_up"], kernels=case["kernels"], attention=case["attention"],
                    fp8_compute=case["fp8_compute"], cuda_graphs=case["cuda_graphs"])
    load_s = time.perf_counter() - start
    features, _, frames = call(nodes.audio.LiveAvatarAudioEncode, "encode", audio=inputs["audio"],
                               audio_encoder=inputs["wav2vec"], infer_frames=INFER_FRAMES)
    common = dict(model=model, positive=inputs["positive"], image=inputs["image"], vae=inputs["vae"],
                  audio_features=features, size=case["size"], infer_frames=INFER_FRAMES, num_clip=0,
                  sample_steps=case["steps"], seed=42, audio=inputs["audio"], return_frames=False)
    timeline, node = {}, nodes.live.LiveAvatarLiveVideo()
    if case["again"]:  # the row is the next run of the same node (its portrait encoding kept), as a user's again
        Gpu.sync()
        first_start = time.perf_counter()
        with BlockClock(host) as clock:
            call(nodes.live.LiveAvatarLiveVideo, "generate", instance=node, filename_prefix="bench/live", **common)
        timeline["ttff_first_run_s"] = clock.marks[0][0] - first_start
        common["seed"] += 1  # a new seed: ComfyUI would not run an unchanged graph again
    Gpu.sync()
    node_start = time.perf_counter()
    if case["graph"] == "live video":
        host_spans = HostSpans(pack)
        with BlockClock(host) as clock, (Phases(nodes.stream_run) if phases else contextlib.nullcontext()) as phase, \
                (host_spans if spans else contextlib.nullcontext()):
            window = ProfileWindow(clock, profile_dir, case["mode"]) if profile_dir is not None else None
            call(nodes.live.LiveAvatarLiveVideo, "generate", instance=node, filename_prefix="bench/live", **common)
            if window is not None:
                window.close()  # a run shorter than the window: what was traced
        marks = clock.marks
        timeline.update(phase.relative(node_start) if phases else {})
        if spans:  # after the first block (the steady run)
            timeline["spans"] = host_spans.summary(marks[0][0])
    else:  # Sampler -> Decode: blocks reach the viewer only when the decode node writes them
        (latents,) = call(nodes.sampler.LiveAvatarSampler, "sample", **common)
        sampled = time.perf_counter()
        call(nodes.decode.LiveAvatarDecode, "decode", latents=latents, vae=inputs["vae"], save_mp4=True,
             filename_prefix="bench/sd", audio=inputs["audio"], return_frames=False)
        marks = [(sampled, 0), (time.perf_counter(), frames)]
    Gpu.sync()
    wall = time.perf_counter() - node_start
    first_t, first_frames = marks[0]
    last_t, last_frames = marks[-1]
    row = dict(case, gpus=torch.cuda.device_count() if "step per GPU" in case["placement"] else 1,
               frames=frames, ttff_s=first_t - node_start, wall_s=wall, load_s=load_s,
               steady_fps=(last_frames - first_frames) / max(last_t - first_t, 1e-9), **Gpu.peaks(), **timeline)
    row.update(offload_traffic(model, case))
    del model
    return row


def offload_traffic(model, case) -> dict:
    """Bytes of the offloaded blocks (each crosses the bus once per tick)."""
    placement = getattr(model.dit, "placement", None)
    offloaded = getattr(placement, "offloaded", None)
    if not offloaded:
        return {}
    per_tick = sum(t.numel() * t.element_size() for layer in offloaded for t in placement._tensors(layer))
    return dict(offloaded_blocks=len(offloaded), copied_gb_per_tick=per_tick / 1e9)


def add_models(rows):
    """FPS the host link allows for offload rows: one block (12 frames) per tick, the tick at
    least as long as its copies and as its compute (the same size without offload, this run)."""
    compute = {(r["size"], r["weight_dtype"], r["steps"]): r["steady_fps"] for r in rows if "steady_fps" in r
               and "copied_gb_per_tick" not in r and r["placement"] == "one GPU"}
    for r in rows:
        if "copied_gb_per_tick" in r:
            bound = compute.get((r["size"], r["weight_dtype"], r["steps"]), r["steady_fps"])
            for gbps in (25, 50):
                r[f"modelled_fps_{gbps}gbps"] = min(bound, 12 / (r["copied_gb_per_tick"] / gbps))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="/tmp/la_models")
    parser.add_argument("--cases", default="live-fp8-384,live-fp8-704")
    parser.add_argument("--ttff-cold", default="", help="a case to run again in a fresh process")
    parser.add_argument("--out", default="live_rows.json")
    parser.add_argument("--command", default=command_line(), help="recorded in every row")
    parser.add_argument("--phases", default="", help="cases to run again with the time to the first frame split "
                        "into phases (synchronised marks; separate rows, mode + '-phases')")
    parser.add_argument("--profile", default="", help="cases to run again under torch.profiler over 3 steady blocks "
                        "(separate rows, mode + '-profiled'; trace and summary in --profile-dir)")
    parser.add_argument("--profile-dir", default=".")
    parser.add_argument("--seconds", type=float, default=SPEECH_S, help="speech length")
    parser.add_argument("--tiny", action="store_true", help="test-size models on the CPU: a smoke run of this script")
    parser.add_argument("--spans", action="store_true", help="time the generation thread's work (ticks by size, "
                        "frames out; bench/host_spans.py) into each Live Video row's 'spans'")
    args = parser.parse_args()
    models = Path(args.models)
    os.environ["LIVEAVATAR_MODELS"] = str(models)
    os.environ.setdefault("LIVEAVATAR_OUTPUT", str(models.parent / "la_output"))
    pack = import_pack()
    for module in ("testing", "audio", "vae", "dit", "loading"):
        importlib.import_module(f"{pack.__name__}.liveavatar.{module}")
    device = "cuda" if Gpu.on else "cpu"
    config = {f: getattr(pack.liveavatar.testing.tiny_dit_config(), f) for f in CONFIG_14B} if args.tiny else CONFIG_14B
    if args.tiny:
        config.update(audio_layers=4, audio_inject_layers=(0, 2))
    checkpoint = models / "diffusion_models" / CHECKPOINT
    if not checkpoint.exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        write_checkpoint(checkpoint, pack, config, device)
        print(f"wrote {checkpoint} ({checkpoint.stat().st_size / 1e9:.1f} GB) in {time.perf_counter() - started:.0f} s", flush=True)
    inputs = graph_inputs(pack, device, args.tiny, args.seconds)
    rows = []
    runs = [(name, False) for name in filter(None, args.cases.split(","))]
    runs += [(name, "phases") for name in filter(None, args.phases.split(","))]
    runs += [(name, "profiled") for name in filter(None, args.profile.split(","))]
    for name, extra in runs:
        case = parse_case(name)
        if extra:
            case["mode"] += f"-{extra}"
        add_row(rows, case, args, lambda: run_case(pack, case, inputs, CHECKPOINT, phases=extra == "phases",
                                                   profile_dir=Path(args.profile_dir) if extra == "profiled" else None,
                                                   spans=args.spans and not extra))
    if args.ttff_cold:
        cold = Path(args.out).with_suffix(".cold.json")
        subprocess.run([sys.executable, __file__, "--models", str(models), "--cases", args.ttff_cold,
                        "--out", str(cold), "--command", args.command, "--seconds", str(args.seconds)]
                       + ["--tiny"] * args.tiny, check=False)
        for row in json.loads(cold.read_text()) if cold.exists() else []:
            rows.append(dict(row, mode=row["mode"] + "-cold", ttff_cold_s=row.get("ttff_s")))
    add_models(rows)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print_table(rows, ["steady FPS", "TTFF s", "peak GiB", "cap GiB", "GB/tick", "FPS@25GB/s", "FPS@50GB/s"], lambda r: [
        f"{r['steady_fps']:.1f}", f"{r['ttff_s']:.2f}", f"{r['peak_gib']:.1f}", r["memory_cap_gib"] or "-",
        f"{r.get('copied_gb_per_tick', 0):.1f}", f"{r.get('modelled_fps_25gbps', 0):.1f}",
        f"{r.get('modelled_fps_50gbps', 0):.1f}"])


def command_line() -> str:
    """This process's command as a row records it, with the allocator setting it ran under."""
    allocator = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    return (f"PYTORCH_CUDA_ALLOC_CONF={allocator} " if allocator else "") + "python " + " ".join(sys.argv)


def add_row(rows: list, case: dict, args, measure):
    """One case's row (or its error: one failing case must not lose the others), printed and
    written to args.out with the rows so far."""
    try:
        row = measure()
    except Exception as error:
        ours = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_tb(error.__traceback__)
                if str(REPO) in f.filename]
        row = dict(case, error=f"{type(error).__name__}: {error}"[:500], error_at=" <- ".join(reversed(ours[-4:])))
    row["command"] = args.command
    rows.append(row)
    print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


def print_table(rows: list, columns: list, cells):
    """The rows as a Markdown table: the case, then `cells(row)` under `columns`."""
    print("\n| case | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | error: {r['error'][:80]} |")
        else:
            print(f"| {r['mode']} | " + " | ".join(map(str, cells(r))) + " |")


if __name__ == "__main__":
    main()
