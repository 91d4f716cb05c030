"""Open any adsfm bundle for scoring: the manifest says which engine reads it."""

from __future__ import annotations

from pathlib import Path

from adsfm.contract.manifest import Manifest
from adsfm.serving.engine import DenseGraphEngine
from adsfm.serving.sequence import SequenceEngine


def open_engine(bundle: str | Path, intra_op_threads: int = 1, user_cache_size: int = 10_000,
                user_cache_bytes: int | None = None, item_cache_bytes: int = 64 << 20) -> DenseGraphEngine | SequenceEngine:
    """A DenseGraphEngine for a dense-graph bundle (DLRM), a SequenceEngine for a split one (HSTU)."""
    if Manifest.read(Path(bundle)).sequence is not None:
        return SequenceEngine(bundle, intra_op_threads, user_cache_size, user_cache_bytes)
    return DenseGraphEngine(bundle, intra_op_threads, user_cache_size, user_cache_bytes, item_cache_bytes)
