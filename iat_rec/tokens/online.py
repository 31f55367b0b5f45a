"""The stage-1 instance token for online inference: a standalone module from a stage-1 run.

    iat-rec tokens compressor --stage1 RUN --out DIR [--checkpoint NAME] [--format auto|export|torchscript]

A serving process encodes a new instance when it is logged, with the weights that made the
token table (``iat-rec export --tokens-from final`` from the same checkpoint gives the same
rows). The module holds the trained embedding tables as plain ``torch.nn.EmbeddingBag``s (the
EmbeddingBagCollection's pooling; the sequence features' unpooled tables summed, as stage 1
pools them) and the Compressor's own feature groups, interaction block and bottleneck
(``Compressor.token``): no TorchRec, sharding or FBGEMM at inference. In the user-order scheme
it gives the token before the SIT, the one the table stores.

The input contract (also in DIR/compressor.json)::

    tokens = module(dense, ids, lengths)
    dense    float32 [B, D]   the dense features in the schema's order, normalised as in the
                              instance log (compressor.json "dense_stats")
    ids      list of F int64 1-D tensors, one per sparse feature in the schema's order: the
                              encoded ids (vocabulary index or hash bucket, as the instance log
                              stores them, in [0, num_embeddings)) of the B rows, back to back
    lengths  list of F int64 [B]: how many ids each row has (1 for a single-valued feature,
                              0..n for a multi-valued one; sum(lengths[k]) == len(ids[k]))
    tokens   float32 [B, iat_dim]

DIR holds ``compressor.pt2`` (``torch.export.save``; load with ``torch.export.load(p).module()``)
or, where torch.export fails on some op (``--format auto`` falls back, ``torchscript`` asks
for it), ``compressor.ts`` (``torch.jit.trace``; ``torch.jit.load(p)``), and
``compressor.json``: the contract, the schema, the source run and checkpoint, the instance
log's fingerprint, the versions, the artifact's checksum. ``OnlineTokens(DIR)`` loads either
and checks each request against the contract. Before DIR is renamed into place the saved
artifact is loaded back and must give the eager module's tokens on log rows (batches of 1 and
many), so a program specialised on the example's shapes is refused, not written.

Only torch and numpy are needed to load and run the artifact; building it imports the stage-1
code (``pipelines.compress``), here lazily.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from iat_rec.dist import checkpoint as ckpt
from iat_rec.dist import checksums
from iat_rec.dist.atomic import atomic_dir, check_out, read_manifest, write_json
from iat_rec.errors import IatError

if TYPE_CHECKING:
    from iat_rec.data.instance_log import InstanceLog
    from modules.compressor import Compressor

FORMAT = "iat-online-compressor"
VERSION = 1
META = "compressor.json"
ARTIFACTS = {"torch.export": "compressor.pt2", "torchscript": "compressor.ts"}
FORMATS = ("auto", "export", "torchscript")
SIGNATURE = "tokens = module(dense, ids, lengths)"
_CHECK_ROWS = 64  # log rows the saved artifact is checked on, besides a batch of one


class _Tables(nn.Module):
    """Plain tables under the attribute a TorchRec collection keeps them in (``embedding_bags``
    or ``embeddings``), so their weights have the checkpoint's names and load from it directly."""

    def __init__(self, attr: str, tables: dict[str, nn.EmbeddingBag]):
        super().__init__()
        setattr(self, attr, nn.ModuleDict(tables))


