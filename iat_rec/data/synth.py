"""Deterministic synthetic instance logs whose users have a drifting hidden state.

(Default ``--label click``; ``--label seen-before`` is a history-reading check, see below.)

The log imitates an ads/recommendation feed: every instance is one impression with ~21
single-valued sparse features (user, item, context, ad), 4 dense features and two tasks,
``click`` and ``conversion``. It is built so that reading *whole* past instances (context
included) tells more about the user's present than reading past item ids alone.

Generative process
------------------
World, drawn once from ``seed`` (independent of the number of users):

* latent vectors in R^k (k = ``latent_dim``, entries ~ N(0, 1/k)) for categories, items
  (``0.7 * category + 0.7 * own``), campaigns, creatives (``campaign + 0.5 * own``),
  placements, query clusters, devices, pages, four dayparts and advertisers; plus biases.
* item popularity ~ Zipf(1.1) over a random permutation; item -> category, brand
  (within the category), base price (lognormal, category-dependent) and price bucket
  (global deciles of the base price). campaign -> advertiser and preferred ad format.

Per user u (from ``seed`` and ``users``):

* activity: n_u = max(1, round(LogNormal)) with mean ``mean_instances``; an active span of
  days within ``days`` (most users all along, some join late or churn early); a preferred
  hour; a primary device, OS family, region, language; a signup time before the log.
* hidden state ``z_u(t) = mu_u + d_u(t)``: ``mu_u`` is a static taste; ``d_u`` is an
  Ornstein-Uhlenbeck drift (stationary std ``DRIFT_STD`` per dim, per-user time constant
  tau_u ~ LogNormal, median 6 days) simulated on a 12-hour grid and interpolated linearly.
  ``user_segment`` is the nearest of 32 prototypes to the *initial* state z_u(0): stale.

Per instance, in time order (impressions come in requests of ~1.8 on average that share one
timestamp, so timestamp ties are common; hour of day follows the user's diurnal rhythm):

* exposure policy. The item recommender uses a *stale* profile z_u(0): item = Gumbel-max of
  ``BETA_ITEM * <z_u(0), v_item>`` over 16 popularity-sampled candidates, so item ids say
  little about the drift. Ad targeting and search track the *current* state: campaign
  (16 uniform candidates), creative (the campaign's 4), placement (all 32) and, on search
  pages, query_cluster (16 candidates) are Gumbel-max picks of ``beta * <z_u(t), latent>``.
  Device, OS, network, page, slot, ad format, region are random around user/campaign habits.
* click ~ Bernoulli(sigmoid(logit)) with logit = biases (item, device, page, placement,
  format, network, weekend, slot position)
  + A_ITEM <z, v_item> + A_CREATIVE <z, creative> + A_QUERY <z, query> (search pages)
  + A_CTX <z, device + page + daypart + placement>: the response to contexts depends on z.
  Base CTR is about 0.19.
* conversion only after a click: Bernoulli(sigmoid(C0 + A_CONV <z, w_item + advertiser>
  - price_sensitivity_u * log price)); about 18% of clicks convert.
* label times: the click label is known at ts + 1 + Exp(30 s) for every row. Conversion:
  if not clicked, known with the click; if converted, at ts + LogNormal delay (median 6 h,
  clipped to [1 min, 7 d]); if clicked but not converted, when the 7-day attribution window
  closes (the usual delayed-feedback setting).

Why history context matters: past campaigns, creatives, placements and queries were chosen
by z_u(t) at their time and the user's clicks on them depend on z_u(t), so a sequence of
whole past instances tracks the drifting state; past item ids reflect the stale profile
and carry state information only through their labels.

Measured (1M rows = 10,000 users, seed 0, time split 80/10/10, test AUC of click, a small
embedding + target-attention + dot-interaction ranker over the last 32 instances, best of
4 epochs): true probability 0.853; no history 0.721; history of item_id + category + click
label 0.734; the same plus campaign, creative, placement, query_cluster 0.757; the sum of
all 21 sparse features of each past instance + label 0.742. Learnable, far from the
oracle, and context in history pays.

Seen-before mode (``--label seen-before [--history-len T]``)
-----------------------------------------------------------
A public check that a stage-2 ranker really reads its history. The log has one task,
``seen_before`` = "item_id is among the items of the user's last T strictly-earlier
instances", with exactly the history fetch of :mod:`iat_rec.batching.history`: rows
``[max(start_u, p - T), p)``, p the user's first row with ts >= the row's ts, so rows of the
same request (shared ts) are never history of each other. T = ``history_len`` (default 128)
should match the ranker's max_len. The label is known at ts + 1. Timeline, contexts, ads
and their columns are those of click mode for the same seed; only the items change:

* exposure: with probability ``SEEN_COPY_PROB`` = 0.5, if the history is not empty, the
  item is copied from a uniformly chosen history row; otherwise it is drawn uniformly from
  the whole catalog. The label is then computed from the definition (a fresh draw can hit
  the history by chance), so it is exact, not the coin.
* no leak through the candidate's own features: every item is marginally uniform and the
  process is symmetric under relabelling items, so item_id and everything derived from it
  (category, brand, price bucket, price, item_popularity: kept as the world's static Zipf
  attribute, now unrelated to exposure) have the same distribution for both label values;
  contexts do not depend on items. The only label-dependent quantity outside the item
  match is the history length (empty history -> 0), so position in the user's log and
  user_age_days carry a trace.
* measured (1M rows = 10,000 users, seed 0, T = 128): positive rate 0.493; rank AUC for
  the label of price, item_popularity, position_score, user_age_days, slot and category
  each within 0.002 of 0.5; position within the user's log 0.52. Memorising ids under an
  80/10/10 time split (per-id positive rate of the train part) gives test AUC 0.53 for
  item_id, 0.53 for (user, item), 0.50 for user_id: copied items recur for the same user.
  A perfect history reader gets 1.0. Generation takes about the time of click mode (~7 s
  for 1M rows on 2 cores): copies point to strictly earlier rows, so chains are resolved
  by pointer doubling, and the label by one sort + searchsorted per chunk.

Determinism: the world comes from ``default_rng([seed, 0])``, per-user draws from
``default_rng([seed, 1])`` and rows of users ``[c * CHUNK_USERS, (c + 1) * CHUNK_USERS)``
from ``default_rng([seed, 2, c])`` (seen-before items from ``default_rng([seed, 3, c])``,
so click-mode output is unchanged by that mode's existence); the same arguments give
byte-identical columns, with any number of ``workers`` (chunks are simulated in worker
processes and written in chunk order).
Memory: every column is preallocated once (~220 bytes per row) and filled chunk by chunk,
so 10M rows need a few GiB (the writer's sort and copies included).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from iat_rec.data.instance_log import Columns, InstanceLog, check_log_out, write_instance_log
from iat_rec.data.schema import DenseFeature, Label, Schema, SparseFeature
from iat_rec.errors import IatError

T0 = 1_704_067_200  # 2024-01-01 00:00:00 UTC
DAY = 86_400
GRID = DAY // 2  # the OU drift is simulated on a 12-hour grid
CHUNK_USERS = 1024  # part of the determinism contract: rows of a chunk share one RNG stream
ATTRIBUTION_WINDOW = 7 * DAY

DEVICES = ("mobile", "desktop", "tablet", "tv")
OSES = ("android", "ios", "windows", "macos", "linux", "other")
NETWORKS = ("wifi", "5g", "4g", "3g")
PAGES = ("home", "feed", "search", "detail", "video", "cart")
PAGE_PROBS = (0.30, 0.25, 0.15, 0.15, 0.10, 0.05)
SEARCH = PAGES.index("search")
AD_FORMATS = ("banner", "video", "native", "carousel")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
HOURS = tuple(str(h) for h in range(24))
SLOTS = tuple(str(s) for s in range(10))
PRICE_BUCKETS = tuple(f"p{b}" for b in range(10))
LANGUAGES = ("en", "es", "de", "fr", "pt", "ja", "zh", "hi")

BRANDS_PER_CATEGORY = 10
CREATIVES_PER_CAMPAIGN = 4
ADVERTISERS = 100
PLACEMENTS = 32
QUERY_CLUSTERS = 100  # id 0 is "no query" (not a search page)
REGIONS = 50
SEGMENTS = 32
CANDIDATES = 16
LABEL_MODES = ("click", "seen-before")
SEEN_COPY_PROB = 0.5  # seen-before mode: chance that an item is copied from the user's history

# Strengths of the hidden state in exposure (beta) and in the labels (A); see the docstring.
STATIC_STD, DRIFT_STD = 0.6, 1.0
BETA_ITEM, BETA_CAMPAIGN, BETA_CREATIVE, BETA_PLACEMENT, BETA_QUERY = 0.5, 2.5, 2.0, 2.0, 3.0
A_ITEM, A_CREATIVE, A_QUERY, A_CTX = 0.7, 0.6, 0.5, 0.3
B0 = -3.9
C0, A_CONV = -2.3, 0.8


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    users: int = 1000
    mean_instances: float = 100.0
    seed: int = 0
    items: int = 10_000
    categories: int = 200
    campaigns: int = 100
    days: int = 60
    latent_dim: int = 8
    label: str = "click"  # "click" (click + conversion) or "seen-before" (see the module docstring)
    history_len: int = 128  # seen-before mode: T of "the last T strictly-earlier instances"

    def __post_init__(self) -> None:
        if self.label not in LABEL_MODES:
            raise IatError(f"synth: --label must be one of {', '.join(LABEL_MODES)}, got {self.label!r}")
        for name in ("users", "items", "categories", "campaigns", "days", "latent_dim", "history_len"):
            if int(getattr(self, name)) < 1:
                raise IatError(f"synth: --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.mean_instances >= 1:
            raise IatError(f"synth: --mean-instances must be >= 1, got {self.mean_instances}")
        if self.seed < 0:
            raise IatError(f"synth: --seed must be >= 0, got {self.seed}")

    def describe(self) -> str:
        # click mode leaves out label and history_len: its source string predates them
        skip = ("label", "history_len") if self.label == "click" else ()
        fields = [f.name for f in dataclasses.fields(self) if f.name not in skip]
        args = ", ".join(f"{name}={getattr(self, name)}" for name in fields)
        return f"synth({args})"


def synth_schema(cfg: SynthConfig | None = None) -> Schema:
    """The schema of a synthetic log; hash sizes follow the config (ids are exact, no collisions)."""
    cfg = cfg or SynthConfig()

    def h(name: str, size: int) -> SparseFeature:
        return SparseFeature(name=name, column=name, hash=int(size))

    def v(name: str, vocab: tuple[str, ...]) -> SparseFeature:
        return SparseFeature(name=name, column=name, vocab=vocab)

    sparse = (
        h("user_id", cfg.users),
        h("item_id", cfg.items),
        h("category", cfg.categories),
        h("brand", cfg.categories * BRANDS_PER_CATEGORY),
        v("price_bucket", PRICE_BUCKETS),
        v("device", DEVICES),
        v("os", OSES),
        v("network", NETWORKS),
        v("slot", SLOTS),
        v("hour", HOURS),
        v("day_of_week", WEEKDAYS),
        v("page", PAGES),
        h("query_cluster", QUERY_CLUSTERS + 1),
        h("campaign", cfg.campaigns),
        h("creative", cfg.campaigns * CREATIVES_PER_CAMPAIGN),
        h("advertiser", ADVERTISERS),
        v("ad_format", AD_FORMATS),
        h("placement", PLACEMENTS),
        h("region", REGIONS),
        v("language", LANGUAGES),
        h("user_segment", SEGMENTS),
    )
    dense = (
        DenseFeature("price", "price", norm="log"),
        DenseFeature("item_popularity", "item_popularity", norm="log"),
        DenseFeature("position_score", "position_score", norm="standard"),
        DenseFeature("user_age_days", "user_age_days", norm="log"),
    )
    if cfg.label == "seen-before":
        labels = (Label("seen_before", "seen_before", available_at="seen_before_time"),)
    else:
        labels = (
            Label("click", "click", available_at="click_time"),
            Label("conversion", "conversion", available_at="conversion_time"),
        )
    return Schema(
        user="user_id", timestamp="ts", labels=labels, sparse=sparse, dense=dense, sequence=("item_id", "category")
    )


# ----------------------------------------------------------------------------- world and users


@dataclasses.dataclass
class _World:
    cat_lat: np.ndarray
    item_lat: np.ndarray
    item_conv_lat: np.ndarray
    item_bias: np.ndarray
    item_cat: np.ndarray
    item_brand: np.ndarray
    item_price: np.ndarray
    item_price_bucket: np.ndarray
    item_pop: np.ndarray
    item_pop_cdf: np.ndarray
    camp_lat: np.ndarray
    camp_adv: np.ndarray
    camp_format: np.ndarray
    creative_lat: np.ndarray
    placement_lat: np.ndarray
    placement_bias: np.ndarray
    query_lat: np.ndarray  # row 0 (no query) is zero
    device_lat: np.ndarray
    device_bias: np.ndarray
    page_lat: np.ndarray
    page_bias: np.ndarray
    daypart_lat: np.ndarray
    adv_lat: np.ndarray
    format_bias: np.ndarray
    network_bias: np.ndarray
    segment_proto: np.ndarray


def _latents(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.standard_normal((n, k)) / np.sqrt(k)


def _make_world(cfg: SynthConfig) -> _World:
    rng = np.random.default_rng([cfg.seed, 0])
    k, n_items, n_cat = cfg.latent_dim, cfg.items, cfg.categories
    cat_lat = _latents(rng, n_cat, k)
    item_cat = rng.integers(0, n_cat, n_items)
    item_lat = 0.7 * cat_lat[item_cat] + 0.7 * _latents(rng, n_items, k)
    item_conv_lat = 0.6 * item_lat + 0.8 * _latents(rng, n_items, k)
    item_brand = item_cat * BRANDS_PER_CATEGORY + rng.integers(0, BRANDS_PER_CATEGORY, n_items)
    cat_price = rng.normal(3.0, 0.8, n_cat)
    item_price = np.exp(cat_price[item_cat] + rng.normal(0.0, 0.5, n_items))
    ranks = np.argsort(np.argsort(item_price, kind="stable"), kind="stable")
    item_price_bucket = ranks * len(PRICE_BUCKETS) // n_items
    pop = 1.0 / np.arange(1, n_items + 1) ** 1.1
    pop = pop[rng.permutation(n_items)]
    pop /= pop.sum()
    n_camp = cfg.campaigns
    camp_lat = _latents(rng, n_camp, k)
    creative_lat = np.repeat(camp_lat, CREATIVES_PER_CAMPAIGN, axis=0)
    creative_lat += 0.5 * _latents(rng, n_camp * CREATIVES_PER_CAMPAIGN, k)
    query_lat = _latents(rng, QUERY_CLUSTERS + 1, k)
    query_lat[0] = 0.0
    return _World(
        cat_lat=cat_lat,
        item_lat=item_lat,
        item_conv_lat=item_conv_lat,
        item_bias=rng.normal(0.0, 0.3, n_items),
        item_cat=item_cat,
        item_brand=item_brand,
        item_price=item_price,
        item_price_bucket=item_price_bucket,
        item_pop=pop,
        item_pop_cdf=np.cumsum(pop),
        camp_lat=camp_lat,
        camp_adv=rng.integers(0, ADVERTISERS, n_camp),
        camp_format=rng.integers(0, len(AD_FORMATS), n_camp),
        creative_lat=creative_lat,
        placement_lat=_latents(rng, PLACEMENTS, k),
        placement_bias=rng.normal(0.0, 0.3, PLACEMENTS),
        query_lat=query_lat,
        device_lat=_latents(rng, len(DEVICES), k),
        device_bias=np.array([0.1, -0.1, 0.0, -0.4]),
        page_lat=_latents(rng, len(PAGES), k),
        page_bias=np.array([0.0, -0.1, 0.4, 0.2, -0.2, 0.3]),
        daypart_lat=_latents(rng, 4, k),
        adv_lat=_latents(rng, ADVERTISERS, k),
        format_bias=np.array([-0.3, 0.2, 0.1, 0.0]),
        network_bias=np.array([0.0, 0.05, 0.0, -0.2]),
        segment_proto=_latents(rng, SEGMENTS, k),
    )


@dataclasses.dataclass
class _Users:
    n: np.ndarray  # instances per user
    mu: np.ndarray  # static taste [U, k]
    d0: np.ndarray  # drift at t = 0 [U, k]
    tau_days: np.ndarray
    start_day: np.ndarray
    end_day: np.ndarray  # exclusive
    peak_hour: np.ndarray
    device: np.ndarray
    mobile_os: np.ndarray  # android / ios
    desktop_os: np.ndarray  # windows / macos / linux
    region: np.ndarray
    language: np.ndarray
    signup: np.ndarray
    price_sens: np.ndarray
    segment: np.ndarray


def _make_users(cfg: SynthConfig, world: _World) -> _Users:
    rng = np.random.default_rng([cfg.seed, 1])
    n_users, k, days = cfg.users, cfg.latent_dim, cfg.days
    sigma = 1.0  # lognormal activity: mean = exp(m + sigma^2 / 2) = mean_instances
    n = np.rint(rng.lognormal(np.log(cfg.mean_instances) - sigma**2 / 2, sigma, n_users))
    n = np.maximum(n, 1).astype(np.int64)
    mu = STATIC_STD * rng.standard_normal((n_users, k))
    d0 = DRIFT_STD * rng.standard_normal((n_users, k))
    late = rng.random(n_users) < 0.3
    start = np.where(late, np.floor(rng.random(n_users) * days * 0.75), 0).astype(np.int64)
    churn = rng.random(n_users) < 0.2
    end_churn = start + 1 + np.floor(rng.random(n_users) * (days - start)).astype(np.int64)
    end = np.where(churn, end_churn, days).astype(np.int64)
    primary = rng.choice(len(DEVICES), n_users, p=[0.6, 0.3, 0.08, 0.02])
    region = rng.integers(0, REGIONS, n_users)
    z0 = mu + d0
    return _Users(
        n=n,
        mu=mu,
        d0=d0,
        tau_days=np.clip(rng.lognormal(np.log(6.0), 0.8, n_users), 1.0, 200.0),
        start_day=start,
        end_day=end,
        peak_hour=rng.choice(24, n_users, p=_diurnal()),
        device=primary,
        mobile_os=rng.choice(2, n_users, p=[0.7, 0.3]),
        desktop_os=rng.choice(3, n_users, p=[0.75, 0.2, 0.05]),
        region=region,
        language=np.where(rng.random(n_users) < 0.9, region % len(LANGUAGES), rng.integers(0, len(LANGUAGES), n_users)),
        signup=T0 - rng.integers(DAY, 3 * 365 * DAY, n_users),
        price_sens=rng.lognormal(np.log(0.3), 0.5, n_users),
        segment=(z0 @ world.segment_proto.T).argmax(1),
    )


def _diurnal() -> np.ndarray:
    """Probability of each hour being a user's peak hour: evenings busy, nights quiet."""
    h = np.arange(24)
    w = 0.3 + np.exp(-((h - 20) ** 2) / 8.0) + 0.6 * np.exp(-((h - 12) ** 2) / 6.0)
    return w / w.sum()


