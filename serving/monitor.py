"""What the challenger served, across all replicas: the evidence adsfm-shift judges it by.

Every replica reports (time, version, ok, latency) of the requests it routed to a challenger (answered,
failed, late or shadowed; the champion's requests cost nothing here), and for a sample of those the
challenger answered, how far its scores are from the champion's on the same request (QualityRow), to one
named actor per model, in batches twice a second; adsfm-shift reads per-version error rates, p99, score
shift and top-10 disagreement over a time window from it.
A scrape of /metrics would see one replica per call, and the split must be judged on all of them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

NAMESPACE = "adsfm"
Row = tuple[float, str, bool, float]
"""(unix time, model version, answered without error, latency in ms)."""
QualityRow = tuple[float, str, float, float]
"""(unix time, challenger version, mean |challenger - champion| score, top-10 disagreement) of a sampled
request the challenger answered, scored by the champion too, off the request path."""


@dataclass(frozen=True)
class VersionStats:
    requests: int
    errors: int
    p99_ms: float
    compared: int = 0
    """Requests also scored by the champion (sampled), behind the two quality figures below."""
    score_shift: float = 0.0
    """Mean over the compared requests of the mean |challenger - champion| probability."""
    disagreement: float = 0.0
    """Mean over the compared requests of the share of the champion's top 10 missing from the challenger's."""

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def summarize(rows: list[Row], since: float, quality: list[QualityRow] | None = None) -> dict[str, VersionStats]:
    by: dict[str, list[Row]] = {}
    for r in rows:
        if r[0] >= since:
            by.setdefault(r[1], []).append(r)
    compared: dict[str, list[QualityRow]] = {}
    for q in quality or []:
        if q[0] >= since:
            compared.setdefault(q[1], []).append(q)
    out = {}
    for v, rs in by.items():
        qs = compared.get(v, [])
        out[v] = VersionStats(len(rs), sum(not r[2] for r in rs), float(np.percentile([r[3] for r in rs], 99)), len(qs),
                              float(np.mean([q[2] for q in qs])) if qs else 0.0, float(np.mean([q[3] for q in qs])) if qs else 0.0)
    return out


class TrafficMonitor:
    """The named actor (num_cpus=0: it must not take a scorer's CPU on a small host)."""

    def __init__(self, horizon_s: float = 3600.0, max_rows: int = 500_000) -> None:
        # max_rows bounds the actor's memory (about 60 MB) when a challenger takes heavy traffic for an hour:
        # the window then starts at the oldest row kept, still hundreds of thousands of requests.
        self.rows: deque[Row] = deque(maxlen=max_rows)
        self.quality: deque[QualityRow] = deque(maxlen=max_rows)
        self.horizon_s = horizon_s

    def record(self, rows: list[Row], quality: list[QualityRow] | None = None) -> None:
        self.rows.extend(rows)
        self.quality.extend(quality or [])
        cutoff = time.time() - self.horizon_s
        for kept in (self.rows, self.quality):
            while kept and kept[0][0] < cutoff:
                kept.popleft()

    def window(self, since: float) -> dict[str, VersionStats]:
        return summarize(list(self.rows), since, list(self.quality))


def monitor(model_name: str, create: bool = True) -> Any:
    """The model's monitor actor on the connected Ray cluster (created detached on first use, so a replica's
    death or restart loses none of the evidence)."""
    import ray

    name = f"traffic:{model_name}"
    if not create:
        return ray.get_actor(name, namespace=NAMESPACE)
    return ray.remote(num_cpus=0)(TrafficMonitor).options(  # type: ignore[attr-defined]
        name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote()


class Reporter:
    """Replica side: buffers rows and sends them from a background thread, off the request path."""

    def __init__(self, model_name: str, interval_s: float = 0.5) -> None:
        self.model_name, self.interval_s = model_name, interval_s
        self._rows: list[Row] = []
        self._quality: list[QualityRow] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True, name="adsfm-traffic-report").start()

    def __call__(self, version: str, ok: bool, latency_ms: float) -> None:
        with self._lock:
            self._rows.append((time.time(), version, ok, latency_ms))

    def quality(self, version: str, score_shift: float, disagreement: float) -> None:
        with self._lock:
            self._quality.append((time.time(), version, score_shift, disagreement))

    def _run(self) -> None:
        import logging

        actor = None
        while True:
            time.sleep(self.interval_s)
            with self._lock:
                rows, self._rows = self._rows, []
                quality, self._quality = self._quality, []
            if not rows and not quality:
                continue
            try:
                actor = actor or monitor(self.model_name)
                actor.record.remote(rows, quality)
            except Exception:  # the evidence is best effort; serving goes on without it
                logging.getLogger("ray.serve").exception("adsfm: traffic report failed")
                actor = None
