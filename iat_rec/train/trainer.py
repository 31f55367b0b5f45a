"""The training loop every stage shares: TorchRec sharding, train pipeline, eval, checkpoints.

SPMD: every rank runs the same program. Sparse tables are planned by TorchRec's planner on
a topology built from the launcher's environment, sharded by DistributedModelParallel, and
their optimizer is fused into the backward pass. The loop runs TrainPipelineSparseDist
(device copy and input all-to-all overlapped with forward/backward), evaluates with the
pipeline detached, logs to TensorBoard and saves DCP checkpoints that resume exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import shutil
import sys
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from iat_rec.batching.loaders import BatchDataset, EpochLoader
from iat_rec.dist import checkpoint as ckpt
from iat_rec.dist.atomic import read_json, write_json, write_text
from iat_rec.dist.env import DistEnv, launched, run_ranks
from iat_rec.errors import IatError
from iat_rec.eval.metrics import EvalMetrics
from iat_rec.sharding.constraints import parse_constraints, placement_constraints
from iat_rec.sharding.plan_json import load_plan, plan_to_json, save_plan
from iat_rec.sharding.planning import make_plan, without_bounds_check
from iat_rec.sharding.topology import build_topology
from iat_rec.tables import module_table_configs
from iat_rec.train.config import TrainConfig, add_flags, resolve, to_dict
from iat_rec.train.run_dir import RUN_INFO, read_run


def _sparse_optimizer(name: str, lr: float) -> tuple[type, dict[str, Any]]:
    import torchrec.optim as trec_optim

    table = {
        "rowwise_adagrad": (trec_optim.RowWiseAdagrad, {"lr": lr}),
        "adagrad": (torch.optim.Adagrad, {"lr": lr}),
        "sgd": (torch.optim.SGD, {"lr": lr}),
        "adam": (torch.optim.Adam, {"lr": lr}),
    }
    if name not in table:
        raise IatError(f"sparse optimizer '{name}' not in {sorted(table)}")
    return table[name]


def embedding_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of every embedding collection in ``model`` (they get the fused optimizer)."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    return [
        p
        for m in model.modules()
        if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))
        for p in m.parameters()
    ]


def shard(
    model: nn.Module,
    env: DistEnv,
    cfg: TrainConfig,
    plan_out: Path | None,
    plan=None,
    extra_constraints: dict | None = None,
    plan_batch: int | None = None,
    bounds_check: bool = True,
) -> tuple[DistributedModelParallel, Any]:
    """Fuses the sparse optimizer into every table not frozen, plans (or reuses ``plan``),
    shards; returns (dmp, plan). ``plan_batch``: the per-rank batch the planner is told
    (default ``cfg.batch_size``); ``bounds_check=False``: FBGEMM's id check off (benchmarks)."""
    cls, kw = _sparse_optimizer(cfg.sparse_optimizer, cfg.sparse_lr)
    frozen = frozen_tables(model)
    params = [p for p in embedding_params(model) if p.requires_grad]
    if params:
        apply_optimizer_in_backward(cls, params, kw)
    if plan is None:
        topology = build_topology(env.world_size, env.local_world_size, env.device.type, hbm_gb=cfg.hbm_gb or None)
        constraints = dict(extra_constraints or {})
        if cfg.constraints:
            constraints.update(
                parse_constraints(read_json(cfg.constraints, f"constraints file not found: {cfg.constraints}"))
            )
        constraints = placement_constraints(module_table_configs(model), cfg.replicate_rows, constraints)
        plan = make_plan(model, topology, plan_batch or cfg.batch_size, constraints, pg=dist.group.WORLD)
    if not bounds_check:
        plan = without_bounds_check(plan)
    if env.is_main and plan_out is not None:
        save_plan(plan, plan_out)
        print(f"sharding plan ({len(plan.plan)} modules) saved to {plan_out}", flush=True)
    dmp = DistributedModelParallel(module=model, device=env.device, plan=plan)
    _FROZEN[dmp] = frozen
    return dmp, plan


# The frozen tables of each sharded model, read before sharding: TorchRec's sharded modules
# do not keep requires_grad.
_FROZEN: weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]] = weakref.WeakKeyDictionary()


