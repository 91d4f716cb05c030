"""Under steady load through the Python client, an alias move (champion → a new version) and a replica
killed with SIGKILL fail no request: replicas load the new version beside the old one, and the client
retries the 5xx of requests that were on the killed replica (ranking is idempotent)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.integration.load import SteadyLoad

pytestmark = pytest.mark.integration


def test_alias_move_and_killed_replica_fail_no_request(ray_cluster: None, serve_port: int, trained: dict[str, Any],
                                                         features: Any, small_cfg: Any, tmp_path: Any) -> None:
    import ray
    from mlflow.tracking import MlflowClient

    from adsfm.contract.config import ServeConfig
    from adsfm.contract.tracking import ensure_experiment
    from adsfm.export.register import log_and_register
    from adsfm.serving import app
    from adsfm.training.data import example_request, load_frame

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = ensure_experiment(uri, "zero-downtime", str(tmp_path))
    log_and_register(trained["bundle"], "zd", uri, run_id=None, experiment_id=exp)  # version 1: champion
    url = app.start(ServeConfig(port=serve_port, model_name="zd", num_replicas=2, reload_interval_s=0.5), uri, name="zd")
    df, _ = load_frame(small_cfg.data)
    # 400 candidates a request: each takes long enough that the killed replica has requests in flight
    requests_ = [example_request(df, features.spec, int(r), [str(i) for i in range(1, 401)]) for r in features.holdout_idx[:20]]
    try:
        with SteadyLoad(url, requests_, clients=4, retries=3) as load:
            time.sleep(3)
            v2 = str(log_and_register(trained["bundle"], "zd", uri, run_id=None, experiment_id=exp).version)  # challenger
            MlflowClient(uri).set_registered_model_alias("zd", "champion", v2)  # the replicas follow within 0.5 s
            time.sleep(4)
            replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                        if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::zd#RankingDeployment#")]
            assert len(replicas) == 2, replicas
            ray.kill(ray.get_actor(replicas[0]["name"], namespace="serve"), no_restart=True)  # SIGKILL; Serve replaces it
            time.sleep(8)
    finally:
        app.stop("zd")
    versions = load.versions()
    print(f"zero downtime: {load.ok} requests answered, {load.failed} failed, {load.retried} retried "
          f"by the client; versions served {versions}")
    assert load.failed == 0, load.errors[:5]
    assert load.retried > 0  # the kill hit requests in flight, and retries answered them
    assert versions.get("1", 0) > 0 and versions.get(v2, 0) > 0
    assert load.ok > 100


def test_requests_spill_over_to_the_lighter_model_when_the_queue_is_full(
    ray_cluster: None, serve_port: int, trained: dict[str, Any], features: Any, small_cfg: Any, tmp_path: Any
) -> None:
    """serve.spillover: alone, a request is scored by the main model; in a burst, the requests that find
    `spillover_queue` others in flight are scored by the lighter one, and every request is answered."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from adsfm.contract.config import ServeConfig
    from adsfm.contract.tracking import ensure_experiment
    from adsfm.export.register import log_and_register
    from adsfm.serving import app
    from adsfm.training.data import example_request, load_frame

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = ensure_experiment(uri, "spillover", str(tmp_path))
    for name in ("main", "light"):  # the same bundle twice: which one answered is in the response
        log_and_register(trained["bundle"], name, uri, run_id=None, experiment_id=exp)
    url = app.start(ServeConfig(port=serve_port, model_name="main", spillover="light@champion", spillover_queue=1,
                                batch_wait_ms=20), uri, name="spill")
    try:
        df, _ = load_frame(small_cfg.data)
        body = example_request(df, features.spec, int(features.holdout_idx[0]), [str(i) for i in range(1, 101)])
        alone = [requests.post(f"{url}/v1/rank", json=body, timeout=30).json()["model_name"] for _ in range(3)]
        with ThreadPoolExecutor(16) as pool:
            burst = list(pool.map(lambda _: requests.post(f"{url}/v1/rank", json=body, timeout=60), range(32)))
        names = [r.json()["model_name"] for r in burst if r.status_code == 200]
        metrics_text = requests.get(f"{url}/metrics", timeout=10).text
    finally:
        app.stop("spill")
    print(f"spillover: alone {alone}; burst of 32 from 16 clients: {names.count('main')} main, {names.count('light')} light")
    assert alone == ["main"] * 3
    assert len(names) == 32 and names.count("light") > 0 and names.count("main") > 0
    spilled = [line for line in metrics_text.splitlines() if line.startswith("adsfm_spillover_requests_total")]
    assert spilled and float(spilled[0].split()[-1]) == names.count("light")
