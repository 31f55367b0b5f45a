#!/usr/bin/env bash
# Every stage once on the GPU(s) through the real command line, on 2.03M synthetic instances; prints
# the samples/s each training run recorded in its result.json and the sharding of every table.
#   source .gpu/setup.sh; IAT_REC="python -m iat_rec.cli" W=/tmp/w benchmarks/gpu_smoke.sh
#   ... NPROC=2 ROW_WISE=1 benchmarks/gpu_smoke.sh      (2 GPUs, NCCL, every table row-wise)
# NPROC=1 produced the stage-1/stage-2 samples/s of the first session's closing note (one H100).
# Batch sizes are per rank, so NPROC=2 trains twice the samples per step.
set -euo pipefail
W=${W:-runs/gpu-smoke}
B=${IAT_REC:-.venv/bin/iat-rec}
N=${NPROC:-1}
mkdir -p "$W"
$B data synth --out "$W/log" --users 20000 --mean-instances 100 --seed 0
cons=()
if [ "${ROW_WISE:-0}" = 1 ]; then  # every stage-1 feature table row-wise (the planner would pick table-wise)
  python3 - "$W/log" "$W/row_wise.json" <<'PY'
import json, sys
from iat_rec.data.instance_log import InstanceLog
log = InstanceLog(sys.argv[1])
json.dump({f"t_{f.name}": {"sharding_types": ["row_wise"]} for f in log.schema.sparse}, open(sys.argv[2], "w"))
PY
  cons=(--constraints "$W/row_wise.json")
fi
$B compress --data "$W/log" --out "$W/s1t" --scheme temporal --nproc "$N" --batch-size 8192 --steps 150 --eval-batches 4 --no-progress "${cons[@]}"
$B compress --data "$W/log" --out "$W/s1u" --scheme user --window 64 --nproc "$N" --batch-size 128 --steps 150 --eval-batches 4 --no-progress "${cons[@]}"
$B export --stage1 "$W/s1u" --out "$W/tok" --nproc "$N" --dtype fp16 --batch-size 65536 --no-progress
$B rank --data "$W/log" --tokens "$W/tok" --stage1 "$W/s1u" --warm-start --history both --out "$W/r2" --nproc "$N" \
  --batch-size 2048 --steps 150 --eval-batches 4 --no-progress
for r in s1t s1u r2; do
  python3 - "$W/$r" "$r" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
d = json.loads((run / "result.json").read_text())
plan = json.loads((run / "plan.json").read_text())["plan"]
types = sorted({(t["sharding_type"], t["compute_kernel"]) for m in plan.values() for t in m.values()})
token = [t["sharding_type"] for m in plan.values() for name, t in m.items() if name == "iat_tokens"]
print(sys.argv[2], d["pipelined_modules"], "samples/s", round(d["samples_per_s"]), "plan", types, "token table", token or "-")
PY
done