def frozen_tables(model: nn.Module) -> tuple[str, ...]:
    """Module paths of the embedding collections marked ``requires_grad=False`` (the token
    table, ``tables.frozen_collection``): no optimizer steps them and checkpoints leave them
    out; they are always reloaded from their token-table directory."""
    if isinstance(model, DistributedModelParallel):
        return _FROZEN.get(model, ())
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    return tuple(
        name
        for name, m in model.named_modules()
        if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))
        and not any(p.requires_grad for p in m.parameters())
    )


BEST = "best"  # RUN/best: the weights of the best evaluation (early stopping)
STOPPED = "stopped.json"  # RUN/stopped.json: the run stopped at --time-limit, unfinished (removed when it goes on)
EXIT_STOPPED = 75  # the exit code of a program whose run stopped at --time-limit (EX_TEMPFAIL: run it again)


def snapshot_path(run: Path, step: int) -> Path:
    return Path(run) / "snapshots" / f"step_{step:08d}"


def make_optimizer(model: DistributedModelParallel, cfg: TrainConfig) -> CombinedOptimizer:
    """Every trainable table gets the sparse optimizer (``--sparse-optimizer``, ``--sparse-lr``):
    fused into the backward where the table is sharded, a plain step after DDP's all-reduce
    where it is data-parallel, so where the planner puts a table does not change how it
    learns. The dense parameters get Adam (``--dense-lr``)."""
    from torchrec.distributed.types import ShardedModule

    cls, kw = _sparse_optimizer(cfg.sparse_optimizer, cfg.sparse_lr)
    sharded = tuple(path for path, m in model.module.named_modules() if isinstance(m, ShardedModule))
    loose = dict(in_backward_optimizer_filter(model.named_parameters()))  # no fused optimizer of their own
    replicated = {k: p for k, p in loose.items() if ckpt.under(k, sharded)}
    dense = {k: p for k, p in loose.items() if k not in replicated}
    frozen = frozen_tables(model)
    parts = [(key, opt) for key, opt in model.fused_optimizer.optimizers if not ckpt.under(key, frozen)]
    if replicated:
        parts.append(KeyedOptimizerWrapper(replicated, lambda params: cls(params, **kw)))
    parts.append(KeyedOptimizerWrapper(dense, lambda params: torch.optim.Adam(params, lr=cfg.dense_lr)))
    return CombinedOptimizer(parts)


