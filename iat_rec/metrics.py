"""Evaluation metrics: AUC and NE/LogLoss from torchrec.metrics, plus GAUC.

GAUC here is the per-user AUC weighted by the user's number of evaluated events, over
users whose events hold both classes (the protocol of the MovieLens comparison).
torchrec's GAUCMetric averages per-session AUCs inside each batch, unweighted, which is a
different quantity, so GAUC is computed exactly from the gathered predictions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.metrics_config import RecComputeMode, RecTaskInfo
from torchrec.metrics.ne import NEMetric


def gauc(pred: np.ndarray, label: np.ndarray, user: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Event-weighted mean of per-user AUCs (ties count one half); nan if no user has both classes."""
    keep = np.ones(len(pred), bool) if weight is None else weight > 0
    pred, label, user = pred[keep], label[keep] > 0.5, user[keep]
    if len(pred) == 0:
        return float("nan")
    order = np.lexsort((pred, user))
    p, y, u = pred[order], label[order], user[order]
    n = len(p)
    new_user = np.r_[True, u[1:] != u[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    pos_in_user = np.arange(n) - user_start + 1  # 1-based rank within the user
    new_tie = new_user | np.r_[True, p[1:] != p[:-1]]
    tie_id = np.cumsum(new_tie) - 1
    avg_rank = (np.bincount(tie_id, weights=pos_in_user) / np.bincount(tie_id))[tie_id]
    uid = np.cumsum(new_user) - 1
    n_pos = np.bincount(uid, weights=y)
    n_all = np.bincount(uid).astype(np.float64)
    n_neg = n_all - n_pos
    rank_sum = np.bincount(uid, weights=avg_rank * y)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    auc_u = (rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2) / (n_pos[ok] * n_neg[ok])
    return float(np.average(auc_u, weights=n_all[ok]))


class EvalMetrics:
    """Accumulates one evaluation pass on every rank; ``compute`` is collective."""

    def __init__(self, tasks: list[str], world_size: int, rank: int, batch_size: int, max_samples: int, device: torch.device):
        infos = [RecTaskInfo(name=t, label_name=t, prediction_name=t, weight_name=t) for t in tasks]
        kw = dict(
            world_size=world_size,
            my_rank=rank,
            batch_size=batch_size,
            tasks=infos,
            compute_mode=RecComputeMode.UNFUSED_TASKS_COMPUTATION,
            window_size=max(max_samples, 1),
            compute_on_all_ranks=True,  # every rank returns the same figures
        )
        self.tasks = tasks
        self.auc = AUCMetric(**kw).to(device)
        self.ne = NEMetric(include_logloss=True, **kw).to(device)
        self._parts: list[tuple[torch.Tensor, ...]] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, users: torch.Tensor) -> None:
        prob = torch.sigmoid(logits.float())
        keep = weights > 0
        if keep.any():
            preds = {t: prob[keep, k] for k, t in enumerate(self.tasks)}
            labs = {t: labels[keep, k] for k, t in enumerate(self.tasks)}
            ws = {t: weights[keep] for t in self.tasks}
            self.auc.update(predictions=preds, labels=labs, weights=ws)
            self.ne.update(predictions=preds, labels=labs, weights=ws)
        self._parts.append((prob.cpu(), labels.cpu(), weights.cpu(), users.cpu()))

    def compute(self) -> dict[str, dict[str, float]]:
        auc, ne = self.auc.compute(), self.ne.compute()
        prob, labels, weights, users = (torch.cat(x) for x in zip(*self._parts))
        gathered = _all_gather_cat([prob, labels, weights, users.double()])
        prob, labels, weights, users = (t.numpy() for t in gathered)
        out = {}
        for k, t in enumerate(self.tasks):
            out[t] = {
                "auc": float(_pick(auc, f"auc-{t}|lifetime_auc", f"auc-{t}|window_auc")),
                "ne": float(_pick(ne, f"ne-{t}|lifetime_ne", f"ne-{t}|window_ne")),
                "logloss": float(_pick(ne, f"ne-{t}|lifetime_logloss", f"ne-{t}|window_logloss")),
                "gauc": gauc(prob[:, k], labels[:, k], users.astype(np.int64), weights),
                "n": int((weights > 0).sum()),
            }
        return out


def _pick(d: dict[str, torch.Tensor], *keys: str) -> torch.Tensor:
    for k in keys:
        if k in d:
            return d[k]
    raise KeyError(f"none of {keys} in torchrec metric output {sorted(d)}")


def _all_gather_cat(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every rank's tensors, concatenated; ranks hold equal sizes (equal batch counts)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensors
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = []
    for t in tensors:
        t = t.to(dev).contiguous()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        out.append(torch.cat(parts).cpu())
    return out
