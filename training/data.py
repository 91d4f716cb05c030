"""Datasets → feature arrays → TorchRec batches.

A source (MovieLens-100k, any CSV/parquet file, or a synthetic Zipf generator) yields one pandas frame;
`featurize` turns it into a `FeatureSet`: the feature spec learnt from the training rows (vocabularies,
normalisation: what the export manifest carries to serving), then every row through that spec with the one
feature contract (adsfm.contract.features): jagged sparse columns as (rows, lengths), the dense input,
labels, and a per-user time split.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from adsfm.contract.config import (
    Collision,
    DataConfig,
    DataSource,
    DenseFeature,
    SparseFeature,
    TableConfig,
    to_plain,
    typed,
)
from adsfm.contract.features import (
    DenseFeatureSpec,
    FeatureError,
    FeatureSpec,
    Featurizer,
    HistorySpec,
    SparseFeatureSpec,
    TableSpec,
    bucket_table,
    count_keys,
    dense_stats,
    hashed_table,
    is_missing,
    key_of,
    labels,
    managed_table,
    timestamps,
    vocabulary_table,
)
from adsfm.contract.tasks import check_task_names
from adsfm.training.managed import ManagedIds

MOVIELENS_WHEEL = "recbole==1.2.1"
MOVIELENS_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
FEATURE_FORMAT = 5  # bump when featurize() changes what it writes, so stale caches are rebuilt


# ----------------------------------------------------------------------------------------------- sources


def fetch_movielens(cache_dir: Path) -> Path:
    """MovieLens-100k as shipped in the recbole wheel on PyPI: fetched with pip, unzipped, nothing installed."""
    dest = cache_dir / "ml-100k"
    if all((dest / f).exists() for f in MOVIELENS_FILES):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, MOVIELENS_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"could not fetch MovieLens-100k ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            for name in MOVIELENS_FILES:
                with zf.open(f"recbole/dataset_example/ml-100k/{name}") as src, open(dest / name, "wb") as out:
                    shutil.copyfileobj(src, out)
    return dest


def _read_atomic(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":")[0] for c in df.columns]  # recbole's "name:type" headers
    return df


def load_movielens_frame(cache_dir: Path) -> pd.DataFrame:
    """One row per rating, joined with user and item side information."""
    d = fetch_movielens(cache_dir)
    inter = _read_atomic(d / "ml-100k.inter")
    users = _read_atomic(d / "ml-100k.user")
    items = _read_atomic(d / "ml-100k.item")
    inter["rating"] = inter["rating"].astype(float)
    inter["timestamp"] = inter["timestamp"].astype(float).astype(np.int64)
    users["age"] = users["age"].astype(float)
    users["age_bucket"] = pd.cut(users["age"], [0, 18, 25, 35, 45, 50, 56, 200], right=False).astype(str)
    users["zip_prefix"] = users["zip_code"].str[:2]
    items["genres"] = items["class"].str.replace(" ", "|")
    items["release_year"] = pd.to_numeric(items["release_year"], errors="coerce")
    items["release_year_token"] = items["release_year"].fillna(-1).astype(int).astype(str)
    df = inter.merge(users, on="user_id", how="left").merge(
        items[["item_id", "release_year", "release_year_token", "genres"]], on="item_id", how="left"
    )
    df["release_year"] = df["release_year"].fillna(df["release_year"].median())
    return df


def load_tabular_frame(path: str, cfg: DataConfig | None = None) -> pd.DataFrame:
    """A CSV (any delimiter) or parquet file. CSV cells are text: the declared categorical columns are read
    as strings, so "007" stays "007"; an empty cell, or one of data.na_values, is missing."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data.path={path!r} does not exist; point it at a CSV or parquet file")
    if p.suffix in (".parquet", ".pq"):
        return pd.read_parquet(p)
    text = [f.column or f.name for f in cfg.sparse] if cfg else []
    na = ["", *(cfg.na_values if cfg else [])]
    return pd.read_csv(p, sep=None, engine="python", keep_default_na=False, na_values=na, dtype=dict.fromkeys(text, str))


