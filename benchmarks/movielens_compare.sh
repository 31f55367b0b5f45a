#!/usr/bin/env bash
# The MovieLens-1M comparison of benchmarks/results/movielens/ (none, hand-crafted, IAT temporal,
# IAT user-order, both; 3 seeds; one GPU). Ran on one H100 through the device tool as
#   W=/tmp/w benchmarks/movielens_compare.sh      (after `source .gpu/setup.sh`, IAT_REC="python -m iat_rec.cli")
# Re-running the same command continues an interrupted experiment (completed stages are reused).
set -euo pipefail
W=${W:-runs/movielens}
B=${IAT_REC:-.venv/bin/iat-rec}
mkdir -p "$W"
[ -f "$W/ml/manifest.json" ] || $B data movielens --out "$W/ml" ${ML_SOURCE:+--source "$ML_SOURCE"}
$B experiment --data "$W/ml" --work "$W/mlexp" --seeds 3 --nproc 1 \
  --compress-config iat_rec/configs/movielens_compress.yaml --rank-config iat_rec/configs/movielens_rank.yaml \
  --title "MovieLens-1M: history variants (one H100, 3 seeds)"
