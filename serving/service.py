"""Request → response around a Ranker, with the API's validation; Ray-free so tests call it directly."""

from __future__ import annotations

import time

from serving.ranker import FeatureError, Ranker
from serving.schemas import Health, RankRequest, RankResponse, ScoredCandidate


class RankService:
    def __init__(self, ranker: Ranker, model_name: str, model_version: str, max_candidates: int) -> None:
        self.ranker = ranker
        self.model_name = model_name
        self.model_version = model_version
        self.max_candidates = max_candidates
        m = ranker.manifest
        self.user_fields = m.request_fields("user")
        self.item_fields = m.request_fields("item")

    def validate(self, req: RankRequest) -> None:
        """Names the first offending field; raises FeatureError (→ HTTP 422)."""
        if len(req.candidates) > self.max_candidates:
            raise FeatureError("candidates", f"{len(req.candidates)} candidates > the limit {self.max_candidates}; split the request")
        unknown = sorted(set(req.user) - self.user_fields)
        if unknown:
            raise FeatureError(f"user.{unknown[0]}", f"unknown user feature; known: {sorted(self.user_fields)}")
        key = self.ranker.manifest.item_column
        for i, c in enumerate(req.candidates):
            extra = sorted(set(c) - self.item_fields)
            if extra:
                raise FeatureError(f"candidates[{i}].{extra[0]}", f"unknown item feature; known: {sorted(self.item_fields)}")
            if key and c.get(key) is None:
                raise FeatureError(f"candidates[{i}].{key}", "is required")

    def rank(self, req: RankRequest) -> RankResponse:
        t0 = time.perf_counter()
        self.validate(req)
        scores = self.ranker.score(dict(req.user), [dict(c) for c in req.candidates])
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        out = [ScoredCandidate(item=req.candidates[i], score=float(scores[i]), rank=r + 1) for r, i in enumerate(order)]
        return RankResponse(
            model_name=self.model_name,
            model_version=self.model_version,
            candidates=out,
            latency_ms=(time.perf_counter() - t0) * 1e3,
        )

    def health(self) -> Health:
        return Health(status="ok", model_name=self.model_name, model_version=self.model_version)
