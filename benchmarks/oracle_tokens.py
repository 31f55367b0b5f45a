"""Reference token tables for ablations. The oracle table of a synthetic log: row i holds the
generator's hidden user state z(t_i) at instance i (the thing a history reader should
recover), padded to ``--dim``. The shuffled table: an exported table with its rows permuted
(side info kept), so every history reads other instances' tokens.

    python -m benchmarks.oracle_tokens --data LOG --out TOKENS --users U --mean-instances M --seed S
    python -m benchmarks.oracle_tokens --shuffle TOKENS --out SHUFFLED

Stage 2 reading it (``iat-rec rank --history iat --tokens TOKENS``) bounds what tokens could
give its reader at that budget; the trained tables are measured against it. The generator
arguments must be the log's (the rows are checked against a fresh simulation).

Measured (2-core CPU, the demo log: 2,000 users x 100, seed 0; stage 2 one epoch, batch 256,
T 64, one-layer transformer, test click AUC; benchmarks/cpu_token_study.sh): oracle 0.7367,
labels-only 0.7155, time-consistent user-order tokens 0.7142, untrained tokens 0.7161, none 0.6965.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from iat_rec.data import synth
from iat_rec.data.instance_log import InstanceLog
from iat_rec.errors import IatError
from iat_rec.tokens.table import SIDE_ARRAYS, WEIGHT_KEY, TokenTable, save_table, token_collection


def shuffled_copy(tokens: str | Path, out: str | Path, seed: int = 0) -> Path:
    """``tokens`` with its rows permuted (seeded); manifest and side info kept."""
    table = TokenTable(tokens)
    rows = table.read_rows(0, table.rows)
    ec = token_collection(table.rows, table.dim, table.dtype, device="cpu")
    ec.state_dict()[WEIGHT_KEY].copy_(rows[torch.from_numpy(np.random.default_rng(seed).permutation(table.rows))])
    manifest = {k: v for k, v in table.manifest.items() if k not in ("format", "version")}
    return save_table(out, ec, manifest, {name: table.side(name) for name in SIDE_ARRAYS})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--shuffle", help="write a row-shuffled copy of this token table instead")
    p.add_argument("--data")
    p.add_argument("--users", type=int)
    p.add_argument("--mean-instances", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--dim", type=int, default=16)
    a = p.parse_args(argv)
    if a.shuffle:
        print(f"shuffled token table {shuffled_copy(a.shuffle, a.out)}")
        return
    if a.data is None or a.users is None or a.mean_instances is None or a.seed is None:
        p.error("the oracle table needs --data, --users, --mean-instances and --seed")
    log = InstanceLog(a.data)
    hidden: dict = {}
    cols = synth.build_columns(
        synth.SynthConfig(users=a.users, mean_instances=a.mean_instances, seed=a.seed), hidden=hidden
    )
    if not (np.array_equal(cols.ts, np.asarray(log.ts)) and np.array_equal(cols.user, np.asarray(log.user))):
        raise IatError(f"{a.data} is not the log of these generator arguments")
    z = hidden["z"].astype(np.float32)
    if a.dim < z.shape[1]:
        raise IatError(f"--dim must be >= the latent dim {z.shape[1]}")
    tokens = np.pad(z, ((0, 0), (0, a.dim - z.shape[1])))
    table = token_collection(log.rows, a.dim, "fp32", device="cpu")
    table.state_dict()[WEIGHT_KEY].copy_(torch.from_numpy(tokens))
    manifest = {
        "dim": a.dim,
        "dtype": "fp32",
        "rows": log.rows,
        "scheme": "oracle",
        "tokens_from": "oracle",
        "sources": {},
        "split": [0.8, 0.9],
        "tasks": log.schema.task_names,
        "token_stats": {"mean": tokens.mean(0).tolist(), "std": np.maximum(tokens.std(0), 1e-6).tolist()},
        "source_run": "oracle: the generator's hidden state",
        "source_checkpoint": "none",
        "source_fingerprint": f"oracle-{a.users}-{a.mean_instances}-{a.seed}",
        "log_fingerprint": log.fingerprint,
        "log_path": str(log.path.resolve()),
    }
    save_table(a.out, table, manifest, {name: getattr(log, name) for name in SIDE_ARRAYS})
    print(f"oracle token table {a.out}: {log.rows} rows x {a.dim}")


if __name__ == "__main__":
    main()
