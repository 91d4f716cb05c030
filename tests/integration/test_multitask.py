"""Multi-task MovieLens end to end: a DLRM with two heads, like (rating >= 4) and love (rating = 5), trained,
exported (parity on both tasks), passed by the promotion gate (which recomputes parity and judges each
task's AUC), registered and served by Ray Serve over HTTP. The response carries both probabilities, each
within 1e-5 of the eager model's, and ranks by the configured `serve.rank_by`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from omegaconf import OmegaConf

pytestmark = pytest.mark.integration

LABELS = [{"name": "like", "column": "rating", "threshold": 4}, {"name": "love", "column": "rating", "threshold": 5}]
RANK_BY = "p_like * p_love"


def test_two_tasks_train_export_pass_the_gate_and_serve_over_http(ray_cluster: None, serve_port: int, small_cfg: Any,
                                                                  tmp_path: Path) -> None:
    from adsfm.contract.config import GateConfig, ServeConfig, as_config
    from adsfm.contract.tracking import ensure_experiment
    from adsfm.export.bundle import export_bundle
    from adsfm.export.gate import run_gate
    from adsfm.export.register import log_and_register
    from adsfm.serving import app
    from adsfm.training.checkpoint import save_checkpoint
    from adsfm.training.data import example_request, load_features, load_frame
    from adsfm.training.local import train_local
    from adsfm.training.loop import evaluate
    from tests.integration.reference import eager_scores

    cfg = as_config(OmegaConf.merge(small_cfg, {"data": {"labels": LABELS}}))
    fs = load_features(cfg.data)
    df, _ = load_frame(cfg.data)
    assert fs.spec.tasks == ["like", "love"]
    rating = df.rating.to_numpy()
    np.testing.assert_array_equal(fs.labels, np.stack([rating >= 4, rating >= 5], axis=1).astype(np.float32))

    model = train_local(cfg, fs)
    holdout = evaluate(model, fs, fs.holdout_idx, 4096, [1.0, 1.0])
    print("per-task holdout: " + ", ".join(f"{t} AUC {holdout[f'{t}_auc']:.4f} logloss {holdout[f'{t}_logloss']:.4f} "
                                            f"calibration {holdout[f'{t}_calibration']:.3f}" for t in ("like", "love")))
    assert holdout["like_auc"] > 0.65 and holdout["love_auc"] > 0.65  # both heads learned their own label
    assert holdout["like_auc"] != holdout["love_auc"]

    ckpt = save_checkpoint(model, tmp_path / "run" / "checkpoints" / "step_1")
    manifest = export_bundle(cfg, ckpt, tmp_path / "bundle")
    assert manifest.features.tasks == ["like", "love"] and manifest.parity is not None and manifest.parity.passed
    assert manifest.parity.max_abs_diff <= 1e-5

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = ensure_experiment(uri, "multitask", str(tmp_path))
    log_and_register(tmp_path / "bundle", "multitask", uri, run_id=None, experiment_id=exp)
    # The latency budget is tests/integration/test_governance.py's subject; here it only must not flake.
    report = run_gate("multitask", "1", uri, GateConfig(latency_budget_ms=1000.0, latency_requests=20), tmp_path / "gate")
    print(report.table())
    assert report.passed, report.table()
    assert report.metrics["candidate_auc_like"] == pytest.approx(holdout["like_auc"], abs=1e-4)
    assert report.metrics["candidate_auc_love"] == pytest.approx(holdout["love_auc"], abs=1e-4)

    url = app.start(ServeConfig(port=serve_port, model_name="multitask", rank_by=RANK_BY), uri, name="multitask")
    try:
        row = int(fs.holdout_idx[77])
        items = [str(i) for i in range(1, 41)]
        r = requests.post(f"{url}/v1/rank", json=example_request(df, fs.spec, row, items), timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
    finally:
        app.stop("multitask")
    assert body["rank_by"] == RANK_BY
    want = eager_scores(model.eval(), fs, df, row, items)
    for c in body["candidates"]:
        it, got = c["item"]["item_id"], c["scores"]
        assert abs(got["like"] - want[it][0]) <= 1e-5 and abs(got["love"] - want[it][1]) <= 1e-5, (it, got, want[it])
        assert c["score"] == pytest.approx(got["like"] * got["love"], rel=1e-12)
    order = [c["item"]["item_id"] for c in body["candidates"]]
    assert order == sorted(items, key=lambda i: -(want[i][0] * want[i][1]))
    assert order != sorted(items, key=lambda i: -want[i][0])  # the product ranks otherwise than like alone
