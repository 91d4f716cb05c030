"""The feature contract: how a raw value becomes a table row or a dense input, the same on every path.

Batch featurization (adsfm.training.data), the streaming reader (adsfm.training.stream), export's parity
check and promotion gate, the serving engines (HTTP) and the MLflow pyfunc all featurize through this
module, and tests/unit/test_feature_contract.py feeds the same raw rows through each of them.

The rules (the README's data section states them too):
- Missing: None, NaN, pandas NA/NaT, an empty string, and any string listed in `na_values`.
- A categorical value's key is its canonical string: a string as it is; an integral number without a
  decimal point (7, 7.0 and numpy's int64(7) are all "7"); another number as Python's shortest repr
  ("0.5"); a boolean as "true"/"false". A string is never reinterpreted: "7.0" and "007" stay themselves.
- Table rows: row 0 is the unknown-value row (a value the vocabulary does not hold: unseen in training or
  rarer than min_count). A table whose training values had missing ones gets row 1 for missing values
  (the model learns what "missing" means); in a table whose training values had none, a missing value
  takes row 0 too. Then the vocabulary (sorted), or the hash buckets: a hashed key takes
  first + stable_hash(key) % buckets, or the managed rows: a key's id is managed_id(key), and the row
  first + i holds the id `slot_keys[i]` (training admits and evicts ids, deltas move them); an id no row
  holds takes row 0.
- Multi-valued features: a list (or tuple or array), or a string split at the feature's `sep`; missing
  elements and empty parts are dropped; a missing value is an empty bag, which pools to zeros.
- Raw features (integers used as they are, e.g. timestamps): integers, integral floats or integer strings.
- Dense features: a number, a numeric string or a boolean; missing is the training mean (0 after
  standardisation), optionally with a 0/1 `<name>_missing` input; log1p counts negative values as 0; a
  value that is not a finite number is an error naming the feature.
- Bucketized dense features (`buckets: N`): the same value also takes a row of a table of quantile
  buckets, whose edges come from the training rows: row first + (how many edges are <= the value); a
  missing value takes the missing row (or row 0). The sparse feature `<name>_bucket` reads the dense
  feature's field: a request sends the value once.
- Labels: 0/1 (or values in [0, 1]), `>= threshold` when one is set, `== positive` for classes; a missing
  or malformed label is an error naming the column and the count. Times: seconds, or dates pandas parses;
  missing or malformed ones are errors too.

numpy, pandas and pydantic only: serving loads this without torch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

OOV_ROW = 0
"""A value the table's vocabulary does not hold (and a missing one, in a table without a missing row)."""


