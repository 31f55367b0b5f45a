"""Unit tests of modules/: shapes, causality, padding invariance, empty histories, gradients,
bf16 autocast, determinism and the reader FLOP formulas. Small sizes: runs in seconds on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from modules.attention import small_table_lookup
from modules.compressor import InstanceReconstruction
from modules.interaction import DCNv2, RankMixer, make_interaction
from modules.mlp import MLP
from modules.query import QueryCompressor
from modules.readers import DINReader, LongerReader, TransformerReader, make_reader, reader_flops
from modules.sit import SourceInstanceTransformer

B, T, D = 3, 10, 16
READERS = ["transformer", "din", "longer"]
READER_KW = {
    "transformer": {"heads": 2},
    "din": {"hidden": (8, 4)},
    "longer": {"heads": 2, "num_global": 2, "merge": 4},
}


def _reader(kind: str, out_dim: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return make_reader(kind, D, out_dim, **READER_KW[kind]).eval()


def _history(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randn(B, T, D, generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :3] = False  # left-padded
    valid[1, 7:] = False  # right-padded
    valid[2, :] = False  # empty history
    return seq, valid, torch.randn(B, D, generator=g)


def _sit(relevance: float | None = None) -> SourceInstanceTransformer:
    torch.manual_seed(0)
    return SourceInstanceTransformer(dim=D, layers=2, heads=2, max_len=64, relevance=relevance).eval()


SIT_RELEVANCE = [None, 4.0]


# ---------------------------------------------------------------- MLP, query, interaction


def test_mlp_shapes() -> None:
    x = torch.randn(4, 5)
    assert MLP(5, [7, 6], 3, act="relu", dropout=0.1, norm=True)(x).shape == (4, 3)
    m = MLP(5, [7], act="silu")
    assert m.out_dim == 7 and m(x).shape == (4, 7)
    assert MLP(5, [], 2)(x).shape == (4, 2)
    with pytest.raises(ValueError):
        MLP(5, [3], act="tanhh")


def test_query_compressor() -> None:
    q = QueryCompressor(12, D, hidden=(32,))
    x = torch.randn(4, 12)
    assert q(x).shape == (4, D)
    torch.testing.assert_close(q([x[:, :5], x[:, 5:]]), q(x))


@pytest.mark.parametrize("num_groups,dim", [(4, 16), (5, 16)])  # 16 % 5 != 0: widened to 20
def test_rankmixer_shapes_and_grads(num_groups: int, dim: int) -> None:
    x = torch.randn(3, num_groups, dim, requires_grad=True)
    m = RankMixer(num_groups, dim, layers=2, ffn_mult=2, out_dim=7)
    y = m(x)
    assert y.shape == (3, 7) and m.out_dim == 7
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert RankMixer(num_groups, dim, layers=1).out_dim == num_groups * m.width


def test_rankmixer_token_mixing_gathers_one_head_from_every_token() -> None:
    t, d = 4, 8
    layer = RankMixer(t, d, layers=1).layers[0]
    x = torch.arange(t * d, dtype=torch.float32).view(1, t, d)
    mixed = x.reshape(1, t, t, d // t).transpose(1, 2).reshape(1, t, d)  # what forward does
    for h in range(t):  # new token h = [head h of token 0, ..., head h of token T-1]
        expect = torch.cat([x[0, i, h * (d // t) : (h + 1) * (d // t)] for i in range(t)])
        torch.testing.assert_close(mixed[0, h], expect)
    assert layer(x).shape == (1, t, d)


@pytest.mark.parametrize("low_rank", [None, 4])
def test_dcnv2_shapes_and_grads(low_rank: int | None) -> None:
    x = torch.randn(3, 4, 6, requires_grad=True)
    m = DCNv2(4, 6, layers=2, low_rank=low_rank, out_dim=5, deep_hidden=(16,))
    y = m(x)
    assert y.shape == (3, 5)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert DCNv2(4, 6, deep_hidden=(8,)).out_dim == 24


def test_make_interaction() -> None:
    x = torch.randn(2, 4, 8)
    for kind in ("rankmixer", "dcnv2"):
        assert make_interaction(kind, 4, 8, out_dim=3, layers=1)(x).shape == (2, 3)
    with pytest.raises(ValueError):
        make_interaction("fm", 4, 8, 3, 1)


# ---------------------------------------------------------------- SIT


@pytest.mark.parametrize("relevance", SIT_RELEVANCE)
def test_sit_shapes_and_padding(relevance) -> None:
    sit = _sit(relevance)
    tok, valid, _ = _history()
    y = sit(tok, valid)
    assert y.shape == (B, T, D) and torch.isfinite(y).all()
    assert (y[~valid] == 0).all()
    # Changing padded entries (even to NaN) changes nothing.
    tok2 = tok.clone()
    tok2[~valid] = float("nan")
    torch.testing.assert_close(sit(tok2, valid), y)


@pytest.mark.parametrize("relevance", SIT_RELEVANCE)
def test_sit_causal(relevance) -> None:
    sit = _sit(relevance)
    tok = torch.randn(2, T, D)
    valid = torch.ones(2, T, dtype=torch.bool)
    y = sit(tok, valid)
    j = 6
    tok2 = tok.clone()
    tok2[:, j] += torch.randn(D)  # not a constant: LayerNorm removes constant shifts
    y2 = sit(tok2, valid)
    torch.testing.assert_close(y2[:, :j], y[:, :j])
    assert (y2[:, j:] - y[:, j:]).abs().amax() > 1e-4


@pytest.mark.parametrize("relevance", SIT_RELEVANCE)
def test_sit_prefix(relevance) -> None:
    sit = _sit(relevance)
    tok, valid, _ = _history()
    pre = torch.randn(B, 5, D)
    pvalid = torch.ones(B, 5, dtype=torch.bool)
    pvalid[0, :2] = False
    y = sit(tok, valid, pre, pvalid)
    assert y.shape == (B, T, D)
    assert (y[~valid] == 0).all() and torch.isfinite(y).all()
    # The prefix is visible to every window position.
    pre2 = pre.clone()
    pre2[:, -1] += torch.randn(D)
    y2 = sit(tok, valid, pre2, pvalid)
    assert (y2[1, 0] - y[1, 0]).abs().amax() > 1e-4
    # Padded prefix entries are ignored.
    pre3 = pre.clone()
    pre3[~pvalid] = float("nan")
    torch.testing.assert_close(sit(tok, valid, pre3, pvalid), y)
    # A prefix behaves as the earlier part of one longer window.
    full = sit(torch.cat([pre, tok], 1), torch.cat([pvalid, valid], 1))
    torch.testing.assert_close(full[:, 5:], y)
    # prefix_valid=None means all prefix positions are valid.
    torch.testing.assert_close(sit(tok, valid, pre), sit(tok, valid, pre, torch.ones(B, 5, dtype=torch.bool)))


def test_sit_grads() -> None:
    torch.manual_seed(0)
    sit = SourceInstanceTransformer(dim=D, layers=1, heads=2, max_len=64)
    tok, valid, _ = _history()
    tok.requires_grad_(True)
    sit(tok, valid).sum().backward()
    assert torch.isfinite(tok.grad).all()
    assert tok.grad[valid].abs().sum() > 0 and (tok.grad[~valid] == 0).all()
    assert all(p.grad is not None for p in sit.parameters())
    # Dropout in training mode (attention and residual) keeps outputs finite.
    drop = SourceInstanceTransformer(dim=D, layers=1, heads=2, max_len=64, dropout=0.1).train()
    assert torch.isfinite(drop(tok, valid)).all()


def test_sit_relevance_attends_to_the_similar_past_and_learns_its_scale() -> None:
    """With content relevance, the earlier token equal to the last one steers the last output
    far more than an unrelated one does; the relevance scale gets a gradient."""
    sit = _sit(4.0)
    g = torch.Generator().manual_seed(3)
    tok = torch.randn(1, T, D, generator=g)
    tok[0, 2] = tok[0, -1]  # position 2 repeats the last instance
    valid = torch.ones(1, T, dtype=torch.bool)
    y = sit(tok, valid)[0, -1]

    def moved(j: int) -> float:  # how much the last output moves when position j changes
        t2 = tok.clone()
        t2[0, j] = torch.randn(D, generator=torch.Generator().manual_seed(9))
        return (sit(t2, valid)[0, -1] - y).norm().item()

    assert moved(2) > 2 * moved(4), (moved(2), moved(4))
    sit.train()
    sit(tok, valid).pow(2).sum().backward()
    assert sit.relevance.grad is not None and sit.relevance.grad.abs() > 0


def test_sit_side_info_reaches_the_output() -> None:
    sit = _sit()
    tok, valid, _ = _history()
    side = torch.zeros(B, T, D)
    torch.testing.assert_close(sit(tok, valid, side=side), sit(tok, valid))
    side[1, 0] = torch.randn(D)
    y, y2 = sit(tok, valid), sit(tok, valid, side=side)
    assert (y2[1] - y[1]).abs().amax() > 1e-4 and torch.equal(y2[0], y[0])


# ---------------------------------------------------------------- instance reconstruction


def _recon_batch(n: int = 12, f: int = 2, e: int = 4):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5, (n, f), generator=g)  # few values: duplicates in the batch
    table = torch.randn(5, f, e, generator=g)
    targets = table[ids, torch.arange(f)].reshape(n, f * e)
    weights = torch.ones(n)
    weights[-2:] = 0  # padding rows
    return targets, weights


def test_reconstruction_counts_equal_values_as_positives_and_ignores_padding() -> None:
    targets, weights = _recon_batch()
    n, fe = targets.shape
    rec = InstanceReconstruction(fe, 2, 4, temp=0.05)
    with torch.no_grad():  # the read-out returns the token: a token equal to its targets is perfect
        rec.read.weight.copy_(torch.eye(fe))
        rec.read.bias.zero_()
    perfect = rec(targets, targets, weights)
    # every positive (the row's own value, wherever it occurs) gets the same logit
    assert perfect < 0.1 * rec(torch.randn(n, fe, generator=torch.Generator().manual_seed(1)), targets, weights)
    junk = targets.clone()
    junk[-2:] = torch.randn(2, fe)  # padding rows: neither anchors nor candidates
    torch.testing.assert_close(rec(junk, junk, weights), perfect)


def test_reconstruction_trains_the_token_to_recover_its_features() -> None:
    torch.manual_seed(0)
    targets, weights = _recon_batch(n=32)
    rec = InstanceReconstruction(8, 2, 4)
    token = torch.randn(32, 8, requires_grad=True)
    opt = torch.optim.Adam([token, *rec.parameters()], lr=0.05)
    start = rec(token, targets, weights).item()
    for _ in range(200):
        opt.zero_grad()
        loss = rec(token, targets, weights)
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * start, (start, loss.item())


# ---------------------------------------------------------------- readers


@pytest.mark.parametrize("kind", READERS)
def test_reader_shape_padding_empty(kind: str) -> None:
    r = _reader(kind)
    seq, valid, q = _history()
    y = r(seq, valid, q)
    assert y.shape == (B, 8) and torch.isfinite(y).all()
    seq2 = seq.clone()
    seq2[~valid] = float("nan")
    torch.testing.assert_close(r(seq2, valid, q), y)
    # An empty history still depends on the query (it is not a constant garbage row).
    assert (r(seq, valid, q + 1.0)[2] - y[2]).abs().amax() > 0 or kind == "din"


@pytest.mark.parametrize("kind", ["transformer", "din"])
def test_reader_padding_placement(kind: str) -> None:
    # Positions count valid entries only: left- or right-padding the same history agrees.
    r = _reader(kind)
    hist = torch.randn(1, 6, D)
    q = torch.randn(1, D)
    pad = torch.zeros(1, 4, D)
    left, right = torch.cat([pad, hist], 1), torch.cat([hist, pad], 1)
    vl = torch.tensor([[False] * 4 + [True] * 6])
    vr = torch.tensor([[True] * 6 + [False] * 4])
    torch.testing.assert_close(r(left, vl, q), r(right, vr, q))


@pytest.mark.parametrize("kind", READERS)
def test_reader_grads(kind: str) -> None:
    r = _reader(kind).train()
    seq, valid, q = _history()
    seq.requires_grad_(True)
    q.requires_grad_(True)
    r(seq, valid, q).square().sum().backward()
    assert torch.isfinite(seq.grad).all() and torch.isfinite(q.grad).all()
    assert seq.grad[valid].abs().sum() > 0 and (seq.grad[~valid] == 0).all()
    assert q.grad.abs().sum() > 0
    for name, p in r.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_din_unnormalised_and_zero_length() -> None:
    torch.manual_seed(0)
    r = DINReader(D, 4, hidden=(8,), normalize="none")
    seq, valid, q = _history()
    assert torch.isfinite(r(seq, valid, q)).all()
    for kind in READERS:  # T = 0 works too
        assert torch.isfinite(_reader(kind)(torch.zeros(2, 0, D), torch.zeros(2, 0, dtype=torch.bool), q[:2])).all()


def test_longer_uneven_length() -> None:
    r = LongerReader(D, 4, heads=2, num_global=3, merge=3)
    seq = torch.randn(2, 7, D)  # 7 is left-padded to 9
    assert r(seq, torch.ones(2, 7, dtype=torch.bool), torch.randn(2, D)).shape == (2, 4)


@pytest.mark.parametrize("kind", READERS)
def test_reader_flops_match_counter(kind: str) -> None:
    r = _reader(kind, out_dim=5)
    seq, valid, q = _history()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:  # math SDPA is counted
        r(seq, valid, q)
    assert fc.get_total_flops() == r.flops(B, T)
    assert reader_flops(kind, B, T, D, 5, **READER_KW[kind]) == r.flops(B, T)


def test_packed_transformer_flops_match_counter() -> None:
    """Packed, the position-wise layers count the valid tokens only; attention stays padded."""
    from modules.attention import Packing

    r = _reader("transformer", out_dim=5)
    seq, valid, q = _history()
    packing = Packing(valid.flatten().nonzero().squeeze(1), B, T)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        out = r(packing.pack(seq), valid, q, packing=packing)
    steps = int(valid.sum())
    assert steps < B * T and fc.get_total_flops() == r.flops(B, T, steps) < r.flops(B, T)
    assert reader_flops("transformer", B, T, D, 5, steps, **READER_KW["transformer"]) == r.flops(B, T, steps)
    torch.testing.assert_close(out, r(seq, valid, q))


def test_make_reader_rejects_unknown() -> None:
    with pytest.raises(ValueError):
        make_reader("gru", D, 4)
    assert isinstance(make_reader("transformer", D, 4, heads=2), TransformerReader)


# ---------------------------------------------------------------- bf16, determinism


def _all_modules() -> list[tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]:
    torch.manual_seed(0)
    seq, valid, q = _history()
    x = torch.randn(B, 4, D)
    mods: list[tuple[torch.nn.Module, tuple[torch.Tensor, ...]]] = [
        (_sit(), (seq, valid)),
        (_sit(), (seq, valid, torch.randn(B, 3, D), torch.ones(B, 3, dtype=torch.bool))),
        (RankMixer(4, D, layers=1, out_dim=4), (x,)),
        (DCNv2(4, D, layers=1, low_rank=4, out_dim=4, deep_hidden=(8,)), (x,)),
        (QueryCompressor(D, D, hidden=(8,)), (q,)),
    ]
    mods += [(_reader(k), (seq, valid, q)) for k in READERS]
    return mods


def test_bf16_autocast_cpu() -> None:
    for m, args in _all_modules():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(*args)
        assert torch.isfinite(y.float()).all(), type(m).__name__
        y.float().sum().backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters()), type(m).__name__


def test_determinism() -> None:
    first = [m(*a) for m, a in _all_modules()]
    second = [m(*a) for m, a in _all_modules()]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_fused_attention() -> None:
    # Fused kernels only (no math fallback): the masks must be ones flash/efficient accept.
    for m, args in _all_modules():
        name = type(m).__name__
        ref = m(*args)
        m = m.cuda()
        cargs = tuple(a.cuda() for a in args)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = m(*cargs)
            y.float().square().sum().backward()
        assert torch.isfinite(y.float()).all(), name
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters()), name
        torch.testing.assert_close(y.float().cpu(), ref, atol=0.15, rtol=0.1, msg=name)
    seq, valid, q = (a.cuda() for a in _history())
    nan_seq = seq.masked_fill(~valid[..., None], float("nan"))
    for kind in READERS:
        r = _reader(kind).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            torch.testing.assert_close(r(nan_seq, valid, q), r(seq, valid, q))
    sit = _sit().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(sit(nan_seq, valid), sit(seq, valid))


def test_small_table_lookup_matches_nn_embedding_forward_and_backward() -> None:
    torch.manual_seed(0)
    table = nn.Embedding(9, 5)
    pos = torch.randint(0, 9, (4, 7))
    grad = torch.randn(4, 7, 5)
    expected = table(pos)
    (w_expected,) = torch.autograd.grad(expected, table.weight, grad)
    got = small_table_lookup(table, pos)
    (w_got,) = torch.autograd.grad(got, table.weight, grad)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(w_got, w_expected)
