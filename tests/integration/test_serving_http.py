"""The Ray Serve app over real HTTP on 127.0.0.1: ranks like the eager model, answers bad input with 4xx."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(ray_cluster: None, serve_port: int, trained: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from export.registry import log_and_register
    from serving import app
    from serving.config import ServeConfig
    from training.tracking import ensure_experiment

    root = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    exp = ensure_experiment(uri, "serve-test", str(root))
    log_and_register(trained["bundle"], "served", uri, run_id=None, experiment_id=exp)
    cfg = ServeConfig(port=serve_port, model_name="served", max_candidates=100)
    url = app.start(cfg, uri, name="serve-test")
    yield url
    app.stop("serve-test")


def test_ranks_over_http_like_the_eager_model(server: str, trained: dict[str, Any], features: Any, small_cfg: Any) -> None:
    from training.data import example_request, load_frame

    df, _ = load_frame(small_cfg.data)
    row = int(features.holdout_idx[123])
    items = [str(i) for i in range(1, 31)]
    req = example_request(df, features.spec, row, items)
    r = requests.post(f"{server}/v1/rank", json=req, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "served" and body["model_version"] == "1"

    # Independent reference: the eager PyTorch model on the training featurization of the same user
    # with each candidate item swapped in (item-side features from that item's own rows).
    fs = features
    got = {c["item"]["item_id"]: c["score"] for c in body["candidates"]}
    item_rows = {str(df.item_id.iloc[i]): i for i in range(len(df))}
    want = {}
    for it in items:
        b = fs.take(np.array([row]))
        item_b = fs.take(np.array([item_rows[it]]))
        kjt_u, kjt_i = b.sparse_features.to_dict(), item_b.sparse_features.to_dict()
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        side = {f["name"]: f["side"] for f in fs.spec["sparse"]}
        parts = {k: (kjt_i[k] if side[k] == "item" else kjt_u[k]) for k in fs.sparse_names}
        kjt = KeyedJaggedTensor.from_jt_dict(parts)
        dense = b.dense_features.clone()
        for j, d in enumerate(fs.spec["dense"]):
            if d["side"] == "item":
                dense[:, j] = item_b.dense_features[:, j]
        with torch.no_grad():
            want[it] = float(torch.sigmoid(trained["model"](dense, kjt))[0])
    for it in items:
        assert abs(got[it] - want[it]) <= 1e-5, f"item {it}: served {got[it]} vs eager {want[it]}"
    order = [c["item"]["item_id"] for c in body["candidates"]]
    assert order == sorted(items, key=lambda i: -want[i])


@pytest.mark.parametrize(
    "payload,field",
    [
        ({"user": {"user_id": "1"}}, "candidates"),
        ({"user": {"user_id": "1"}, "candidates": []}, "candidates"),
        ({"user": {"user_id": "1"}, "candidates": "all"}, "candidates"),
        ({"user": {"user_id": {"nested": 1}}, "candidates": [{"item_id": "1"}]}, "user"),
        ({"user": {"userid": "1"}, "candidates": [{"item_id": "1"}]}, "userid"),
        ({"user": {"user_id": "1"}, "candidates": [{"item_id": str(i)} for i in range(101)]}, "candidates"),
        ({"user": {"user_id": "1", "age": "forty"}, "candidates": [{"item_id": "1"}]}, "age"),
        ({"user": {"user_id": "1"}, "candidates": [{"title": "x"}]}, "title"),
        ([1, 2, 3], "body"),
    ],
)
def test_bad_input_gets_4xx_naming_the_field(server: str, payload: Any, field: str) -> None:
    r = requests.post(f"{server}/v1/rank", json=payload, timeout=30)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert field in r.text


def test_malformed_json_is_a_4xx_and_the_replica_survives(server: str) -> None:
    r = requests.post(f"{server}/v1/rank", data=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert 400 <= r.status_code < 500
    h = requests.get(f"{server}/healthz", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok"


