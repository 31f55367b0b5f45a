"""Range gather: the history of a request is one contiguous block of token-table rows.

The export writes tokens in (user, time) order, so request b's last T instances before its
time are rows ``[first_b, first_b + length_b)`` (``iat_rec.batching.history``). Fetching them
is a block copy into the padded ``[B, T, dim]`` tensor the reader consumes: no id list, no
per-row index arithmetic beyond one add, no TorchRec input or output all-to-all. On CUDA a
Triton kernel copies the blocks (0.95 of copy bandwidth on an H100, benchmarks/NOTES.md
attempt 6); on CPU the same result comes from one torch gather.

A table too large for every rank to hold is cut into contiguous row shards, one per rank
(``sharded=True``). A request's range is split at the shard bounds (a history of T rows
crosses at most one bound when T is at most a shard), each piece goes as (start, length) to
the rank that owns it, and the owner copies the rows and sends them back: three all-to-alls
(piece counts, pieces, rows), where TorchRec's row-wise lookup sends every id. Splitting at
the bounds keeps the export as it is: no padding rows, the same token bytes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs have no Triton: the CPU path below needs none
    triton = None


if triton is not None:

    @triton.jit
    def _range_gather_kernel(table, first, length, out, T, D: tl.constexpr, BLOCK_T: tl.constexpr):
        b = tl.program_id(0)
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, D)
        start = tl.load(first + b).to(tl.int64)
        n = tl.load(length + b)
        rows = start + t.to(tl.int64)
        x = tl.load(table + rows[:, None] * D + d[None, :], mask=(t < n)[:, None], other=0.0)
        dst = (b.to(tl.int64) * T + t.to(tl.int64))[:, None] * D + d[None, :]
        tl.store(out + dst, x, mask=(t < T)[:, None])


def range_gather(
    table: torch.Tensor, first: torch.Tensor, length: torch.Tensor, max_len: int, block_t: int = 32
) -> torch.Tensor:
    """[B, max_len, dim] of ``table``'s dtype: out[b, t] = table[first[b] + t] for t < length[b], else 0.

    ``first`` and ``length`` are [B] integer tensors on ``table``'s device; the caller
    guarantees ``first + length <= rows`` (the history index does) and ``length <= max_len``.
    """
    if table.dim() != 2 or first.shape != length.shape or first.dim() != 1:
        raise ValueError(f"range_gather: table [rows, dim], first and length [B]; got {table.shape}, {first.shape}")
    if table.device.type != "cuda":
        return reference(table, first, length, max_len)
    if triton is None:
        raise RuntimeError("range_gather on CUDA needs Triton (it ships with the CUDA builds of torch)")
    batch, dim = first.numel(), table.shape[1]
    if dim & (dim - 1):
        raise ValueError(f"range_gather's kernel needs a power-of-two row width, not {dim}")
    table = table.contiguous()
    out = torch.empty(batch, max_len, dim, dtype=table.dtype, device=table.device)
    if batch:
        grid = (batch, triton.cdiv(max_len, block_t))
        _range_gather_kernel[grid](table, first.contiguous(), length.contiguous(), out, max_len, D=dim, BLOCK_T=block_t)
    return out


def reference(table: torch.Tensor, first: torch.Tensor, length: torch.Tensor, max_len: int) -> torch.Tensor:
    """The same in plain torch: the CPU path, and the check of the kernel."""
    t = torch.arange(max_len, device=table.device)
    valid = t[None, :] < length[:, None]
    ids = torch.where(valid, first[:, None].long() + t[None, :], 0)
    return table[ids].masked_fill(~valid[..., None], 0)


def even_bounds(rows: int, world_size: int) -> list[int]:
    """Row shard bounds ``[b_0 = 0, ..., b_W = rows]``: rank r owns rows ``[b_r, b_r+1)``."""
    per = -(-rows // world_size)
    return [min(r * per, rows) for r in range(world_size + 1)]


def split_at_bounds(
    bounds: torch.Tensor, first: torch.Tensor, length: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each request's range cut at the shard ``bounds`` [W + 1]: per non-empty piece, sorted by
    owner, (request, owner, first row, length, offset of the piece in the request's range)."""
    valid = length > 0
    o1 = torch.searchsorted(bounds, first, right=True) - 1
    o2 = torch.searchsorted(bounds, first + length - 1, right=True) - 1
    count = torch.where(valid, o2 - o1 + 1, 0)
    req = torch.repeat_interleave(torch.arange(first.numel(), device=first.device), count)
    owner = o1[req] + torch.arange(req.numel(), device=first.device) - (torch.cumsum(count, 0) - count)[req]
    start = torch.maximum(first[req], bounds[owner])
    n = torch.minimum(first[req] + length[req], bounds[owner + 1]) - start
    keep = n > 0  # an empty shard (fewer rows than ranks) inside a range
    order = torch.argsort(owner[keep], stable=True)
    req, owner, start, n = req[keep][order], owner[keep][order], start[keep][order], n[keep][order]
    return req, owner, start, n, start - first[req]


