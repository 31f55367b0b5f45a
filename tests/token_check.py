"""Run as a program by the tests (one process, a fresh process group): recomputes tokens of
some rows with the stage-1 model loaded on this world size, and prints them beside the
token table's rows as JSON."""

import json
import sys

import numpy as np
import torch

from iat_rec import checkpoint as ckpt
from iat_rec.batch import make_batch
from iat_rec.distenv import init_distributed
from iat_rec.loaders import user_windows
from iat_rec.token_table import TokenTable
from pipelines.compress import build_compressor, load_stage1
from pipelines.trainer import shard


def main(run: str, tokens: str) -> None:
    env = init_distributed("cpu")
    cfg, _, log = load_stage1(run)
    dmp, _ = shard(build_compressor(log, cfg), env, cfg, plan_out=None)
    ckpt.load_weights(ckpt.latest(run), dmp)
    dmp.eval()
    model = dmp.module
    start, n = user_windows(log, np.arange(log.rows), cfg.window)[0]
    rows = np.full(cfg.window, -1)
    rows[:n] = np.arange(start, start + n)
    with torch.no_grad():
        batch = make_batch(log, rows)
        pre = model.encode(batch)
        valid = batch.weights.view(1, -1) > 0
        post = model.sit(pre.view(1, cfg.window, -1), valid)[0]
    table = TokenTable(tokens)
    stored = table.read_rows(int(start), int(start + n)).float()
    print(json.dumps({"pre_sit": pre[:n].tolist(), "post_sit": post[:n].tolist(), "stored": stored.tolist()}))


if __name__ == "__main__":
    main(*sys.argv[1:])
