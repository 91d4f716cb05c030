"""Continuous training: a trained model follows a directory of new event files and publishes, every
`continuous.publish_every_s`, the embedding rows it changed (TorchRec's ModelDeltaTracker names them).

    trainer = ContinuousTrainer(cfg, spec, base_checkpoint, work_dir, publish)
    trainer.run()        # until continuous.idle_exit_s without a new file (0: until stopped)

Each event is scored before it is trained on (progressive validation): the window's AUC and logloss travel
with the delta and gate it. A delta is published only after the checkpoint of the state it holds is
complete, and it records the source position after its last event; a trainer killed at any moment restarts
from the last published delta's checkpoint and position, so the events after it are trained again from
that state, and no event is trained twice into a published model or skipped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torchrec.distributed.model_tracker.types import DeltaTrackerConfig, TrackingMode

from adsfm.contract.config import AdsfmConfig
from adsfm.contract.delta import DeltaInfo, DeltaLog
from adsfm.contract.features import FeatureSpec
from adsfm.parallel.shard import parallelize_model
from adsfm.training.checkpoint import checkpoint_holds, has_optimizer_state, load_checkpoint, save_checkpoint
from adsfm.training.data import FeatureSet, featurize_frame, task_labels, timestamps
from adsfm.training.loop import train_step
from adsfm.training.managed import ManagedIds, reset_rows, table_shards
from adsfm.training.metrics import ranking_metrics
from adsfm.training.models import build_model
from adsfm.training.worker import optim_config

logger = logging.getLogger(__name__)

Publish = Callable[[DeltaInfo, dict[str, tuple[np.ndarray, torch.Tensor]], bool, dict[str, np.ndarray]], DeltaInfo]
"""publish(info, {table: (sorted rows, their fp32 values)}, with_dense_graph, {managed table: slot keys}) ->
the published DeltaInfo; adsfm.export.delta writes the rows in the served precision, with the id each
managed row holds."""


class EventFiles:
    """Parquet files in `directory`, in name order; file `i` featurized by the base model's spec."""

    def __init__(self, directory: Path, cfg: AdsfmConfig, spec: FeatureSpec, managed: ManagedIds | None = None) -> None:
        self.directory, self.cfg, self.spec, self.managed = directory, cfg, spec, managed

    def ready(self) -> list[Path]:
        return sorted(p for p in self.directory.glob("*.parquet") if p.is_file())

    def read(self, path: Path) -> tuple[FeatureSet, np.ndarray]:
        """The file's events as model inputs, in event-time order, and their event times (Unix seconds)."""
        d = self.cfg.data
        df = pd.read_parquet(path)
        if d.time_column and d.time_column in df.columns:
            times = timestamps(df[d.time_column], d.time_column, frozenset(d.na_values))
            order = np.argsort(times, kind="stable")
            df, times = df.iloc[order].reset_index(drop=True), times[order]
        else:  # no event time: the file's arrival stands for it
            times = np.full(len(df), int(path.stat().st_mtime), dtype=np.int64)
        try:
            dense, sparse = featurize_frame(df, self.spec)
            labels = task_labels(df, d)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None
        n = len(df)
        fs = FeatureSet(dense=dense, sparse=sparse, labels=labels, train_idx=np.arange(n), holdout_idx=np.zeros(0, np.int64),
                        users=None, times=times, spec=self.spec, managed=self.managed)
        return fs, times


