"""Ray-free scoring engine over an exported bundle: ONNX Runtime for the dense graph, numpy for lookups.

Raw request values become table rows and dense inputs through the feature contract the manifest carries
(adsfm.contract.features), exactly as training featurized them. For a request (one user, N candidates) the
user side is looked up and pooled once and broadcast to the N candidates; only the item-side lookups and
the dense graph run per candidate.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson

from adsfm.contract.features import OOV_ROW, FeatureError, Featurizer, SparseFeatureSpec, is_missing, key_of
from adsfm.contract.manifest import Manifest, TableFile, bundle_file
from adsfm.serving.cache import LRU

__all__ = ["Bag", "DenseGraphEngine", "FeatureError", "Overlay", "TableStore", "dequantize", "mmap_safetensors", "session_options"]


@dataclass
class Bag:
    """Row ids of one feature for a batch of rows, as (values, lengths)."""

    values: np.ndarray
    lengths: np.ndarray


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "I64": np.int64, "F64": np.float64}


def _safetensors_header(f: Any, path: Path) -> tuple[int, dict[str, Any]]:
    """(header bytes, header) of an open safetensors file; the data starts at 8 + header bytes."""
    (size,) = struct.unpack("<Q", f.read(8))
    if size > 100 << 20:
        raise ValueError(f"{path}: safetensors header of {size} bytes is not plausible")
    return size, json.loads(f.read(size))


def mmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's arrays as read-only memory maps: a replica touches only the rows it looks up,
    and replicas on one host share the pages. The format is an 8-byte header length, a JSON header of
    dtype, shape and byte range per array, then the raw little-endian data.

    The map is advised MADV_RANDOM: lookups are scattered rows, so a row not in the page cache is read
    alone rather than with a readahead window. (Pages already cached, e.g. a file just written, are still
    mapped around each touched row; export drops its tables from the cache for that reason.)"""
    with open(path, "rb") as f:
        size, header = _safetensors_header(f, path)
        total = os.fstat(f.fileno()).st_size
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if total > 8 + size else None
    if mapped is not None and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
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
        if mapped is None or 8 + size + end > total:
            raise ValueError(f"{path}: array {key!r} ends at byte {8 + size + end}, past the file's {total}")
        # a plain ndarray over the map (it keeps the map open): np.memmap's subclass hooks cost more than
        # the lookup itself on every indexing of a small table
        out[key] = np.frombuffer(mapped, dtype=np.dtype(dtype).newbyteorder("<"), count=int(np.prod(shape)),
                                 offset=8 + size + begin).reshape(shape)
    return out


def _load_table(bundle: Path, name: str, rows: int, t: TableFile) -> dict[str, np.ndarray]:
    arrays = mmap_safetensors(bundle_file(bundle, t.file))
    layouts: dict[str, dict[str, tuple[tuple[int, int], type]]] = {
        "fp32": {"weight": ((rows, t.dim), np.float32)},
        "fp16": {"weight": ((rows, t.dim), np.float16)},
        "int8": {"codes": ((rows, t.dim), np.uint8), "scale_bias": ((rows, 2), np.float16)},
    }
    for key, (shape, dtype) in layouts[t.precision].items():
        a = arrays.get(key)
        if a is None or a.shape != shape or a.dtype != dtype:
            found = None if a is None else (a.shape, a.dtype)
            raise ValueError(f"bundle table {name!r} ({t.precision}): {key} should be {shape} {np.dtype(dtype)}, found {found}")
    return arrays