class FeatureError(ValueError):
    """A value that cannot be featurized; `field` names where it is (a column, or a request field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


# -------------------------------------------------------------------------------------------- raw values


def stable_hash(key: str, buckets: int) -> int:
    """Process-independent hash into [0, buckets) (Python's hash() is salted per process); any str hashes,
    lone surrogates included."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets


MANAGED_IDS = (1 << 63) - 3
"""How many ids managed_id gives: [2, 2**63 - 1), clear of the rows 0 and 1 a missing or unknown value
takes before the remap, and of int64's max, torchrec's mark of a free row."""


def managed_id(key: str) -> int:
    """A managed-collision table's id of a key: 63 bits of blake2b, so two keys share an id with odds of
    about n²/2⁶⁴ (none in practice), where hashing into the table's rows shares one in n/rows."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return 2 + int.from_bytes(digest, "little") % MANAGED_IDS


def is_missing(v: Any, na_values: frozenset[str] = frozenset()) -> bool:
    """None, NaN, pandas NA/NaT, "" and the configured `na_values` strings."""
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    if isinstance(v, str):
        return v == "" or v in na_values
    if isinstance(v, float | np.floating):
        return bool(np.isnan(v))
    return False


def key_of(v: Any, field: str) -> str:
    """The canonical string of a present categorical value (see the module docstring)."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool | np.bool_):
        return "true" if v else "false"
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        f = float(v)
        if not math.isfinite(f):
            raise FeatureError(field, f"expected a finite value, got {f}")
        return str(int(f)) if f.is_integer() and abs(f) < 2**63 else repr(f)
    raise FeatureError(field, f"expected a string or a number, got {type(v).__name__}")


def number_of(v: Any, field: str) -> float:
    """A present dense value as a float: numbers, booleans and numeric strings; anything else is refused."""
    if isinstance(v, bool | np.bool_):
        return 1.0 if v else 0.0
    if isinstance(v, int | float | np.integer | np.floating):
        x = float(v)
    elif isinstance(v, str):
        try:
            x = float(v)
        except ValueError:
            raise FeatureError(field, f"expected a number, got {v[:40]!r}") from None
    else:
        raise FeatureError(field, f"expected a number, got {type(v).__name__}")
    if not math.isfinite(x):
        raise FeatureError(field, f"expected a finite number, got {v!r}")
    return x


def integer_of(v: Any, field: str) -> int:
    """A raw feature's value: an integer, an integral float or an integer string."""
    if isinstance(v, bool | np.bool_):
        raise FeatureError(field, "expected an integer, got a boolean")
    if isinstance(v, int | np.integer):
        return int(v)
    try:
        x = float(v) if isinstance(v, str | float | np.floating) else None
    except ValueError:
        x = None
    if x is None or not math.isfinite(x) or not x.is_integer() or abs(x) >= 2**63:
        raise FeatureError(field, f"expected an integer (seconds for a time), got {str(v)[:40]!r}")
    return int(x)


def value_keys(raw: Any, multi: bool, sep: str, na_values: frozenset[str], where: str) -> list[str] | None:
    """The keys of one raw value (None: missing). A single-valued feature takes one value (a list of one is
    accepted); a multi-valued one a list or a `sep`-joined string, whose missing or empty parts are dropped."""
    if isinstance(raw, list | tuple | np.ndarray):
        if not multi and len(raw) > 1:
            raise FeatureError(where, f"takes one value, got a list of {len(raw)}")
        items: Iterable[Any] = raw
    elif isinstance(raw, str):
        if raw == "" or raw in na_values:
            return None
        if not multi:
            return [raw]
        items = raw.split(sep)
    elif is_missing(raw, na_values):
        return None
    else:
        items = (raw,)
    out = []
    for v in items:
        if type(v) is str:  # the common case, a string key, without the general checks
            if v and v not in na_values:
                out.append(v)
        elif not is_missing(v, na_values):
            out.append(key_of(v, where))
    return out if out or multi else None


def count_keys(values: pd.Series, multi: bool, sep: str, na_values: frozenset[str], where: str,
               counts: dict[str, int]) -> int:
    """How often each key occurs in a column of raw values (added to `counts`, a vocabulary's evidence);
    returns how many values were missing (a single-valued column's missing values need a row)."""
    if not multi and _factorizable(values):
        codes, uniques = pd.factorize(values, use_na_sentinel=True)
        n = np.bincount(codes[codes >= 0], minlength=len(uniques))
        missing = int((codes < 0).sum())
        for u, c in zip(uniques, n, strict=True):
            if not c:
                continue
            if is_missing(u, na_values):
                missing += int(c)
            else:
                k = key_of(u, where)
                counts[k] = counts.get(k, 0) + int(c)
        return missing
    missing = 0
    for v in values.tolist():
        keys = value_keys(v, multi, sep, na_values, where)
        missing += keys is None
        for k in keys or ():
            counts[k] = counts.get(k, 0) + 1
    return missing


# ---------------------------------------------------------------------------------------------- the spec


class SparseFeatureSpec(BaseModel):
    name: str
    column: str | None = None
    """Column of the training data it came from (defaults to name)."""
    table: str | None = None
    """Its embedding table; None for a raw feature."""
    multi: bool = False
    sep: str = "|"
    side: Literal["user", "item"] = "user"
    raw: bool = False
    """Integer values used as they are (timestamps), not looked up."""
    bucketizes: str | None = None
    """Set for a bucketized dense feature's lookup: the dense feature whose value it reads."""

    @property
    def source(self) -> str:
        return self.column or self.name

    @property
    def field(self) -> str:
        """The request field (the feature name) whose value it reads."""
        return self.bucketizes or self.name

    @property
    def table_name(self) -> str:
        if self.table is None:
            raise ValueError(f"feature {self.name!r} is raw: it has no table")
        return self.table


class DenseFeatureSpec(BaseModel):
    name: str
    column: str | None = None
    side: Literal["user", "item"] = "user"
    log1p: bool = False
    mean: float = 0.0
    std: float = 1.0
    missing_indicator: bool = False
    """A 0/1 input `<name>_missing` follows the dense features in the model's dense input."""

    @property
    def source(self) -> str:
        return self.column or self.name


class TableSpec(BaseModel):
    """How raw keys become rows of one embedding table (layout in the module docstring)."""

    rows: int
    pooling: Literal["sum", "mean"] = "sum"
    hash_buckets: int = 0
    """0: `vocab` maps keys to rows first..; else keys hash into `hash_buckets` rows from `first`."""
    vocab: list[str] = Field(default_factory=list)
    missing: bool = False
    """Row 1 is the missing-value row (training saw missing values); else a missing value takes row 0."""
    edges: list[float] = Field(default_factory=list)
    """A bucketized dense feature's quantile edges: a value x takes row first + #(edges <= x)."""
    managed: int = 0
    """Managed collision: rows first .. first + managed - 1 each hold one key's id (`slot_keys`)."""
    slot_keys: list[int] = Field(default_factory=list)
    """managed: the id (managed_id) row first + i holds, -1 while the row is free; the trainer's remap as
    exported, moved on by deltas."""
    eviction: Literal["lru", "lfu"] = "lru"
    """managed: which id leaves a full table for a new one (training only)."""
    eviction_interval: int = 1
    """managed: training steps between admissions (training only)."""

    @property
    def missing_row(self) -> int:
        return 1 if self.missing else OOV_ROW

    @property
    def first(self) -> int:
        """The first row of the vocabulary or of the hash buckets."""
        return 2 if self.missing else 1


class HistorySpec(BaseModel):
    name: str = "history"
    positive_name: str | None = None
    length: int = 0
    actions_name: str | None = None
    times_name: str | None = None
    chronological: bool = False


class FeatureSpec(BaseModel):
    """Everything needed to featurize a raw row the way training did: what a bundle's manifest carries."""

    sparse: list[SparseFeatureSpec]
    """Feature order of the model's pooled embeddings."""
    dense: list[DenseFeatureSpec] = Field(default_factory=list)
    """Column order of the model's dense input (missing indicators follow, see `dense_inputs`)."""
    tables: dict[str, TableSpec] = Field(default_factory=dict)
    item_column: str | None = None
    user_column: str | None = None
    history: HistorySpec = Field(default_factory=HistorySpec)
    na_values: list[str] = Field(default_factory=list)
    fingerprint: str = ""
    tasks: list[str] = Field(default_factory=list)
    """A multi-task model's tasks, one output each in this order (adsfm.contract.tasks); empty: one output."""

    @property
    def outputs(self) -> int:
        """Scores per row: one per task, one without tasks."""
        return max(1, len(self.tasks))

    def sparse_feature(self, name: str) -> SparseFeatureSpec:
        for f in self.sparse:
            if f.name == name:
                return f
        raise KeyError(name)

    def dense_inputs(self) -> list[str]:
        """Names of the model's dense input columns: the dense features, then their missing indicators."""
        return [d.name for d in self.dense] + [f"{d.name}_missing" for d in self.dense if d.missing_indicator]

    def feature_names(self, side: str | None = None) -> list[str]:
        """Sparse then dense feature names, of one side ('user' / 'item') or all."""
        sparse = [f.name for f in self.sparse if (side is None or f.side == side) and not f.bucketizes]
        return sparse + [d.name for d in self.dense if side is None or d.side == side]

    def request_fields(self, side: str | None = None) -> set[str]:
        """Fields a request may carry: the features, and the item id on the item side."""
        fields = set(self.feature_names(side))
        if self.item_column and side in (None, "item"):
            fields.add(self.item_column)
        return fields


def vocabulary_table(counts: dict[str, int], min_count: int, pooling: str, missing: bool) -> TableSpec:
    """A vocabulary table from training keys and their counts (keys seen at least min_count times), with a
    missing-value row when the training values had missing ones."""
    vocab = sorted(k for k, c in counts.items() if c >= min_count)
    return TableSpec(rows=1 + missing + len(vocab), pooling=pooling, vocab=vocab, missing=missing)  # type: ignore[arg-type]


def hashed_table(buckets: int, pooling: str, missing: bool) -> TableSpec:
    return TableSpec(rows=1 + missing + buckets, pooling=pooling, hash_buckets=buckets, missing=missing)  # type: ignore[arg-type]


def managed_table(size: int, pooling: str, missing: bool, eviction: str, eviction_interval: int) -> TableSpec:
    return TableSpec(rows=1 + missing + size, pooling=pooling, managed=size, slot_keys=[-1] * size, missing=missing,  # type: ignore[arg-type]
                     eviction=eviction, eviction_interval=eviction_interval)  # type: ignore[arg-type]


def bucket_table(x: np.ndarray, buckets: int) -> TableSpec:
    """A bucketized dense feature's table from its training values `x` (float64, NaN where missing): the
    edges at the 1/buckets .. (buckets-1)/buckets quantiles of the present values, repeated ones merged."""
    present = x[np.isfinite(x)]
    qs = np.linspace(0.0, 1.0, buckets + 1)[1:-1]
    edges = np.unique(np.quantile(present, qs)).tolist() if len(present) else []
    missing = bool(np.isnan(x).any())
    return TableSpec(rows=1 + missing + len(edges) + 1, edges=edges, missing=missing)


def dense_stats(name: str, column: str | None, side: str, log1p: bool, x: np.ndarray,
                missing_indicator: bool = False) -> DenseFeatureSpec:
    """A dense feature's spec from its training values `x` (float64, NaN where missing): the mean and std
    after the transform, over the present values (a column with none standardises to itself)."""
    t = np.log1p(np.maximum(x, 0.0)) if log1p else x
    present = np.isfinite(t)
    mean = float(t[present].mean()) if present.any() else 0.0
    std = (float(t[present].std()) if present.any() else 1.0) or 1.0
    return DenseFeatureSpec(name=name, column=column, side=side, log1p=log1p, mean=mean, std=std,  # type: ignore[arg-type]
                            missing_indicator=missing_indicator)


# ------------------------------------------------------------------------------------------- featurizer


class Featurizer:
    """A FeatureSpec compiled for lookups (vocabulary indexes built once); every path calls these."""

    def __init__(self, spec: FeatureSpec, ids: bool = False) -> None:
        """`ids`: a managed table's keys give their ids (managed_id), for training's remap, not their rows."""
        self.spec, self.ids = spec, ids
        self.na = frozenset(spec.na_values)
        self._index = {name: {tok: t.first + i for i, tok in enumerate(t.vocab)}
                       for name, t in spec.tables.items() if not t.hash_buckets and not t.edges and not t.managed}
        self._held = {name: np.array(t.slot_keys, np.int64) for name, t in spec.tables.items() if t.managed}
        self._slots = {name: {int(k): t.first + i for i, k in enumerate(t.slot_keys) if k >= 0}
                       for name, t in spec.tables.items() if t.managed}
        self._edges = {name: np.array(t.edges, np.float64) for name, t in spec.tables.items() if t.edges}
        self._by_name = {f.name: f for f in spec.sparse}
        self._dense_by_name = {d.name: d for d in spec.dense}

    # ----------------------------------------------------------------------------------- categorical

    def row_of_key(self, table: str, key: str) -> int:
        t = self.spec.tables[table]
        if t.managed:
            return managed_id(key) if self.ids else self._slots[table].get(managed_id(key), OOV_ROW)
        if t.hash_buckets:
            return t.first + stable_hash(key, t.hash_buckets)
        return self._index[table].get(key, OOV_ROW)

    def update_slots(self, table: str, rows: np.ndarray, keys: np.ndarray) -> None:
        """A delta's remap of a managed table: row `rows[i]` now holds id `keys[i]` (-1: free). Rows before
        the table's first managed row (the unknown and missing rows) hold no id and are passed over."""
        slots, held, first = self._slots[table], self._held[table], self.spec.tables[table].first
        for row, key in zip(rows.tolist(), keys.tolist(), strict=True):
            if row < first:
                continue
            old = int(held[row - first])
            if old >= 0 and slots.get(old) == row:
                del slots[old]
            held[row - first] = key
            if key >= 0:
                slots[int(key)] = row

    def slot_keys(self, table: str) -> np.ndarray:
        """The id each managed row holds now (-1: free), the bundle's remap moved on by the applied deltas."""
        return self._held[table].copy()

    def keys(self, f: SparseFeatureSpec, raw: Any, where: str) -> list[str] | None:
        return value_keys(raw, f.multi, f.sep, self.na, where)

    def rows(self, f: SparseFeatureSpec, raw: Any, where: str) -> np.ndarray:
        """Table rows (int64) of one raw value; for a raw feature, its integers. A missing single-valued
        value is the missing row; a missing multi-valued one, no rows."""
        if f.bucketizes:
            return self._bucket_rows(f, self.numbers([raw], where))
        keys = self.keys(f, raw, where)
        if keys is None:
            if f.raw or f.multi:
                return np.zeros(0, np.int64)
            return np.array([self.spec.tables[f.table_name].missing_row], np.int64)
        if f.raw:
            return np.array([integer_of(k, where) for k in keys], np.int64)
        index = self._index.get(f.table_name)
        if index is not None:
            return np.array([index.get(k, OOV_ROW) for k in keys], np.int64)
        return np.array([self.row_of_key(f.table_name, k) for k in keys], np.int64)

    def sparse_column(self, f: SparseFeatureSpec, values: Sequence[Any] | pd.Series, where: str | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """(rows int64, lengths int32) of a column of raw values: what `rows` gives for each, concatenated.
        Single-valued columns look each distinct value up once."""
        where = where or f.name
        series = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype=object)
        if f.bucketizes:
            return self._bucket_rows(f, self.numbers(series, where)), np.ones(len(series), np.int32)
        if not f.multi and not f.raw and _factorizable(series):
            missing = self.spec.tables[f.table_name].missing_row
            codes, uniques = pd.factorize(series, use_na_sentinel=True)
            table = np.array([missing if is_missing(u, self.na) else self.row_of_key(f.table_name, key_of(u, where))
                              for u in uniques], np.int64)
            rows = np.where(codes < 0, missing, table[np.maximum(codes, 0)] if len(table) else missing)
            return rows.astype(np.int64), np.ones(len(series), np.int32)
        return self._flat_column(f, series.tolist(), where)

    def _bucket_rows(self, f: SparseFeatureSpec, x: np.ndarray) -> np.ndarray:
        """Rows of a bucketized dense feature's raw values (float64, NaN where missing)."""
        t = self.spec.tables[f.table_name]
        edges = self._edges.get(f.table_name, np.zeros(0))
        rows = t.first + np.searchsorted(edges, np.nan_to_num(x), side="right")
        return np.where(np.isnan(x), t.missing_row, rows).astype(np.int64)

    def _flat_column(self, f: SparseFeatureSpec, cells: list[Any], where: str) -> tuple[np.ndarray, np.ndarray]:
        """`sparse_column` for lists, joined strings and raw integers: every cell's elements in one flat
        array, each distinct element canonicalized once (the rules of `rows`, vectorized)."""
        n = len(cells)
        flat: list[Any] = []
        counts = np.zeros(n, np.int64)
        for i, v in enumerate(cells):
            if isinstance(v, list | tuple | np.ndarray):
                if not f.multi and len(v) > 1:
                    raise FeatureError(where, f"takes one value, got a list of {len(v)}")
                flat.extend(v)
                counts[i] = len(v)
            elif is_missing(v, self.na):
                continue
            elif f.multi and isinstance(v, str):
                parts = v.split(f.sep)
                flat.extend(parts)
                counts[i] = len(parts)
            else:
                flat.append(v)
                counts[i] = 1
        codes, uniques = pd.factorize(np.array(flat, dtype=object), use_na_sentinel=True) if flat else \
            (np.zeros(0, np.int64), [])
        if any(isinstance(u, bool | np.bool_) or (isinstance(u, int | float | np.number) and u in (0, 1)) for u in uniques) \
                and any(isinstance(x, bool | np.bool_) for x in flat):  # factorize merged True with 1: no shortcut
            per = [self.rows(f, v, where) for v in cells]
            return (np.concatenate(per) if per else np.zeros(0, np.int64)), np.array([len(p) for p in per], np.int32)
        gone = np.array([is_missing(u, self.na) for u in uniques], bool)
        if f.raw:
            value = np.array([0 if g else integer_of(key_of(u, where), where) for u, g in zip(uniques, gone, strict=True)], np.int64)
        else:
            value = np.array([0 if g else self.row_of_key(f.table_name, key_of(u, where)) for u, g in zip(uniques, gone, strict=True)],
                             np.int64)
        keep = codes >= 0
        keep[keep] = ~gone[codes[keep]]
        cell = np.repeat(np.arange(n), counts)[keep]
        rows = value[codes[keep]]
        if f.multi or f.raw:
            return rows, np.bincount(cell, minlength=n).astype(np.int32)
        out = np.full(n, self.spec.tables[f.table_name].missing_row, np.int64)  # a single value: missing when absent
        out[cell] = rows
        return out, np.ones(n, np.int32)

    # ---------------------------------------------------------------------------------------- dense

    def numbers(self, values: Sequence[Any] | pd.Series, where: str) -> np.ndarray:
        """Raw dense values as float64, NaN where missing; a value that is not a finite number raises."""
        series = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype=object)
        if pd.api.types.is_bool_dtype(series.dtype) and not pd.api.types.is_object_dtype(series.dtype):
            x = series.astype("float64").to_numpy(dtype=np.float64, na_value=np.nan)
        elif pd.api.types.is_numeric_dtype(series.dtype):
            x = series.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            x = np.array([np.nan if is_missing(v, self.na) else number_of(v, where) for v in series.tolist()], np.float64)
        if np.isinf(x).any():
            raise FeatureError(where, f"expected finite numbers, got {x[np.isinf(x)][0]}")
        return x

    @staticmethod
    def standardise(d: DenseFeatureSpec, x: np.ndarray) -> np.ndarray:
        """The training-time transform (log1p, then the training mean and std) of float64 values; missing
        (NaN) values become 0, the mean. float32, as the model takes it."""
        t = np.log1p(np.maximum(x, 0.0)) if d.log1p else x
        z = (t - d.mean) / d.std
        return np.where(np.isnan(x), 0.0, z).astype(np.float32)

    def dense_matrix(self, columns: dict[str, Any], n: int, where: str = "") -> np.ndarray:
        """The model's dense input [n, len(dense_inputs())] from raw columns by feature name (a feature that
        is absent is missing in every row)."""
        spec = self.spec
        out = np.zeros((n, len(spec.dense_inputs())), np.float32)
        extra = len(spec.dense)
        for k, d in enumerate(spec.dense):
            raw = columns.get(d.name)
            x = np.full(n, np.nan) if raw is None else self.numbers(raw, f"{where}{d.name}")
            out[:, k] = self.standardise(d, x)
            if d.missing_indicator:
                out[:, extra] = np.isnan(x)
                extra += 1
        return out

    def dense_row(self, values: dict[str, Any], side: str | None, where: str) -> np.ndarray:
        """One row's dense inputs of one side (dense features then their indicators, in spec order)."""
        feats = [d for d in self.spec.dense if side is None or d.side == side]
        out = np.zeros(len(feats) + sum(d.missing_indicator for d in feats), np.float32)
        extra = len(feats)
        for k, d in enumerate(feats):
            raw = values.get(d.name)
            x = np.array([np.nan if is_missing(raw, self.na) else number_of(raw, f"{where}{d.name}")])
            out[k] = self.standardise(d, x)[0]
            if d.missing_indicator:
                out[extra] = float(np.isnan(x[0]))
                extra += 1
        return out

    def dense_layout(self, side: str) -> tuple[list[int], list[int]]:
        """Where one side's dense_row values go in the model's dense input: (feature columns, indicator
        columns), in the order dense_row writes them."""
        feats = [k for k, d in enumerate(self.spec.dense) if d.side == side]
        indicators, pos = [], len(self.spec.dense)
        for d in self.spec.dense:
            if d.missing_indicator:
                if d.side == side:
                    indicators.append(pos)
                pos += 1
        return feats, indicators


