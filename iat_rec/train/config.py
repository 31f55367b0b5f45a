"""Run configuration: one dataclass per program, from YAML (safe_load) and command-line flags.

Unknown keys are an error, never silently ignored. Every field is also a flag
(``batch_size`` -> ``--batch-size``); flags override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from iat_rec.errors import IatError


@dataclasses.dataclass
class ModelConfig:
    emb_dim: int = 16  # every feature table's embedding dim
    table_dtype: str = "fp32"  # fp32 | fp16: the feature tables' weights (fp16: stochastic rounding on CUDA)
    num_groups: int = 8  # feature-group tokens fed to the interaction block
    group_dim: int = 64  # width of each feature-group token
    interaction: str = "rankmixer"  # rankmixer | dcnv2
    interaction_layers: int = 2  # layers of the interaction block
    hidden: int = 256  # the base ranker's wide hidden vector h
    iat_dim: int = 64  # the instance token (bottleneck) width
    bottleneck_act: str = "tanh"  # tanh | identity, over a LayerNorm (modules.compressor.Bottleneck)
    decompress: tuple[int, ...] = (256, 128)  # stage 1: hidden widths of the MLP from the token to the heads
    sit_layers: int = 2  # user order: layers of the source-instance transformer
    sit_heads: int = 4  # user order: attention heads of the SIT
    sit_labels: bool = True  # user order: the SIT also reads each earlier instance's labels, once known
    sit_relevance: bool = False  # user order: SIT attention starts from token similarity (modules.sit)


@dataclasses.dataclass
class TrainConfig:
    data: str = ""  # instance log directory
    out: str = ""  # run directory
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    batch_size: int = 256  # per rank and step: instances (stage 1, either scheme) or requests (stage 2)
    #   (user order: batch_size // window windows of window instances)
    steps: int = 0  # 0: run --epochs
    epochs: float = 1.0  # passes over the training split (fractions allowed), unless --steps
    dense_lr: float = 1e-3  # Adam learning rate of the dense parameters
    sparse_lr: float = 0.05  # learning rate of the embedding tables (fused into the TBE kernels)
    sparse_optimizer: str = "rowwise_adagrad"  # rowwise_adagrad | adagrad | sgd | adam
    eval_every: int = 0  # steps; 0: at the end only
    eval_batches: int = 0  # 0: the whole split
    early_stop: int = 0  # evaluations without a better valid AUC (first task) before stopping; 0: off.
    # With it the best evaluated model is kept (RUN/best) and restored at the end.
    ckpt_every: int = 0  # steps; 0: at the end only
    time_limit: float = 0.0  # seconds of training in this job (0: none): past it the run saves a checkpoint
    #   after its current step and stops, unfinished (exit code 75); --resume goes on. For jobs of bounded time
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    seed: int = 0  # seeds the model init and the data order
    split: tuple[float, float] = (0.8, 0.9)  # time quantiles: train | valid | test
    tasks: tuple[str, ...] = ()  # labels to train on (default: every label of the schema)
    num_workers: int = 0  # DataLoader worker processes per rank building batches
    hbm_gb: float = 0.0  # 0: the device's real memory
    constraints: str = ""  # JSON file of per-table planner constraints
    replicate_rows: int = 0  # tables of at most this many rows are data-parallel: a copy on every rank, no
    #   all-to-all; DDP averages their gradients, then the sparse optimizer steps them. 0: the planner decides.
    #   --constraints and the token table's own constraints take precedence
    resume: bool = False  # continue the run at --out from its latest checkpoint (same config but the budget)
    resume_from: str = ""  # a finished run of this stage on an earlier version of --data (iat-rec data append): start
    #   from its weights and optimizer state and train on the rows appended since
    overwrite: bool = False  # replace an existing run at --out (without it, or --resume, an existing run is refused)
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True  # a progress bar on rank 0


@dataclasses.dataclass
class CompressConfig(TrainConfig):
    scheme: str = "temporal"  # temporal | user (both train in time order)
    window: int = 64  # user order: instances per window
    slices: int = 16  # model snapshots over the first epoch, for time-consistent export (0: none)
    stream: bool = False  # user order: prefix windows with earlier tokens from --tokens
    tokens: str = ""  # token table for --stream
    prefix: int = 64  # --stream: earlier tokens per window
    reconstruct: float = 0.1  # weight of the loss that keeps features recoverable from the token (0: off)
    reconstruct_features: tuple[str, ...] = ()  # default: the schema's sequence features, else every sparse one
    bf16: bool = False  # the compressor's dense part (groups, interaction, bottleneck, SIT, heads) under bf16
    #   autocast; the stored token and the loss stay fp32. Export and serving encode the same way
    compile: bool = False  # torch.compile the compressor's dense part for training, as CUDA graphs on a GPU
    #   (mode reduce-overhead); export and serving run it eagerly


def _field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def from_dict(cls, d: dict[str, Any], where: str = "config"):
    """Builds dataclass ``cls`` from a mapping; unknown keys raise IatError."""
    if not isinstance(d, dict):
        raise IatError(f"{where}: expected a mapping")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise IatError(f"{where}: unknown keys {unknown} (known: {sorted(names)})")
    kwargs = {}
    for key, value in d.items():
        typ = _field_type(cls, key)
        if dataclasses.is_dataclass(typ):
            kwargs[key] = from_dict(typ, value, f"{where}.{key}")
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def field_comments(cls) -> dict[str, str]:
    """Each field's trailing ``# comment`` in the class source: the flags' help text, written
    once, beside the field. It continues on the comment lines right below the field that start
    with ``#`` and two or more spaces (``#   more text``); a ``# comment`` line is not help."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        lines = inspect.getsource(klass).splitlines()
        name = None  # the field whose help the next continuation line extends
        for line in lines:
            m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
            c = re.match(r"\s+#\s\s+(\S.*)$", line)
            if m:
                name = m.group(1)
                out[name] = m.group(2).strip()
            elif c and name:
                out[name] += " " + c.group(1).strip()
            else:
                name = None
    return out


