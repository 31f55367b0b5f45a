#!/usr/bin/env bash
# Cross-task transfer on MovieLens-1M: tokens from a compressor trained on `like` (rating >= 4);
# the downstream ranker predicts `rating5` (rating == 5) with them and, as baselines, with no
# history, the labels alone and the hand-crafted sequence, at the same budget. CPU-sized (2 gloo
# ranks, a few minutes); writes WORK_DIR/transfer.json from the runs' metrics.json:
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
$B rank $R --history labels --out "$W/r-labels-only"
$B rank $R --history handcrafted --out "$W/r-handcrafted"
python3 - "$W" "$0 $*" <<'PY'
import json, platform, os, sys
from pathlib import Path
w = Path(sys.argv[1])
runs = {name: json.loads((w / f"r-{name}" / "metrics.json").read_text()) for name in ("none", "labels-only", "iat", "handcrafted")}
out = {"what": "cross-task transfer on MovieLens-1M: stage 1 trained on like (rating >= 4), stage 2 predicts rating5 (rating == 5)",
       "machine": f"cpu ({platform.machine()}, {os.cpu_count()} cores), 2 gloo ranks", "command": sys.argv[2], "logloss_unit": "nats",
       "budget": "stage 1: temporal, 1 epoch, batch 2048/rank, time-consistent export; stage 2: 400 steps, batch 512/rank, T 32, "
                 "1-layer transformer reader",
       "results": [{"variant": k, **{m: v[m] for m in ("auc", "gauc", "logloss", "ne", "n", "task")}} for k, v in runs.items()]}
(w / "transfer.json").write_text(json.dumps(out, indent=1))
PY