@dataclasses.dataclass
class Trainer:
    env: DistEnv
    cfg: TrainConfig
    model: DistributedModelParallel
    optimizer: CombinedOptimizer
    train: BatchDataset
    valid: BatchDataset | None
    tasks: list[str]
    samples_per_batch: int  # instances per rank per step (for samples/s)
    run_info: dict[str, Any] | None = None  # RUN/run.json, written once a resume has loaded
    snapshots: tuple[int, ...] = ()  # steps (0: before training) whose weights go to RUN/snapshots/

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def total_steps(self) -> int:
        return total_steps(self.cfg, len(self.train))

    def _app_state(self, step: int) -> dict[str, Any]:
        return {"model": self._weights(), "optim": self.optimizer.state_dict(), "step": step}

    def _load_trained_state(self, load) -> Any:
        """Model weights (the frozen token table aside) and optimizer state, read by
        ``load(state)`` from a checkpoint; returns what ``load`` returns."""
        self.optimizer.init_state()  # materialise lazy optimizer state so DCP can load into it
        state = {"model": self._weights(), "optim": self.optimizer.state_dict()}
        out = load(state)
        # a full dict: TorchRec's sharded modules refuse a partial load_state_dict
        self.model.load_state_dict({**self.model.state_dict(), **state["model"]})
        self.optimizer.load_state_dict(state["optim"])
        return out

    def _restore(self, loader: EpochLoader) -> int:
        path = ckpt.latest(self.out)
        if path is None:
            return 0
        rank_state = self._load_trained_state(lambda state: ckpt.load(path, state))  # with this rank's loader state
        loader.load_state_dict(rank_state["loader"])
        ckpt.set_rng_state(rank_state["rng"])
        step = int(rank_state["step"])
        if self.env.is_main:
            print(f"resumed from {path} at step {step}", flush=True)
        return step

    def _save(self, step: int, loader: EpochLoader, consumed: int) -> None:
        rank_state = {"step": step, "loader": loader.state_at(consumed), "rng": ckpt.rng_state()}
        path = ckpt.save(self.out, step, self._app_state(step), rank_state, keep=self.cfg.keep_checkpoints)
        if self.env.is_main:
            print(f"checkpoint {path}", flush=True)

    def _start_from(self, run: str) -> None:
        """--resume-from: the weights and optimizer state of another run's latest checkpoint;
        the frozen token table stays this run's. DCP reshards across world sizes, but the
        optimizer state has the shape of its plan: a table sharded otherwise is refused."""
        check_same_sharding(self.model.plan, load_plan(Path(run) / "plan.json"), run, frozen_tables(self.model))
        path = ckpt.latest(run)
        self._load_trained_state(lambda state: ckpt.dcp_load(state, path))  # any world size
        if self.env.is_main:
            print(f"started from {path}", flush=True)

    def _history(self) -> list[dict]:
        path = self.out / "eval_history.json"
        return json.loads(path.read_text()) if self.cfg.resume and path.is_file() else []

    def _weights(self) -> dict[str, Any]:
        frozen = frozen_tables(self.model)
        return {k: v for k, v in self.model.state_dict().items() if not ckpt.under(k, frozen)}

    def _snapshot(self, step: int) -> None:
        ckpt.save_snapshot(
            snapshot_path(self.out, step), self._weights(), {"step": step, "world_size": self.env.world_size}
        )

    def _best(self) -> dict | None:
        meta = self.out / BEST / "meta.json"
        return json.loads(meta.read_text()) if meta.is_file() else None

    def _track_best(self, step: int, metrics: dict) -> int:
        """Keeps the model of the best valid AUC (first task) in RUN/best; returns the number of
        evaluations since the best one."""
        auc = metrics[self.tasks[0]]["auc"]
        best = self._best()
        if best is None or auc > best["auc"]:
            ckpt.save_snapshot(self.out / BEST, self._weights(), {"step": step, "auc": auc, "metrics": metrics})
            return 0
        return (step - best["step"]) // (self.cfg.eval_every or self.total_steps())

    def restore_best(self) -> dict | None:
        """Loads RUN/best into the model (early stopping); returns its meta (step, auc, metrics)."""
        best = self._best()
        if best is not None:
            ckpt.load_weights(self.out / BEST, self.model, skip=frozen_tables(self.model))
            if self.env.is_main:
                print(f"restored the best model: step {best['step']}, valid auc {best['auc']:.4f}", flush=True)
        return best

    def evaluate(self, dataset: BatchDataset, max_batches: int = 0) -> dict[str, dict[str, float]]:
        return evaluate(self.model, dataset, self.env, self.tasks, max_batches)

    def fit(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        loader = EpochLoader(self.train, num_workers=self.cfg.num_workers, pin_memory=self.env.device.type == "cuda")
        start = self._restore(loader) if self.cfg.resume else 0
        if start == 0 and self.env.is_main:  # a fresh run (--overwrite) keeps nothing of an earlier one
            for stale in (BEST, "checkpoints", "snapshots", "tb"):
                shutil.rmtree(self.out / stale, ignore_errors=True)
        if start == 0 and self.cfg.resume_from:
            self._start_from(self.cfg.resume_from)
        if self.env.is_main and self.run_info is not None:
            write_json(self.out / RUN_INFO, self.run_info)
        if self.env.is_main:
            (self.out / STOPPED).unlink(missing_ok=True)
        deadline = time.monotonic() + self.cfg.time_limit if self.cfg.time_limit else None
        steps = self.total_steps()
        writer = _writer(self.out / "tb") if self.env.is_main else None
        log_file = None
        if self.env.is_main:
            log_path = self.out / "train_log.jsonl"
            truncate_log(log_path, start)
            log_file = open(log_path, "a", buffering=1)  # whole lines reach the file before a kill
        bar = progress_bar(steps, start, "train", "step", self.env.is_main and self.cfg.progress)
        history: list[dict] = [h for h in self._history() if h["step"] <= start]  # a resumed run keeps its evaluations
        it = iter(loader)
        self.model.train()
        t_last, step = time.perf_counter(), start
        pipelined: list[str] = []
        durations: list[float] = []  # seconds per training step, evaluation and checkpoints excluded
        snapshots = {s for s in self.snapshots if start <= s <= steps}
        if start == 0 and 0 in snapshots:
            self._snapshot(0)
        stopped = timed_out = False
        for seg_start, seg_end in segments(start, steps, self.cfg.eval_every, self.cfg.ckpt_every, snapshots):
            # One pipeline per segment over exactly its batches: it drains at the segment's end,
            # so evaluation and checkpoints never interleave with an in-flight input dist, and
            # the loader has handed out exactly the batches the model consumed.
            pipeline = TrainPipelineSparseDist(self.model, self.optimizer, self.env.device, execute_all_batches=True)
            seg_it = itertools.islice(it, seg_end - seg_start)
            for step in range(seg_start + 1, seg_end + 1):
                # at least one step a job, so that every job moves the run on
                if deadline is not None and step > start + 1 and self._past(deadline):
                    step, timed_out = step - 1, True
                    break
                loss_value = float(pipeline.progress(seg_it)[0])
                if not pipelined:
                    # a sharded module whose input the model changes first is silently not pipelined
                    pipelined = sorted(type(m).__name__ for m in pipeline._pipelined_modules)
                if not math.isfinite(loss_value):
                    raise IatError(f"loss is {loss_value} at step {step}: lower --dense-lr/--sparse-lr")
                now = time.perf_counter()
                durations.append(now - t_last)
                sps = self.samples_per_batch * self.env.world_size / max(now - t_last, 1e-9)
                t_last = now
                if self.env.is_main:
                    log_file.write(json.dumps({"step": step, "loss": loss_value}) + "\n")
                    writer.add_scalar("train/loss", loss_value, step)
                    writer.add_scalar("train/samples_per_s", sps, step)
                    writer.add_scalar("train/dense_lr", self.cfg.dense_lr, step)
                    bar.set_postfix(loss=f"{loss_value:.4f}", sps=f"{sps:,.0f}", refresh=False)
                    bar.update(1)
            # a batch the pipeline had prefetched is dropped: the loader state saved counts consumed ones
            pipeline.detach()
            if timed_out:
                self._save(step, loader, consumed=step - start)
                if self.env.is_main:
                    write_json(self.out / STOPPED, {"step": step, "steps": steps, "time_limit": self.cfg.time_limit})
                    tqdm.write(
                        f"stopped at --time-limit {self.cfg.time_limit:g} s after step {step} of {steps}: "
                        "run the same command with --resume to go on"
                    )
                break
            if step in snapshots and step > 0:
                self._snapshot(step)
            if self.valid is not None and (step == steps or (self.cfg.eval_every and step % self.cfg.eval_every == 0)):
                history.append(self._log_eval(step, self.evaluate(self.valid, self.cfg.eval_batches), writer))
                if self.cfg.early_stop:
                    stopped = self._track_best(step, history[-1]["metrics"]) >= self.cfg.early_stop and step < steps
            if step == steps or stopped or (self.cfg.ckpt_every and step % self.cfg.ckpt_every == 0):
                self._save(step, loader, consumed=step - start)
            t_last = time.perf_counter()
            if stopped:
                if self.env.is_main:
                    tqdm.write(f"early stop at step {step}: no better valid auc in {self.cfg.early_stop} evaluations")
                break
        bar.close()
        result: dict[str, Any] = {"steps": step, "pipelined_modules": pipelined, "stopped_at_time_limit": timed_out}
        if len(durations) > 10:  # the first steps trace the model and warm up kernels
            result["samples_per_s"] = self.samples_per_batch * self.env.world_size / float(np.median(durations[5:]))
        if self.valid is not None and history:
            result["valid"] = history[-1]["metrics"]
        if self.cfg.early_stop and not timed_out:
            best = self.restore_best()
            if best is not None:
                result.update(valid=best["metrics"], best_step=best["step"], stopped_early=stopped)
        if self.env.is_main:
            log_file.close()
            writer.close()
            write_json(self.out / "eval_history.json", history)  # the config is in run.json, once
        return result

    def _past(self, deadline: float) -> bool:
        """Whether any rank is past ``deadline``: every rank stops after the same step."""
        late = torch.tensor([float(time.monotonic() > deadline)], device=self.env.device)
        if dist.is_initialized():
            dist.all_reduce(late, op=dist.ReduceOp.MAX)
        return bool(late.item())

    def _log_eval(self, step: int, metrics: dict, writer) -> dict:
        if self.env.is_main:
            for task, vals in metrics.items():
                for k, v in vals.items():
                    if k != "n":  # logloss in nats
                        writer.add_scalar(f"valid/{task}/{k}", v, step)
            summary = ", ".join(
                f"{t}: auc {m['auc']:.4f} gauc {m['gauc']:.4f} logloss {m['logloss']:.4f} nats ne {m['ne']:.4f}"
                for t, m in metrics.items()
            )
            tqdm.write(f"step {step} valid {summary}")
        return {"step": step, "metrics": metrics}


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """The run's training steps: ``--steps``, else ``--epochs`` over the training batches."""
    if cfg.steps > 0:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * batches_per_epoch))


