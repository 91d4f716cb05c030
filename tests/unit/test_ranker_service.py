"""The Ray-free serving core: the request schema derived from the bundle, validation that names the field,
scores that do not depend on batching or on the cache."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from adsfm.contract.features import FeatureError
from adsfm.contract.request import RankRequest
from adsfm.serving.engine import DenseGraphEngine
from adsfm.serving.service import RankService, RequestInvalid


@pytest.fixture(scope="module")
def service(messy_bundle: dict[str, Any]) -> RankService:
    return RankService(DenseGraphEngine(messy_bundle["bundle"]), "m", "1", max_candidates=50, max_values=8)


USER = {"user": "u7", "country": "fr", "age": 49, "recent_ads": ["3", "5", "8"]}


def test_ranking_is_sorted_and_independent_of_batching(service: RankService) -> None:
    items = [{"ad": str(i)} for i in range(0, 40)]
    resp = service.rank(RankRequest(user=USER, candidates=items))
    scores = [c["score"] for c in resp.candidates]
    assert scores == sorted(scores, reverse=True)
    assert [c["rank"] for c in resp.candidates] == list(range(1, 41))
    alone = {it["ad"]: service.engine.score(USER, [it])[0] for it in items}
    for c in resp.candidates:
        assert abs(c["score"] - alone[c["item"]["ad"]]) <= 1e-6


def test_a_list_or_a_joined_string_and_a_number_or_its_string_are_the_same(service: RankService) -> None:
    a = service.engine.score(USER, [{"ad": "5"}])
    b = service.engine.score({**USER, "recent_ads": "3|5|8"}, [{"ad": 5}])
    np.testing.assert_allclose(a, b, atol=0)
    c = service.engine.score({"user": "u7", "country": "fr", "age": "49", "recent_ads": [3, 5, 8.0]}, [{"ad": 5.0}])
    np.testing.assert_allclose(a, c, atol=0)


def test_every_feature_may_be_left_out(service: RankService) -> None:
    """A request with the item id alone scores: missing user and item features take their missing rows and
    the training means; a null is the same as leaving the field out."""
    bare = service.rank(service.parse(b'{"candidates": [{"ad": 3}, {"ad": "no-such-ad"}]}'))
    nulls = service.rank(service.parse(json.dumps({"user": {k: None for k in USER}, "candidates": [{"ad": 3}, {"ad": "no-such-ad"}]}).encode()))
    assert [c["score"] for c in bare.candidates] == [c["score"] for c in nulls.candidates]
    assert all(np.isfinite(c["score"]) for c in bare.candidates)


@pytest.mark.parametrize(
    "body,loc",
    [
        ({"user": {"usr": "1"}, "candidates": [{"ad": "1"}]}, ["user", "usr"]),  # an unknown feature
        ({"user": {}, "candidates": [{"ad": "1", "colour": "red"}]}, ["candidates", 0, "colour"]),
        ({"user": {}, "candidates": [{"tags": "a"}]}, ["candidates", 0, "ad"]),  # the item id is required
        ({"user": {}, "candidates": [{"ad": str(i)} for i in range(51)]}, ["candidates"]),  # serve.max_candidates
        ({"user": {"age": "old"}, "candidates": [{"ad": "1"}]}, ["user", "age"]),
        ({"user": {"country": ["fr", "de"]}, "candidates": [{"ad": "1"}]}, ["user", "country"]),
        ({"user": {"recent_ads": [str(i) for i in range(9)]}, "candidates": [{"ad": "1"}]}, ["user", "recent_ads"]),  # max_values
        ({"user": {"recent_ads": "|".join(map(str, range(9)))}, "candidates": [{"ad": "1"}]}, ["user", "recent_ads"]),
        ({"candidates": []}, ["candidates"]),
    ],
)
def test_bad_bodies_are_refused_naming_the_field(service: RankService, body: dict, loc: list) -> None:
    with pytest.raises(RequestInvalid) as e:
        service.parse(json.dumps(body).encode())
    assert e.value.errors[0]["loc"][: len(loc)] == loc, e.value.errors
    assert {"loc", "msg", "type"} <= set(e.value.errors[0])


def test_a_request_built_in_python_gets_the_same_checks(service: RankService) -> None:
    for user, candidates, field in [
        ({"usr": "1"}, [{"ad": "1"}], "user.usr"),
        ({}, [{"ad": "1", "colour": "red"}], "candidates[0].colour"),
        ({}, [{"tags": "a"}], "candidates[0].ad"),
        ({"age": "old"}, [{"ad": "1"}], "user.age"),
    ]:
        with pytest.raises(FeatureError) as e:
            service.rank(RankRequest(user=user, candidates=candidates))
        assert e.value.field == field


def test_scores_do_not_depend_on_batching_or_caching(messy_bundle: dict[str, Any]) -> None:
    """The same request alone, batched with others, from a cold and from a warm user cache."""
    engine = DenseGraphEngine(messy_bundle["bundle"], user_cache_size=4)
    svc = RankService(engine, "m", "1", max_candidates=200)
    req = RankRequest(user=USER, candidates=[{"ad": str(i)} for i in range(0, 60)])
    cold = svc.prepare(req)
    assert engine.user_cache_info().misses == 1 and engine.user_cache_info().hits == 0
    alone = engine.run_many([cold.inputs])[0]
    warm = svc.prepare(req)
    assert engine.user_cache_info().hits == 1
    for w, c in zip(warm.inputs, cold.inputs, strict=True):  # (dense, embeddings)
        np.testing.assert_array_equal(w, c)
    others = [svc.prepare(RankRequest(user={"user": str(u), "recent_ads": [str(u + 1)]},
                                      candidates=[{"ad": str(i % 60)} for i in range(u, u + 7 * u)])) for u in (1, 2, 3)]
    batched = engine.run_many([o.inputs for o in others[:2]] + [warm.inputs] + [others[2].inputs])
    assert [len(b) for b in batched] == [7, 14, 60, 21]
    np.testing.assert_allclose(batched[2], alone, rtol=0, atol=1e-6)
    # The precomputed item rows (a candidate naming only its id) equal the per-candidate path that a
    # candidate sending its own item fields takes.
    item, stored = next((k, v) for k, v in engine.item_store.items() if v.get("bid") is not None)
    via_store = engine.score(USER, [{"ad": item}])
    via_fields = engine.score(USER, [{"ad": item, **stored}])
    np.testing.assert_allclose(via_store, via_fields, rtol=0, atol=1e-7)
    assert engine.score(USER, [{"ad": item, "bid": 1000.0}])[0] != via_store[0]  # a sent value overrides the store


def test_the_user_cache_is_bounded_and_keyed_by_a_hash() -> None:
    from adsfm.serving.cache import LRU

    cache: LRU[np.ndarray] = LRU(max_entries=3, max_bytes=3 * (800 + 16))
    for k in range(5):
        cache.get_or_compute(bytes([k]) * 16, lambda: np.zeros(100))  # 800 bytes each
    info = cache.info()
    assert (info.currsize, info.misses, info.hits) == (3, 5, 0)
    cache.get_or_compute(bytes([4]) * 16, lambda: np.ones(100))
    assert cache.info().hits == 1
    small: LRU[np.ndarray] = LRU(max_entries=100, max_bytes=2000)
    for k in range(5):
        small.get_or_compute(bytes([k]) * 16, lambda: np.zeros(100))
    assert small.info().currsize == 2 and small.info().bytes <= 2000  # bounded in bytes, whatever the entries


def test_limits_and_auth_are_refused_at_the_door() -> None:
    """The middleware over a stub app: the token (constant-time; /metrics and /docs when protected), a
    Content-Length over the limit, and a chunked body (no length) cut off once the bytes received pass it."""
    import asyncio

    from adsfm.contract.config import ServeConfig
    from adsfm.serving import limits

    async def app(scope: dict, receive: Any, send: Any) -> None:  # reads the whole body, answers 200
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def call(cfg: ServeConfig, path: str, headers: dict[str, str], chunks: list[bytes]) -> int:
        limits.SETTINGS["limits"] = limits.Limits.of(cfg)
        scope = {"type": "http", "method": "POST", "path": path, "query_string": b"",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
        messages = [{"type": "http.request", "body": c, "more_body": k < len(chunks) - 1} for k, c in enumerate(chunks)]
        sent: list[dict] = []

        async def receive() -> dict:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(m: dict) -> None:
            sent.append(m)

        asyncio.run(limits.LimitsMiddleware(app)(scope, receive, send))
        return next(m["status"] for m in sent if m["type"] == "http.response.start")

    try:
        cfg = ServeConfig(auth_token="s3cret", max_request_bytes=1000)
        ok = {"authorization": "Bearer s3cret"}
        assert call(cfg, "/v1/rank", {}, [b"{}"]) == 401
        assert call(cfg, "/v1/rank", {"authorization": "Bearer nope"}, [b"{}"]) == 401
        assert call(cfg, "/v1/rank", ok, [b"{}"]) == 200
        assert call(cfg, "/v1/rank", {**ok, "content-length": "5000"}, [b"x" * 5000]) == 413
        assert call(cfg, "/v1/rank", ok, [b"x" * 400] * 2) == 200  # 800 bytes in chunks: within the limit
        assert call(cfg, "/v1/rank", ok, [b"x" * 400] * 3) == 413  # chunked, no length: cut off at 1,200
        assert call(cfg, "/healthz", {}, [b""]) == 200  # probes need no token
        assert call(cfg, "/metrics", {}, [b""]) == 200 and call(cfg, "/docs", {}, [b""]) == 200
        guarded = ServeConfig(auth_token="s3cret", protect_metrics=True, protect_docs=True)
        assert call(guarded, "/metrics", {}, [b""]) == 401 and call(guarded, "/openapi.json", {}, [b""]) == 401
        assert call(guarded, "/metrics", ok, [b""]) == 200
    finally:
        limits.SETTINGS.clear()


def test_kept_item_embeddings_follow_deltas(messy_bundle: dict[str, Any]) -> None:
    """The item store kept pooled (item_cache_bytes) scores as the per-request gather does, before a delta,
    after one that rewrites rows of the item tables (a multi-valued one included), and after a reset; the
    delta does move the scores, and only those of the items holding a rewritten row."""
    kept, gathered = DenseGraphEngine(messy_bundle["bundle"]), DenseGraphEngine(messy_bundle["bundle"], item_cache_bytes=0)
    assert kept._item_emb is not None and gathered._item_emb is None
    items = [{"ad": i} for i in kept.item_store]

    def both() -> np.ndarray:
        a, b = kept.score(USER, items), gathered.score(USER, items)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        return a

    before = both()
    rng = np.random.default_rng(0)
    first = kept.item_store[next(iter(kept.item_store))]  # its ad and tag rows are rewritten
    tables = {}
    for table, raw in (("ad", first["ad"]), ("tags", first["tags"])):
        f = next(f for f in kept.manifest.sparse if f.table_name == table and f.side == "item")
        rows = np.unique(kept.rows_of(f, raw, "test")).astype(np.int64)
        dim = kept.manifest.tables[table].dim
        tables[table] = {"rows": rows, "weight": rng.normal(size=(len(rows), dim)).astype(np.float32)}
    for engine in (kept, gathered):
        engine.apply_delta(1, 0.0, {k: {n: a.copy() for n, a in v.items()} for k, v in tables.items()})
    after = both()
    moved = np.abs(after - before) > 1e-7
    assert moved[0], "the item whose rows the delta rewrote scores the same"
    tag_rows = set(tables["tags"]["rows"].tolist())
    f_tags = next(f for f in kept.manifest.sparse if f.table_name == "tags")
    for k, (key, stored) in enumerate(kept.item_store.items()):
        touches = str(stored["ad"]) == str(first["ad"]) or bool(tag_rows & set(kept.rows_of(f_tags, stored["tags"], "t").tolist()))
        assert moved[k] == touches, f"item {key}: moved={moved[k]}, holds a rewritten row={touches}"
    for engine in (kept, gathered):
        engine.reset_deltas()
    np.testing.assert_allclose(both(), before, rtol=0, atol=1e-7)


def test_the_response_encoder_writes_what_pydantic_writes(service: RankService) -> None:
    from adsfm.contract.request import RankResponse

    resp = service.rank(RankRequest(user=USER, candidates=[{"ad": str(i)} for i in range(10)]))
    late = resp.model_copy(update={"fallback": "deadline", "latency_ms": 12.5})
    multi = RankResponse.model_construct(model_name="m", model_version="2", latency_ms=1.0, fallback=None, rank_by="p_click + p_buy",
                                         candidates=[{"item": {"ad": 1, "tags": ["a", "é"]}, "score": 0.25, "rank": 1,
                                                      "scores": {"click": 0.125, "buy": float("nan")}}])
    odd = service.rank(RankRequest(user=USER, candidates=[{"ad": -(2 ** 70)}, {"ad": "5"}]))
    for r in (resp, late, multi, odd):
        assert json.loads(RankService.encode(r)) == json.loads(r.model_dump_json())


def test_the_cache_key_ignores_key_order_and_takes_any_json_value() -> None:
    from adsfm.serving.engine import cache_key

    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    keys = {cache_key(v) for v in ({"a": 1}, {"a": 1.0}, {"a": "1"}, {"a": [1]}, {"a": None}, {"a": 2 ** 70}, {"a": "\ud800"}, {})}
    assert len(keys) == 8 and all(len(k) == 16 for k in keys)
