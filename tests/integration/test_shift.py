"""adsfm-shift on a live Ray Serve app under load. Three challengers in turn: one made to fail (its
artifacts corrupted in the artifact store after registration) and one deliberately slow (a dense graph
hundreds of times heavier) are each rolled back by the shift itself, on their error rate and on their
p99, with every request still answered; a healthy one, a different bundle (the int8 export of the
champion's checkpoint), then goes 50 → 100 % and becomes champion."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.load import SteadyLoad

pytestmark = pytest.mark.integration


def _slow_bundle(features: Any, small_cfg: Any, out: Path) -> Path:
    """An untrained DLRM whose top MLP is 3 x 3072 wide (about 50x the champion's work per candidate), with
    a passing parity check of its own: registrable, and slow."""
    import torch
    from omegaconf import OmegaConf

    from adsfm.contract.config import Precision
    from adsfm.export.bundle import write_dense_bundle
    from adsfm.export.parity import check_parity, eager_probs
    from adsfm.serving.engine import DenseGraphEngine
    from adsfm.training.models import build_model

    cfg = OmegaConf.merge(small_cfg, {"model": {"over_arch": [3072, 3072, 3072, 1]}})
    torch.manual_seed(0)
    model = build_model(features.spec, cfg.model, device="cpu").eval()
    tables = [(c.name, model.sparse.embedding_bags[c.name].weight.detach()) for c in model.sparse.embedding_bag_configs()]
    manifest = write_dense_bundle(features, out, tables, model.dense, {n: Precision.fp32 for n, _ in tables},
                                  cfg.model.embedding_dim, cfg.export.opset, {})
    idx = features.holdout_idx[:512]
    manifest.parity, _ = check_parity(eager_probs(model, features, idx), DenseGraphEngine(out), features, idx, 1e-5)
    manifest.write(out)
    return out


def test_shift_rolls_back_failing_and_slow_challengers_then_promotes_a_healthy_one(
    ray_cluster: None, serve_port: int, trained: dict[str, Any], features: Any, small_cfg: Any, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from adsfm.contract.config import ServeConfig
    from adsfm.contract.registry import CHAMPION, alias_version, read_traffic
    from adsfm.contract.tracking import ensure_experiment
    from adsfm.export.bundle import export_bundle
    from adsfm.export.register import log_and_register
    from adsfm.launch import shift
    from adsfm.serving import app
    from adsfm.training.data import example_request, load_frame

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = ensure_experiment(uri, "shift", str(tmp_path))
    store = tmp_path / "mlartifacts"

    def register(bundle: Path) -> str:
        return str(log_and_register(bundle, "shift", uri, run_id=None, experiment_id=exp).version)

    register(trained["bundle"])  # v1: champion
    before = set(store.rglob("*.onnx"))
    v2 = register(trained["bundle"])
    corrupted = sorted(set(store.rglob("*.onnx")) - before)
    assert corrupted
    for f in corrupted:  # the store now serves a broken challenger: replicas fail to load it
        f.write_bytes(b"not an onnx graph")
    slow = _slow_bundle(features, small_cfg, tmp_path / "slow")
    int8 = export_bundle(OmegaConf.merge(small_cfg, {"export": {"precision": "int8"}}), trained["checkpoint"], tmp_path / "int8")
    assert {t.precision for t in int8.tables.values()} == {"int8"}

    url = app.start(ServeConfig(port=serve_port, model_name="shift", reload_interval_s=0.5), uri, name="shift")
    df, _ = load_frame(small_cfg.data)
    requests_ = [example_request(df, features.spec, int(r), [str(i) for i in range(1, 31)]) for r in features.holdout_idx[:40]]
    args = ["shift", "--steps", "50,100", "--every", "2s", "--min-requests", "5", "--max-error-rate", "0.05",
            "--max-p99-ms", "25", "--tracking-uri", uri]
    client = MlflowClient(uri)
    verdicts: dict[str, tuple[int, float]] = {}

    def run_shift(expected: int, label: str) -> None:
        t0 = time.time()
        with pytest.raises(SystemExit) as done:
            shift.main(args)
        verdicts[label] = (int(done.value.code), time.time() - t0)
        assert done.value.code == expected, label

    try:
        with SteadyLoad(url, requests_, clients=2, retries=0) as load:
            time.sleep(2)
            run_shift(1, "failing")
            after_failure = dict(load.answers)
            assert read_traffic(client, "shift").split.challenger_pct == 0 and read_traffic(client, "shift").champion == "1"

            v3 = register(slow)
            run_shift(1, "slow")
            after_slow = dict(load.answers)
            assert read_traffic(client, "shift").split.challenger_pct == 0

            v4 = register(tmp_path / "int8")  # healthy, and a different bundle from the champion's
            run_shift(0, "healthy")
            time.sleep(2)  # the replica follows the new champion within reload_interval_s
    finally:
        app.stop("shift")
    seen = load.answers
    print(f"shift verdicts (exit status, seconds) {verdicts}; whole run {load.ok} answered, {load.failed} failed, "
          f"by (version, fallback) {seen}")
    assert load.failed == 0, load.errors[:5]
    assert after_failure.get(("1", "challenger_unavailable"), 0) > 0  # the failing share was answered by v1
    assert not any(v == v2 and fb is None for v, fb in seen)  # the broken version answered nothing
    assert after_slow.get((v3, None), 0) > 0  # the slow one answered: it was judged on its p99, not on errors
    assert seen.get((v4, None), 0) > 0
    assert alias_version(client, "shift", CHAMPION) == v4 and read_traffic(client, "shift").split.challenger_pct == 0
