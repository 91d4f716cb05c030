"""adsfm-train's job on a real local Ray cluster: 2 workers on gloo, MLflow run, DCP checkpoint that
exports in one process with parity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def test_two_worker_job_trains_logs_and_exports(ray_cluster: None, small_cfg: Any, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from adsfm.contract.config import compose
    from adsfm.export.bundle import export_bundle
    from adsfm.training.job import run_training

    cfg = compose([f"run_root={tmp_path}", "train.max_steps=40", "train.epochs=1", "train.progress=false"])
    cfg.data = small_cfg.data
    result = run_training(cfg)

    assert result.raw["world_size"] == 2 and result.raw["steps"] == 40
    assert {r["sharding_type"] for r in result.raw["sharding_plan"]} == {"table_wise"}
    assert sorted({r for row in result.raw["sharding_plan"] for r in row["ranks"]}) == [0, 1]
    assert 0.6 < result.holdout["auc"] < 1.0  # 40 steps already rank better than chance

    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["parallel.num_workers"] == "2"
    history = client.get_metric_history(result.run_id, "train_loss")
    assert [m.step for m in history] == [10, 20, 30, 40]
    arts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"loss_curve.png", "sharding_plan.json", "config.yaml"} <= arts

    # Written by 2 ranks, loaded by one process: the bundle scores like the eager model.
    manifest = export_bundle(result_cfg(result), result.checkpoint, tmp_path / "bundle")
    assert manifest.parity is not None and manifest.parity.passed


def result_cfg(result: Any) -> Any:
    from adsfm.export.bundle import load_run

    return load_run(result.run_dir)[0]


def test_bad_config_fails_before_any_worker_starts(small_cfg: Any, tmp_path: Path) -> None:
    import ray

    from adsfm.contract.config import compose
    from adsfm.training.job import run_training

    was_up = ray.is_initialized()
    cfg = compose([f"run_root={tmp_path}", "train.batch_size=255"])
    with pytest.raises(ValueError, match=r"train.batch_size\(255\) % parallel.num_workers\(2\) = 1 != 0"):
        run_training(cfg)
    assert ray.is_initialized() == was_up
    assert not list(tmp_path.glob("*/train_result.json"))