class OnlineCompressor(nn.Module):
    """``compressor``'s instance token from plain tensors (the module docstring's contract).

    The compressor (tables on the meta device, as ``build_compressor`` makes it) is taken
    over: its TorchRec collections are replaced by ``_Tables`` of ``nn.EmbeddingBag`` (same
    shapes, same parameter names, weights to be loaded from a checkpoint) and every submodule
    the token does not read (decompress MLP, heads, SIT, reconstruction) is dropped.
    ``features``: the sparse features in input order (a permutation of the model's).
    """

    def __init__(self, compressor: Compressor, features: list[str]):
        super().__init__()
        from torchrec.modules.embedding_configs import DataType, PoolingType

        modes = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}
        base = compressor.base
        lookups: dict[
            str, tuple[str, str, str, str]
        ] = {}  # feature -> (collection attribute, its table dict, table, mode)
        replaced: dict[str, _Tables] = {}
        for attr, inner, configs in (
            ("sparse", "embedding_bags", base.sparse.embedding_bag_configs() if base.sparse is not None else []),
            ("shared", "embeddings", base.shared.embedding_configs() if base.shared is not None else []),
        ):
            tables = {}
            for t in configs:
                # the EBC pools as its config says; the sequence features' tables are unpooled
                # and stage 1 sums each row's lookups (modules.compressor.pool_jagged)
                pooling = getattr(t, "pooling", PoolingType.SUM) if attr == "sparse" else PoolingType.SUM
                if pooling not in modes:
                    raise IatError(f"table {t.name}: pooling {pooling} has no nn.EmbeddingBag mode")
                if t.data_type != DataType.FP32:
                    raise IatError(f"table {t.name}: {t.data_type} weights; the online module serves fp32 tables only")
                # on meta, then storage without the random init: every weight comes from the checkpoint
                # (a DCP load refuses a checkpoint that lacks one)
                tables[t.name] = nn.EmbeddingBag(t.num_embeddings, t.embedding_dim, mode=modes[pooling], device="meta")
                for f in t.feature_names:
                    lookups[f] = (attr, inner, t.name, modes[pooling])
            if tables:
                replaced[attr] = _Tables(inner, tables).to_empty(device="cpu")
        model_order = list(base.bag_names) + list(base.shared_names)
        if sorted(features) != sorted(model_order) or len(set(features)) != len(features):
            raise IatError(f"sparse features {features} are not the model's {model_order}")
        for attr in ("sparse", "shared"):
            setattr(base, attr, replaced.get(attr))
        for name, _ in list(compressor.named_children()):
            if name not in ("base", "bottleneck"):  # Compressor.token reads these two only
                setattr(compressor, name, None)
        for name, _ in list(compressor.named_buffers(recurse=False)):
            delattr(compressor, name)
        self.compressor = compressor
        self.features = list(features)
        self.modes = [lookups[f][3] for f in features]
        self._lookups = [lookups[f][:3] for f in features]
        self._order = [features.index(f) for f in model_order]  # pooled inputs -> the model's concat order
        self.dense_dim = base.grouping.dense.in_dim if base.grouping.dense is not None else 0
        self.iat_dim = compressor.bottleneck.proj.out_features

    def table(self, k: int) -> nn.EmbeddingBag:
        """The table feature ``k`` (input order) is looked up in."""
        attr, inner, name = self._lookups[k]
        return getattr(getattr(self.compressor.base, attr), inner)[name]

    def forward(self, dense: torch.Tensor, ids: list[torch.Tensor], lengths: list[torch.Tensor]) -> torch.Tensor:
        pooled = []
        for k in range(len(self.features)):
            # each row's first id; B offsets, not B + 1 with include_last_offset: torch.export
            # specialises a batch size derived as offsets.shape[0] - 1 to >= 2
            starts = torch.cumsum(lengths[k], 0) - lengths[k]
            pooled.append(self.table(k)(ids[k], starts))
        return self.compressor.token(torch.cat([pooled[i] for i in self._order], dim=1), dense)


def resolve_checkpoint(run: str | Path, name: str | None = None) -> Path:
    """The checkpoint ``name`` of a run: None or "latest" (the run's latest checkpoint), else a
    directory name under RUN/checkpoints, RUN/snapshots or RUN itself ("step_00000012",
    "snapshots/step_00000000", "best"), searched in that order."""
    run = Path(run)
    if name in (None, "", "latest"):
        path = ckpt.latest(run)
        if path is None:
            raise IatError(f"{run}: no checkpoint (has stage 1 finished?)")
        return path
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise IatError(
            f"--checkpoint {name}: a name inside the run (step_00000012, snapshots/step_00000000, best), not a path"
        )
    for root in (run / "checkpoints", run / "snapshots", run):
        if (root / rel / ".metadata").is_file():
            return root / rel
    have = sorted(str(p.parent.relative_to(run)) for p in run.glob("*/.metadata"))
    have += sorted(
        str(p.parent.relative_to(run)) for d in ("checkpoints", "snapshots") for p in run.glob(f"{d}/step_*/.metadata")
    )
    raise IatError(
        f"--checkpoint {name}: no complete checkpoint of that name in {run} (there are: {', '.join(have) or 'none'})"
    )


