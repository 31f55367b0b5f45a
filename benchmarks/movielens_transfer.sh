#!/usr/bin/env bash
# Cross-task transfer on MovieLens-1M: tokens from a compressor trained on `like` (rating >= 4);
# the downstream ranker predicts `rating5` (rating == 5) with them and, as the baseline, with no
# history, at the same budget. CPU-sized (2 gloo ranks, a few minutes):
#   benchmarks/movielens_transfer.sh WORK_DIR
set -euo pipefail
W=${1:?usage: benchmarks/movielens_transfer.sh WORK_DIR}
B=${IAT_REC:-.venv/bin/iat-rec}
mkdir -p "$W"
[ -f "$W/ml/manifest.json" ] || $B data movielens --out "$W/ml"
M="--emb-dim 16 --hidden 128 --nproc 2 --no-progress"
$B compress --data "$W/ml" --out "$W/s1" --scheme temporal --tasks like --epochs 1 --batch-size 2048 --decompress 128 $M
$B export --stage1 "$W/s1" --out "$W/tok" --nproc 2 --batch-size 8192 --no-progress
R="--data $W/ml --tasks rating5 --steps 400 --batch-size 512 --max-len 32 --reader-layers 1 --eval-every 200 --eval-batches 40 $M"
$B rank $R --history none --out "$W/r-none"
$B rank $R --history iat --tokens "$W/tok" --out "$W/r-iat"
$B rank $R --history handcrafted --out "$W/r-handcrafted"
