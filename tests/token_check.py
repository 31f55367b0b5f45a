"""Run as a program by the tests (one process, a fresh process group): recomputes the tokens
of the first user window with the stage-1 model the table says encoded them (time-consistent
export: the snapshot before the window's training step), loaded on this world size, and
prints them beside the token table's rows as JSON."""

import json
import sys

import numpy as np
import torch

from iat_rec.batching.batch import make_batch
from iat_rec.batching.loaders import user_windows
from iat_rec.dist import checkpoint as ckpt
from iat_rec.dist.env import init_distributed
from iat_rec.tokens.export import token_sources
from iat_rec.tokens.table import TokenTable
from iat_rec.train.stage1 import build_compressor, first_train_step, load_stage1
from iat_rec.train.trainer import shard


def main(run: str, tokens: str) -> None:
    env = init_distributed("cpu")
    cfg, info, log = load_stage1(run)
    table = TokenTable(tokens)
    dmp, _ = shard(build_compressor(log, cfg), env, cfg, plan_out=None)
    start, n = user_windows(log, np.arange(log.rows), cfg.window)[0]
    sources, source_of_row = token_sources(run, cfg, info, log, table.manifest["tokens_from"])
    source = sources[source_of_row[start]]
    ckpt.load_weights(source, dmp)
    dmp.eval()
    model = dmp.module
    rows = np.full(cfg.window, -1)
    rows[:n] = np.arange(start, start + n)
    with torch.no_grad():
        batch = make_batch(log, rows)
        pre = model.encode(batch)
        valid = batch.weights.view(1, -1) > 0
        post = model.sit(pre.view(1, cfg.window, -1), valid)[0]
    stored = table.read_rows(int(start), int(start + n)).float()
    step = int(first_train_step(log, cfg, info["world_size"])[start])
    print(
        json.dumps(
            {
                "pre_sit": pre[:n].tolist(),
                "post_sit": post[:n].tolist(),
                "stored": stored.tolist(),
                "source": source.name,
                "train_step": step,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
