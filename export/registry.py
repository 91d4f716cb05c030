"""MLflow: log a bundle as a model version, move aliases (challenger → champion), resolve an alias."""

from __future__ import annotations

import getpass
import os
import time
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from export.manifest import Manifest
from serving.ranker import Ranker

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
CHAMPION, CHALLENGER = "champion", "challenger"


def _pip_requirements() -> list[str]:
    # Given explicitly: MLflow's inference costs ~6 s and would pull in the training stack.
    pkgs = ("onnxruntime", "safetensors", "numpy", "pandas", "pydantic", "mlflow")
    return [f"{p}=={pkg_version(p)}" for p in pkgs] + ["adsfm"]


def input_example(bundle: Path, n: int = 2) -> pd.DataFrame:
    """A few (user, item) rows with raw values the bundle knows, for the signature and the docs."""
    m = Manifest.read(bundle)
    ranker = Ranker(bundle)
    items = list(ranker.item_store.items())[:n] or [("0", {})]
    rows = []
    for item_id, feats in items:
        row: dict[str, Any] = {}
        for f in m.sparse:
            vocab = m.tables[f.table].vocab
            row[f.name] = vocab[0] if vocab else "0"
        for d in m.dense:
            row[d.name] = d.mean
        if m.item_column:
            row[m.item_column] = item_id
        row.update({k: ("|".join(map(str, v)) if isinstance(v, list) else v) for k, v in feats.items()})
        rows.append({k: str(v) if not isinstance(v, float) else v for k, v in row.items()})
    return pd.DataFrame(rows)


def log_and_register(
    bundle: Path, name: str, tracking_uri: str, run_id: str | None, experiment_id: str | None = None
) -> ModelVersion:
    """Log the bundle as a pyfunc model in `run_id` (the training run), register it, alias it challenger;
    the first version of a name also becomes champion."""
    manifest = Manifest.read(bundle)
    if manifest.parity is None or not manifest.parity.passed:
        raise ValueError(f"{bundle}: parity not passed ({manifest.parity}); refusing to register")
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    example = input_example(bundle)
    scores = Ranker(bundle).score_records(example.to_dict("records"))
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name="export" if not run_id else None):
        info = mlflow.pyfunc.log_model(
            name="ranker",
            python_model=str(PYFUNC_FILE),
            artifacts={"bundle": str(bundle)},
            signature=infer_signature(example, scores),
            input_example=example,
            pip_requirements=_pip_requirements(),
        )
        mlflow.log_metric("parity_max_abs_diff", manifest.parity.max_abs_diff)
        active_run = mlflow.active_run()
        assert active_run is not None
        source_run = active_run.info.run_id
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="adsfm ranking model (ONNX dense graph + embedding tables)")
    mv = client.create_model_version(
        name,
        source=info.model_uri,
        run_id=source_run,
        tags={
            "adsfm.data_fingerprint": manifest.data_fingerprint,
            "adsfm.parity_max_abs_diff": f"{manifest.parity.max_abs_diff:.3g}",
            "adsfm.precision": "fp32",
        },
    )
    _wait_ready(client, name, str(mv.version))
    client.set_registered_model_alias(name, CHALLENGER, str(mv.version))
    if alias_version(client, name, CHAMPION) is None:
        promote(name, tracking_uri, str(mv.version), reason="first version of this model")
    return client.get_model_version(name, mv.version)


def _wait_ready(client: MlflowClient, name: str, version: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while client.get_model_version(name, version).status != "READY":
        if time.time() > deadline:
            raise TimeoutError(f"model {name} version {version} not READY after {timeout:.0f}s")
        time.sleep(0.2)


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    # search_model_versions returns empty aliases; get_registered_model(...).aliases is right.
    try:
        v = client.get_registered_model(name).aliases.get(alias)
    except MlflowException:
        return None
    return None if v is None else str(v)


def promote(name: str, tracking_uri: str, version: str | None = None, reason: str = "") -> str:
    """Move champion to `version` (default: the challenger); record who, when and why on the version."""
    client = MlflowClient(tracking_uri)
    target = version or alias_version(client, name, CHALLENGER)
    if target is None:
        raise ValueError(f"model {name!r} has no {CHALLENGER} alias; pass --version")
    client.get_model_version(name, str(target))  # raises with MLflow's message if it does not exist
    previous = alias_version(client, name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, str(target))
    who = os.environ.get("USER") or getpass.getuser()
    for k, v in {
        "adsfm.promoted_by": who,
        "adsfm.promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "adsfm.promote_reason": reason or "manual",
        "adsfm.previous_champion": previous or "",
    }.items():
        client.set_model_version_tag(name, str(target), k, v)
    return str(target)


def resolve(name: str, alias: str, tracking_uri: str, dst: Path) -> tuple[str, Path]:
    """(version, local bundle directory) of models:/name@alias, downloaded under `dst`."""
    client = MlflowClient(tracking_uri)
    ver = alias_version(client, name, alias)
    if ver is None:
        raise LookupError(f"model {name!r} has no alias {alias!r} in {tracking_uri}; run adsfm-export / adsfm-promote")
    mlflow.set_tracking_uri(tracking_uri)
    target = dst / f"{name}-v{ver}"
    if not (target / "artifacts" / "bundle" / "manifest.json").exists():
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{ver}", dst_path=str(target))
    bundle = target / "artifacts" / "bundle"
    Manifest.read(bundle)
    return str(ver), bundle
