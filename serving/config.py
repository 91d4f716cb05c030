"""Serving settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    """The Ray Serve application."""

    host: str = "127.0.0.1"
    """HTTP bind address; loopback unless you mean to expose it."""
    port: int = 8000
    model_name: str = "${export.model_name}"
    alias: str = "champion"
    """Registry alias the replicas load."""
    num_replicas: int = 1
    max_ongoing_requests: int = 64
    """Ray Serve's default (5) collapses a replica under 32 concurrent clients."""
    max_candidates: int = 2000
    """Requests with more candidates are refused with 422."""
    intra_op_threads: int = 1
    """ONNX Runtime threads per session."""
    reload_interval_s: float = 10.0
    """How often replicas check the alias and switch to the version it points at (0: never)."""
