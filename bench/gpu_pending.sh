#!/usr/bin/env bash
# GPU measurements batched for one device call each (docs/benchmarks.md says what each is for;
# every row records its own command).
#
#   bash bench/gpu_pending.sh STEP...        results under $OUT (the device tool's folder) or ./gpu_out
#
# The machine lacks PyAV and librosa: carry .whl/ holding the av and soxr wheels for Python 3.12
# (device README: `pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl av soxr`).
#
# Steps (each fits one 600 s call on one H100/H200; the first step that needs the 14B random
# checkpoint writes it to /tmp/la_models, ~2 min):
#   cuda      tests/test_cuda.py and tests/test_kernels.py (the CUDA-only tests)
#   vae       the streaming VAE decode and portrait encode, the engine against each of its choices
#             undone (bench/vae_check.py)
#   live      the Live Video node's rows at 384*256 and 704*384, 4 and 3 steps
#   session   a 40 s live session at 384*256 (latency p50/p95, where it goes), lookahead 0.5 and 0.25 s
#             (SESSION_CASES=name,... picks other cases)
#   session-profile
#             a 30 s session at 384*256 with 5 of its blocks traced (torch.profiler): where a session's
#             ticks lose time against the Live Video node's
#   graphs    CUDA graphs on and off (-nog): a 40 s session at 384*256 and Live Video at both sizes, each
#             row with the generation thread's spans (bench/host_spans.py: ticks by size, host and GPU ms)
#   again     the TTFF of a user's next run (the same Live Video node, a new seed: the portrait's
#             encoding kept), 384*256 and 704*384
#   graph     Sampler -> Decode beside Live Video, 384*256 and 704*384
#   long-start / long-collect
#             the 10-minute session: longer than one call, so `long-start long-collect` starts it
#             in the background and waits ~9 min; a second `long-collect`, made at once (within the
#             machine's 30 s idle release), waits for the rest and keeps its rows. ~13 min of device
#             time with the checkpoint's writing (run 2026-12-06).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
models=/tmp/la_models
mkdir -p "$out"
# wheels the GPU machine lacks, carried in .whl/ (device README): PyAV (the mp4s) and soxr (for
# bench/device_shims/librosa, used when librosa itself does not import there)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import librosa" 2>/dev/null || export PYTHONPATH=$PWD/bench/device_shims${PYTHONPATH:+:$PYTHONPATH}

run_step() {
  case "$1" in
    cuda)
      python -m pytest -q tests/test_cuda.py tests/test_kernels.py 2>&1 | tail -30 ;;
    session)
      python bench/session_bench.py --models "$models" --out "$out/session.json" \
        --cases "${SESSION_CASES:-session-fp8-384-warm,session-fp8-384-la25-warm}" --seconds 40 ;;
    session-profile)
      python bench/session_bench.py --models "$models" --out "$out/session_profile.json" \
        --cases session-fp8-384-warm --seconds 30 --profile "$out/profiles" ;;
    graphs)
      python bench/session_bench.py --models "$models" --out "$out/session_graphs.json" --spans \
        --cases session-fp8-384-warm,session-fp8-384-nog-warm --seconds 40
      python bench/live_bench.py --models "$models" --out "$out/live_graphs.json" --spans \
        --cases live-fp8-384-warm,live-fp8-384-nog-warm,live-fp8-704-warm,live-fp8-704-nog-warm ;;
    vae)
      python bench/vae_check.py --sizes '384*256,704*384' --out "$out/vae.json" ;;
    live)
      python bench/live_bench.py --models "$models" --out "$out/live.json" \
        --cases live-fp8-384-warm,live-fp8-704-warm,live-fp8-384-s3-warm,live-fp8-704-s3-warm ;;
    again)
      python bench/live_bench.py --models "$models" --out "$out/again.json" \
        --cases live-fp8-384-warm-again,live-fp8-704-warm-again ;;
    graph)
      python bench/live_bench.py --models "$models" --out "$out/graph.json" \
        --cases live-sd-fp8-384-warm,live-fp8-384-warm,live-sd-fp8-704-warm,live-fp8-704-warm ;;
    long-start)
      mkdir -p /tmp/long_session
      # its own process session: the device tool ends a call's other processes when the call returns
      setsid nohup python bench/session_bench.py --models "$models" --out /tmp/long_session/session_10min.json \
        --cases session-fp8-384-warm --seconds 600 >/tmp/long_session/log.txt 2>&1 &
      echo "started pid $!; collect with: bash bench/gpu_pending.sh long-collect" ;;
    long-collect)
      # at most ~9 min per call (the call limit is 10): call it again while it says "still running"
      deadline=$((SECONDS + 540))
      while pgrep -f "session_bench.py.*--seconds 600" >/dev/null && ((SECONDS < deadline)); do sleep 5; done
      pgrep -f "session_bench.py.*--seconds 600" >/dev/null && echo "still running: call long-collect again"
      tail -20 /tmp/long_session/log.txt
      cp /tmp/long_session/* "$out/" ;;
    *)
      echo "unknown step $1 (cuda, graphs, vae, live, session, session-profile, again, graph, long-start, long-collect)" >&2
      return 2 ;;
  esac
}

status=0
for step in "$@"; do
  echo "== $step ($(date -u +%H:%M:%S))"
  run_step "$step" || status=$?
done
exit $status
