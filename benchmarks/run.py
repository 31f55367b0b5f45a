"""``iat-rec bench NAME [ARGS]``: runs ``benchmarks.NAME.main(ARGS)``.

    iat-rec bench list                 the benchmarks
    iat-rec bench tbe --help           a benchmark's options
    iat-rec bench rank --bf16 --out benchmarks/results/

Each benchmark also runs as ``python -m benchmarks.NAME``. On CPU they default to ``--tiny``
(CI size); on CUDA to the full size. Results: JSON under ``benchmarks/results/`` (or
``--out``) and a printed table.
"""

from __future__ import annotations

import importlib

from iat_rec.errors import IatError

BENCHMARKS: dict[str, str] = {
    "tbe": "stage-1 sharded EmbeddingBagCollection, forward + backward with the fused optimizer: GB/s vs copy",
    "compress": "stage-1 training step, temporal and user order: samples/s",
    "fetch": "frozen token-table lookup of B x T tokens: GB/s vs copy and index_select; ids vs ranges",
    "rank": "stage-2 training step: samples/s, reader MFU; IAT vs hand-crafted at the same T",
    "efficiency": "stage-2 step: hand-crafted sequence of K fields per step vs one IAT token, samples/s and memory",
    "loader": "CPU data path: samples/s per core vs what the GPU step consumes",
    "scaling": "1 vs 2 ranks (NCCL on GPUs, gloo on CPU), row-wise token table: samples/s ratio",
    "planner_sweep": "TorchRec planner over topologies and token-table sizes (no timing of steps)",
}


def usage() -> str:
    lines = ["usage: iat-rec bench NAME [ARGS...]", "", "benchmarks:"]
    lines += [f"  {name:<14} {text}" for name, text in BENCHMARKS.items()]
    lines.append("\n'iat-rec bench NAME --help' for its options.")
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        raise IatError(f"unknown benchmark {name!r}; one of {', '.join(BENCHMARKS)}")
    module = importlib.import_module(f"benchmarks.{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    from benchmarks.common import main_guard

    main_guard(cli)
