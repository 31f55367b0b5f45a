"""TBE: the stage-1 sharded EmbeddingBagCollection, forward and forward + backward with the
fused optimizer (row-wise Adagrad applied inside the backward kernel), as effective GB/s and
its ratio to the device's copy bandwidth measured in the same run.

    iat-rec bench tbe [--tables 16] [--rows 1000000] [--dim 128] [--pooling 16] [--batch 8192]

Two table sets, both sharded by the project's ``iat_rec.train.trainer.shard`` (TorchRec planner,
``apply_optimizer_in_backward``, DistributedModelParallel), table-wise with the fused kernel:

* ``stage1``: exactly the compressor's EBC on a synthetic log (one table per pooled sparse
  feature of the synthetic schema, ``--emb-dim``; the sequence features' tables are the
  EmbeddingCollection beside it), fed the log's own KJTs (``make_batch``). The
  synthetic vocabularies are small, so these tables sit in L2: a real-workload figure, not
  a roofline one.
* ``wide``: ``--tables`` tables named after the stage-1 features, ``--rows`` x ``--dim``
  each, ``--pooling`` uniform random ids per feature and sample: the tables dwarf L2,
  so the kernel streams rows from HBM. The TBE target (>= 60% of copy) applies here.

``pipelined_step`` is the same fused forward + backward inside the trainer's real step:
``TrainPipelineSparseDist`` over pinned host batches (copy to the device and input dist of
the next batch overlapped with this one), the EBC feeding a small dense head whose loss is
backpropagated, Adam on the head. Its ratio counts the forward + backward effective bytes
against the whole step: the TBE in the pipelined step (issue #18's ``tbe_copy_ratio_in_step``).

Effective bytes (FBGEMM's convention, fp32 pooled outputs): forward = lookups x D x w +
B x T x D x 4 (rows read, pooled output written); forward + backward adds B x T x D x 4
(output gradient read) and 2 x lookups x D x w (rows read and written by the fused update);
the optimizer's one float per row and the index sort are not counted. ``w`` is the weights'
bytes: 4, or 2 with ``--weights fp16`` (both sets; FBGEMM's update rounds stochastically).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from benchmarks import common
from iat_rec.batching.batch import PipelineableMixin
from iat_rec.batching.loaders import BatchDataset, time_order
from iat_rec.data.instance_log import time_split
from iat_rec.data.synth import synth_schema
from iat_rec.tables import DATA_TYPE_NUM_BITS, TABLE_DTYPES, model_tables
from iat_rec.train.config import TrainConfig
from iat_rec.train.trainer import make_optimizer, shard


class SparseArch(nn.Module):
    """The EBC alone: KJT -> pooled values [B, sum of dims] in table order."""

    def __init__(self, tables: list[EmbeddingBagConfig]):
        super().__init__()
        self.sparse = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.sparse(kjt).values()


class StepArch(nn.Module):
    """The EBC and a small dense head: a training step's shape for ``TrainPipelineSparseDist``."""

    def __init__(self, tables: list[EmbeddingBagConfig]):
        super().__init__()
        self.sparse = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
        self.head = nn.Linear(sum(t.embedding_dim for t in tables), 1)

    def forward(self, batch: SparseBatch) -> tuple[torch.Tensor, torch.Tensor]:
        loss = self.head(self.sparse(batch.sparse).values()).square().mean()
        return loss, loss.detach()


@dataclasses.dataclass
class SparseBatch(PipelineableMixin):
    sparse: KeyedJaggedTensor


@dataclasses.dataclass
class TableSet:
    name: str
    tables: list[EmbeddingBagConfig]
    kjts: list[KeyedJaggedTensor]  # on the device
    batch: int


def wide_tables(n: int, rows: int, dim: int, dtype: str = "fp32") -> list[EmbeddingBagConfig]:
    names = [f.name for f in synth_schema().sparse]
    names = [names[i % len(names)] + (f"_{i // len(names)}" if i >= len(names) else "") for i in range(n)]
    return [
        EmbeddingBagConfig(
            name=f"t_{f}", feature_names=[f], num_embeddings=rows, embedding_dim=dim, data_type=TABLE_DTYPES[dtype]
        )
        for f in names
    ]


