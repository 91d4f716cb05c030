"""A table with missing values in every column kind, written as CSV and as parquet (arrow string columns),
trained through adsfm-train's job (`data=tabular`, 1 worker, a few steps), exported with its parity and
served over HTTP, where a request may leave out any feature. (tests/unit/test_data.py reads the parquet
forms with object and pandas string columns too, and gets the same rows.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import requests

from tests.messy import DATA, file_columns, messy_frame

pytestmark = pytest.mark.integration


def _write(form: str, path: Path) -> Path:
    table = file_columns(messy_frame(600, seed=4))
    if form == "csv":
        table.to_csv(path.with_suffix(".csv"), index=False)
        return path.with_suffix(".csv")
    text = {"object": object, "string": pd.StringDtype("python"), "arrow": pd.StringDtype("pyarrow")}[form]
    for c in ("user", "country", "tags", "clicked"):
        table[c] = table[c].astype(object).where(table[c].notna() & (table[c] != ""), None).astype(text)
    table["ad"] = table["ad"].astype("Int64")
    table.to_parquet(path.with_suffix(".parquet"))
    return path.with_suffix(".parquet")


def _overrides(path: Path, root: Path) -> list[str]:
    return [f"run_root={root}", "data=tabular", f"data.path={path}", "parallel=single", "train.batch_size=64",
            "train.max_steps=6", "train.epochs=1", "train.progress=false", "export.model_name=messy", "cluster.log_file=null"]


def test_messy_files_train_export_and_serve(ray_cluster: None, serve_port: int, tmp_path: Path) -> None:
    from adsfm.contract.config import DataConfig, ServeConfig, compose, typed
    from adsfm.export.bundle import export_bundle
    from adsfm.export.register import log_and_register
    from adsfm.serving import app
    from adsfm.training.job import run_training

    results = {}
    for form in ("csv", "arrow"):
        path = _write(form, tmp_path / form)
        cfg = compose(_overrides(path, tmp_path / f"runs-{form}"))
        cfg.data = typed(DataConfig, {**DATA, "path": str(path), "cache_dir": str(tmp_path / f"cache-{form}")})
        result = run_training(cfg)
        manifest = export_bundle(cfg, result.checkpoint, result.run_dir / "bundle", train_run_id=result.run_id)
        assert manifest.parity is not None and manifest.parity.passed and manifest.parity.featurization == "identical"
        results[form] = (cfg, result, manifest)
        print(f"{form}: {result.raw['steps']} steps, holdout auc {result.holdout['auc']:.3f}, parity {manifest.parity.reason()}")
    tables = {form: m.features.tables for form, (_, _, m) in results.items()}
    assert all(t == tables["csv"] for t in tables.values()), "every file form gives the same vocabularies"

    cfg, result, _ = results["arrow"]
    log_and_register(result.run_dir / "bundle", "messy", result.tracking_uri, result.run_id)
    url = app.start(ServeConfig(port=serve_port, model_name="messy"), result.tracking_uri, name="messy")
    try:
        bodies: list[dict[str, Any]] = [
            {"candidates": [{"ad": 3}]},  # everything but the item id left out
            {"user": {"user": None, "country": "", "age": None, "recent_ads": []}, "candidates": [{"ad": "3", "tags": None, "bid": None}]},
            {"user": {"user": "u1", "country": "never-seen", "recent_ads": "1|2|no-such-ad"}, "candidates": [{"ad": 999}, {"ad": "3", "tags": "a;;b"}]},
            {"user": {"user": 17, "age": 30.5}, "candidates": [{"ad": 3, "tags": ["a", None, ""], "bid": 0}]},
        ]
        for body in bodies:
            r = requests.post(f"{url}/v1/rank", json=body, timeout=30)
            assert r.status_code == 200, (body, r.text)
            assert all(0 < c["score"] < 1 for c in r.json()["candidates"])
        r = requests.post(f"{url}/v1/rank", json={"candidates": [{"ad": 3, "bid": "cheap"}]}, timeout=30)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "bid"
    finally:
        app.stop("messy")
