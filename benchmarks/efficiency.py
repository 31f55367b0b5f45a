"""Efficiency: the hand-crafted sequence with K fields per step against IAT's one 64-d token.

    iat-rec bench efficiency [--fields 2,8,21] [--max-lens 256,1024] [--tokens-per-step 2097152]

The paper's efficiency claim (arXiv 2604.08933): a hand-crafted behaviour sequence carries
K id fields per history step, each looked up in its (trainable) table and backpropagated, so
its step cost grows with K; an IAT history carries one frozen 64-d token per step, whatever
the instance held. Here the same stage-2 step (the project's ``Ranker``, planned and sharded,
``TrainPipelineSparseDist``; ``benchmarks.rank``'s cases) runs with a hand-crafted sequence
of the first K sparse features of the synthetic schema (item id and category first), and
with IAT, at each T. The batch is ``--tokens-per-step / T`` requests, so every T moves the
same number of history steps. Reported per case: samples/s, step time, peak memory, and
the ratio to IAT at the same T.

The schema's sequence is chosen in memory (``with_sequence``): the log on disk is one, only
which features the hand-crafted branch reads changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from benchmarks import common
from benchmarks import rank as stage2_bench
from iat_rec.train.config import ModelConfig
from modules.ranker import TOKEN_FETCHES, RankerConfig


def with_sequence(log, fields: int):
    """``log`` whose schema's hand-crafted sequence is its first ``fields`` sparse features
    (the schema's own sequence features first). A view: the files are not touched."""
    names = list(log.schema.sequence) + [f.name for f in log.schema.sparse if f.name not in log.schema.sequence]
    if not 1 <= fields <= len(names):
        raise ValueError(f"--fields {fields}: the schema has {len(names)} sparse features")
    view = type(log).__new__(type(log))
    view.__dict__.update(log.__dict__)
    view.schema = dataclasses.replace(log.schema, sequence=tuple(names[:fields]))
    return view


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser("efficiency", __doc__)
    p.add_argument("--fields", default=None, help="comma list of K (default 2,8,21; tiny 2,4)")
    p.add_argument("--max-lens", default=None, help="comma list of T (default 256,1024; tiny 8,16)")
    p.add_argument("--tokens-per-step", type=int, default=None, help="B x T (default 2097152; tiny 256)")
    p.add_argument("--users", type=int, default=None, help="synthetic users (default 1500; tiny 40)")
    p.add_argument("--mean-instances", type=float, default=None, help="per user (default 1200; tiny 30)")
    p.add_argument("--token-fetch", default="ranges", choices=list(TOKEN_FETCHES), help="IAT's token fetch")
    p.add_argument("--bf16", action=stage2_bench.argparse_bool(), default=True, help="bf16 history branches")
    p.add_argument("--compile", action="store_true", help="torch.compile the history branches")
    args = p.parse_args(argv)
    with common.bench_run("efficiency", args, warmup=(2, 5), iters=(3, 20)) as run, common.dist_env(run.device) as env:
        tiny = run.tiny
        fields = [int(x) for x in (args.fields or ("2,4" if tiny else "2,8,21")).split(",")]
        lens = [int(x) for x in (args.max_lens or ("8,16" if tiny else "256,1024")).split(",")]
        per_step = common.pick(args.tokens_per_step, tiny, 256, 2_097_152)
        log = common.synth_log(
            run, "efficiency", common.pick(args.users, tiny, 40, 1500), common.pick(args.mean_instances, tiny, 30, 1200)
        )
        m = ModelConfig() if not tiny else ModelConfig(emb_dim=8, hidden=64)
        rows: list[dict[str, Any]] = []
        for t in lens:
            batch = max(1, per_step // t)
            r = RankerConfig(max_len=t, token_fetch=args.token_fetch, compile=args.compile)
            if tiny:
                r.head = (32,)
            cases = [("iat", 0, log)] + [("handcrafted", k, with_sequence(log, k)) for k in fields]
            for history, k, view in cases:
                case = stage2_bench.build_case(run, env, view, history, r, m, batch, args.bf16)
                row = stage2_bench.measure_case(run, case)
                row.update(case=f"{history}-K{k}-T{t}" if k else f"iat-T{t}", fields=k, max_len=t, batch=batch)
                rows.append(row)
                case = None
                common.free(run.device)
        for row in rows:
            iat = next(x for x in rows if x["fields"] == 0 and x["max_len"] == row["max_len"])
            row["vs_iat_samples"] = common.ratio(row["samples_per_s"], iat["samples_per_s"])
            row["vs_iat_memory"] = common.ratio(row["peak_mem_bytes"], iat["peak_mem_bytes"])
        summary = [
            common.summary_item(
                run,
                f"hand-crafted K {row['fields']} / IAT samples/s, T {row['max_len']}",
                row["samples_per_s"],
                "samples/s",
                "iat",
                row["vs_iat_samples"],
            )
            for row in rows
            if row["fields"]
        ]
        config = {
            "fields": fields,
            "max_lens": lens,
            "tokens_per_step": per_step,
            "model": dataclasses.asdict(m),
            "token_fetch": args.token_fetch,
            "bf16": args.bf16,
            "compile": args.compile,
            "log_rows": log.rows,
            "sequence_order": list(with_sequence(log, len(log.schema.sparse)).schema.sequence),
        }
        columns = common.DEFAULT_COLUMNS + (
            ("B", "batch", ""),
            ("mean len", "mean_history_len", ""),
            ("vs IAT samples/s", "vs_iat_samples", "x"),
            ("vs IAT memory", "vs_iat_memory", "x"),
        )
        common.finish(run, config, rows, summary, columns)
    return 0


if __name__ == "__main__":
    common.main_guard(main)
