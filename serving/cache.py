"""The replicas' user-state cache: least recently used first out, bounded in entries and in bytes, keyed
by a fixed-size hash of what the state depends on (never by the request's JSON)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np

V = TypeVar("V")


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int
    bytes: int


def nbytes(value: Any) -> int:
    """Bytes held by a cached value: the arrays in it (a tuple, a dataclass or an array)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, tuple | list):
        return sum(nbytes(v) for v in value)
    if hasattr(value, "__dict__") or hasattr(value, "__dataclass_fields__"):
        return sum(nbytes(v) for v in vars(value).values())
    return 0


class LRU(Generic[V]):
    """get_or_compute(key, compute): the cached value, or compute() stored under key. Thread-safe (scoring
    runs in an executor thread while the event loop reads the counters)."""

    def __init__(self, max_entries: int, max_bytes: int | None = None) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._data: OrderedDict[bytes, tuple[V, int]] = OrderedDict()
        self._bytes = self.hits = self.misses = 0
        self._lock = threading.Lock()

    def get_or_compute(self, key: bytes, compute: Callable[[], V], valid: Callable[[V], bool] | None = None) -> V:
        """`valid`: whether a cached value still holds (a replica's live deltas may have changed what it was
        computed from); one that does not is computed again, as a miss."""
        with self._lock:
            hit = self._data.get(key)
            if hit is not None and (valid is None or valid(hit[0])):
                self._data.move_to_end(key)
                self.hits += 1
                return hit[0]
            self.misses += 1
        value = compute()  # outside the lock: a slow miss does not hold up the hits of other threads
        size = nbytes(value) + len(key)
        with self._lock:
            if self.max_entries <= 0 or (self.max_bytes is not None and size > self.max_bytes):
                return value
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._data[key] = (value, size)
            self._bytes += size
            self._evict()
        return value

    def resize(self, max_entries: int, max_bytes: int | None) -> None:
        with self._lock:
            self.max_entries, self.max_bytes = max_entries, max_bytes
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def _evict(self) -> None:
        while self._data and (len(self._data) > self.max_entries or (self.max_bytes is not None and self._bytes > self.max_bytes)):
            _, (_, freed) = self._data.popitem(last=False)
            self._bytes -= freed

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self.hits, self.misses, self.max_entries, len(self._data), self._bytes)
