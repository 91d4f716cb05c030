"""A deep model with the wide part, early stopping and the built-in baseline, trained on Ray: the baseline
trains first and the model starts from it, scoring the holdout exactly as the baseline does before its
first step; the run's checkpoint and metrics are its best validation epoch's (the start among them, so it
is never worse on validation than the baseline), the validation rows never overlap the holdout, the
baseline's margin reaches MLflow, and the chosen checkpoint exports with parity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def test_dcnv2_wide_with_early_stopping_and_baseline(ray_cluster: None, small_cfg: Any, features: Any, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from adsfm.contract.config import compose
    from adsfm.export.bundle import export_bundle
    from adsfm.training.data import validation_split
    from adsfm.training.job import run_training

    cfg = compose([f"run_root={tmp_path}", f"run_dir={tmp_path / 'run'}", "model=dcnv2", "model.wide=true",
                   "train.progress=false", "train.epochs=3", "train.batch_size=512", "train.early_stopping=true",
                   "train.patience=1", "train.baseline=true", "train.dense_lr=0.003"])
    cfg.data = small_cfg.data
    result = run_training(cfg)
    raw, es = result.raw, result.raw["early_stopping"]
    valid = [h["valid_logloss"] for h in raw["eval_history"]]
    print(f"dcnv2+wide: valid logloss by epoch {np.round(valid, 4).tolist()}, best epoch {es['best_epoch']}, stopped early "
          f"{es['stopped_early']}; holdout AUC {result.holdout['auc']:.4f} vs logreg {raw['baseline']['baseline_holdout_auc']:.4f}")
    start, b = raw["eval_history"][0], raw["baseline"]
    assert start["epoch"] == -1 and start["step"] == 0  # the start, judged like an epoch
    assert start["auc"] == pytest.approx(b["baseline_holdout_auc"], abs=1e-6)  # it is the baseline
    assert start["logloss"] == pytest.approx(b["baseline_holdout_logloss"], abs=1e-6)
    best = int(np.argmin(valid))
    assert es["best_step"] == raw["eval_history"][best]["step"] and es["valid_logloss"] == min(valid) <= valid[0]
    assert result.holdout["auc"] == raw["eval_history"][best]["auc"]  # the metrics reported are the best epoch's
    assert result.checkpoint == tmp_path / "run" / "best" / f"step_{es['best_step']}" and result.checkpoint.is_dir()
    if es["stopped_early"]:  # it stopped only after `patience` epochs that were no better
        assert len(valid) - 1 - best == 1 and len(valid) <= 4
    else:
        assert len(valid) == 4  # the start and 3 epochs

    fit, held = validation_split(features, cfg.train.validation_fraction, cfg.data.seed)
    assert es["validation_rows"] == len(held)
    assert not set(held) & set(features.holdout_idx) and not set(held) & set(fit)
    assert len(fit) + len(held) == len(features.train_idx)

    metrics = MlflowClient(result.tracking_uri).get_run(result.run_id).data.metrics
    assert metrics["holdout_auc_vs_baseline"] == pytest.approx(result.holdout["auc"] - b["baseline_holdout_auc"])
    assert 0.6 < b["baseline_holdout_auc"] < 0.9  # logistic regression learns something on MovieLens

    manifest = export_bundle(cfg, result.checkpoint, tmp_path / "bundle", train_run_id=result.run_id)
    assert manifest.arch == "dcnv2" and manifest.embedding_dim == 20
    assert manifest.parity is not None and manifest.parity.passed
