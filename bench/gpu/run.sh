#!/usr/bin/env bash
# One command for the GPU figures: the editor (reference, backend, levers, server) and the trainer, one JSON.
#   bash bench/gpu/run.sh                      # CUDA machine: full-size random IP2P, 512x512, fp16
#   bash bench/gpu/run.sh --tiny --device cpu  # tiny components on the CPU (the smoke test)
#   bash bench/gpu/run.sh --kontext            # instead: the flux-kontext editor, full-size FLUX.1 Kontext, bf16
#                                              # (bench/gpu/kontext_bench.py; --kontext --tiny --device cpu: its smoke test)
# Output: $OUT/gpu_bench.json when OUT is set, else bench/results/gpu_bench[_tiny].json.
# Wheels in .whl/ (bench/gpu/fetch_wheels.sh) are installed to a scratch folder first when diffusers or
# nerfstudio is not importable (a bare machine). Whatever else: bench/gpu/README.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
LIMIT_S=${LIMIT_S:-460}  # the whole run, wheel set-up included, stays inside one 8-minute call
SITE=${SITE:-/tmp/in2n-bench-site}
WHEELS=${WHEELS:-.whl}  # or a folder of the same wheels for another Python (a dry run on 3.11)
if ! "$PYTHON" -c "import diffusers, tyro, grpc_health, prometheus_client, nerfstudio, gsplat, nerfacc, viser, fpsample" 2>/dev/null; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "bench/gpu/run.sh: diffusers, nerfstudio & co. are not installed and $WHEELS holds no wheels; run bench/gpu/fetch_wheels.sh first" >&2
    exit 2
  fi
  echo "bench/gpu/run.sh: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE" >&2
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl 2>&1 | grep -v "^WARNING" >&2
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export GPU_BENCH_LIMIT_S=$((LIMIT_S - SECONDS))  # the script ends its trainer runs before this
SCRIPT=bench/gpu/gpu_bench.py
if [ "${1:-}" = "--kontext" ]; then  # the flux-kontext editor, full-size FLUX.1 Kontext: a call of its own
  SCRIPT=bench/gpu/kontext_bench.py
  shift
fi
exec timeout -k 10 "$GPU_BENCH_LIMIT_S" "$PYTHON" "$SCRIPT" "$@"
