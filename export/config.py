"""Export settings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GateConfig:
    """What adsfm-promote checks before it moves the champion alias."""

    auc_margin: float = 0.002
    """The candidate's holdout AUC may be at most this much below the champion's (both measured now)."""
    latency_budget_ms: float = 25.0
    """p99 of scoring 1 user x `latency_candidates` in-process must stay under this."""
    latency_candidates: int = 100
    latency_requests: int = 200


@dataclass
class ExportConfig:
    """How a checkpoint becomes a registered model."""

    model_name: str = "adsfm-movielens-dlrm"
    """Registered model name in MLflow."""
    precision: str = "fp32"
    """Embedding table precision in the bundle: 'fp32', 'fp16' or 'int8' (row-wise, fbgemm)."""
    table_precision: dict[str, str] = field(default_factory=dict)
    """Per-table precision overrides, by table name."""
    parity_tolerance: float = 1e-5
    """fp32 bundles: max abs score (probability) difference allowed against the eager model."""
    auc_margin: float = 0.002
    """Bundles with quantized tables: max holdout AUC drop allowed against the eager fp32 model."""
    parity_rows: int = 0
    """Holdout rows checked for parity (0: all)."""
    opset: int = 18
    """ONNX opset of the dense graph."""
    gate: GateConfig = field(default_factory=GateConfig)