def synthetic_frame(cfg: DataConfig) -> pd.DataFrame:
    """Zipf-distributed ids with a label that depends on them, so a model has something to learn."""
    s = cfg.synthetic
    rng = np.random.default_rng(cfg.seed)
    n = s.num_samples
    cols: dict[str, Any] = {}
    logit = np.zeros(n)
    for t in range(s.num_tables):
        ids = (rng.zipf(s.zipf_alpha, size=(n, s.pooling_factor)) - 1) % s.rows
        effect = rng.normal(0, 1.0, size=s.rows)
        logit += effect[ids].mean(axis=1)
        cols[f"cat_{t}"] = ["|".join(map(str, r)) for r in ids] if s.pooling_factor > 1 else ids[:, 0].astype(str)
    for j in range(s.num_dense):
        x = rng.normal(size=n)
        logit += 0.3 * x if j % 2 == 0 else 0.0
        cols[f"int_{j}"] = x
    cols["label"] = (rng.random(n) < 1 / (1 + np.exp(-(logit - logit.mean())))).astype(np.int64)
    return pd.DataFrame(cols)


def synthetic_events(cfg: DataConfig) -> tuple[pd.DataFrame, np.ndarray]:
    """Users with long, time-ordered rating histories (for sequence models and speed work), and a mask of
    the rows to keep: each user's latest `rows_per_user` events; the earlier ones are history only."""
    s = cfg.synthetic
    rng = np.random.default_rng(cfg.seed)
    k = 8
    taste = rng.normal(size=(s.users, k))
    traits = rng.normal(size=(s.rows, k))
    n = s.users * s.events_per_user
    users = np.repeat(np.arange(s.users), s.events_per_user)
    items = (rng.zipf(s.zipf_alpha, size=n) - 1) % s.rows
    affinity = (taste[users] * traits[items]).sum(1) / np.sqrt(k)
    rating = np.clip(np.round(3 + 1.2 * affinity + rng.normal(0, 0.7, n)), 1, 5)
    gaps = rng.exponential(3 * 3600, size=(s.users, s.events_per_user)).astype(np.int64) + 1
    times = (1_600_000_000 + np.cumsum(gaps, axis=1)).reshape(-1)
    df = pd.DataFrame({"user_id": users.astype(str), "item_id": items.astype(str), "rating": rating, "timestamp": times})
    keep = np.tile(np.arange(s.events_per_user) >= s.events_per_user - s.rows_per_user, s.users)
    return df, keep


def synthetic_features(cfg: DataConfig) -> DataConfig:
    """The generator's columns as features, unless the config declares its own."""
    if cfg.sparse:
        return cfg
    s = cfg.synthetic
    out = typed(DataConfig, cfg)
    out.sparse = [
        SparseFeature(name=f"cat_{t}", hash_buckets=s.rows, multi=s.pooling_factor > 1) for t in range(s.num_tables)
    ]
    out.dense = [DenseFeature(name=f"int_{j}") for j in range(s.num_dense)]
    return out


# -------------------------------------------------------------------------------------------- features


