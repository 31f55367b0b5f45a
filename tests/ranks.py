"""One rank of ``tests.helpers.on_ranks``: ``python -m tests.ranks MODULE:FUNCTION RESULTS ARGS``,
started on each rank by the launcher.

It joins the gloo group (``init_distributed("cpu")``), runs ``FUNCTION(env, *json.loads(ARGS))``
and writes its return value, as JSON, to ``RESULTS/rank-<rank>.json``, or its traceback to
``RESULTS/rank-<rank>.error`` (exit code 1). It always leaves with the group destroyed, after a
barrier when the function returned (a gloo group alive at exit can abort a rank in its teardown).
"""

from __future__ import annotations

import importlib
import json
import os
import traceback
from pathlib import Path

import torch.distributed as dist

from iat_rec.dist.env import init_distributed, rank_main


def main(argv: list[str]) -> int:
    target, results, args = argv
    rank = os.environ["RANK"]
    try:
        env = init_distributed("cpu")
        module, name = target.split(":")
        out = getattr(importlib.import_module(module), name)(env, *json.loads(args))
        (Path(results) / f"rank-{rank}.json").write_text(json.dumps(out))
        dist.barrier()
    except Exception:
        (Path(results) / f"rank-{rank}.error").write_text(traceback.format_exc())
        return 1  # no barrier: a peer may wait in another collective (the launcher stops it)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    rank_main(main)
