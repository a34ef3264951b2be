"""Live session latency with a scripted page: the LiveAvatar Live Session node, as a graph calls it
(full-size random 14B model on the GPU, or --tiny on the CPU), fed speech in real time in 0.1 s
chunks through the route's request handling, every chunk and every frame message timestamped.

- latency: a chunk sent -> the message saying the frame holding its last sample is written to the
  mp4 the page plays (what the page then fetches and shows); p50 / p95 over the chunks, and the
  p50 of the first and the last minute (drift);
- steady_fps: video frames written per second while the page speaks (25 when generation keeps up);
- keeps_pace: the speech waiting for generation (the session's waiting_s) stayed under 1 s;
- memory: GPU memory allocated and the process's resident memory, the most of each in the first
  and in the last minute (flat: no growth with length), and resident memory at the start and
  the end of speaking;
- beside --out, <case>_timeline.json: every session message while the page speaks (time, frames
  written, latency, speech waiting for generation, generation speed).

    python bench/session_bench.py --models /tmp/la_models --out $OUT/session.json \\
        --cases session-fp8-384,session-fp8-704-stepgpu --seconds 60
    python bench/session_bench.py --tiny --seconds 8          # a smoke run on the CPU

A case name is session-<weights>-<size>[-s<steps>][-la<lookahead in 1/100 s>][-stepgpu][-nog][-warm]: weights
fp8 / bf16 (fp32: --tiny), size 384 (384*256) / 704 (704*384) / 128 (custom 128*128, for --tiny),
-la25 the node's lookahead_s 0.25 (default 0.5), -stepgpu one
denoising step per GPU, -nog the loader's cuda_graphs off, -warm the loader's warm_up at the case's size. Without ComfyUI the node
finds its server through a stand-in PromptServer (the registry on its app, the client id of the
page, the messages it sends), which is all the node asks of ComfyUI's.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import torch

import live_bench as lb
from host_spans import HostSpans

RATE, FPS, CHUNK = 16000, 25, 1600
EVENT = "liveavatar.session"


def parse_case(name: str) -> dict:
    m = re.fullmatch(r"session-(fp8|bf16|fp32)-(384|704|128)(?:-s(\d))?(?:-la(\d+))?(-stepgpu)?(-nog)?(-warm)?", name)
    if not m:
        raise SystemExit(f"bad case name {name!r} (see the module docstring)")
    weights, size, steps, lookahead, stepgpu, nog, warm = m.groups()
    area = {"128": "custom", **lb.SIZES}[size]
    return dict(mode=name, weight_dtype={"fp8": "fp8_e4m3fn"}.get(weights, weights), size=area,
                placement="one denoising step per GPU" if stepgpu else "one GPU", steps=int(steps or 4),
                lookahead_s=int(lookahead) / 100 if lookahead else 0.5,
                warm_up=area if warm and area != "custom" else "off", cuda_graphs="off" if nog else "auto")


class Page:
    """The stand-in PromptServer and the page that queued the session: the registry on its app,
    the messages it is sent (timestamped), and a thread that speaks once the session is ready."""

    def __init__(self, pack, speech: np.ndarray):
        route = pack.nodes.session_route
        self.route, self.speech = route, speech
        self.app = {route.SESSIONS: route.SessionRegistry()}
        self.client_id = "bench-page"
        self.messages, self.sent, self.refused = [], [], []  # (time, data), (time, end sample), answers
        self.done_speaking = None

    def send_sync(self, event, data, sid):
        if event == EVENT:
            self.messages.append((time.perf_counter(), data))
            if "ready" in data:
                threading.Thread(target=self.speak, args=(data["ready"],), daemon=True).start()

    def speak(self, ready):
        route, registry = self.route, self.app[self.route.SESSIONS]
        headers = {route.TOKEN_HEADER: ready["token"]}
        started = time.perf_counter()
        for offset in range(0, len(self.speech), CHUNK):
            piece = self.speech[offset:offset + CHUNK]
            time.sleep(max(0.0, started + (offset + len(piece)) / RATE - time.perf_counter()))
            ticket, status, error = route.find_session(registry, ready["session"], headers)
            pcm = (np.clip(piece, -1, 1) * 32767).astype("<i2").tobytes()
            status, answer = (status, error) if ticket is None else route.push_audio(
                ticket, {**headers, route.OFFSET_HEADER: str(offset)}, pcm)
            self.sent.append((time.perf_counter(), offset + len(piece)))
            if status != 200:
                self.refused.append(answer)
        self.done_speaking = time.perf_counter()
        route.stop_session(registry, ready["session"], headers, b"")


class MemoryWatch(threading.Thread):
    """GPU memory allocated and the process's resident memory, sampled every 0.5 s:
    (time, GPU bytes, resident GiB)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples, self.stopped = [], False

    def run(self):
        while not self.stopped:
            self.samples.append((time.perf_counter(), torch.cuda.memory_allocated() if lb.Gpu.on else 0, rss_gib()))
            time.sleep(0.5)

    def peak(self, start: float, end: float, resident: bool = False) -> float:
        """The most GPU memory allocated (or resident memory) between two times, in GiB."""
        return max([rss if resident else gpu / lb.GIB for t, gpu, rss in self.samples if start <= t < end] or [0])