def add_flags(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    """One flag per field (nested dataclasses flattened: ``model.emb_dim`` -> ``--emb-dim``),
    its help the field's comment, with the default."""
    comments, defaults = field_comments(cls), cls()
    for f in dataclasses.fields(cls):
        typ = _field_type(cls, f.name)
        if dataclasses.is_dataclass(typ):
            add_flags(parser, typ, prefix=f"{f.name}.")
            continue
        flag = "--" + f.name.replace("_", "-")
        dest = prefix + f.name
        default = getattr(defaults, f.name)
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        text = f"{comments.get(f.name, '')} (default: {shown if shown not in ('', None) else 'none'})".strip()
        if typ is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(typ) is tuple:
            inner = typing.get_args(typ)[0]
            parser.add_argument(flag, dest=dest, type=inner, nargs="+", default=None, help=text, metavar=f.name.upper())
        else:
            parser.add_argument(flag, dest=dest, type=typ, default=None, help=text, metavar=f.name.upper())


def load_yaml(path: str | None) -> dict[str, Any]:
    """A config file's mapping ({} without a file)."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise IatError(f"config file not found: {p}")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise IatError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise IatError(f"{p}: expected a mapping")
    return d


def resolve(cls, args: argparse.Namespace, config_file: str | None):
    """The config: defaults, then the YAML file, then the flags that were given."""
    cfg = from_dict(cls, load_yaml(config_file), where=str(config_file or "config"))
    for dest, value in vars(args).items():
        if value is None or dest == "config":
            continue
        target, _, name = dest.rpartition(".")
        obj = getattr(cfg, target) if target else cfg
        if hasattr(obj, name):
            setattr(obj, name, tuple(value) if isinstance(value, list) else value)
    return cfg


# Value rules by field name, wherever the field sits (nested configs included); checked before
# any rank starts, so a bad value is one error line and nothing is written.
_AT_LEAST_1 = (
    "batch_size",
    "window",
    "keep_checkpoints",
    "emb_dim",
    "num_groups",
    "group_dim",
    "interaction_layers",
    "hidden",
    "iat_dim",
    "sit_layers",
    "sit_heads",
    "prefix",
    "max_len",
    "reader_dim",
    "reader_layers",
    "reader_heads",
    "decompress",
    "head",
)
_AT_LEAST_0 = (
    "steps",
    "eval_every",
    "eval_batches",
    "early_stop",
    "ckpt_every",
    "num_workers",
    "hbm_gb",
    "slices",
    "reconstruct",
    "length_bucket",
    "time_limit",
)
_POSITIVE = ("epochs", "dense_lr", "sparse_lr")
DEVICES = ("auto", "cpu", "cuda")  # --device of every program
SCHEMES = ("temporal", "user")  # stage-1 training orders
_CHOICES = {
    "device": DEVICES,
    "scheme": SCHEMES,
    "interaction": ("rankmixer", "dcnv2"),
    "sparse_optimizer": ("rowwise_adagrad", "adagrad", "sgd", "adam"),
}


def _type_ok(value, typ) -> bool:
    if typing.get_origin(typ) is tuple:
        inner = typing.get_args(typ)[0]
        return isinstance(value, (tuple, list)) and all(_type_ok(v, inner) for v in value)
    if typ is bool:
        return isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, typ)


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _type_name(typ) -> str:
    if typing.get_origin(typ) is tuple:
        return f"a list of {_TYPE_NAMES.get(typing.get_args(typ)[0], 'values')}"
    return _TYPE_NAMES.get(typ, typ.__name__)


def check_values(cfg, where: str = "") -> None:
    """Every field of ``cfg`` (recursively): of its declared type and within its rule."""
    for f in dataclasses.fields(cfg):
        value, typ, name = getattr(cfg, f.name), _field_type(type(cfg), f.name), where + f.name
        if dataclasses.is_dataclass(typ):
            check_values(value, name + ".")
            continue
        flag = "--" + f.name.replace("_", "-")
        if not _type_ok(value, typ):
            raise IatError(f"{flag} ({name}) must be {_type_name(typ)}, not {value!r}")
        items = value if isinstance(value, tuple) else (value,)
        if f.name in _AT_LEAST_1 and any(v < 1 for v in items):
            raise IatError(f"{flag} must be >= 1, not {value!r}")
        if f.name in _AT_LEAST_0 and any(not v >= 0 for v in items):
            raise IatError(f"{flag} must be >= 0, not {value!r}")
        if f.name in _POSITIVE and not (math.isfinite(value) and value > 0):
            raise IatError(f"{flag} must be a finite number > 0, not {value!r}")
        if f.name in _CHOICES and value not in _CHOICES[f.name]:
            raise IatError(f"{flag} must be one of {list(_CHOICES[f.name])}, not {value!r}")
        if f.name == "split" and not (len(value) == 2 and 0 < value[0] < value[1] < 1):
            raise IatError(f"--split takes two time quantiles 0 < TRAIN_END < VALID_END < 1, not {list(value)}")
