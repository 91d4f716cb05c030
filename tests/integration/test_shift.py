"""adsfm-shift on a live Ray Serve app under load: a challenger made to fail (its artifacts corrupted in the
artifact store after registration) is rolled back by the shift itself, with every request still answered by
the champion; a healthy challenger then goes 50 → 100 % and becomes champion."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.load import SteadyLoad

pytestmark = pytest.mark.integration


def test_shift_rolls_back_a_failing_challenger_then_promotes_a_healthy_one(
    ray_cluster: None, serve_port: int, trained: dict[str, Any], features: Any, small_cfg: Any, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from adsfm.contract.config import ServeConfig
    from adsfm.contract.registry import CHAMPION, alias_version, read_traffic
    from adsfm.contract.tracking import ensure_experiment
    from adsfm.export.register import log_and_register
    from adsfm.launch import shift
    from adsfm.serving import app
    from adsfm.training.data import example_request, load_frame

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = ensure_experiment(uri, "shift", str(tmp_path))
    log_and_register(trained["bundle"], "shift", uri, run_id=None, experiment_id=exp)  # v1: champion
    before = set(tmp_path.rglob("*.onnx"))
    v2 = str(log_and_register(trained["bundle"], "shift", uri, run_id=None, experiment_id=exp).version)
    corrupted = sorted(set(tmp_path.rglob("*.onnx")) - before)
    assert corrupted
    for f in corrupted:  # the store now serves a broken challenger: replicas fail to load it
        f.write_bytes(b"not an onnx graph")

    url = app.start(ServeConfig(port=serve_port, model_name="shift", reload_interval_s=0.5), uri, name="shift")
    df, _ = load_frame(small_cfg.data)
    requests_ = [example_request(df, features.spec, int(r), [str(i) for i in range(1, 31)]) for r in features.holdout_idx[:40]]
    args = ["shift", "--steps", "50,100", "--every", "2s", "--min-requests", "5", "--max-error-rate", "0.05",
            "--max-p99-ms", "5000", "--tracking-uri", uri]
    client = MlflowClient(uri)
    try:
        with SteadyLoad(url, requests_, clients=2, retries=0) as load:
            time.sleep(2)
            t0 = time.time()
            with pytest.raises(SystemExit) as failed:
                shift.main(args)
            rolled_back_in = time.time() - t0
            after_failure = dict(load.answers)
            assert failed.value.code == 1
            traffic = read_traffic(client, "shift")
            assert traffic.split.challenger_pct == 0 and traffic.champion == "1"

            v3 = str(log_and_register(trained["bundle"], "shift", uri, run_id=None, experiment_id=exp).version)  # healthy
            with pytest.raises(SystemExit) as passed:
                shift.main(args)
            assert passed.value.code == 0
            time.sleep(2)  # the replica follows the new champion within reload_interval_s
    finally:
        app.stop("shift")
    seen = load.answers
    print(f"shift: failing challenger v{v2} rolled back in {rolled_back_in:.1f} s; answers until then "
          f"{after_failure}; whole run {load.ok} answered, {load.failed} failed, by (version, fallback) {seen}")
    assert load.failed == 0, load.errors[:5]
    assert after_failure.get(("1", "challenger_unavailable"), 0) > 0  # the failing share was answered by v1
    assert not any(v == v2 and fb is None for v, fb in seen)  # the broken version answered nothing
    assert seen.get((v3, None), 0) > 0
    assert alias_version(client, "shift", CHAMPION) == v3 and read_traffic(client, "shift").split.challenger_pct == 0