def _factorizable(series: pd.Series) -> bool:
    """Whether pandas' factorize finds the same distinct values the contract does: not for an object column
    holding lists (unhashable) or booleans (factorize would merge True with 1)."""
    if series.dtype != object:
        return True
    return not any(isinstance(v, bool | np.bool_ | list | tuple | np.ndarray) for v in series.tolist())


# ------------------------------------------------------------------------------------- labels and times


def labels(series: pd.Series, column: str, threshold: float | None = None, positive: str | None = None,
           na_values: frozenset[str] = frozenset()) -> np.ndarray:
    """The 0/1 (float32) labels of a column; errors name the column, the count and a few values."""
    values = series.tolist()
    missing = np.array([is_missing(v, na_values) for v in values], bool)
    if missing.any():
        raise ValueError(f"data.label={column!r}: {int(missing.sum())} of {len(values)} rows have no label "
                         f"(first at row {int(np.argmax(missing))}); drop or fill them")
    if positive is not None:
        keys = np.array([key_of(v, f"data.label={column!r}") for v in values], dtype=object)
        return (keys == positive).astype(np.float32)
    x = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan) \
        if not pd.api.types.is_bool_dtype(series.dtype) else series.to_numpy(dtype=np.float64)
    bad = np.isnan(x)
    if bad.any():
        examples = sorted({str(v) for v, b in zip(values, bad, strict=True) if b})[:5]
        raise ValueError(f"data.label={column!r} holds {int(bad.sum())} values that are not numbers, e.g. {examples}: "
                         f"set data.label_positive to the value that means a positive (one of {examples})")
    if threshold is not None:
        return (x >= threshold).astype(np.float32)
    outside = (x < 0) | (x > 1)
    if outside.any():
        bad_values = sorted({float(v) for v in x[outside]})[:5]
        raise ValueError(f"data.label={column!r} has {int(outside.sum())} values outside [0, 1], e.g. {bad_values}: "
                         "set data.label_threshold (label = value >= threshold) or data.label_positive")
    return x.astype(np.float32)


