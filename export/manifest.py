"""The exported artifact's schema: everything serving needs to score without training code.

Only JSON, ONNX and safetensors files make up a bundle; nothing in it is ever unpickled. This module
depends on nothing but pydantic so that serving can read it; `stable_hash` lives here because training
and serving must hash raw ids identically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


def stable_hash(value: str, buckets: int) -> int:
    """Process-independent hash into [0, buckets) (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") % buckets


class SparseFeatureSpec(BaseModel):
    name: str
    column: str | None = None
    """Column of the training data it came from (defaults to name)."""
    table: str | None = None
    """Its embedding table; None for a raw feature."""
    multi: bool = False
    sep: str = "|"
    side: Literal["user", "item"] = "user"
    raw: bool = False
    """Integer values used as they are (timestamps), not looked up."""

    @property
    def table_name(self) -> str:
        if self.table is None:
            raise ValueError(f"feature {self.name!r} is raw: it has no table")
        return self.table


class DenseFeatureSpec(BaseModel):
    name: str
    column: str | None = None
    side: Literal["user", "item"] = "user"
    log1p: bool = False
    mean: float = 0.0
    std: float = 1.0


class TableSpec(BaseModel):
    rows: int
    dim: int
    pooling: Literal["sum", "mean"]
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    file: str
    """safetensors file: 'weight' (fp32/fp16) or 'codes' (uint8) + 'scale_bias' (fp16 [rows, 2]) for int8."""
    bytes: int = 0
    hash_buckets: int = 0
    """0: `vocab` maps raw values to rows 1..; else raw values hash into rows 1..hash_buckets. Row 0 is OOV."""
    vocab: list[str] = Field(default_factory=list)


class DenseGraphSpec(BaseModel):
    file: str = "dense.onnx"
    inputs: list[str] = Field(default_factory=lambda: ["dense", "embeddings"])
    output: str = "logit"


class SequenceSpec(BaseModel):
    """How a sequence model's two graphs fit together (model_type hstu), so serving needs no model code.

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
    passed: bool

    def reason(self) -> str:
        if self.quantized:
            return f"holdout AUC drop {self.auc_drop:.4f} vs margin {self.auc_margin:.4f} over {self.rows} rows"
        return f"max |eager - exported| {self.max_abs_diff:.3g} vs tolerance {self.tolerance:.1g} over {self.rows} rows"


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    model_type: Literal["dlrm", "hstu"] = "dlrm"
    embedding_dim: int
    sparse: list[SparseFeatureSpec]
    """Feature order of the dense graph's `embeddings` input."""
    dense: list[DenseFeatureSpec]
    """Column order of the dense graph's `dense` input."""
    tables: dict[str, TableSpec]
    dense_graph: DenseGraphSpec = Field(default_factory=DenseGraphSpec)
    item_column: str | None = None
    user_column: str | None = None
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
    """Set for sequence models (model_type hstu): the split graphs replace the dense graph."""

    def feature_names(self, side: str | None = None) -> list[str]:
        """Sparse then dense feature names, of one side ('user' / 'item') or all."""
        sparse = [f.name for f in self.sparse if side is None or f.side == side]
        return sparse + [d.name for d in self.dense if side is None or d.side == side]

    def request_fields(self, side: str | None = None) -> set[str]:
        """Fields a request may carry: the features, and the item id on the item side."""
        fields = set(self.feature_names(side))
        if self.item_column and side in (None, "item"):
            fields.add(self.item_column)
        return fields

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