@dataclass
class FeatureSet:
    """Model-ready arrays for every row, plus the spec that featurizes a request the same way."""

    dense: np.ndarray  # [N, len(spec.dense_inputs())] float32, standardised
    sparse: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (rows int64, lengths int32)
    labels: np.ndarray  # [N] float32, or [N, T] for T tasks (spec.tasks)
    train_idx: np.ndarray
    holdout_idx: np.ndarray
    users: np.ndarray | None  # [N] user keys (for split checks and serving examples)
    times: np.ndarray | None  # [N] int64 seconds
    spec: FeatureSpec
    item_store: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Raw item-side values by item id (the latest row of each item), so a request may send only ids."""
    managed: ManagedIds | None = None
    """The remap of the managed tables (their features hold ids until take); None without such tables."""

    def __post_init__(self) -> None:
        if self.managed is None and any(t.managed for t in self.spec.tables.values()):
            self.managed = ManagedIds(self.spec)

    @property
    def sparse_names(self) -> list[str]:
        return list(self.sparse)

    def take(self, idx: np.ndarray, train: bool = False) -> Batch:
        """Rows `idx` as a TorchRec Batch (dense, KeyedJaggedTensor, labels). Managed tables' ids become
        rows by the remap (`managed`); `train`: a training batch, whose ids the remap profiles first."""
        lengths, values = [], []
        for name in self.sparse:
            v, ln = self.sparse[name]
            offsets = self.offsets(name)
            sel_len = ln[idx]
            starts = offsets[idx]
            total = int(sel_len.sum())
            pos = np.repeat(starts - np.concatenate([[0], np.cumsum(sel_len)[:-1]]), sel_len) + np.arange(total)
            lengths.append(sel_len)
            values.append(v[pos])
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=self.sparse_names,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
        )
        if self.managed is not None:
            kjt = self.managed.remap(kjt, train)
        return Batch(
            dense_features=torch.from_numpy(self.dense[idx]),
            sparse_features=kjt,
            labels=torch.from_numpy(self.labels[idx]),
        )

    def offsets(self, name: str) -> np.ndarray:
        """Where each row's values of a jagged feature start."""
        cache = self.__dict__.setdefault("_offset_cache", {})
        if name not in cache:
            ln = self.sparse[name][1]
            cache[name] = np.concatenate([[0], np.cumsum(ln)[:-1]]).astype(np.int64)
        return cache[name]

    def row_values(self, row: int, name: str) -> np.ndarray:
        """One row's values of a (jagged) feature (a managed table's as rows, remapped as take does)."""
        values, lengths = self.sparse[name]
        start = self.offsets(name)[row]
        out = values[start : start + lengths[row]]
        table = self.managed.table_of.get(name) if self.managed is not None else None
        if table is not None:
            assert self.managed is not None
            out = self.managed.rows(table, torch.from_numpy(out)).numpy()
        return out


def _column(f: SparseFeature | DenseFeature) -> str:
    return f.column or f.name


def user_keys(df: pd.DataFrame, cfg: DataConfig) -> np.ndarray:
    """Each row's user key; a row whose user is missing is a user of its own (no history, no holdout)."""
    column = cfg.user_column
    assert column
    na, where = frozenset(cfg.na_values), f"data.user_column={column!r}"
    codes, uniques = pd.factorize(df[column], use_na_sentinel=True)
    keys = np.array([None if is_missing(u, na) else key_of(u, where) for u in uniques], dtype=object)
    out = keys[np.maximum(codes, 0)] if len(keys) else np.full(len(df), None, dtype=object)
    for i in np.flatnonzero((codes < 0) | (out == None)):  # noqa: E711 - an element-wise test for None
        out[i] = f"\x00row{i}"
    return out


def _labels(df: pd.DataFrame, cfg: DataConfig) -> np.ndarray:
    if cfg.label not in df.columns:
        raise ValueError(f"data.label={cfg.label!r} is not a column; columns: {list(df.columns)[:20]}")
    return labels(df[cfg.label], cfg.label, cfg.label_threshold, cfg.label_positive, frozenset(cfg.na_values))


def task_labels(df: pd.DataFrame, cfg: DataConfig) -> np.ndarray:
    """The model's labels: [N] for one task (data.label), [N, T] for `data.labels`' T tasks."""
    if not cfg.labels:
        return _labels(df, cfg)
    check_task_names([t.name for t in cfg.labels])
    out = []
    for t in cfg.labels:
        column = t.column or cfg.label
        if column not in df.columns:
            raise ValueError(f"data.labels[{t.name}].column={column!r} is not a column; columns: {list(df.columns)[:20]}")
        out.append(labels(df[column], column, t.threshold, t.positive, frozenset(cfg.na_values)))
    return np.stack(out, axis=1)


def _times(df: pd.DataFrame, cfg: DataConfig) -> np.ndarray:
    assert cfg.time_column
    if cfg.time_column not in df.columns:
        raise ValueError(f"data.time_column={cfg.time_column!r} is not a column; columns: {list(df.columns)[:20]}")
    return timestamps(df[cfg.time_column], cfg.time_column, frozenset(cfg.na_values))


