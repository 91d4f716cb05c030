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
