"""Checkpoint (any world size) → bundle directory: manifest, dense.onnx, per-table files, item store;
parity-checked against the eager model."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from adsfm.contract.config import AdsfmConfig, Arch, Precision, to_plain, typed
from adsfm.contract.features import FeatureSpec
from adsfm.contract.manifest import Manifest, TableFile
from adsfm.export.card import write_card
from adsfm.export.onnx import export_dense
from adsfm.export.parity import (
    check_parity,
    featurization_parity,
    parity_rows,
    require_parity,
    write_reference,
)
from adsfm.export.sparse import StoredTable, export_table
from adsfm.serving.engine import DenseGraphEngine
from adsfm.training.checkpoint import load_into_unsharded, load_managed
from adsfm.training.data import FeatureSet, load_features, load_frame
from adsfm.training.models import build_model
from adsfm.training.models.pooled import dense_module, table_configs, table_dim


def load_trained_model(cfg: AdsfmConfig, checkpoint: Path, fs: FeatureSet) -> nn.Module:
    """The whole eager model on CPU with the checkpoint's weights, without starting the training world."""
    model = build_model(fs.spec, cfg.model, device="cpu")
    load_into_unsharded(model, checkpoint)
    return model.eval()


def features_at(cfg: AdsfmConfig, checkpoint: Path) -> FeatureSet:
    """The training features, and with managed tables the checkpoint's remap: taken batches look ids up as
    the checkpoint's model did, and the spec (what the manifest carries) holds the remap as slot keys."""
    fs = load_features(cfg.data, cfg.model.tables)
    if fs.managed:
        load_managed(fs.managed, checkpoint)
        fs.spec = fs.managed.spec_with_slots()
    return fs


def load_dense(cfg: AdsfmConfig, checkpoint: Path, spec: FeatureSpec) -> nn.Module:
    """Only the dense module from the checkpoint (no tables)."""
    dense = dense_module(len(spec.dense_inputs()), len(spec.sparse), cfg.model, spec.outputs)
    state = {"model": {f"dense.{k}": v for k, v in dense.state_dict().items()}}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    dense.load_state_dict({k.removeprefix("dense."): v for k, v in state["model"].items()})
    return dense.eval()


@torch.no_grad()
def streamed_eager_probs(cfg: AdsfmConfig, checkpoint: Path, fs: FeatureSet, dense: nn.Module, idx: np.ndarray) -> np.ndarray:
    """The eager model's probabilities for rows `idx`: each table's rows that those rows look up are read
    from the checkpoint (a chunk at a time) and pooled with torch's embedding_bag."""
    batch = fs.take(idx)
    jts = batch.sparse_features.to_dict()
    pooled: dict[str, torch.Tensor] = {}
    for c in table_configs(fs.spec, table_dim(cfg.model)):
        ids = torch.cat([jts[f].values() for f in c.feature_names])
        used, where = torch.unique(ids, return_inverse=True)
        w = stored_table(checkpoint, c.name, (c.num_embeddings, c.embedding_dim)).rows(used)
        mode = fs.spec.tables[c.name].pooling
        start = 0
        for f in c.feature_names:
            jt = jts[f]
            n = len(jt.values())
            pooled[f] = F.embedding_bag(where[start : start + n], w, jt.offsets()[:-1], mode=mode)
            start += n
    emb = torch.stack([pooled[f.name] for f in fs.spec.sparse], dim=1)
    return torch.sigmoid(dense(batch.dense_features, emb)).double().numpy()


def table_precisions(cfg: AdsfmConfig, tables: list[str]) -> dict[str, Precision]:
    """Each table's stored precision: export.precision unless export.table_precision names the table."""
    e = cfg.export
    unknown = sorted(set(e.table_precision) - set(tables))
    if unknown:
        raise ValueError(f"export.table_precision names {unknown}, which the model does not have; tables: {tables}")
    return {t: Precision(e.table_precision.get(t, e.precision)) for t in tables}


