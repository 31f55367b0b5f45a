#!/usr/bin/env bash
# Does IAT read its history? The seen-before check at CPU scale, 3 seeds, one rank:
#   benchmarks/cpu_seen_before.sh WORK        (2-core CPU: about 20 minutes)
# Log: 2,000 users x 100, label "the item is among the user's last 32 instances" (no feature of
# the candidate tells it). Variants: none, handcrafted, iat-user (tokens that keep item_id and
# category recoverable, read with the token query), iat-untrained; then the ablation iat-user
# with a stage 1 trained on its own label alone (--reconstruct 0). Reports under WORK/report*.
set -euo pipefail
W=${1:?usage: benchmarks/cpu_seen_before.sh WORK}
B=${IAT_REC:-.venv/bin/iat-rec}
mkdir -p "$W"
[ -f "$W/log/manifest.json" ] || $B data synth --out "$W/log" --users 2000 --mean-instances 100 --seed 0 --label seen-before --history-len 32
C=iat_rec/configs/seen_before_cpu
common=(--data "$W/log" --seeds 3 --nproc 1 --device cpu --dataset seen_before_cpu --rank-config "${C}_rank.yaml")
$B experiment "${common[@]}" --work "$W/exp" --report "$W/report" --variants none,handcrafted,iat-user,iat-untrained \
  --compress-config "${C}_compress.yaml" --title "Seen-before at CPU scale (T 32): tokens that keep their item"
sed 's/^reconstruct: 0.1 /reconstruct: 0.0 /' "${C}_compress.yaml" > "$W/own_label_only.yaml"
$B experiment "${common[@]}" --work "$W/exp-own-label" --report "$W/report-own-label" --variants iat-user \
  --compress-config "$W/own_label_only.yaml" --title "Seen-before at CPU scale (T 32): stage 1 on its own label alone"
