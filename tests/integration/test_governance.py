"""Promotion gates, forced promotion, rollback and the champion history, on a local sqlite store with a
serving app that follows the alias, and the same flow against a real `mlflow server`."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bundles(trained: dict[str, Any], small_cfg: Any, features: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """good: the 1-epoch fixture; weak: 5 steps of training; broken: good with one embedding table perturbed
    after export (its manifest still says parity passed); int8: good's checkpoint with int8 tables."""
    from omegaconf import OmegaConf
    from safetensors.numpy import load_file, save_file

    from adsfm.contract.manifest import Manifest
    from adsfm.export.bundle import export_bundle
    from adsfm.training.checkpoint import save_checkpoint
    from adsfm.training.local import train_local

    root = tmp_path_factory.mktemp("gov")
    weak = train_local(small_cfg, features, max_steps=5)
    ckpt = save_checkpoint(weak, root / "weak" / "checkpoints" / "step_5")
    export_bundle(small_cfg, ckpt, root / "weak" / "bundle")
    broken = root / "broken"
    shutil.copytree(trained["bundle"], broken)
    m = Manifest.read(broken)
    assert m.parity is not None and m.parity.passed
    table = m.tables["user_id"]
    weights = load_file(str(broken / table.file))
    save_file({k: v + np.float32(0.05) for k, v in weights.items()}, str(broken / table.file))  # every user row moved
    export_bundle(OmegaConf.merge(small_cfg, {"export": {"precision": "int8"}}), trained["checkpoint"], root / "int8")
    return {"good": trained["bundle"], "weak": root / "weak" / "bundle", "broken": broken, "int8": root / "int8"}


def _register_bypassing_checks(bundle: Path, name: str, uri: str) -> str:
    """A version registered by other means than adsfm-export (which refuses failed parity)."""
    import mlflow

    from adsfm.export.register import PYFUNC_FILE

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="ranker", python_model=str(PYFUNC_FILE), artifacts={"bundle": str(bundle)}, pip_requirements=["adsfm"])
    return str(mlflow.register_model(info.model_uri, name).version)


def _quantized_checks(name: str, uri: str, bundle: Path, workdir: Path) -> None:
    from adsfm.contract.config import GateConfig
    from adsfm.export.gate import GateRefused, gated_promote
    from adsfm.export.register import log_and_register

    v_int8 = str(log_and_register(bundle, name, uri, run_id=None).version)
    with pytest.raises(GateRefused, match=r"shift: mean \|quantized - fp32 eager\| \S+ vs bound 1e-09") as refused:
        gated_promote(name, uri, v_int8, GateConfig(latency_budget_ms=1000.0, max_score_shift=1e-9), workdir)
    checks = {c.name: c for c in refused.value.report.checks}
    assert checks["parity"].passed and checks["calibration"].passed, refused.value.report.table()
    print(refused.value.report.table())
    with pytest.raises(GateRefused, match=r"calibration: \S+ \(mean predicted / observed"):
        gated_promote(name, uri, v_int8, GateConfig(latency_budget_ms=1000.0, min_calibration=1.5, max_calibration=2.0), workdir)


