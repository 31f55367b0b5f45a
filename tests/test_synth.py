"""Synthetic log: determinism, schema, label sanity, order, and the claimed hidden-state structure."""

import numpy as np
import pytest

from iat_rec.data import synth
from iat_rec.data.instance_log import InstanceLog
from iat_rec.errors import IatError

SMALL = dict(users=300, mean_instances=40, seed=0)


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> InstanceLog:
    return synth.generate(tmp_path_factory.mktemp("synth") / "log", **SMALL)


@pytest.fixture(scope="module")
def rich():
    """A larger simulation (~24k rows) with the hidden state, for the structure checks."""
    cfg = synth.SynthConfig(users=400, mean_instances=60, seed=0)
    hidden: dict = {}
    cols = synth.build_columns(cfg, hidden=hidden)
    return cfg, cols, hidden


def test_same_seed_same_fingerprint(log, tmp_path):
    again = synth.generate(tmp_path / "again", **SMALL)
    assert again.fingerprint == log.fingerprint
    for name in ("ts", "user", "labels", "label_time", "dense"):
        np.testing.assert_array_equal(getattr(again, name), getattr(log, name))
    other = synth.generate(tmp_path / "other", **{**SMALL, "seed": 1})
    assert other.fingerprint != log.fingerprint


@pytest.mark.parametrize("label", ["click", "seen-before"])
def test_worker_processes_write_the_same_log(tmp_path, label):
    """Chunks of 1024 users simulated in 2 worker processes give the one-process log, byte for
    byte (3 chunks: the pool's order is the chunks' order)."""
    args = dict(users=2100, mean_instances=5, seed=4, label=label)
    one = synth.generate(tmp_path / "one", **args)
    two = synth.generate(tmp_path / "two", **args, workers=2)
    assert two.fingerprint == one.fingerprint and one.rows > 0


def test_schema(log):
    s = log.schema
    assert len(s.sparse) >= 20
    assert not any(f.multi for f in s.sparse)
    assert s.sequence == ("item_id", "category")
    assert s.task_names == ["click", "conversion"]
    assert len(s.dense) >= 3
    assert s.feature("user_id").num_embeddings == SMALL["users"]


def test_ids_within_vocab(log):
    for f in log.schema.sparse:
        ids = np.asarray(log.sparse[f.name])
        assert ids.dtype == np.int64
        assert ids.min() >= 0 and ids.max() < f.num_embeddings, f.name
    assert np.isfinite(np.asarray(log.dense)).all()


def test_labels(log):
    y = np.asarray(log.labels)
    ts = np.asarray(log.ts)[:, None]
    lt = np.asarray(log.label_time)
    click, conv = y[:, 0], y[:, 1]
    assert set(np.unique(y)) <= {0.0, 1.0}
    assert 0.10 < click.mean() < 0.30
    assert 0.05 < conv.sum() / click.sum() < 0.40
    assert (conv <= click).all()  # conversion only after a click
    assert (lt >= ts).all()
    delay = lt - ts
    assert delay[:, 0].max() < 3600  # clicks are known quickly
    assert delay[:, 1].max() <= synth.ATTRIBUTION_WINDOW
    assert np.median(delay[conv == 1, 1]) > 3600  # conversions arrive hours later


def test_sorted_by_user_then_time(log):
    user, ts = np.asarray(log.user), np.asarray(log.ts)
    assert ts.dtype == np.int64
    assert (np.diff(user) >= 0).all()
    same = np.diff(user) == 0
    assert (np.diff(ts)[same] >= 0).all()
    assert (np.diff(ts)[same] == 0).any()  # ties exist (impressions of one request)
    off = np.asarray(log.user_offsets)
    lengths = np.diff(off)
    assert off[0] == 0 and off[-1] == log.rows and (lengths >= 1).all()
    assert lengths.std() > 0.3 * lengths.mean()  # activity levels differ
    span_days = (ts.max() - ts.min()) / synth.DAY
    assert 55 < span_days <= 60


