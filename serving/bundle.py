"""Open any adsfm bundle for scoring: the manifest says which engine reads it."""

from __future__ import annotations

from pathlib import Path

from export.manifest import Manifest
from serving.ranker import Ranker
from serving.sequence import SequenceRanker


def open_ranker(bundle: str | Path, intra_op_threads: int = 1, user_cache_size: int = 10_000) -> Ranker | SequenceRanker:
    """A Ranker for a dense-graph bundle (DLRM), a SequenceRanker for a split one (HSTU)."""
    if Manifest.read(Path(bundle)).sequence is not None:
        return SequenceRanker(bundle, intra_op_threads, user_cache_size)
    return Ranker(bundle, intra_op_threads, user_cache_size)