def truncate_log(path: Path, step: int) -> None:
    """Keeps the lines of steps up to ``step``: a resumed run logs the later ones again, so
    the log of a run killed and resumed holds every step once."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        if json.loads(line)["step"] > step:
            break  # a kill can tear only a line after the checkpoint, never parsed here
        kept.append(line)
    write_text(path, "".join(kept))


def segments(
    start: int, steps: int, eval_every: int, ckpt_every: int, stops: Iterable[int] = ()
) -> list[tuple[int, int]]:
    """(first, last] step ranges between evaluations/checkpoints/``stops``, ending at ``steps``."""
    ends = {steps} | {s for every in (eval_every, ckpt_every) if every for s in range(every, steps, every)}
    ends |= {s for s in stops if 0 < s < steps}
    ends = sorted(e for e in ends if e > start)
    return list(zip([start] + ends[:-1], ends))


def evaluate(
    model: nn.Module, dataset: BatchDataset, env: DistEnv, tasks: list[str], max_batches: int = 0
) -> dict[str, dict[str, float]]:
    """Metrics of ``model`` over ``dataset`` (collective; every rank gets the same figures)."""
    n = len(dataset) if max_batches <= 0 else min(max_batches, len(dataset))
    metrics = EvalMetrics(tasks)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(n):
            _, (_, logits, labels, weights, users) = model(dataset[i].to(env.device))
            metrics.update(logits, labels, weights, users)
    model.train(was_training)
    return metrics.compute()


# what a resume may change: the budget and how it is run, never the model, data or optimisation
# (a moved run or log is the same: the log is compared by fingerprint)
RESUMABLE = {
    "steps",
    "epochs",
    "eval_every",
    "eval_batches",
    "ckpt_every",
    "keep_checkpoints",
    "num_workers",
    "progress",
    "resume",
    "overwrite",
    "device",
    "hbm_gb",
    "constraints",
    "time_limit",
    "out",
    "data",
}


def changed_options(recorded: dict, cfg: TrainConfig, allowed: set[str]) -> list[str]:
    """The options outside ``allowed`` whose value in ``cfg`` differs from a run.json's ``config``."""
    was = {k: v for k, v in recorded.items() if k not in allowed}
    now = {k: v for k, v in json.loads(json.dumps(to_dict(cfg))).items() if k not in allowed}  # tuples -> lists
    return sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))


