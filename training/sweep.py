"""Hydra multirun as one MLflow parent run: `adsfm-train -m train.dense_lr=0.001,0.003 parallel=tw2,rw2`.

The callback opens a parent run when the sweep starts; every job's training run is created as its child
(run_training reads ADSFM_PARENT_RUN_ID); when the sweep ends, the children are compared on their holdout
metrics in a table (printed, and written as comparison.md / .csv) and a plot, logged to the parent run.
Jobs run in the sweep's process (Hydra's basic launcher), so the environment carries the parent's id.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

PARENT_ENV = "ADSFM_PARENT_RUN_ID"
METRICS = ("holdout_auc", "holdout_logloss", "holdout_ne", "samples_per_second")
IGNORED_PARAMS = {"run_dir"}


def _tracking(config: DictConfig) -> tuple[str, str]:
    from adsfm.contract.tracking import ensure_experiment, tracking_uri

    uri = tracking_uri(config.mlflow.tracking_uri, config.run_root)
    return uri, ensure_experiment(uri, config.mlflow.experiment, config.run_root)


class SweepToMlflow(Callback):
    """Registered in conf/config.yaml under hydra.callbacks; acts only on multirun."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        uri, exp = _tracking(config)
        overrides = " ".join(config.hydra.overrides.task)
        run = MlflowClient(uri).create_run(
            exp, run_name=f"{config.experiment_name}-sweep", tags={"adsfm.stage": "sweep", "adsfm.sweep": overrides}
        )
        os.environ[PARENT_ENV] = run.info.run_id
        print(f"[adsfm] sweep: MLflow parent run {run.info.run_id} ({overrides})", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent = os.environ.pop(PARENT_ENV, None)
        if parent is None:
            return
        uri, _ = _tracking(config)
        out = Path(config.hydra.sweep.dir)
        rows = summarize_sweep(uri, parent, out)
        print(f"[adsfm] sweep of {len(rows)} run(s), best first (MLflow parent run {parent}):\n{(out / 'comparison.md').read_text()}")


def child_runs(uri: str, parent: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    return list(client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'"))


def summarize_sweep(uri: str, parent: str, out: Path) -> list[dict[str, Any]]:
    """The children's varying parameters and holdout metrics, best AUC first; written to `out` as
    comparison.md, comparison.csv and comparison.png, and logged to the parent run with its best AUC."""
    from mlflow.tracking import MlflowClient

    from adsfm.training.plots import sweep_plot

    runs = child_runs(uri, parent)
    if not runs:
        raise RuntimeError(f"sweep parent run {parent} has no child runs: did every job fail?")
    keys = sorted({k for r in runs for k in r.data.params} - IGNORED_PARAMS)
    varying = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run": r.info.run_name, "run_id": r.info.run_id, "status": r.info.status}
        row.update({k: r.data.params.get(k) for k in varying})
        row.update({m: r.data.metrics.get(m) for m in METRICS})
        rows.append(row)
    rows.sort(key=lambda x: -(x["holdout_auc"] if x["holdout_auc"] is not None else -1.0))
    cols = ["run", *varying, *METRICS, "status"]
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    with open(out / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run_id", *cols])
        writer.writeheader()
        writer.writerows({c: row[c] for c in ["run_id", *cols]} for row in rows)
    labels = [", ".join(f"{k}={row[k]}" for k in varying) or row["run"] for row in rows]
    histories = {lab: _loss_history(uri, row["run_id"]) for lab, row in zip(labels, rows, strict=True)}
    sweep_plot(labels, [row["holdout_auc"] for row in rows], histories, out / "comparison.png")
    client = MlflowClient(uri)
    for name in ("comparison.md", "comparison.csv", "comparison.png"):
        client.log_artifact(parent, str(out / name))
    if rows[0]["holdout_auc"] is not None:
        client.log_metric(parent, "best_holdout_auc", rows[0]["holdout_auc"])
        client.set_tag(parent, "adsfm.best_run_id", rows[0]["run_id"])
    client.set_terminated(parent, "FINISHED" if all(r["status"] == "FINISHED" for r in rows) else "FAILED")
    return rows


def _loss_history(uri: str, run_id: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "train_loss")]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    return "-" if v is None else str(v)
