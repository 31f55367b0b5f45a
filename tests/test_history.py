"""The leakage-free timestamp fetch: property tests over random logs and requests."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from iat_rec.batching.history import (
    GAP_BUCKETS,
    LABEL_UNKNOWN,
    HistoryIndex,
    expand_ranges,
    padded_side_info,
    side_info,
)


def random_log(rng, users, max_rows):
    counts = rng.integers(0, max_rows, size=users)
    user = np.repeat(np.arange(users), counts)
    ts = rng.integers(0, 50, size=len(user))  # few distinct times: many ties
    order = np.lexsort((ts, user))
    user, ts = user[order], ts[order]
    offsets = np.searchsorted(user, np.arange(users + 1))
    keys = np.array([f"u{i:04d}" for i in range(users)])
    labels = rng.integers(0, 2, size=(len(user), 2)).astype(np.float32)
    label_time = ts[:, None] + rng.integers(0, 20, size=(len(user), 2))
    return user, ts, offsets, keys, labels, label_time


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), users=st.integers(1, 12), max_rows=st.integers(1, 30), T=st.integers(1, 10))
def test_fetch_is_the_latest_T_strictly_earlier_rows_of_the_user(seed, users, max_rows, T):
    rng = np.random.default_rng(seed)
    user, ts, offsets, keys, labels, label_time = random_log(rng, users, max_rows)
    if len(ts) == 0:
        return
    index = HistoryIndex(ts, offsets, keys)
    req_user = rng.integers(-1, users, size=40)
    req_t = rng.integers(-5, 60, size=40)
    first, length = index.ranges(req_user, req_t, T)
    rows = expand_ranges(first, length)
    codes, gap = side_info(rows, length, req_t, labels, label_time, ts)
    at = 0
    for u, t, n in zip(req_user, req_t, length):
        got = rows[at : at + n]
        c = codes[at : at + n]
        at += n
        assert n <= T
        if u < 0:
            assert n == 0
            continue
        earlier = [r for r in range(offsets[u], offsets[u + 1]) if ts[r] < t]
        assert list(got) == earlier[-T:] if earlier else n == 0  # the most recent T, in time order
        assert all(user[r] == u and ts[r] < t for r in got)
        for r, code in zip(got, c):
            for k in range(2):
                if label_time[r, k] >= t:
                    assert code[k] == LABEL_UNKNOWN  # no label leaks before it is known
                else:
                    assert code[k] == labels[r, k]
    assert (gap >= 0).all()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), users=st.integers(1, 12), max_rows=st.integers(1, 30), T=st.integers(1, 10))
def test_padded_side_info_is_the_flat_side_info_laid_out_by_step(seed, users, max_rows, T):
    """The loader's [B, T] layout (read on a grid of rows) holds exactly the flat per-step side
    info at each history's first steps and zeros after, also where every history is empty."""
    rng = np.random.default_rng(seed)
    user, ts, offsets, keys, labels, label_time = random_log(rng, users, max_rows)
    index = HistoryIndex(ts, offsets, keys)
    req_t = rng.integers(-5, 60, size=40)
    first, length = index.ranges(rng.integers(-1, users, size=40), req_t, T)
    codes, gap, valid = padded_side_info(first, length, req_t, labels, label_time, ts, T)
    assert codes.shape == (40, T, 2) and gap.shape == valid.shape == (40, T)
    assert codes.dtype == gap.dtype == np.int8 and valid.tolist() == (np.arange(T) < length[:, None]).tolist()
    want_codes, want_gap = np.zeros_like(codes), np.zeros_like(gap)
    if len(ts):
        flat_codes, flat_gap = side_info(expand_ranges(first, length), length, req_t, labels, label_time, ts)
        want_codes[valid], want_gap[valid] = flat_codes, flat_gap
    assert np.array_equal(codes, want_codes) and np.array_equal(gap, want_gap)


def test_cross_domain_users_match_by_key_and_unknown_users_get_nothing():
    ts = np.array([1, 5, 9, 2, 3])
    offsets = np.array([0, 3, 5])
    index = HistoryIndex(ts, offsets, np.array(["alice", "bob"]))
    users = index.user_index(np.array(["bob", "carol", "alice"]))
    assert users.tolist() == [1, -1, 0]
    first, length = index.ranges(users, np.array([10, 10, 6]), max_len=8)
    assert length.tolist() == [2, 0, 2]
    assert expand_ranges(first, length).tolist() == [3, 4, 0, 1]


def test_cross_domain_keys_match_whole_never_truncated():
    index = HistoryIndex(np.array([1, 2]), np.array([0, 1, 2]), np.array(["A", "B"]))
    assert index.user_index(np.array(["Alice", "Bob", "A", "B"])).tolist() == [-1, -1, 0, 1]
    empty = HistoryIndex(np.zeros(0, np.int64), np.array([0]), np.array([], dtype=str))
    assert empty.user_index(np.array(["A"])).tolist() == [-1]  # a source without users knows nobody


def test_request_before_or_after_every_row():
    index = HistoryIndex(np.array([10, 20]), np.array([0, 2]), np.array(["a"]))
    assert index.ranges(np.array([0]), np.array([-100]), 5)[1].tolist() == [0]
    assert index.ranges(np.array([0]), np.array([10]), 5)[1].tolist() == [0]  # strictly earlier only
    first, length = index.ranges(np.array([0]), np.array([10**9]), 5)
    assert (first.tolist(), length.tolist()) == ([0], [2])


def test_gap_bucket_is_floor_log2_of_gap_plus_one_exactly_at_powers_of_two():
    """The bucket comes from the float's exponent: every gap below 5000 and each gap next to a
    power of two up to 2^40 lands where integer arithmetic puts it (the top bucket holds the rest)."""
    near = np.array([2**k + d for k in range(41) for d in (-2, -1, 0, 1)])
    gap = np.unique(np.concatenate([np.arange(5000), near[near >= 1] - 1]))
    n, t = len(gap), int(gap.max())  # one request at time t over rows at t - gap
    _, bucket = side_info(np.arange(n), np.array([n]), np.array([t]), np.zeros((n, 1)), np.zeros((n, 1)), t - gap)
    want = np.minimum([int(g + 1).bit_length() - 1 for g in gap], GAP_BUCKETS - 1)
    assert bucket.dtype == np.int8 and np.array_equal(bucket, want)