def add_history(df: pd.DataFrame, cfg: DataConfig, keep: np.ndarray | None = None) -> pd.DataFrame:
    """Each row's most recent items of the same user with strictly earlier timestamps (no leakage), as a
    list of item keys; with `actions_name` / `times_name`, also those events' label values and timestamps,
    in step. Events whose item is missing are left out. With `keep`, only those rows are returned (the
    others still count as history)."""
    h = cfg.history
    if h.length <= 0 or h.name in df.columns:
        return df if keep is None else df[keep].reset_index(drop=True)
    if not (cfg.user_column and cfg.time_column and cfg.item_column):
        raise ValueError("data.history.length > 0 needs data.user_column, data.time_column and data.item_column")
    df = df.assign(_user=user_keys(df, cfg), _time=_times(df, cfg))
    if keep is not None:
        df = df.assign(_keep=keep)
    df = df.sort_values(["_user", "_time"], kind="stable").reset_index(drop=True)
    kept = df.pop("_keep").to_numpy() if keep is not None else np.ones(len(df), dtype=bool)
    user_col, times_all = df.pop("_user").to_numpy(), df.pop("_time").to_numpy()
    liked_all = _labels(df, cfg) > 0
    na = frozenset(cfg.na_values)
    where = f"data.item_column={cfg.item_column!r}"
    items_all = np.array([None if is_missing(v, na) else key_of(v, where) for v in df[cfg.item_column].tolist()], dtype=object)
    actions_all = None
    if h.actions_name:
        raw = pd.to_numeric(df[cfg.label], errors="coerce").to_numpy()
        actions_all = np.array([f"{v:g}" for v in raw], dtype=object)
    names = [n for n in (h.name, h.positive_name, h.actions_name, h.times_name) if n]
    columns: dict[str, list[list[Any]]] = {n: [[] for _ in range(len(df))] for n in names}
    step = 1 if h.chronological else -1
    for rows in pd.Series(np.arange(len(df))).groupby(user_col, sort=False).indices.values():
        times = times_all[rows]
        # rows are time-sorted: events before index `first` of a timestamp are strictly earlier.
        first = np.searchsorted(times, times, side="left")
        present = np.flatnonzero(np.array([i is not None for i in items_all[rows]], bool))  # events with an item
        before = np.searchsorted(present, first)  # how many of them are strictly earlier than each row
        seqs = {h.name: items_all[rows][present].tolist()}
        if h.actions_name and actions_all is not None:
            seqs[h.actions_name] = actions_all[rows][present].tolist()
        if h.times_name:
            seqs[h.times_name] = times[present].tolist()
        good = present[liked_all[rows][present]]
        liked_items, liked_before = items_all[rows][good].tolist(), np.searchsorted(good, first)
        for k, r in enumerate(rows):
            if not kept[r]:
                continue
            c = int(before[k])
            for name, seq in seqs.items():
                columns[name][r] = seq[max(0, c - h.length) : c][::step]
            if h.positive_name:
                c = int(liked_before[k])
                columns[h.positive_name][r] = liked_items[max(0, c - h.length) : c][::step]
    for name, col in columns.items():
        df[name] = pd.Series(col, index=df.index, dtype=object)
    return df if keep is None else df[kept].reset_index(drop=True)


