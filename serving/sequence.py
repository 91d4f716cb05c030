"""Ray-free scoring over a sequence model's split bundle (manifest.sequence): the user graph encodes a
user's history once into per-layer keys and values, kept in an LRU cache keyed by the user's features and
history; the candidate graph scores any number of candidates against that state."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from adsfm.contract.features import FeatureError
from adsfm.contract.manifest import SequenceSpec, bundle_file
from adsfm.serving.cache import LRU
from adsfm.serving.engine import TableStore, cache_key, session_options


@dataclass(frozen=True)
class UserState:
    """What the user graph computed for one user and history, and the times the candidates are biased by."""

    times: np.ndarray  # [1 + n] int64: the start token's time, then the events'
    context: np.ndarray  # [D]
    keys: np.ndarray  # [L, 1 + n, H, da]
    values: np.ndarray  # [L, 1 + n, H, dl]


@dataclass
class SequenceInputs:
    """One request's candidate-graph inputs."""

    items: np.ndarray  # [m, D]
    request_time: int
    state: UserState


class SequenceEngine(TableStore):
    """Scores candidates for a user from a split bundle (manifest.json, user.onnx, candidate.onnx, tables)."""

    def __init__(self, bundle: str | Path, intra_op_threads: int = 1, user_cache_size: int = 10_000,
                 user_cache_bytes: int | None = None) -> None:
        super().__init__(bundle)
        if self.manifest.sequence is None:
            raise ValueError(f"{bundle}: manifest has no 'sequence' section: not a sequence-model bundle")
        self.seq: SequenceSpec = self.manifest.sequence
        opts = session_options(intra_op_threads)
        providers = ["CPUExecutionProvider"]
        self.user_session = ort.InferenceSession(str(bundle_file(self.bundle, self.seq.user_graph)), opts, providers=providers)
        self.candidate_session = ort.InferenceSession(str(bundle_file(self.bundle, self.seq.candidate_graph)), opts,
                                                      providers=providers)
        self.features = {f.name: f for f in self.manifest.sparse}
        self.user_cache: LRU[UserState] = LRU(user_cache_size, user_cache_bytes)
        # Every item of the store as table rows, indexed once; a request naming ids gathers and dequantizes
        # its candidates' rows (the store is never held as float embeddings, whatever its size).
        self._remapped(set())

    def _remapped(self, tables: set[str]) -> None:
        """The item store's rows (again, after managed tables' ids moved between rows)."""
        ids = list(self.item_store)
        key = self.manifest.item_column or ""
        self._item_rows = self.item_rows([{key: i} for i in ids]) if ids else {}

    def apply_delta(self, seq: int, watermark: float, tables: dict[str, dict[str, np.ndarray]],
                    dense_graph: bytes | None = None) -> np.ndarray:
        """Table rows only (a split bundle has two graphs); every cached user state is dropped, since the
        user graph mixes the whole history's rows through attention."""
        if dense_graph is not None:
            raise ValueError(f"delta {seq}: a split (sequence) bundle takes table rows only, not a dense graph")
        changed = super().apply_delta(seq, watermark, tables)
        self.user_cache.clear()
        return changed

    def reset_deltas(self) -> None:
        super().reset_deltas()
        self.user_cache.clear()

    # ------------------------------------------------------------------------------------ indexed path

    def _rows(self, feature: str, rows: np.ndarray) -> np.ndarray:
        return self.lookup(self.features[feature].table_name, rows)

    def encode(self, history: np.ndarray, actions: np.ndarray, times: np.ndarray, context: dict[str, int],
               request_time: int) -> UserState:
        """Run the user graph on table rows (oldest first; the latest max_history events are kept)."""
        keep = self.seq.max_history
        history, actions, times = history[-keep:], actions[-keep:], times[-keep:].astype(np.int64)
        tokens = self._rows(self.seq.history, history) + self._rows(self.seq.actions, actions)
        start = times[0] if len(times) else request_time
        all_times = np.concatenate([[start], times]).astype(np.int64)
        ctx = [self._rows(f, np.array([context[f]]))[0] for f in self.seq.context_features]
        ctx_vec = np.concatenate(ctx) if ctx else np.zeros(self.manifest.embedding_dim, np.float32)
        user_context, keys, values = self.user_session.run(None, {"history": tokens, "times": all_times, "context": ctx_vec})
        return UserState(all_times, user_context, keys, values)

    def item_tokens(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        """Candidate tokens [m, D] from table rows of each item feature."""
        return np.sum([self._rows(f, rows[f]) for f in self.seq.item_features], axis=0).astype(np.float32)

    def run(self, x: SequenceInputs) -> np.ndarray:
        s = x.state
        if s.keys.shape[1] != len(s.times):  # the encoded state and its times always travel together
            raise ValueError(f"user state has {s.keys.shape[1]} rows but {len(s.times)} times")
        feed = {"items": x.items, "request_time": np.array([x.request_time], np.int64), "times": s.times,
                "user_context": s.context, "keys": s.keys, "values": s.values}
        logits = self.candidate_session.run(None, feed)[0]
        return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))

    def run_many(self, inputs: list[SequenceInputs]) -> list[np.ndarray]:
        """Each request against its own user's state (the candidate graph takes one user at a time)."""
        return [self.run(x) for x in inputs]

    # ---------------------------------------------------------------------------------- raw-value path

    def score(self, user: dict[str, Any], items: list[dict[str, Any]]) -> np.ndarray:
        if not items:
            return np.zeros(0)
        return self.run(self.inputs(user, items))

    def inputs(self, user: dict[str, Any], items: list[dict[str, Any]]) -> SequenceInputs:
        """The candidate graph's inputs for one user (state from the cache) and m candidates."""
        s = self.seq
        request_time = self._request_time(user)
        history_fields = {k: user.get(k) for k in (s.history, s.actions, s.times)}
        context = {f: user.get(f) for f in s.context_features}
        # The cache key is everything the state depends on; a history that ends earlier than the request
        # keeps its key, since only the start token's time of an empty history depends on the request.
        empty = not history_fields[s.history]
        depends = {"history": history_fields, "context": context, "time": request_time if empty else None}
        state = self.user_cache.get_or_compute(cache_key(depends), lambda: self._encode(history_fields, context, request_time))
        return SequenceInputs(self._candidate_tokens(items), request_time, state)

    def _request_time(self, user: dict[str, Any]) -> int:
        """The request's time feature; a request that leaves it out is scored at the current time."""
        rows = self.rows_of(self.features[self.seq.time], user.get(self.seq.time), f"user.{self.seq.time}")
        return int(rows[0]) if len(rows) else int(time.time())

    def _encode(self, history_fields: dict[str, Any], context: dict[str, Any], request_time: int) -> UserState:
        s = self.seq
        hist = self.rows_of(self.features[s.history], history_fields[s.history], f"user.{s.history}")
        acts = self.rows_of(self.features[s.actions], history_fields[s.actions], f"user.{s.actions}")
        times = self.rows_of(self.features[s.times], history_fields[s.times], f"user.{s.times}")
        if not len(hist) == len(acts) == len(times):
            raise FeatureError(f"user.{s.history}", f"{s.history} ({len(hist)}), {s.actions} ({len(acts)}) and "
                               f"{s.times} ({len(times)}) must list the same events, one value each")
        order = np.argsort(times, kind="stable")  # the model reads events oldest first
        ctx = {f: self._one_row(f, context[f], f"user.{f}") for f in s.context_features}
        return self.encode(hist[order], acts[order], times[order], ctx, request_time)

    def item_rows(self, items: list[dict[str, Any]], where: list[int] | None = None) -> dict[str, np.ndarray]:
        """Table rows of each item feature for raw items (store values filled in); `where` numbers them in
        error messages."""
        where = where if where is not None else list(range(len(items)))
        full = [self.item_features(it, f"candidates[{w}]") for w, it in zip(where, items, strict=True)]
        return {f: np.array([self._one_row(f, it.get(f), f"candidates[{w}].{f}") for w, it in zip(where, full, strict=True)],
                            dtype=np.int64)
                for f in self.seq.item_features}

    def _items(self, items: list[dict[str, Any]], where: list[int]) -> np.ndarray:
        if not items:
            return np.zeros((0, self.manifest.embedding_dim), np.float32)
        return self.item_tokens(self.item_rows(items, where))

    def _one_row(self, feature: str, raw: Any, where: str) -> int:
        """The row of a single-valued feature's raw value (a missing value: the missing row)."""
        return int(self.rows_of(self.features[feature], raw, where)[0])

    def _candidate_tokens(self, items: list[dict[str, Any]]) -> np.ndarray:
        out = np.empty((len(items), self.manifest.embedding_dim), np.float32)
        stored, rows, rest = self.split_stored(items)
        if stored:
            at = np.asarray(rows, dtype=np.int64)
            out[stored] = self.item_tokens({f: r[at] for f, r in self._item_rows.items()})
        if rest:
            out[rest] = self._items([items[i] for i in rest], rest)
        return out

    def score_columns(self, columns: dict[str, list[Any]]) -> np.ndarray:
        """Probabilities for many (user, item) rows given as raw columns (evaluation, batch scoring): one user
        state per distinct user and history (from the cache), one candidate-graph run per row."""
        m = self.manifest
        n = len(next(iter(columns.values()))) if columns else 0
        user_fields = [f for f in columns if f in m.request_fields("user")]
        item_fields = [f for f in columns if f in m.request_fields("item")]
        out = np.empty(n)
        for i in range(n):
            user = {f: columns[f][i] for f in user_fields}
            item = {f: columns[f][i] for f in item_fields if columns[f][i] is not None}
            out[i] = self.score(user, [item])[0]
        return out

    def user_cache_info(self) -> Any:
        return self.user_cache.info()
