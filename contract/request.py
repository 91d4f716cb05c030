"""The ranking API's request and response: one contract for every client (JSON over HTTP under /v1, the
Python client, the MLflow pyfunc).

`RankRequest` is the generic shape: a user's feature values by name, the candidates, an optional deadline.
`request_model(spec, ...)` derives one bundle's exact request from its feature spec: each feature by name
with its type, scalar or list, every feature optional (a missing one is featurized as the contract says),
the item id required on each candidate, unknown fields refused. The served OpenAPI schema and /v1/rank's
validation are that model, and `pyfunc_columns(spec)` gives the MLflow signature from the same spec: one
row per (user, candidate), a multi-valued feature as a list in its cell.
"""

from __future__ import annotations

from typing import Annotated, Any, NamedTuple, NotRequired, Required

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    create_model,
)
from typing_extensions import TypedDict

from adsfm.contract.features import DenseFeatureSpec, FeatureSpec, SparseFeatureSpec

FeatureValue = str | int | float | list[str | int] | None

MAX_DENSE = 1e15
"""The largest magnitude a dense value may have in a request (float32 inputs stay finite after scaling)."""
MAX_TIME = 2**40
"""Raw integer features (seconds) lie in [0, MAX_TIME]."""


class RankRequest(BaseModel):
    """One user and the candidates to rank for them (the generic shape; `request_model` is one bundle's)."""

    model_config = ConfigDict(extra="forbid")

    user: dict[str, FeatureValue] = Field(
        default_factory=dict,
        description="User-side feature values by name (user_id, gender, history, ...); missing ones are featurized as missing.",
    )
    candidates: list[dict[str, FeatureValue]] = Field(
        min_length=1,
        description="Candidate items; each needs the item id field, other item features are optional.",
    )
    deadline_ms: float | None = Field(
        default=None, gt=0, le=60_000,
        description="Answer within this many ms: a model that is late is replaced by the fallback model's answer.",
    )


class ScoredCandidate(TypedDict):
    """One ranked candidate (a TypedDict, not a model: a response holds hundreds, built on the hot path)."""

    item: dict[str, Any]
    score: float
    """The probability; a multi-task model: the response's `rank_by` of its tasks' probabilities."""
    rank: int
    scores: NotRequired[dict[str, float]]
    """A multi-task model: each task's probability by task name."""


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
    rank_by: str | None = Field(
        default=None,
        description="A multi-task model: the expression over its tasks' probabilities (p_<task>) that `score` holds "
                    "and the candidates are ranked by (serve.rank_by); null for a one-task model.",
    )


class Health(BaseModel):
    status: str
    model_name: str
    model_version: str