def _spans(start: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The concatenated ``arange(start_i, start_i + n_i)``."""
    total = int(n.sum())
    base = torch.repeat_interleave(start - (torch.cumsum(n, 0) - n), n, output_size=total)
    return base + torch.arange(total, device=n.device)


def _all_to_all(send: torch.Tensor, send_counts: torch.Tensor, recv_counts: torch.Tensor) -> torch.Tensor:
    out = send.new_empty((int(recv_counts.sum()), *send.shape[1:]))
    dist.all_to_all_single(out, send.contiguous(), recv_counts.tolist(), send_counts.tolist())
    return out


def exchange_ranges(
    shard: torch.Tensor, bounds: torch.Tensor, first: torch.Tensor, length: torch.Tensor, max_len: int
) -> torch.Tensor:
    """Collective: ``range_gather`` of the whole table, where this rank holds rows
    ``[bounds[rank], bounds[rank + 1])`` as ``shard``. Every rank calls it once per batch."""
    world = bounds.numel() - 1
    first, length = first.long(), length.long()
    req, owner, start, n, offset = split_at_bounds(bounds, first, length)
    send_pieces = torch.bincount(owner, minlength=world)
    recv_pieces = torch.empty_like(send_pieces)
    dist.all_to_all_single(recv_pieces, send_pieces)
    asked = _all_to_all(torch.stack([start - bounds[owner], n], 1), send_pieces, recv_pieces)  # (local start, n)
    rows_out = torch.zeros(world, dtype=torch.long, device=n.device).index_add_(
        0, torch.repeat_interleave(torch.arange(world, device=n.device), recv_pieces), asked[:, 1]
    )
    rows_back = torch.zeros(world, dtype=torch.long, device=n.device).index_add_(0, owner, n)
    got = _all_to_all(shard[_spans(asked[:, 0], asked[:, 1])], rows_out, rows_back)
    out = shard.new_zeros(first.numel() * max_len, shard.shape[1])
    out[_spans(req * max_len + offset, n)] = got
    return out.view(first.numel(), max_len, shard.shape[1])


class RangeTokenTable(nn.Module):
    """The frozen token table as a plain tensor, read by ranges.

    Not a TorchRec table: no planner, no TorchRec sharding. Replicated (the default), each
    rank holds every row and reads with no all-to-all at all: one GPU, or several when the
    table fits beside the model (a 100M x 64 fp16 table is 12.8 GB). ``sharded``: each rank
    holds one contiguous block of rows (``even_bounds``) and requests travel as ranges
    (``exchange_ranges``). The rows are a non-persistent buffer: they come from the
    token-table artifact (``load``), never from the run's checkpoints, and DDP does not
    broadcast them (DMP wraps with ``broadcast_buffers=False``; the buffer is empty until
    after wrapping).
    """

    def __init__(self, dim: int, dtype: torch.dtype, sharded: bool = False) -> None:
        super().__init__()
        self.dim, self.sharded = dim, sharded
        self.register_buffer("rows", torch.zeros(0, dim, dtype=dtype), persistent=False)
        self.register_buffer("bounds", torch.zeros(0, dtype=torch.long), persistent=False)

    def load(self, rows: torch.Tensor, bounds: list[int] | None = None) -> None:
        """``rows``: the whole table, or with ``sharded`` this rank's block of the ``bounds``."""
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"token rows of shape {tuple(rows.shape)}, expected [rows, {self.dim}]")
        if self.sharded:
            rank = dist.get_rank() if dist.is_initialized() else 0
            if bounds is None or rows.shape[0] != bounds[rank + 1] - bounds[rank]:
                raise ValueError(f"a sharded range table takes this rank's rows with the bounds; got {bounds}")
            self.bounds = torch.tensor(bounds, dtype=torch.long, device=self.rows.device)
        self.rows = rows.detach().to(device=self.rows.device, dtype=self.rows.dtype).contiguous()

    @torch.no_grad()
    def forward(self, first: torch.Tensor, length: torch.Tensor, max_len: int) -> torch.Tensor:
        if self.sharded:
            return exchange_ranges(self.rows, self.bounds, first, length, max_len)
        return range_gather(self.rows, first, length, max_len)

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, dim]: the rows at ``rows`` (a request's own instance), zeros where ``rows < 0``."""
        if self.sharded:
            return self(rows.clamp(min=0), (rows >= 0).long(), 1)[:, 0]
        out = self.rows[rows.clamp(min=0)]
        return out.masked_fill((rows < 0)[:, None], 0)