def split_by_user_time(df: pd.DataFrame, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per user, the latest `holdout_fraction` of events is holdout; ties at the boundary stay in training,
    so every holdout timestamp of a user is later than all of that user's training timestamps."""
    if not (cfg.user_column and cfg.time_column):
        rng = np.random.default_rng(cfg.seed)
        perm = rng.permutation(len(df))
        k = int(round(len(df) * (1 - cfg.holdout_fraction)))
        return np.sort(perm[:k]), np.sort(perm[k:])
    is_hold = latest_share(user_keys(df, cfg), _times(df, cfg), cfg.holdout_fraction)
    return np.flatnonzero(~is_hold), np.flatnonzero(is_hold)


def latest_share(users: np.ndarray, times: np.ndarray, fraction: float) -> np.ndarray:
    """A mask of each user's latest `fraction` of rows by time; ties at the boundary stay out of it."""
    latest = np.zeros(len(users), dtype=bool)
    for rows in pd.Series(np.arange(len(users))).groupby(users, sort=False).indices.values():
        t = np.sort(times[rows])
        n_before = len(t) - int(np.ceil(fraction * len(t)))
        if n_before <= 0:
            continue
        latest[rows] = times[rows] > t[n_before - 1]
    return latest


def validation_split(fs: FeatureSet, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training rows split into (fit, validation), never touching the holdout: per user and by time
    where the data has them (as the holdout is carved), else a random share."""
    train = fs.train_idx
    if fs.users is not None and fs.times is not None:
        valid = latest_share(fs.users[train], fs.times[train], fraction)
    else:
        valid = np.zeros(len(train), dtype=bool)
        valid[np.random.default_rng(seed).permutation(len(train))[: int(round(len(train) * fraction))]] = True
    if not valid.any() or valid.all():
        raise ValueError(f"train.validation_fraction={fraction} leaves {int(valid.sum())} of {len(train)} training "
                         "rows for validation: early stopping needs some rows on each side")
    return train[~valid], train[valid]


def learn_spec(df: pd.DataFrame, cfg: DataConfig, train_idx: np.ndarray, collisions: dict[str, TableConfig] | None = None
               ) -> FeatureSpec:
    """The feature spec from the training rows: each table's vocabulary (or hashing, or managed rows by
    `collisions`, model.tables), each dense feature's mean and std. Features naming the same table share one
    vocabulary built from all of their values."""
    if not cfg.sparse:
        raise ValueError("data.sparse is empty: declare at least one sparse feature")
    collisions = collisions or {}
    declared: list[SparseFeature | DenseFeature] = [*cfg.sparse, *cfg.dense]
    for f in declared:
        if _column(f) not in df.columns:
            raise ValueError(f"data feature {f.name!r}: column {_column(f)!r} not in the data; columns: {list(df.columns)[:30]}")
    na = frozenset(cfg.na_values)
    train = df.iloc[train_idx]
    tables: dict[str, TableSpec] = {}
    groups: dict[str, list[SparseFeature]] = {}
    for f in cfg.sparse:
        if not f.raw:
            groups.setdefault(f.table or f.name, []).append(f)
    for table, feats in groups.items():
        first = feats[0]  # a shared table takes its first feature's pooling and hashing
        counts: dict[str, int] = {}
        missing = 0
        for f in feats:
            where = f"data.sparse[{f.name}] (column {_column(f)!r})"
            n_missing = count_keys(train[_column(f)], f.multi, f.sep, na, where, counts)
            missing += 0 if f.multi else n_missing  # a missing bag is empty: it takes no row
        c = collisions.get(table)
        if c is not None and c.collision == Collision.managed:
            tables[table] = managed_table(c.size, first.pooling, missing > 0, str(c.eviction), c.eviction_interval)
        elif c is not None and c.size:
            tables[table] = hashed_table(c.size, first.pooling, missing > 0)
        elif first.hash_buckets:
            tables[table] = hashed_table(first.hash_buckets, first.pooling, missing > 0)
        else:
            tables[table] = vocabulary_table(counts, first.min_count, first.pooling, missing > 0)
    numbers = Featurizer(FeatureSpec(sparse=[], na_values=list(cfg.na_values))).numbers
    dense, buckets = [], []
    for d in cfg.dense:
        try:
            x = numbers(train[_column(d)], f"data.dense[{d.name}] (column {_column(d)!r})")
        except FeatureError as e:
            raise ValueError(f"{e}; declare it under data.sparse if it is categorical") from None
        dense.append(dense_stats(d.name, d.column, d.side, d.log1p, x, d.missing_indicator))
        if d.buckets:
            buckets.append(bucketized(d, x, tables))
    h = cfg.history
    return FeatureSpec(
        sparse=[*(SparseFeatureSpec(name=f.name, column=f.column, table=None if f.raw else f.table or f.name, multi=f.multi,
                                    sep=f.sep, side=f.side, raw=f.raw)  # type: ignore[arg-type]
                  for f in cfg.sparse), *buckets],
        dense=dense, tables=tables, item_column=cfg.item_column, user_column=cfg.user_column,
        history=HistorySpec(name=h.name, positive_name=h.positive_name, length=h.length, actions_name=h.actions_name,
                            times_name=h.times_name, chronological=h.chronological),
        na_values=list(cfg.na_values), tasks=[t.name for t in cfg.labels],
    )


def bucketized(d: DenseFeature, x: np.ndarray, tables: dict[str, TableSpec]) -> SparseFeatureSpec:
    """The lookup of a dense feature with `buckets`: its table of quantile buckets (edges from the training
    values `x`) added to `tables`, and the sparse feature `<name>_bucket` that reads the dense field."""
    name = f"{d.name}_bucket"
    if d.buckets < 2:
        raise ValueError(f"data.dense[{d.name}].buckets={d.buckets}: use at least 2 buckets (0: none)")
    if name in tables:
        raise ValueError(f"data.dense[{d.name}].buckets: the table {name!r} it needs is already declared under data.sparse")
    tables[name] = bucket_table(x, d.buckets)
    return SparseFeatureSpec(name=name, column=d.column or d.name, table=name, side=d.side, bucketizes=d.name)  # type: ignore[arg-type]


def featurize_frame(df: pd.DataFrame, spec: FeatureSpec) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Every row of a raw frame through the contract: (dense input, {feature: (rows, lengths)}); a managed
    table's keys as their ids, which FeatureSet.take remaps."""
    fz = Featurizer(spec, ids=True)
    sparse = {}
    for f in spec.sparse:
        try:
            sparse[f.name] = fz.sparse_column(f, df[f.source], f"data.sparse[{f.name}] (column {f.source!r})")
        except FeatureError as e:
            raise ValueError(str(e)) from None
    try:
        dense = fz.dense_matrix({d.name: df[d.source] for d in spec.dense}, len(df), "data.dense.")
    except FeatureError as e:
        raise ValueError(f"{e}; declare it under data.sparse if it is categorical") from None
    return dense, sparse


def featurize(df: pd.DataFrame, cfg: DataConfig, collisions: dict[str, TableConfig] | None = None) -> FeatureSet:
    """Frame (with history columns, see load_frame) → FeatureSet. Vocabularies and normalisation
    statistics come from training rows only; `collisions` (model.tables) may hash or manage tables."""
    train_idx, holdout_idx = split_by_user_time(df, cfg)
    spec = learn_spec(df, cfg, train_idx, collisions)
    dense, sparse = featurize_frame(df, spec)
    return FeatureSet(
        dense=dense,
        sparse=sparse,
        labels=task_labels(df, cfg),
        train_idx=train_idx,
        holdout_idx=holdout_idx,
        users=user_keys(df, cfg).astype(str) if cfg.user_column else None,
        times=_times(df, cfg) if cfg.time_column else None,
        spec=spec,
        item_store=_item_store(df, cfg),
    )


def _item_store(df: pd.DataFrame, cfg: DataConfig) -> dict[str, dict[str, Any]]:
    """Raw item-side feature values by item key (the item's latest row), so a request may send only ids."""
    if not cfg.item_column:
        return {}
    declared: list[SparseFeature | DenseFeature] = [*cfg.sparse, *cfg.dense]
    cols = {f.name: _column(f) for f in declared if f.side == "item"}
    if not cols:
        return {}
    na, key, where = frozenset(cfg.na_values), cfg.item_column, f"data.item_column={cfg.item_column!r}"
    out: dict[str, dict[str, Any]] = {}
    ids = pd.Series([None if is_missing(v, na) else key_of(v, where) for v in df[key].tolist()], index=df.index, dtype=object)
    latest = df.loc[ids.notna() & ~ids.duplicated(keep="last")]  # the item's latest row
    for item, rec in zip(ids[latest.index], latest[list(dict.fromkeys(cols.values()))].to_dict("records"), strict=True):
        out[item] = {name: _jsonable(rec[col], na) for name, col in cols.items()}
    return out


def _jsonable(v: Any, na: frozenset[str]) -> Any:
    if isinstance(v, list | tuple | np.ndarray):
        return [_jsonable(x, na) for x in v]
    if is_missing(v, na):
        return None
    if isinstance(v, np.generic):
        return v.item()
    return v


# ------------------------------------------------------------------------------------------ entry point


def check_collisions(cfg: DataConfig, collisions: dict[str, Any]) -> dict[str, TableConfig]:
    """model.tables typed and checked against data.sparse's tables; returns the entries that change a table."""
    from omegaconf.errors import OmegaConfBaseException

    names = sorted({f.table or f.name for f in cfg.sparse if not f.raw})
    out = {}
    for name, given in collisions.items():
        where = f"model.tables.{name}"
        try:
            c = typed(TableConfig, given)
        except OmegaConfBaseException as e:
            raise ValueError(f"{where}: {str(e).splitlines()[0]} (fields: collision, size, eviction, eviction_interval)") from None
        if c.collision == Collision.managed and cfg.source == DataSource.criteo:
            raise ValueError(f"{where}.collision=managed: remaps in-memory sources (movielens, tabular, synthetic); "
                             "data.source=criteo streams ids the remap does not see: use collision=hash")
        if cfg.source == DataSource.criteo and c.size:
            raise ValueError(f"{where}.size: data.source=criteo sizes its tables by data.stream.hash_buckets")
        if name not in names:
            raise ValueError(f"{where}: no such table; data.sparse's tables are {names}")
        if c.size < 0 or c.eviction_interval < 1:
            raise ValueError(f"{where}: size({c.size}) >= 0 and eviction_interval({c.eviction_interval}) >= 1")
        if c.collision == Collision.managed and c.size < 2:
            raise ValueError(f"{where}.size({c.size}): collision=managed needs the table's rows (>= 2)")
        if c.collision == Collision.managed or c.size:
            out[name] = c
    return out


def data_fingerprint(cfg: DataConfig, collisions: dict[str, TableConfig] | None = None) -> str:
    from omegaconf import OmegaConf

    blob = json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=False), sort_keys=True, default=str)
    if collisions:  # only when set, so the caches of configs without model.tables stay theirs
        blob += json.dumps({n: to_plain(c) for n, c in sorted(collisions.items())}, sort_keys=True)
    blob += f"format={FEATURE_FORMAT}"
    if cfg.source == DataSource.tabular and cfg.path and Path(cfg.path).exists():
        blob += hashlib.sha256(Path(cfg.path).read_bytes()).hexdigest()
    if cfg.source == DataSource.criteo:  # terabytes are not hashed: names, sizes and modification times stand for them
        from adsfm.training.stream import resolve

        for field_name in ("paths", "holdout_paths"):
            for f in resolve(list(getattr(cfg.stream, field_name)), f"stream.{field_name}"):
                st = f.stat()
                blob += f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_FRAMES: dict[str, tuple[pd.DataFrame, DataConfig]] = {}