def governance_flow(uri: str, bundles: dict[str, Path], workdir: Path, served: Callable[[], str] | None = None,
                    quantized: bool = False) -> None:
    """The flow; with `quantized`, also the int8 bundle's calibration and score-shift checks (store-independent,
    so run on one store only)."""
    from mlflow.tracking import MlflowClient

    from adsfm.contract.config import GateConfig
    from adsfm.contract.registry import champion_history, describe, rollback
    from adsfm.export.gate import GateRefused, gated_promote
    from adsfm.export.register import log_and_register

    name = "gov"
    client = MlflowClient(uri)
    gate = GateConfig(latency_budget_ms=1000.0)

    def champion() -> str:
        return str(client.get_registered_model(name).aliases["champion"])

    def wait_served(version: str) -> None:
        if served is None:
            return
        deadline = time.time() + 30
        while served() != version:
            assert time.time() < deadline, f"the serving app still answers with v{served()}, expected v{version}"
            time.sleep(0.5)

    v_weak = str(log_and_register(bundles["weak"], name, uri, run_id=None).version)
    assert champion() == v_weak  # the first version becomes champion directly
    wait_served(v_weak)

    v_good = str(log_and_register(bundles["good"], name, uri, run_id=None).version)
    report = gated_promote(name, uri, None, gate, workdir, reason="better AUC")  # the challenger
    assert report.passed and report.version == v_good
    assert report.metrics["candidate_auc"] > report.metrics["champion_auc"]
    assert champion() == v_good
    wait_served(v_good)

    v_weak2 = str(log_and_register(bundles["weak"], name, uri, run_id=None).version)
    with pytest.raises(GateRefused, match=r"quality: AUC 0\.\d+ vs champion v\d+ 0\.\d+") as refused:
        gated_promote(name, uri, v_weak2, gate, workdir)
    assert not refused.value.report.passed
    assert champion() == v_good

    v_broken = _register_bypassing_checks(bundles["broken"], name, uri)
    with pytest.raises(GateRefused, match=r"parity: recomputed: max \|eager - exported\| \S+ vs tolerance 1e-05") as refused:
        gated_promote(name, uri, v_broken, gate, workdir)
    print(f"perturbed table: {refused.value.report.failures()}")
    assert champion() == v_good

    # int8 tables: judged again on AUC, and on calibration and score shift against the fp32 eager model
    if quantized:
        _quantized_checks(name, uri, bundles["int8"], workdir)
    assert champion() == v_good

    with pytest.raises(GateRefused, match="latency: p99"):
        gated_promote(name, uri, v_good, GateConfig(latency_budget_ms=1e-6), workdir)

    gated_promote(name, uri, v_weak2, gate, workdir, force=True, reason="incident drill")
    assert champion() == v_weak2
    tags = client.get_model_version(name, v_weak2).tags
    assert tags["adsfm.promote_kind"] == "force" and "quality FAIL" in tags["adsfm.gate"]
    wait_served(v_weak2)

    assert rollback(name, uri, reason="drill over") == (v_weak2, v_good)
    assert champion() == v_good
    wait_served(v_good)

    kinds = [(h["kind"], h["previous"], h["version"]) for h in champion_history(client, name)]
    assert kinds == [("promote", None, v_weak), ("promote", v_weak, v_good), ("force", v_good, v_weak2), ("rollback", v_weak2, v_good)]
    listing = describe(name, uri)
    assert "rollback" in listing and "incident drill" in listing and f"{v_good:>4} champion" in listing

    mv = client.get_model_version(name, v_good)
    for tag in ("adsfm.git_commit", "adsfm.config_hash", "adsfm.data_fingerprint", "adsfm.train_run_id", "adsfm.parent_version"):
        assert tag in mv.tags, tag
    assert mv.tags["adsfm.parent_version"] == v_weak
    assert "# adsfm model card" in (mv.description or "")
    arts = {a.path for a in client.list_artifacts(mv.run_id, "model_card")}
    assert {"model_card/model_card.md", "model_card/roc.png", "model_card/calibration.png"} <= arts


def test_governance_on_local_store_with_serving(
    bundles: dict[str, Path], ray_cluster: None, serve_port: int, tmp_path: Path
) -> None:
    from adsfm.contract.config import ServeConfig
    from adsfm.serving import app

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from adsfm.contract.tracking import ensure_experiment

    ensure_experiment(uri, "Default-adsfm", str(tmp_path))
    url = f"http://127.0.0.1:{serve_port}"
    started: list[bool] = []

    def served() -> str:
        if not started:  # the app needs a champion to load: start it once the first version exists
            app.start(ServeConfig(port=serve_port, model_name="gov", reload_interval_s=0.5), uri, name="gov")
            started.append(True)
        return str(requests.get(f"{url}/healthz", timeout=10).json()["model_version"])

    try:
        governance_flow(uri, bundles, tmp_path / "work", served, quantized=True)
    finally:
        if started:
            app.stop("gov")


def test_governance_against_a_real_tracking_server(bundles: dict[str, Path], mlflow_server: str, tmp_path: Path) -> None:
    governance_flow(mlflow_server, bundles, tmp_path / "work")