def rss_gib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / lb.GIB


def latencies(page: Page, since: float = -1e18, until: float = 1e18) -> list[float]:
    """Per chunk sent in [since, until): the first frame message holding its last sample, minus its send time."""
    shown = [(t, d.get("frames", 0)) for t, d in page.messages if "frames" in d]
    out, i = [], 0
    for sent, end in page.sent:
        if not since <= sent < until:
            continue
        frame = (end - 1) * FPS // RATE
        while i < len(shown) and (shown[i][1] <= frame or shown[i][0] < sent):
            i += 1
        if i == len(shown):
            break
        out.append(shown[i][0] - sent)
    return out


def timeline(page: Page) -> list:
    """Every session message while the page speaks: [s since the first chunk, frames written,
    latency_s, waiting_s, speed_fps] (where the latency comes from, second by second)."""
    first_t = page.sent[0][0]
    return [[round(t - first_t, 3), d.get("frames"), d["session"].get("latency_s"), d["session"].get("waiting_s"),
             d["session"].get("speed_fps")] for t, d in page.messages if "session" in d and t >= first_t]


def summarise(page: Page, memory: MemoryWatch, rss: tuple, case: dict, seconds: float) -> dict:
    speaking = [(t, d["frames"]) for t, d in page.messages if d.get("frames") and t <= page.done_speaking]
    (t0, f0), (t1, f1) = speaking[0], speaking[-1]
    lat = latencies(page)
    first_t = page.sent[0][0]
    minute = 60.0 if seconds >= 150 else seconds / 3
    early, late = latencies(page, first_t, first_t + minute), latencies(page, page.done_speaking - minute)
    waiting = [d["session"]["waiting_s"] for t, d in page.messages if "session" in d and d["session"].get("waiting_s")
               is not None and t > first_t + seconds / 2]
    last = page.messages[-1][1]
    # where the latency goes: the medians over the last 50 blocks shown while the page spoke
    stages = [d["session"] for t, d in page.messages if "session" in d and t <= page.done_speaking][-1]
    return dict(case, gpus=torch.cuda.device_count() if "step per GPU" in case["placement"] else 1, seconds=seconds,
                latency_p50_s=float(np.percentile(lat, 50)), latency_p95_s=float(np.percentile(lat, 95)),
                latency_first_p50_s=float(np.median(early)) if early else None,
                latency_last_p50_s=float(np.median(late)) if late else None,
                steady_fps=(f1 - f0) / max(t1 - t0, 1e-9), first_frames_s=t0 - first_t,
                keeps_pace=max(waiting, default=0.0) < 1.0, waiting_max_s=max(waiting, default=0.0),
                **{span: stages.get(span) for span in ("encode_p50_s", "sampling_p50_s", "decode_p50_s")},
                frames=last.get("frames"), silence_s=last["session"]["silence_s"],
                dropped_s=last["session"]["dropped_s"], refused=len(page.refused),
                memory_first_min_gib=memory.peak(first_t, first_t + minute),
                memory_last_min_gib=memory.peak(page.done_speaking - minute, page.done_speaking + 1),
                rss_first_min_gib=memory.peak(first_t, first_t + minute, resident=True),
                rss_last_min_gib=memory.peak(page.done_speaking - minute, page.done_speaking + 1, resident=True),
                rss_start_gib=rss[0], rss_end_gib=rss[1], **lb.Gpu.peaks())