def timestamps(series: pd.Series, column: str, na_values: frozenset[str] = frozenset()) -> np.ndarray:
    """Event times as int64 seconds: numbers are taken as seconds, datetimes and date strings are parsed;
    missing or unparseable times are errors naming the column and the count."""
    where = f"data.time_column={column!r}"
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        if series.isna().any():
            raise ValueError(f"{where}: {int(series.isna().sum())} of {len(series)} rows have no time; drop or fill them")
        return (series.astype("datetime64[s]").astype("int64")).to_numpy()
    values = series.tolist()
    missing = np.array([is_missing(v, na_values) for v in values], bool)
    if missing.any():
        raise ValueError(f"{where}: {int(missing.sum())} of {len(values)} rows have no time (first at row "
                         f"{int(np.argmax(missing))}); drop or fill them")
    x = pd.to_numeric(series, errors="coerce")
    if not x.isna().any():
        return np.floor(x.to_numpy(dtype=np.float64)).astype(np.int64)
    parsed = pd.to_datetime(series, errors="coerce", utc=True, format="mixed")
    bad = parsed.isna().to_numpy()
    if bad.any():
        examples = sorted({str(v) for v, b in zip(values, bad, strict=True) if b})[:5]
        raise ValueError(f"{where}: {int(bad.sum())} values are neither seconds nor dates, e.g. {examples}")
    return parsed.astype("datetime64[s, UTC]").astype("int64").to_numpy()