class ErrorDetail(BaseModel):
    """One refused field: FastAPI's validation error shape, for pydantic's errors and the contract's alike."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    detail: list[ErrorDetail] | str


# ----------------------------------------------------------------------------------- one bundle's request

# Strict types: a JSON value of another type is refused (422), never coerced (false is not 0, "5" not 5), so
# what the schema says is exactly what the endpoint accepts.
Scalar = StrictStr | StrictBool | StrictInt | StrictFloat
Dense = Annotated[float, Strict(), Field(ge=-MAX_DENSE, le=MAX_DENSE)]
Seconds = Annotated[int, Strict(), Field(ge=0, le=MAX_TIME)]
ItemId = StrictStr | StrictInt


def _joined_within(max_values: int, sep: str) -> AfterValidator:
    def check(v: Any) -> Any:
        if isinstance(v, str) and v.count(sep) + 1 > max_values:
            raise ValueError(f"{v.count(sep) + 1} values joined by {sep!r} > the limit {max_values}")
        return v
    return AfterValidator(check)


def _sparse_type(f: SparseFeatureSpec, max_values: int) -> Any:
    if f.raw and not f.multi:
        return Seconds | None
    if f.raw:
        digits = rf"-?\d+(?:{_escape(f.sep)}-?\d+)*"
        joined = Annotated[str, Field(pattern=rf"^(?:{digits})?$")]
        return Annotated[Annotated[list[Seconds], Field(max_length=max_values)] | joined | None,
                         _joined_within(max_values, f.sep)]
    if f.multi:
        return Annotated[Annotated[list[Scalar | None], Field(max_length=max_values)] | str | None,
                         _joined_within(max_values, f.sep)]
    return Scalar | None


def _escape(sep: str) -> str:
    import re

    return re.escape(sep)


def _described(tp: Any, description: str) -> Any:
    return NotRequired[Annotated[tp, Field(description=description)]]  # type: ignore[valid-type]


def _sparse_doc(f: SparseFeatureSpec, max_values: int) -> str:
    if f.raw:
        kind = "integers (seconds)" if f.multi else "an integer (seconds)"
    elif f.multi:
        kind = f"a list of up to {max_values} values, or one string joined by {f.sep!r}"
    else:
        kind = "one value (a string or a number; 7 and 7.0 are the same key)"
    return f"{f.side}-side feature {f.name!r}: {kind}; null or absent: missing"


def _dense_doc(d: DenseFeatureSpec) -> str:
    return f"{d.side}-side number {d.name!r}; null or absent: the training mean"


def request_model(spec: FeatureSpec, max_candidates: int, max_values: int, name: str = "RankRequest") -> type[BaseModel]:
    """The request model of one bundle (see the module docstring); its JSON schema is what /openapi.json serves."""
    sides: dict[str, dict[str, Any]] = {"user": {}, "item": {}}
    for f in spec.sparse:
        if not f.bucketizes:  # it reads its dense feature's field
            sides[f.side][f.name] = _described(_sparse_type(f, max_values), _sparse_doc(f, max_values))
    for d in spec.dense:
        sides[d.side][d.name] = _described(Dense | None, _dense_doc(d))
    if spec.item_column:
        doc = f"the item id ({spec.item_column!r}); the bundle's item store supplies the item's other features"
        sides["item"][spec.item_column] = Required[Annotated[ItemId, Field(description=doc)]]  # type: ignore[valid-type]
    forbid = ConfigDict(extra="forbid")
    user = TypedDict("User", sides["user"], total=False)  # type: ignore[misc]
    user.__pydantic_config__ = forbid  # type: ignore[attr-defined]
    candidate = TypedDict("Candidate", sides["item"], total=False)  # type: ignore[misc]
    candidate.__pydantic_config__ = forbid  # type: ignore[attr-defined]
    generic = RankRequest.model_fields
    return create_model(  # type: ignore[call-overload,no-any-return]
        name,
        __config__=forbid,
        user=(user, Field(default_factory=dict, description=generic["user"].description)),
        candidates=(Annotated[list[candidate], Field(min_length=1, max_length=max_candidates)],  # type: ignore[valid-type]
                    Field(description=generic["candidates"].description)),
        deadline_ms=(Annotated[float, Strict()] | None, Field(default=None, gt=0, le=60_000, description=generic["deadline_ms"].description)),
    )


def request_errors(e: Any) -> list[dict[str, Any]]:
    """A pydantic ValidationError as ErrorDetail dicts (without the echoed input: bodies stay small)."""
    return [{"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]}
            for err in e.errors(include_url=False, include_context=False, include_input=False)]


# ------------------------------------------------------------------------------------------ the pyfunc


class PyfuncColumn(NamedTuple):
    name: str
    kind: str
    """scalar (a string or a number: a categorical value, the item id, a dense value), long (a raw
    integer), list_string, list_long. A number column is `scalar` rather than double: MLflow refuses to cast
    an int64 column to double, and the contract reads both."""
    required: bool


def pyfunc_columns(spec: FeatureSpec) -> list[PyfuncColumn]:
    """The MLflow pyfunc's input columns: the user features, the item id (required) and the item features,
    all but the id optional, a multi-valued feature a list in its cell."""
    cols: list[PyfuncColumn] = []
    for side in ("user", "item"):
        if side == "item" and spec.item_column:
            cols.append(PyfuncColumn(spec.item_column, "scalar", True))
        for f in spec.sparse:
            if f.side == side and f.name != spec.item_column and not f.bucketizes:
                kind = ("list_long" if f.multi else "long") if f.raw else ("list_string" if f.multi else "scalar")
                cols.append(PyfuncColumn(f.name, kind, False))
        cols += [PyfuncColumn(d.name, "scalar", False) for d in spec.dense if d.side == side]
    return cols


def request_rows(body: dict[str, Any]) -> list[dict[str, Any]]:
    """An HTTP request body as the pyfunc's rows: one per candidate, the user's values repeated."""
    user = body.get("user") or {}
    return [{**user, **c} for c in body["candidates"]]
