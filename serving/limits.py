"""Refusals at the door: the bearer token (401) and the body size (413), before the request reaches a route.

The size limit counts the bytes that arrive, so a chunked body (no Content-Length) is cut off as soon as it
passes `serve.max_request_bytes`, and a Content-Length over it is refused before a byte is read. The token
is compared in constant time. /v1/ needs the token when one is set; /metrics and /docs too with
`serve.protect_metrics` / `serve.protect_docs`; the health probes never.

The replica's settings live here, in a module (pickled by reference) rather than in serving/app.py, whose
ingress app Ray pickles by value: the middleware and the replica's constructor then share one dict.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi.responses import JSONResponse

from adsfm.contract.config import ServeConfig
from adsfm.serving import metrics

SETTINGS: dict[str, ServeConfig] = {}


def _needs_token(path: str, cfg: ServeConfig) -> bool:
    if path.startswith("/v1/"):
        return True
    if path == "/metrics":
        return cfg.protect_metrics
    return cfg.protect_docs and (path in ("/docs", "/openapi.json") or path.startswith("/docs/"))


def refusal(scope: dict[str, Any], cfg: ServeConfig | None = None) -> JSONResponse | None:
    """401 without the configured bearer token, 413 for a declared body over the limit; None lets it in."""
    cfg = cfg or SETTINGS.get("cfg")
    if cfg is None:
        return None
    path = scope.get("path", "")
    headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
    if cfg.auth_token and _needs_token(path, cfg):
        sent = headers.get("authorization", b"")
        if not hmac.compare_digest(sent, f"Bearer {cfg.auth_token}".encode()):
            metrics.REQUESTS.labels("401").inc()
            return JSONResponse(status_code=401, content={"detail": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                                headers={"WWW-Authenticate": "Bearer"})
    size = headers.get("content-length", b"").decode("latin-1")
    if path.startswith("/v1/") and size.isdigit() and int(size) > cfg.max_request_bytes:
        return too_large(cfg, int(size))
    return None


def too_large(cfg: ServeConfig, size: int | None = None) -> JSONResponse:
    metrics.REQUESTS.labels("413").inc()
    what = f"body of {size} bytes" if size is not None else "body"
    return JSONResponse(status_code=413, content={"detail": f"{what} > serve.max_request_bytes ({cfg.max_request_bytes})"})


class BodyTooLarge(Exception):
    """Raised while a body is read, once the bytes received pass the limit (a chunked body has no length)."""


class LimitsMiddleware:
    """Pure ASGI middleware (Starlette's @app.middleware("http") wraps every request in extra tasks and
    streams, which cost a small replica more than the refusal itself)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        cfg = SETTINGS.get("cfg")
        if scope["type"] != "http" or cfg is None:
            await self.app(scope, receive, send)
            return
        refused = refusal(scope, cfg)
        if refused is not None:
            await refused(scope, receive, send)
            return
        limit, received = cfg.max_request_bytes, 0

        async def counted() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
            return message  # type: ignore[no-any-return]

        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge:
            if not started:
                await too_large(cfg)(scope, receive, send)
