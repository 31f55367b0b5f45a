"""Token health: does a token table carry information, and do its tokens leak their own label?

Stage 1 compresses every logged instance into an instance token; stage 2 looks up the tokens
of a request's history. Two things can go wrong with a table, and neither shows in its loss:

* the tokens carry nothing: the bottleneck saturated (every entry at +-1), collapsed (every
  row alike) or uses few of its dimensions;
* the tokens of *training* instances carry their own label. The compressor was fitted on the
  training rows' labels, so their tokens can memorise them; the token of a held-out row was
  never fitted on its label and cannot. Stage 2 then learns from history tokens that say
  "this past instance was a click" for training requests, a signal test requests never get.

``token_health`` measures both on arrays, ``table_health`` on a token table, and
``format_health`` prints the figures; ``iat-rec tokens show TOKENS --health`` shows them.

    iat-rec tokens show TOKENS --health [--task NAME]
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import torch

from iat_rec.data.instance_log import time_split
from iat_rec.errors import IatError
from iat_rec.eval.metrics import auc

HEALTH_VERSION = 1
SATURATED = 0.99  # |t| above this counts as saturated (tanh-bounded tokens)
DEAD_STD = 1e-3  # a dimension whose std across rows is below this is dead
MIN_CLASS = 50  # fewest rows of each class the probe fits on or scores an AUC on
PROBE_L2 = 1e-2  # L2 penalty on the probe's weights (mean log loss + l2/2 |w|^2), not its bias
DEFAULT_SPLIT = (0.8, 0.9)


def effective_rank(x: np.ndarray) -> float | None:
    """exp(Shannon entropy of the L1-normalised singular values) of the centred rows of ``x``
    (Roy & Vetterli 2007): between 1 and min(rows, dim); d for isotropic data, k for data in
    a k-dimensional subspace with equal spread. None when the centred rows are all zero."""
    x = np.asarray(x, dtype=np.float64)
    c = x - x.mean(axis=0)
    s = np.linalg.svd(c, compute_uv=False)
    # singular values at rounding level of the data are zero (identical rows centre to ~1e-17)
    tol = np.finfo(np.float64).eps * max(x.shape) * max(float(np.linalg.norm(x)), 1e-300)
    s = s[s > tol]
    if len(s) == 0:
        return None
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iters: int = 50) -> np.ndarray:
    """L2-regularised logistic regression by Newton's method with a backtracking line search.
    ``x`` [n, d] already standardised; returns [d + 1] weights, the bias last. Deterministic."""
    n, d = x.shape
    a = np.hstack([x, np.ones((n, 1))])
    w = np.zeros(d + 1)
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0

    def loss(w: np.ndarray) -> float:
        z = a @ w
        return float(np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * (reg * w * w).sum())

    f = loss(w)
    for _ in range(iters):
        z = a @ w
        p = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow
        g = a.T @ (p - y) / n + reg * w
        h = (a * (p * (1 - p))[:, None]).T @ a / n + np.diag(reg + 1e-10)
        try:
            step = np.linalg.solve(h, g)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(h, g, rcond=None)[0]
        t = 1.0
        while True:
            cand = w - t * step
            fc = loss(cand)
            if fc <= f - 1e-4 * t * float(g @ step) or t < 1e-8:
                break
            t *= 0.5
        if fc > f:  # no descent left (at the optimum, to rounding)
            break
        done = f - fc < 1e-12 or np.abs(t * step).max() < 1e-9
        w, f = cand, fc
        if done:
            break
    return w


def _class_counts(y: np.ndarray) -> tuple[int, int]:
    pos = int((y > 0.5).sum())
    return pos, int(len(y) - pos)


def _short(name: str, y: np.ndarray) -> str | None:
    pos, neg = _class_counts(y)
    if pos < MIN_CLASS or neg < MIN_CLASS:
        return f"{name}: {pos} positive and {neg} negative rows, need at least {MIN_CLASS} of each"
    return None


def _probe(tokens: np.ndarray, labels: np.ndarray, train: np.ndarray, rng: np.random.Generator, reasons: dict) -> dict:
    """The linear probe: fit on half the sampled train rows, score the other half and the
    held-out rows."""
    tr = np.flatnonzero(train)
    tr = tr[rng.permutation(len(tr))]
    fit, ev = np.sort(tr[: len(tr) // 2]), np.sort(tr[len(tr) // 2 :])
    held = np.flatnonzero(~train)
    out: dict = {
        "auc_train": None,
        "auc_heldout": None,
        "leak_gap": None,
        "l2": PROBE_L2,
        "rows": {"fit": len(fit), "train_eval": len(ev), "heldout": len(held)},
        "positives": {
            "fit": _class_counts(labels[fit])[0],
            "train_eval": _class_counts(labels[ev])[0],
            "heldout": _class_counts(labels[held])[0],
        },
    }
    why = _short("probe fit rows (half the sampled train rows)", labels[fit])
    if why:
        for k in ("auc_train", "auc_heldout", "leak_gap"):
            reasons[f"probe.{k}"] = why
        return out
    x = tokens[fit].astype(np.float64)
    mu, sd = x.mean(axis=0), x.std(axis=0)
    live = sd > 1e-12 * max(1.0, float(np.abs(mu).max(initial=0.0)))
    scale = np.where(live, sd, 1.0)

    def std(rows: np.ndarray) -> np.ndarray:  # train-sample statistics; constant dims become 0
        return np.where(live, (tokens[rows].astype(np.float64) - mu) / scale, 0.0)

    w = _fit_logistic(std(fit), labels[fit].astype(np.float64), PROBE_L2)

    def score(rows: np.ndarray, key: str, name: str) -> None:
        why = _short(name, labels[rows])
        if why:
            reasons[f"probe.{key}"] = reasons["probe.leak_gap"] = why
        else:
            out[key] = auc(std(rows) @ w[:-1] + w[-1], labels[rows])

    score(ev, "auc_train", "probe train-eval rows (the other half of the sampled train rows)")
    score(held, "auc_heldout", "held-out rows (train=False) in the sample")
    if out["auc_train"] is not None and out["auc_heldout"] is not None:
        out["leak_gap"] = out["auc_train"] - out["auc_heldout"]
    return out


def token_health(tokens: np.ndarray, labels: np.ndarray, train: np.ndarray, seed: int = 0, sample: int = 20000) -> dict:
    """Health figures of instance tokens ``tokens`` [n, d] with their own 0/1 ``labels`` [n]
    and ``train`` [n] (True: the row was a training instance of the compressor). JSON-able.

    All figures are on ``rows_sampled`` rows drawn at random (``seed``; all rows when n <=
    ``sample``), the same for the same inputs and seed. Rows with a non-finite entry are
    counted in ``nonfinite_rows`` and left out of the figures.

    * ``saturation``: fraction of entries with |t| > 0.99. The tokens come from a tanh
      bottleneck: near 1.0 means it saturated and the tokens are sign patterns at best.
      (An unbounded table reports it too; there it says how many entries exceed 0.99.)
    * ``dim_std`` {min, median, max}: per-dimension std across rows; ``dead_dims``: dims with
      std < 1e-3, carrying nothing. max 0 means every row is the same token.
    * ``effective_rank`` (of ``dim``): exp(entropy of the normalised singular values) of the
      centred rows (Roy & Vetterli 2007); how many dimensions the tokens really use, from 1
      (rows on a line) to ``dim`` (isotropic). null when every row is identical.
    * ``probe``: a linear probe (L2-regularised logistic regression) of the instance's own
      label from its token, its features standardised with fit-sample statistics. It is fit
      on half the sampled train rows and scored by AUC on the other half (``auc_train``) and
      on the held-out rows, train=False (``auc_heldout``). 0.5: the tokens say nothing linear
      about the label; above 0.5: they carry it.
    * ``probe.leak_gap`` = auc_train - auc_heldout. The compressor was fitted on the training
      rows' labels, so their tokens can encode their own label; a held-out row's token never
      saw its label and cannot. A gap near 0 means the token carries as much label
      information for an unseen instance as for a training one (honest features). A large
      positive gap (say > 0.05; > 0.2 is gross) means the tokens of training instances carry
      their label: stage 2, whose training requests have such tokens in their history, can
      learn to read past labels off the tokens, which test requests never get, so its test
      metrics fall short of its training ones. (A modest gap can also be drift between the
      earlier train and later held-out period; compare with the AUC level.)

    Figures that cannot be computed are null, with the reason in ``reasons`` under the
    figure's name (e.g. ``probe.auc_heldout`` when fewer than 50 held-out rows of a class).
    """
    tokens = np.asarray(tokens)
    labels = np.asarray(labels).reshape(-1)
    train = np.asarray(train, dtype=bool).reshape(-1)
    if tokens.ndim != 2:
        raise IatError(f"token_health: tokens must be [rows, dim], got shape {list(tokens.shape)}")
    n, d = tokens.shape
    if len(labels) != n or len(train) != n:
        raise IatError(f"token_health: {n} token rows but {len(labels)} labels and {len(train)} train flags")
    if sample < 1:
        raise IatError(f"token_health: sample must be positive, got {sample}")
    if n and not np.isin(labels, (0, 1)).all():
        raise IatError("token_health: labels must be 0 or 1")
    rng = np.random.default_rng(seed)
    idx = np.arange(n) if n <= sample else np.sort(rng.choice(n, size=sample, replace=False))
    t = np.asarray(tokens[idx], dtype=np.float64)
    finite = np.isfinite(t).all(axis=1)
    t, y, tr = t[finite], labels[idx][finite].astype(np.float64), train[idx][finite]
    reasons: dict[str, str] = {}
    h: dict = {
        "version": HEALTH_VERSION,
        "rows": int(n),
        "rows_sampled": int(len(idx)),
        "nonfinite_rows": int((~finite).sum()),
        "seed": int(seed),
        "dim": int(d),
    }
    if len(t) == 0:
        why = "no rows with finite tokens" if n else "no rows"
        h.update(
            saturation=None, dim_std={"min": None, "median": None, "max": None}, dead_dims=None, effective_rank=None
        )
        for k in ("saturation", "dim_std", "dead_dims", "effective_rank"):
            reasons[k] = why
        h["probe"] = {"auc_train": None, "auc_heldout": None, "leak_gap": None, "l2": PROBE_L2}
        reasons.update({f"probe.{k}": why for k in ("auc_train", "auc_heldout", "leak_gap")})
        h["reasons"] = reasons
        return h
    std = t.std(axis=0)
    h["saturation"] = float((np.abs(t) > SATURATED).mean())
    h["dim_std"] = {"min": float(std.min()), "median": float(np.median(std)), "max": float(std.max())}
    h["dead_dims"] = int((std < DEAD_STD).sum())
    h["effective_rank"] = effective_rank(t)
    if h["effective_rank"] is None:
        reasons["effective_rank"] = "undefined: every sampled row is the same token (the centred sample is zero)"
    h["probe"] = _probe(t, y, tr, rng, reasons)
    h["reasons"] = reasons
    return h


# ---------------------------------------------------------------------------------------------
# token tables


def table_split(table) -> tuple[float, float]:
    """The time split the table's compressor trained with: the manifest's ``split`` entry if
    present, else the default (0.8, 0.9)."""
    s = table.manifest.get("split")
    if s is None:
        return DEFAULT_SPLIT
    try:
        q1, q2 = (float(q) for q in s)
    except (TypeError, ValueError):
        raise IatError(f"{table.path}/manifest.json: split must be [q1, q2], got {s!r}") from None
    return q1, q2


def table_task_names(table) -> list[str] | None:
    """The table's label columns by name: the manifest's ``tasks`` if present, else the task
    names of the source instance log's schema when that log is still at ``log_path``."""
    if isinstance(table.manifest.get("tasks"), list):
        return [str(t) for t in table.manifest["tasks"]]
    path = table.manifest.get("log_path")
    if path:
        from iat_rec.data.instance_log import InstanceLog

        try:
            log = InstanceLog(path)
        except IatError:
            return None
        if log.fingerprint == table.manifest.get("log_fingerprint"):  # not another log written there since
            return log.schema.task_names
    return None