def test_cli(tmp_path, capsys):
    assert synth.cli(["--out", str(tmp_path / "c"), *"--users 20 --mean-instances 5".split()]) == 0
    out = capsys.readouterr().out
    assert "rows" in out and "20 users" in out and str(tmp_path / "c") in out
    assert InstanceLog(tmp_path / "c").users == 20
    with pytest.raises(IatError, match="users"):
        synth.cli(["--out", str(tmp_path / "d"), "--users", "0"])


def test_exposure_follows_hidden_state(rich):
    cfg, cols, hidden = rich
    world = synth._make_world(cfg)
    z, sp = hidden["z"], cols.sparse
    rng = np.random.default_rng(0)
    chosen = np.einsum("nk,nk->n", z, world.camp_lat[sp["campaign"]]).mean()
    random = np.einsum("nk,nk->n", z, world.camp_lat[rng.integers(0, cfg.campaigns, cols.rows)]).mean()
    assert chosen > random + 0.5
    # the click probability rises with the fit of the shown creative to the current state
    fit = np.einsum("nk,nk->n", z, world.creative_lat[sp["creative"]])
    lo, hi = np.quantile(fit, [0.25, 0.75])
    y = cols.labels[:, 0]
    assert y[fit > hi].mean() > y[fit < lo].mean() + 0.05


def _seen_recently(ids: np.ndarray, user: np.ndarray, first: int, last: int) -> np.ndarray:
    """Whether the row's id occurs among the same user's rows first..last positions back."""
    n = len(ids)
    out = np.zeros(n, dtype=bool)
    for lag in range(first, last + 1):
        j = np.maximum(np.arange(n) - lag, 0)
        out |= (np.arange(n) >= lag) & (user[j] == user) & (ids[j] == ids)
    return out


def test_contexts_track_drift_items_do_not(rich):
    """Observable without the latents: ads follow the drifting state, items the stale profile."""
    _, cols, _ = rich
    u, sp = cols.user, cols.sparse
    deep = _seen_recently(np.zeros(cols.rows, np.int64), u, 50, 50)  # rows with >= 50 earlier rows
    recent_c = _seen_recently(sp["campaign"], u, 1, 10)[deep].mean()
    old_c = _seen_recently(sp["campaign"], u, 41, 50)[deep].mean()
    recent_i = _seen_recently(sp["item_id"], u, 1, 10)[deep].mean()
    old_i = _seen_recently(sp["item_id"], u, 41, 50)[deep].mean()
    assert recent_c > 1.25 * old_c
    assert abs(recent_i - old_i) < 0.15 * old_i
    # within each user: clicks are likelier on a campaign the user was just shown
    seen = _seen_recently(sp["campaign"], u, 1, 10)
    y = cols.labels[:, 0]
    diffs, weights = [], []
    for user in np.unique(u):
        m = u == user
        if seen[m].sum() >= 5 and (~seen[m]).sum() >= 5:
            diffs.append(y[m & seen].mean() - y[m & ~seen].mean())
            weights.append(m.sum())
    assert np.average(diffs, weights=weights) > 0.02


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    r = np.empty(len(s))
    r[np.argsort(s, kind="stable")] = np.arange(1, len(s) + 1)
    pos = y == 1
    n1 = pos.sum()
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))


def _logistic(x: np.ndarray, y: np.ndarray, steps: int = 300, lr: float = 0.5):
    mu, sd = x.mean(0), x.std(0) + 1e-9
    design = lambda a: np.hstack([(a - mu) / sd, np.ones((len(a), 1))])  # noqa: E731
    w = np.zeros(x.shape[1] + 1)
    xs = design(x)
    for _ in range(steps):
        w -= lr * xs.T @ (1 / (1 + np.exp(-xs @ w)) - y) / len(y)
    return lambda a: design(a) @ w


