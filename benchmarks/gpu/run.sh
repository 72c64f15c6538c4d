#!/usr/bin/env bash
# The one prepared GPU run: for an H100/H200 machine that has PyTorch and transformers but no
# network. Brings only small pure-Python wheels (benchmarks/gpu/wheels, made by
# fetch_wheels.sh, ignored by git), builds Rex-Omni's 3B architecture with random BF16 weights,
# runs the tests marked `gpu` and the benchmarks, and writes everything to one folder.
#
#   OUT=out/gpu bash benchmarks/gpu/run.sh            # on the GPU machine, from the repo root
#   MODEL=3b-small DEVICE=cpu bash benchmarks/gpu/run.sh   # dry run on a CPU
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/gpu}
MODEL=${MODEL:-3b}
DEVICE=${DEVICE:-auto}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/server:$PWD/client:$PWD${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$OUT/run.log"; }

log "environment"
{ date -u; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; $PY -c "import sys, torch, transformers; print(sys.version); print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''); print('transformers', transformers.__version__)"; } > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

if [ -d benchmarks/gpu/wheels ]; then
  # Into a folder of their own, searched after ours: the machine's environment (its torch,
  # transformers and what they depend on) stays as it is.
  SITE=${SITE:-/tmp/rexomni-site}
  log "installing carried wheels into $SITE (never torch or transformers)"
  $PY -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    benchmarks/gpu/wheels/*.whl >> "$OUT/run.log" 2>&1 || echo "some wheels did not install (see run.log)"
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi

status=0
log "tests marked gpu"
# Only the plugins these tests use: the machine's own pytest plugins may not match its pytest.
# Time limits that add up to under 9 minutes (90 + 150 + 170 + 120 s); the benchmarks rewrite
# their JSON and print a line after each step, so one that runs out of time still leaves what
# it measured.
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 90 $PY -m pytest -q -m gpu tests/gpu -p no:cacheprovider \
  -p pytest_asyncio.plugin 2>&1 | tail -20 | tee "$OUT/pytest-gpu.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

log "decode speed vs the memory-bandwidth limit"
timeout 150 $PY -m benchmarks.gpu.decode_limit --model "$MODEL" --device "$DEVICE" --out "$OUT" 2>>"$OUT/run.log" \
  | tee "$OUT/decode_limit.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

log "latency vs boxes (engine, HTTP, gRPC)"
timeout 170 $PY -m benchmarks.latency_vs_boxes --engine transformers --model "$MODEL" --out "$OUT" \
  --boxes ${BOXES:-0 1 5 10 25 50 100 200 400} 2>>"$OUT/run.log" | tee "$OUT/latency_vs_boxes.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

log "tiling: one pass, tiled by the server, tiles one at a time"
# 4000x3000 (9 tiles + the whole image), 2 rounds; a CPU dry run only checks the path: a small
# image cut into as many tiles, one round.
TILING_RUN="--rounds 2"
[ "$DEVICE" = cpu ] && TILING_RUN="--width 1200 --height 900 --max-pixels 200000 --rounds 1 --boxes 2"
timeout 120 $PY -m benchmarks.tiling --engine transformers --model "$MODEL" --device "$DEVICE" $TILING_RUN \
  --out "$OUT" 2>>"$OUT/run.log" | tee "$OUT/tiling.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

log "done (status $status)"
exit $status
