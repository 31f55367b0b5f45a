"""Range gather: the history of a request is one contiguous block of token-table rows.

The export writes tokens in (user, time) order, so request b's last T instances before its
time are rows ``[first_b, first_b + length_b)`` (``iat_rec.batching.history``). Fetching them
is a block copy into the padded ``[B, T, dim]`` tensor the reader consumes: no id list, no
per-row index arithmetic beyond one add, no TorchRec input or output all-to-all. On CUDA a
Triton kernel copies the blocks (0.95 of copy bandwidth on an H100, benchmarks/NOTES.md
attempt 6); on CPU the same result comes from one torch gather.
"""

from __future__ import annotations

import torch
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


class RangeTokenTable(nn.Module):
    """The frozen token table as a plain tensor replicated on each rank, read by ranges.

    Not a TorchRec table: no planner, no sharding, no all-to-all. Each rank holds every row,
    so it suits one GPU, or several when the table fits beside the model (a 100M x 64 fp16
    table is 12.8 GB). The rows are a non-persistent buffer: they come from the token-table
    artifact (``load``), never from the run's checkpoints, and DDP does not broadcast them
    (DMP wraps with ``broadcast_buffers=False``; the buffer is empty until after wrapping).
    """

    def __init__(self, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("rows", torch.zeros(0, dim, dtype=dtype), persistent=False)

    def load(self, rows: torch.Tensor) -> None:
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"token rows of shape {tuple(rows.shape)}, expected [rows, {self.dim}]")
        self.rows = rows.detach().to(device=self.rows.device, dtype=self.rows.dtype).contiguous()

    def forward(self, first: torch.Tensor, length: torch.Tensor, max_len: int) -> torch.Tensor:
        return range_gather(self.rows, first, length, max_len)

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, dim]: the rows at ``rows`` (a request's own instance), zeros where ``rows < 0``."""
        out = self.rows[rows.clamp(min=0)]
        return out.masked_fill((rows < 0)[:, None], 0)
