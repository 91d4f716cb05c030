"""The registry goes away while replicas serve: a real `mlflow server` stopped under load, then started
again on the same store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.conftest import MlflowServer
from tests.integration.load import SteadyLoad

pytestmark = pytest.mark.integration


def _metric(url: str, name: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith(name)))


def test_replicas_serve_through_a_registry_outage_and_follow_moves_once_it_is_back(
    ray_cluster: None, serve_port: int, trained: dict[str, Any], features: Any, small_cfg: Any, tmp_path: Path
) -> None:
    """Stopped for 8 s under load: every request still answered by the loaded version, readiness up, the
    poll backing off (adsfm_registry_up 0, errors counted); started again, the champion alias moved then
    reaches the replica."""
    from mlflow.tracking import MlflowClient

    from adsfm.contract.config import ServeConfig
    from adsfm.export.register import log_and_register
    from adsfm.serving import app
    from adsfm.training.data import example_request, load_frame
    from tests.conftest import free_port

    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server", free_port()).start()
    uri = server.url
    try:
        v1 = str(log_and_register(trained["bundle"], "outage", uri, run_id=None).version)
        v2 = str(log_and_register(trained["bundle"], "outage", uri, run_id=None).version)  # the challenger
        url = app.start(ServeConfig(port=serve_port, model_name="outage", reload_interval_s=0.5), uri, name="outage")
        df, _ = load_frame(small_cfg.data)
        requests_ = [example_request(df, features.spec, int(r), [str(i) for i in range(1, 31)]) for r in features.holdout_idx[:20]]
        try:
            with SteadyLoad(url, requests_, clients=2, retries=0) as load:
                time.sleep(2)
                server.stop()
                down = time.time()
                ready = []
                while time.time() - down < 8:
                    ready.append(requests.get(f"{url}/readyz", timeout=10).status_code)
                    time.sleep(0.5)
                during = load.ok
                errors, up = _metric(url, "adsfm_registry_errors_total"), _metric(url, "adsfm_registry_up")
                server.start()
                back = time.time()
                MlflowClient(uri).set_registered_model_alias("outage", "champion", v2)
                while load.versions().get(v2, 0) == 0:
                    assert time.time() - back < 90, "the alias moved after the outage never reached the replica"
                    time.sleep(0.2)
                followed = time.time() - back
        finally:
            app.stop("outage")
    finally:
        server.stop()
    print(f"registry outage 8 s: {load.ok} requests answered ({during} up to the restart), {load.failed} failed, "
          f"{load.retried} retried; {errors:.0f} failed registry reads; /readyz {set(ready)}; the alias moved after "
          f"the restart served in {followed:.1f} s; versions {load.versions()}")
    assert load.failed == 0, load.errors[:5]
    assert set(ready) == {200} and up == 0 and errors >= 1
    assert load.versions().get(v1, 0) > 0 and load.versions()[v2] > 0
