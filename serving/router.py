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
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from adsfm.contract.registry import Split
from adsfm.contract.request import RankRequest, RankResponse
from adsfm.serving import metrics
from adsfm.serving.engine import FeatureError
from adsfm.serving.service import Prepared, RankService

logger = logging.getLogger("ray.serve")

Scorer = Callable[[RankService, Prepared], Awaitable[np.ndarray]]


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
    when the champion itself misses it."""

    def __init__(self, champion: RankService, score: Scorer, *, spillover: RankService | None = None,
                 sticky_field: str | None = "user_id", deadline_ms: float | None = None,
                 report: Callable[[str, bool, float], None] | None = None, seed: int | None = None,
                 shadow_log: str | None = None) -> None:
        self.champion = champion
        self.challenger: RankService | None = None
        self.challenger_error: str | None = None
        """The challenger alias's version when it could not be loaded (its share then falls back to the champion)."""
        self.split = Split()
        self.spillover = spillover
        self.score = score
        self.sticky_field = sticky_field
        self.deadline_ms = deadline_ms
        self.report = report or (lambda version, ok, ms: None)
        self._rng = random.Random(seed)
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self.shadow_log = shadow_log

    def arm(self, req: RankRequest) -> str:
        pct = self.split.challenger_pct
        if self.split.shadow or pct <= 0.0:
            return "champion"
        if pct >= 100.0:
            return "challenger"
        pos = bucket(user_key(req.user, self.sticky_field)) if self.sticky_field else self._rng.random() * 100.0
        return "challenger" if pos < pct else "champion"

    async def rank(self, req: RankRequest, main: RankService | None = None) -> RankResponse:
        """`main`: the model chosen by the caller (spillover) instead of the split."""
        t0 = time.perf_counter()
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
                return self._fallback(req, champion, "challenger_unavailable", t0)
            try:
                p = challenger.prepare(req)
                scores = await self._within(self.score(challenger, p), due)
            except TimeoutError:
                self.report(challenger.model_version, False, (time.perf_counter() - t0) * 1e3)
                return self._fallback(req, champion, "challenger_deadline", t0)
            except Exception as e:
                if isinstance(e, FeatureError):
                    champion.validate(req)  # the client's own mistake if the champion refuses it too (422)
                logger.warning("adsfm: challenger version %s failed (%r); answering with the champion", challenger.model_version, e)
                self.report(challenger.model_version, False, (time.perf_counter() - t0) * 1e3)
                return self._fallback(req, champion, "challenger_error", t0)
            self.report(challenger.model_version, True, (time.perf_counter() - t0) * 1e3)
            return challenger.respond(p, scores)

        p = main.prepare(req)  # a bad request is the client's (422), whichever model it went to
        work = asyncio.ensure_future(self.score(main, p))
        try:
            scores = await self._within(work, due)
        except TimeoutError:
            if self.spillover is not None and main is not self.spillover:
                metrics.FALLBACKS.labels("deadline").inc()
                lp = self.spillover.prepare(req)
                res = self.spillover.respond(lp, _now(self.spillover, lp))
                return res.model_copy(update={"fallback": "deadline", "latency_ms": (time.perf_counter() - t0) * 1e3})
            metrics.FALLBACKS.labels("deadline_no_fallback").inc()
            scores = await work  # nothing lighter to answer with: the late answer beats none
        if self.split.shadow and challenger is not None and main is champion:
            self._shadow(req, scores, challenger)
        return main.respond(p, scores)

    async def _within(self, work: Awaitable[np.ndarray], due: float | None) -> np.ndarray:
        if due is None:
            return await work
        # shield: a late request leaves its batch; the batch goes on for the others in it
        return await asyncio.wait_for(asyncio.shield(work), timeout=max(due - time.perf_counter(), 0.0))

    def _fallback(self, req: RankRequest, champion: RankService, reason: str, t0: float) -> RankResponse:
        metrics.FALLBACKS.labels(reason).inc()
        p = champion.prepare(req)
        res = champion.respond(p, _now(champion, p))
        return res.model_copy(update={"fallback": reason, "latency_ms": (time.perf_counter() - t0) * 1e3})

    def _shadow(self, req: RankRequest, champion_scores: np.ndarray, challenger: RankService) -> None:
        async def run() -> None:
            t0 = time.perf_counter()
            try:
                p = challenger.prepare(req)
                scores = await self.score(challenger, p)
            except Exception as e:  # the champion took this request, so any refusal is the challenger's
                logger.warning("adsfm shadow: version %s failed (%r)", challenger.model_version, e)
                self.report(challenger.model_version, False, (time.perf_counter() - t0) * 1e3)
                metrics.SHADOW.labels("error").inc()
                return
            self.report(challenger.model_version, True, (time.perf_counter() - t0) * 1e3)
            d = top_k_disagreement(champion_scores, scores)
            metrics.SHADOW_DISAGREEMENT.observe(d)
            metrics.SHADOW.labels("disagreed" if d > 0 else "agreed").inc()
            key = challenger.engine.manifest.item_column or ""
            top = [req.candidates[int(i)].get(key, int(i)) for i in np.argsort(-scores, kind="stable")[:10]]
            line = {"at": time.time(), "version": challenger.model_version, "champion": self.champion.model_version,
                    "user": user_key(req.user, self.sticky_field or "user_id"), "top": top, "disagreement": d}
            if self.shadow_log:
                with open(self.shadow_log, "a") as f:  # one short append per line: replicas may share the file
                    f.write(json.dumps(line, default=str) + "\n")
            else:
                logger.info("adsfm shadow: %s", json.dumps(line, default=str))

        task = asyncio.ensure_future(run())
        self._shadow_tasks.add(task)  # a reference, or the loop may collect the task mid-flight
        task.add_done_callback(self._shadow_tasks.discard)



def _now(service: RankService, p: Prepared) -> np.ndarray:
    """Scored here and now, not through the batch queue: a fallback must not wait behind the work that made
    the request late (ONNX Runtime sessions take concurrent runs)."""
    return service.engine.run_many([p.inputs])[0]
