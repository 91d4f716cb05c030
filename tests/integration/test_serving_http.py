"""The Ray Serve app over real HTTP on 127.0.0.1: ranks like the eager model, answers bad input with 4xx."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests

pytestmark = pytest.mark.integration
TOKEN = "test-token-3f9a"
HTTP = requests.Session()
HTTP.headers["Authorization"] = f"Bearer {TOKEN}"


@pytest.fixture(scope="module")
def server(ray_cluster: None, serve_port: int, trained: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from adsfm.contract.config import ServeConfig
    from adsfm.contract.tracking import ensure_experiment
    from adsfm.export.register import log_and_register
    from adsfm.serving import app

    root = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    exp = ensure_experiment(uri, "serve-test", str(root))
    log_and_register(trained["bundle"], "served", uri, run_id=None, experiment_id=exp)
    cfg = ServeConfig(port=serve_port, model_name="served", max_candidates=100, batch_wait_ms=20, max_request_bytes=200_000,
                      auth_token=TOKEN)
    url = app.start(cfg, uri, name="serve-test")
    REGISTRY.update(uri=uri, cfg=cfg)
    yield url
    app.stop("serve-test")


REGISTRY: dict[str, Any] = {}


@pytest.fixture()
def registry_uri(server: str) -> str:
    return str(REGISTRY["uri"])


def test_ranks_over_http_like_the_eager_model(server: str, trained: dict[str, Any], features: Any, small_cfg: Any) -> None:
    from adsfm.training.data import example_request, load_frame
    from tests.integration.reference import eager_scores

    df, _ = load_frame(small_cfg.data)
    row = int(features.holdout_idx[123])
    items = [str(i) for i in range(1, 31)]
    req = example_request(df, features.spec, row, items)
    r = HTTP.post(f"{server}/v1/rank", json=req, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "served" and body["model_version"] == "1"

    # Independent reference: the eager PyTorch model on the training featurization of the same user
    # with each candidate item swapped in (item-side features from that item's own rows).
    got = {c["item"]["item_id"]: c["score"] for c in body["candidates"]}
    want = {it: float(p) for it, p in eager_scores(trained["model"], features, df, row, items).items()}
    for it in items:
        assert abs(got[it] - want[it]) <= 1e-5, f"item {it}: served {got[it]} vs eager {want[it]}"
    order = [c["item"]["item_id"] for c in body["candidates"]]
    assert order == sorted(items, key=lambda i: -want[i])


@pytest.mark.parametrize(
    "payload,loc",
    [
        ({"user": {"user_id": "1"}}, ["body", "candidates"]),
        ({"user": {"user_id": "1"}, "candidates": []}, ["body", "candidates"]),
        ({"user": {"user_id": "1"}, "candidates": "all"}, ["body", "candidates"]),
        ({"user": {"user_id": {"nested": 1}}, "candidates": [{"item_id": "1"}]}, ["body", "user", "user_id"]),
        ({"user": {"userid": "1"}, "candidates": [{"item_id": "1"}]}, ["body", "user", "userid"]),
        ({"user": {"user_id": "1"}, "candidates": [{"item_id": str(i)} for i in range(101)]}, ["body", "candidates"]),
        ({"user": {"user_id": "1", "age": "forty"}, "candidates": [{"item_id": "1"}]}, ["body", "user", "age"]),
        ({"user": {"user_id": "1"}, "candidates": [{"title": "x"}]}, ["body", "candidates", 0]),
        ({"user": {"history": ["1"] * 1001}, "candidates": [{"item_id": "1"}]}, ["body", "user", "history"]),  # serve.max_values
        ([1, 2, 3], ["body"]),
    ],
)
def test_bad_input_gets_a_422_naming_the_field(server: str, payload: Any, loc: list[Any]) -> None:
    """422 bodies have the documented shape (FastAPI's: loc, msg, type for each refused field)."""
    r = HTTP.post(f"{server}/v1/rank", json=payload, timeout=30)
    assert r.status_code == 422, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert all({"loc", "msg", "type"} <= set(d) for d in detail), detail
    assert detail[0]["loc"][: len(loc)] == loc, detail


def test_every_feature_may_be_left_out(server: str) -> None:
    """The item id alone is a request: the user's features are missing (their missing rows, the training
    means), the items' come from the bundle's item store; an unknown item id scores too."""
    r = HTTP.post(f"{server}/v1/rank", json={"candidates": [{"item_id": "50"}, {"item_id": 181}, {"item_id": "no-such-item"}]},
                      timeout=30)
    assert r.status_code == 200, r.text
    assert len(r.json()["candidates"]) == 3 and all(0 < c["score"] < 1 for c in r.json()["candidates"])
    r = HTTP.post(f"{server}/v1/rank", json={"user": {"user_id": None, "history": []}, "candidates": [{"item_id": "50"}]},
                      timeout=30)
    assert r.status_code == 200, r.text


def test_the_served_schema_is_the_bundles(server: str, trained: dict[str, Any]) -> None:
    """/openapi.json names the bundle's features with their shapes, the item id required on each candidate;
    /metrics is declared and served as text."""
    doc = HTTP.get(f"{server}/openapi.json", timeout=10).json()
    schemas = doc["components"]["schemas"]
    req = schemas["RankRequest"]
    assert req["required"] == ["candidates"] and req["additionalProperties"] is False
    user = schemas["User"]
    assert set(user["properties"]) == set(trained["manifest"].request_fields("user"))
    history = {t.get("type") for t in user["properties"]["history"]["anyOf"]}
    assert history == {"array", "string", "null"}
    assert schemas["Candidate"]["required"] == ["item_id"]
    assert doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"] == {"text/plain": {"schema": {"type": "string"}}}
    m = HTTP.get(f"{server}/metrics", timeout=10)
    assert m.headers["content-type"].startswith("text/plain")
    # counters are per replica: the scrape names the replica that answered it
    assert re.search(r'^adsfm_replica_info\{replica="\w+"\} 1\.0$', m.text, re.M), m.text[:2000]


def test_schemathesis_finds_nothing(server: str) -> None:
    """Schemathesis (every check: status codes, content types, response schemas, schema-violating requests
    refused and conforming ones accepted, unsupported methods) over the served OpenAPI document; the
    replica still answers afterwards."""
    import subprocess
    import sys
    from pathlib import Path

    cli = Path(sys.executable).parent / "schemathesis"
    config = Path(__file__).with_name("schemathesis.toml")
    proc = subprocess.run([str(cli), "--config-file", str(config), "run", f"{server}/openapi.json", "--checks", "all", "--max-examples", "300",
                           "--seed", "7", "--workers", "1", "-H", f"Authorization: Bearer {TOKEN}"],
                          capture_output=True, text=True, timeout=600)
    tail = proc.stdout[-4000:]
    print(tail)
    assert proc.returncode == 0 and "No issues found" in proc.stdout, tail
    assert HTTP.get(f"{server}/healthz", timeout=10).status_code == 200


def test_the_pyfunc_scores_a_request_body_like_http(server: str, trained: dict[str, Any], registry_uri: str) -> None:
    """models:/served@champion's predict on the rows of an HTTP request body (lists as lists, item ids
    alone) gives the scores HTTP gives."""
    import mlflow
    import pandas as pd

    from adsfm.contract.request import request_rows

    body = {"user": {"user_id": "196", "gender": "M", "age": 49, "history": ["242", "302", 377], "liked_history": []},
            "candidates": [{"item_id": "1"}, {"item_id": 50}, {"item_id": "181"}, {"item_id": "no-such-item"}]}
    answer = HTTP.post(f"{server}/v1/rank", json=body, timeout=30).json()
    http = {str(c["item"]["item_id"]): c["score"] for c in answer["candidates"]}
    mlflow.set_tracking_uri(registry_uri)
    model = mlflow.pyfunc.load_model("models:/served@champion")
    got = np.asarray(model.predict(pd.DataFrame(request_rows(body))))
    want = np.array([http[str(c["item_id"])] for c in body["candidates"]])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_malformed_json_is_a_4xx_and_the_replica_survives(server: str) -> None:
    r = HTTP.post(f"{server}/v1/rank", data=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert 400 <= r.status_code < 500
    h = HTTP.get(f"{server}/healthz", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok"


def _metric(server: str, name: str) -> float:
    text = HTTP.get(f"{server}/metrics", timeout=30).text
    return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith(name)))


def test_runtime_knobs_reach_the_live_replica(server: str) -> None:
    """Deploying the running app again with knobs (Ray Serve's user_config, what reconfigure() receives):
    a new cache_generation empties the user cache of the replica that is serving, without a restart (its
    request counter goes on); a setting that cannot change at runtime is refused before any replica sees it,
    with the list of those that can, and the app keeps serving."""
    from adsfm.serving import app

    body = {"user": {"user_id": "7", "history": ["1", "2"]}, "candidates": [{"item_id": "3"}]}
    assert HTTP.post(f"{server}/v1/rank", json=body, timeout=30).status_code == 200
    served = _metric(server, 'adsfm_rank_requests_total{status="200"}')
    assert served >= 1 and _metric(server, 'adsfm_user_cache{kind="size"}') >= 1
    cfg = REGISTRY["cfg"]  # the fixture's: other init arguments would be a new deployment, not a reconfigure
    app.start(cfg, REGISTRY["uri"], name="serve-test", knobs={"cache_generation": "knobs-test", "batch_wait_ms": 20})
    assert _metric(server, 'adsfm_user_cache{kind="size"}') == 0
    assert _metric(server, 'adsfm_rank_requests_total{status="200"}') >= served  # the same process, not a new one
    with pytest.raises(ValueError, match=r"\['max_candidates'\] cannot change at runtime; these can: .*batch_wait_ms"):
        app.start(cfg, REGISTRY["uri"], name="serve-test", knobs={"max_candidates": 5})
    assert HTTP.post(f"{server}/v1/rank", json=body, timeout=30).status_code == 200


def test_concurrent_requests_are_batched_and_score_as_alone(server: str) -> None:
    """16 clients at once through the Python client: each gets the scores it gets alone, while the
    replica ran some of their candidates through one dense-graph run (@serve.batch)."""
    import threading

    from adsfm.serving.client import RankClient

    client = RankClient(server, token=TOKEN)
    users = [{"user_id": str(u), "history": [str(u + 1), str(u + 2)]} for u in range(1, 17)]
    items = [{"item_id": str(i)} for i in range(1, 51)]
    alone = [{c["item"]["item_id"]: c["score"] for c in client.rank(u, items).candidates} for u in users]

    def batches() -> tuple[float, float]:
        return _metric(server, "adsfm_batch_requests_count"), _metric(server, "adsfm_batch_requests_sum")

    before = batches()
    got: list[dict[str, float]] = [{} for _ in users]
    start = threading.Barrier(len(users))

    def call(k: int) -> None:
        start.wait()
        got[k] = {c["item"]["item_id"]: c["score"] for c in RankClient(server, token=TOKEN).rank(users[k], items).candidates}

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(users))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(len(users)):
        for item, score in alone[k].items():
            assert abs(got[k][item] - score) <= 1e-6, (k, item)
    after = batches()
    runs, requests_scored = after[0] - before[0], after[1] - before[1]
    assert requests_scored == len(users) and runs < len(users), f"{requests_scored} requests in {runs} dense-graph runs"