def build_online(run: str | Path, checkpoint: str | None = None) -> tuple[OnlineCompressor, dict, InstanceLog]:
    """(the module with the checkpoint's weights, in eval mode; its metadata; the run's log)."""
    from iat_rec.train.run_dir import RUN_INFO
    from iat_rec.train.stage1 import build_compressor, load_stage1  # the stage-1 code: only to build

    cfg, info, log = load_stage1(run)
    path = resolve_checkpoint(run, checkpoint)
    schema = log.schema
    online = OnlineCompressor(build_compressor(log, cfg), schema.sparse_names)
    ckpt.load_weights(path, online.compressor)  # as export loads it: DCP, any world size, checked
    online.eval().requires_grad_(False)
    run_json = (Path(run) / RUN_INFO).read_bytes()
    from iat_rec.dist.env import versions

    pooling = dict(zip(online.features, online.modes))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "signature": SIGNATURE,
        "dense": {
            "dtype": "float32",
            "shape": ["B", online.dense_dim],
            "features": [f.name for f in schema.dense],
            "dense_stats": log.manifest.get("dense_stats", []),
        },
        "sparse": [
            {
                "name": f.name,
                "num_embeddings": f.num_embeddings,
                "multi": f.multi,
                "pooling": pooling[f.name],
                "ids": {"dtype": "int64", "shape": [f"n_{f.name}"]},
                "lengths": {"dtype": "int64", "shape": ["B"]},
            }
            for f in schema.sparse
        ],
        "output": {"dtype": "float32", "shape": ["B", online.iat_dim]},
        "iat_dim": online.iat_dim,
        "scheme": cfg.scheme,
        "token": "before the SIT (the stored token)" if cfg.scheme == "user" else "the compressor's token",
        "schema": schema.to_dict(),
        "source_run": str(Path(run).resolve()),
        "source_checkpoint": str(path.relative_to(Path(run))),
        "run_fingerprint": hashlib.blake2b(
            run_json + str(path.relative_to(Path(run))).encode(), digest_size=16
        ).hexdigest(),
        "log_fingerprint": log.fingerprint,
        "log_path": str(log.path.resolve()),
        "versions": versions(),
    }
    return online, meta, log


def log_inputs(
    log: InstanceLog, rows: np.ndarray, features: list[str]
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(dense, ids, lengths) of instance-log rows, in the contract's layout (for checks and
    offline use: it reads the log through ``iat_rec.batching.batch``, which imports TorchRec)."""
    from iat_rec.batching.batch import gather_jagged

    rows = np.asarray(rows, dtype=np.int64)
    ids, lengths = [], []
    for name in features:
        col = log.sparse[name]
        if isinstance(col, tuple):
            ln, vals = gather_jagged(col[0], col[1], rows)
        else:
            ln, vals = np.ones(len(rows), dtype=np.int64), np.asarray(col[rows], dtype=np.int64)
        ids.append(torch.from_numpy(np.ascontiguousarray(vals, dtype=np.int64)))
        lengths.append(torch.from_numpy(ln.astype(np.int64)))
    return torch.from_numpy(np.asarray(log.dense[rows], dtype=np.float32)), ids, lengths


def example_inputs(online: OnlineCompressor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Inputs to trace with: 3 rows; feature k has 4 + k ids (one row empty), so no two sizes
    are equal and none is 0 or 1 (torch.export would tie or specialise them)."""
    b = 3
    ids = [torch.zeros(4 + k, dtype=torch.int64) for k in range(len(online.features))]
    lengths = [torch.tensor([len(v) - 2, 2, 0], dtype=torch.int64) for v in ids]
    return torch.zeros(b, online.dense_dim), ids, lengths


def _save_export(online: OnlineCompressor, example, path: Path) -> None:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=2**31 - 1)
    shapes = {
        "dense": {0: batch},
        "ids": [{0: Dim(f"ids_{k}", min=0, max=2**62)} for k in range(len(online.features))],
        "lengths": [{0: batch} for _ in online.features],
    }
    program = torch.export.export(online, example, dynamic_shapes=shapes, strict=False)
    torch.export.save(program, str(path))


def _save_torchscript(online: OnlineCompressor, example, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=DeprecationWarning)
        traced = torch.jit.trace(online, example, check_trace=False)  # checked on log rows after saving
        torch.jit.save(traced, str(path))


def _load(path: Path, serialization: str):
    if serialization == "torch.export":
        return torch.export.load(str(path)).module()
    with warnings.catch_warnings():  # the documented alternative where torch.export fails: no warning each load
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _check_saved(path: Path, serialization: str, online: OnlineCompressor, samples) -> None:
    """The saved artifact, loaded back, gives the eager module's tokens on every sample."""
    module = _load(path, serialization)
    with torch.no_grad():
        for sample in samples:
            torch.testing.assert_close(module(*sample), online(*sample), rtol=1e-5, atol=1e-6)


