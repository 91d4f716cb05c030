"""MLflow: log a bundle as a model version with lineage, move aliases with a recorded history, roll back."""

from __future__ import annotations

import getpass
import json
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
from serving.bundle import open_ranker

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "adsfm.champion_history"
HISTORY_KEEP = 30  # entries kept in the tag (MLflow caps tag values at a few KB)


def _pip_requirements() -> list[str]:
    # Given explicitly: MLflow's inference costs ~6 s and would pull in the training stack.
    pkgs = ("onnxruntime", "safetensors", "numpy", "pandas", "pydantic", "mlflow")
    return [f"{p}=={pkg_version(p)}" for p in pkgs] + ["adsfm"]


def input_example(bundle: Path, n: int = 2) -> pd.DataFrame:
    """A few (user, item) rows with raw values the bundle knows, for the signature and the docs."""
    m = Manifest.read(bundle)
    ranker = open_ranker(bundle)
    items = list(ranker.item_store.items())[:n] or [("0", {})]
    rows = []
    for item_id, feats in items:
        row: dict[str, Any] = {}
        for f in m.sparse:
            vocab = m.tables[f.table].vocab if f.table else []
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
    """Log the bundle as a pyfunc model in `run_id` (the training run), register it with lineage tags and
    its model card, alias it challenger; the first version of a name also becomes champion."""
    manifest = Manifest.read(bundle)
    if manifest.parity is None or not manifest.parity.passed:
        reason = manifest.parity.reason() if manifest.parity else "no parity check recorded"
        raise ValueError(f"{bundle}: parity not passed ({reason}); refusing to register")
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    example = input_example(bundle)
    scores = open_ranker(bundle).score_records(example.to_dict("records"))
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name="export" if not run_id else None):
        info = mlflow.pyfunc.log_model(
            name="ranker",
            python_model=str(PYFUNC_FILE),
            artifacts={"bundle": str(bundle)},
            signature=infer_signature(example, scores),
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


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    # search_model_versions returns empty aliases; get_registered_model(...).aliases is right.
    try:
        v = client.get_registered_model(name).aliases.get(alias)
    except MlflowException:
        return None
    return None if v is None else str(v)


def champion_history(client: MlflowClient, name: str) -> list[dict[str, Any]]:
    """Champion moves, oldest first: version, previous, at, by, reason, kind (promote/force/rollback)."""
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG)
    return json.loads(raw) if raw else []


def _who() -> str:
    try:
        return os.environ.get("USER") or getpass.getuser()
    except Exception:
        return "unknown"


def _move_champion(client: MlflowClient, name: str, target: str, kind: str, reason: str, extra: dict[str, str]) -> None:
    previous = alias_version(client, name, CHAMPION)
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    entry = {"version": target, "previous": previous, "at": at, "by": _who(), "reason": reason or kind, "kind": kind}
    if previous != target:  # re-promoting the champion is not a move: tag it, keep the history clean
        client.set_registered_model_alias(name, CHAMPION, target)
        history = (champion_history(client, name) + [entry])[-HISTORY_KEEP:]
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    tags = {"adsfm.promoted_by": entry["by"], "adsfm.promoted_at": at, "adsfm.promote_reason": entry["reason"],
            "adsfm.promote_kind": kind, "adsfm.previous_champion": previous or "", **extra}
    for k, v in tags.items():
        client.set_model_version_tag(name, target, k, v)


def promote(
    name: str, tracking_uri: str, version: str | None = None, reason: str = "", forced: bool = False, gate: str = ""
) -> str:
    """Move champion to `version` (default: the challenger); record who, when, why (and the gate's verdict
    or that it was forced) on the version and in the model's champion history."""
    client = MlflowClient(tracking_uri)
    target = version or alias_version(client, name, CHALLENGER)
    if target is None:
        raise ValueError(f"model {name!r} has no {CHALLENGER} alias; pass --version")
    client.get_model_version(name, str(target))  # raises with MLflow's message if it does not exist
    _move_champion(client, name, str(target), "force" if forced else "promote", reason, {"adsfm.gate": gate})
    return str(target)


def rollback(name: str, tracking_uri: str, reason: str = "") -> tuple[str, str]:
    """Champion back to the version it replaced, in one step: (from, to)."""
    client = MlflowClient(tracking_uri)
    current = alias_version(client, name, CHAMPION)
    moves = [h for h in champion_history(client, name) if h["kind"] != "rollback" and h["version"] == current]
    if current is None or not moves or not moves[-1]["previous"]:
        raise ValueError(f"model {name!r}: champion {current} has no previous champion to roll back to")
    target = str(moves[-1]["previous"])
    _move_champion(client, name, target, "rollback", reason, {})
    return current, target


def download_version(name: str, version: str, tracking_uri: str, dst: Path) -> Path:
    """Local bundle directory of models:/name/version, downloaded under `dst` once."""
    mlflow.set_tracking_uri(tracking_uri)
    target = dst / f"{name}-v{version}"
    if not (target / "MLmodel").exists():
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(target))
    bundle = target / _bundle_path(target / "MLmodel")
    Manifest.read(bundle)
    return bundle


def _bundle_path(mlmodel: Path) -> str:
    """Where MLflow put the 'bundle' artifact (it keeps the source directory's name, not the key)."""
    import yaml

    spec = yaml.safe_load(mlmodel.read_text()) or {}
    artifacts = spec.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    if "bundle" not in artifacts:
        raise ValueError(f"{mlmodel}: not an adsfm model (no 'bundle' artifact)")
    return str(artifacts["bundle"]["path"])


def resolve(name: str, alias: str, tracking_uri: str, dst: Path) -> tuple[str, Path]:
    """(version, local bundle directory) of models:/name@alias."""
    ver = alias_version(MlflowClient(tracking_uri), name, alias)
    if ver is None:
        raise LookupError(f"model {name!r} has no alias {alias!r} in {tracking_uri}; run adsfm-export / adsfm-promote")
    return ver, download_version(name, ver, tracking_uri, dst)


def describe(name: str, tracking_uri: str) -> str:
    """Versions with aliases and lineage, then the champion history: what `adsfm-models NAME` prints."""
    client = MlflowClient(tracking_uri)
    model = client.get_registered_model(name)
    by_version: dict[str, list[str]] = {}
    for alias, v in model.aliases.items():
        by_version.setdefault(str(v), []).append(alias)
    lines = [f"model {name}", f"{'ver':>4} {'aliases':<22} {'AUC':>8} {'precision':<10} {'bytes':>10} {'git':<9} {'parent':>6}  created"]
    for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda m: int(m.version)):
        t = mv.tags
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(mv.creation_timestamp / 1000))
        lines.append(
            f"{mv.version:>4} {','.join(sorted(by_version.get(str(mv.version), []))) or '-':<22} "
            f"{t.get('adsfm.holdout_auc', '-'):>8} {t.get('adsfm.precision', '-'):<10} {t.get('adsfm.table_bytes', '-'):>10} "
            f"{t.get('adsfm.git_commit', '-')[:8]:<9} {t.get('adsfm.parent_version', '') or '-':>6}  {created}"
        )
    lines.append("champion history (oldest first):")
    for h in champion_history(client, name):
        lines.append(f"  {h['at']}  {h['previous'] or '-':>4} -> {h['version']:<4} {h['kind']:<8} by {h['by']}: {h['reason']}")
    return "\n".join(lines)
