"""The exported artifact's schema: everything serving needs to score without training code.

A bundle is a directory of JSON, ONNX and safetensors files; nothing in it is ever unpickled. The manifest
carries the feature spec (adsfm.contract.features) the model was trained with, so every reader featurizes a
raw request exactly as training did, and names every file of the bundle, each checked to stay inside it.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from adsfm.contract.features import DenseFeatureSpec, FeatureSpec, SparseFeatureSpec

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2


def _relative(name: str) -> str:
    """A bundle file name: relative, with no '..' (a manifest must not point outside its bundle)."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name:
        raise ValueError(f"bundle file {name!r} must be a relative path inside the bundle")
    return name


class TableFile(BaseModel):
    """How one embedding table is stored in the bundle (its featurization is in `features.tables`)."""

    dim: int
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    file: str
    """safetensors file: 'weight' (fp32/fp16) or 'codes' (uint8) + 'scale_bias' (fp16 [rows, 2]) for int8."""
    bytes: int = 0

    _check_file = field_validator("file")(_relative)


class DenseGraphSpec(BaseModel):
    file: str = "dense.onnx"
    inputs: list[str] = Field(default_factory=lambda: ["dense", "embeddings"])
    output: str = "logit"

    _check_file = field_validator("file")(_relative)


class SequenceSpec(BaseModel):
    """How a sequence model's two graphs fit together (arch hstu), so serving needs no model code.

    For one user: `history` [n, D] is the sum of the rows of the `history` and `actions` features of the
    user's events (oldest first, the latest `max_history`); `times` [1 + n] int64 is a start time (the first
    event's, or without events the request's) followed by the events' times; `context` [F * D] concatenates
    the rows of `context_features`. The user graph maps those to `user_context`, `keys` and `values`, which
    serving caches per user and history. Candidates: `items` [m, D] sums the rows of `item_features`; the
    candidate graph takes them with `request_time` [1], the same `times` and the cached state, and returns
    logits. Events with equal times keep the order given.
    """

    user_graph: str = "user.onnx"
    candidate_graph: str = "candidate.onnx"
    history: str
    actions: str
    times: str
    time: str
    """Raw user-side feature: the request's timestamp (seconds)."""
    item_features: list[str]
    context_features: list[str]
    max_history: int
    num_layers: int

    _check_files = field_validator("user_graph", "candidate_graph")(_relative)


class ParitySpec(BaseModel):
    """Bundle against the eager fp32 model on the same holdout rows."""

    rows: int
    max_abs_diff: float
    tolerance: float
    """Applies when every table is fp32."""
    auc_eager: float = float("nan")
    auc_bundle: float = float("nan")
    auc_drop: float = float("nan")
    auc_margin: float = 0.002
    """Applies when a table is quantized: the bundle's holdout AUC may be this much below the eager one."""
    quantized: bool = False
    featurization: str = "identical"
    """Raw holdout values through the bundle's featurization against training's rows: identical, or the
    first difference."""
    reference: str = ""
    """The bundle's file of the parity rows (indices into the data) and the eager model's probabilities for
    them, from which the promotion gate judges the bundle again rather than trusting `passed`."""
    passed: bool

    def reason(self) -> str:
        if self.featurization != "identical":
            return f"featurization differs from training: {self.featurization}"
        if self.quantized:
            return f"holdout AUC drop {self.auc_drop:.4f} vs margin {self.auc_margin:.4f} over {self.rows} rows"
        return f"max |eager - exported| {self.max_abs_diff:.3g} vs tolerance {self.tolerance:.1g} over {self.rows} rows"


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    arch: Literal["dlrm", "dcnv2", "logreg", "hstu"] = "dlrm"
    embedding_dim: int
    features: FeatureSpec
    """The feature spec training used: features, tables' vocabularies or hashing, dense normalisation."""
    tables: dict[str, TableFile]
    dense_graph: DenseGraphSpec = Field(default_factory=DenseGraphSpec)
    item_store_file: str | None = "item_store.json"
    """Raw item-side feature values by item id, so a request may send only ids."""
    versions: dict[str, str] = Field(default_factory=dict)
    data_fingerprint: str = ""
    source_checkpoint: str = ""
    train_run_id: str = ""
    config_hash: str = ""
    git_commit: str = ""
    data_config: dict = Field(default_factory=dict)
    """The training data config (resolved), so a gate can rebuild the same holdout."""
    parity: ParitySpec | None = None
    sequence: SequenceSpec | None = None
    """Set for sequence models (arch hstu): the split graphs replace the dense graph."""

    @field_validator("item_store_file")
    @classmethod
    def _check_item_store(cls, v: str | None) -> str | None:
        return None if v is None else _relative(v)

    @property
    def sparse(self) -> list[SparseFeatureSpec]:
        return self.features.sparse

    @property
    def dense(self) -> list[DenseFeatureSpec]:
        return self.features.dense

    @property
    def item_column(self) -> str | None:
        return self.features.item_column

    @property
    def user_column(self) -> str | None:
        return self.features.user_column

    def feature_names(self, side: str | None = None) -> list[str]:
        return self.features.feature_names(side)

    def request_fields(self, side: str | None = None) -> set[str]:
        return self.features.request_fields(side)

    def write(self, bundle: Path) -> Path:
        path = bundle / MANIFEST_FILE
        path.write_text(self.model_dump_json(indent=1))
        return path

    @classmethod
    def read(cls, bundle: Path) -> Manifest:
        path = Path(bundle) / MANIFEST_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: {bundle} is not an adsfm bundle")
        return cls.model_validate(json.loads(path.read_text()))


def bundle_file(bundle: Path, name: str) -> Path:
    """A file the manifest names, resolved under the bundle (symbolic links that leave it are refused)."""
    root = Path(bundle).resolve()
    path = (root / _relative(name)).resolve()
    if root != path and root not in path.parents:
        raise ValueError(f"bundle file {name!r} resolves outside the bundle {root}")
    return path
