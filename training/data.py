"""Datasets → feature arrays → TorchRec batches.

A source (MovieLens-100k, any CSV/parquet file, or a synthetic Zipf generator) yields one pandas frame; the
featurizer turns it into a `FeatureSet`: standardised dense columns, jagged sparse columns as (values,
lengths) over table rows (row 0 of every table is the out-of-vocabulary row), labels, and a per-user time
split. Vocabularies and normalisation come from the training rows only, and are what the export manifest
carries to serving.
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

from export.manifest import stable_hash
from training.config import DataConfig, DenseFeature, SparseFeature

MOVIELENS_WHEEL = "recbole==1.2.1"
MOVIELENS_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
FEATURE_FORMAT = 3  # bump when featurize() changes what it writes, so stale caches are rebuilt


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


def load_tabular_frame(path: str) -> pd.DataFrame:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data.path={path!r} does not exist; point it at a CSV or parquet file")
    if p.suffix in (".parquet", ".pq"):
        return pd.read_parquet(p)
    return pd.read_csv(p, sep=None, engine="python", keep_default_na=False)


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
    from omegaconf import OmegaConf

    s = cfg.synthetic
    out: DataConfig = OmegaConf.merge(OmegaConf.structured(DataConfig), cfg)  # type: ignore[assignment]
    out.sparse = [
        SparseFeature(name=f"cat_{t}", hash_buckets=s.rows, multi=s.pooling_factor > 1) for t in range(s.num_tables)
    ]
    out.dense = [DenseFeature(name=f"int_{j}") for j in range(s.num_dense)]
    return out


# -------------------------------------------------------------------------------------------- features


@dataclass
class Vocab:
    """Raw value → table row. Row 0 is reserved for values never seen in training (and for hashing misses)."""

    hash_buckets: int = 0
    tokens: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return (self.hash_buckets or len(self.tokens)) + 1

    def lookup(self, values: list[str]) -> np.ndarray:
        if self.hash_buckets:
            return np.array([stable_hash(v, self.hash_buckets) + 1 for v in values], dtype=np.int64)
        index = {t: i + 1 for i, t in enumerate(self.tokens)}
        return np.array([index.get(v, 0) for v in values], dtype=np.int64)


@dataclass
class FeatureSet:
    """Model-ready arrays for every row, plus what is needed to featurize a request the same way."""

    dense: np.ndarray  # [N, n_dense] float32, standardised
    sparse: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (values int64, lengths int32)
    labels: np.ndarray  # [N] float32
    train_idx: np.ndarray
    holdout_idx: np.ndarray
    users: np.ndarray | None  # [N] raw user ids (for split checks and serving examples)
    times: np.ndarray | None
    spec: dict[str, Any]  # JSON-able: features, tables, vocabularies, normalisation, item store

    @property
    def sparse_names(self) -> list[str]:
        return list(self.sparse)

    def take(self, idx: np.ndarray) -> Batch:
        """Rows `idx` as a TorchRec Batch (dense, KeyedJaggedTensor, labels)."""
        lengths, values = [], []
        for name in self.sparse:
            v, ln = self.sparse[name]
            offsets = self._offsets(name)
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
        return Batch(
            dense_features=torch.from_numpy(self.dense[idx]),
            sparse_features=kjt,
            labels=torch.from_numpy(self.labels[idx]),
        )

    def _offsets(self, name: str) -> np.ndarray:
        cache = self.__dict__.setdefault("_offset_cache", {})
        if name not in cache:
            ln = self.sparse[name][1]
            cache[name] = np.concatenate([[0], np.cumsum(ln)[:-1]]).astype(np.int64)
        return cache[name]


def _column(f: SparseFeature | DenseFeature) -> str:
    return f.column or f.name


def add_history(df: pd.DataFrame, cfg: DataConfig, keep: np.ndarray | None = None) -> pd.DataFrame:
    """Each row's most recent items of the same user with strictly earlier timestamps (no leakage); with
    `actions_name` / `times_name`, also those events' label values and timestamps, in step. With `keep`,
    only those rows are returned (the others still count as history)."""
    h = cfg.history
    if h.length <= 0 or h.name in df.columns:
        return df if keep is None else df[keep].reset_index(drop=True)
    if not (cfg.user_column and cfg.time_column and cfg.item_column):
        raise ValueError("data.history.length > 0 needs data.user_column, data.time_column and data.item_column")
    if keep is not None:
        df = df.assign(_keep=keep)
    df = df.sort_values([cfg.user_column, cfg.time_column], kind="stable").reset_index(drop=True)
    kept = df.pop("_keep").to_numpy() if keep is not None else np.ones(len(df), dtype=bool)
    labels = _labels(df, cfg)
    raw_labels = pd.to_numeric(df[cfg.label]).to_numpy()
    actions_all = np.array([f"{v:g}" for v in raw_labels]) if h.actions_name else None
    times_all = df[cfg.time_column].to_numpy()
    items_all = df[cfg.item_column].to_numpy().astype(str)
    columns: dict[str, list[str]] = {n: [""] * len(df) for n in (h.name, h.positive_name, h.actions_name, h.times_name) if n}
    order = slice(None) if h.chronological else slice(None, None, -1)
    for _, rows in df.groupby(cfg.user_column, sort=False).indices.items():
        times = times_all[rows]
        items = items_all[rows]
        liked = labels[rows] > 0
        stamps = times.astype(np.int64).astype(str)
        acts = actions_all[rows] if actions_all is not None else None
        # rows are time-sorted: events before index `first` of a timestamp are strictly earlier.
        first = np.searchsorted(times, times, side="left")
        for k, r in enumerate(rows):
            if not kept[r]:
                continue
            lo, hi = max(0, first[k] - h.length), first[k]
            columns[h.name][r] = "|".join(items[lo:hi][order])
            if h.positive_name:
                earlier_liked = items[:hi][liked[:hi]]
                columns[h.positive_name][r] = "|".join(earlier_liked[-h.length :][order])
            if acts is not None and h.actions_name:
                columns[h.actions_name][r] = "|".join(acts[lo:hi][order])
            if h.times_name:
                columns[h.times_name][r] = "|".join(stamps[lo:hi][order])
    for name, col in columns.items():
        df[name] = col
    return df if keep is None else df[kept].reset_index(drop=True)


def _labels(df: pd.DataFrame, cfg: DataConfig) -> np.ndarray:
    if cfg.label not in df.columns:
        raise ValueError(f"data.label={cfg.label!r} is not a column; columns: {list(df.columns)[:20]}")
    col = pd.to_numeric(df[cfg.label], errors="coerce")
    if col.isna().any():
        raise ValueError(f"data.label={cfg.label!r} has non-numeric values")
    if cfg.label_threshold is not None:
        return (col.to_numpy() >= cfg.label_threshold).astype(np.float32)
    return col.to_numpy().astype(np.float32)


def split_by_user_time(df: pd.DataFrame, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per user, the latest `holdout_fraction` of events is holdout; ties at the boundary stay in training,
    so every holdout timestamp of a user is later than all of that user's training timestamps."""
    if not (cfg.user_column and cfg.time_column):
        rng = np.random.default_rng(cfg.seed)
        perm = rng.permutation(len(df))
        k = int(round(len(df) * (1 - cfg.holdout_fraction)))
        return np.sort(perm[:k]), np.sort(perm[k:])
    is_hold = np.zeros(len(df), dtype=bool)
    times_all = df[cfg.time_column].to_numpy()
    for _, rows in df.groupby(cfg.user_column, sort=False).indices.items():
        t = np.sort(times_all[rows])
        n_train = len(t) - int(np.ceil(cfg.holdout_fraction * len(t)))
        if n_train <= 0:
            continue
        is_hold[rows] = times_all[rows] > t[n_train - 1]
    return np.flatnonzero(~is_hold), np.flatnonzero(is_hold)