def write_online(
    run: str | Path,
    out: str | Path,
    checkpoint: str | None = None,
    fmt: str = "auto",
    overwrite: bool = False,
    verbose: bool = True,
) -> Path:
    """Builds the online compressor of ``run`` and writes it to ``out`` atomically; returns ``out``."""
    from iat_rec.train.stage1 import load_stage1

    if fmt not in FORMATS:
        raise IatError(f"--format must be one of {list(FORMATS)}, not '{fmt}'")
    _, _, log = load_stage1(run)  # a clear error for a missing or foreign run before anything is built
    log.check_files()
    check_out(out, "an online compressor", {FORMAT}, META, overwrite, (run, log.path))
    online, meta, log = build_online(run, checkpoint)
    n = min(log.rows, _CHECK_ROWS)
    checks = [
        log_inputs(log, np.array([log.rows - 1]), online.features),
        log_inputs(log, np.linspace(0, log.rows - 1, n).astype(np.int64), online.features),
    ]
    example = example_inputs(online)
    order = {"auto": ["torch.export", "torchscript"], "export": ["torch.export"], "torchscript": ["torchscript"]}[fmt]
    with atomic_dir(out) as tmp:
        failed: dict[str, str] = {}
        for serialization in order:
            path = tmp / ARTIFACTS[serialization]
            try:
                (_save_export if serialization == "torch.export" else _save_torchscript)(online, example, path)
                _check_saved(path, serialization, online, checks)
            except Exception as e:  # noqa: BLE001 - any failure of one serialisation: the next, or a clear error
                failed[serialization] = ckpt._last_line(e)
                path.unlink(missing_ok=True)
                if verbose and serialization != order[-1]:
                    print(
                        f"{serialization} failed ({failed[serialization]}): "
                        f"writing {order[order.index(serialization) + 1]} instead",
                        file=sys.stderr,
                        flush=True,
                    )
                continue
            break
        else:
            raise IatError(
                f"could not serialise the online compressor of {run}: "
                + "; ".join(f"{k}: {v}" for k, v in failed.items())
            )
        meta.update(
            serialization=serialization,
            artifact=path.name,
            fallback_reason=failed or None,
            files=checksums.digests(tmp, [path.name]),
        )
        write_json(tmp / META, meta)
    if verbose:
        print(
            f"online compressor {out}: {len(online.features)} sparse + {online.dense_dim} dense features -> token "
            f"[B, {online.iat_dim}] ({serialization}, {meta['source_checkpoint']} of {run})",
            flush=True,
        )
    return Path(out)


class OnlineTokens:
    """A written online compressor, loaded for serving; each call is checked against the
    contract (dtypes, shapes, id ranges, lengths that add up) before it runs.

        encoder = OnlineTokens("runs/online")
        tokens = encoder(dense, ids, lengths)   # float32 [B, iat_dim]
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = read_manifest(
            self.path,
            META,
            "an online compressor",
            FORMAT,
            VERSION,
            "write it again with this version (iat-rec tokens compressor)",
        )
        artifact = self.path / self.meta["artifact"]
        checksums.check(artifact, self.meta)
        self.features = [f["name"] for f in self.meta["sparse"]]
        self.num_embeddings = [int(f["num_embeddings"]) for f in self.meta["sparse"]]
        self.dense_dim = int(self.meta["dense"]["shape"][1])
        self.iat_dim = int(self.meta["iat_dim"])
        try:
            self.module = _load(artifact, self.meta["serialization"])
        except Exception as e:  # noqa: BLE001 - a damaged or foreign artifact: one line
            raise IatError(f"{artifact}: cannot load: {ckpt._last_line(e)}") from None

    def check(self, dense: torch.Tensor, ids: list[torch.Tensor], lengths: list[torch.Tensor]) -> None:
        """Refuses a request that breaks the contract, with the feature's name."""
        if (
            not isinstance(dense, torch.Tensor)
            or dense.dtype != torch.float32
            or dense.dim() != 2
            or dense.shape[1] != self.dense_dim
        ):
            raise IatError(
                f"dense must be float32 [B, {self.dense_dim}] ({', '.join(self.meta['dense']['features'])}), "
                f"not {getattr(dense, 'dtype', type(dense).__name__)} {list(getattr(dense, 'shape', []))}"
            )
        b = dense.shape[0]
        if b < 1:
            raise IatError("a request needs at least one row")
        if len(ids) != len(self.features) or len(lengths) != len(self.features):
            raise IatError(
                f"ids and lengths need one tensor per sparse feature, in order {self.features} "
                f"(got {len(ids)} ids and {len(lengths)} lengths)"
            )
        for name, n, v, ln in zip(self.features, self.num_embeddings, ids, lengths):
            if ln.dtype != torch.int64 or ln.shape != (b,):
                raise IatError(f"lengths of {name} must be int64 [{b}], not {ln.dtype} {list(ln.shape)}")
            if v.dtype != torch.int64 or v.dim() != 1:
                raise IatError(f"ids of {name} must be an int64 vector, not {v.dtype} {list(v.shape)}")
            if bool((ln < 0).any()) or int(ln.sum()) != v.numel():
                raise IatError(
                    f"lengths of {name} must be >= 0 and add up to its {v.numel()} ids (they add up to {int(ln.sum())})"
                )
            if v.numel() and (int(v.min()) < 0 or int(v.max()) >= n):
                raise IatError(f"ids of {name} must lie in [0, {n}) (got {int(v.min())}..{int(v.max())})")

    def __call__(self, dense: torch.Tensor, ids: list[torch.Tensor], lengths: list[torch.Tensor]) -> torch.Tensor:
        self.check(dense, ids, lengths)
        with torch.no_grad():
            return self.module(dense, list(ids), list(lengths))
