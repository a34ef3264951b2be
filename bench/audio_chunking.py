"""Chunked and streaming wav2vec2 features against the one-pass features: error, memory, and what
the error does to the DiT's clean latents.

Writes a JSON of rows and prints markdown tables (docs/audio.md holds the CPU run's):
- chunked (encode_audio, windows of W s with C s of context each side) vs one pass;
- streaming (StreamingAudioEncoder, left context x lookahead; normalisation running / window /
  whole-clip statistics; the original's 30 Hz grid (total length given) or the live one);
- peak memory vs length, one pass vs chunked, each in a fresh subprocess (RSS growth, and the
  longest input wav2vec2 was given);
- the tiny DiT's clean latents on one-pass vs chunked vs streamed features (tiny models only).

Relative L2 = |a - b| / |b| over all layers and the video frames carrying speech.

    python bench/audio_chunking.py                                 # tiny fixture encoder, CPU
    python bench/audio_chunking.py --encoder /models/wav2vec2-large-xlsr-53-english \\
        --audio speech.wav --device cuda --skip downstream --out bench_audio.json
    (on CUDA the memory rows are peak torch.cuda memory of encode_audio on the speech tiled)
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from liveavatar import audio as A  # noqa: E402
from liveavatar import audio_stream as S  # noqa: E402
from liveavatar.testing import speech_like  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "reference"
INFER_FRAMES = 48


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def fixture_encoder(device="cpu", dtype=torch.float32) -> A.Wav2Vec2Encoder:
    from safetensors.torch import load_file
    config = json.loads((FIXTURE / "audio.json").read_text())["config"]
    weights = {k[8:]: v for k, v in load_file(str(FIXTURE / "audio.safetensors")).items() if k.startswith("weights.")}
    return A.Wav2Vec2Encoder.from_state_dict(weights, config, device, dtype)


def fixture_wave() -> torch.Tensor:
    from safetensors.torch import load_file
    return load_file(str(FIXTURE / "audio.safetensors"))["inputs.waveform_16k"]


def espeak(seconds: float, seed: int = 0) -> torch.Tensor | None:
    """Synthetic speech from espeak-ng (if installed): random sentences, 16 kHz."""
    if shutil.which("espeak-ng") is None:
        return None
    import librosa
    rng = np.random.default_rng(seed)
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly box jackdaws near the old "
             "river and every morning people walk to work talking about weather music science and history").split()
    text = " ".join(" ".join(rng.choice(words, rng.integers(4, 14))).capitalize() + rng.choice([".", "?", ",", "!"])
                    for _ in range(int(seconds) // 2 + 5))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-s", "160", "-w", str(path), text], check=True, capture_output=True)
        wave, _ = librosa.load(str(path), sr=A.SAMPLE_RATE)
    wave = np.tile(wave, int(np.ceil(seconds * A.SAMPLE_RATE / wave.size)))[:int(seconds * A.SAMPLE_RATE)]
    return torch.from_numpy(np.ascontiguousarray(wave))


def speech(seconds: float) -> tuple[str, torch.Tensor]:
    wave = espeak(seconds)
    if wave is not None:
        return f"espeak {seconds:.0f} s", wave
    return f"speech-like {seconds:.0f} s", torch.from_numpy(speech_like(seconds))


def signals(args) -> tuple[dict, dict]:
    """({name: wave} for the chunked table, the same for the streaming table)."""
    if args.audio:
        wave = A.load_audio(args.audio)
        named = {f"{Path(args.audio).name} {wave.numel() / A.SAMPLE_RATE:.0f} s": wave}
        return named, named
    fixture = {"fixture 3.1 s": fixture_wave()}
    return {**fixture, **dict([speech(args.chunk_seconds)])}, {**fixture, **dict([speech(args.stream_seconds)])}


def attention_reach(encoder, wave, seconds=(0.5, 1.0, 2.0, 4.0)) -> list[dict]:
    """Per transformer layer, the share of attention mass on keys farther than each of
    `seconds` from the query (eager attention, one pass over `wave`): how much context a
    window must hold. Uniform attention over T frames puts ~(1 - d/T)^2 beyond distance d."""
    model = encoder.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        normalised = A.normalise(wave).to(encoder.device, encoder.dtype)
        with torch.no_grad():
            attentions = model(normalised[None], output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    rows = []
    for layer, probs in enumerate(attentions):  # [1, heads, T, T]
        t = probs.shape[-1]
        distance = (torch.arange(t)[:, None] - torch.arange(t)[None]).abs().to(probs.device)
        mass = probs[0].float().mean(0)  # averaged over heads: [T, T], rows sum to 1
        rows.append(dict(kind="attention reach", layer=layer, frames=t,
                         beyond={str(s): float(mass[distance > s * A.FEATURE_RATE].sum() / t) for s in seconds}))
        print(f"  attention layer {layer}: " + ", ".join(f">{s}s {v:.2f}" for s, v in rows[-1]["beyond"].items()),
              flush=True)
    return rows


def one_pass(encoder, wave):
    features = A.encode_audio(encoder, wave, window_s=None)
    per_frame, covered = features.per_frame(INFER_FRAMES)
    return features, per_frame[..., :covered]


def streamed(encoder, wave, chunk=1600, **options) -> torch.Tensor:
    stream = S.StreamingAudioEncoder(encoder, **options)
    blocks = []
    for start in range(0, wave.numel(), chunk):
        blocks += stream.feed(wave[start:start + chunk])
    blocks += stream.flush()
    return torch.cat(blocks, dim=-1)[..., :stream.speech_frames]


def chunked_rows(encoder, name, wave, reference, windows, contexts):
    rows = []
    duration = wave.numel() / A.SAMPLE_RATE
    for window in windows:
        if window >= duration:
            continue
        for context in contexts:
            features = A.encode_audio(encoder, wave, window_s=window, context_s=context)
            per_frame, covered = features.per_frame(INFER_FRAMES)
            rows.append(dict(kind="chunked", signal=name, window_s=window, context_s=context,
                             rel_l2=rel_l2(per_frame[..., :covered], reference),
                             rel_l2_by_layer=[rel_l2(a, b) for a, b in zip(per_frame[..., :covered], reference)]))
            print(f"  chunked {name} W={window} C={context}: {rows[-1]['rel_l2']:.2e}", flush=True)
    return rows


def stream_rows(encoder, name, wave, reference, lefts, lookaheads, default_left, default_lookahead, grid=True):
    rows = []
    clip_stats = A.normalisation_stats(wave)

    def row(**options):
        grid = "clip" if options.get("total_samples") else "live"
        norm = options.get("normalisation", "running")
        norm = "clip stats" if isinstance(norm, A.NormStats) else norm
        start = time.perf_counter()
        features = streamed(encoder, wave, **options)
        per_block = (time.perf_counter() - start) / (features.shape[-1] / S.BLOCK_FRAMES)
        rows.append(dict(kind="stream", signal=name, left_s=options["left_context_s"],
                         lookahead_s=options["lookahead_s"], normalisation=norm, grid=grid,
                         rel_l2=rel_l2(features, reference), seconds_per_block=per_block,
                         rel_l2_by_layer=[rel_l2(a, b) for a, b in zip(features, reference)]))
        print(f"  stream {name} L={options['left_context_s']} la={options['lookahead_s']} {norm} {grid}: "
              f"{rows[-1]['rel_l2']:.2e} ({per_block * 1000:.0f} ms/block)", flush=True)

    for left in lefts if grid else []:  # context alone: the original's grid and normalisation
        for lookahead in lookaheads:
            row(left_context_s=left, lookahead_s=lookahead, normalisation=clip_stats, total_samples=wave.numel())
    for norm in ("running", "window", clip_stats):  # normalisation and grid at the defaults
        for total in (wave.numel(), None):
            row(left_context_s=default_left, lookahead_s=default_lookahead, normalisation=norm, total_samples=total)
    # the live grid alone: one-pass hidden states resampled on the 5/3 grid
    hidden = encoder.hidden_states(wave)
    t30 = A.count_30hz(hidden.shape[1])
    live = A.lerp_frames(hidden, np.arange(t30) * A.NATURAL_STEP, 0, hidden.shape[1] - 1)
    per_frame, covered = A.per_frame_features(live, INFER_FRAMES)
    rows.append(dict(kind="grid only", signal=name, rel_l2=rel_l2(per_frame[..., :covered], reference)))
    print(f"  live grid alone {name}: {rows[-1]['rel_l2']:.2e}", flush=True)
    return rows


# ---- memory -------------------------------------------------------------------------------------
MEMORY_CHILD = r"""
import json, sys, numpy as np, torch
sys.path.insert(0, {repo!r}); sys.path.insert(0, {bench!r})
import audio_chunking as B
from liveavatar import audio as A
torch.set_num_threads(1)
encoder = B.fixture_encoder()
wave = torch.from_numpy(np.load({wave!r}, mmap_mode="r")[:int({seconds} * 16000)].copy())
longest = []
encoder.model.register_forward_pre_hook(lambda module, args: longest.append(args[0].shape[-1]))
A.encode_audio(encoder, wave[:16000 * 2], window_s=None)  # warm-up: libraries, allocator
longest.clear()
before = B.rss_kib("VmRSS")
B.reset_peak_rss()
features = A.encode_audio(encoder, wave, window_s={window})
print(json.dumps(dict(peak_growth_mib=(B.rss_kib("VmHWM") - before) / 1024, longest_input_s=max(longest) / 16000,
                      output_mib=features.features_30hz.numel() * 4 / 2 ** 20)))
