#!/usr/bin/env bash
# The optimisation attempts of benchmarks/NOTES.md on one GPU: torch.profiler tables of the cases
# that missed their targets, then one change at a time. Writes OUT/<name>.json, OUT/<name>.log and
# OUT/profiles/*.txt; each attempt's JSON name says what changed.
#   source .gpu/setup.sh; benchmarks/gpu_attempts.sh OUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_attempts.sh OUT}
PY=${PYTHON:-python}
mkdir -p "$OUT/profiles"
failed=()
run() {  # run NAME BENCHMARK [ARGS...]
  local name=$1 bench=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  echo "=== $name: $bench $*"
  local start=$SECONDS
  timeout 300 "$PY" -m benchmarks."$bench" --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  grep -v -E "fbgemm_torch_compat|cannot determine compat|^\s*$|WARNING:root|USDT|\[0m|\[33m" "$OUT/$name.log" | tail -20
  echo "=== $name: exit $code, $((SECONDS - start)) s"
  [ "$code" -eq 0 ] || failed+=("$name")
}

# 1. profiles of the three missed targets, at the sizes of the results (baseline figures again)
run tbe_profile tbe --sets wide --profile "$OUT/profiles"
run fetch_profile fetch --profile "$OUT/profiles"
run rank_profile rank --bf16 --history iat --profile "$OUT/profiles"
# 2. fetch: fp16 output; table-wise (no row bucketing / output all-to-all on one GPU); both
run fetch_out_fp16 fetch --output-dtype fp16
run fetch_table_wise fetch --token-sharding table_wise
run fetch_table_wise_fp16 fetch --token-sharding table_wise --output-dtype fp16
# 3. tbe: 4x the batch (fixed costs amortised over 4x the rows); 4x the pooling
run tbe_batch32k tbe --sets wide --batch 32768
run tbe_pool64 tbe --sets wide --pooling 64
# 4. rank: a reader with head dim 64 (d 256, 4 heads); torch.compile of the reader alone
run rank_d256 rank --bf16 --history iat --reader-dim 256 --reader-heads 4
run rank_compile rank --bf16 --history iat --compile
# round 2 (after reading the profiles)
# 5. tbe: 4x batch or 4x pooling with 4x the rows, so rows repeat within a step as often as at
#    the default size (the effective-bytes count assumes every looked-up row is distinct)
run tbe_batch32k_rows4m tbe --sets wide --batch 32768 --rows 4000000
run tbe_pool64_rows4m tbe --sets wide --pooling 64 --rows 4000000
# 6. rank: the recency-position embedding's backward as scatter-add + sum (modules.attention.position_embedding)
run rank_posfix rank --bf16 --history iat --profile "$OUT/profiles"
echo "failed: ${failed[*]:-none}"
