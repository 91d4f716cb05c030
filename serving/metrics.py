"""Prometheus metrics of a ranking replica, served at /metrics.

A module of its own, used as `metrics.X` from serving/app.py: Ray pickles the ingress app by value, and
metric objects pickled with it would be copies that the registry never sees; a module is pickled by
reference, so the replica imports this one and registers its metrics once.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

LATENCY = Histogram("adsfm_rank_latency_seconds", "Time in the replica per request", ["model_version"],
                    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0))
REQUESTS = Counter("adsfm_rank_requests", "Ranking requests by HTTP status", ["status"])
BATCH = Histogram("adsfm_batch_requests", "Requests scored in one dense-graph run", buckets=(1, 2, 4, 8, 16, 32, 64))
CANDIDATES = Histogram("adsfm_rank_candidates", "Candidates per request", buckets=(1, 10, 100, 500, 1000, 2000))
SPILLOVER = Counter("adsfm_spillover_requests", "Requests scored by the spillover model because the queue was full")
CACHE = Gauge("adsfm_user_cache", "User-state cache counters of the serving version", ["kind"])
REPLICA = Info("adsfm_replica", "Which replica answered this scrape (Ray Serve's replica id): counters are per replica")
ROUTED = Counter("adsfm_routed_requests", "Requests by the arm the split sent them to", ["arm"])
FALLBACKS = Counter("adsfm_fallbacks", "Requests answered by a fallback model, by reason", ["reason"])
SHADOW = Counter("adsfm_shadow_requests", "Shadow challenger scorings by outcome (agreed, disagreed, error)", ["outcome"])
SHADOW_DISAGREEMENT = Histogram("adsfm_shadow_disagreement", "Share of the champion's top 10 missing from the shadow challenger's",
                                buckets=(0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0))
QUEUE = Gauge("adsfm_queue_depth", "Requests in flight on this replica")
SPLIT_PCT = Gauge("adsfm_challenger_share_pct", "Challenger's share of requests in force on this replica, percent")
LEASE_LAPSED = Gauge("adsfm_split_lease_lapsed",
                     "1 while the split's controller (adsfm-shift) has let its lease lapse: its share is back on the champion")
REGISTRY_UP = Gauge("adsfm_registry_up", "1 when the last registry read succeeded, 0 while the registry is unreachable")
REGISTRY_ERRORS = Counter("adsfm_registry_errors", "Registry reads that failed (the replica kept serving what it had)")
DELTA_SEQ = Gauge("adsfm_delta_applied_seq", "Sequence number of the last embedding delta the champion applied (0: none)")
FRESHNESS_LAG = Gauge("adsfm_freshness_lag_seconds", "Now minus the event-time watermark of the champion's last applied delta")
DELTA_ERRORS = Gauge("adsfm_delta_errors", "Deltas or delta-log reads that failed on this replica (it kept serving the last good delta)")
