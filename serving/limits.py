"""Refusals before a request body is read: bearer token (401) and body size (413).

The replica's settings live here, in a module (pickled by reference) rather than in serving/app.py, whose
ingress app Ray pickles by value: the middleware and the replica's constructor then share one dict.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from adsfm.contract.config import ServeConfig
from adsfm.serving import metrics

SETTINGS: dict[str, ServeConfig] = {}


class LimitsMiddleware:
    """Pure ASGI middleware (Starlette's @app.middleware("http") wraps every request in extra tasks and
    streams, which cost a replica on a small host more than the refusal itself)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refused = refusal(Request(scope))
            if refused is not None:
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


def refusal(request: Request, cfg: ServeConfig | None = None) -> JSONResponse | None:
    """401 without the configured bearer token, 413 for a body over the limit; None lets it through."""
    cfg = cfg or SETTINGS.get("cfg")
    if cfg is None or not request.url.path.startswith("/v1/"):
        return None
    if cfg.auth_token and request.headers.get("authorization") != f"Bearer {cfg.auth_token}":
        metrics.REQUESTS.labels("401").inc()
        return JSONResponse(status_code=401, content={"detail": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                            headers={"WWW-Authenticate": "Bearer"})
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > cfg.max_request_bytes:
        metrics.REQUESTS.labels("413").inc()
        return JSONResponse(status_code=413, content={"detail": f"body of {size} bytes > serve.max_request_bytes ({cfg.max_request_bytes})"})
    return None