def test_whole_instance_history_beats_item_history(rich):
    """Logistic regression on label-gated history features of the last 10 instances: adding the
    past contexts (campaign, creative, placement, query) to items and categories raises AUC."""
    _, cols, _ = rich
    sp, u, ts = cols.sparse, cols.user, cols.ts
    y, known = cols.labels[:, 0].astype(float), cols.label_time[:, 0]
    n = cols.rows

    def past(lag: int) -> tuple[np.ndarray, np.ndarray]:
        j = np.maximum(np.arange(n) - lag, 0)
        return j, (np.arange(n) >= lag) & (u[j] == u) & (ts[j] < ts)

    def matches(ids: np.ndarray) -> list[np.ndarray]:
        seen, clicked = np.zeros(n), np.zeros(n)
        for lag in range(1, 11):
            j, ok = past(lag)
            same = ok & (ids[j] == ids)
            seen += same
            clicked += same & (known[j] < ts) & (y[j] == 1)
        return [seen, clicked]

    shown, clicks = np.zeros(n), np.zeros(n)
    for lag in range(1, 21):
        j, ok = past(lag)
        ok &= known[j] < ts
        shown += ok
        clicks += ok * y[j]
    base = [(clicks + 0.2) / (shown + 1), sp["slot"].astype(float), (sp["page"] == synth.SEARCH).astype(float)]
    items = np.stack(base + matches(sp["item_id"]) + matches(sp["category"]), 1)
    ctx = [m for name in ("campaign", "creative", "placement", "query_cluster") for m in matches(sp[name])]
    whole = np.hstack([items, np.stack(ctx, 1)])
    train, test = u % 2 == 0, u % 2 == 1
    auc_items = _auc(y[test], _logistic(items[train], y[train])(items[test]))
    auc_whole = _auc(y[test], _logistic(whole[train], y[train])(whole[test]))
    assert auc_items > 0.6
    assert auc_whole > auc_items + 0.005


# ----------------------------------------------------------------------------- seen-before mode

SEEN = dict(users=300, mean_instances=40, seed=0, label="seen-before", history_len=16)


@pytest.fixture(scope="module")
def seen_log(tmp_path_factory) -> InstanceLog:
    return synth.generate(tmp_path_factory.mktemp("seen") / "log", **SEEN)


