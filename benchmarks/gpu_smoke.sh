#!/usr/bin/env bash
# Every stage once on one GPU through the real command line, on 2.03M synthetic instances; prints
# the samples/s each training run recorded in its result.json. Produced the stage-1/stage-2
# samples/s of the first session's closing note, on one H100 through the device tool:
#   source .gpu/setup.sh; IAT_REC="python -m iat_rec.cli" W=/tmp/w benchmarks/gpu_smoke.sh
set -euo pipefail
W=${W:-runs/gpu-smoke}
B=${IAT_REC:-.venv/bin/iat-rec}
mkdir -p "$W"
$B data synth --out "$W/log" --users 20000 --mean-instances 100 --seed 0
$B compress --data "$W/log" --out "$W/s1t" --scheme temporal --nproc 1 --batch-size 8192 --steps 150 --eval-batches 4 --no-progress
$B compress --data "$W/log" --out "$W/s1u" --scheme user --window 64 --nproc 1 --batch-size 128 --steps 150 --eval-batches 4 --no-progress
$B export --stage1 "$W/s1u" --out "$W/tok" --nproc 1 --dtype fp16 --batch-size 65536 --no-progress
$B rank --data "$W/log" --tokens "$W/tok" --stage1 "$W/s1u" --warm-start --history both --out "$W/r2" --nproc 1 \
  --batch-size 2048 --steps 150 --eval-batches 4 --no-progress
for r in s1t s1u r2; do
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d['pipelined_modules'], 'samples/s', round(d['samples_per_s']))" "$W/$r/result.json" "$r"
done
