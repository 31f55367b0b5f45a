"""Stage 2's fast paths against the reference path: range reads, bf16 branches, compiled branches.

Stage 2 fetches a request's history either through the sharded ``EmbeddingCollection``
(``token_fetch="lookup"``: an id per step) or as one contiguous row range of a replicated
table (``"ranges"``: first row and length). Both must give the same tokens, the same
candidate token, and so the same logits, for every request of a log, padding rows included.
The bf16 history branches stay close to fp32, and a compiled branch computes what the eager
one does under the same parameter names (checkpoints load either way).
"""

import dataclasses

import numpy as np
import pytest
import torch

from iat_rec.batching.stage2_data import HistorySource, Stage2BatchMaker
from iat_rec.data.instance_log import InstanceLog
from iat_rec.tables import TOKEN_TABLE
from iat_rec.train.config import ModelConfig
from modules.range_gather import RangeTokenTable, even_bounds, range_gather, reference, split_at_bounds
from modules.ranker import RankerConfig, bucket_prefix, build_ranker
from tests.helpers import on_ranks

T = 16
DIM = 8


def ranker(log: InstanceLog, fetch: str, query: str, dtype: str, **options):
    torch.manual_seed(0)
    model = build_ranker(
        log.schema,
        ModelConfig(emb_dim=8, hidden=32, num_groups=4, group_dim=16, decompress=(16,)),
        RankerConfig(
            **{"history": "iat", "query": query, "max_len": T, "reader_layers": 1, "head": (16,), "token_fetch": fetch}
            | options
        ),
        len(log.schema.labels),
        token_rows=log.rows,
        token_dim=DIM,
        token_dtype=dtype,
        token_stats=(torch.linspace(-0.5, 0.5, DIM), torch.linspace(0.5, 2.0, DIM)),
    )
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
        if hasattr(model, "token_mean"):  # a branch that reads tokens
            model.token_mean.copy_(torch.linspace(-0.5, 0.5, DIM))
            model.token_std.copy_(torch.linspace(0.5, 2.0, DIM))
    return model.eval()


@pytest.mark.parametrize("query", ["features", "token"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_ranges_give_the_lookups_tokens_and_logits(tiny_log, query, dtype):
    log = InstanceLog(tiny_log)
    lookup, ranges = ranker(log, "lookup", query, dtype), ranker(log, "ranges", query, dtype)
    weight = lookup.tokens.embeddings[TOKEN_TABLE].weight
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape).to(weight.dtype))
    ranges.token_rows.load(weight)
    assert ranges.token_rows.rows.dtype == weight.dtype
    # the ranges model holds no TorchRec token table, and no token row in its state dict
    assert not any(k.startswith(("tokens.", "token_rows.")) for k in ranges.state_dict())
    assert not hasattr(ranges, "tokens")
    ranges.load_state_dict(lookup.state_dict(), strict=False)
    source = HistorySource.from_log(log, [])
    candidate = query == "token"
    rows = np.concatenate([np.arange(log.rows), [-1, -1]])  # every request, then two padding rows
    for chunk in np.array_split(rows, 8):
        with_ids = Stage2BatchMaker(source, T, same_log=True, candidate=candidate)(log, chunk)
        without = Stage2BatchMaker(source, T, same_log=True, candidate=candidate, token_ids=False)(log, chunk)
        assert without.history_ids is None and torch.equal(with_ids.hist_first, without.hist_first)
        with torch.no_grad():
            steps_a, cand_a = lookup._fetch(with_ids)
            steps_b, cand_b = ranges._fetch(without)
            # as fetched: TorchRec's lookup gives fp32, a range read the table's own dtype
            torch.testing.assert_close(steps_a.float(), steps_b.float(), rtol=0, atol=0)
            if candidate:
                torch.testing.assert_close(cand_a, cand_b, rtol=0, atol=0)
            else:
                assert cand_a is None and cand_b is None
            logits_a = lookup(with_ids)[1][1]
            logits_b = ranges(without)[1][1]
        torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=0)
    assert with_ids.hist_valid.any()  # the check saw real histories


def test_range_gather_reads_only_its_range():
    table = torch.arange(40, dtype=torch.float32).view(10, 4)
    first, length = torch.tensor([0, 3, 9, 5]), torch.tensor([2, 0, 1, 4])
    out = range_gather(table, first, length, 3 + 1)
    assert out.shape == (4, 4, 4)
    assert torch.equal(out[0, :2], table[0:2]) and not out[0, 2:].any()
    assert not out[1].any()
    assert torch.equal(out[2, 0], table[9]) and not out[2, 1:].any()
    assert torch.equal(out[3], table[5:9])
    with pytest.raises(ValueError):
        range_gather(table[0], first, length, 4)


