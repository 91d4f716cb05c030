"""adsfm-pipeline end to end on the real components (shortened training): the summary a user reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def test_pipeline_runs_end_to_end(ray_cluster: None, serve_port: int, small_cfg: Any, tmp_path: Path) -> None:
    from adsfm.contract.config import compose
    from adsfm.export.pipeline import run_pipeline

    cfg = compose([f"run_root={tmp_path}", "train.max_steps=60", f"serve.port={serve_port}", "train.progress=false"])
    cfg.data = small_cfg.data
    summary = run_pipeline(cfg)
    on_disk = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    for key in ("holdout_auc", "holdout_logloss", "holdout_ne", "parity_max_abs_diff", "model_name", "model_version", "rank_latency_ms"):
        assert key in on_disk, key
    assert on_disk["parity_max_abs_diff"] <= 1e-5
    assert on_disk["model_version"] == on_disk["served_version"] == "1"
    assert 0 < on_disk["rank_latency_ms"] < 5000
    assert 0.5 < on_disk["holdout_auc"] <= 1.0