def load_frame(cfg: DataConfig) -> tuple[pd.DataFrame, DataConfig]:
    """The source's raw frame, with history columns, in FeatureSet row order; and the effective config.
    Kept for the process (the last one asked for): export and the gate read the same frame; do not modify it."""
    key = data_fingerprint(cfg)
    if key not in _FRAMES:
        _FRAMES.clear()
        _FRAMES[key] = _build_frame(cfg)
    return _FRAMES[key]


def _build_frame(cfg: DataConfig) -> tuple[pd.DataFrame, DataConfig]:
    cache = Path(cfg.cache_dir).expanduser()
    if cfg.source == DataSource.movielens:
        df = load_movielens_frame(cache)
    elif cfg.source == DataSource.tabular:
        if not cfg.path:
            raise ValueError("data.source=tabular needs data.path (a CSV or parquet file)")
        df = load_tabular_frame(cfg.path, cfg)
    elif cfg.source == DataSource.synthetic and cfg.synthetic.events_per_user > 0:
        df, keep = synthetic_events(cfg)
        return add_history(df, cfg, keep), cfg
    elif cfg.source == DataSource.synthetic:
        df = synthetic_frame(cfg)
        cfg = synthetic_features(cfg)
    else:  # criteo: training rows are streamed by the workers; the frame is the holdout sample
        from adsfm.training.stream import criteo_data_config, criteo_holdout_frame

        return criteo_holdout_frame(cfg), criteo_data_config(cfg)
    return add_history(df, cfg), cfg


