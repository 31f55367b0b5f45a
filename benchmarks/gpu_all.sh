#!/usr/bin/env bash
# Every throughput benchmark on this machine's GPU(s), JSON + log of each under OUT_DIR.
#
#   benchmarks/gpu_all.sh [OUT_DIR]        (default benchmarks/results)
#   PYTHON=/path/to/python benchmarks/gpu_all.sh /tmp/out
#
# Each benchmark is sized to take well under a minute on an H100 (the whole script a few
# minutes); `scaling` runs only when 2+ GPUs are visible. A failing benchmark does not stop
# the others; the script exits non-zero if any failed. Extra arguments for one benchmark:
# TBE_ARGS, COMPRESS_ARGS, FETCH_ARGS, RANK_ARGS, LOADER_ARGS, SCALING_ARGS.
# ONLY="tbe fetch" runs just those (e.g. to split the run over several sessions).
# SMOKE=1 runs every benchmark at --tiny size on the GPU (a ~1-minute check of the code paths;
# its JSONs say "tiny": true and are not results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$GPUS" -lt 1 ]; then
  echo "gpu_all.sh: torch ($PYTHON) sees no GPU" >&2
  exit 2
fi
"$PYTHON" - <<'EOF'
import torch, torchrec, fbgemm_gpu
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), torchrec {torchrec.__version__}, "
      f"fbgemm_gpu {getattr(fbgemm_gpu, '__version__', '?')}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
EOF

failed=()
run() {  # run NAME [ARGS...]
  local name=$1; shift
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  local start=$SECONDS
  echo "=== $name $*"
  timeout 300 "$PYTHON" -m benchmarks."$name" --out "$OUT" ${SMOKE:+--tiny} "$@" 2>&1 | tee "$OUT/$name.log"
  local code=${PIPESTATUS[0]}
  echo "=== $name: exit $code, $((SECONDS - start)) s"
  [ "$code" -eq 0 ] || failed+=("$name")
}

run tbe ${TBE_ARGS:-}
run compress ${COMPRESS_ARGS:-}
run fetch ${FETCH_ARGS:-}
run rank --bf16 ${RANK_ARGS:-}
run loader ${LOADER_ARGS:-}
if [ "$GPUS" -ge 2 ]; then
  run scaling ${SCALING_ARGS:-}
elif [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" scaling "* ]]; then
  echo "=== scaling: skipped ($GPUS GPU visible, needs 2)"
fi

echo
echo "results in $OUT:"
ls -1 "$OUT"/*.json 2>/dev/null
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