def dequantize(arrays: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """fp32 rows of a stored table: fp32/fp16 as stored, int8 as codes * scale + bias per row."""
    if "weight" in arrays:
        return arrays["weight"][rows].astype(np.float32, copy=False)
    sb = arrays["scale_bias"][rows].astype(np.float32)
    return arrays["codes"][rows].astype(np.float32) * sb[:, :1] + sb[:, 1:2]


@dataclass(frozen=True)
class Overlay:
    """A table's rows replaced by live deltas (adsfm.contract.delta) over its memory-mapped base: sorted row
    numbers and the rows as the delta stores them (the served precision), dequantized per lookup exactly as
    the base's rows are. Each delta merges into a new Overlay that replaces the old in one reference swap,
    so a lookup sees a table either before or after a delta, never half of one."""

    rows: np.ndarray
    parts: dict[str, np.ndarray]

    def merged(self, rows: np.ndarray, parts: dict[str, np.ndarray]) -> Overlay:
        """This overlay with `rows` set to `parts` (later wins)."""
        if not len(self.rows):
            return Overlay(rows, parts)
        all_rows = np.concatenate([self.rows, rows])
        last = len(all_rows) - 1 - np.unique(all_rows[::-1], return_index=True)[1]  # the last write of each row
        return Overlay(all_rows[last], {k: np.concatenate([self.parts[k], parts[k]])[last] for k in parts})

    def patch(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Write the overlay's values into `out` (the base's values of `rows`) where it has them."""
        if not len(self.rows) or not len(rows):
            return
        pos = np.searchsorted(self.rows, rows).clip(max=len(self.rows) - 1)
        hit = self.rows[pos] == rows
        if hit.any():
            out[hit] = dequantize(self.parts, pos[hit])


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    # Idle spinning threads fight torch's OpenMP threads and other replicas on small hosts.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def cache_key(values: dict[str, Any]) -> bytes:
    """A fixed-size key for a user's raw values (the cache holds 16 bytes per user, not its JSON)."""
    try:
        blob = orjson.dumps(values, option=orjson.OPT_SORT_KEYS, default=str)
    except orjson.JSONEncodeError:  # what orjson refuses (an int past 64 bits, a lone surrogate): the json module's text
        blob = json.dumps(values, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(blob, digest_size=16).digest()


class TableStore:
    """A bundle's manifest, tables, item store and featurizer: the raw value → row lookups of both engines."""

    def __init__(self, bundle: str | Path) -> None:
        self.bundle = Path(bundle)
        self.manifest = Manifest.read(self.bundle)
        m = self.manifest
        self.featurizer = Featurizer(m.features)
        self.tables = {name: _load_table(self.bundle, name, m.features.tables[name].rows, t) for name, t in m.tables.items()}
        self.item_store: dict[str, dict[str, Any]] = {}
        if m.item_store_file and bundle_file(self.bundle, m.item_store_file).exists():
            self.item_store = json.loads(bundle_file(self.bundle, m.item_store_file).read_text())
        # Item key → its row among the engine's precomputed candidate inputs (built in item_store order).
        self._item_row = {i: r for r, i in enumerate(self.item_store)}
        self.overlays: dict[str, Overlay] = {}
        self.applied_seq, self.watermark = 0, 0.0
        self._table_files: dict[str, Path] = {}  # tables compacted with their deltas: the copy now mapped
        self._table_id = {name: i for i, name in enumerate(self.tables)}

    def lookup(self, table: str, rows: np.ndarray) -> np.ndarray:
        """fp32 values of a table's rows: the base's, with the rows live deltas replaced."""
        out = dequantize(self.tables[table], rows)  # the base first: compaction swaps it before the overlay
        overlay = self.overlays.get(table)
        if overlay is not None:
            if not out.flags.writeable:
                out = out.copy()
            overlay.patch(rows, out)
        return out

    def apply_delta(self, seq: int, watermark: float, tables: dict[str, dict[str, np.ndarray]],
                    dense_graph: bytes | None = None) -> np.ndarray:
        """Apply delta `seq` (the next in order): each table's overlay is replaced at once. Returns the
        changed rows as dependency keys (see dependency_keys) for dropping what was computed from them."""
        if seq != self.applied_seq + 1:
            raise ValueError(f"delta {seq} out of order: this replica applied {self.applied_seq}")
        m = self.manifest
        staged: dict[str, Overlay] = {}
        moved: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, parts in tables.items():
            if name not in self.tables:
                raise ValueError(f"delta {seq}: table {name!r} is not in the bundle (tables: {sorted(self.tables)})")
            rows = parts["rows"].astype(np.int64)
            if bool(m.features.tables[name].managed) != ("keys" in parts):
                raise ValueError(f"delta {seq}: table {name!r} " + ("is managed: its rows need the ids they hold (keys)"
                                                                     if m.features.tables[name].managed else "is not managed: it has no keys"))
            if "keys" in parts:
                moved[name] = (rows, parts["keys"].astype(np.int64))
            stored = {k: v for k, v in parts.items() if k not in ("rows", "keys")}
            if set(stored) != set(self.tables[name]):
                raise ValueError(f"delta {seq}: table {name!r} holds {sorted(stored)}, the bundle stores {sorted(self.tables[name])} "
                                 f"({m.tables[name].precision})")
            n = m.features.tables[name].rows
            if len(rows) and (rows.min() < 0 or rows.max() >= n or (np.diff(rows) <= 0).any()):
                raise ValueError(f"delta {seq}: table {name!r} rows must be sorted, distinct and in [0, {n})")
            for k, a in stored.items():
                if a.dtype != self.tables[name][k].dtype or a.shape[1:] != self.tables[name][k].shape[1:]:
                    raise ValueError(f"delta {seq}: table {name!r} {k} is {a.dtype} {a.shape[1:]}, the bundle's "
                                     f"{self.tables[name][k].dtype} {self.tables[name][k].shape[1:]}")
            if not np.isfinite(dequantize(stored, np.arange(len(rows)))).all():
                raise ValueError(f"delta {seq}: table {name!r} has non-finite values")
            old = self.overlays.get(name) or Overlay(np.zeros(0, np.int64), {})
            staged[name] = old.merged(rows, stored)
        self._swap_dense_graph(dense_graph)
        for name, overlay in staged.items():
            self.overlays = {**self.overlays, name: overlay}
        changed = {name: parts["rows"] for name, parts in tables.items()}
        remapped = set()
        for name, (rows, keys) in moved.items():
            first = m.features.tables[name].first
            held = self.featurizer.slot_keys(name)
            at = rows >= first
            if (held[rows[at] - first] != keys[at]).any():
                self.featurizer.update_slots(name, rows, keys)
                remapped.add(name)
                changed[name] = np.concatenate([changed[name], [OOV_ROW]])  # ids that left a row fall back to it
        if remapped:
            self._remapped(remapped)
        self.applied_seq, self.watermark = seq, watermark
        return self.dependency_keys(changed)

    def _remapped(self, tables: set[str]) -> None:
        """Managed tables whose ids moved between rows: engines re-index what they computed rows for."""

    def compact(self, table: str, directory: Path) -> Path:
        """Fold a table's overlay into a copy of its base file under `directory` (the served bytes, so every
        lookup is unchanged), map the copy, then drop the overlay. Runs beside lookups: the base is swapped
        before the overlay is dropped, so a lookup between the two reads the same row twice over."""
        overlay = self.overlays[table]
        src = self._table_files.get(table) or bundle_file(self.bundle, self.manifest.tables[table].file)
        directory.mkdir(parents=True, exist_ok=True)
        dst = directory / f"table_{table}.seq{self.applied_seq}.safetensors"
        tmp = dst.with_name(dst.name + ".partial")
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as f:
            size, header = _safetensors_header(f, tmp)
        for key, part in overlay.parts.items():
            meta = header[key]
            arr = np.memmap(tmp, dtype=_SAFETENSORS_DTYPES[meta["dtype"]], mode="r+", offset=8 + size + meta["data_offsets"][0],
                            shape=tuple(meta["shape"]))
            arr[overlay.rows] = part
            arr.flush()
            del arr
        os.replace(tmp, dst)
        arrays = _load_table(dst.parent, table, self.manifest.features.tables[table].rows,
                             self.manifest.tables[table].model_copy(update={"file": dst.name}))
        self.tables = {**self.tables, table: arrays}
        self.overlays = {k: v for k, v in self.overlays.items() if k != table}
        previous, self._table_files[table] = self._table_files.get(table), dst
        if previous is not None:
            previous.unlink(missing_ok=True)  # an earlier compaction's copy (never the bundle's file)
        return dst

    def reset_deltas(self) -> None:
        """Back to the bundle's base (a rolled-back delta log is then applied again from its start)."""
        m = self.manifest
        self.tables = {name: _load_table(self.bundle, name, m.features.tables[name].rows, t) for name, t in m.tables.items()}
        managed = {name for name, t in m.features.tables.items() if t.managed}
        if managed:
            self.featurizer = Featurizer(m.features)  # the bundle's remap
            self._remapped(managed)
        self.overlays, self.applied_seq, self.watermark = {}, 0, 0.0
        for f in self._table_files.values():
            f.unlink(missing_ok=True)
        self._table_files = {}
        self._swap_dense_graph(None, reset=True)

    def _swap_dense_graph(self, graph: bytes | None, reset: bool = False) -> None:
        """Engines with a dense graph replace it from a delta (or restore the bundle's)."""

    def dependency_keys(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        """(table, row) pairs as one int64 key each, what a cached state records it was computed from."""
        keys = [np.asarray(r, np.int64) + (self._table_id[t] << 40) for t, r in rows.items() if len(r)]
        return np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)

    def item_key(self, item: dict[str, Any], where: str) -> str | None:
        """The item id's key (as the item store and the vocabulary hold it), None when the id is missing."""
        key = self.manifest.item_column
        raw = item.get(key) if key else None
        if isinstance(raw, list | dict) or is_missing(raw, self.featurizer.na):
            return None
        return key_of(raw, where)

    def split_stored(self, items: list[dict[str, Any]]) -> tuple[list[int], list[int], list[int]]:
        """Candidates that send only an item id of the item store (positions, and their precomputed rows),
        and the rest (positions), which are featurized from the fields they send."""
        key = self.manifest.item_column or ""
        known = self._item_row
        try:  # the common request: every candidate a bare string id of the store
            fast = [known.get(it[key]) if len(it) == 1 and key in it else None for it in items]
        except TypeError:  # an unhashable id (a list): the general path names it
            fast = [None]
        if None not in fast:
            return list(range(len(items))), fast, []  # type: ignore[return-value]
        stored, rows, rest = [], [], []
        for i, it in enumerate(items):
            r = None
            if len(it) == 1 and key in it:
                v = it[key]
                # a string is its own key (the common case); anything else is canonicalized first
                r = known.get(v) if type(v) is str else known.get(self.item_key(it, f"candidates[{i}].{key}") or "")
            if r is None:
                rest.append(i)
            else:
                stored.append(i)
                rows.append(r)
        return stored, rows, rest

    def pool(self, table: str, bag: Bag) -> np.ndarray:
        """Sum or mean of the bag's rows, per row of the batch; an empty bag pools to zeros."""
        n = len(bag.lengths)
        if n == 1 and len(bag.values):  # one bag (a user's feature): no scatter needed
            v = self.lookup(table, bag.values).sum(axis=0, keepdims=True)
            return v / np.float32(len(bag.values)) if self.manifest.features.tables[table].pooling == "mean" else v
        if len(bag.values) == n and (bag.lengths == 1).all():  # one row per bag: nothing to sum
            return self.lookup(table, bag.values).astype(np.float32, copy=False)
        out = np.zeros((n, self.manifest.tables[table].dim), dtype=np.float32)
        if len(bag.values):  # each non-empty bag's rows summed in one pass (reduceat, not a scatter)
            full = bag.lengths > 0
            starts = (np.cumsum(bag.lengths) - bag.lengths)[full]
            out[full] = np.add.reduceat(self.lookup(table, bag.values), starts, axis=0)
        if self.manifest.features.tables[table].pooling == "mean":
            out /= np.maximum(bag.lengths, 1)[:, None].astype(np.float32)
        return out

    def rows_of(self, f: SparseFeatureSpec, raw: Any, where: str) -> np.ndarray:
        """Table rows for one raw feature value; for a raw feature, its integer values."""
        return self.featurizer.rows(f, raw, where)

    def item_features(self, item: dict[str, Any], where: str = "candidate") -> dict[str, Any]:
        """A candidate's values: those it sends, else the bundle's item store's for its id (a missing value
        never overrides the store); an item the store does not know has only what it sends."""
        k = self.item_key(item, f"{where}.{self.manifest.item_column}")
        stored = self.item_store.get(k) if k is not None else None
        if not stored:
            return item
        na = self.featurizer.na
        return {**stored, **{f: v for f, v in item.items() if isinstance(v, list | tuple) or not is_missing(v, na)}}

    def featurize_columns(self, columns: dict[str, list[Any]]) -> tuple[np.ndarray, dict[str, Bag]]:
        """Raw values of many rows (feature name -> one value per row) → model inputs, per column. Missing
        item-side columns come from the item store."""
        m = self.manifest
        n = len(next(iter(columns.values()))) if columns else 0
        if m.item_column and m.item_column in columns:
            stored = [self.item_features({m.item_column: i}) for i in columns[m.item_column]]
            for name in m.feature_names("item"):
                if name not in columns:
                    columns[name] = [s.get(name) for s in stored]
        bags = {f.name: Bag(*self.featurizer.sparse_column(f, columns.get(f.field, [None] * n))) for f in m.sparse}
        return self.featurizer.dense_matrix(columns, n), bags

    def score(self, user: dict[str, Any], items: list[dict[str, Any]]) -> np.ndarray:
        """Probabilities for each candidate: [N], or [N, T] for a model of T tasks (manifest.features.tasks)."""
        raise NotImplementedError

    @property
    def task_shape(self) -> tuple[int, ...]:
        """The shape of one row's scores: () for one task, (T,) for T."""
        tasks = self.manifest.features.tasks
        return (len(tasks),) if tasks else ()

    def score_records(self, records: list[dict[str, Any]]) -> np.ndarray:
        """One (user, item) pair per record with raw feature values (the MLflow pyfunc's rows): consecutive
        records of the same user are one request, scored exactly as HTTP scores it."""
        out = np.empty((len(records), *self.task_shape))
        for span, user, items in self.requests_of(records):
            out[span] = self.score(user, items)
        return out

    def requests_of(self, records: list[dict[str, Any]]) -> Iterator[tuple[slice, dict[str, Any], list[dict[str, Any]]]]:
        """(rows, user, candidates) of each run of consecutive records with the same user values; a missing
        value (NaN in a frame) is left out, as a request leaves it out."""
        user_fields = self.manifest.request_fields("user")
        na = self.featurizer.na
        present = [{k: _plain(v) for k, v in r.items() if isinstance(v, list | tuple | np.ndarray) or not is_missing(v, na)}
                   for r in records]
        users = [{k: v for k, v in r.items() if k in user_fields} for r in present]
        start = 0
        while start < len(records):
            end = start + 1
            while end < len(records) and users[end] == users[start]:
                end += 1
            yield slice(start, end), users[start], [{k: v for k, v in r.items() if k not in user_fields} for r in present[start:end]]
            start = end


CHANGED_HISTORY = 64
"""Deltas whose changed rows a replica keeps to check its cached user states; an older state is recomputed."""


def _plain(v: Any) -> Any:
    """A frame cell as a request carries it: arrays as lists, numpy scalars as Python ones."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v.item() if isinstance(v, np.generic) else v


class DenseGraphEngine(TableStore):
    """Scores candidates for a user from a bundle directory (manifest.json, dense.onnx, tables)."""

    def __init__(self, bundle: str | Path, intra_op_threads: int = 1, user_cache_size: int = 10_000,
                 user_cache_bytes: int | None = None, item_cache_bytes: int = 64 << 20) -> None:
        """`item_cache_bytes`: serve.item_cache_bytes (the item store kept pooled when it fits)."""
        super().__init__(bundle)
        m = self.manifest
        self._threads = intra_op_threads
        self.session = ort.InferenceSession(str(bundle_file(self.bundle, m.dense_graph.file)),
                                            session_options(intra_op_threads), providers=["CPUExecutionProvider"])
        self._user_j = [j for j, f in enumerate(m.sparse) if f.side == "user"]
        self._item_j = [j for j, f in enumerate(m.sparse) if f.side == "item"]
        self._user_k = sum(self.featurizer.dense_layout("user"), [])
        self._item_k = sum(self.featurizer.dense_layout("item"), [])
        # (pooled user embeddings, user dense inputs, the (table, row) keys they were pooled from, the delta
        # applied when they were computed): a hit is checked against the rows later deltas changed
        self.user_cache: LRU[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = LRU(user_cache_size, user_cache_bytes)
        self._changed: dict[int, np.ndarray] = {}  # the last CHANGED_HISTORY deltas' changed keys, by seq
        # The item store's candidates as table rows (one bag per item feature) and dense inputs, indexed once;
        # a request naming item ids gathers its candidates' rows and dequantizes them, so the store is never
        # held as float embeddings beyond item_cache_bytes, whatever its size. Within it, the candidates'
        # pooled embeddings are kept (a gather per request), recomputed for the items a delta touches.
        self.item_cache_bytes = item_cache_bytes
        self._item_emb: np.ndarray | None = None
        self._item_tables = {m.sparse[j].table_name for j in self._item_j}
        self._index_items()

    def _index_items(self) -> None:
        ids = list(self.item_store)
        key = self.manifest.item_column or ""
        self._item_bags, self._item_dense = self._item_index([self.item_features({key: i}) for i in ids], list(range(len(ids))))
        self._pool_items()

    def _pool_items(self) -> None:
        """Every stored item's pooled embeddings, kept when they fit in item_cache_bytes."""
        n = len(self._item_dense)
        size = n * len(self._item_j) * self.manifest.embedding_dim * 4
        self._item_emb = self._pooled(self._item_bags, None, n) if n and size <= self.item_cache_bytes else None

    def _repool_items(self, changed: dict[str, np.ndarray]) -> None:
        """The kept pooled embeddings of the items whose rows `changed` ({table: rows}), in a new array
        swapped in at once: a request gathers from the old or the new, never from one half written."""
        if self._item_emb is None:
            return
        hit = np.zeros(len(self._item_emb), dtype=bool)
        for col, j in enumerate(self._item_j):
            rows = changed.get(self.manifest.sparse[j].table_name)
            if rows is None or not len(rows):
                continue
            values, offsets = self._item_bags[col]
            touched = np.flatnonzero(np.isin(values, rows))  # positions in values → the items holding them
            hit[np.searchsorted(offsets, touched, side="right") - 1] = True
        items = np.flatnonzero(hit)
        if len(items):
            emb = self._item_emb.copy()
            emb[items] = self._pooled(self._item_bags, items)
            self._item_emb = emb

    def _remapped(self, tables: set[str]) -> None:
        if any(self.manifest.sparse[j].table_name in tables for j in self._item_j):
            self._index_items()

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

    def score(self, user: dict[str, Any], items: list[dict[str, Any]]) -> np.ndarray:
        """Probabilities for each candidate; the user side is looked up and pooled once."""
        if not items:
            return np.zeros((0, *self.task_shape))
        return self._run(*self.inputs(user, items))

    def inputs(self, user: dict[str, Any], items: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """The dense graph's inputs (dense [N, K], pooled embeddings [N, F, D]) for one user x N items.

        The user side comes from an LRU cache keyed by a hash of the user's values (this bundle is one model
        version); candidates that send only an item id of the item store take precomputed rows."""
        m = self.manifest
        n = len(items)
        emb = np.empty((n, len(m.sparse), m.embedding_dim), dtype=np.float32)
        dense = np.empty((n, len(m.features.dense_inputs())), dtype=np.float32)
        user_emb, user_dense = self.user_inputs(user)
        emb[:, self._user_j] = user_emb
        dense[:, self._user_k] = user_dense
        stored, rows, rest = self.split_stored(items)
        if not rest:  # every candidate an id of the item store (the common request): whole-column writes
            emb[:, self._item_j] = self._stored_items(rows)
            dense[:, self._item_k] = self._item_dense[rows]
        elif stored:
            emb[np.ix_(stored, self._item_j)] = self._stored_items(rows)
            dense[np.ix_(stored, self._item_k)] = self._item_dense[rows]
        if rest:
            e, d = self._item_inputs([self.item_features(items[i], f"candidates[{i}]") for i in rest], rest)
            emb[np.ix_(rest, self._item_j)] = e
            dense[np.ix_(rest, self._item_k)] = d
        return dense, emb

    def _stored_items(self, rows: list[int]) -> np.ndarray:
        """Pooled item-side embeddings [n, F_item, D] of items of the store, by their index rows."""
        kept = self._item_emb
        return kept[rows] if kept is not None else self._pooled(self._item_bags, np.asarray(rows, dtype=np.int64))

    def user_inputs(self, user: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Pooled user-side embeddings [F_user, D] and user-side dense inputs, from the cache."""
        seq = self.applied_seq  # before computing: a delta applied meanwhile is checked at the next hit
        emb, dense, _, _ = self.user_cache.get_or_compute(cache_key(user), lambda: self._user_inputs(user, seq), self._still_valid)
        return emb, dense

    def _still_valid(self, state: tuple[np.ndarray, np.ndarray, np.ndarray, int]) -> bool:
        """A cached user state holds unless a delta since its computation changed a row it was pooled from."""
        deps, seq = state[2], state[3]
        if seq == self.applied_seq:
            return True
        if seq < self.applied_seq - CHANGED_HISTORY or seq > self.applied_seq:  # too old to check, or a rolled-back log
            return False
        for s in range(seq + 1, self.applied_seq + 1):
            changed = self._changed.get(s)
            if changed is None:
                return False
            if len(changed) and len(deps):
                pos = np.searchsorted(changed, deps).clip(max=len(changed) - 1)
                if (changed[pos] == deps).any():
                    return False
        return True

    def _user_inputs(self, user: dict[str, Any], seq: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        m = self.manifest
        emb = np.zeros((len(self._user_j), m.embedding_dim), dtype=np.float32)
        used: dict[str, list[np.ndarray]] = {}
        for col, j in enumerate(self._user_j):
            f = m.sparse[j]
            rows = self.rows_of(f, user.get(f.field), f"user.{f.field}")
            used.setdefault(f.table_name, []).append(rows)
            emb[col] = self.pool(f.table_name, Bag(rows, np.array([len(rows)])))[0]
        deps = self.dependency_keys({t: np.concatenate(r) for t, r in used.items()})
        return emb, self.featurizer.dense_row(user, "user", "user."), deps, seq

    def apply_delta(self, seq: int, watermark: float, tables: dict[str, dict[str, np.ndarray]],
                    dense_graph: bytes | None = None) -> np.ndarray:
        """TableStore.apply_delta; the changed rows are kept, so a cached user state pooled from one of them
        is computed again at its next request (and only such a state: the others stay hits). No sweep of the
        cache holds up requests here."""
        kept = self._item_emb
        changed = super().apply_delta(seq, watermark, tables, dense_graph)
        if self._item_emb is kept:  # else a remap (managed ids moved) re-indexed and re-pooled the whole store
            self._repool_items({t: p["rows"] for t, p in tables.items() if t in self._item_tables})
        self._changed[seq] = changed
        self._changed.pop(seq - CHANGED_HISTORY, None)
        return changed

    def reset_deltas(self) -> None:
        kept = self._item_emb
        super().reset_deltas()
        self._changed = {}
        self.user_cache.clear()
        if self._item_emb is kept:  # else the bundle's remap re-indexed and re-pooled the store already
            self._pool_items()  # from the bundle's rows again

    def _swap_dense_graph(self, graph: bytes | None, reset: bool = False) -> None:
        if graph is None and not reset:
            return
        source = graph if graph is not None else str(bundle_file(self.bundle, self.manifest.dense_graph.file))
        self.session = ort.InferenceSession(source, session_options(self._threads), providers=["CPUExecutionProvider"])

    def _item_inputs(self, items: list[dict[str, Any]], where: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Pooled item-side embeddings [N, F_item, D] and dense inputs [N, K_item]; `where` numbers the
        candidates in error messages."""
        bags, dense = self._item_index(items, where)
        return self._pooled(bags, None, len(items)), dense

    def _item_index(self, items: list[dict[str, Any]], where: list[int]) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
        """Each item feature's table rows for `items` as (values, offsets: item r's rows are
        values[offsets[r]:offsets[r+1]]), and the dense inputs [N, K_item]."""
        m = self.manifest
        bags = []
        for j in self._item_j:
            f = m.sparse[j]
            per = [self.rows_of(f, it.get(f.field), f"candidates[{w}].{f.field}") for w, it in zip(where, items, strict=True)]
            values = np.concatenate(per).astype(np.int64) if per else np.zeros(0, np.int64)
            bags.append((values, np.concatenate([[0], np.cumsum([len(p) for p in per], dtype=np.int64)])))
        dense = np.zeros((len(items), len(self._item_k)), dtype=np.float32)
        for r, (w, it) in enumerate(zip(where, items, strict=True)):
            dense[r] = self.featurizer.dense_row(it, "item", f"candidates[{w}].")
        return bags, dense

    def _pooled(self, bags: list[tuple[np.ndarray, np.ndarray]], rows: np.ndarray | None, n: int = 0) -> np.ndarray:
        """Pooled item-side embeddings [n, F_item, D] of the items `rows` of an index (None: all `n` of
        them): their table rows gathered, dequantized and pooled now."""
        m = self.manifest
        n = n if rows is None else len(rows)
        emb = np.zeros((n, len(self._item_j), m.embedding_dim), dtype=np.float32)
        for col, j in enumerate(self._item_j):
            values, offsets = bags[col]
            if rows is None:
                lengths, picked = np.diff(offsets), values
            else:
                starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
                if (lengths == 1).all():  # single-valued features: one row each
                    picked = values[starts]
                else:  # each item's run of rows, concatenated in order
                    before = np.cumsum(lengths) - lengths
                    picked = values[np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()))]
            emb[:, col] = self.pool(m.sparse[j].table_name, Bag(picked, lengths))
        return emb

    def user_cache_info(self) -> Any:
        """CacheInfo(hits, misses, maxsize, currsize, bytes) of the user-state cache."""
        return self.user_cache.info()

    def score_columns(self, columns: dict[str, list[Any]], batch: int = 4096) -> np.ndarray:
        """Probabilities for many (user, item) rows given as raw columns (batch scoring, evaluation)."""
        dense, bags = self.featurize_columns(dict(columns))
        offsets = {k: np.concatenate([[0], np.cumsum(b.lengths)]) for k, b in bags.items()}
        out = []
        for s in range(0, len(dense), batch):
            e = min(s + batch, len(dense))
            part = {k: Bag(b.values[offsets[k][s] : offsets[k][e]], b.lengths[s:e]) for k, b in bags.items()}
            out.append(self.score_indexed(dense[s : s + batch], part))
        return np.concatenate(out) if out else np.zeros((0, *self.task_shape))
