"""Ray-free scoring engine over an exported bundle: ONNX Runtime for the dense graph, numpy for lookups.

For a request (one user, N candidates) the user-side features are looked up and pooled once and
broadcast to the N candidates; only the item-side lookups and the dense graph run per candidate.
"""

from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export.manifest import DenseFeatureSpec, Manifest, SparseFeatureSpec, TableSpec, stable_hash


class FeatureError(ValueError):
    """A request whose features cannot be scored; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class Bag:
    """Row ids of one feature for a batch of rows, as (values, lengths)."""

    values: np.ndarray
    lengths: np.ndarray


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "I64": np.int64, "F64": np.float64}


def mmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's arrays as read-only memory maps: a replica touches only the rows it looks up,
    and replicas on one host share the pages. The format is an 8-byte header length, a JSON header of
    dtype, shape and byte range per array, then the raw little-endian data."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > 100 << 20:
            raise ValueError(f"{path}: safetensors header of {size} bytes is not plausible")
        header = json.loads(f.read(size))
    out: dict[str, np.ndarray] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(meta["dtype"])
        begin, end = meta["data_offsets"]
        shape = tuple(meta["shape"])
        if dtype is None or end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise ValueError(f"{path}: array {key!r} has dtype {meta['dtype']} and {end - begin} bytes for shape {shape}")
        if end == begin:
            out[key] = np.zeros(shape, dtype)
            continue
        out[key] = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r", offset=8 + size + begin, shape=shape)
    return out


def _load_table(bundle: Path, name: str, t: TableSpec) -> dict[str, np.ndarray]:
    arrays = mmap_safetensors(bundle / t.file)
    layouts: dict[str, dict[str, tuple[tuple[int, int], type]]] = {
        "fp32": {"weight": ((t.rows, t.dim), np.float32)},
        "fp16": {"weight": ((t.rows, t.dim), np.float16)},
        "int8": {"codes": ((t.rows, t.dim), np.uint8), "scale_bias": ((t.rows, 2), np.float16)},
    }
    want = layouts[t.precision]
    for key, (shape, dtype) in want.items():
        a = arrays.get(key)
        if a is None or a.shape != shape or a.dtype != dtype:
            found = None if a is None else (a.shape, a.dtype)
            raise ValueError(f"bundle table {name!r} ({t.precision}): {key} should be {shape} {np.dtype(dtype)}, found {found}")
    return arrays


def _standardise(spec: DenseFeatureSpec, x: np.ndarray) -> np.ndarray:
    """The training-time transform of a dense column: optional log1p, then the training mean and std."""
    if spec.log1p:
        x = np.log1p(np.maximum(x, 0.0))
    return (x - spec.mean) / spec.std


def dequantize(arrays: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """fp32 rows of a stored table: fp32/fp16 as stored, int8 as codes * scale + bias per row."""
    if "weight" in arrays:
        return arrays["weight"][rows].astype(np.float32, copy=False)
    sb = arrays["scale_bias"][rows].astype(np.float32)
    return arrays["codes"][rows].astype(np.float32) * sb[:, :1] + sb[:, 1:2]


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    # Idle spinning threads fight torch's OpenMP threads on small hosts (p99 54 ms instead of 4 ms).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


class TableStore:
    """A bundle's manifest, tables, vocabularies and item store, and the raw value → row lookups."""

    def __init__(self, bundle: str | Path) -> None:
        self.bundle = Path(bundle)
        self.manifest = Manifest.read(self.bundle)
        m = self.manifest
        self.tables = {name: _load_table(self.bundle, name, t) for name, t in m.tables.items()}
        self._index = {name: {tok: i + 1 for i, tok in enumerate(t.vocab)} for name, t in m.tables.items()}
        self.item_store: dict[str, dict[str, Any]] = {}
        if m.item_store_file and (self.bundle / m.item_store_file).exists():
            self.item_store = json.loads((self.bundle / m.item_store_file).read_text())
        # Item id → its row among the engine's precomputed candidate inputs (built in item_store order).
        self._item_row = {i: r for r, i in enumerate(self.item_store)}

    def split_stored(self, items: list[dict[str, Any]]) -> tuple[list[int], list[int], list[int]]:
        """Candidates that send only an item id of the item store (positions, and their precomputed rows),
        and the rest (positions), which are featurized from the fields they send."""
        key = self.manifest.item_column or ""
        stored = [i for i, it in enumerate(items) if len(it) == 1 and str(it.get(key)) in self._item_row] if key else []
        rows = [self._item_row[str(items[i][key])] for i in stored]
        return stored, rows, sorted(set(range(len(items))) - set(stored))

    def pool(self, table: str, bag: Bag) -> np.ndarray:
        """Sum or mean of the bag's rows, per row of the batch; an empty bag pools to zeros."""
        n = len(bag.lengths)
        out = np.zeros((n, self.manifest.tables[table].dim), dtype=np.float32)
        if len(bag.values):
            seg = np.repeat(np.arange(n), bag.lengths)
            np.add.at(out, seg, dequantize(self.tables[table], bag.values))
        if self.manifest.tables[table].pooling == "mean":
            out /= np.maximum(bag.lengths, 1)[:, None].astype(np.float32)
        return out

    def rows_of(self, f: SparseFeatureSpec, raw: Any, where: str) -> np.ndarray:
        """Table rows for one raw feature value (a scalar, a list, or a `sep`-joined string); for a raw
        feature, its integer values."""
        if raw is None:
            values: list[str] = []
        elif isinstance(raw, list | tuple):
            values = [str(v) for v in raw]
        elif isinstance(raw, str | int | float | bool):
            values = [t for t in str(raw).split(f.sep) if t] if f.multi else [str(raw)]
        else:
            raise FeatureError(where, f"expected a string, a number or a list, got {type(raw).__name__}")
        if not f.multi and len(values) > 1:
            raise FeatureError(where, f"takes one value, got {len(values)}")
        if f.raw:
            try:
                return np.array([int(float(v)) for v in values], dtype=np.int64)
            except (ValueError, OverflowError):
                raise FeatureError(where, f"expected integers (seconds for a time), got {values[:3]}") from None
        t = self.manifest.tables[f.table_name]
        if t.hash_buckets:
            return np.array([stable_hash(v, t.hash_buckets) + 1 for v in values], dtype=np.int64)
        index = self._index[f.table_name]
        return np.array([index.get(v, 0) for v in values], dtype=np.int64)

    def score_columns(self, columns: dict[str, list[Any]]) -> np.ndarray:
        raise NotImplementedError

    def score_records(self, records: list[dict[str, Any]]) -> np.ndarray:
        """One (user, item) pair per record with raw feature values; for batch scoring through MLflow pyfunc."""
        names = self.manifest.request_fields()
        return self.score_columns({k: [r.get(k) for r in records] for k in names if any(k in r for r in records)})

    def item_features(self, item: dict[str, Any]) -> dict[str, Any]:
        """Request fields override the bundle's item store; unknown items fall back to OOV and means."""
        key = self.manifest.item_column
        stored = self.item_store.get(str(item.get(key))) if key else None
        return {**(stored or {}), **item}


