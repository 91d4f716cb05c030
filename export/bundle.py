"""Checkpoint (any world size) → bundle directory: manifest, dense.onnx, per-table files, item store;
parity-checked against the eager model."""

from __future__ import annotations

import hashlib
import json
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from export.card import write_card
from export.manifest import DenseFeatureSpec, Manifest, SparseFeatureSpec, TableSpec
from export.onnx import export_dense
from export.parity import check_parity, parity_rows, require_parity
from export.sparse import PRECISIONS, export_table, load_table
from serving.ranker import Ranker
from training.checkpoint import load_into_unsharded
from training.config import AdsfmConfig
from training.data import FeatureSet, load_features
from training.models import build_model
from training.models.dlrm import DLRMDense, table_configs


def load_trained_model(cfg: AdsfmConfig, checkpoint: Path, fs: FeatureSet) -> nn.Module:
    """The whole eager model on CPU with the checkpoint's weights, without starting the training world."""
    model = build_model(fs.spec, cfg.model, device="cpu")
    load_into_unsharded(model, checkpoint)
    return model.eval()


def load_dense(cfg: AdsfmConfig, checkpoint: Path, fs: FeatureSet) -> DLRMDense:
    """Only the dense arch from the checkpoint (no tables)."""
    dense = DLRMDense(len(fs.spec["dense"]), len(fs.spec["sparse"]), cfg.model)
    state = {"model": {f"dense.{k}": v for k, v in dense.state_dict().items()}}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    dense.load_state_dict({k.removeprefix("dense."): v for k, v in state["model"].items()})
    return dense.eval()


@torch.no_grad()
def streamed_eager_probs(cfg: AdsfmConfig, checkpoint: Path, fs: FeatureSet, dense: DLRMDense, idx: np.ndarray) -> np.ndarray:
    """The eager model's probabilities for rows `idx`, one table in memory at a time: each table is loaded,
    its features pooled for those rows with torch's embedding_bag, and dropped."""
    batch = fs.take(idx)
    jts = batch.sparse_features.to_dict()
    pooled: dict[str, torch.Tensor] = {}
    for c in table_configs(fs.spec, cfg.model.embedding_dim):
        w = load_table(checkpoint, f"sparse.embedding_bags.{c.name}.weight", (c.num_embeddings, c.embedding_dim))
        mode = fs.spec["tables"][c.name]["pooling"]
        for f in c.feature_names:
            jt = jts[f]
            pooled[f] = F.embedding_bag(jt.values(), w, jt.offsets()[:-1], mode=mode)
        del w
    emb = torch.stack([pooled[f["name"]] for f in fs.spec["sparse"]], dim=1)
    return torch.sigmoid(dense(batch.dense_features, emb)).double().numpy()


def table_precisions(cfg: AdsfmConfig, tables: list[str]) -> dict[str, str]:
    e = cfg.export
    unknown = sorted(set(e.table_precision) - set(tables))
    if unknown:
        raise ValueError(f"export.table_precision names {unknown}, which the model does not have; tables: {tables}")
    out = {t: e.table_precision.get(t, e.precision) for t in tables}
    for t, p in out.items():
        if p not in PRECISIONS:
            raise ValueError(f"export precision of table {t!r} = {p!r}: choose from {list(PRECISIONS)}")
    return out


