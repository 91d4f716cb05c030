"""Checkpoint (any world size) → bundle directory: manifest, dense.onnx, tables, item store; parity-checked."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from export.manifest import DenseFeatureSpec, Manifest, SparseFeatureSpec, TableSpec
from export.onnx import export_dense
from export.parity import check_parity, require_parity
from export.sparse import export_tables
from serving.ranker import Ranker
from training.checkpoint import load_into_unsharded
from training.config import AdsfmConfig
from training.data import FeatureSet, load_features
from training.models.dlrm import DLRMRanker


def load_trained_model(cfg: AdsfmConfig, checkpoint: Path, fs: FeatureSet) -> DLRMRanker:
    """The eager model on CPU with the checkpoint's weights, without starting the training world."""
    model = DLRMRanker(fs.spec, cfg.model, device="cpu")
    load_into_unsharded(model, checkpoint)
    return model.eval()


def build_manifest(cfg: AdsfmConfig, fs: FeatureSet, shapes: dict[str, tuple[int, int]]) -> Manifest:
    spec = fs.spec
    tables = {
        name: TableSpec(
            rows=shapes[name][0], dim=shapes[name][1], pooling=t["pooling"], hash_buckets=t["hash_buckets"], vocab=t["vocab"]
        )
        for name, t in spec["tables"].items()
    }
    versions = {p: version(p) for p in ("torch", "torchrec", "onnx", "onnxruntime", "adsfm")}
    return Manifest(
        embedding_dim=cfg.model.embedding_dim,
        sparse=[SparseFeatureSpec(**f) for f in spec["sparse"]],
        dense=[DenseFeatureSpec(**d) for d in spec["dense"]],
        tables=tables,
        item_column=spec.get("item_column"),
        user_column=spec.get("user_column"),
        versions=versions,
        data_fingerprint=spec.get("fingerprint", ""),
    )


def export_bundle(cfg: AdsfmConfig, checkpoint: Path, out: Path, train_run_id: str = "") -> Manifest:
    """Write the bundle to `out` and check parity; raises ParityError (after writing) if it fails."""
    out.mkdir(parents=True, exist_ok=True)
    fs = load_features(cfg.data)
    model = load_trained_model(cfg, checkpoint, fs)
    shapes = export_tables(model.sparse, out / "tables.safetensors")
    export_dense(model.dense, len(fs.spec["dense"]), len(fs.spec["sparse"]), cfg.model.embedding_dim, out / "dense.onnx", cfg.export.opset)
    (out / "item_store.json").write_text(json.dumps(fs.spec.get("item_store", {})))
    manifest = build_manifest(cfg, fs, shapes)
    manifest.source_checkpoint = str(checkpoint)
    manifest.train_run_id = train_run_id
    manifest.write(out)
    manifest.parity = check_parity(model, Ranker(out), fs, cfg.export.parity_rows, cfg.export.parity_tolerance)
    manifest.write(out)
    require_parity(manifest.parity)
    return manifest


def load_run(run_dir: Path) -> tuple[AdsfmConfig, dict[str, Any]]:
    """The resolved config and training result a run directory holds."""
    cfg_path, result_path = run_dir / "config.yaml", run_dir / "train_result.json"
    for p in (cfg_path, result_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: is {run_dir} a finished adsfm-train run directory?")
    cfg = OmegaConf.merge(OmegaConf.structured(AdsfmConfig), OmegaConf.load(cfg_path))
    return cfg, json.loads(result_path.read_text())  # type: ignore[return-value]


