"""MLflow tracking location and experiment, shared by training, export and the launchers."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no traffic may leave the machine


def tracking_uri(configured: str | None, run_root: str) -> str:
    """Config, else MLFLOW_TRACKING_URI, else a sqlite store under run_root (absolute: MLflow resolves a
    relative sqlite path against the process's cwd, which differs between the driver and Ray workers)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(run_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def ensure_experiment(uri: str, name: str, run_root: str) -> str:
    """Experiment id, created with its artifacts under run_root/mlartifacts for a local sqlite store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = None
    if uri.startswith("sqlite:"):
        location = (Path(run_root).resolve() / "mlartifacts").as_uri()
    return str(client.create_experiment(name, artifact_location=location))
