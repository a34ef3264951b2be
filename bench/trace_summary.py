"""Where a profiled stretch of GPU time goes, from a torch.profiler Chrome trace.

Per GPU: the window (first to last GPU activity of any GPU), the time any kernel ran (busy,
a union over streams), idle = window - busy, kernel time by kind (matrix products,
attention, our fused Triton kernels, copies/casts, other element-wise work), and the
host-to-device / device-to-device copy time with how much of it overlapped kernels (offload
and multi-GPU). Used by bench.py --profile; runnable on a saved trace:

    python bench/trace_summary.py trace.json.gz
"""
from __future__ import annotations

import gzip
import json
import sys
from collections import defaultdict

KINDS = (  # first match wins; matched against the lower-cased kernel name
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "scaled_mm", "cublas", "sm90_", "wgmma")),
    ("fused (Triton)", ("_modulated_norm_kernel", "_rms_norm_rope_kernel", "_gated_add_kernel",
                        "_quantize_rows_kernel", "triton")),
    ("copy / cast", ("copy", "memcpy", "cat", "fill", "memset")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, needles in KINDS:
        if any(n in low for n in needles):
            return kind
    return "other element-wise"


def union(intervals):
    """Merged [start, end) intervals, sorted."""
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def total(intervals) -> float:
    return sum(end - start for start, end in intervals)


def overlap(a, b) -> float:
    """Length of the intersection of two merged interval lists."""
    i = j = 0
    out = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        out += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def load(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def gpu_events(trace: dict):
    """(device, category, name, start_us, end_us) of every GPU kernel, copy and memset."""
    for e in trace.get("traceEvents", []):
        cat = e.get("cat", "")
        if e.get("ph") == "X" and cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            device = e.get("args", {}).get("device", e.get("pid"))
            yield device, cat, e.get("name", ""), float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))


STALLS = ("Synchronize", "cudaMalloc", "cudaFree", "cudaMemcpy", "cudaHostAlloc", "cudaHostRegister")


def runtime_calls(trace: dict, per: int, unit: str) -> list[str]:
    """Host-side CUDA runtime/driver calls that can stall the host (syncs, allocations,
    synchronous copies): count and time, and the launches for scale."""
    calls = defaultdict(lambda: [0, 0.0])
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver"):
            name = e.get("name", "")
            if any(k in name for k in STALLS) or "Launch" in name:
                calls[name][0] += 1
                calls[name][1] += float(e.get("dur", 0)) / 1e3
    lines = ["host CUDA calls (launches; and what can stall the host):"]
    for name, (count, ms) in sorted(calls.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"  {name}: {count / per:.0f}{unit}, {ms / per:.2f} ms")
    return lines


def summarize(trace: dict, label: str = "", per: int = 1, per_name: str = "") -> str:
    """Markdown summary; times divided by `per` (e.g. the ticks profiled, `per_name` 'tick')."""
    events = list(gpu_events(trace))
    if not events:
        return f"{label}: no GPU events in the trace\n"
    start, end = min(e[3] for e in events), max(e[4] for e in events)
    window = (end - start) / 1e3 / per
    unit = f" per {per_name}" if per_name else ""
    lines = [f"### {label}", "", f"window{unit}: {window:.2f} ms (first to last GPU activity)", ""]
    for device in sorted({e[0] for e in events}, key=str):
        mine = [e for e in events if e[0] == device]
        kernels = union([(e[3], e[4]) for e in mine if e[1] == "kernel"])
        busy = total(kernels) / 1e3 / per
        lines.append(f"GPU {device}: busy {busy:.2f} ms{unit} ({100 * busy / window:.0f}%), idle {window - busy:.2f} ms")
        by_kind, by_name, launches = defaultdict(float), defaultdict(float), 0
        for _, cat, name, s, e in mine:
            if cat == "kernel":
                by_kind[kind_of(name)] += (e - s) / 1e3 / per
                by_name[name] += (e - s) / 1e3 / per
                launches += 1
        gaps = [(b[0] - a[1], b[0]) for a, b in zip(kernels, kernels[1:]) if b[0] - a[1] > 20]
        lines.append(f"  kernels launched{unit}: {launches / per:.0f}; gaps over 20 us between kernels: "
                     f"{len(gaps) / per:.0f}{unit}, {sum(g for g, _ in gaps) / 1e3 / per:.2f} ms")
        starts = {e[3]: e[2] for e in mine if e[1] == "kernel"}
        before = defaultdict(float)
        for gap, at in gaps:
            before[kind_of(starts.get(at, "?")) + ": " + starts.get(at, "?")[:70]] += gap / 1e3 / per
        for name, ms in sorted(before.items(), key=lambda kv: -kv[1])[:4]:
            lines.append(f"    idle before {name}: {ms:.2f} ms")
        for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {kind}: {ms:.2f} ms ({100 * ms / window:.0f}% of the window)")
        for direction in ("HtoD", "DtoH", "DtoD", "PtoP"):
            copies = union([(e[3], e[4]) for e in mine if e[1] == "gpu_memcpy" and direction in e[2]])
            if copies:
                ms = total(copies) / 1e3 / per
                hidden = overlap(copies, kernels) / 1e3 / per
                lines.append(f"  memcpy {direction}: {ms:.2f} ms{unit}, {hidden:.2f} ms of it while kernels ran")
        lines.append("  top kernels:")
        for name, ms in sorted(by_name.items(), key=lambda kv: -kv[1])[:12]:
            lines.append(f"    {ms:7.2f} ms  {kind_of(name):18s} {name[:110]}")
        lines.append("")
    lines += runtime_calls(trace, per, unit)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(summarize(load(sys.argv[1]), label=sys.argv[1]))
