#!/usr/bin/env bash
# Issue #18's throughput targets on one GPU, side by side in one device call: each benchmark
# in turn (never two at once: they time the same GPU), then benchmarks/targets.py composes
# targets-<device>.json. Everything lands in $OUT/targets.tgz (JSONs and logs).
#   source .gpu/setup.sh; benchmarks/gpu_targets.sh
# ONLY="fetch rank-fast" runs some; each step stops at STEP_S seconds (default 240).
set -uo pipefail
R=${R:-/tmp/targets}
mkdir -p "$R"
nvidia-smi -L
B="python -m benchmarks.run"
declare -A STEPS=(
  [fetch]="fetch"
  [rank-fast]="rank --history iat,handcrafted --token-fetch ranges --bf16 --compile"
  [rank-fast-h1]="rank --history iat --token-fetch ranges --bf16 --compile --reader-heads 1 --no-reader-only"
  [compress-fast]="compress --batch 32768 --bf16"
  [rank-d128]="rank --history iat --token-fetch ranges --bf16 --compile --reader-dim 128 --reader-heads 4 --no-reader-only"
  [rank-before]="rank --history iat --bf16 --no-reader-only"
  [compress-before]="compress"
  [tbe]="tbe"
  # the #18 options beside the steps above (not target sources): fp16 table weights, replicated small tables,
  # pre-projected side info
  [tbe-fp16]="tbe --weights fp16"
  [compress-fp16]="compress --batch 32768 --bf16 --table-dtype fp16"
  [compress-replicated]="compress --batch 32768 --bf16 --replicate-rows 64"
  [rank-pre]="rank --history iat --token-fetch ranges --bf16 --compile --reader-heads 1 --no-reader-only --pre-project"
  # the loader's 16 worker processes against the fast step (the target: 2x)
  [loader-fast]="loader --token-fetch ranges --bf16 --compile --reader-heads 1 --workers 16"
  # the fast step reading each batch in length buckets (attempt 30)
  [rank-buckets]="rank --history iat --token-fetch ranges --bf16 --compile --reader-heads 1 --no-reader-only --length-bucket 64"
  # stage 1's dense part compiled as CUDA graphs (attempt 32)
  [compress-graphs]="compress --batch 32768 --bf16 --compile"
  [loader-buckets]="loader --token-fetch ranges --bf16 --compile --reader-heads 1 --workers 16 --length-bucket 64"
  # the same buckets eager: what the buckets save without compilation's fusion (and its graphs per width)
  [rank-buckets-eager]="rank --history iat --token-fetch ranges --bf16 --reader-heads 1 --no-reader-only --length-bucket 64"
  # fewer, wider buckets (3 at T 256): half the graph calls of L 64, for attempt 38's host cost
  # the fast step with the history packed, the dense part around it compiled, bf16 throughout (attempts 40-43)
  [rank-packed]="rank --history iat --token-fetch ranges --bf16 --compile --reader-heads 1 --no-reader-only --pack-history"
  [rank-buckets128]="rank --history iat --token-fetch ranges --bf16 --compile --reader-heads 1 --no-reader-only --length-bucket 128"
  [rank-buckets32]="rank --history iat --token-fetch ranges --bf16 --compile --reader-heads 1 --no-reader-only --length-bucket 32"
  # TBE in the pipelined step at stage 1's batch (32768), with 4x the rows so rows repeat no more than at 8192
  [tbe-batch32k]="tbe --sets wide --batch 32768 --rows 4000000"
  [rank-d128-buckets]="rank --history iat --token-fetch ranges --bf16 --compile --reader-dim 128 --reader-heads 4 --no-reader-only --length-bucket 64"
)
ORDER="fetch rank-packed rank-fast rank-fast-h1 compress-fast rank-d128 rank-before compress-before tbe"
ORDER="$ORDER tbe-fp16 compress-fp16 compress-replicated rank-pre loader-fast rank-buckets rank-buckets32 rank-d128-buckets compress-graphs loader-buckets tbe-batch32k rank-buckets-eager rank-buckets128"
for name in ${ONLY:-$ORDER}; do
  echo "== $name: iat-rec bench ${STEPS[$name]}"
  start=$(date +%s)
  timeout "${STEP_S:-240}" $B ${STEPS[$name]} --out "$R/$name.json" > "$R/$name.log" 2>&1
  echo "   exit $? after $(( $(date +%s) - start )) s"
  grep -E "^(case|[a-z_]+ +[0-9])|samples/s|MFU|copy" "$R/$name.log" | head -14
  tar -C "$R" -czf "${OUT:-/tmp}/targets.tgz" .  # after every step: a cut call still returns what ran
done
python -m benchmarks.targets "$R" --out "$R" --command "source .gpu/setup.sh; ONLY=\"${ONLY:-$ORDER}\" benchmarks/gpu_targets.sh"
tar -C "$R" -czf "${OUT:-/tmp}/targets.tgz" .