def _split_values(series: pd.Series, f: SparseFeature) -> list[list[str]]:
    raw = series.astype(str).tolist()
    if not f.multi:
        return [[v] for v in raw]
    return [[t for t in v.split(f.sep) if t] for v in raw]


def featurize(df: pd.DataFrame, cfg: DataConfig) -> FeatureSet:
    """Frame (with history columns, see load_frame) → FeatureSet. Vocabularies and normalisation
    statistics come from training rows only."""
    if not cfg.sparse:
        raise ValueError("data.sparse is empty: declare at least one sparse feature")
    all_features: list[SparseFeature | DenseFeature] = [*cfg.sparse, *cfg.dense]
    for f in all_features:
        if _column(f) not in df.columns:
            raise ValueError(f"data feature {f.name!r}: column {_column(f)!r} not in the data; columns: {list(df.columns)[:30]}")
        if f.side not in ("user", "item"):
            raise ValueError(f"data feature {f.name!r}: side={f.side!r}, use 'user' or 'item'")
    labels = _labels(df, cfg)
    train_idx, holdout_idx = split_by_user_time(df, cfg)

    # Tables: features naming the same table share a vocabulary built from all of their training values.
    tables: dict[str, list[SparseFeature]] = {}
    for f in cfg.sparse:
        if not f.raw:
            tables.setdefault(f.table or f.name, []).append(f)
    split_cache = {f.name: _split_values(df[_column(f)], f) for f in cfg.sparse}
    vocabs: dict[str, Vocab] = {}
    for table, feats in tables.items():
        first = feats[0]
        if first.hash_buckets:
            vocabs[table] = Vocab(hash_buckets=first.hash_buckets)
            continue
        counts: dict[str, int] = {}
        for f in feats:
            vals = split_cache[f.name]
            for i in train_idx:
                for v in vals[i]:
                    counts[v] = counts.get(v, 0) + 1
        tokens = sorted(t for t, c in counts.items() if c >= first.min_count)
        vocabs[table] = Vocab(tokens=tokens)

    sparse: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for f in cfg.sparse:
        vals = split_cache[f.name]
        lengths = np.array([len(v) for v in vals], dtype=np.int32)
        flat = [t for v in vals for t in v]
        sparse[f.name] = (raw_values(flat, f.name) if f.raw else vocabs[f.table or f.name].lookup(flat), lengths)

    dense_cols, dense_stats = [], []
    for d in cfg.dense:
        x = pd.to_numeric(df[_column(d)], errors="coerce").to_numpy(dtype=np.float64)
        stat = dense_stat(d, x[train_idx])
        x = np.log1p(np.maximum(x, 0)) if d.log1p else x
        dense_cols.append(np.nan_to_num((x - stat["mean"]) / stat["std"], nan=0.0))
        dense_stats.append(stat)
    dense = np.stack(dense_cols, axis=1).astype(np.float32) if dense_cols else np.zeros((len(df), 0), np.float32)
    spec = feature_spec(cfg, dense_stats, vocabs, _item_store(df, cfg))
    return FeatureSet(
        dense=dense,
        sparse=sparse,
        labels=labels,
        train_idx=train_idx,
        holdout_idx=holdout_idx,
        users=df[cfg.user_column].to_numpy() if cfg.user_column else None,
        times=df[cfg.time_column].to_numpy() if cfg.time_column else None,
        spec=spec,
    )