def check_resume(cfg: TrainConfig, env: DistEnv, log_fingerprint: str) -> None:
    """Refuses, before the run's files are rewritten, a resume on another world size, of
    another instance log, or with any option but the budget changed (``RESUMABLE``)."""
    path = ckpt.latest(cfg.out) if cfg.resume else None
    if path is None:
        return
    ckpt.check_world_size(path, env.world_size)
    info = read_run(cfg.out)
    if info.get("log_fingerprint") != log_fingerprint:
        raise IatError(
            f"--resume: {cfg.out} was trained on instance log {info.get('log_fingerprint')}, "
            f"{cfg.data} is {log_fingerprint}: start a new run"
        )
    changed = changed_options(info["config"], cfg, RESUMABLE)
    if changed:
        raise IatError(
            f"--resume: {cfg.out} was trained with other {', '.join(changed)} "
            f"(only {', '.join(sorted(RESUMABLE - {'resume', 'overwrite', 'out', 'data'}))} may change): "
            "start a new run"
        )


# what --resume-from may change from the earlier run: the data (a later version), the budget and
# how it is run, the tables it reads, seed, split and learning rates; never the model
CONTINUABLE = RESUMABLE | {
    "resume_from",
    "tokens",
    "stage1",
    "seed",
    "split",
    "dense_lr",
    "sparse_lr",
    "early_stop",
    "slices",
    "warm_start",
}