def load_features(cfg: DataConfig, collisions: dict[str, Any] | None = None) -> FeatureSet:
    """Build (or load from the cache) the FeatureSet for this data config, its tables hashed or managed as
    `collisions` (model.tables) says."""
    cache = Path(cfg.cache_dir).expanduser()
    collisions = check_collisions(cfg, collisions or {})
    key = data_fingerprint(cfg, collisions)
    path = cache / "features" / f"{cfg.source}-{key}"
    if (path / "done").exists():
        return _load_cached(path)
    if cfg.source == DataSource.criteo:
        from adsfm.training.stream import criteo_features

        fs = criteo_features(cfg)
    else:
        df, cfg = load_frame(cfg)
        fs = featurize(df, cfg, collisions)
    fs.spec.fingerprint = key
    _save_cached(fs, path)
    return fs


def example_request(df: pd.DataFrame, spec: FeatureSpec, row: int, candidates: list[str]) -> dict[str, Any]:
    """A ranking request for the user and moment of `row` (raw values, as a service would send them: lists
    for multi-valued features; missing values left out)."""
    na = frozenset(spec.na_values)
    user: dict[str, Any] = {}
    features: list[SparseFeatureSpec | DenseFeatureSpec] = [*spec.sparse, *spec.dense]
    for f in features:
        if f.side == "user":
            v = df[f.source].iloc[row]
            if isinstance(f, SparseFeatureSpec) and f.multi and isinstance(v, str):
                v = [t for t in v.split(f.sep) if t]
            if not isinstance(v, list) and is_missing(v, na):
                continue
            user[f.name] = _jsonable(v, na)
    key = spec.item_column
    return {"user": user, "candidates": [{key: c} for c in candidates]}


