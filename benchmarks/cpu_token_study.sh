#!/usr/bin/env bash
# What do the tokens add? The CPU study behind the README's "where the gap is" figures, on the
# demo log (2,000 users x 100, seed 0), one rank, the same stage-2 budget for every table:
#   benchmarks/cpu_token_study.sh WORK        (2-core CPU: about 20 minutes)
# Stage 1: user order (the default: SIT label side info, item_id and category recoverable from
# the token), without the label side info, on its own label alone (--reconstruct 0), and with
# every sparse feature recoverable; export time-consistent, initial (untrained) and an oracle
# table (the generator's hidden state). Stage 2 reads each
# (features query), the labels alone, nothing, a row-shuffled table, and the token query.
set -euo pipefail
W=${1:?usage: benchmarks/cpu_token_study.sh WORK}
B=${IAT_REC:-.venv/bin/iat-rec}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$W"
[ -f "$W/log/manifest.json" ] || $B data synth --out "$W/log" --users 2000 --mean-instances 100 --seed 0
SPARSE=$($PY -c "from iat_rec.data.instance_log import InstanceLog; print(*(f.name for f in InstanceLog('$W/log').schema.sparse))")
S1="--data $W/log --nproc 1 --scheme user --window 32 --batch-size 16 --epochs 1 --eval-batches 40 --no-progress --overwrite"
$B compress $S1 --sit-labels --out "$W/s1" | grep "valid click" | tail -1
$B compress $S1 --no-sit-labels --out "$W/s1-nolabels" | grep "valid click" | tail -1
$B compress $S1 --reconstruct 0 --out "$W/s1-own-label" | grep "valid click" | tail -1
$B compress $S1 --reconstruct-features $SPARSE --out "$W/s1-all-features" | grep "valid click" | tail -1
for m in time-consistent initial; do
  $B export --stage1 "$W/s1" --out "$W/tok-$m" --tokens-from "$m" --nproc 1 --no-progress --overwrite | grep "leak gap"
done
for s in nolabels own-label all-features; do
  $B export --stage1 "$W/s1-$s" --out "$W/tok-$s" --nproc 1 --no-progress --overwrite | grep "leak gap"
done
$PY -m benchmarks.oracle_tokens --data "$W/log" --out "$W/tok-oracle" --users 2000 --mean-instances 100 --seed 0
$PY -m benchmarks.oracle_tokens --shuffle "$W/tok-time-consistent" --out "$W/tok-shuffled"
R="--data $W/log --nproc 1 --batch-size 256 --epochs 1 --eval-every 300 --eval-batches 40 --no-progress --max-len 64 --reader-layers 1 --overwrite"
$B rank $R --history none --out "$W/r-none" | grep "stage 2 done"
$B rank $R --history labels --out "$W/r-labels-only" | grep "stage 2 done"
for t in time-consistent nolabels own-label all-features initial shuffled oracle; do
  $B rank $R --history iat --tokens "$W/tok-$t" --out "$W/r-iat-$t" | grep "stage 2 done"
done
$B rank $R --history iat --query token --tokens "$W/tok-time-consistent" --out "$W/r-iat-token-query" | grep "stage 2 done"
