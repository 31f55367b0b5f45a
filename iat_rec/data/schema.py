"""The instance-log schema: which columns are the user, time, labels and features.

Written as YAML (read with ``yaml.safe_load``); unknown keys are an error, so a typo never
silently drops a feature. Example::

    user: user_id
    timestamp: ts
    labels:
      - {name: click, column: click}
      - {name: conversion, column: conv, available_at: conv_time}
    sparse:
      - {name: user_id, column: user_id, hash: 100000}
      - {name: genres, column: genres, vocab: [Action, Comedy], separator: "|"}
    dense:
      - {name: price, column: price, norm: log}
    sequence: [item_id, category]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from iat_rec.errors import IatError

DENSE_NORMS = ("none", "standard", "log", "minmax")


@dataclasses.dataclass(frozen=True)
class Label:
    name: str
    column: str
    available_at: str | None = None  # column with the time the label became known


@dataclasses.dataclass(frozen=True)
class SparseFeature:
    name: str
    column: str
    vocab: tuple[str, ...] | None = None  # explicit vocabulary: value -> its position
    hash: int | None = None  # hashed vocabulary of this size
    separator: str | None = None  # multi-valued when set

    @property
    def num_embeddings(self) -> int:
        return len(self.vocab) if self.vocab is not None else int(self.hash)

    @property
    def multi(self) -> bool:
        return self.separator is not None


@dataclasses.dataclass(frozen=True)
class DenseFeature:
    name: str
    column: str
    norm: str = "standard"


@dataclasses.dataclass(frozen=True)
class Schema:
    user: str
    timestamp: str
    labels: tuple[Label, ...]
    sparse: tuple[SparseFeature, ...]
    dense: tuple[DenseFeature, ...] = ()
    sequence: tuple[str, ...] = ()  # sparse features of the hand-crafted behaviour sequence

    def __post_init__(self) -> None:
        if not self.labels:
            raise IatError("schema: at least one label is required")
        if not self.sparse:
            raise IatError("schema: at least one sparse feature is required")
        names = [f.name for f in self.sparse] + [f.name for f in self.dense]
        names += [lab.name for lab in self.labels]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise IatError(f"schema: duplicate feature/label names {dup}")
        for f in self.sparse:
            if (f.vocab is None) == (f.hash is None):
                raise IatError(f"schema: sparse feature '{f.name}' needs exactly one of 'vocab' or 'hash'")
            if f.hash is not None and int(f.hash) < 1:
                raise IatError(f"schema: sparse feature '{f.name}' hash size must be >= 1")
            if f.vocab is not None and len(set(f.vocab)) != len(f.vocab):
                raise IatError(f"schema: sparse feature '{f.name}' vocabulary has duplicates")
        for f in self.dense:
            if f.norm not in DENSE_NORMS:
                raise IatError(f"schema: dense feature '{f.name}' norm '{f.norm}' not in {DENSE_NORMS}")
        label_columns = {c: lab.name for lab in self.labels for c in (lab.column, lab.available_at) if c}
        for f in (*self.sparse, *self.dense):
            if f.column in label_columns:
                raise IatError(
                    f"schema: column '{f.column}' is both feature '{f.name}' and (the time of) label "
                    f"'{label_columns[f.column]}': a feature would show the label it predicts"
                )
        sparse_names = {f.name for f in self.sparse}
        unknown = [s for s in self.sequence if s not in sparse_names]
        if unknown:
            raise IatError(f"schema: sequence names unknown sparse features {unknown}")

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def task_names(self) -> list[str]:
        return [lab.name for lab in self.labels]

    def feature(self, name: str) -> SparseFeature:
        for f in self.sparse:
            if f.name == name:
                return f
        raise KeyError(name)

    def input_columns(self) -> list[str]:
        """Every column of the raw input this schema reads, each once, in a stable order."""
        cols = [self.user, self.timestamp]
        for lab in self.labels:
            cols += [lab.column] + ([lab.available_at] if lab.available_at else [])
        cols += [f.column for f in self.sparse] + [f.column for f in self.dense]
        return list(dict.fromkeys(cols))

    def to_dict(self) -> dict[str, Any]:
        def clean(obj) -> dict[str, Any]:
            d = dataclasses.asdict(obj)
            if "vocab" in d and d["vocab"] is not None:
                d["vocab"] = list(d["vocab"])
            return {k: v for k, v in d.items() if v is not None}

        return {
            "user": self.user,
            "timestamp": self.timestamp,
            "labels": [clean(x) for x in self.labels],
            "sparse": [clean(x) for x in self.sparse],
            "dense": [clean(x) for x in self.dense],
            "sequence": list(self.sequence),
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "schema") -> Schema:
        if not isinstance(d, dict):
            raise IatError(f"{source}: expected a mapping at the top level")
        _check_keys(d, {"user", "timestamp", "labels", "sparse", "dense", "sequence"}, source)
        for key in ("user", "timestamp", "labels", "sparse"):
            if key not in d:
                raise IatError(f"{source}: missing required key '{key}'")

        def items(key: str, typ, allowed: set[str]) -> tuple:
            out = []
            raw = d.get(key) or []
            if not isinstance(raw, list):
                raise IatError(f"{source}: {key}: expected a list, got {type(raw).__name__}")
            for i, item in enumerate(raw):
                where = f"{source}: {key}[{i}]"
                if not isinstance(item, dict):
                    raise IatError(f"{where}: expected a mapping")
                _check_keys(item, allowed, where)
                if "name" not in item or "column" not in item:
                    if "column" in item and "name" not in item:
                        item = {**item, "name": item["column"]}
                    else:
                        raise IatError(f"{where}: needs 'column'")
                item = dict(item)
                for k in ("name", "column", "available_at", "norm"):
                    if item.get(k) is not None:
                        item[k] = _name(item[k], f"{where}.{k}")
                if item.get("hash") is not None and (
                    isinstance(item["hash"], bool) or not isinstance(item["hash"], int)
                ):
                    raise IatError(f"{where}.hash: expected an integer, got {item['hash']!r}")
                if item.get("vocab") is not None:
                    if not isinstance(item["vocab"], list) or any(isinstance(v, (list, dict)) for v in item["vocab"]):
                        raise IatError(f"{where}.vocab: expected a list of values")
                    item["vocab"] = tuple(str(v) for v in item["vocab"])
                if item.get("separator") is not None and (
                    not isinstance(item["separator"], str) or not item["separator"]
                ):
                    raise IatError(f"{where}.separator: expected a non-empty string, got {item['separator']!r}")
                out.append(typ(**item))
            return tuple(out)

        sequence = d.get("sequence") or []
        if not isinstance(sequence, list):
            raise IatError(f"{source}: sequence: expected a list, got {type(sequence).__name__}")
        return cls(
            user=_name(d["user"], f"{source}: user"),
            timestamp=_name(d["timestamp"], f"{source}: timestamp"),
            labels=items("labels", Label, {"name", "column", "available_at"}),
            sparse=items("sparse", SparseFeature, {"name", "column", "vocab", "hash", "separator"}),
            dense=items("dense", DenseFeature, {"name", "column", "norm"}),
            sequence=tuple(_name(x, f"{source}: sequence") for x in sequence),
        )


def _name(v: Any, where: str) -> str:
    """A column/feature name: YAML may read ``2020`` as an int; anything else is an error."""
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise IatError(f"{where}: expected a name, got {v!r}")
    return str(v)


def _check_keys(d: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise IatError(f"{where}: unknown keys {unknown} (allowed: {sorted(allowed)})")


def load_schema(path: str | Path) -> Schema:
    path = Path(path)
    if not path.is_file():
        raise IatError(f"schema file not found: {path}")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise IatError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    return Schema.from_dict(d, source=str(path))
