"""The Ray-free serving core: validation names the field; scores do not depend on batching."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from serving.ranker import FeatureError, Ranker
from serving.schemas import RankRequest
from serving.service import RankService


@pytest.fixture(scope="module")
def service(trained: dict[str, Any]) -> RankService:
    return RankService(Ranker(trained["bundle"]), "m", "1", max_candidates=50)


USER = {"user_id": "196", "gender": "M", "occupation": "writer", "age": 49, "history": ["242", "302", "377"]}


def test_ranking_is_sorted_and_independent_of_batching(service: RankService) -> None:
    items = [{"item_id": str(i)} for i in range(1, 41)]
    resp = service.rank(RankRequest(user=USER, candidates=items))
    scores = [c.score for c in resp.candidates]
    assert scores == sorted(scores, reverse=True)
    assert [c.rank for c in resp.candidates] == list(range(1, 41))
    alone = {it["item_id"]: service.ranker.score(USER, [it])[0] for it in items}
    for c in resp.candidates:
        assert abs(c.score - alone[c.item["item_id"]]) <= 1e-6


def test_history_as_list_or_joined_string_is_the_same(service: RankService) -> None:
    a = service.ranker.score(USER, [{"item_id": "50"}])
    b = service.ranker.score({**USER, "history": "242|302|377"}, [{"item_id": "50"}])
    np.testing.assert_allclose(a, b, atol=0)


@pytest.mark.parametrize(
    "user,candidates,field",
    [
        ({"user_idd": "1"}, [{"item_id": "1"}], "user.user_idd"),
        ({"user_id": "1"}, [{"item_id": "1", "colour": "red"}], "candidates[0].colour"),
        ({"user_id": "1"}, [{"genres": "Drama"}], "candidates[0].item_id"),
        ({"user_id": "1"}, [{"item_id": str(i)} for i in range(51)], "candidates"),
        ({"user_id": "1", "age": "old"}, [{"item_id": "1"}], "user.age"),
        ({"user_id": ["1", "2"]}, [{"item_id": "1"}], "user.user_id"),
    ],
)
def test_bad_requests_name_the_field(service: RankService, user: dict, candidates: list, field: str) -> None:
    with pytest.raises(FeatureError) as e:
        service.rank(RankRequest(user=user, candidates=candidates))
    assert e.value.field == field


def test_scores_do_not_depend_on_batching_or_caching(trained: dict[str, Any]) -> None:
    """The same request alone, batched with others, from a cold and from a warm user cache."""
    ranker = Ranker(trained["bundle"], user_cache_size=4)
    svc = RankService(ranker, "m", "1", max_candidates=200)
    req = RankRequest(user=USER, candidates=[{"item_id": str(i)} for i in range(1, 101)])
    cold = svc.prepare(req)
    assert ranker.user_cache_info().misses == 1 and ranker.user_cache_info().hits == 0
    alone = ranker.run_many([cold.inputs])[0]
    warm = svc.prepare(req)
    assert ranker.user_cache_info().hits == 1
    for w, c in zip(warm.inputs, cold.inputs, strict=True):  # (dense, embeddings)
        np.testing.assert_array_equal(w, c)
    others = [svc.prepare(RankRequest(user={"user_id": str(u), "history": [str(u + 1)]},
                                      candidates=[{"item_id": str(i)} for i in range(u, u + 7 * u)])) for u in (1, 2, 3)]
    batched = ranker.run_many([o.inputs for o in others[:2]] + [warm.inputs] + [others[2].inputs])
    assert [len(b) for b in batched] == [7, 14, 100, 21]
    np.testing.assert_allclose(batched[2], alone, rtol=0, atol=1e-6)
    # The precomputed item rows (a candidate naming only its id) equal the per-candidate path that a
    # candidate sending its own item fields takes.
    stored = ranker.item_store["50"]
    via_store = ranker.score(USER, [{"item_id": "50"}])
    via_fields = ranker.score(USER, [{"item_id": "50", **stored}])
    np.testing.assert_allclose(via_store, via_fields, rtol=0, atol=1e-7)
    assert ranker.score(USER, [{"item_id": "50", "release_year": 1950}])[0] != via_store[0]  # overrides are honoured


def test_limits_and_auth_are_refused_with_4xx() -> None:
    from starlette.requests import Request

    from serving.config import ServeConfig
    from serving.limits import refusal as _refusal

    def request(path: str, headers: dict[str, str]) -> Request:
        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        return Request({"type": "http", "method": "POST", "path": path, "headers": raw, "query_string": b""})

    cfg = ServeConfig(auth_token="s3cret", max_request_bytes=1000)
    assert _refusal(request("/v1/rank", {}), cfg).status_code == 401  # type: ignore[union-attr]
    assert _refusal(request("/v1/rank", {"authorization": "Bearer nope"}), cfg).status_code == 401  # type: ignore[union-attr]
    ok = {"authorization": "Bearer s3cret"}
    assert _refusal(request("/v1/rank", ok), cfg) is None
    assert _refusal(request("/v1/rank", {**ok, "content-length": "5000"}), cfg).status_code == 413  # type: ignore[union-attr]
    assert _refusal(request("/healthz", {}), cfg) is None  # probes need no token
