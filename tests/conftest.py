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
# Without a GPU, the Triton kernels' CPU tests run under Triton's interpreter, which must be chosen before
# anything imports triton (torch, torchrec and fbgemm may, long before the kernel tests are collected).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def small_cfg(run_root: Path) -> Any:
    from adsfm.contract.config import as_config, compose

    return as_config(
        compose([f"run_root={run_root}", "train.batch_size=256", "train.epochs=1", "parallel=single", "train.progress=false"])
    )


@pytest.fixture(scope="session")
def features(small_cfg: Any) -> Any:
    from adsfm.training.data import load_features

    return load_features(small_cfg.data)


@pytest.fixture(scope="session")
def trained(small_cfg: Any, features: Any, run_root: Path) -> dict[str, Any]:
    """A DLRM trained single-process for one epoch, checkpointed with DCP and exported (parity-checked)."""
    from adsfm.export.bundle import export_bundle
    from adsfm.training.checkpoint import save_checkpoint
    from adsfm.training.local import train_local
    from adsfm.training.loop import evaluate

    model = train_local(small_cfg, features)
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
