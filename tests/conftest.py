"""Shared fixtures: a small config on the real MovieLens data, and a trained, exported bundle."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def small_cfg(run_root: Path) -> Any:
    from training.config import compose
    from training.job import as_config

    return as_config(
        compose([f"run_root={run_root}", "train.batch_size=256", "train.epochs=1", "parallel=single", "train.progress=false"])
    )


@pytest.fixture(scope="session")
def features(small_cfg: Any) -> Any:
    from training.data import load_features

    return load_features(small_cfg.data)


@pytest.fixture(scope="session")
def trained(small_cfg: Any, features: Any, run_root: Path) -> dict[str, Any]:
    """A DLRM trained single-process for one epoch, checkpointed with DCP and exported (parity-checked)."""
    import torch

    from export.bundle import export_bundle
    from parallel.shard import unsharded_optimizer
    from training.checkpoint import save_checkpoint
    from training.data import iter_batches
    from training.loop import evaluate, train_step
    from training.models.dlrm import DLRMRanker
    from training.worker import optim_config

    torch.manual_seed(0)
    model = DLRMRanker(features.spec, small_cfg.model, device="cpu")
    opt = unsharded_optimizer(model, optim_config(small_cfg))
    for rows in iter_batches(features.train_idx, 256, 0, 1, seed=0):
        train_step(model, opt, features.take(rows))
    ckpt = save_checkpoint(model, run_root / "fixture" / "checkpoints" / "step_1")
    bundle = run_root / "fixture" / "bundle"
    manifest = export_bundle(small_cfg, ckpt, bundle)
    return {
        "model": model.eval(),
        "checkpoint": ckpt,
        "bundle": bundle,
        "manifest": manifest,
        "holdout": evaluate(model, features, features.holdout_idx, 4096),
    }