def config_hash(cfg: AdsfmConfig) -> str:
    """Hash of the resolved config, without the fields that name this particular run."""
    c = to_plain(cfg)
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

    Tables are streamed from the checkpoint a stored chunk (a rank's shard) at a time: quantized and written
    at their rows for the bundle, gathered to the rows it looks up for the eager reference; export holds
    about the largest chunk, never a whole table or the model.
    """
    if cfg.model.arch == Arch.hstu:
        return _export_sequence(cfg, checkpoint, out, train_run_id)
    fs = features_at(cfg, checkpoint)
    configs = table_configs(fs.spec, table_dim(cfg.model))
    streamed = [(c.name, stored_table(checkpoint, c.name, (c.num_embeddings, c.embedding_dim))) for c in configs]
    dense = load_dense(cfg, checkpoint, fs.spec)
    manifest = write_dense_bundle(fs, out, streamed, dense, table_precisions(cfg, [c.name for c in configs]),
                                  table_dim(cfg.model), cfg.export.opset, provenance(cfg, checkpoint, fs, train_run_id),
                                  arch=str(cfg.model.arch))
    rows = parity_rows(fs, cfg.export.parity_rows)
    eager = streamed_eager_probs(cfg, checkpoint, fs, dense, rows)
    manifest.parity, probs = check_parity(
        eager, DenseGraphEngine(out), fs, rows, cfg.export.parity_tolerance,
        cfg.export.auc_margin, quantized=any(t.precision != "fp32" for t in manifest.tables.values()),
        features=featurization_parity(DenseGraphEngine(out), fs, load_frame(cfg.data)[0], rows),
    )
    manifest.parity.reference = write_reference(out, rows, eager)
    manifest.write(out)
    write_card(manifest, probs, fs.labels[rows], out / "card", loss_curve=checkpoint.parent.parent / "loss_curve.png")
    require_parity(manifest.parity)
    return manifest


def stored_table(checkpoint: Path, name: str, shape: tuple[int, int]) -> StoredTable:
    return StoredTable(checkpoint, f"sparse.embedding_bags.{name}.weight", shape)


def write_dense_bundle(fs: FeatureSet, out: Path, tables: Iterable[tuple[str, torch.Tensor | StoredTable]], dense: nn.Module,
                       precision: dict[str, Precision], dim: int, opset: int, lineage: dict[str, Any],
                       arch: str = "dlrm") -> Manifest:
    """The files of a dense-graph bundle: each table as `tables` yields it (written, then dropped), dense.onnx,
    the item store and the manifest (parity not yet judged)."""
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, TableFile] = {}
    for name, weight in tables:
        file = f"table_{name}.safetensors"
        nbytes = export_table(weight, precision[name], out / file)
        files[name] = TableFile(dim=weight.shape[1], precision=precision[name], file=file, bytes=nbytes)  # type: ignore[arg-type]
        del weight
    export_dense(dense, len(fs.spec.dense_inputs()), len(fs.spec.sparse), dim, out / "dense.onnx", opset)
    (out / "item_store.json").write_text(json.dumps(fs.item_store))
    manifest = Manifest(arch=arch, embedding_dim=dim, features=fs.spec, tables=files, **lineage)  # type: ignore[arg-type]
    manifest.write(out)
    return manifest


def provenance(cfg: AdsfmConfig, checkpoint: Path, fs: FeatureSet, train_run_id: str) -> dict[str, Any]:
    """The manifest fields that say where a bundle came from."""
    return {
        "versions": {p: version(p) for p in ("torch", "torchrec", "fbgemm-gpu-cpu", "onnx", "onnxruntime", "adsfm") if _installed(p)},
        "data_fingerprint": fs.spec.fingerprint,
        "source_checkpoint": str(checkpoint),
        "train_run_id": train_run_id,
        "config_hash": config_hash(cfg),
        "git_commit": git_commit(),
        "data_config": _data_config(cfg),
    }


def _export_sequence(cfg: AdsfmConfig, checkpoint: Path, out: Path, train_run_id: str) -> Manifest:
    """The split bundle of a sequence model: the tables are small next to a DLRM's, so the eager model is
    loaded whole and the parity reference is its joint forward."""
    from adsfm.export.sequence import export_sequence_bundle, sequence_parity
    from adsfm.training.models.hstu import HSTU

    fs = features_at(cfg, checkpoint)
    model = load_trained_model(cfg, checkpoint, fs)
    assert isinstance(model, HSTU)
    precision = table_precisions(cfg, [c.name for c in model.sparse.embedding_configs()])
    manifest = export_sequence_bundle(model, fs, out, precision, cfg.export.opset, provenance(cfg, checkpoint, fs, train_run_id))
    rows = parity_rows(fs, cfg.export.parity_rows)
    manifest.parity, probs = sequence_parity(model, out, fs, load_frame(cfg.data)[0], rows, cfg.export.parity_tolerance,
                                             cfg.export.auc_margin, quantized=any(p != "fp32" for p in precision.values()))
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
    return {str(k): v for k, v in to_plain(cfg.data).items()}


def load_run(run_dir: Path) -> tuple[AdsfmConfig, dict[str, Any]]:
    """The resolved config and training result a run directory holds."""
    cfg_path, result_path = run_dir / "config.yaml", run_dir / "train_result.json"
    for p in (cfg_path, result_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: is {run_dir} a finished adsfm-train run directory?")
    return typed(AdsfmConfig, OmegaConf.load(cfg_path)), json.loads(result_path.read_text())