# ----------------------------------------------------------------------------- one chunk of users


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("nk,nk->n", a, b)


def _pick(rng: np.random.Generator, z: np.ndarray, lat: np.ndarray, cand: np.ndarray, beta: float) -> np.ndarray:
    """Gumbel-max choice among candidates [N, M] with logits beta * <z, latent>."""
    score = np.einsum("nk,nmk->nm", z, lat[cand]) * beta
    score += rng.gumbel(size=score.shape)
    return cand[np.arange(len(cand)), score.argmax(1)]


def _pick_all(rng: np.random.Generator, z: np.ndarray, lat: np.ndarray, beta: float) -> np.ndarray:
    """Gumbel-max choice among all rows of a small latent table."""
    score = (z @ lat.T) * beta
    score += rng.gumbel(size=score.shape)
    return score.argmax(1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _timeline(rng: np.random.Generator, cfg: SynthConfig, us: _Users, lo: int, hi: int):
    """Row -> local user, timestamp and position within its request; rows sorted by (user, ts)."""
    n = us.n[lo:hi]
    rows = int(n.sum())
    row_u = np.repeat(np.arange(hi - lo), n)
    first = np.zeros(rows, dtype=bool)
    first[np.cumsum(n) - n] = True
    new_req = first | (rng.random(rows) < 0.55)  # requests of ~1.8 impressions share a ts
    req_of_row = np.cumsum(new_req) - 1
    req_first = np.flatnonzero(new_req)
    req_u = row_u[req_first] + lo
    span = us.end_day[req_u] - us.start_day[req_u]
    day = us.start_day[req_u] + np.floor(rng.random(len(req_u)) * span).astype(np.int64)
    hour = (us.peak_hour[req_u] + np.rint(rng.normal(0.0, 3.5, len(req_u))).astype(np.int64)) % 24
    t = day * DAY + hour * 3600 + rng.integers(0, 3600, len(req_u))
    t = t[np.lexsort((t, req_u))]  # sort each user's requests by time (users stay in blocks)
    ts = T0 + t[req_of_row]
    pos = np.arange(rows) - req_first[req_of_row]
    return row_u, ts, pos


def _state(
    rng: np.random.Generator, cfg: SynthConfig, us: _Users, lo: int, hi: int, row_u: np.ndarray, ts: np.ndarray
) -> np.ndarray:
    """z_u(ts) = mu_u + OU drift, simulated on the grid and interpolated at each row."""
    steps = cfg.days * DAY // GRID + 1
    a = np.exp(-GRID / (us.tau_days[lo:hi] * DAY))[:, None]
    scale = DRIFT_STD * np.sqrt(1.0 - a**2)
    eps = rng.standard_normal((hi - lo, steps, cfg.latent_dim))
    d = np.empty((hi - lo, steps + 1, cfg.latent_dim))
    d[:, 0] = us.d0[lo:hi]
    for g in range(steps):
        d[:, g + 1] = a * d[:, g] + scale * eps[:, g]
    x = (ts - T0) / GRID
    g0 = np.minimum(np.floor(x).astype(np.int64), steps - 1)
    w = (x - g0)[:, None]
    return us.mu[lo:hi][row_u] + (1 - w) * d[row_u, g0] + w * d[row_u, g0 + 1]


def _simulate_chunk(cfg: SynthConfig, world: _World, us: _Users, lo: int, hi: int, chunk: int) -> dict:
    """All columns of users [lo, hi), plus the hidden state 'z' and click probability 'p_click'."""
    rng = np.random.default_rng([cfg.seed, 2, chunk])
    row_u, ts, pos = _timeline(rng, cfg, us, lo, hi)
    rows = len(ts)
    u = row_u + lo
    z = _state(rng, cfg, us, lo, hi, row_u, ts)
    z_stale = us.mu[u] + us.d0[u]  # the profile the item recommender still uses

    # exposure: items from the stale profile, ads and queries from the current state
    cand = np.searchsorted(world.item_pop_cdf, rng.random((rows, CANDIDATES)), side="right")
    item = _pick(rng, z_stale, world.item_lat, np.minimum(cand, cfg.items - 1), BETA_ITEM)
    if cfg.label == "seen-before":  # own stream: every other column stays as in click mode
        item, seen = _seen_before_items(np.random.default_rng([cfg.seed, 3, chunk]), cfg, row_u, ts)
    campaign = _pick(rng, z, world.camp_lat, rng.integers(0, cfg.campaigns, (rows, CANDIDATES)), BETA_CAMPAIGN)
    cand = campaign[:, None] * CREATIVES_PER_CAMPAIGN + np.arange(CREATIVES_PER_CAMPAIGN)
    creative = _pick(rng, z, world.creative_lat, cand, BETA_CREATIVE)
    placement = _pick_all(rng, z, world.placement_lat, BETA_PLACEMENT)
    page = rng.choice(len(PAGES), rows, p=PAGE_PROBS)
    query = np.zeros(rows, dtype=np.int64)
    s = np.flatnonzero(page == SEARCH)
    query[s] = _pick(rng, z[s], world.query_lat, rng.integers(1, QUERY_CLUSTERS + 1, (len(s), CANDIDATES)), BETA_QUERY)

    # context around user habits
    device = np.where(rng.random(rows) < 0.85, us.device[u], rng.integers(0, len(DEVICES), rows))
    os_ = np.select([device == 1, device == 3], [2 + us.desktop_os[u], 5], us.mobile_os[u])
    net = np.where(
        np.isin(device, (1, 3)) & (rng.random(rows) < 0.95),
        0,
        rng.choice(len(NETWORKS), rows, p=[0.5, 0.2, 0.25, 0.05]),
    )
    slot = np.minimum(pos + rng.geometric(0.5, rows) - 1, len(SLOTS) - 1)
    ad_format = np.where(rng.random(rows) < 0.7, world.camp_format[campaign], rng.integers(0, len(AD_FORMATS), rows))
    region = np.where(rng.random(rows) < 0.95, us.region[u], rng.integers(0, REGIONS, rows))
    hour = (ts // 3600) % 24
    dow = (ts // DAY + 3) % 7  # 1970-01-01 was a Thursday
    price = world.item_price[item] * (1.0 - 0.3 * rng.random(rows) * (rng.random(rows) < 0.3))

    # labels: the response to item, ad and context depends on the current state
    ctx = (
        world.device_lat[device] + world.page_lat[page] + world.daypart_lat[hour // 6] + world.placement_lat[placement]
    )
    logit = (
        B0
        + world.item_bias[item]
        + world.device_bias[device]
        + world.page_bias[page]
        + world.placement_bias[placement]
        + world.format_bias[ad_format]
        + world.network_bias[net]
        + 0.15 * (dow >= 5)
        - 0.25 * slot
        + A_ITEM * _rowdot(z, world.item_lat[item])
        + A_CREATIVE * _rowdot(z, world.creative_lat[creative])
        + A_QUERY * _rowdot(z, world.query_lat[query])
        + A_CTX * _rowdot(z, ctx)
    )
    p_click = _sigmoid(logit)
    click = rng.random(rows) < p_click
    conv_logit = (
        C0
        + A_CONV * _rowdot(z, world.item_conv_lat[item] + world.adv_lat[world.camp_adv[campaign]])
        - us.price_sens[u] * (np.log(price) - 3.0)
    )
    conv = click & (rng.random(rows) < _sigmoid(conv_logit))
    click_time = ts + 1 + np.floor(rng.exponential(30.0, rows)).astype(np.int64)
    delay = np.clip(rng.lognormal(np.log(6 * 3600), 1.2, rows), 60, ATTRIBUTION_WINDOW).astype(np.int64)
    conv_time = np.where(~click, click_time, np.where(conv, ts + delay, ts + ATTRIBUTION_WINDOW))

    sparse = {
        "user_id": u,
        "item_id": item,
        "category": world.item_cat[item],
        "brand": world.item_brand[item],
        "price_bucket": world.item_price_bucket[item],
        "device": device,
        "os": os_,
        "network": net,
        "slot": slot,
        "hour": hour,
        "day_of_week": dow,
        "page": page,
        "query_cluster": query,
        "campaign": campaign,
        "creative": creative,
        "advertiser": world.camp_adv[campaign],
        "ad_format": ad_format,
        "placement": placement,
        "region": region,
        "language": us.language[u],
        "user_segment": us.segment[u],
    }
    dense = np.stack(
        [
            price,
            world.item_pop[item] * 1e6,  # expected impressions per million
            1.0 / np.log2(slot + 2.0),
            (ts - us.signup[u]) / DAY,
        ],
        axis=1,
    )
    if cfg.label == "seen-before":
        labels, label_time = seen[:, None], (ts + 1)[:, None]
    else:
        labels, label_time = np.stack([click, conv], axis=1), np.stack([click_time, conv_time], axis=1)
    return {
        "user": u,
        "ts": ts,
        "sparse": sparse,
        "dense": dense,
        "labels": labels,
        "label_time": label_time,
        "z": z,
        "p_click": p_click,
    }


def _seen_before_items(
    rng: np.random.Generator, cfg: SynthConfig, row_u: np.ndarray, ts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Seen-before exposure and its exact label for rows sorted by (user, ts).

    Row r's history is rows [first, p): p is the first row of r's (user, ts) run (same user,
    strictly earlier ts before it), first = max(user start, p - history_len). An item is
    copied from a uniform history row with probability SEEN_COPY_PROB when the history is not
    empty, else drawn uniformly from the catalog. Copies point to strictly earlier rows, so
    pointer doubling resolves the chains without a loop over positions. The label is then
    recomputed from the definition: does the item occur among the history rows' items?
    """
    rows = len(ts)
    idx = np.arange(rows, dtype=np.int64)
    new_user = np.ones(rows, dtype=bool)
    new_user[1:] = row_u[1:] != row_u[:-1]
    new_run = new_user.copy()
    new_run[1:] |= ts[1:] != ts[:-1]
    user_start = np.maximum.accumulate(np.where(new_user, idx, 0))
    p = np.maximum.accumulate(np.where(new_run, idx, 0))
    first = np.maximum(user_start, p - cfg.history_len)
    length = p - first
    copy = (rng.random(rows) < SEEN_COPY_PROB) & (length > 0)
    fresh = rng.integers(0, cfg.items, rows)
    pick = first + np.floor(rng.random(rows) * length).astype(np.int64)
    src = np.where(copy, np.minimum(pick, p - 1), idx)  # src[r] < r for copies, src[r] = r for fresh rows
    while True:
        nxt = src[src]
        if np.array_equal(nxt, src):
            break
        src = nxt
    item = fresh[src]
    # label: the last row of the same (user, item) before p, if any, lies in [first, p)
    _, group = np.unique(row_u * np.int64(cfg.items) + item, return_inverse=True)
    group = group.reshape(-1).astype(np.int64)
    key = np.sort(group * rows + idx)
    at = np.searchsorted(key, group * rows + p, side="left") - 1
    hit = key[np.maximum(at, 0)]
    seen = (at >= 0) & (hit // rows == group) & (hit % rows >= first)
    return item, seen


# ----------------------------------------------------------------------------- public API


def user_keys(n_users: int) -> np.ndarray:
    """Zero-padded keys, so that the sorted order of keys is the user index order."""
    width = len(str(max(n_users - 1, 0)))
    return np.array([f"u{i:0{width}d}" for i in range(n_users)])


# a worker's copy of the world and the users, set once per process by _init_worker
_SHARED: dict = {}


def _init_worker(cfg: SynthConfig, world: _World, us: _Users) -> None:
    _SHARED.update(cfg=cfg, world=world, us=us)


def _chunk_in_worker(task: tuple[int, int, int]) -> dict:
    lo, hi, chunk = task
    return _simulate_chunk(_SHARED["cfg"], _SHARED["world"], _SHARED["us"], lo, hi, chunk)


def default_workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_columns(
    cfg: SynthConfig, progress: bool | None = None, hidden: dict | None = None, workers: int = 1
) -> Columns:
    """Simulates every user; rows come out sorted by (user, ts). ``hidden`` (a dict) receives the
    hidden state ``z`` [N, k] and true click probability ``p_click`` [N] aligned with the rows.
    ``workers`` > 1 simulates chunks in that many processes (the same columns, byte for byte)."""
    world = _make_world(cfg)
    us = _make_users(cfg, world)
    schema = synth_schema(cfg)
    rows = int(us.n.sum())
    cols = Columns(
        user=np.empty(rows, np.int64),
        user_keys=user_keys(cfg.users),
        ts=np.empty(rows, np.int64),
        labels=np.empty((rows, len(schema.labels)), np.float32),
        label_time=np.empty((rows, len(schema.labels)), np.int64),
        dense=np.empty((rows, len(schema.dense)), np.float32),
        sparse={f.name: np.empty(rows, np.int64) for f in schema.sparse},
        multi={},
    )
    if hidden is not None:
        hidden["z"] = np.empty((rows, cfg.latent_dim), np.float32)
        hidden["p_click"] = np.empty(rows, np.float32)
    tasks = [(lo, min(lo + CHUNK_USERS, cfg.users), c) for c, lo in enumerate(range(0, cfg.users, CHUNK_USERS))]
    workers = max(1, min(workers, len(tasks)))
    with contextlib.ExitStack() as stack:
        if workers == 1:
            chunks: Iterable[dict] = (_simulate_chunk(cfg, world, us, lo, hi, c) for lo, hi, c in tasks)
        else:  # spawn: a clean interpreter per worker, whatever threads this process runs
            pool = stack.enter_context(
                ProcessPoolExecutor(workers, mp.get_context("spawn"), _init_worker, (cfg, world, us))
            )
            chunks = pool.map(_chunk_in_worker, tasks)  # in task order
        if progress is None:
            progress = rows >= 2_000_000
        if progress:
            from tqdm import tqdm

            chunks = tqdm(chunks, total=len(tasks), desc=f"synth ({workers} proc)", unit="chunk", file=sys.stderr)
        row = 0
        for out in chunks:
            _store(cols, hidden, row, out)
            row += len(out["ts"])
    assert row == rows
    return cols


def _store(cols: Columns, hidden: dict | None, row: int, out: dict) -> None:
    """Writes one chunk's columns at ``row``."""
    sl = slice(row, row + len(out["ts"]))
    cols.user[sl], cols.ts[sl] = out["user"], out["ts"]
    cols.labels[sl], cols.label_time[sl], cols.dense[sl] = out["labels"], out["label_time"], out["dense"]
    for name, ids in out["sparse"].items():
        cols.sparse[name][sl] = ids
    if hidden is not None:
        hidden["z"][sl], hidden["p_click"][sl] = out["z"], out["p_click"]


def generate(
    out: str | Path,
    users: int = 1000,
    mean_instances: float = 100.0,
    seed: int = 0,
    items: int = 10_000,
    categories: int = 200,
    campaigns: int = 100,
    days: int = 60,
    latent_dim: int = 8,
    progress: bool | None = None,
    label: str = "click",
    history_len: int = 128,
    workers: int = 1,
) -> InstanceLog:
    """Writes a synthetic instance log to ``out`` (atomically) and returns it.

    ``label``: "click" (tasks click and conversion) or "seen-before" (one task ``seen_before``,
    checked against the last ``history_len`` strictly-earlier instances; see the module docstring).
    ``workers``: processes simulating chunks of users (the same log, byte for byte).
    """
    cfg = SynthConfig(
        users=users,
        mean_instances=mean_instances,
        seed=seed,
        items=items,
        categories=categories,
        campaigns=campaigns,
        days=days,
        latent_dim=latent_dim,
        label=label,
        history_len=history_len,
    )
    cols = build_columns(cfg, progress=progress, workers=workers)
    return write_instance_log(out, synth_schema(cfg), cols, source=cfg.describe())


def cli(argv: list[str]) -> int:
    """``iat-rec data synth --out DIR [--users N] [--mean-instances M] [--seed S] [--label L] ...``"""
    d = SynthConfig()
    p = argparse.ArgumentParser(prog="iat-rec data synth", description="Write a synthetic instance log.")
    p.add_argument("--out", required=True, help="output instance-log directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing instance log at --out")
    p.add_argument("--users", type=int, default=d.users)
    p.add_argument("--mean-instances", type=float, default=d.mean_instances, help="mean instances per user")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--items", type=int, default=d.items)
    p.add_argument("--categories", type=int, default=d.categories)
    p.add_argument("--campaigns", type=int, default=d.campaigns)
    p.add_argument("--days", type=int, default=d.days, help="time span of the log in days")
    p.add_argument("--latent-dim", type=int, default=d.latent_dim, help="dimension of the hidden user state")
    p.add_argument(
        "--label",
        choices=LABEL_MODES,
        default=d.label,
        help="click: click + conversion tasks; seen-before: one task, 'the item is among the "
        "user's last --history-len strictly-earlier instances' (a check that history is read)",
    )
    p.add_argument(
        "--history-len",
        type=int,
        default=d.history_len,
        help="seen-before mode: history length T (match the stage-2 ranker's max_len)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: on for >= 2M rows)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="processes simulating chunks of 1024 users; the log is the same for any number (default: every core)",
    )
    a = p.parse_args(argv)
    if a.workers < 1:
        raise IatError(f"--workers must be >= 1, not {a.workers}")
    check_log_out(a.out, a.overwrite)
    t = time.perf_counter()
    log = generate(
        a.out,
        users=a.users,
        mean_instances=a.mean_instances,
        seed=a.seed,
        items=a.items,
        categories=a.categories,
        campaigns=a.campaigns,
        days=a.days,
        latent_dim=a.latent_dim,
        progress=a.progress,
        label=a.label,
        history_len=a.history_len,
        workers=a.workers,
    )
    print(
        f"synth: {log.rows:,} rows, {log.users:,} users -> {log.path} "
        f"({time.perf_counter() - t:.1f}s, fingerprint {log.fingerprint})"
    )
    return 0