def check_resume_from(cfg: TrainConfig, stage: str, log) -> dict:
    """Refuses, before any rank starts, a --resume-from run that is not a finished run of this
    stage, with this model, on an earlier version of ``log``; returns what run.json records."""
    if not cfg.resume_from:
        return {}
    run = Path(cfg.resume_from)
    info = read_run(run, stage, "--resume-from")
    last = ckpt.latest(run)
    if last is None:
        raise IatError(f"--resume-from {run}: no checkpoint (it has not finished)")
    version = log.version_index(info["log_fingerprint"])
    if version == len(log.segments) - 1:
        raise IatError(
            f"--resume-from {run} was trained on {cfg.data} itself: nothing was appended since (iat-rec data append)"
        )
    changed = changed_options(info["config"], cfg, CONTINUABLE)
    if changed:
        raise IatError(
            f"--resume-from {run} was trained with other {', '.join(changed)}: its weights do not fit this model"
        )
    if info.get("train_until") is None:
        raise IatError(
            f"--resume-from {run}: its run.json records no train_until (made before iat-rec data append existed): "
            "train a new run on the earlier version first"
        )
    return {
        "run": str(run.resolve()),
        "checkpoint": last.name,
        "log_fingerprint": info["log_fingerprint"],
        "train_until": info["train_until"],
    }


def check_same_sharding(plan, earlier, run: str, frozen: tuple[str, ...] = ()) -> None:
    """Refuses a plan whose tables are sharded otherwise (type, kernel, column shards) than
    ``earlier``'s: their optimizer state (fused in the kernel, or a plain optimizer's for a
    data-parallel table) would not load."""

    def shape(p) -> dict:
        out = {}
        for path, tables in plan_to_json(p)["plan"].items():
            if ckpt.under(path, frozen):  # the token table: no optimizer state
                continue
            for name, ps in tables.items():
                columns = len(ps.get("ranks") or []) if "column" in ps["sharding_type"] else 1
                out[f"{path}.{name}"] = (ps["sharding_type"], ps["compute_kernel"], columns)
        return out

    now, was = shape(plan), shape(earlier)
    differ = sorted(t for t in now.keys() & was.keys() if now[t] != was[t])
    if differ:
        raise IatError(
            f"--resume-from {run}: tables {differ} are sharded otherwise here ({[now[t] for t in differ]} against "
            f"{[was[t] for t in differ]}): their optimizer state cannot load. Run on its world size, with its "
            "constraints and --hbm-gb"
        )


def train_until(log, rows: np.ndarray) -> int | None:
    """What run.json records as ``train_until``: the last timestamp of the training split, up
    to which a run continued from this one (--resume-from) counts the log as trained on."""
    return int(np.asarray(log.ts)[rows].max()) if len(rows) else None


def program_parser(prog: str, doc: str, cls) -> argparse.ArgumentParser:
    """Parser of a training program: ``--config`` YAML, ``--nproc``, then one flag per field of ``cls``."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML with any of the options below (flags override it)")
    p.add_argument("--nproc", type=int, default=None, help="local ranks to launch (default: GPUs, else 2)")
    add_flags(p, cls)
    return p


def program_cli(argv: list[str], module: str, parser: argparse.ArgumentParser, cls, check, train) -> int:
    """Resolves the config (defaults < YAML < flags), checks it here, then trains on the ranks."""
    args = parser.parse_args(argv)
    cfg = resolve(cls, args, args.config)
    check(cfg)
    code = run_ranks(module, argv, args.nproc, lambda: train(cfg))
    if code == 0 and not launched() and (Path(cfg.out) / STOPPED).is_file():
        return EXIT_STOPPED  # a launched rank exits 0: its launcher (torchrun) would call a stopped job a failure
    return code


def progress_bar(total: int, initial: int, desc: str, unit: str, enabled: bool) -> tqdm:
    """A rank-0 progress bar; redrawn every 10 s when the output is a log file, not a terminal."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not enabled,
        mininterval=0.1 if sys.stderr.isatty() else 10.0,
    )


def _writer(path: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(path))
