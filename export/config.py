"""Export settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ExportConfig:
    """How a checkpoint becomes a registered model."""

    model_name: str = "adsfm-movielens-dlrm"
    """Registered model name in MLflow."""
    precision: str = "fp32"
    """Embedding table precision in the bundle: only 'fp32' for now."""
    parity_tolerance: float = 1e-5
    """Max abs score (probability) difference allowed between the bundle and the eager model."""
    parity_rows: int = 2048
    """Holdout rows checked for parity."""
    opset: int = 18
    """ONNX opset of the dense graph."""
