"""Champion/challenger routing inside a replica, Ray-free so tests drive it directly.

Which version answers a request, what happens when it fails or is late, and what a shadow challenger
disagrees on. Both versions live in every replica (loaded beside each other, as for an alias move), so a
routed request costs no extra hop: on a 2-core host a separate router deployment would add a network hop and
take a CPU from the scorers. The split itself lives in the registry (adsfm.contract.registry: a tag
on the registered model), where adsfm-shift writes it and every replica reads it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import numpy as np

from adsfm.contract.features import FeatureError
from adsfm.contract.registry import Split
from adsfm.contract.request import RankRequest, RankResponse
from adsfm.serving import metrics
from adsfm.serving.service import RankService, Scored, score_one

logger = logging.getLogger("ray.serve")

Scorer = Callable[[RankService, Any, float], Awaitable[Scored]]
"""Prepares and scores a request that arrived at the given time (the app's: batched with concurrent
requests, validation, featurization, a user graph on a cache miss and the graphs in one scoring thread)."""
Answerer = Callable[[RankService, Any, float], Awaitable[RankResponse]]
"""Prepares, scores and answers at once, queued behind nothing (the app's: the fallback thread)."""


async def _score_here(service: RankService, req: Any, arrived: float) -> Scored:
    return score_one(service, req, arrived)


async def _answer_here(service: RankService, req: Any, arrived: float) -> RankResponse:
    return answer_now(service, req, arrived)


def answer_now(service: RankService, req: Any, arrived: float) -> RankResponse:
    """One request prepared, scored and answered by itself: a fallback must not wait behind the work that
    made the request late (ONNX Runtime sessions take concurrent runs)."""
    return service.respond(*score_one(service, req, arrived))


def bucket(key: str) -> float:
    """A stable position in [0, 100) for a user: the same user lands on the same side at every replica, on
    every restart and as the share grows (a user moved to the challenger at 5 % stays there at 25 %)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 10_000 / 100.0


def user_key(user: dict[str, Any], field: str) -> str:
    value = user.get(field)
    return str(value) if value is not None else json.dumps(user, sort_keys=True, default=str)


def top_k_disagreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Share of the champion's top k that the challenger does not put in its own top k (0: same set)."""
    k = min(k, len(a))
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return 1.0 - len(top_a & top_b) / k


class Router:
    """Answers a request with the champion or the challenger by the current Split; falls back to the champion
    when the challenger fails or misses the deadline, and to the spillover model (or the champion's late answer)
    when the champion itself misses it.

    Where the work runs is the caller's: `score` (validation, featurization, a user graph on a cache miss,
    the batched graphs), `answer` (a fallback's whole request) and `shadow_score` are awaitables; the app
    runs each in a thread of its own, so the event loop only routes and no shadow copy or fallback waits in
    the champion's queue. Deadlines count from the request's arrival at the replica."""

    def __init__(self, champion: RankService, score: Scorer = _score_here, *, answer: Answerer = _answer_here, shadow_score: Scorer | None = None, spillover: RankService | None = None,
                 sticky_field: str | None = "user_id", deadline_ms: float | None = None,
                 report: Callable[[str, bool, float], None] | None = None, seed: int | None = None,
                 shadow: ShadowLog | None = None, report_quality: Callable[[str, float, float], None] | None = None,
                 compare_rate: float = 0.1) -> None:
        self.champion = champion
        self.challenger: RankService | None = None
        self.challenger_error: str | None = None
        """The challenger alias's version when it could not be loaded (its share then falls back to the champion)."""
        self.split = Split()
        self.spillover = spillover
        self.score, self.answer = score, answer
        self.shadow_score = shadow_score or score
        """Shadow copies score here: in the app a thread of their own, never queued before the champion's work."""
        self.sticky_field = sticky_field
        self.deadline_ms = deadline_ms
        self.report = report or (lambda version, ok, ms: None)
        self.report_quality = report_quality
        """Where a challenger's answer compared with the champion's goes (version, score shift, disagreement);
        None: no comparison is made."""
        if not 0.0 <= compare_rate <= 1.0:
            raise ValueError(f"serve.compare_rate={compare_rate}: a share of requests, within 0..1")
        self.compare_rate = compare_rate
        self._rng = random.Random(seed)
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self.shadow = shadow or ShadowLog()

    def arm(self, req: RankRequest) -> str:
        pct = self.split.challenger_pct
        if self.split.shadow or pct <= 0.0:
            return "champion"
        if pct >= 100.0:
            return "challenger"
        pos = bucket(user_key(req.user, self.sticky_field)) if self.sticky_field else self._rng.random() * 100.0
        return "challenger" if pos < pct else "champion"

    async def rank(self, req: RankRequest, main: RankService | None = None, arrived: float | None = None) -> RankResponse:
        """`main`: the model chosen by the caller (spillover) instead of the split; `arrived`: when the
        request reached the replica (time.perf_counter), where its deadline starts."""
        t0 = time.perf_counter() if arrived is None else arrived
        champion, challenger = self.champion, self.challenger  # this request keeps these even if they move
        arm = "champion" if main is not None else self.arm(req)
        if main is None:
            main = champion
        metrics.ROUTED.labels(arm).inc()
        deadline = req.deadline_ms if req.deadline_ms is not None else self.deadline_ms
        due = None if deadline is None else t0 + deadline / 1e3

        if arm == "challenger":
            if challenger is None:
                self.report(self.challenger_error or "challenger", False, 0.0)
                return await self._fallback(req, champion, "challenger_unavailable", t0)
            try:
                p, scores = await self._within(self.score(challenger, req, t0), due)
            except TimeoutError:
                self.report(challenger.model_version, False, (time.perf_counter() - t0) * 1e3)
                return await self._fallback(req, champion, "challenger_deadline", t0)
            except Exception as e:
                if isinstance(e, FeatureError):
                    champion.validate(req)  # the client's own mistake if the champion refuses it too (422)
                logger.warning("adsfm: challenger version %s failed (%r); answering with the champion", challenger.model_version, e)
                self.report(challenger.model_version, False, (time.perf_counter() - t0) * 1e3)
                return await self._fallback(req, champion, "challenger_error", t0)
            self.report(challenger.model_version, True, (time.perf_counter() - t0) * 1e3)
            if self.report_quality is not None:
                self._compare(req, challenger.ranking(scores), champion, challenger)
            return challenger.respond(p, scores)

        # a bad request is the client's (422), whichever model it went to
        work = asyncio.ensure_future(self.score(main, req, t0))
        try:
            p, scores = await self._within(work, due)
        except TimeoutError:
            if self.spillover is not None and main is not self.spillover:
                metrics.FALLBACKS.labels("deadline").inc()
                res = await self.answer(self.spillover, req, t0)
                return res.model_copy(update={"fallback": "deadline", "latency_ms": (time.perf_counter() - t0) * 1e3})
            metrics.FALLBACKS.labels("deadline_no_fallback").inc()
            p, scores = await work  # nothing lighter to answer with: the late answer beats none
        if self.split.shadow and challenger is not None and main is champion:
            self._shadow(req, main.ranking(scores), challenger)
        return main.respond(p, scores)

    async def _within(self, work: Awaitable[Any], due: float | None) -> Any:
        if due is None:
            return await work
        # shield: a late request leaves its batch; the batch goes on for the others in it
        return await asyncio.wait_for(asyncio.shield(work), timeout=max(due - time.perf_counter(), 0.0))

    async def _fallback(self, req: RankRequest, champion: RankService, reason: str, t0: float) -> RankResponse:
        metrics.FALLBACKS.labels(reason).inc()
        res = await self.answer(champion, req, t0)
        return res.model_copy(update={"fallback": reason, "latency_ms": (time.perf_counter() - t0) * 1e3})

    def _compare(self, req: RankRequest, challenger_scores: np.ndarray, champion: RankService, challenger: RankService) -> None:
        """Score a request the challenger answered with the champion too, in the background, for a sampled
        share (compare_rate) within the shadow bound (sheds, never delays), and report how far apart the two are: the quality
        evidence adsfm-shift can judge the challenger by, beside errors and latency."""
        if self._rng.random() >= self.compare_rate or len(self._shadow_tasks) >= self.shadow.max_in_flight:
            return
        report = self.report_quality
        assert report is not None

        async def run() -> None:
            try:
                _, scores = await self.shadow_score(champion, req, time.perf_counter())
            except Exception as e:  # the comparison is evidence, not service: nothing to answer here
                logger.warning("adsfm: champion %s could not score a compared request (%r)", champion.model_version, e)
                return
            scores = champion.ranking(scores)  # each model's ranking score: the two may have other tasks
            report(challenger.model_version, float(np.mean(np.abs(challenger_scores - scores))),
                   top_k_disagreement(scores, challenger_scores))

        self._background(run())

    def _shadow(self, req: RankRequest, champion_scores: np.ndarray, challenger: RankService) -> None:
        """Score a copy with the challenger, in the background: a sampled share of requests (the shadow
        log's rate), never more than its bound at once (a slow challenger sheds copies, not the champion's
        latency)."""
        if self._rng.random() >= self.shadow.rate or len(self._shadow_tasks) >= self.shadow.max_in_flight:
            metrics.SHADOW.labels("skipped").inc()
            return

        async def run() -> None:
            t0 = time.perf_counter()
            try:
                _, scores = await self.shadow_score(challenger, req, t0)
            except Exception as e:  # the champion took this request, so any refusal is the challenger's
                logger.warning("adsfm shadow: version %s failed (%r)", challenger.model_version, e)
                self.report(challenger.model_version, False, (time.perf_counter() - t0) * 1e3)
                metrics.SHADOW.labels("error").inc()
                return
            self.report(challenger.model_version, True, (time.perf_counter() - t0) * 1e3)
            scores = challenger.ranking(scores)
            d = top_k_disagreement(champion_scores, scores)
            metrics.SHADOW_DISAGREEMENT.observe(d)
            metrics.SHADOW.labels("disagreed" if d > 0 else "agreed").inc()
            key = challenger.engine.manifest.item_column or ""
            top = [req.candidates[int(i)].get(key, int(i)) for i in np.argsort(-scores, kind="stable")[:10]]
            self.shadow.write({"at": time.time(), "version": challenger.model_version, "champion": self.champion.model_version,
                               "user": user_key(req.user, self.sticky_field or "user_id"), "top": top, "disagreement": d})

        self._background(run())

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run off the request path; held in _shadow_tasks (which the in-flight bound counts), or the loop
        may collect the task mid-flight."""
        task = asyncio.ensure_future(work)
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)


class ShadowLog:
    """Where shadow answers go: JSON lines through a bounded queue to a background thread that writes a
    rotated file (`path`, `max_bytes` per file, `backups` kept), or to the replica's log at INFO without a
    path; and how many requests are shadowed (`rate`, at most `max_in_flight` at once)."""

    def __init__(self, path: str | None = None, rate: float = 1.0, max_in_flight: int = 4, max_bytes: int = 16 << 20,
                 backups: int = 3) -> None:
        import logging.handlers
        import queue

        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"serve.shadow_rate={rate}: a share of requests, within 0..1")
        self.rate, self.max_in_flight = rate, max_in_flight
        self._queue: queue.Queue[str] | None = None
        self._thread: threading.Thread | None = None
        if path is not None:
            self._queue = queue.Queue(maxsize=10_000)
            self._file = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups)
            self._file.setFormatter(logging.Formatter("%(message)s"))
            self._thread = threading.Thread(target=self._drain, daemon=True, name="adsfm-shadow-log")
            self._thread.start()

    def write(self, line: dict[str, Any]) -> None:
        text = json.dumps(line, default=str)
        if self._queue is None:
            logger.info("adsfm shadow: %s", text)
            return
        try:
            self._queue.put_nowait(text)
        except Exception:  # a full queue drops a line rather than stall the replica
            metrics.SHADOW.labels("unlogged").inc()

    def _drain(self) -> None:
        assert self._queue is not None
        while True:
            text = self._queue.get()
            self._file.emit(logging.LogRecord("adsfm.shadow", logging.INFO, "", 0, text, None, None))
