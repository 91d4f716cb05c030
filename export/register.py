"""A bundle becomes an MLflow model version: a pyfunc logged as models-from-code (no pickles), with its
signature, model card and lineage tags, aliased challenger (the first version of a name: champion)."""

from __future__ import annotations

import time
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Schema, TensorSpec

from adsfm.contract.manifest import Manifest
from adsfm.contract.registry import CHALLENGER, CHAMPION, alias_version, promote
from adsfm.contract.request import pyfunc_columns, request_rows
from adsfm.serving.bundle import open_engine

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")


def _pip_requirements() -> list[str]:
    # Given explicitly: MLflow's inference costs seconds and would pull in the training stack.
    pkgs = ("onnxruntime", "safetensors", "numpy", "pandas", "pydantic", "mlflow", "adsfm")
    return [f"{p}=={pkg_version(p)}" for p in pkgs]


def example_body(bundle: Path, n: int = 2) -> dict[str, Any]:
    """A request body the bundle accepts (a known value for each user feature, n item ids of its item store)."""
    m = Manifest.read(bundle)
    user: dict[str, Any] = {}
    for f in m.sparse:
        if f.side == "user" and not f.bucketizes:
            vocab = m.features.tables[f.table].vocab if f.table else []
            user[f.name] = [] if f.multi else (1_600_000_000 if f.raw else (vocab[0] if vocab else "0"))
    user.update({d.name: d.mean for d in m.dense if d.side == "user"})
    items = list(open_engine(bundle).item_store)[:n] or ["0"]
    return {"user": user, "candidates": [{m.item_column: i} for i in items] if m.item_column else [{}]}


def input_example(bundle: Path, n: int = 2) -> pd.DataFrame:
    """The pyfunc's input for `example_body`: one row per candidate, lists as lists."""
    return pd.DataFrame(request_rows(example_body(bundle, n)))


def signature(bundle: Path, example: pd.DataFrame, scores: Any) -> ModelSignature:
    """The pyfunc's signature from the bundle's feature spec (adsfm.contract.request.pyfunc_columns): every
    feature optional, the item id required, a multi-valued feature a list; one score per row (a row of one
    per task for a multi-task model, in manifest.features.tasks order)."""
    kinds = {"scalar": AnyType(), "long": DataType.long,
             "list_string": Array(DataType.string), "list_long": Array(DataType.long)}
    columns = pyfunc_columns(Manifest.read(bundle).features)
    inputs = Schema([ColSpec(kinds[c.kind], c.name, required=c.required) for c in columns])  # type: ignore[arg-type]
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.float64), (-1, *np.shape(scores)[1:]), "score")]))


def log_and_register(
    bundle: Path, name: str, tracking_uri: str, run_id: str | None, experiment_id: str | None = None
) -> ModelVersion:
    """Log the bundle as a pyfunc model in `run_id` (the training run), register it with lineage tags and
    its model card, alias it challenger; the first version of a name also becomes champion."""
    manifest = Manifest.read(bundle)
    if manifest.parity is None or not manifest.parity.passed:
        reason = manifest.parity.reason() if manifest.parity else "no parity check recorded"
        raise ValueError(f"{bundle}: parity not passed ({reason}); refusing to register")
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    example = input_example(bundle)
    scores = open_engine(bundle).score_records(example.to_dict("records"))
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name="export" if not run_id else None):
        info = mlflow.pyfunc.log_model(
            name="ranker",
            python_model=str(PYFUNC_FILE),
            artifacts={"bundle": str(bundle)},
            signature=signature(bundle, example, scores),
            input_example=example,
            pip_requirements=_pip_requirements(),
        )
        p = manifest.parity
        mlflow.log_metrics({"parity_max_abs_diff": p.max_abs_diff, "export_holdout_auc": p.auc_bundle, "export_auc_drop": p.auc_drop})
        card = bundle / "card"
        if card.is_dir():
            mlflow.log_artifacts(str(card), "model_card")
        active_run = mlflow.active_run()
        assert active_run is not None
        source_run = active_run.info.run_id
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="adsfm ranking model (ONNX dense graph + embedding tables)")
    parent = alias_version(client, name, CHAMPION)
    precisions = sorted({t.precision for t in manifest.tables.values()})
    mv = mlflow.register_model(
        info.model_uri,
        name,
        tags={
            "adsfm.git_commit": manifest.git_commit,
            "adsfm.config_hash": manifest.config_hash,
            "adsfm.data_fingerprint": manifest.data_fingerprint,
            "adsfm.train_run_id": manifest.train_run_id or source_run,
            "adsfm.parent_version": parent or "",
            "adsfm.precision": "+".join(precisions),
            "adsfm.table_bytes": str(sum(t.bytes for t in manifest.tables.values())),
            "adsfm.parity_passed": str(p.passed),
            "adsfm.parity": p.reason(),
            "adsfm.holdout_auc": f"{p.auc_bundle:.5f}",
        },
    )
    version = str(mv.version)
    _wait_ready(client, name, version)
    client.update_model_version(name, version, description=_card_text(bundle))
    client.set_registered_model_alias(name, CHALLENGER, version)
    if parent is None:
        promote(name, tracking_uri, version, reason="first version of this model")
    return client.get_model_version(name, version)


def _card_text(bundle: Path) -> str:
    md = bundle / "card" / "model_card.md"
    return md.read_text()[:4000] if md.exists() else ""


def _wait_ready(client: MlflowClient, name: str, version: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while client.get_model_version(name, version).status != "READY":
        if time.time() > deadline:
            raise TimeoutError(f"model {name} version {version} not READY after {timeout:.0f}s")
        time.sleep(0.2)


