"""HSTU end to end on real components: 2 Ray Train workers (sequence tables sharded table-wise on gloo),
the split export with its parity check, MLflow registration, and the Ray Serve app ranking over HTTP like
the eager model's joint forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch

pytestmark = pytest.mark.integration


def test_hstu_trains_on_ray_exports_split_and_serves(ray_cluster: None, serve_port: int, tmp_path: Path) -> None:
    from adsfm.contract.config import ServeConfig, compose
    from adsfm.contract.tracking import ensure_experiment
    from adsfm.export.bundle import export_bundle, load_run, load_trained_model
    from adsfm.export.register import log_and_register
    from adsfm.serving import app
    from adsfm.training.data import load_features
    from adsfm.training.job import run_training

    result = run_training(compose([f"run_root={tmp_path}", "experiment=movielens_hstu", "train.max_steps=30",
                                   "train.epochs=1", "train.progress=false"]))
    assert result.raw["world_size"] == 2 and result.raw["steps"] == 30
    plan = {r["table"]: r for r in result.raw["sharding_plan"]}
    assert {"item", "rating", "user_id"} <= set(plan) and {r["sharding_type"] for r in plan.values()} == {"table_wise"}
    assert 0.6 < result.holdout["auc"] < 1.0

    cfg = load_run(result.run_dir)[0]
    manifest = export_bundle(cfg, result.checkpoint, tmp_path / "bundle")
    assert manifest.arch == "hstu" and manifest.sequence is not None
    assert manifest.parity is not None and manifest.parity.passed and manifest.parity.max_abs_diff <= 1e-4
    assert not (tmp_path / "bundle" / "dense.onnx").exists()  # the split graphs replace it

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = ensure_experiment(uri, "hstu-serve", str(tmp_path))
    log_and_register(tmp_path / "bundle", "hstu", uri, run_id=None, experiment_id=exp)
    url = app.start(ServeConfig(port=serve_port, model_name="hstu", max_candidates=100, batch_wait_ms=5), uri, name="hstu-test")
    try:
        # A real user's history from the featurized holdout, sent as a service would: raw ids and times.
        fs = load_features(cfg.data)
        row = int(fs.holdout_idx[np.argmax(fs.sparse["history"][1][fs.holdout_idx])])
        vocab = {t: ["<oov>", *(["<missing>"] if spec.missing else []), *spec.vocab] for t, spec in fs.spec.tables.items()}
        table = {f.name: f.table for f in fs.spec.sparse}

        def values(name: str) -> np.ndarray:
            return fs.row_values(row, name)

        user: dict[str, Any] = {f: vocab[table[f]][values(f)[0]] for f in ("user_id", "gender", "occupation", "zip_prefix", "age_bucket")}
        user.update(history=[vocab["item"][i] for i in values("history")],
                    history_rating=[vocab["rating"][i] for i in values("history_rating")],
                    history_time=values("history_time").tolist(), timestamp=int(values("timestamp")[0]))
        items = [str(i) for i in range(1, 41)]
        r = requests.post(f"{url}/v1/rank", json={"user": user, "candidates": [{"item_id": i} for i in items]}, timeout=60)
        assert r.status_code == 200, r.text
        got = {c["item"]["item_id"]: c["score"] for c in r.json()["candidates"]}

        # Independent reference: the eager model from the checkpoint, all 40 candidates in one joint forward.
        model = load_trained_model(cfg, result.checkpoint, fs)
        item_index = {tok: k for k, tok in enumerate(vocab["item"])}
        year = {i: fs.item_store[i]["release_year_token"] for i in items}
        year_index = {tok: k for k, tok in enumerate(vocab["release_year_token"])}
        cands = {"item_id": torch.tensor([item_index.get(i, 0) for i in items]),
                 "release_year_token": torch.tensor([year_index.get(str(year[i]), 0) for i in items])}
        ctx = {f: int(values(f)[0]) for f in model.context_features}
        with torch.no_grad():
            want = torch.sigmoid(model.score(torch.from_numpy(values("history")), torch.from_numpy(values("history_rating")),
                                             torch.from_numpy(values("history_time")), ctx, cands, user["timestamp"]))
        for k, i in enumerate(items):
            assert abs(got[i] - float(want[k])) <= 1e-5, f"item {i}: served {got[i]} vs eager {float(want[k])}"

        bad = dict(user, history_time=user["history_time"][:-1])
        r = requests.post(f"{url}/v1/rank", json={"user": bad, "candidates": [{"item_id": "1"}]}, timeout=60)
        assert r.status_code == 422 and "user.history" in r.text
    finally:
        app.stop("hstu-test")