class ContinuousTrainer:
    def __init__(self, cfg: AdsfmConfig, spec: FeatureSpec, base_checkpoint: Path, work_dir: Path, publish: Publish) -> None:
        # setup: the base model's layout, its checkpoint (or the last published delta's), the delta tracker
        c = cfg.continuous
        if not c.source_dir:
            raise ValueError("continuous.source_dir is required: the directory where event files land")
        if c.publish_every_s < 0 or c.dense_every < 0 or c.max_row_change <= 0 or not 0 <= c.auc_floor < 1 or c.poll_s <= 0:
            raise ValueError(f"continuous: publish_every_s({c.publish_every_s}) >= 0, dense_every({c.dense_every}) >= 0, "
                             f"max_row_change({c.max_row_change}) > 0, 0 <= auc_floor({c.auc_floor}) < 1, poll_s({c.poll_s}) > 0")
        if any("column" in str(st) for st in cfg.parallel.sharding_types):
            raise ValueError(f"parallel.sharding_types={list(cfg.parallel.sharding_types)}: a delta holds whole rows; "
                             "column-wise shards hold parts of rows: use table_wise or row_wise")
        self.cfg, self.spec, self.work_dir, self.publish_fn = cfg, spec, work_dir, publish
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.managed = ManagedIds(spec) if any(t.managed for t in spec.tables.values()) else None  # from the bundle's remap
        self.source = EventFiles(Path(c.source_dir), cfg, spec, self.managed)
        self.log = DeltaLog(c.delta_log or work_dir / "deltas")
        model = build_model(spec, cfg.model, device="meta")
        self.model, self.optimizer, _ = parallelize_model(model, cfg.parallel, optim_config(cfg), torch.device("cpu"))  # type: ignore[arg-type]
        self.optimizer.init_state()  # materialize lazy optimizer state so the checkpoint loads in place
        last = self.log.last()
        start = Path(last.checkpoint) if last else base_checkpoint
        # a base saved without optimizer state starts its optimizer afresh; every delta's checkpoint has it
        load_checkpoint(self.model, start, self.optimizer if has_optimizer_state(start) else None,
                        self.managed if self.managed and checkpoint_holds(start, "managed") else None)
        self.seq = last.seq if last else 0
        # rows [0, row) of `file` (of `rows`) and every file named before it are trained
        self.position: dict[str, int | str] = dict(last.position) if last else {"file": "", "row": 0, "rows": 0}
        self.watermark = last.watermark if last else 0.0
        if self.rank == 0:
            print(f"[adsfm] continuous: from {start} at delta {self.seq}, position {self.position}", flush=True)
        self.model.init_torchrec_delta_tracker(DeltaTrackerConfig(tracking_mode=TrackingMode.ID_ONLY, delete_on_read=True))
        self.tracker = self.model.get_delta_tracker()
        self.shards = table_shards(self.model)
        self.slots = self._slot_keys()  # the remap as the last delta published it
        self.tables_of = {f.name: f.table_name for f in spec.sparse}
        self.first: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # rows touched this window: values before
        self.window: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])  # probabilities, labels
        self.steps_since = 0
        self.published: list[DeltaInfo] = []
        self._pending: dict[str, tuple[np.ndarray, torch.Tensor]] = {}  # this rank's rows of a held-back delta

    # -------------------------------------------------------------------------------------------- run

    def run(self) -> list[DeltaInfo]:
        """Train on every event as it lands; publish every publish_every_s; stop after idle_exit_s idle."""
        c = self.cfg.continuous
        self._last_publish = last_new = time.monotonic()
        while True:
            path = self._next_file()
            if path is not None:
                self._train_file(path)
                last_new = time.monotonic()
            elif c.idle_exit_s and time.monotonic() - last_new > c.idle_exit_s:
                self.maybe_publish()
                return self.published
            else:
                time.sleep(c.poll_s)
            self._publish_if_due()

    def _next_file(self) -> Path | None:
        """The file being read (a partly trained one, after a restart), else the first named after it."""
        p = self.position
        for f in self.source.ready():
            if (f.name == p["file"] and int(p["row"]) < int(p["rows"])) or f.name > str(p["file"]):
                return f
        return None

    def _publish_if_due(self) -> None:
        if time.monotonic() - self._last_publish >= self.cfg.continuous.publish_every_s and self.maybe_publish():
            self._last_publish = time.monotonic()

    def _train_file(self, path: Path) -> None:
        try:
            fs, times = self.source.read(path)
        except (OSError, ValueError) as e:  # a bad file is passed over, said and recorded, never half-trained
            self.position = {"file": path.name, "row": 0, "rows": 0}
            self._reject(path, str(e))
            return
        bs = self.cfg.train.batch_size
        start = int(self.position["row"]) if self.position["file"] == path.name else 0
        self.position = {"file": path.name, "row": start, "rows": len(times)}
        for lo in range(start, len(times), bs):  # the file's tail trains as a smaller batch: nothing waits for more
            idx = np.arange(lo, min(lo + bs, len(times)))
            batch = fs.take(idx)
            self._score(batch)
            if self.managed:  # taken again to train: its new ids may take rows (zeroed) first
                batch = fs.take(idx, train=True)
                reset_rows(self.shards, self.managed.evicted())
            self._remember_first(batch)
            train_step(self.model, self.optimizer, batch)
            self.steps_since += 1
            self.position = {"file": path.name, "row": int(idx[-1]) + 1, "rows": len(times)}
            self.watermark = max(self.watermark, float(times[idx[-1]]))
            self._publish_if_due()

    def _reject(self, path: Path, why: str) -> None:
        """A file that cannot be trained on: named on the console and in rejected.jsonl beside the deltas."""
        print(f"[adsfm] continuous: {path.name} passed over: {why}", flush=True)
        if self.rank == 0:
            self.log.path.mkdir(parents=True, exist_ok=True)
            with open(self.log.path / "rejected.jsonl", "a") as f:
                f.write(json.dumps({"file": str(path), "reason": why, "at": time.time()}) + "\n")

    @torch.no_grad()
    def _score(self, batch: Any) -> None:
        """Progressive validation: the batch scored by the model before it trains on it."""
        logits = self.model(batch.dense_features, batch.sparse_features)
        self.window[0].append(torch.sigmoid(logits.float()).reshape(len(batch.labels), -1)[:, 0].numpy())
        self.window[1].append(batch.labels.reshape(len(batch.labels), -1)[:, 0].numpy())

    def _remember_first(self, batch: Any) -> None:
        """Each row's value the first time this window touches it, for the row-change gate."""
        kjt = batch.sparse_features
        by_table: dict[str, list[torch.Tensor]] = {}
        for key in kjt.keys():  # noqa: SIM118  a KeyedJaggedTensor is not iterable
            by_table.setdefault(self.tables_of[key], []).append(kjt[key].values())
        for table, parts in by_table.items():
            weight, offset = self.shards[table]
            ids = torch.cat(parts).unique()
            ids = ids[(ids >= offset) & (ids < offset + weight.shape[0])]
            seen = self.first.get(table)
            if seen is not None:
                ids = ids[~torch.isin(ids, seen[0])]
            values = weight[ids - offset].detach().float().clone()
            self.first[table] = (ids, values) if seen is None else (torch.cat([seen[0], ids]), torch.cat([seen[1], values]))

    # ---------------------------------------------------------------------------------------- publish

    def maybe_publish(self) -> bool:
        """Checkpoint, gate and publish the rows changed since the last delta; False when nothing was trained
        or the gate held the delta back (its rows then wait for the next one)."""
        if self.steps_since == 0:
            return False
        local = self._local_changed()
        changed = self._gathered(local)
        window = self._window_metrics()
        held = self._gate(changed, window)
        if held:
            logger.warning("adsfm: delta %d held back: %s", self.seq + 1, held)
            print(f"[adsfm] delta {self.seq + 1} held back: {held}", flush=True)
            self._pending, self.steps_since = local, 0  # the rows wait for the next delta, which waits for a step
            return False
        seq = self.seq + 1
        ckpt = save_checkpoint(self.model, self.work_dir / "checkpoints" / f"step_{seq}", self.optimizer,
                               {"seq": seq, "position": self.position}, keep=3, managed=self.managed)
        every = self.cfg.continuous.dense_every
        info = DeltaInfo(seq=seq, watermark=self.watermark, window=window, position=self.position, checkpoint=str(ckpt))
        if self.rank == 0:
            info = self.publish_fn(info, {t: (r, v) for t, (r, v) in changed.items()}, bool(every) and seq % every == 0,
                                   self._slot_keys())
            self.published.append(info)
            print(f"[adsfm] delta {seq}: {sum(info.rows.values()):,} rows, {info.bytes:,} bytes, window auc "
                  f"{window.get('auc', float('nan')):.4f} over {int(window.get('n', 0))} events", flush=True)
        self.seq, self.steps_since, self.first, self.window = seq, 0, {}, ([], [])
        self._pending, self.slots = {}, self._slot_keys()
        return True

    def _slot_keys(self) -> dict[str, np.ndarray]:
        return {t: self.managed.slot_keys(t) for t in self.managed.tables} if self.managed else {}

    def _moved(self, table: str) -> torch.Tensor:
        """Rows of a managed table that hold another id than at the last delta (global row numbers)."""
        if table not in self.slots:
            return torch.zeros(0, dtype=torch.long)
        now = self.managed.slot_keys(table) if self.managed else self.slots[table]
        return torch.from_numpy(np.flatnonzero(now != self.slots[table]) + self.spec.tables[table].first)

    def _local_changed(self) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
        """This rank's rows the tracker saw since the last read (with any held back), as global row numbers,
        and their values now."""
        out: dict[str, tuple[np.ndarray, torch.Tensor]] = {}
        touched = {fqn.removeprefix("sparse.embedding_bags."): local.long() for fqn, local in self.tracker.get_unique_ids().items()}
        for table in set(touched) | set(self.slots):
            weight, offset = self.shards[table]
            moved = self._moved(table)  # a row given to another id goes out with its new id, looked up or not
            moved = moved[(moved >= offset) & (moved < offset + weight.shape[0])] - offset
            rows = torch.cat([touched.get(table, torch.zeros(0, dtype=torch.long)), moved])
            held = self._pending.get(table)
            if held is not None:
                rows = torch.cat([rows, torch.from_numpy(held[0]) - offset])
            rows = rows.unique()  # sorted
            out[table] = ((rows + offset).numpy(), weight[rows].detach().float().clone())
        return out

    def _gathered(self, local: dict[str, tuple[np.ndarray, torch.Tensor]]) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
        """Every rank's changed rows, sorted, on every rank."""
        if self.world == 1:
            return {t: rv for t, rv in local.items() if len(rv[0])}
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, local)
        merged: dict[str, tuple[np.ndarray, torch.Tensor]] = {}
        for part in parts:
            for t, (r, v) in part.items():
                if t in merged:
                    r, v = np.concatenate([merged[t][0], r]), torch.cat([merged[t][1], v])
                merged[t] = (r, v)
        return {t: (r[np.argsort(r)], v[torch.from_numpy(np.argsort(r))]) for t, (r, v) in merged.items() if len(r)}

    def _window_metrics(self) -> dict[str, float]:
        probs, labels = self.window
        if not probs:
            return {}
        p, y = np.concatenate(probs), np.concatenate(labels)
        if len(np.unique(y)) < 2:
            return {"n": float(len(y))}
        return {k: v for k, v in ranking_metrics(torch.from_numpy(p), torch.from_numpy(y)).items() if k in ("auc", "logloss", "n")}

    def _gate(self, changed: dict[str, tuple[np.ndarray, torch.Tensor]], window: dict[str, float]) -> str:
        """Why the delta must not go out ('' when it may)."""
        c = self.cfg.continuous
        for table, (rows, values) in changed.items():
            if not torch.isfinite(values).all():
                raise RuntimeError(f"continuous training diverged: table {table!r} has non-finite rows; nothing published after delta {self.seq}")
            first = self.first.get(table)
            if first is None or not len(first[0]):
                continue
            order = torch.argsort(first[0])
            before_rows, before = first[0][order], first[1][order]
            now = torch.from_numpy(rows)
            pos = torch.searchsorted(before_rows, now).clamp(max=len(before_rows) - 1)
            hit = before_rows[pos] == now
            if hit.any():
                change = float((values[hit] - before[pos[hit]]).norm(dim=1).max())
                if change > c.max_row_change:
                    return f"table {table!r}: a row moved by {change:.3g} (continuous.max_row_change={c.max_row_change})"
        if c.auc_floor and "auc" in window and window["auc"] < c.auc_floor:
            return f"window AUC {window['auc']:.4f} < continuous.auc_floor={c.auc_floor}"
        return ""