def random_kjt(tables: list[EmbeddingBagConfig], batch: int, pooling: int, gen: torch.Generator) -> KeyedJaggedTensor:
    keys = [t.feature_names[0] for t in tables]
    values = torch.cat([torch.randint(0, t.num_embeddings, (batch * pooling,), generator=gen) for t in tables])
    lengths = torch.full((len(tables) * batch,), pooling, dtype=torch.int32)
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)


def measure(run: common.Run, env, ts: TableSet, optimizer: str) -> list[dict[str, Any]]:
    # table-wise with the fused kernel (data-parallel tables have no fused update)
    spec = {t.name: {"sharding_types": ["table_wise"], "compute_kernels": ["fused"]} for t in ts.tables}
    cfg = TrainConfig(
        batch_size=ts.batch,
        sparse_optimizer=optimizer,
        sparse_lr=0.01,
        constraints=common.write_constraints(run, ts.name, spec),
    )
    model, plan = shard(SparseArch(ts.tables), env, cfg, plan_out=None, bounds_check=False)
    kjts = ts.kjts
    lookups = sum(int(k.values().numel()) for k in kjts) / len(kjts)
    pooled = ts.batch * sum(t.embedding_dim for t in ts.tables)  # B x T x D
    w = DATA_TYPE_NUM_BITS[ts.tables[0].data_type] // 8  # bytes per weight (fp32 4, fp16 2)
    state = {"i": 0}

    def next_kjt() -> KeyedJaggedTensor:
        state["i"] += 1
        return kjts[state["i"] % len(kjts)]

    def fwd() -> None:
        with torch.no_grad():
            model(next_kjt())

    def fwd_bwd() -> None:
        model(next_kjt()).sum().backward()

    dim = ts.tables[0].embedding_dim
    out = []
    step_model, step_plan = shard(StepArch(ts.tables), env, cfg, plan_out=None, bounds_check=False)
    host = [SparseBatch(k.to("cpu")) for k in kjts]
    host = [b.pin_memory() for b in host] if run.cuda else host
    common.reset_peak_memory(run.device)
    t, pipelined = common.time_train_pipeline(
        run, f"{ts.name}/pipelined_step", step_model, make_optimizer(step_model, cfg), host
    )
    step_bytes = 3 * lookups * dim * w + 2 * pooled * 4
    gbs = step_bytes / (t.median_ms * 1e-3) / 1e9
    out.append(
        common.row(
            f"{ts.name}/pipelined_step",
            t,
            ts.batch,
            common.peak_memory_bytes(run.device),
            lookups_per_step=lookups,
            dim=dim,
            bytes_per_step=step_bytes,
            gbs=gbs,
            copy_ratio=common.ratio(gbs, run.limits["copy_gbs"]),
            pipelined_modules=pipelined,
            plan=sorted(set(common.plan_summary(step_plan).values())),
        )
    )
    step_model = None  # release before the next cases
    common.free(run.device)
    for case, fn, nbytes in (
        ("forward", fwd, lookups * dim * w + pooled * 4),
        ("forward_backward", fwd_bwd, 3 * lookups * dim * w + 2 * pooled * 4),
    ):
        common.reset_peak_memory(run.device)
        t = common.time_fn(fn, run.device, run.warmup, run.iters)
        common.profile_case(run, f"{ts.name}/{case}", fn)
        gbs = nbytes / (t.median_ms * 1e-3) / 1e9
        out.append(
            common.row(
                f"{ts.name}/{case}",
                t,
                ts.batch,
                common.peak_memory_bytes(run.device),
                tables=len(ts.tables),
                dim=dim,
                rows_total=sum(t_.num_embeddings for t_ in ts.tables),
                lookups_per_step=lookups,
                bytes_per_step=nbytes,
                gbs=gbs,
                copy_ratio=common.ratio(gbs, run.limits["copy_gbs"]),
                plan=sorted(set(common.plan_summary(plan).values())),
            )
        )
    model = None  # the cases hold it: release before free()
    common.free(run.device)
    return out


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser("tbe", __doc__)
    p.add_argument("--tables", type=int, default=None, help="wide set: tables (default 16; tiny 4)")
    p.add_argument("--rows", type=int, default=None, help="wide set: rows per table (default 1e6; tiny 2000)")
    p.add_argument("--dim", type=int, default=None, help="wide set: embedding dim (default 128; tiny 16)")
    p.add_argument(
        "--pooling", type=int, default=None, help="wide set: ids per feature and sample (default 16; tiny 2)"
    )
    p.add_argument("--batch", type=int, default=None, help="samples per step (default 8192; tiny 64)")
    p.add_argument("--emb-dim", type=int, default=None, help="stage1 set: embedding dim (default 16, ModelConfig's)")
    p.add_argument("--users", type=int, default=None, help="stage1 set: synthetic users (default 2000; tiny 60)")
    p.add_argument("--optimizer", default="rowwise_adagrad", help="fused sparse optimizer (the trainer's default)")
    p.add_argument("--sets", default="stage1,wide", help="comma list of table sets: stage1, wide")
    p.add_argument("--weights", default="fp32", choices=sorted(TABLE_DTYPES), help="the tables' weights dtype")
    args = p.parse_args(argv)
    with common.bench_run("tbe", args) as run, common.dist_env(run.device) as env:
        tiny = run.tiny
        batch = common.pick(args.batch, tiny, 64, 8192)
        n_tables = common.pick(args.tables, tiny, 4, 16)
        rows = common.pick(args.rows, tiny, 2000, 1_000_000)
        dim = common.pick(args.dim, tiny, 16, 128)
        pooling = common.pick(args.pooling, tiny, 2, 16)
        emb_dim = common.pick(args.emb_dim, tiny, 16, 16)
        users = common.pick(args.users, tiny, 60, 2000)
        sets = [s.strip() for s in args.sets.split(",") if s.strip()]
        gen = torch.Generator().manual_seed(args.seed)
        results: list[dict[str, Any]] = []
        config: dict[str, Any] = {"batch": batch, "optimizer": args.optimizer, "sets": sets, "weights": args.weights}
        if "stage1" in sets:
            log = common.synth_log(run, "tbe", users, 40 if tiny else 100)
            rows_ = time_order(log, time_split(log)["train"])
            ds = BatchDataset(log, rows_, batch)
            kjts = [b.sparse.to(run.device) for b in common.cached_batches(ds, 4, run.device)]
            tables = model_tables(log.schema, emb_dim, dtype=args.weights)[0]
            results += measure(run, env, TableSet("stage1", tables, kjts, batch), args.optimizer)
            config["stage1"] = {
                "log_rows": log.rows,
                "users": users,
                "emb_dim": emb_dim,
                "tables": len(tables),
                "rows_per_table": {t.name: t.num_embeddings for t in tables},
            }
        if "wide" in sets:
            tables = wide_tables(n_tables, rows, dim, args.weights)
            kjts = [random_kjt(tables, batch, pooling, gen).to(run.device) for _ in range(4)]
            results += measure(run, env, TableSet("wide", tables, kjts, batch), args.optimizer)
            config["wide"] = {
                "tables": n_tables,
                "rows": rows,
                "dim": dim,
                "pooling": pooling,
                "table_bytes": n_tables * rows * dim * DATA_TYPE_NUM_BITS[tables[0].data_type] // 8,
            }
        summary = []
        for r in results:
            if r["case"] == "wide/pipelined_step":
                summary.append(
                    common.summary_item(
                        run,
                        "tbe in the pipelined step (wide)",
                        r["gbs"],
                        "GB/s",
                        "copy bandwidth",
                        r["copy_ratio"],
                        "tbe_copy_ratio_in_step",
                    )
                )
            if r["case"].endswith("forward_backward"):
                summary.append(
                    common.summary_item(
                        run,
                        f"tbe {r['case']}",
                        r["gbs"],
                        "GB/s",
                        "copy bandwidth",
                        r["copy_ratio"],
                        "tbe_copy_ratio" if r["case"].startswith("wide") else None,
                    )
                )
        columns = common.DEFAULT_COLUMNS + (("GB/s", "gbs", ""), ("vs copy", "copy_ratio", "x"))
        common.finish(
            run,
            config,
            results,
            summary,
            columns,
            notes=["stage1 tables fit in L2 (synthetic vocabularies); wide is the roofline case"],
        )
    return 0


if __name__ == "__main__":
    common.main_guard(main)
