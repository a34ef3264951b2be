#!/usr/bin/env bash
# The GPU measurements the docs list as not yet taken, batched for one device call each
# (docs/benchmarks.md says what each is for; every row records its own command).
#
#   bash bench/gpu_pending.sh STEP...        results under $OUT (the device tool's folder) or ./gpu_out
#
# Steps (each fits one 600 s call on one H100/H200 with the 14B random checkpoint already
# written to /tmp/la_models, which the first step that needs it writes, ~2 min):
#   cuda      tests/test_cuda.py and tests/test_kernels.py (the CUDA-only tests)
#   session   a 40 s live session at 384*256 (latency p50/p95 after the warm-up and own-stream fixes)
#   vae       the streaming VAE decode's convolution variants and their profiles (bench/vae_check.py)
#   graph     Sampler -> Decode beside Live Video, 384*256 and 704*384 (the sampler's latents copied
#             alongside instead of read on the DiT's stream)
#   long-start / long-collect
#             the 10-minute session: longer than one call, so the first call starts it in the
#             background and returns; the second (made within the machine's idle release) waits
#             for it and keeps its rows
# Most telling first: `vae` (where the decode's time goes: the Live Video node's largest gap to
# its floor, docs/benchmarks.md) and `session`, then `cuda` and `graph`; several steps may share a
# call (`bash bench/gpu_pending.sh vae session`) while they fit its 600 s.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
models=/tmp/la_models
mkdir -p "$out"
# wheels the GPU machine lacks (PyAV for the session's mp4), carried in .whl/ (device README)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

run_step() {
  case "$1" in
    cuda)
      python -m pytest -q tests/test_cuda.py tests/test_kernels.py 2>&1 | tail -30 ;;
    session)
      python bench/session_bench.py --models "$models" --out "$out/session.json" \
        --cases session-fp8-384-warm --seconds 40 ;;
    vae)
      python bench/vae_check.py --sizes '384*256,704*384' --out "$out/vae.json" ;;
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
      while pgrep -f "session_bench.py.*--seconds 600" >/dev/null; do sleep 5; done
      tail -20 /tmp/long_session/log.txt
      cp /tmp/long_session/* "$out/" ;;
    *)
      echo "unknown step $1 (cuda, session, vae, graph, long-start, long-collect)" >&2
      return 2 ;;
  esac
}

status=0
for step in "$@"; do
  echo "== $step ($(date -u +%H:%M:%S))"
  run_step "$step" || status=$?
done
exit $status