def task_index(table, task: int | str) -> int:
    """A task given by label-column index or name -> its column of ``labels.npy``."""
    shape = table.side("labels").shape
    k = shape[1] if len(shape) == 2 else 1
    if isinstance(task, str) and not task.lstrip("-").isdigit():
        names = table_task_names(table)
        if names is None:
            raise IatError(
                f"{table.path}: the table does not name its tasks (no 'tasks' in its manifest and its "
                f"source log is not at {table.manifest.get('log_path')}): give --task as a column index 0..{k - 1}"
            )
        if task not in names:
            raise IatError(f"--task {task!r} not among the table's tasks {names}")
        return names.index(task)
    i = int(task)
    if not 0 <= i < k:
        raise IatError(f"task {i} outside the table's {k} label columns")
    return i


def _stamp(table, task: int, split: tuple[float, float], seed: int, sample: int) -> dict:
    """What a stored health report was computed from; it is fresh while all of it matches."""
    m = table.manifest
    return {
        "source_fingerprint": m.get("source_fingerprint"),
        "log_fingerprint": m.get("log_fingerprint"),
        "task": int(task),
        "split": [float(split[0]), float(split[1])],
        "seed": int(seed),
        "sample": int(sample),
    }


def table_health(
    table,
    split: tuple[float, float] | None = None,
    task: int | str = 0,
    seed: int = 0,
    sample: int = 20000,
    read: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict:
    """``token_health`` of a token table for one task (label column, index or name).

    The train mask is ``time_split``'s train rows (ts <= the ``split[0]`` time quantile,
    ``method="lower"``) computed by ``iat_rec.data.instance_log.time_split`` itself on the table's
    side-info ts, which is the source log's ts. ``split`` defaults to the manifest's ``split``
    entry, else (0.8, 0.9). ``read(rows)`` gives the tokens of a sorted row sample ([n, dim]);
    by default the whole table is read in this process (``TokenTable.read_rows``); export
    passes a collective read of its sharded table. The result has ``table``: what it was
    computed from, which ``stored_health`` compares to tell whether a stored report is fresh.
    """
    split = tuple(split) if split is not None else table_split(table)
    k = task_index(table, task)
    ts = np.asarray(table.side("ts"))
    labels = np.asarray(table.side("labels"))
    labels = labels[:, k] if labels.ndim == 2 else labels
    if len(ts) != table.rows or len(labels) != table.rows:
        raise IatError(f"{table.path}: side info has {len(ts)} ts and {len(labels)} labels for {table.rows} rows")
    train = np.zeros(table.rows, dtype=bool)
    train[time_split(SimpleNamespace(ts=ts), split)["train"]] = True  # time_split reads only .ts
    idx = sample_rows(table.rows, sample, seed)
    if read is None:
        read = lambda rows: table.read_rows(0, table.rows)[torch.from_numpy(rows)].float().numpy()  # noqa: E731
    h = token_health(read(idx), labels[idx], train[idx], seed=seed, sample=sample)
    h["rows"] = int(table.rows)
    h["train_rows"] = int(train.sum())
    h["table"] = _stamp(table, k, split, seed, sample)
    return h


def sample_rows(rows: int, sample: int, seed: int) -> np.ndarray:
    """The sorted row sample a health report reads (every row when the table is small)."""
    if rows <= sample:
        return np.arange(rows)
    return np.sort(np.random.default_rng(seed).choice(rows, size=sample, replace=False))


def stored_health(
    table, split: tuple[float, float] | None = None, task: int | str = 0, seed: int = 0, sample: int = 20000
) -> dict | None:
    """The manifest's stored ``health`` if it is fresh: of this health version, computed from
    this table's source checkpoint and log (fingerprints) for the same task, split, seed and
    sample; else None. A writer stores ``table_health(...)`` (or ``token_health`` plus the same
    ``table`` stamp) under the manifest's ``health`` key."""
    h = table.manifest.get("health")
    if not isinstance(h, dict) or h.get("version") != HEALTH_VERSION:
        return None
    split = tuple(split) if split is not None else table_split(table)
    return h if h.get("table") == _stamp(table, task_index(table, task), split, seed, sample) else None


def _num(x, fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def format_health(h: dict) -> str:
    """A short human-readable block, one line per figure; a null figure shows its reason."""
    reasons = h.get("reasons", {})

    def why(key: str) -> str:
        return f"  ({reasons[key]})" if key in reasons else ""

    p, s = h.get("probe", {}), h.get("dim_std", {})
    t = h.get("table")
    lines = ["token health"]
    if t:
        lines.append(
            f"  table            task {t['task']}, split {t['split']}, "
            f"{h.get('train_rows', '?')} train rows of {h['rows']}"
        )
    lines += [
        f"  rows sampled     {h['rows_sampled']} of {h['rows']} (seed {h['seed']})"
        + (f", {h['nonfinite_rows']} with non-finite entries left out" if h.get("nonfinite_rows") else ""),
        f"  saturation       {_num(h.get('saturation'), '{:.4f}')}  (fraction of |t| > {SATURATED}){why('saturation')}",
        f"  dim std          min {_num(s.get('min'), '{:.4g}')}  median {_num(s.get('median'), '{:.4g}')}  "
        f"max {_num(s.get('max'), '{:.4g}')}{why('dim_std')}",
        f"  dead dims        {_num(h.get('dead_dims'), '{:d}')} of {h['dim']}  (std < {DEAD_STD:g}){why('dead_dims')}",
        f"  effective rank   {_num(h.get('effective_rank'), '{:.2f}')} of {h['dim']}{why('effective_rank')}",
        f"  probe AUC train  {_num(p.get('auc_train'))}  (own label, other train rows){why('probe.auc_train')}",
        f"  probe AUC held   {_num(p.get('auc_heldout'))}  (own label, held-out rows){why('probe.auc_heldout')}",
        f"  leak gap         {_num(p.get('leak_gap'), '{:+.3f}')}  "
        f"(train - held-out; ~0: honest, large +: training tokens carry their label){why('probe.leak_gap')}",
    ]
    return "\n".join(lines)