def test_range_table_takes_candidates_and_rejects_a_wrong_width():
    t = RangeTokenTable(4, torch.float16)
    rows = torch.randn(6, 4)
    t.load(rows)
    assert t.rows.dtype == torch.float16 and "rows" not in t.state_dict()
    got = t.take(torch.tensor([5, -1, 0]))
    assert torch.equal(got[0], rows[5].half()) and not got[1].any() and torch.equal(got[2], rows[0].half())
    with pytest.raises(ValueError, match="expected"):
        t.load(torch.zeros(3, 5))


@pytest.mark.parametrize("bounds", [[0, 10], [0, 4, 10], [0, 3, 3, 7, 10], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
def test_ranges_split_at_shard_bounds_cover_each_range_once(bounds):
    """Every row of every request lands in exactly one piece, owned by the shard that holds it,
    at its place in the request (empty shards and zero lengths included)."""
    gen = torch.Generator().manual_seed(len(bounds))
    first = torch.randint(0, 10, (200,), generator=gen)
    length = torch.minimum(torch.randint(0, 6, (200,), generator=gen), 10 - first)
    b = torch.tensor(bounds)
    req, owner, start, n, offset = split_at_bounds(b, first, length)
    assert (n > 0).all() and torch.equal(owner, owner.sort().values)  # grouped by owner, for the all-to-all
    assert (start >= b[owner]).all() and (start + n <= b[owner + 1]).all()
    got = sorted((int(r), int(o) + t, int(s) + t) for r, o, s, k in zip(req, offset, start, n) for t in range(int(k)))
    want = sorted((r, t, int(first[r]) + t) for r in range(200) for t in range(int(length[r])))
    assert got == want


def exchanged_ranges(env, dtype: str, rows: int) -> dict:
    """On each rank (run by on_ranks): a table of ``rows`` rows cut by even_bounds, random
    requests of this rank read through exchange_ranges, beside the whole table's reference."""
    full = torch.randn(rows, 8, generator=torch.Generator().manual_seed(3)).to(getattr(torch, dtype))
    bounds = even_bounds(rows, env.world_size)
    table = RangeTokenTable(8, full.dtype, sharded=True)
    table.load(full[bounds[env.rank] : bounds[env.rank + 1]], bounds)
    gen = torch.Generator().manual_seed(10 + env.rank)
    batch = 64 + 7 * env.rank  # ranks ask for different numbers of requests
    first = torch.randint(0, rows, (batch,), generator=gen)
    length = torch.minimum(torch.randint(0, 12, (batch,), generator=gen), rows - first)
    own = torch.cat([torch.randint(0, rows, (batch - 5,), generator=gen), torch.full((5,), -1)])
    return {
        "steps": torch.equal(table(first, length, 12), reference(full, first, length, 12)),
        "take": torch.equal(table.take(own), reference(full, own.clamp(min=0), (own >= 0).long(), 1)[:, 0]),
        "crossing": int(((first < bounds[1]) & (first + length > bounds[1])).sum()),
    }


@pytest.mark.parametrize("dtype, rows", [("float32", 301), ("float16", 301), ("float32", 1)])
def test_sharded_ranges_on_two_ranks_equal_the_whole_table(dtype, rows):
    """Row shards with the range all-to-all return what the whole table would, row for row,
    ranges that cross the shard bound included (and a one-row table: rank 1's shard is empty)."""
    got = on_ranks(exchanged_ranges, dtype, rows)
    assert all(r["steps"] and r["take"] for r in got), got
    assert rows == 1 or sum(r["crossing"] for r in got) > 0, "no request crossed the bound: the test tests nothing"


def read_token_shard(env, tokens: str) -> bool:
    from iat_rec.tokens.table import TokenTable

    table = TokenTable(tokens)
    bounds = even_bounds(table.rows, env.world_size)
    return torch.equal(
        table.read_shard(bounds[env.rank], bounds[env.rank + 1]),
        table.read_rows(bounds[env.rank], bounds[env.rank + 1]),
    )


def test_each_rank_reads_its_row_shard_of_the_token_table(tokens):
    assert on_ranks(read_token_shard, tokens) == [True, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA")
def test_triton_kernel_matches_the_torch_path():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(5000, 64, generator=g).half().cuda()
    length = torch.randint(0, 257, (300,), generator=g)
    first = (torch.rand(300, generator=g) * (5000 - length)).long()
    first, length = first.cuda(), length.cuda()
    assert torch.equal(range_gather(table, first, length, 256 + 7), reference(table, first, length, 256 + 7))


def test_bf16_and_compiled_branches_match_the_eager_fp32_model(tiny_log):
    log = InstanceLog(tiny_log)
    source = HistorySource.from_log(log, [])
    batch = Stage2BatchMaker(source, T, same_log=True, candidate=True, token_ids=False)(log, np.arange(96))
    table = torch.randn(log.rows, DIM)
    models = {}
    for name, options in {"eager": {}, "bf16": {"bf16": True}, "compiled": {"compile": True}}.items():
        models[name] = ranker(log, "ranges", "token", "fp32", **options).train()
        models[name].token_rows.load(table)
    assert models["compiled"].state_dict().keys() == models["eager"].state_dict().keys()
    out = {}
    for name, model in models.items():
        loss, (_, logits, *_rest) = model(batch)
        loss.backward()
        out[name] = (logits, model.iat.proj.weight.grad.clone())
    logits, grad = out["eager"]
    torch.testing.assert_close(out["compiled"][0], logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["compiled"][1], grad, rtol=1e-3, atol=1e-5)
    assert out["bf16"][0].dtype == torch.float32 and not torch.equal(out["bf16"][0], logits)  # it did run in bf16
    torch.testing.assert_close(out["bf16"][0], logits, rtol=0, atol=0.05)


@pytest.mark.parametrize("step_in, groups", [(16, 2), (0, 0)])
def test_pre_projected_side_tables_compute_the_same_functions(step_in, groups):
    """RankerConfig.pre_project is a reparametrisation: the concat model's weights, with each
    side table multiplied by its block of the projection, give the same outputs (for a
    labels-only branch the projection's bias moves into the time-gap table)."""
    from iat_rec.batching.history import GAP_BUCKETS, LABEL_UNKNOWN
    from modules.ranker import HistoryBranch

    torch.manual_seed(0)
    d, tasks = 64, 2
    cfg = RankerConfig(max_len=12, reader_layers=1)
    concat = HistoryBranch(step_in, groups, tasks, cfg, 32, adapt=step_in > 0).eval()
    pre = HistoryBranch(step_in, groups, tasks, dataclasses.replace(cfg, pre_project=True), 32, adapt=step_in > 0)
    state = {k: v for k, v in concat.state_dict().items() if not k.startswith(("proj.", "label_emb", "gap_emb"))}
    w, b = concat.proj.weight.detach(), concat.proj.bias.detach()
    main = w.shape[1] - (tasks + 1) * d
    blocks = [w[:, main + i * d : main + (i + 1) * d] for i in range(tasks + 1)]
    for i in range(tasks):
        state[f"label_emb.{i}.weight"] = concat.label_emb[i].weight.detach() @ blocks[i].T
    state["gap_emb.weight"] = concat.gap_emb.weight.detach() @ blocks[tasks].T
    if main:
        state["proj.weight"], state["proj.bias"] = w[:, :main], b
    else:
        state["gap_emb.weight"] = state["gap_emb.weight"] + b
    pre.load_state_dict(state)
    pre.eval()
    batch, t = 5, 12
    steps = torch.randn(batch, t, step_in) if step_in else None
    candidate = torch.randn(batch, step_in) if groups else None
    labels = torch.randint(0, LABEL_UNKNOWN + 1, (batch, t, tasks))
    gap = torch.randint(0, GAP_BUCKETS, (batch, t))
    valid = torch.arange(t)[None, :] < torch.tensor([0, 3, 12, 7, 1])[:, None]
    query = torch.randn(batch, d)
    want = concat(steps, candidate, labels, gap, valid, query)
    got = pre(steps, candidate, labels, gap, valid, query)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in pre.parameters()) < sum(p.numel() for p in concat.parameters())


@pytest.mark.parametrize("prefix", [0, 1])
def test_length_buckets_sort_and_cut_the_batch(tiny_log, prefix):
    """The bucketed batch is the plain batch of the same requests, longest history first, and
    each bucket's width covers its rows' histories (padding rows last, at the smallest width);
    with the reader's prefix, prefix + width is a multiple of the bucket (or the width is T)."""
    log = InstanceLog(tiny_log)
    source = HistorySource.from_log(log, [])
    rows = np.concatenate([np.arange(0, log.rows, 3), [-1, -1]])
    bucketed = Stage2BatchMaker(source, T, same_log=True, length_bucket=4, bucket_prefix=prefix)(log, rows)
    lengths = bucketed.hist_valid.sum(1)
    assert torch.equal(lengths, lengths.sort(descending=True, stable=True).values)
    plain = Stage2BatchMaker(source, T, same_log=True)(log, bucketed.ids.numpy())
    assert plain.hist_buckets is None
    for f in ("dense", "labels", "weights", "ids", "users", "hist_first", "hist_labels", "hist_gap", "hist_valid"):
        assert torch.equal(getattr(bucketed, f), getattr(plain, f)), f
    assert torch.equal(bucketed.history_ids.values(), plain.history_ids.values())
    start, widths = 0, []
    for end, width in bucketed.hist_buckets:
        assert end > start and ((width + prefix) % 4 == 0 or width == T) and int(lengths[start:end].max()) <= width
        assert start == 0 or int(lengths[start - 1]) > width  # each bucket is as narrow as its rows allow
        start, widths = end, widths + [width]
    assert start == len(rows) and widths == sorted(set(widths), reverse=True) and len(widths) >= 3
    assert bucketed.ids[-2:].tolist() == [-1, -1]


@pytest.mark.parametrize(
    "reader, options",
    [
        ("transformer", {}),
        ("din", {}),
        ("longer", {}),
        ("transformer", {"bf16": True}),
        ("transformer", {"compile": True}),
        ("transformer", {"history": "both", "token_fetch": "lookup"}),  # the hand-crafted branch too
    ],
)
def test_length_buckets_compute_the_same_loss_and_gradients(tiny_log, reader, options):
    """Reading each bucket at its own width is the same function of the batch as reading every
    history at T: the same logits and gradients, for every reader (and bf16, compiled, and the
    hand-crafted branch beside IAT's)."""
    log = InstanceLog(tiny_log)
    fetch = options.get("token_fetch", "ranges")
    source = HistorySource.from_log(log, list(log.schema.sequence) if options.get("history") == "both" else [])
    maker = Stage2BatchMaker(
        source,
        T,
        same_log=True,
        candidate=True,
        token_ids=fetch == "lookup",
        length_bucket=4,
        bucket_prefix=bucket_prefix(RankerConfig(reader=reader)),
    )
    batch = maker(log, np.arange(120))
    assert len(batch.hist_buckets) >= 3
    table = torch.randn(log.rows, DIM)
    model = ranker(log, fetch, "token", "fp32", **{"reader": reader, "length_bucket": 4} | options).train()
    if fetch == "lookup":
        with torch.no_grad():
            model.tokens.embeddings[TOKEN_TABLE].weight.copy_(table)
    else:
        model.token_rows.load(table)
    out = []
    for buckets in (None, batch.hist_buckets):
        model.zero_grad()
        loss, (_, logits, *_rest) = model(dataclasses.replace(batch, hist_buckets=buckets))
        loss.backward()
        out.append((logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_grads), (got, got_grads) = out
    tol = {"rtol": 0, "atol": 0.02} if options.get("bf16") else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(got, want, **tol)
    assert got_grads.keys() == want_grads.keys() and any(n.startswith("iat.reader") for n in got_grads)
    assert options.get("history") != "both" or any(n.startswith("hand.reader") for n in got_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, **tol, msg=name)


def test_compiled_buckets_keep_rows_dynamic_and_widths_static(tiny_log, monkeypatch):
    """torch 2.11's inductor failed on a symbolic bucket width (benchmarks/NOTES.md 36): every
    graph of the bucketed reader has dynamic rows and a static width, one graph per width."""
    import modules.ranker as ranker_module

    graphs = []

    def record(gm, example_inputs):
        values = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
        graphs.append([v.shape for v in values if isinstance(v, torch.Tensor)])
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(
        ranker_module, "compiled_read", lambda: torch.compile(ranker_module.HistoryBranch._read, backend=record)
    )
    log = InstanceLog(tiny_log)
    maker = Stage2BatchMaker(
        HistorySource.from_log(log, []), T, same_log=True, token_ids=False, length_bucket=4, bucket_prefix=1
    )
    model = ranker(log, "ranges", "features", "fp32", length_bucket=4, compile=True).train()
    model.token_rows.load(torch.randn(log.rows, DIM))
    widths = set()
    for start in (0, 120, 240):
        batch = maker(log, np.arange(start, start + 120))
        widths |= {w for _, w in batch.hist_buckets}
        model(batch)[0].backward()
    torch._dynamo.reset()
    assert len(graphs) == len(widths) > 2
    for shapes in graphs:
        batch_shapes = [s for s in shapes if isinstance(s[0], torch.SymInt)]
        assert batch_shapes, "rows are dynamic"
        assert all(isinstance(n, int) for s in shapes for n in s[1:]), shapes


def test_packing_moves_rows_both_ways_and_is_its_own_adjoint():
    """pack takes the valid rows of [B, L, c], pad puts them back with zeros elsewhere, and the
    gradient of each is the other (as plain indexing's would be), including an empty packing."""
    from modules.attention import Packing

    valid = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    index = valid.flatten().nonzero().squeeze(1)
    packing = Packing(index, 3, 4)
    x = torch.randn(3, 4, 2, requires_grad=True)
    packed = packing.pack(x)
    torch.testing.assert_close(packed, x[valid])
    padded = packing.pad(packed)
    torch.testing.assert_close(padded, x * valid[..., None])
    weight = torch.randn(3, 4, 2)
    (padded * weight).sum().backward()
    torch.testing.assert_close(x.grad, weight * valid[..., None])
    rows = torch.randn(len(index), requires_grad=True)
    packing.pad(rows).sum().backward()
    torch.testing.assert_close(rows.grad, torch.ones(len(index)))
    empty = Packing(index[:0], 3, 4)
    assert empty.pack(x).shape == (0, 2) and torch.equal(empty.pad(x[valid][:0]), torch.zeros(3, 4, 2))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"bf16": True},
        {"compile": True},
        {"pre_project": True},
        {"history": "both", "token_fetch": "lookup"},  # the hand-crafted branch too
        {"history": "labels", "query": "features"},  # no steps: side info only
    ],
)
def test_packed_history_computes_the_same_loss_and_gradients(tiny_log, options):
    """Running the transformer's position-wise layers on the valid steps only is the same
    function of the batch as running them on every padded step: the same logits and
    gradients, with empty histories and padding rows in the batch."""
    log = InstanceLog(tiny_log)
    history = options.get("history", "iat")
    fetch = options.get("token_fetch", "ranges")
    source = HistorySource.from_log(log, list(log.schema.sequence) if history == "both" else [])
    maker = Stage2BatchMaker(source, T, same_log=True, candidate=True, token_ids=fetch == "lookup")
    batch = maker(log, np.concatenate([np.arange(120), [-1, -1]]))
    lengths = batch.hist_valid.sum(1)
    assert batch.hist_steps == int(lengths.sum()) and (lengths == 0).sum() >= 3 and (lengths == T).any()
    table = torch.randn(log.rows, DIM)
    out = []
    for pack in (False, True):
        rest = {k: v for k, v in options.items() if k != "query"}
        model = ranker(log, fetch, options.get("query", "token"), "fp32", pack_history=pack, **rest).train()
        if fetch == "lookup":
            with torch.no_grad():
                model.tokens.embeddings[TOKEN_TABLE].weight.copy_(table)
        elif history != "labels":  # which reads no tokens
            model.token_rows.load(table)
        loss, (_, logits, *_rest) = model(batch)
        loss.backward()
        out.append((logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_grads), (got, got_grads) = out
    tol = {"rtol": 0, "atol": 0.02} if options.get("bf16") else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(got, want, **tol)
    branch = {"iat": "iat", "both": "hand", "labels": "labels"}[history]
    assert got_grads.keys() == want_grads.keys() and any(n.startswith(f"{branch}.reader.pos") for n in got_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, **tol, msg=name)


def test_compiled_packed_history_is_one_graph_for_every_batch(tiny_log, monkeypatch):
    """The packed rows change from batch to batch; the compiled read keeps them dynamic: one
    training graph for batches of different step counts, no recompile per batch."""
    import modules.ranker as ranker_module

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(
        ranker_module, "compiled_read", lambda: torch.compile(ranker_module.HistoryBranch._read, backend=record)
    )
    log = InstanceLog(tiny_log)
    maker = Stage2BatchMaker(HistorySource.from_log(log, []), T, same_log=True, token_ids=False)
    model = ranker(log, "ranges", "features", "fp32", pack_history=True, compile=True).train()
    model.token_rows.load(torch.randn(log.rows, DIM))
    totals = set()
    for start in (0, 120, 240, 360):
        batch = maker(log, np.arange(start, start + 120))
        totals.add(batch.hist_steps)
        model(batch)[0].backward()
    torch._dynamo.reset()
    assert len(totals) == 4 and len(graphs) == 1


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"reader": "din"}, "transformer reader's"),
        ({"length_bucket": 4}, "cut nothing more"),
    ],
)
def test_packed_history_refuses_what_it_cannot_read(tiny_log, options, problem):
    with pytest.raises(ValueError, match=problem):
        ranker(InstanceLog(tiny_log), "ranges", "features", "fp32", pack_history=True, **options)
