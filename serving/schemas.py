"""The ranking API's request and response (JSON over HTTP, versioned under /v1)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

FeatureValue = str | int | float | list[str | int] | None


class RankRequest(BaseModel):
    """One user and the candidates to rank for them."""

    model_config = ConfigDict(extra="forbid")

    user: dict[str, FeatureValue] = Field(
        description="User-side feature values by name (user_id, gender, history, ...); missing ones score as unknown."
    )
    candidates: list[dict[str, FeatureValue]] = Field(
        min_length=1,
        description="Candidate items; each needs the item id field, other item features are optional.",
    )
    deadline_ms: float | None = Field(
        default=None, gt=0, le=60_000,
        description="Answer within this many ms: a model that is late is replaced by the fallback model's answer.",
    )


class ScoredCandidate(BaseModel):
    item: dict[str, Any]
    score: float
    rank: int


class RankResponse(BaseModel):
    model_name: str
    model_version: str
    candidates: list[ScoredCandidate] = Field(description="Best first.")
    latency_ms: float = Field(description="Scoring time inside the replica.")
    fallback: str | None = Field(
        default=None,
        description="Why the model that answered is not the one first chosen (challenger_error, challenger_unavailable, "
                    "challenger_deadline, deadline); null when it is.",
    )


class Health(BaseModel):
    status: str
    model_name: str
    model_version: str
