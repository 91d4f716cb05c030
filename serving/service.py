"""Request → response around an engine, with the API's validation; Ray-free so tests call it directly.

The request's schema is the bundle's own (adsfm.contract.request.request_model): a body is parsed and
validated in one step; a request built in Python (the generic RankRequest) gets the same checks here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from adsfm.contract.features import FeatureError
from adsfm.contract.request import (
    Health,
    RankRequest,
    RankResponse,
    ScoredCandidate,
    request_errors,
    request_model,
)
from adsfm.serving.engine import DenseGraphEngine
from adsfm.serving.sequence import SequenceEngine


class RequestInvalid(ValueError):
    """A body that does not match the request schema; `errors` are ErrorDetail dicts (HTTP 422)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors


@dataclass
class Prepared:
    req: RankRequest
    inputs: Any
    """The engine's inputs for this request (run_many takes a list of them)."""
    t0: float


class RankService:
    def __init__(self, engine: DenseGraphEngine | SequenceEngine, model_name: str, model_version: str, max_candidates: int,
                 max_values: int = 1000) -> None:
        self.engine = engine
        self.model_name = model_name
        self.model_version = model_version
        self.max_candidates = max_candidates
        m = engine.manifest
        self.user_fields = m.request_fields("user")
        self.item_fields = m.request_fields("item")
        self.request_model: type[BaseModel] = request_model(m.features, max_candidates, max_values)

    def parse(self, body: bytes) -> Any:
        """A request body, validated against this bundle's request schema in one pass; RequestInvalid (→ 422)."""
        try:
            return self.request_model.model_validate_json(body)
        except ValidationError as e:
            raise RequestInvalid(request_errors(e)) from None

    def validate(self, req: RankRequest) -> None:
        """Names the first offending field; raises FeatureError (→ HTTP 422)."""
        if len(req.candidates) > self.max_candidates:
            raise FeatureError("candidates", f"{len(req.candidates)} candidates > the limit {self.max_candidates}; split the request")
        unknown = sorted(set(req.user) - self.user_fields)
        if unknown:
            raise FeatureError(f"user.{unknown[0]}", f"unknown user feature; known: {sorted(self.user_fields)}")
        key = self.engine.manifest.item_column
        for i, c in enumerate(req.candidates):
            extra = sorted(set(c) - self.item_fields)
            if extra:
                raise FeatureError(f"candidates[{i}].{extra[0]}", f"unknown item feature; known: {sorted(self.item_fields)}")
            if key and c.get(key) is None:
                raise FeatureError(f"candidates[{i}].{key}", "is required")

    def prepare(self, req: RankRequest, arrived: float | None = None) -> Prepared:
        """Validate and featurize: the engine's inputs for this request, ready to batch with others.
        `arrived` (time.perf_counter) is when the request reached the replica: its latency counts from there."""
        t0 = time.perf_counter() if arrived is None else arrived
        self.validate(req)
        return Prepared(req, self.engine.inputs(dict(req.user), [dict(c) for c in req.candidates]), t0)

    def respond(self, p: Prepared, scores: np.ndarray) -> RankResponse:
        order = np.argsort(-scores, kind="stable")
        out = [ScoredCandidate(item=p.req.candidates[i], score=float(scores[i]), rank=r + 1) for r, i in enumerate(order)]
        return RankResponse(
            model_name=self.model_name,
            model_version=self.model_version,
            candidates=out,
            latency_ms=(time.perf_counter() - p.t0) * 1e3,
        )

    def rank(self, req: RankRequest) -> RankResponse:
        """One request on its own (no cross-request batching)."""
        p = self.prepare(req)
        return self.respond(p, self.engine.run_many([p.inputs])[0])

    def health(self) -> Health:
        return Health(status="ok", model_name=self.model_name, model_version=self.model_version)


def run_grouped(items: list[tuple[Any, Any]]) -> list[np.ndarray | Exception]:
    """One engine call per model version in the batch; a version that fails fails only its own requests."""
    out: list[np.ndarray | Exception | None] = [None] * len(items)
    by_ranker: dict[int, list[int]] = {}
    for i, (engine, _) in enumerate(items):
        by_ranker.setdefault(id(engine), []).append(i)  # a reload mid-batch: each request keeps its version
    for idx in by_ranker.values():
        try:
            results: list[np.ndarray | Exception] = list(items[idx[0]][0].run_many([items[i][1] for i in idx]))
        except Exception as e:
            results = [e] * len(idx)
        for i, r in zip(idx, results, strict=True):
            out[i] = r
    return out  # type: ignore[return-value]
