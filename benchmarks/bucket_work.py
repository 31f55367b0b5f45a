"""The transformer reader's work that length buckets leave, counted on the stage-2 bench log
(no timing).

    python -m benchmarks.bucket_work [--work DIR] [--buckets 32,64] [--batches 8]

For each L, with buckets rounded as before attempt 35 (width a multiple of L) and as now
(query + width a multiple of L), over the first training batches of ``bench rank``'s log
(3,000 users x 300, B 8192, T 256): the share, against reading every history at T, of the
steps read (query included), of the attention elements and of the attention tiles
(ceil(n / 64) x ceil(n / 128) for a sequence of n, the tile shape of cuDNN's flash kernels in
attempt 12's profile). Prints the markdown table of NOTES 35.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.rank import stage2_dataset
from iat_rec.batching.stage2_data import length_buckets
from iat_rec.data.instance_log import InstanceLog
from iat_rec.data.synth import generate
from modules.ranker import RankerConfig

T, BATCH = 256, 8192


def tiles(n: int) -> int:
    return math.ceil(n / 64) * math.ceil(n / 128)


def shares(lengths: list[np.ndarray], bucket: int, prefix: int) -> dict[str, float]:
    """Shares of the work at T of the transformer (its sequence: query + width) over the batches."""
    steps = elems = tile = rows = 0
    for length in lengths:
        start = 0
        for end, width in length_buckets(np.sort(length)[::-1], bucket, T, prefix):
            n, seq = end - start, width + 1
            steps, elems, tile, rows, start = steps + n * seq, elems + n * seq**2, tile + n * tiles(seq), rows + n, end
    full = T + 1
    return {"steps": steps / (rows * full), "elements": elems / (rows * full**2), "tiles": tile / (rows * tiles(full))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bucket_work", description=__doc__)
    p.add_argument("--work", default=None, help="directory for the synthetic log (default: a temporary one)")
    p.add_argument("--buckets", default="32,64", help="comma list of L")
    p.add_argument("--batches", type=int, default=8)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.work or tmp) / "rank-u3000-m300-s0"  # bench rank's log
        log = InstanceLog(path) if (path / "manifest.json").is_file() else generate(path, 3000, 300, seed=0)
        ds = stage2_dataset(log, "iat", BATCH, RankerConfig(max_len=T), 0, 1, seed=0, token_ids=False)
        lengths = [ds[i].hist_valid.sum(1).numpy() for i in range(min(args.batches, len(ds)))]
        print("| L | rounded | steps read | attention elements | attention tiles |\n|---|---|---|---|---|")
        for bucket in (int(x) for x in args.buckets.split(",")):
            for prefix, rounded in ((0, "width"), (1, "query + width")):
                s = shares(lengths, bucket, prefix)
                print(f"| {bucket} | {rounded} | {s['steps']:.3f} | {s['elements']:.3f} | {s['tiles']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