def test_limits_hold_over_http(server: str) -> None:
    """401 without the token or with a wrong one; 413 for a body over serve.max_request_bytes, declared
    (Content-Length) or chunked (no length: the bytes received are counted); the client names the field of
    a 422; the replica answers afterwards."""
    from adsfm.serving.client import RankClient, RankError

    body = {"candidates": [{"item_id": "1"}]}
    assert requests.post(f"{server}/v1/rank", json=body, timeout=30).status_code == 401
    wrong = requests.post(f"{server}/v1/rank", json=body, headers={"Authorization": f"Bearer {TOKEN}x"}, timeout=30)
    assert wrong.status_code == 401 and wrong.headers.get("www-authenticate") == "Bearer"
    r = HTTP.post(f"{server}/v1/rank", data=b"x" * 300_000, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "max_request_bytes" in r.text

    def chunks() -> Any:
        yield b'{"candidates": [{"item_id": "1"}], "user": {"history": ['
        for _ in range(30_000):
            yield b'"123456789",'
        yield b'"1"]}}'

    r = HTTP.post(f"{server}/v1/rank", data=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413, (r.status_code, r.text[:300])
    assert HTTP.get(f"{server}/healthz", timeout=30).status_code == 200
    with pytest.raises(RankError) as e:
        RankClient(server, token=TOKEN).rank({"user_id": "1"}, [{"item_id": "1", "colour": "red"}])
    assert e.value.status == 422 and "colour" in str(e.value.detail)


def test_fuzzed_requests_from_the_openapi_schema_never_get_a_5xx(server: str) -> None:
    """Hypothesis draws requests shaped by the app's own OpenAPI schema (its fields, the known feature names)
    with arbitrary JSON values, plus arbitrary JSON documents: every answer is 200 or a 4xx; bodies of the
    right JSON types (unknown values, nulls, empty lists, joined strings) all get 200; the replica still
    answers afterwards."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    spec = HTTP.get(f"{server}/openapi.json", timeout=10).json()
    schema = spec["components"]["schemas"]["RankRequest"]
    assert set(schema["required"]) == {"candidates"}
    user_names = ["user_id", "gender", "occupation", "age", "zip_prefix", "history", "liked_history"]
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
                       st.text(max_size=20), st.sampled_from(["1", "50", "M", "", "nan", "inf", "-1", "1e309"]))
    value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                         max_leaves=8)
    candidate = st.fixed_dictionaries({"item_id": scalar}, optional={"genres": value, "release_year": value})
    shaped = st.fixed_dictionaries({"user": st.dictionaries(st.sampled_from(user_names), value, max_size=5),
                                    "candidates": st.lists(candidate, min_size=1, max_size=5)})
    # Conforming bodies too (any value of the right JSON type, known or not): they must all score.
    one = st.none() | st.integers(0, 99) | st.text(max_size=6)
    many = st.none() | st.lists(st.none() | st.text(max_size=6) | st.integers(0, 99), max_size=4) | st.text(max_size=8)
    number = st.none() | st.integers(0, 99) | st.floats(0, 100)
    kinds = {"age": number, "history": many, "liked_history": many}
    user = st.fixed_dictionaries({}, optional={n: kinds.get(n, one) for n in user_names})
    conforming = st.fixed_dictionaries({"user": user, "candidates": st.lists(st.fixed_dictionaries(
        {"item_id": st.integers(0, 2000) | st.text(max_size=6)}, optional={"genres": many, "release_year": number}),
        min_size=1, max_size=5)})
    features = st.dictionaries(st.sampled_from([*user_names, "item_id"]) | st.text(max_size=8), value, max_size=6)
    wild = st.fixed_dictionaries({"user": features, "candidates": st.lists(features, max_size=5)})
    anything = st.dictionaries(st.text(max_size=10), value, max_size=4) | value
    seen: dict[int, int] = {}

    @settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.one_of(shaped, shaped, wild, anything), conforming)
    def post(body: Any, good: Any) -> None:
        r = HTTP.post(f"{server}/v1/rank", json=body, timeout=30)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (body, r.status_code, r.text[:300])
        r = HTTP.post(f"{server}/v1/rank", json=good, timeout=30)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code == 200, (good, r.status_code, r.text[:300])

    post()
    print(f"fuzzed /v1/rank: status counts {dict(sorted(seen.items()))}")
    assert seen.get(200, 0) > 0 and seen.get(422, 0) > 0  # both kinds were drawn
    assert HTTP.get(f"{server}/healthz", timeout=10).status_code == 200


def _listening() -> list[tuple[str, int, str]]:
    """Every listening TCP socket on this machine: (address, port, the owning process's command line)."""
    import os
    import re
    import socket
    import struct
    from pathlib import Path

    inodes: dict[str, tuple[str, int]] = {}
    for proto, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            addr, port = fields[1].split(":")
            raw = bytes.fromhex(addr)
            packed = struct.pack("<I", int(addr, 16)) if family == socket.AF_INET else \
                b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
            inodes[fields[9]] = (socket.inet_ntop(family, packed), int(port, 16))
    out = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        for link in links:
            m = re.fullmatch(r"socket:\[(\d+)\]", link)
            if m and m.group(1) in inodes:
                out.append((*inodes[m.group(1)], cmd))
    return out


def test_every_socket_serving_opens_is_on_loopback(server: str) -> None:
    """HAProxy's front ends (the API, stats, prometheus), the proxy and the replica's ports (its HTTP
    server, its inter-deployment gRPC server) listen on 127.0.0.1 only."""
    serving = ("haproxy", "ray::ServeReplica", "ray::ProxyActor", "ray::HAProxyManager", "ray::ServeController")
    mine = [s for s in _listening() if any(k in s[2] for k in serving)]
    replica = [s for s in mine if "ray::ServeReplica:serve-test" in s[2]]
    assert len(replica) >= 3 and any("haproxy" in s[2] for s in mine), mine  # the sockets were found at all
    loopback = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
    wide = [s for s in mine if s[0] not in loopback]
    print(f"serving listens on {sorted({(a, p) for a, p, _ in mine})}")
    assert not wide, f"listening beyond loopback: {wide}"
