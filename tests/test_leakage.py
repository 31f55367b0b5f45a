"""End-to-end leakage invariance of stage 2, property-based.

For a request at time t: change every feature and label of every instance at or after t (the
request's own label included; its features are the request), every label not yet available
at t, and the token-table rows of every instance at or after t. The request's stage-2 batch
(history ids, side info, hand-crafted ids) and the ranker's logits must not change, for every
history branch at once (IAT with the candidate's token as query, hand-crafted, labels).
"""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iat_rec.batching.stage2_data import HistorySource, Stage2BatchMaker
from iat_rec.data.instance_log import InstanceLog
from iat_rec.tables import CANDIDATE_FEATURE
from iat_rec.train.config import ModelConfig
from modules.ranker import RankerConfig, build_ranker

T = 16


@pytest.fixture(scope="module")
def setup(tiny_log):
    log = InstanceLog(tiny_log)
    torch.manual_seed(0)
    model = build_ranker(
        log.schema,
        ModelConfig(emb_dim=8, hidden=32, num_groups=4, group_dim=16, decompress=(16,)),
        RankerConfig(history="both", query="token", max_len=T, reader_layers=1, head=(16,)),
        len(log.schema.labels),
        token_rows=log.rows,
        token_dim=8,
        token_stats=(torch.zeros(8), torch.ones(8)),
    )
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        model.token_mean.zero_()
        model.token_std.fill_(1.0)
    model.eval()
    return log, model


def perturbed(log: InstanceLog, t: int, own: int, rng: np.random.Generator) -> InstanceLog:
    """A copy of ``log`` whose rows at or after ``t`` (but the request ``own``'s features) get
    other features and labels, and whose labels unknown at ``t`` are flipped."""
    out = copy.copy(log)
    ts = np.asarray(log.ts)
    later = ts >= t
    feats = later.copy()
    feats[own] = False
    n = int(feats.sum())
    out.__dict__["dense"] = np.array(log.dense)
    out.dense[feats] = rng.normal(size=(n, out.dense.shape[1])).astype(np.float32)
    out.__dict__["sparse"] = {}
    for f in log.schema.sparse:
        col = np.array(log.sparse[f.name])
        col[feats] = rng.integers(0, f.num_embeddings, n)
        out.sparse[f.name] = col
    labels, label_time = np.array(log.labels), np.array(log.label_time)
    unknown = (label_time >= t) | later[:, None]
    labels[unknown] = 1.0 - labels[unknown]
    label_time[later] = ts[later, None] + rng.integers(0, 10**6, (int(later.sum()), label_time.shape[1]))
    out.__dict__["labels"], out.__dict__["label_time"] = labels, label_time
    return out


def request(log: InstanceLog, model, row: int):
    source = HistorySource.from_log(log, list(log.schema.sequence))
    batch = Stage2BatchMaker(source, T, same_log=True, candidate=True)(log, np.array([row]))
    with torch.no_grad():
        _, (_, logits, *_rest) = model(batch)
    return batch, logits


@settings(max_examples=25, deadline=None)
@given(pick=st.floats(0.0, 1.0, exclude_max=True), seed=st.integers(0, 2**31 - 1))
def test_nothing_at_or_after_t_reaches_a_request(setup, pick, seed):
    log, model = setup
    row = int(pick * log.rows)
    t = int(log.ts[row])
    before, logits_before = request(log, model, row)
    first = int(log.user_offsets[log.user[row]])
    assert bool(before.hist_valid.any()) == (
        int(log.ts[first]) < t
    )  # a history whenever the user has an earlier instance
    rng = np.random.default_rng(seed)
    other = perturbed(log, t, row, rng)
    weight = model.tokens.embeddings["iat_tokens"].weight
    saved = weight.detach().clone()
    later = torch.from_numpy(np.flatnonzero(np.asarray(log.ts) >= t))
    later = later[later != row]  # the candidate's own token is the request's features
    with torch.no_grad():
        weight[later] = torch.from_numpy(rng.normal(size=(len(later), weight.shape[1])).astype(np.float32))
    try:
        after, logits_after = request(other, model, row)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    for name in ("hist_labels", "hist_gap", "hist_valid", "dense"):
        assert torch.equal(getattr(before, name), getattr(after, name)), name
    for name in ("history_ids", "shared", "sparse"):
        a, b = getattr(before, name), getattr(after, name)
        assert a.keys() == b.keys() and torch.equal(a.values(), b.values()) and torch.equal(a.lengths(), b.lengths()), (
            name
        )
    assert CANDIDATE_FEATURE in before.history_ids.keys()
    torch.testing.assert_close(logits_before, logits_after, rtol=0, atol=0)
