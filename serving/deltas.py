"""A replica following a delta log (adsfm.contract.delta): new deltas applied in order, live, to its engine.

    follower = DeltaFollower(engine, log_dir)
    follower.poll()                 # apply whatever was published since the last poll
    follower.start(interval_s=0.5)  # or poll in a daemon thread

A delta that fails to apply (a bad file, rows out of range) stops the follower at the last good delta: the
replica keeps serving that state, counts the error, and tries again at the next poll. A rolled-back log
(a new generation) takes the engine back to its base and applies the deltas left, in order. A table whose
overlay grows past `compact_fraction` of its rows is compacted here, off the request path.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from adsfm.contract.delta import DeltaLog

logger = logging.getLogger(__name__)


class DeltaFollower:
    def __init__(self, engine: Any, log: str | Path, compact_fraction: float = 0.05, compact_dir: Path | None = None) -> None:
        """`compact_fraction`: a table whose overlay holds this share of its rows is folded into a copy of its
        base (under `compact_dir`, default beside the bundle), so the overlay stays small; 0: never."""
        self.engine, self.log = engine, DeltaLog(log)
        self.compact_fraction = compact_fraction
        self.compact_dir = compact_dir  # default: a directory of this follower's own beside the bundle, made when first needed
        self.compactions = 0
        self.generation = self.log.generation()
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def lag_s(self) -> float | None:
        """Seconds from the newest applied event to now; None before the first delta."""
        w = self.engine.watermark
        return (time.time() - w) if w else None

    def poll(self) -> int:
        """Apply the deltas published since the last poll; returns how many were applied."""
        with self._lock:
            generation = self.log.generation()
            if generation != self.generation:
                logger.warning("adsfm: delta log %s rolled back (generation %d): back to the base, then its deltas again",
                               self.log.path, generation)
                self.engine.reset_deltas()
                self.generation = generation
            applied = 0
            for info in self.log.published(after=self.engine.applied_seq):
                try:
                    self.engine.apply_delta(info.seq, info.watermark, self.log.tables(info), self.log.dense_graph(info))
                except Exception:
                    self.errors += 1
                    logger.exception("adsfm: delta %d of %s failed to apply; serving delta %d", info.seq, self.log.path,
                                     self.engine.applied_seq)
                    break
                applied += 1
            if applied and self.compact_fraction > 0:
                self._compact()
            return applied

    def _compact(self) -> None:
        tables = self.engine.manifest.features.tables
        for name, overlay in list(self.engine.overlays.items()):
            if len(overlay.rows) >= max(1.0, self.compact_fraction * tables[name].rows):
                if self.compact_dir is None:
                    bundle = self.engine.bundle
                    self.compact_dir = Path(tempfile.mkdtemp(prefix=f"{bundle.name}.compacted-", dir=bundle.parent))
                self.engine.compact(name, self.compact_dir)
                self.compactions += 1

    def start(self, interval_s: float) -> DeltaFollower:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.poll()
                except Exception:  # an unreadable log must not kill the replica
                    self.errors += 1
                    logger.exception("adsfm: reading delta log %s failed", self.log.path)

        threading.Thread(target=loop, daemon=True, name="adsfm-delta-follow").start()
        return self

    def stop(self) -> None:
        self._stop.set()