def raw_values(tokens: list[str], name: str) -> np.ndarray:
    """A raw feature's integer values (timestamps), with the feature named if one is not an integer."""
    try:
        return np.array([int(float(t)) for t in tokens], dtype=np.int64)
    except ValueError as e:
        raise ValueError(f"feature {name!r} is raw (integers used as they are) but has a non-integer value: {e}") from e


def dense_stat(d: DenseFeature, x: np.ndarray) -> dict[str, Any]:
    """A dense feature's spec entry: its transform and the mean and std of raw values `x` after it
    (missing values ignored; a column with none present standardises to itself)."""
    if d.log1p:
        x = np.log1p(np.maximum(x, 0))
    present = np.isfinite(x).any()
    mean = float(np.nanmean(x)) if present else 0.0
    std = (float(np.nanstd(x)) if present else 1.0) or 1.0
    return {"name": d.name, "column": _column(d), "side": d.side, "log1p": d.log1p, "mean": mean, "std": std}


def feature_spec(cfg: DataConfig, dense_stats: list[dict[str, Any]], vocabs: dict[str, Vocab],
                 item_store: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON-able spec that the model, the export manifest and serving read: features, tables,
    vocabularies and normalisation."""
    first: dict[str, SparseFeature] = {}
    for f in cfg.sparse:
        if not f.raw:
            first.setdefault(f.table or f.name, f)  # a shared table takes its first feature's pooling
    return {
        "sparse": [
            {"name": f.name, "column": _column(f), "table": None if f.raw else f.table or f.name, "multi": f.multi,
             "sep": f.sep, "side": f.side, "raw": f.raw}
            for f in cfg.sparse
        ],
        "dense": dense_stats,
        "tables": {
            t: {"rows": vocabs[t].rows, "pooling": f.pooling, "hash_buckets": vocabs[t].hash_buckets, "vocab": vocabs[t].tokens}
            for t, f in first.items()
        },
        "item_column": cfg.item_column,
        "user_column": cfg.user_column,
        "history": {"name": cfg.history.name, "positive_name": cfg.history.positive_name, "length": cfg.history.length,
                    "actions_name": cfg.history.actions_name, "times_name": cfg.history.times_name,
                    "chronological": cfg.history.chronological},
        "item_store": item_store,
    }


def _item_store(df: pd.DataFrame, cfg: DataConfig) -> dict[str, dict[str, Any]]:
    """Raw item-side feature values by item id, so a request may send only item ids."""
    if not cfg.item_column:
        return {}
    all_features: list[SparseFeature | DenseFeature] = [*cfg.sparse, *cfg.dense]
    cols = {f.name: _column(f) for f in all_features if f.side == "item"}
    if not cols:
        return {}
    last = df.drop_duplicates(cfg.item_column, keep="last")
    out: dict[str, dict[str, Any]] = {}
    for rec in last[list(dict.fromkeys([cfg.item_column, *cols.values()]))].to_dict("records"):
        out[str(rec[cfg.item_column])] = {name: _jsonable(rec[col]) for name, col in cols.items()}
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v


# ------------------------------------------------------------------------------------------ entry point


def data_fingerprint(cfg: DataConfig) -> str:
    from omegaconf import OmegaConf

    blob = json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=False), sort_keys=True, default=str)
    blob += f"format={FEATURE_FORMAT}"
    if cfg.source == "tabular" and cfg.path and Path(cfg.path).exists():
        blob += hashlib.sha256(Path(cfg.path).read_bytes()).hexdigest()
    if cfg.source == "criteo":  # terabytes are not hashed: names, sizes and modification times stand for them
        from training.stream import resolve

        for field_name in ("paths", "holdout_paths"):
            for f in resolve(list(getattr(cfg.stream, field_name)), f"stream.{field_name}"):
                st = f.stat()
                blob += f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_frame(cfg: DataConfig) -> tuple[pd.DataFrame, DataConfig]:
    """The source's raw frame, with history columns, in FeatureSet row order; and the effective config."""
    cache = Path(cfg.cache_dir).expanduser()
    if cfg.source == "movielens":
        df = load_movielens_frame(cache)
    elif cfg.source == "tabular":
        if not cfg.path:
            raise ValueError("data.source=tabular needs data.path (a CSV or parquet file)")
        df = load_tabular_frame(cfg.path)
    elif cfg.source == "synthetic" and cfg.synthetic.events_per_user > 0:
        df, keep = synthetic_events(cfg)
        return add_history(df, cfg, keep), cfg
    elif cfg.source == "synthetic":
        df = synthetic_frame(cfg)
        cfg = synthetic_features(cfg)
    elif cfg.source == "criteo":  # training rows are streamed by the workers; the frame is the holdout sample
        from training.stream import criteo_data_config, criteo_holdout_frame

        return criteo_holdout_frame(cfg), criteo_data_config(cfg)
    else:
        raise ValueError(f"data.source={cfg.source!r}: use 'movielens', 'tabular', 'synthetic' or 'criteo'")
    return add_history(df, cfg), cfg


def load_features(cfg: DataConfig) -> FeatureSet:
    """Build (or load from the cache) the FeatureSet for this data config."""
    cache = Path(cfg.cache_dir).expanduser()
    key = data_fingerprint(cfg)
    path = cache / "features" / f"{cfg.source}-{key}"
    if (path / "done").exists():
        return _load_cached(path)
    if cfg.source == "criteo":
        from training.stream import criteo_features

        fs = criteo_features(cfg)
    else:
        df, cfg = load_frame(cfg)
        fs = featurize(df, cfg)
    fs.spec["fingerprint"] = key
    _save_cached(fs, path)
    return fs


def example_request(df: pd.DataFrame, spec: dict[str, Any], row: int, candidates: list[str]) -> dict[str, Any]:
    """A ranking request for the user and moment of `row` (raw values, as a service would send them)."""
    user: dict[str, Any] = {}
    for f in [*spec["sparse"], *spec["dense"]]:
        if f["side"] == "user":
            v = df[f["column"]].iloc[row]
            user[f["name"]] = [t for t in v.split(f.get("sep", "|")) if t] if f.get("multi") else _jsonable(v)
    key = spec["item_column"]
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
    (tmp / "spec.json").write_text(json.dumps(fs.spec))
    (tmp / "done").write_text("")
    try:
        tmp.rename(path)  # atomic: a concurrent builder (another worker) either wins or finds it done
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(path: Path) -> FeatureSet:
    spec = json.loads((path / "spec.json").read_text())
    z = np.load(path / "arrays.npz", allow_pickle=False)
    names = [f["name"] for f in spec["sparse"]]
    return FeatureSet(
        dense=z["dense"],
        sparse={n: (z[f"sv__{n}"], z[f"sl__{n}"]) for n in names},
        labels=z["labels"],
        train_idx=z["train_idx"],
        holdout_idx=z["holdout_idx"],
        users=z.get("users", None),
        times=z.get("times", None),
        spec=spec,
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