def config_hash(cfg: AdsfmConfig) -> str:
    """Hash of the resolved config, without the fields that name this particular run."""
    c = OmegaConf.to_container(OmegaConf.structured(cfg) if not OmegaConf.is_config(cfg) else cfg, resolve=True)
    assert isinstance(c, dict)
    for k in ("run_dir", "run_root", "experiment_name"):
        c.pop(k, None)
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def export_bundle(cfg: AdsfmConfig, checkpoint: Path, out: Path, train_run_id: str = "") -> Manifest:
    """Write the bundle to `out` and check parity; raises ParityError (after writing) if it fails.

    Tables are streamed from the checkpoint one at a time (load, quantize, write, drop), for the bundle and
    for the eager reference alike, so export holds about 2x the largest table, never the whole model.
    """
    if cfg.model.name == "hstu":
        return _export_sequence(cfg, checkpoint, out, train_run_id)
    out.mkdir(parents=True, exist_ok=True)
    fs = load_features(cfg.data)
    configs = table_configs(fs.spec, cfg.model.embedding_dim)
    precision = table_precisions(cfg, [c.name for c in configs])
    tables: dict[str, TableSpec] = {}
    for c in configs:
        w = load_table(checkpoint, f"sparse.embedding_bags.{c.name}.weight", (c.num_embeddings, c.embedding_dim))
        file = f"table_{c.name}.safetensors"
        nbytes = export_table(w, precision[c.name], out / file)
        t = fs.spec["tables"][c.name]
        tables[c.name] = TableSpec(
            rows=c.num_embeddings, dim=c.embedding_dim, pooling=t["pooling"], precision=precision[c.name],  # type: ignore[arg-type]
            file=file, bytes=nbytes, hash_buckets=t["hash_buckets"], vocab=t["vocab"],
        )
        del w
    dense = load_dense(cfg, checkpoint, fs)
    export_dense(dense, len(fs.spec["dense"]), len(fs.spec["sparse"]), cfg.model.embedding_dim, out / "dense.onnx", cfg.export.opset)
    (out / "item_store.json").write_text(json.dumps(fs.spec.get("item_store", {})))
    manifest = Manifest(
        embedding_dim=cfg.model.embedding_dim,
        sparse=[SparseFeatureSpec(**f) for f in fs.spec["sparse"]],
        dense=[DenseFeatureSpec(**d) for d in fs.spec["dense"]],
        tables=tables,
        item_column=fs.spec.get("item_column"),
        user_column=fs.spec.get("user_column"),
        **provenance(cfg, checkpoint, fs, train_run_id),
    )
    manifest.write(out)
    rows = parity_rows(fs, cfg.export.parity_rows)
    manifest.parity, probs = check_parity(
        streamed_eager_probs(cfg, checkpoint, fs, dense, rows), Ranker(out), fs, rows, cfg.export.parity_tolerance,
        cfg.export.auc_margin, quantized=any(t.precision != "fp32" for t in tables.values()),
    )
    manifest.write(out)
    write_card(manifest, probs, fs.labels[rows], out / "card", loss_curve=checkpoint.parent.parent / "loss_curve.png")
    require_parity(manifest.parity)
    return manifest


def provenance(cfg: AdsfmConfig, checkpoint: Path, fs: FeatureSet, train_run_id: str) -> dict[str, Any]:
    """The manifest fields that say where a bundle came from."""
    return {
        "versions": {p: version(p) for p in ("torch", "torchrec", "fbgemm-gpu-cpu", "onnx", "onnxruntime", "adsfm") if _installed(p)},
        "data_fingerprint": fs.spec.get("fingerprint", ""),
        "source_checkpoint": str(checkpoint),
        "train_run_id": train_run_id,
        "config_hash": config_hash(cfg),
        "git_commit": git_commit(),
        "data_config": _data_config(cfg),
    }


def _export_sequence(cfg: AdsfmConfig, checkpoint: Path, out: Path, train_run_id: str) -> Manifest:
    """The split bundle of a sequence model: the tables are small next to a DLRM's, so the eager model is
    loaded whole and the parity reference is its joint forward."""
    from export.sequence import export_sequence_bundle, sequence_parity
    from training.models.hstu import HSTURanker

    fs = load_features(cfg.data)
    model = load_trained_model(cfg, checkpoint, fs)
    assert isinstance(model, HSTURanker)
    precision = table_precisions(cfg, [c.name for c in model.sparse.embedding_configs()])
    manifest = export_sequence_bundle(model, fs, out, precision, cfg.export.opset, provenance(cfg, checkpoint, fs, train_run_id))
    rows = parity_rows(fs, cfg.export.parity_rows)
    manifest.parity, probs = sequence_parity(model, out, fs, rows, cfg.export.parity_tolerance, cfg.export.auc_margin,
                                             quantized=any(p != "fp32" for p in precision.values()))
    manifest.write(out)
    write_card(manifest, probs, fs.labels[rows], out / "card", loss_curve=checkpoint.parent.parent / "loss_curve.png")
    require_parity(manifest.parity)
    return manifest


def _installed(pkg: str) -> bool:
    try:
        version(pkg)
        return True
    except Exception:
        return False


def _data_config(cfg: AdsfmConfig) -> dict[str, Any]:
    c = OmegaConf.to_container(OmegaConf.structured(cfg.data) if not OmegaConf.is_config(cfg.data) else cfg.data, resolve=True)
    assert isinstance(c, dict)
    return {str(k): v for k, v in c.items()}


def load_run(run_dir: Path) -> tuple[AdsfmConfig, dict[str, Any]]:
    """The resolved config and training result a run directory holds."""
    cfg_path, result_path = run_dir / "config.yaml", run_dir / "train_result.json"
    for p in (cfg_path, result_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: is {run_dir} a finished adsfm-train run directory?")
    cfg = OmegaConf.merge(OmegaConf.structured(AdsfmConfig), OmegaConf.load(cfg_path))
    return cfg, json.loads(result_path.read_text())  # type: ignore[return-value]