"""


def rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset_peak_rss) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss():
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def memory_rows(lengths, window):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        wave_file = str(Path(tmp) / "speech.npy")
        np.save(wave_file, speech(max(lengths))[1].numpy())
        for seconds in lengths:
            for mode, w in (("one pass", None), ("chunked", window)):
                code = MEMORY_CHILD.format(repo=str(REPO), bench=str(Path(__file__).parent), seconds=seconds,
                                           window=w, wave=wave_file)
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
                if out.returncode:
                    print(out.stderr[-2000:])
                    continue
                row = dict(kind="memory", mode=mode, seconds=seconds, **json.loads(out.stdout.strip().splitlines()[-1]))
                rows.append(row)
                print(f"  memory {mode} {seconds:.0f} s: peak +{row['peak_growth_mib']:.0f} MiB, longest input "
                      f"{row['longest_input_s']:.1f} s, output {row['output_mib']:.1f} MiB", flush=True)
    return rows


def gpu_memory_rows(encoder, wave, lengths, window):
    """Peak CUDA memory of encode_audio, one pass vs chunked, on `wave` tiled to each length."""
    rows = []
    for seconds in lengths:
        tiled = wave.repeat(int(np.ceil(seconds * A.SAMPLE_RATE / wave.numel())))[:int(seconds * A.SAMPLE_RATE)]
        for mode, w in (("one pass", None), ("chunked", window)):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            try:
                A.encode_audio(encoder, tiled, window_s=w)
                peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            except torch.OutOfMemoryError:
                peak = float("inf")
            torch.cuda.empty_cache()
            rows.append(dict(kind="memory", mode=mode, seconds=seconds, peak_growth_mib=peak, longest_input_s=0.0,
                             output_mib=0.0, device="cuda"))
            print(f"  cuda memory {mode} {seconds:.0f} s: peak +{peak:.0f} MiB", flush=True)
    return rows


# ---- downstream -----------------------------------------------------------------------------------
def downstream_rows(encoder, wave, variants: dict) -> list[dict]:
    """Clean latents of the tiny DiT (3 clips of 48 frames) on one-pass features vs each variant."""
    from liveavatar.loading import load_dit
    from liveavatar.sampler import StreamInputs, StreamSettings, stream
    from liveavatar.testing import tiny_dit_config, write_tiny_dit

    cfg = tiny_dit_config()
    g = torch.Generator().manual_seed(0)
    text = torch.randn(12, cfg.text_dim, generator=g)
    ref, motion = torch.randn(16, 1, 8, 12, generator=g), torch.randn(16, 19, 8, 12, generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        dit = load_dit(write_tiny_dit(Path(tmp) / "dit.safetensors"), storage="fp32")

    def latents(per_frame):
        settings = StreamSettings(infer_frames=INFER_FRAMES, num_clip=3, steps=4, seed=0)
        blocks = stream(dit, StreamInputs(text, ref, motion, per_frame), settings)
        return torch.cat([b.latents.float() for b in blocks], dim=1)

    reference_features = one_pass(encoder, wave)[0].per_frame(INFER_FRAMES)[0]
    frames = reference_features.shape[-1]
    reference = latents(reference_features)
    rows = []
    for name, features in variants.items():
        features = torch.nn.functional.pad(features, (0, max(0, frames - features.shape[-1])))[..., :frames]
        rows.append(dict(kind="downstream", variant=name, features_rel_l2=rel_l2(features, reference_features),
                         latents_rel_l2=rel_l2(latents(features), reference)))
        print(f"  downstream {name}: features {rows[-1]['features_rel_l2']:.2e} -> latents "
              f"{rows[-1]['latents_rel_l2']:.2e}", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as the tables of docs/audio.md."""
    out = []
    chunked = [r for r in rows if r["kind"] == "chunked"]
    for signal in dict.fromkeys(r["signal"] for r in chunked):
        mine = [r for r in chunked if r["signal"] == signal]
        contexts = sorted({r["context_s"] for r in mine})
        out += [f"chunked vs one pass, {signal} (rel L2; rows: window W s, columns: context C s each side)", "",
                "| W \\ C | " + " | ".join(f"{c:g}" for c in contexts) + " |",
                "|---" * (len(contexts) + 1) + "|"]
        for w in sorted({r["window_s"] for r in mine}):
            cells = {r["context_s"]: r["rel_l2"] for r in mine if r["window_s"] == w}
            out.append(f"| {w:g} | " + " | ".join(f"{cells[c]:.1e}" if c in cells else "" for c in contexts) + " |")
        out.append("")
    stream = [r for r in rows if r["kind"] == "stream"]
    for signal in dict.fromkeys(r["signal"] for r in stream):
        grid = [r for r in stream if r["signal"] == signal and r["normalisation"] == "clip stats" and r["grid"] == "clip"]
        lookaheads = sorted({r["lookahead_s"] for r in grid})
        if len(lookaheads) > 1:
            out += [f"streamed vs one pass, {signal}, context only (the clip's grid and statistics; rows: left "
                    "context s, columns: lookahead s)", "",
                    "| left \\ lookahead | " + " | ".join(f"{la:g}" for la in lookaheads) + " |",
                    "|---" * (len(lookaheads) + 1) + "|"]
            for left in sorted({r["left_s"] for r in grid}):
                cells = {r["lookahead_s"]: r["rel_l2"] for r in grid if r["left_s"] == left}
                out.append(f"| {left:g} | " + " | ".join(f"{cells[la]:.1e}" if la in cells else ""
                                                        for la in lookaheads) + " |")
            out.append("")
        defaults = [r for r in stream if r["signal"] == signal]
        left, lookahead = S.LEFT_CONTEXT_S, S.LOOKAHEAD_S
        defaults = [r for r in defaults if r["left_s"] == left and r["lookahead_s"] == lookahead]
        if defaults:
            out += [f"streamed vs one pass, {signal}, left {left:g} s, lookahead {lookahead:g} s", "",
                    "| normalisation | original grid (length given) | live grid (5/3) |", "|---|---|---|"]
            for norm in dict.fromkeys(r["normalisation"] for r in defaults):
                cells = {r["grid"]: r["rel_l2"] for r in defaults if r["normalisation"] == norm}
                out.append(f"| {norm} | " + " | ".join(f"{cells[g]:.1e}" if g in cells else "" for g in ("clip", "live"))
                           + " |")
            grid_only = [r for r in rows if r["kind"] == "grid only" and r["signal"] == signal]
            if grid_only:
                out.append(f"| (one pass on the live grid) | | {grid_only[0]['rel_l2']:.1e} |")
            out.append("")
    if any(r["kind"] == "downstream" for r in rows):
        out += ["| features (tiny DiT, 3 clips) | features rel L2 | clean latents rel L2 |", "|---|---|---|"]
        out += [f"| {r['variant']} | {r['features_rel_l2']:.1e} | {r['latents_rel_l2']:.1e} |"
                for r in rows if r["kind"] == "downstream"]
        out.append("")
    if any(r["kind"] == "memory" for r in rows):
        out += ["| audio | one pass: peak RSS growth | chunked | longest wav2vec2 input (chunked) |", "|---|---|---|---|"]
        memory = [r for r in rows if r["kind"] == "memory"]
        for seconds in sorted({r["seconds"] for r in memory}):
            cells = {r["mode"]: r for r in memory if r["seconds"] == seconds}
            one, chunked = cells.get("one pass"), cells.get("chunked")
            out.append(f"| {seconds:g} s | " + (f"{one['peak_growth_mib']:.0f} MiB" if one else "") + " | "
                       + (f"{chunked['peak_growth_mib']:.0f} MiB | {chunked['longest_input_s']:.0f} s" if chunked
                          else " | ") + " |")
        out.append("")
    reach = [r for r in rows if r["kind"] == "attention reach"]
    if reach:
        distances = list(reach[0]["beyond"])
        out += [f"attention mass beyond a distance ({reach[0]['frames']} frames)", "",
                "| layer | " + " | ".join(f"> {d} s" for d in distances) + " |", "|---" * (len(distances) + 1) + "|"]
        out += [f"| {r['layer']} | " + " | ".join(f"{r['beyond'][d]:.2f}" for d in distances) + " |" for r in reach]
        out.append("")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", help="wav2vec2 folder or safetensors (default: the tiny fixture encoder)")
    parser.add_argument("--audio", help="a speech file (default: the fixture waveform and espeak-ng speech)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--chunk-seconds", type=float, default=120.0, help="speech length for the chunked table")
    parser.add_argument("--stream-seconds", type=float, default=30.0, help="speech length for the streaming table")
    parser.add_argument("--windows", type=float, nargs="*", default=[5.0, 10.0, 20.0, 30.0])
    parser.add_argument("--contexts", type=float, nargs="*", default=[0.5, 1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--lefts", type=float, nargs="*", default=[0.5, 1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--lookaheads", type=float, nargs="*", default=[0.0, 0.25, 0.5, 1.0])
    parser.add_argument("--memory-seconds", type=float, nargs="*", default=[60.0, 150.0, 300.0, 600.0])
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["attention", "chunked", "stream", "memory", "downstream"])
    parser.add_argument("--out", default="bench_audio.json")
    parser.add_argument("--tables", nargs="*", help="only print the tables of these JSON files")
    args = parser.parse_args()
    if args.tables:
        print(markdown([row for path in args.tables for row in json.loads(Path(path).read_text())]))
        return
    dtype = getattr(torch, args.dtype)
    encoder = A.Wav2Vec2Encoder.load(args.encoder, args.device, dtype) if args.encoder else \
        fixture_encoder(args.device, dtype)
    rows = []
    chunk_waves, stream_waves = signals(args)
    if "attention" not in args.skip:
        rows += attention_reach(encoder, list(stream_waves.values())[-1][:30 * A.SAMPLE_RATE])  # T^2 per layer
    if "chunked" not in args.skip:
        for name, wave in chunk_waves.items():
            rows += chunked_rows(encoder, name, wave, one_pass(encoder, wave)[1], args.windows
                                 if wave.numel() > 10 * A.SAMPLE_RATE else [1.0], args.contexts)
    if "stream" not in args.skip:
        for name, wave in stream_waves.items():
            rows += stream_rows(encoder, name, wave, one_pass(encoder, wave)[1], args.lefts, args.lookaheads,
                                S.LEFT_CONTEXT_S, S.LOOKAHEAD_S)
        if not args.audio:  # a live take: the microphone open on room noise (-60 dB) for 3 s first
            name, wave = next((n, w) for n, w in stream_waves.items() if not n.startswith("fixture"))
            g = torch.Generator().manual_seed(0)
            wave = torch.cat([1e-3 * torch.randn(3 * A.SAMPLE_RATE, generator=g), wave])
            rows += stream_rows(encoder, "3 s room noise + " + name, wave, one_pass(encoder, wave)[1], [], [],
                                S.LEFT_CONTEXT_S, S.LOOKAHEAD_S, grid=False)
    waves = stream_waves
    if "downstream" not in args.skip and not args.encoder:
        wave = next(w for n, w in waves.items() if not n.startswith("fixture"))[:int(8 * A.SAMPLE_RATE)]
        variants = {}
        for window, context in ((1.0, 0.5), (1.0, 1.0), (2.0, 2.0)):
            per_frame = A.encode_audio(encoder, wave, window_s=window, context_s=context).per_frame(INFER_FRAMES)[0]
            variants[f"chunked W={window} C={context}"] = per_frame
        variants["stream defaults, live"] = streamed(encoder, wave)
        variants["stream defaults, clip grid"] = streamed(encoder, wave, total_samples=wave.numel())
        rows += downstream_rows(encoder, wave, variants)
    if "memory" not in args.skip and args.device.startswith("cuda"):
        rows += gpu_memory_rows(encoder, list(stream_waves.values())[-1], args.memory_seconds, A.CHUNK_WINDOW_S)
    elif "memory" not in args.skip and not args.encoder:
        rows += memory_rows(args.memory_seconds, A.CHUNK_WINDOW_S)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(markdown(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