def run_case(pack, case: dict, inputs: dict, speech: np.ndarray, tiny: bool, timeline_path=None,
             profile_dir: Path | None = None, spans: bool = False) -> dict:
    page = Page(pack, speech)
    sys.modules["server"] = types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=page))
    nodes = pack.nodes
    lb.Gpu.start(0)
    (model,) = lb.call(nodes.loader.LiveAvatarModelLoader, "load", model_name=lb.CHECKPOINT, lora_name="None",
                       lora_strength=1.0, weight_dtype=case["weight_dtype"], placement=case["placement"],
                       offload_blocks=0, kv_cache="auto", memory_cap_gib=0.0, warm_up=case["warm_up"],
                       cuda_graphs=case["cuda_graphs"])
    memory = MemoryWatch()
    memory.start()
    rss_start = rss_gib()
    # --profile: a torch.profiler trace of 5 blocks from the 20th written (live_bench.ProfileWindow)
    clock = lb.BlockClock(nodes.host)
    window = lb.ProfileWindow(clock, profile_dir, case["mode"], first=20, blocks=5) if profile_dir is not None else None
    host_spans = HostSpans(pack)
    try:
        with clock, (host_spans if spans else contextlib.nullcontext()):
            lb.call(nodes.session.LiveAvatarSession, "run_session", model=model, positive=inputs["positive"],
                    image=inputs["image"], vae=inputs["vae"], audio_encoder=inputs["wav2vec"], size=case["size"],
                    width=128, height=128, infer_frames=lb.INFER_FRAMES, sample_steps=case["steps"], seed=42,
                    max_seconds=int(len(speech) / RATE) + 60, idle="keep moving on silence",
                    filename_prefix="bench/session", lookahead_s=case["lookahead_s"])
            if window is not None:
                window.close()  # a session shorter than the window: what was traced
    finally:
        memory.stopped = True
        del sys.modules["server"]
    if timeline_path is not None:
        Path(timeline_path).write_text(json.dumps(timeline(page)))
    row = summarise(page, memory, (rss_start, rss_gib()), case, len(speech) / RATE)
    if spans:  # over the speaking, the first 5 s left out (the ramp)
        row["spans"] = host_spans.summary(page.sent[0][0] + 5, page.done_speaking)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="/tmp/la_models")
    parser.add_argument("--cases", default=None, help="default: session-fp8-384 (--tiny: session-fp32-128)")
    parser.add_argument("--seconds", type=float, default=30.0, help="speech the page speaks, in real time")
    parser.add_argument("--out", default="session_rows.json")
    parser.add_argument("--command", default=lb.command_line(), help="recorded in every row")
    parser.add_argument("--tiny", action="store_true", help="test-size models on the CPU: a smoke run of this script")
    parser.add_argument("--profile", default=None, help="a folder: trace 5 blocks of each case there (the host's "
                        "stalls, the GPU's idle time; the row's latency then includes the profiler's cost)")
    parser.add_argument("--spans", action="store_true", help="time the generation thread's work (ticks by size, "
                        "audio feed, frames out; bench/host_spans.py) into each row's 'spans'")
    args = parser.parse_args()
    models = Path(args.models) / ("tiny" if args.tiny else "")
    os.environ["LIVEAVATAR_MODELS"] = str(models)
    os.environ.setdefault("LIVEAVATAR_OUTPUT", str(Path(args.models).parent / "la_output"))
    pack = lb.import_pack()
    import importlib
    for module in ("testing", "audio", "vae", "dit", "loading"):
        importlib.import_module(f"{pack.__name__}.liveavatar.{module}")
    device = "cuda" if lb.Gpu.on else "cpu"
    config = dict(lb.CONFIG_14B)
    if args.tiny:
        config = {f: getattr(pack.liveavatar.testing.tiny_dit_config(), f) for f in lb.CONFIG_14B}
        config.update(audio_layers=4, audio_inject_layers=(0, 2))
    checkpoint = models / "diffusion_models" / lb.CHECKPOINT
    if not checkpoint.exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        lb.write_checkpoint(checkpoint, pack, config, device)
    inputs = lb.graph_inputs(pack, device, args.tiny, 1.0)
    speech = pack.liveavatar.testing.speech_like(args.seconds, seed=3)
    rows = []
    for name in (args.cases or ("session-fp32-128" if args.tiny else "session-fp8-384")).split(","):
        case = parse_case(name)
        timeline_path = Path(args.out).with_name(f"{name}_timeline.json")
        lb.add_row(rows, case, args, lambda: run_case(pack, case, inputs, speech, args.tiny, timeline_path,
                                                      Path(args.profile) if args.profile else None, args.spans))
    lb.print_table(rows, ["latency p50 s", "p95 s", "first / last minute p50 s", "encode / sampling / decode p50 s",
                          "steady FPS", "keeps pace", "GiB first / last minute", "resident GiB first / last minute"],
                   lambda r: [
        f"{r['latency_p50_s']:.2f}", f"{r['latency_p95_s']:.2f}",
        f"{r['latency_first_p50_s']:.2f} / {r['latency_last_p50_s']:.2f}",
        f"{r['encode_p50_s']} / {r['sampling_p50_s']} / {r['decode_p50_s']}", f"{r['steady_fps']:.1f}", r["keeps_pace"],
        f"{r['memory_first_min_gib']:.2f} / {r['memory_last_min_gib']:.2f}",
        f"{r['rss_first_min_gib']:.2f} / {r['rss_last_min_gib']:.2f}"])


if __name__ == "__main__":
    main()
