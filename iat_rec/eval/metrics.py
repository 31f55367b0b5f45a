"""Evaluation metrics: AUC, GAUC, LogLoss and NE, computed exactly from the gathered predictions.

Every rank keeps its predictions, labels, weights and users; ``EvalMetrics.compute`` all-gathers
them and computes every figure in float64 numpy, so all ranks return the same numbers and a run
on N ranks scores what one process scores on the same rows.

* AUC is the weighted Mann-Whitney statistic: the weighted fraction of (positive, negative)
  pairs ranked correctly, a tie counting one half. torchrec's AUCMetric is not used because it
  ignores ties: it sorts the predictions and integrates the curve row by row, so a constant
  predictor scores anything from 0.0 to 1.0 depending on row order.
* GAUC is the per-user AUC weighted by the user's number of evaluated events (the sum of its
  row weights), over users whose events hold both classes (the protocol of the MovieLens
  comparison). torchrec's GAUCMetric averages per-session AUCs inside each batch, unweighted,
  which is a different quantity.
* LogLoss is the weighted mean binary cross-entropy in nats (natural log, as in the
  literature), with probabilities clamped to [eta, 1 - eta] as torchrec does. torchrec's
  NEMetric reports it in bits (log2), so it is not used either.
* NE is LogLoss divided by the entropy of the weighted mean label, in the same unit (so the
  ratio is unit-free); a predictor of the base rate has NE 1.

Rows of weight 0 (padding) are left out of everything; AUC and GAUC are nan when a class is
missing, LogLoss and NE when no row is left.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

ETA = 1e-12  # torchrec's clamp of probabilities and of the mean label


def _grouped_auc(
    pred: np.ndarray, label: np.ndarray, group: np.ndarray, weight: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted tie-aware AUC of each group: (auc, positive weight, negative weight) per group id
    present (0-based, in sorted group order); auc is nan where a group lacks a class."""
    w = np.ones(len(pred)) if weight is None else np.asarray(weight, np.float64)
    keep = w > 0
    pred, y, group, w = np.asarray(pred)[keep], np.asarray(label)[keep] > 0.5, np.asarray(group)[keep], w[keep]
    if len(pred) == 0:
        return np.empty(0), np.empty(0), np.empty(0)
    order = np.lexsort((pred, group))
    p, y, g, w = pred[order], y[order], group[order], w[order]
    new_group = np.r_[True, g[1:] != g[:-1]]
    new_tie = new_group | np.r_[True, p[1:] != p[:-1]]
    gid = np.cumsum(new_group) - 1
    tie = np.cumsum(new_tie) - 1
    tie_pos = np.bincount(tie, weights=w * y)
    tie_neg = np.bincount(tie, weights=w * ~y)
    tie_gid = gid[new_tie]
    # negative weight ranked strictly below each tie block, within its group
    neg_before = np.cumsum(tie_neg) - tie_neg
    first_tie_of_group = np.flatnonzero(np.r_[True, tie_gid[1:] != tie_gid[:-1]])
    neg_below = neg_before - neg_before[first_tie_of_group][tie_gid]
    correct = np.bincount(tie_gid, weights=tie_pos * (neg_below + 0.5 * tie_neg))
    pos, neg = np.bincount(tie_gid, weights=tie_pos), np.bincount(tie_gid, weights=tie_neg)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc_g = np.where((pos > 0) & (neg > 0), correct / (pos * neg), np.nan)
    return auc_g, pos, neg


def auc(pred: np.ndarray, label: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Weighted AUC (Mann-Whitney, ties count one half); nan if a class is missing."""
    auc_g, _, _ = _grouped_auc(pred, label, np.zeros(len(pred), np.int64), weight)
    return float(auc_g[0]) if len(auc_g) else float("nan")


def gauc(pred: np.ndarray, label: np.ndarray, user: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Event-weighted mean of per-user AUCs (ties count one half); nan if no user has both classes."""
    auc_u, pos, neg = _grouped_auc(pred, label, user, weight)
    ok = ~np.isnan(auc_u)
    if not ok.any():
        return float("nan")
    return float(np.average(auc_u[ok], weights=(pos + neg)[ok]))


def logloss_ne(pred: np.ndarray, label: np.ndarray, weight: np.ndarray | None = None) -> tuple[float, float]:
    """(LogLoss, NE), both from natural-log cross-entropy; nan, nan if no row has weight."""
    w = np.ones(len(pred)) if weight is None else np.asarray(weight, np.float64)
    total = w.sum()
    if not total > 0:
        return float("nan"), float("nan")
    p = np.clip(np.asarray(pred, np.float64), ETA, 1 - ETA)
    y = np.asarray(label, np.float64)
    ce = -(y * np.log(p) + (1 - y) * np.log1p(-p))
    logloss = float(np.sum(w * ce) / total)
    base = float(np.clip(np.sum(w * y) / total, ETA, 1 - ETA))
    entropy = -(base * np.log(base) + (1 - base) * np.log1p(-base))
    return logloss, logloss / entropy


class EvalMetrics:
    """Accumulates one evaluation pass on every rank; ``compute`` is collective. The figures
    are exact over all gathered rows, so no window or batch size is needed."""

    def __init__(self, tasks: list[str]):
        self.tasks = tasks
        self._parts: list[tuple[torch.Tensor, ...]] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, users: torch.Tensor) -> None:
        prob = torch.sigmoid(logits.double())  # float64: float32 would tie distinct logits above ~17
        self._parts.append((prob.cpu(), labels.double().cpu(), weights.double().cpu(), users.double().cpu()))

    def compute(self) -> dict[str, dict[str, float]]:
        if self._parts:
            local = [torch.cat(x) for x in zip(*self._parts)]
        else:
            t = len(self.tasks)
            local = [torch.empty(0, t, dtype=torch.float64), torch.empty(0, t, dtype=torch.float64)]
            local += [torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)]
        prob, labels, weights, users = (t.numpy() for t in _all_gather_cat(local))
        users = users.astype(np.int64)
        out = {}
        for k, t in enumerate(self.tasks):
            logloss, ne = logloss_ne(prob[:, k], labels[:, k], weights)
            out[t] = {
                "auc": auc(prob[:, k], labels[:, k], weights),
                "ne": ne,
                "logloss": logloss,
                "gauc": gauc(prob[:, k], labels[:, k], users, weights),
                "n": int((weights > 0).sum()),
            }
        return out


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
