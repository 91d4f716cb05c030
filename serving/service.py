"""Request → response around an engine, with the API's validation; Ray-free so tests call it directly.

The request's schema is the bundle's own (adsfm.contract.request.request_model): a body is parsed and
validated in one step; a request built in Python (the generic RankRequest) gets the same checks here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
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
from adsfm.contract.tasks import RankBy
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
                 max_values: int = 1000, rank_by: str | None = None) -> None:
        """`rank_by`: serve.rank_by, a multi-task model's ranking expression (ignored for one task)."""
        self.engine = engine
        self.model_name = model_name
        self.model_version = model_version
        self.max_candidates = max_candidates
        m = engine.manifest
        self.user_fields = m.request_fields("user")
        self.item_fields = m.request_fields("item")
        self.request_model: type[BaseModel] = request_model(m.features, max_candidates, max_values)
        self.tasks = m.features.tasks
        self.rank_by = RankBy(rank_by, self.tasks) if self.tasks else None

    def ranking(self, scores: np.ndarray) -> np.ndarray:
        """The score candidates are ranked by: the probability, or a multi-task model's `rank_by` of its
        tasks' probabilities ([n, T] → [n])."""
        return scores if self.rank_by is None else self.rank_by(scores)

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
        if type(req) is not self.request_model:  # parse() already held a body to this bundle's schema
            self.validate(req)
        return Prepared(req, self.engine.inputs(req.user, req.candidates), t0)

    def respond(self, p: Prepared, scores: np.ndarray) -> RankResponse:
        combined = self.ranking(scores)
        order = np.argsort(-combined, kind="stable")
        cands, ranked = p.req.candidates, combined[order].tolist()
        # Built without validation: every field is ours and of its declared type (a response of 100
        # candidates would otherwise spend more time validating than scoring).
        out: list[ScoredCandidate] = [{"item": cands[i], "score": s, "rank": r}
                                      for r, (i, s) in enumerate(zip(order.tolist(), ranked, strict=True), 1)]
        if self.rank_by is not None:
            for c, row in zip(out, scores[order].tolist(), strict=True):
                c["scores"] = dict(zip(self.tasks, row, strict=True))
        return RankResponse.model_construct(model_name=self.model_name, model_version=self.model_version, candidates=out,
                                            latency_ms=(time.perf_counter() - p.t0) * 1e3, fallback=None,
                                            rank_by=None if self.rank_by is None else self.rank_by.text)

    @staticmethod
    def encode(res: RankResponse) -> bytes:
        """The response's JSON, as model_dump_json writes it, by orjson, which writes it faster: every field of
        a response is ours and of its declared type (see respond), so nothing is left to validate. What
        orjson refuses in an echoed candidate (an int id past 64 bits) goes through pydantic."""
        try:
            return orjson.dumps(res.__dict__)
        except orjson.JSONEncodeError:
            return res.model_dump_json().encode()

    def rank(self, req: RankRequest) -> RankResponse:
        """One request on its own (no cross-request batching)."""
        return self.respond(*score_one(self, req, time.perf_counter()))

    def health(self) -> Health:
        return Health(status="ok", model_name=self.model_name, model_version=self.model_version)


Scored = tuple[Prepared, np.ndarray]
"""A request's prepared inputs and its candidates' scores."""


def score_together(items: list[tuple[RankService, Any, float]]) -> list[Scored | Exception]:
    """(service, request, arrival) items prepared and scored in one pass, in one thread: each request
    prepared (a refusal or a user graph failure is that request's alone), then one engine call per model
    version for all of them (one dense-graph run for DLRM). A version that fails fails only its own requests."""
    out: list[Scored | Exception | None] = [None] * len(items)
    by_engine: dict[int, list[tuple[int, RankService, Prepared]]] = {}
    for i, (service, req, arrived) in enumerate(items):
        try:
            # by engine: a reload mid-batch leaves each request with the version it was routed to
            by_engine.setdefault(id(service.engine), []).append((i, service, service.prepare(req, arrived)))
        except Exception as e:
            out[i] = e
    for group in by_engine.values():
        try:
            results: list[np.ndarray | Exception] = list(group[0][1].engine.run_many([p.inputs for _, _, p in group]))
        except Exception as e:
            results = [e] * len(group)
        for (i, _, p), r in zip(group, results, strict=True):
            out[i] = r if isinstance(r, Exception) else (p, r)
    return out  # type: ignore[return-value]


def score_one(service: RankService, req: Any, arrived: float) -> Scored:
    """One request prepared and scored by itself."""
    got = score_together([(service, req, arrived)])[0]
    if isinstance(got, Exception):
        raise got
    return got
