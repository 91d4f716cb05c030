"""Deltas in the served precision: the continuous trainer's changed rows quantized exactly as export
quantizes the bundle's tables (export.sparse.quantize), and every `continuous.dense_every` deltas the dense
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

    def tables(self, changed: dict[str, tuple[np.ndarray, torch.Tensor]]) -> dict[str, TableRows]:
        out: dict[str, TableRows] = {}
        for name, (rows, values) in changed.items():
            if name not in self.manifest.tables:
                raise ValueError(f"delta: table {name!r} is not in the served bundle ({sorted(self.manifest.tables)})")
            out[name] = {"rows": rows.astype(np.int64), **quantize(values, self.manifest.tables[name].precision)}
        return out

    def dense_graph(self, checkpoint: Path) -> bytes:
        spec = self.manifest.features
        dense = load_dense(self.cfg, checkpoint, spec)
        with tempfile.TemporaryDirectory(prefix="adsfm-delta-") as d:
            path = export_dense(dense, len(spec.dense_inputs()), len(spec.sparse), self.manifest.embedding_dim, Path(d) / "dense.onnx",
                                self.cfg.export.opset)
            return path.read_bytes()

    def __call__(self, info: DeltaInfo, changed: dict[str, tuple[np.ndarray, torch.Tensor]], with_dense: bool) -> DeltaInfo:
        graph = self.dense_graph(Path(info.checkpoint)) if with_dense else None
        return self.log.publish(info, self.tables(changed), graph)
