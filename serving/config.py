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
    """Replicas when not autoscaling."""
    min_replicas: int = 1
    """Autoscaling (when max_replicas > min_replicas): provisioned replicas."""
    max_replicas: int = 1
    """Autoscaling: replicas added on demand up to this many."""
    target_ongoing_requests: float = 8.0
    """Autoscaling: ongoing requests per replica that Ray Serve aims for."""
    max_ongoing_requests: int = 64
    """Ray Serve's default (5) collapses a replica under 32 concurrent clients."""
    max_candidates: int = 2000
    """Requests with more candidates are refused with 422."""
    intra_op_threads: int = 1
    """ONNX Runtime threads per session."""
    reload_interval_s: float = 2.0
    """How often replicas read the registry (aliases and champion/challenger split) and follow it (0: never)."""
    batch_max_requests: int = 16
    """Concurrent requests whose candidates go through one run of the dense graph (@serve.batch)."""
    batch_wait_ms: float = 1.0
    """How long the first request of a batch waits for others."""
    user_cache_size: int = 10_000
    """Users whose looked-up user side is kept per replica (LRU, keyed by model version and features)."""
    access_log: bool = False
    """Ray Serve's per-request access log (off: it costs more than scoring on small hosts)."""
    max_request_bytes: int = 1 << 20
    """Larger request bodies are refused with 413."""
    auth_token: str | None = None
    """If set, /v1/ endpoints need `Authorization: Bearer <token>` (401 otherwise)."""
    spillover: str | None = None
    """`NAME@ALIAS` of a lighter registered model that scores the requests arriving while this replica already
    has `spillover_queue` in flight, and answers requests the main model cannot answer by their deadline
    (None: off); its responses name it, and /metrics counts them."""
    spillover_queue: int = 32
    """Requests in flight on a replica above which new ones spill over to `spillover`."""
    sticky_field: str | None = "user_id"
    """User feature whose hash splits users between champion and challenger, so a user stays on one side
    (None: split requests at random by the challenger's share)."""
    deadline_ms: float | None = None
    """Default per-request deadline (a request's own `deadline_ms` overrides it): a late model's answer is
    replaced by the fallback's (the champion for the challenger, else `spillover`). None: no deadline."""
    shadow_log: str | None = None
    """JSON-lines file each replica appends the shadow challenger's answers to (its top 10 and its
    disagreement with the champion); None: the replica's log, at INFO."""