def _tie_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Rank AUC with tied scores sharing their mean rank."""
    s = np.asarray(s, dtype=float)
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    new = np.r_[True, sorted_s[1:] != sorted_s[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(s)]
    ranks = np.empty(len(s))
    ranks[order] = ((starts + ends + 1) / 2)[np.cumsum(new) - 1]
    pos = y == 1
    n1 = pos.sum()
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))


def test_seen_before_schema_and_source(seen_log, log):
    s = seen_log.schema
    assert s.task_names == ["seen_before"]
    assert s.sequence == ("item_id", "category")
    assert [f.name for f in s.sparse] == [f.name for f in log.schema.sparse]
    assert [f.name for f in s.dense] == [f.name for f in log.schema.dense]
    assert "label=seen-before" in seen_log.manifest["source"] and "history_len=16" in seen_log.manifest["source"]
    # click mode keeps today's source string (and so its manifest) untouched
    assert log.manifest["source"] == (
        "synth(users=300, mean_instances=40, seed=0, items=10000, categories=200, campaigns=100, days=60, latent_dim=8)"
    )
    y = np.asarray(seen_log.labels)
    assert y.shape == (seen_log.rows, 1) and set(np.unique(y)) == {0.0, 1.0}
    np.testing.assert_array_equal(np.asarray(seen_log.label_time)[:, 0], np.asarray(seen_log.ts) + 1)


def test_seen_before_label_matches_definition(seen_log):
    """Brute force from the definition, through the history index (not the generator's code)."""
    from iat_rec.batching.history import HistoryIndex

    T = SEEN["history_len"]
    user, ts = np.asarray(seen_log.user), np.asarray(seen_log.ts)
    item = np.asarray(seen_log.sparse["item_id"])
    first, length = HistoryIndex.from_log(seen_log).ranges(user, ts, max_len=T)
    want = np.array([item[r] in set(item[f : f + n].tolist()) for r, (f, n) in enumerate(zip(first, length))])
    np.testing.assert_array_equal(np.asarray(seen_log.labels)[:, 0].astype(bool), want)
    # the check is not vacuous: the T cut-off and the strictly-earlier rule both bite
    off = np.asarray(seen_log.user_offsets)
    earlier_anywhere = np.array(
        [item[r] in set(item[off[u] : f + n].tolist()) for r, (u, f, n) in enumerate(zip(user, first, length))]
    )
    assert (earlier_anywhere & ~want).sum() > 0  # seen, but more than T instances ago (chance re-draws)
    f4, n4 = HistoryIndex.from_log(seen_log).ranges(user, ts, max_len=4)
    within4 = np.array([item[r] in set(item[f : f + n].tolist()) for r, (f, n) in enumerate(zip(f4, n4))])
    assert (want & ~within4).sum() > 0.1 * want.sum()  # many copies come from 5..T instances back
    assert (length < np.arange(seen_log.rows) - off[user]).sum() > 100  # same-ts rows are not history
    assert want.sum() > (length > 0).sum() * 0.4  # copies do happen


def test_seen_before_positive_rate(seen_log):
    assert 0.3 <= np.asarray(seen_log.labels)[:, 0].mean() <= 0.6


def test_seen_before_not_in_candidate_features(seen_log):
    y = np.asarray(seen_log.labels)[:, 0]
    dense = np.asarray(seen_log.dense)
    names = [f.name for f in seen_log.schema.dense]
    user, ts = np.asarray(seen_log.user), np.asarray(seen_log.ts)
    run_start = np.r_[True, (user[1:] != user[:-1]) | (ts[1:] != ts[:-1])]
    idx = np.arange(seen_log.rows)
    pos_in_request = idx - np.maximum.accumulate(np.where(run_start, idx, 0))
    scores = {
        "item_popularity": dense[:, names.index("item_popularity")],
        "user_age_days": dense[:, names.index("user_age_days")],
        "price": dense[:, names.index("price")],
        "position_in_request": pos_in_request,
        "slot": np.asarray(seen_log.sparse["slot"]),
        "category": np.asarray(seen_log.sparse["category"]),
    }
    for name, s in scores.items():
        assert abs(_tie_auc(y, s) - 0.5) < 0.05, name


def test_seen_before_deterministic_and_keeps_contexts(seen_log, tmp_path):
    again = synth.generate(tmp_path / "again", **SEEN)
    assert again.fingerprint == seen_log.fingerprint
    other = synth.generate(tmp_path / "t8", **{**SEEN, "history_len": 8})
    assert other.fingerprint != seen_log.fingerprint
    # only items (and what derives from them) and labels differ from click mode of the same seed
    click = synth.build_columns(synth.SynthConfig(users=60, mean_instances=20, seed=2))
    seen = synth.build_columns(synth.SynthConfig(users=60, mean_instances=20, seed=2, label="seen-before"))
    np.testing.assert_array_equal(click.ts, seen.ts)
    for name in ("campaign", "creative", "placement", "page", "device", "slot"):
        np.testing.assert_array_equal(click.sparse[name], seen.sparse[name])
    assert (click.sparse["item_id"] != seen.sparse["item_id"]).mean() > 0.9


def test_seen_before_cli(tmp_path):
    out = tmp_path / "s"
    assert (
        synth.cli(
            [
                "--out",
                str(out),
                *"--users 20 --mean-instances 5 --label seen-before".split(),
                *"--history-len 4".split(),
            ]
        )
        == 0
    )
    log = InstanceLog(out)
    assert log.schema.task_names == ["seen_before"] and "history_len=4" in log.manifest["source"]
    with pytest.raises(IatError, match="history-len"):
        synth.cli(["--out", str(tmp_path / "d"), *"--label seen-before --history-len 0".split()])
    with pytest.raises(IatError, match="label"):
        synth.SynthConfig(label="clicks")