def _save_cached(fs: FeatureSet, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{np.random.randint(1 << 30)}")
    tmp.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "dense": fs.dense, "labels": fs.labels, "train_idx": fs.train_idx, "holdout_idx": fs.holdout_idx,
    }
    if fs.users is not None:
        arrays["users"] = fs.users.astype(str)
    if fs.times is not None:
        arrays["times"] = fs.times
    for name, (v, ln) in fs.sparse.items():
        arrays[f"sv__{name}"] = v
        arrays[f"sl__{name}"] = ln
    np.savez(tmp / "arrays.npz", **arrays)  # type: ignore[arg-type]
    (tmp / "spec.json").write_text(fs.spec.model_dump_json())
    (tmp / "item_store.json").write_text(json.dumps(fs.item_store))
    (tmp / "done").write_text("")
    try:
        tmp.rename(path)  # atomic: a concurrent builder (another worker) either wins or finds it done
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(path: Path) -> FeatureSet:
    spec = FeatureSpec.model_validate_json((path / "spec.json").read_text())
    z = np.load(path / "arrays.npz", allow_pickle=False)
    return FeatureSet(
        dense=z["dense"],
        sparse={f.name: (z[f"sv__{f.name}"], z[f"sl__{f.name}"]) for f in spec.sparse},
        labels=z["labels"],
        train_idx=z["train_idx"],
        holdout_idx=z["holdout_idx"],
        users=z.get("users", None),
        times=z.get("times", None),
        spec=spec,
        item_store=json.loads((path / "item_store.json").read_text()),
    )


def iter_batches(idx: np.ndarray, batch_size: int, rank: int, world: int, seed: int | None) -> Iterator[np.ndarray]:
    """Global batches of `batch_size` rows (shuffled when seed is given), each cut into `world` equal slices;
    yields this rank's slice. Every rank sees the same number of steps; the ragged tail is dropped."""
    if batch_size % world:
        raise ValueError(f"train.batch_size({batch_size}) % workers({world}) != 0: use a multiple of {world}")
    order = np.random.default_rng(seed).permutation(idx) if seed is not None else idx
    local = batch_size // world
    for start in range(0, len(order) - batch_size + 1, batch_size):
        yield order[start + rank * local : start + (rank + 1) * local]
