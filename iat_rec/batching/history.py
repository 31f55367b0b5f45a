"""The history index: "the last T instances of user u before time t" as a range of row ids.

The instance log is sorted by (user, timestamp) and an instance's id is its row number, so
a user's history is the contiguous block ``[start_u, end_u)`` and the fetch is the range
``[max(start_u, p - T), p)`` with ``p = start_u + searchsorted(ts[start_u:end_u], t, 'left')``.
Only strictly earlier timestamps are ever returned: leakage is impossible by construction.

All requests of a batch are answered with one vectorised ``searchsorted`` over the
composite key ``user * (time span + 2) + (ts - t_min)``, which is sorted because the log is.
"""

from __future__ import annotations

import numpy as np

from iat_rec.errors import IatError

LABEL_UNKNOWN = 2  # side-info code of a label not yet available at request time
GAP_BUCKETS = 64  # at most 127: the buckets travel as int8


class HistoryIndex:
    def __init__(self, ts: np.ndarray, user_offsets: np.ndarray, user_keys: np.ndarray):
        self.ts = np.asarray(ts, dtype=np.int64)
        self.user_offsets = np.asarray(user_offsets, dtype=np.int64)
        self.user_keys = np.asarray(user_keys)
        users = len(self.user_offsets) - 1
        self.t_min = int(self.ts.min()) if len(self.ts) else 0
        self.span = (int(self.ts.max()) - self.t_min + 2) if len(self.ts) else 2
        if users * self.span >= 2**62:
            raise IatError(f"history index: {users} users x time span {self.span} overflows int64 keys")
        user_of_row = np.repeat(np.arange(users, dtype=np.int64), np.diff(self.user_offsets))
        self._key = user_of_row * self.span + (self.ts - self.t_min)

    @classmethod
    def from_log(cls, log) -> HistoryIndex:
        return cls(log.ts, log.user_offsets, log.user_keys)

    def user_index(self, keys: np.ndarray) -> np.ndarray:
        """Index of each raw user key here, -1 for users this log does not have (cross-domain).
        Keys compare whole: never cast to this index's fixed string width, which would cut
        ``Alice`` to ``A`` and hand one user another user's history."""
        keys = np.asarray(keys).astype(str)
        if not len(self.user_keys):
            return np.full(len(keys), -1, dtype=np.int64)
        pos = np.searchsorted(self.user_keys, keys)
        pos = np.minimum(pos, len(self.user_keys) - 1)
        return np.where(self.user_keys[pos] == keys, pos, -1)

    def ranges(self, users: np.ndarray, times: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(first row, length) of each request's history: rows of ``users`` with ts < time.

        ``users`` are user indices of this index (-1: unknown user, empty history).
        """
        users = np.asarray(users, dtype=np.int64)
        times = np.asarray(times, dtype=np.int64)
        known = users >= 0
        u = np.where(known, users, 0)
        start = self.user_offsets[u]
        # clamp into the key's time range: earlier than every row -> 0, later -> span - 1
        rel = np.clip(times - self.t_min, 0, self.span - 1)
        p = np.searchsorted(self._key, u * self.span + rel, side="left")
        p = np.clip(p, start, self.user_offsets[u + 1])
        first = np.maximum(start, p - max_len)
        length = np.where(known, p - first, 0)
        return np.where(known, first, 0), length


def expand_ranges(first: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Concatenated row ids of the ranges (the KJT values of a history)."""
    total = int(length.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(length) - length
    return np.repeat(first - offsets, length) + np.arange(total)


def side_info(
    rows: np.ndarray, length: np.ndarray, times: np.ndarray, labels: np.ndarray, label_time: np.ndarray, ts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per history step: label codes (0/1, or LABEL_UNKNOWN until label_time < t) and gap bucket.

    ``rows`` are the concatenated history rows, ``length`` the rows per request, ``times`` the
    request times. Returns (codes int8 [n, K], gap bucket int8 [n]).
    """
    return _step_side_info(rows, np.repeat(np.asarray(times, dtype=np.int64), length), labels, label_time, ts)


def padded_side_info(
    first: np.ndarray,
    length: np.ndarray,
    times: np.ndarray,
    labels: np.ndarray,
    label_time: np.ndarray,
    ts: np.ndarray,
    max_len: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``side_info`` of the ranges (``first``, ``length``) laid out as a batch reads them:
    (codes int8 [B, T, K], gap bucket int8 [B, T], valid bool [B, T]), 0 past each history.

    A stage-2 batch carries these for B x T steps, so they are most of its loader's work. Read
    on the [B, T] grid of rows ``first + step`` (kept inside the source; padding steps are
    zeroed after), not gathered flat and scattered by the mask: the scatter cost more than
    every gather together.
    """
    steps = np.arange(max_len)
    valid = steps < np.asarray(length)[:, None]
    b, k = len(valid), labels.shape[1]
    if not valid.any():  # also a source without rows, which no grid could read
        return np.zeros((b, max_len, k), np.int8), np.zeros((b, max_len), np.int8), valid
    grid = np.asarray(first, dtype=np.int64)[:, None] + steps
    np.minimum(grid, len(ts) - 1, out=grid)  # padding steps read some row (zeroed below) inside the source
    codes, gap = _step_side_info(grid, np.asarray(times, dtype=np.int64)[:, None], labels, label_time, ts)
    codes *= valid[..., None]
    gap *= valid
    return codes, gap, valid


def _step_side_info(rows: np.ndarray, t: np.ndarray, labels, label_time, ts) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 [..., K], gap bucket int8 [...]) of ``rows`` seen at times ``t`` (broadcast
    to ``rows``' shape). Written for the loader's rate: ``np.take`` along axis 0 with flat
    indices (a fancy index of a 2-D memmapped array, or ``take`` with 2-D indices, copies row
    by row, 3-10x slower), and the arithmetic in place."""
    t, flat = np.asarray(t), rows.reshape(-1)
    shape = (*rows.shape, labels.shape[1])
    codes = np.take(labels, flat, axis=0).astype(np.int8).reshape(shape)  # 0/1
    np.copyto(codes, np.int8(LABEL_UNKNOWN), where=np.take(label_time, flat, axis=0).reshape(shape) >= t[..., None])
    gap = np.take(ts, rows).astype(np.int64, copy=False)  # in int64 whatever the source's dtype
    np.subtract(t, gap, out=gap)
    np.maximum(gap, 0, out=gap)
    gap += 1
    # floor(log2(gap + 1)), exact from the float's exponent bits: no rounding at powers of two
    bucket = gap.astype(np.float64).view(np.int64)
    bucket >>= 52
    bucket -= 1023
    np.minimum(bucket, GAP_BUCKETS - 1, out=bucket)
    return codes, bucket.astype(np.int8)