class Ranker(TableStore):
    """Scores candidates for a user from a bundle directory (manifest.json, dense.onnx, tables)."""

    def __init__(self, bundle: str | Path, intra_op_threads: int = 1, user_cache_size: int = 10_000) -> None:
        super().__init__(bundle)
        m = self.manifest
        self.session = ort.InferenceSession(str(self.bundle / m.dense_graph.file), session_options(intra_op_threads),
                                            providers=["CPUExecutionProvider"])
        self._user_j = [j for j, f in enumerate(m.sparse) if f.side == "user"]
        self._item_j = [j for j, f in enumerate(m.sparse) if f.side == "item"]
        self._user_k = [k for k, d in enumerate(m.dense) if d.side == "user"]
        self._item_k = [k for k, d in enumerate(m.dense) if d.side == "item"]
        self._user_state = functools.lru_cache(maxsize=user_cache_size)(self._user_inputs)
        # The item store's candidates, featurized once: a request naming only item ids gathers rows.
        ids = list(self.item_store)
        key = m.item_column or ""
        self._item_emb, self._item_dense = self._item_inputs([self.item_features({key: i}) for i in ids], list(range(len(ids))))

    # ------------------------------------------------------------------------------------ indexed path

    def score_indexed(self, dense: np.ndarray, bags: dict[str, Bag]) -> np.ndarray:
        """Probabilities for already indexed rows (the parity check's path)."""
        emb = np.stack([self.pool(f.table_name, bags[f.name]) for f in self.manifest.sparse], axis=1)
        return self._run(dense.astype(np.float32), emb)

    def _run(self, dense: np.ndarray, emb: np.ndarray) -> np.ndarray:
        logits = self.session.run([self.manifest.dense_graph.output], {"dense": dense, "embeddings": emb})[0]
        return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))

    def run_many(self, inputs: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Several requests' inputs through one run of the dense graph (cross-request batching); each
        request gets its own rows back. The graph is row-wise, so a row scores the same in any batch."""
        if len(inputs) == 1:
            return [self._run(*inputs[0])]
        probs = self._run(np.concatenate([d for d, _ in inputs]), np.concatenate([e for _, e in inputs]))
        return np.split(probs, np.cumsum([len(d) for d, _ in inputs])[:-1])

    # ---------------------------------------------------------------------------------- raw-value path

    def _dense_value(self, spec: DenseFeatureSpec, raw: Any, where: str) -> float:
        if raw is None:
            return 0.0  # the training mean, after standardisation
        try:
            x = float(raw)
        except (TypeError, ValueError):
            raise FeatureError(where, f"expected a number, got {raw!r}") from None
        if not np.isfinite(x):
            raise FeatureError(where, f"expected a finite number, got {raw!r}")
        return float(_standardise(spec, np.array([x]))[0])

    def score(self, user: dict[str, Any], items: list[dict[str, Any]]) -> np.ndarray:
        """Probabilities for each candidate; the user side is looked up and pooled once."""
        if not items:
            return np.zeros(0)
        return self._run(*self.inputs(user, items))

    def inputs(self, user: dict[str, Any], items: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """The dense graph's inputs (dense [N, K], pooled embeddings [N, F, D]) for one user x N items.

        The user side comes from an LRU cache keyed by the user's feature values (this bundle is one model
        version); candidates that send only an item id of the item store take precomputed rows."""
        m = self.manifest
        n = len(items)
        emb = np.empty((n, len(m.sparse), m.embedding_dim), dtype=np.float32)
        dense = np.empty((n, len(m.dense)), dtype=np.float32)
        user_emb, user_dense = self._user_state(json.dumps(user, sort_keys=True, default=str))
        emb[:, self._user_j] = user_emb
        dense[:, self._user_k] = user_dense
        stored, rows, rest = self.split_stored(items)
        if stored:
            emb[np.ix_(stored, self._item_j)] = self._item_emb[rows]
            dense[np.ix_(stored, self._item_k)] = self._item_dense[rows]
        if rest:
            e, d = self._item_inputs([self.item_features(items[i]) for i in rest], rest)
            emb[np.ix_(rest, self._item_j)] = e
            dense[np.ix_(rest, self._item_k)] = d
        return dense, emb

    def _user_inputs(self, user_json: str) -> tuple[np.ndarray, np.ndarray]:
        """Pooled user-side embeddings [F_user, D] and standardised user-side dense values [K_user]."""
        user = json.loads(user_json)
        m = self.manifest
        emb = np.zeros((len(self._user_j), m.embedding_dim), dtype=np.float32)
        for col, j in enumerate(self._user_j):
            f = m.sparse[j]
            rows = self.rows_of(f, user.get(f.name), f"user.{f.name}")
            emb[col] = self.pool(f.table_name, Bag(rows, np.array([len(rows)])))[0]
        dense = np.array([self._dense_value(m.dense[k], user.get(m.dense[k].name), f"user.{m.dense[k].name}")
                          for k in self._user_k], dtype=np.float32)
        return emb, dense

    def _item_inputs(self, items: list[dict[str, Any]], where: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Pooled item-side embeddings [N, F_item, D] and dense values [N, K_item]; `where` numbers the
        candidates in error messages."""
        m = self.manifest
        emb = np.zeros((len(items), len(self._item_j), m.embedding_dim), dtype=np.float32)
        for col, j in enumerate(self._item_j):
            f = m.sparse[j]
            per = [self.rows_of(f, it.get(f.name), f"candidates[{w}].{f.name}") for w, it in zip(where, items, strict=True)]
            bag = Bag(np.concatenate(per) if per else np.zeros(0, np.int64), np.array([len(p) for p in per]))
            emb[:, col] = self.pool(f.table_name, bag)
        dense = np.zeros((len(items), len(self._item_k)), dtype=np.float32)
        for col, k in enumerate(self._item_k):
            d = m.dense[k]
            dense[:, col] = [self._dense_value(d, it.get(d.name), f"candidates[{w}].{d.name}") for w, it in zip(where, items, strict=True)]
        return emb, dense

    def user_cache_info(self) -> Any:
        """functools' CacheInfo(hits, misses, maxsize, currsize) of the user-state cache."""
        return self._user_state.cache_info()

    def featurize_columns(self, columns: dict[str, list[Any]]) -> tuple[np.ndarray, dict[str, Bag]]:
        """Raw values of many rows (feature name -> one value per row) → model inputs, vectorised per column.
        Missing item-side columns come from the item store."""
        m = self.manifest
        n = len(next(iter(columns.values()))) if columns else 0
        if m.item_column and m.item_column in columns:
            stored = [self.item_store.get(str(i), {}) for i in columns[m.item_column]]
            for name in m.feature_names("item"):
                if name not in columns:
                    columns[name] = [s.get(name) for s in stored]
        bags: dict[str, Bag] = {}
        for f in m.sparse:
            raw = columns.get(f.name, [None] * n)
            per = [self.rows_of(f, v, f.name) for v in raw]
            bags[f.name] = Bag(np.concatenate(per) if per else np.zeros(0, np.int64), np.array([len(p) for p in per]))
        dense = np.zeros((n, len(m.dense)), dtype=np.float32)
        for k, d in enumerate(m.dense):
            x = np.array([np.nan if v is None else float(v) for v in columns.get(d.name, [None] * n)], dtype=np.float64)
            dense[:, k] = np.nan_to_num(_standardise(d, x), nan=0.0)
        return dense, bags

    def score_columns(self, columns: dict[str, list[Any]], batch: int = 4096) -> np.ndarray:
        """Probabilities for many (user, item) rows given as raw columns (batch scoring, evaluation)."""
        dense, bags = self.featurize_columns(dict(columns))
        offsets = {k: np.concatenate([[0], np.cumsum(b.lengths)]) for k, b in bags.items()}
        out = []
        for s in range(0, len(dense), batch):
            e = min(s + batch, len(dense))
            part = {k: Bag(b.values[offsets[k][s] : offsets[k][e]], b.lengths[s:e]) for k, b in bags.items()}
            out.append(self.score_indexed(dense[s : s + batch], part))
        return np.concatenate(out) if out else np.zeros(0)
