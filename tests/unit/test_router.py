"""Champion/challenger routing (Ray-free): sticky split, fallbacks on error and deadline, shadow scoring,
and the shift's rollback verdict."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adsfm.contract.registry import Split
from adsfm.contract.request import RankRequest
from adsfm.serving import metrics
from adsfm.serving.engine import DenseGraphEngine, FeatureError
from adsfm.serving.monitor import VersionStats, summarize
from adsfm.serving.router import Router, ShadowLog, bucket, top_k_disagreement
from adsfm.serving.service import RankService, Scored, score_one
from adsfm.serving.shift import Limits, judge

USER = {"user": "u7", "country": "fr", "age": 49, "recent_ads": ["3", "5", "8"]}
ITEMS = [{"ad": str(i)} for i in range(0, 30)]


@pytest.fixture(scope="module")
def services(messy_bundle: dict[str, Any]) -> dict[str, RankService]:
    return {v: RankService(DenseGraphEngine(messy_bundle["bundle"]), "m", v, max_candidates=100) for v in ("1", "2", "light")}


async def engine(svc: RankService, req: Any, arrived: float) -> Scored:
    return score_one(svc, req, arrived)


def counter(c: Any, label: str) -> float:
    return c.labels(label)._value.get()


def test_sticky_split_keeps_users_on_their_side_as_the_share_grows() -> None:
    users = [str(u) for u in range(20_000)]
    at = {pct: {u for u in users if bucket(u) < pct} for pct in (5, 25, 50)}
    for pct, chosen in at.items():
        assert abs(len(chosen) / len(users) - pct / 100) < 0.015, (pct, len(chosen))
    assert at[5] <= at[25] <= at[50]  # nobody moved to the challenger at 5 % goes back at 25 %


def test_router_follows_the_split_and_is_sticky_per_user(services: dict[str, RankService]) -> None:
    r = Router(services["1"], engine, sticky_field="user")
    r.challenger, r.split = services["2"], Split(challenger_pct=50)
    answered = {}
    for u in range(200):
        req = RankRequest(user={**USER, "user": str(u)}, candidates=ITEMS[:3])
        versions = {asyncio.run(r.rank(req)).model_version for _ in range(3)}
        assert len(versions) == 1  # the same user, the same side
        answered[u] = versions.pop()
        assert answered[u] == ("2" if bucket(str(u)) < 50 else "1")
    assert 60 < list(answered.values()).count("2") < 140


def test_a_failing_challenger_is_answered_by_the_champion(services: dict[str, RankService]) -> None:
    async def broken(svc: RankService, req: Any, arrived: float) -> Scored:
        if svc.model_version == "2":
            raise RuntimeError("challenger engine down")
        return await engine(svc, req, arrived)

    seen: list[tuple[str, bool]] = []
    r = Router(services["1"], broken, report=lambda v, ok, ms: seen.append((v, ok)), sticky_field="user")
    r.challenger, r.split = services["2"], Split(challenger_pct=100)
    before = counter(metrics.FALLBACKS, "challenger_error")
    res = asyncio.run(r.rank(RankRequest(user=USER, candidates=ITEMS)))
    assert (res.model_version, res.fallback) == ("1", "challenger_error")
    alone = services["1"].rank(RankRequest(user=USER, candidates=ITEMS))
    assert [c["score"] for c in res.candidates] == [c["score"] for c in alone.candidates]
    assert counter(metrics.FALLBACKS, "challenger_error") == before + 1
    assert ("2", False) in seen  # the shift sees the challenger's failure though the client did not
    with pytest.raises(FeatureError):  # a request the champion refuses too is the client's (422)
        asyncio.run(r.rank(RankRequest(user={"usr": "1"}, candidates=ITEMS)))


def test_a_late_model_is_replaced_by_the_fallback_by_the_deadline(services: dict[str, RankService]) -> None:
    async def slow_main(svc: RankService, req: Any, arrived: float) -> Scored:
        if svc.model_version != "light":
            await asyncio.sleep(0.5)
        return await engine(svc, req, arrived)

    r = Router(services["1"], slow_main, spillover=services["light"], deadline_ms=300)
    r.challenger, r.split = services["2"], Split(challenger_pct=0)
    req = RankRequest(user=USER, candidates=ITEMS)
    res = asyncio.run(r.rank(req))
    assert (res.model_version, res.fallback) == ("light", "deadline")
    assert res.latency_ms < 450
    res = asyncio.run(r.rank(req.model_copy(update={"deadline_ms": 2000.0})))  # the request's own deadline wins
    assert (res.model_version, res.fallback) == ("1", None)

    r.split = Split(challenger_pct=100)  # a late challenger: the champion answers
    r.spillover = None

    async def slow_challenger(svc: RankService, req: Any, arrived: float) -> Scored:
        if svc.model_version == "2":
            await asyncio.sleep(0.5)
        return await engine(svc, req, arrived)

    r.score = slow_challenger
    res = asyncio.run(r.rank(req))
    assert (res.model_version, res.fallback) == ("1", "challenger_deadline")


def test_shadow_challenger_scores_but_never_answers(services: dict[str, RankService], tmp_path: Path) -> None:
    scored: list[str] = []

    async def tracking(svc: RankService, req: Any, arrived: float) -> Scored:
        scored.append(svc.model_version)
        return await engine(svc, req, arrived)

    r = Router(services["1"], tracking, shadow=ShadowLog(str(tmp_path / "shadow.jsonl")), sticky_field="user")
    r.challenger, r.split = services["2"], Split(challenger_pct=100, shadow=True)
    agreed = counter(metrics.SHADOW, "agreed")

    async def go() -> list[str]:
        out = [(await r.rank(RankRequest(user={**USER, "user": str(u)}, candidates=ITEMS))).model_version for u in range(5)]
        await asyncio.gather(*r._shadow_tasks)
        return out

    assert asyncio.run(go()) == ["1"] * 5
    assert scored.count("2") == 5
    assert counter(metrics.SHADOW, "agreed") == agreed + 5  # the same weights: the same top 10
    deadline = time.time() + 10  # the log is written by a background thread
    while len((tmp_path / "shadow.jsonl").read_text().splitlines()) < 5 and time.time() < deadline:
        time.sleep(0.01)
    logged = [json.loads(line) for line in (tmp_path / "shadow.jsonl").read_text().splitlines()]
    assert [(x["version"], x["user"], x["disagreement"]) for x in logged] == [("2", str(u), 0.0) for u in range(5)]
    alone = services["2"].rank(RankRequest(user={**USER, "user": "0"}, candidates=ITEMS))
    assert logged[0]["top"] == [c["item"]["ad"] for c in alone.candidates[:10]]  # the answer it would have given


def test_a_flood_on_a_shadowed_replica_keeps_the_champions_latency(services: dict[str, RankService]) -> None:
    """A replica's threads: the champion's work in one (2 ms a request), shadow copies in another (20 ms
    each), at most 4 copies at once. Flooded with 8 clients, the champion's p99 stays near its p99 without
    a shadow; the same flood with the copies in the champion's queue (the behaviour before) is several
    times slower, so the test sees the difference it guards."""
    main_pool, shadow_pool = ThreadPoolExecutor(1), ThreadPoolExecutor(1)

    def busy(svc: RankService, req: Any, arrived: float) -> Scored:
        time.sleep(0.020 if svc.model_version == "2" else 0.002)
        return score_one(svc, req, arrived)

    async def score(svc: RankService, req: Any, arrived: float) -> Scored:
        return await asyncio.get_running_loop().run_in_executor(main_pool, busy, svc, req, arrived)

    async def shadow_score(svc: RankService, req: Any, arrived: float) -> Scored:
        return await asyncio.get_running_loop().run_in_executor(shadow_pool, busy, svc, req, arrived)

    def flood(shadow: bool, isolated: bool = True) -> tuple[float, int]:
        r = Router(services["1"], score, shadow_score=shadow_score if isolated else None, sticky_field="user",
                   shadow=ShadowLog(rate=1.0, max_in_flight=4))
        if shadow:
            r.challenger, r.split = services["2"], Split(shadow=True)
        most = 0

        async def go() -> list[float]:
            nonlocal most
            gate = asyncio.Semaphore(8)

            async def one(u: int) -> float:
                nonlocal most
                async with gate:
                    res = await r.rank(RankRequest(user={**USER, "user": str(u)}, candidates=ITEMS[:10]))
                    most = max(most, len(r._shadow_tasks))
                    assert res.model_version == "1"
                    return res.latency_ms
            out = await asyncio.gather(*(one(u) for u in range(120)))
            await asyncio.gather(*r._shadow_tasks)
            return list(out)

        return float(np.percentile(asyncio.run(go()), 99)), most

    plain, _ = flood(shadow=False)
    skipped = counter(metrics.SHADOW, "skipped")
    shadowed, most = flood(shadow=True)
    assert most <= 4 and counter(metrics.SHADOW, "skipped") > skipped  # bounded: copies beyond 4 were shed
    queued, _ = flood(shadow=True, isolated=False)
    print(f"champion p99 ms under a flood: no shadow {plain:.1f}, shadowed {shadowed:.1f}, copies in its queue {queued:.1f}")
    assert shadowed <= 1.5 * plain + 10
    assert queued > 2 * shadowed


def test_disagreement_and_split_validation() -> None:
    a = np.arange(20, dtype=np.float32)
    assert top_k_disagreement(a, a) == 0.0
    assert top_k_disagreement(a, -a) == 1.0
    assert top_k_disagreement(a[:4], a[:4] * 2) == 0.0  # fewer candidates than k
    with pytest.raises(ValueError, match="challenger_pct"):
        Split(challenger_pct=120)
    assert Split.from_tag(Split(25, shadow=True).to_tag()) == Split(25, shadow=True)


def test_shift_verdict_rolls_back_on_errors_or_latency() -> None:
    lim = Limits(max_error_rate=0.01, max_p99_ms=50, min_requests=20)
    assert judge(None, lim) is None
    assert judge(VersionStats(1000, 5, 20.0), lim) is None
    assert "error rate" in (judge(VersionStats(1000, 11, 20.0), lim) or "")
    assert "error rate" in (judge(VersionStats(3, 1, 1.0), lim) or "")  # a failing model fails early
    assert judge(VersionStats(10, 0, 80.0), lim) is None  # too few to trust a p99
    assert "p99" in (judge(VersionStats(40, 0, 80.0), lim) or "")


def test_traffic_summary_per_version() -> None:
    rows = [(10.0, "1", True, 5.0), (11.0, "2", False, 7.0), (12.0, "2", True, 9.0), (5.0, "2", False, 1.0)]
    s = summarize(rows, since=10.0)
    assert s["1"] == VersionStats(1, 0, 5.0)
    assert s["2"].requests == 2 and s["2"].errors == 1 and s["2"].error_rate == 0.5
    assert s["2"].p99_ms == pytest.approx(np.percentile([7.0, 9.0], 99))


def test_the_shadow_log_rotates_and_the_rate_samples(services: dict[str, RankService], tmp_path: Path) -> None:
    """Lines go to files of at most max_bytes, `backups` of them kept; shadow_rate=0 shadows nothing."""
    log = ShadowLog(str(tmp_path / "shadow.jsonl"), max_bytes=2_000, backups=2)
    for k in range(200):
        log.write({"k": k, "pad": "x" * 50})
    deadline = time.time() + 10
    while not (tmp_path / "shadow.jsonl.2").exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["shadow.jsonl", "shadow.jsonl.1", "shadow.jsonl.2"]
    assert all((tmp_path / f).stat().st_size <= 2_000 for f in files)

    r = Router(services["1"], engine, shadow=ShadowLog(rate=0.0), sticky_field="user")
    r.challenger, r.split = services["2"], Split(shadow=True)
    skipped = counter(metrics.SHADOW, "skipped")
    for u in range(5):
        asyncio.run(r.rank(RankRequest(user={**USER, "user": str(u)}, candidates=ITEMS[:3])))
    assert counter(metrics.SHADOW, "skipped") == skipped + 5
    with pytest.raises(ValueError, match="shadow_rate"):
        ShadowLog(rate=1.5)


def test_a_challengers_answers_are_compared_with_the_champions_off_the_request_path(services: dict[str, RankService]) -> None:
    """At compare_rate 1, each request the challenger answers is scored by the champion too, in the
    background; the reported score shift is the mean |challenger - champion| of the same candidates
    (here the challenger's are the champion's halved plus 0.1: order kept, no top-10 disagreement)."""
    async def shifted(svc: RankService, req: Any, arrived: float) -> Scored:
        p, scores = await engine(svc, req, arrived)
        return p, scores * 0.5 + 0.1 if svc.model_version == "2" else scores

    seen: list[tuple[str, float, float]] = []
    r = Router(services["1"], shifted, sticky_field="user", compare_rate=1.0,
               report_quality=lambda v, shift, d: seen.append((v, shift, d)))
    r.challenger, r.split = services["2"], Split(challenger_pct=100)
    req = RankRequest(user=USER, candidates=ITEMS)

    async def rank_and_drain() -> Any:
        res = await r.rank(req)
        await asyncio.gather(*list(r._shadow_tasks))
        return res

    res = asyncio.run(rank_and_drain())
    champion = np.array([c["score"] for c in services["1"].rank(req).candidates])
    assert res.model_version == "2" and len(seen) == 1
    version, shift, disagreement = seen[0]
    assert version == "2" and disagreement == 0.0
    assert shift == pytest.approx(float(np.mean(np.abs(champion * 0.5 + 0.1 - champion))), rel=1e-6)
    r.compare_rate = 0.0
    asyncio.run(rank_and_drain())
    assert len(seen) == 1  # nothing sampled, nothing compared
    with pytest.raises(ValueError, match="compare_rate"):
        Router(services["1"], shifted, compare_rate=1.5)


def test_the_shift_judges_score_shift_and_disagreement_once_enough_are_compared() -> None:
    lim = Limits(max_error_rate=0.01, max_p99_ms=50, min_requests=20, max_score_shift=0.05, max_disagreement=0.3, min_compared=5)
    assert judge(VersionStats(100, 0, 5.0, 4, 0.5, 0.9), lim) is None  # too few compared to judge
    assert "score shift" in (judge(VersionStats(100, 0, 5.0, 10, 0.06, 0.0), lim) or "")
    assert "disagreement" in (judge(VersionStats(100, 0, 5.0, 10, 0.01, 0.4), lim) or "")
    assert judge(VersionStats(100, 0, 5.0, 10, 0.01, 0.2), lim) is None
    assert judge(VersionStats(100, 0, 5.0, 10, 0.5, 0.9), Limits(0.01, 50, 20)) is None  # not asked for
    s = summarize([(10.0, "2", True, 5.0), (11.0, "2", True, 6.0)], 10.0, [(10.5, "2", 0.02, 0.1), (11.5, "2", 0.04, 0.3), (1.0, "2", 9.0, 1.0)])
    assert (s["2"].compared, s["2"].score_shift, s["2"].disagreement) == (2, pytest.approx(0.03), pytest.approx(0.2))
