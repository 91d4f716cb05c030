"""`adsfm-train -m` (Hydra multirun): one MLflow parent run, a child per job, a comparison at the end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def test_multirun_is_one_parent_run_with_a_child_per_job(small_cfg: Any, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    cmd = [str(BIN / "adsfm-train"), "-m", "train.dense_lr=0.001,0.01", f"run_root={tmp_path}", "train.max_steps=10",
           "train.epochs=1", "train.progress=false", f"data.cache_dir={small_cfg.data.cache_dir}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("adsfm")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("adsfm.stage") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.params["train.dense_lr"] for r in children) == ["0.001", "0.01"]
    assert all(r.info.status == "FINISHED" for r in children)

    # The comparison: each child's own holdout AUC against its learning rate, best first.
    sweep_dirs = list(tmp_path.glob("sweep-*"))
    assert len(sweep_dirs) == 1 and sorted(p.name for p in sweep_dirs[0].iterdir() if p.is_dir()) == ["0", "1"]
    table = (sweep_dirs[0] / "comparison.md").read_text().splitlines()
    assert "train.dense_lr" in table[0] and "holdout_auc" in table[0]
    by_auc = sorted(children, key=lambda r: -r.data.metrics["holdout_auc"])
    for line, run in zip(table[2:], by_auc, strict=True):
        assert f"| {run.data.params['train.dense_lr']} |" in line
        assert f"{run.data.metrics['holdout_auc']:.4f}" in line
    assert "train.dense_lr" in proc.stdout and parent.info.run_id in proc.stdout
    parent = client.get_run(parent.info.run_id)
    assert parent.data.metrics["best_holdout_auc"] == by_auc[0].data.metrics["holdout_auc"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"comparison.md", "comparison.csv", "comparison.png"}
