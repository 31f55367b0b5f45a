"""A Triton "range gather" for the fetch benchmark: request b's history is one contiguous block
of token-table rows [first_b, first_b + length_b) (the export writes tokens in (user, time)
order), so the fetch can copy blocks into the padded [B, T, dim] tensor the reader consumes,
with no id list and no per-row index arithmetic beyond one add. This measures how close a
gather of this shape can come to copy bandwidth; it is a benchmark case, not the model's path
(the model's lookup goes through TorchRec's sharded EmbeddingCollection).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs have no Triton; the fetch benchmark then skips the case
    triton = None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


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


def range_gather(table: torch.Tensor, first: torch.Tensor, length: torch.Tensor, max_len: int,
                 block_t: int = 32) -> torch.Tensor:
    """[B, max_len, dim]: out[b, t] = table[first[b] + t] for t < length[b], else 0."""
    if not available(table.device):
        raise RuntimeError("range_gather needs Triton and a CUDA tensor")
    batch, dim = first.numel(), table.shape[1]
    out = torch.empty(batch, max_len, dim, dtype=table.dtype, device=table.device)
    grid = (batch, triton.cdiv(max_len, block_t))
    _range_gather_kernel[grid](table, first, length, out, max_len, D=dim, BLOCK_T=block_t)
    return out


def reference(table: torch.Tensor, first: torch.Tensor, length: torch.Tensor, max_len: int) -> torch.Tensor:
    """The same in plain torch (for checking the kernel)."""
    t = torch.arange(max_len, device=table.device)
    valid = t[None, :] < length[:, None]
    ids = torch.where(valid, first[:, None] + t[None, :], 0)
    return table[ids] * valid[..., None].to(table.dtype)
