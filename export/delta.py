"""Deltas in the served precision: the continuous trainer's changed rows quantized exactly as export
quantizes the bundle's tables (export.sparse.quantize), a managed table's rows with the ids they hold (the
remap moved on), and every `continuous.dense_every` deltas the dense
graph from the delta's checkpoint, published into the delta log (adsfm.contract.delta)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from adsfm.contract.config import AdsfmConfig
from adsfm.contract.delta import DeltaInfo, DeltaLog, TableRows
from adsfm.contract.manifest import Manifest
from adsfm.export.bundle import load_dense
from adsfm.export.onnx import export_dense
from adsfm.export.sparse import quantize


class DeltaPublisher:
    """publish(info, {table: (rows, fp32 values)}, with_dense_graph): the continuous trainer's Publish."""

    def __init__(self, cfg: AdsfmConfig, manifest: Manifest, log: DeltaLog) -> None:
        self.cfg, self.manifest, self.log = cfg, manifest, log

    def tables(self, changed: dict[str, tuple[np.ndarray, torch.Tensor]], slots: dict[str, np.ndarray] | None = None
               ) -> dict[str, TableRows]:
        """Each table's rows in the served precision; a managed table's with `keys`, the id each row holds
        (-1: none, as for its unknown and missing rows), from `slots` (the remap's slot keys)."""
        out: dict[str, TableRows] = {}
        for name, (rows, values) in changed.items():
            if name not in self.manifest.tables:
                raise ValueError(f"delta: table {name!r} is not in the served bundle ({sorted(self.manifest.tables)})")
            out[name] = {"rows": rows.astype(np.int64), **quantize(values, self.manifest.tables[name].precision)}
            t = self.manifest.features.tables[name]
            if t.managed:
                keys = (slots or {}).get(name)
                if keys is None:
                    raise ValueError(f"delta: table {name!r} is managed: its rows need the ids they hold")
                at = rows.astype(np.int64) - t.first
                out[name]["keys"] = np.where(at >= 0, keys[np.clip(at, 0, len(keys) - 1)], -1).astype(np.int64)
        return out

    def dense_graph(self, checkpoint: Path) -> bytes:
        spec = self.manifest.features
        dense = load_dense(self.cfg, checkpoint, spec)
        with tempfile.TemporaryDirectory(prefix="adsfm-delta-") as d:
            path = export_dense(dense, len(spec.dense_inputs()), len(spec.sparse), self.manifest.embedding_dim, Path(d) / "dense.onnx",
                                self.cfg.export.opset)
            return path.read_bytes()

    def __call__(self, info: DeltaInfo, changed: dict[str, tuple[np.ndarray, torch.Tensor]], with_dense: bool,
                 slots: dict[str, np.ndarray] | None = None) -> DeltaInfo:
        graph = self.dense_graph(Path(info.checkpoint)) if with_dense else None
        return self.log.publish(info, self.tables(changed, slots), graph)
