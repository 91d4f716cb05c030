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
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from adsfm.contract.config import ServeConfig
from adsfm.serving import metrics


@dataclass(frozen=True)
class Limits:
    """What the door checks, as plain values: read on every request, where a config object's attribute
    access would cost more than the check."""

    bearer: bytes | None
    """b"Bearer <token>", or None when no token is configured."""
    max_request_bytes: int
    protect_metrics: bool
    protect_docs: bool

    @classmethod
    def of(cls, cfg: ServeConfig) -> Limits:
        return cls(f"Bearer {cfg.auth_token}".encode() if cfg.auth_token else None, int(cfg.max_request_bytes),
                   bool(cfg.protect_metrics), bool(cfg.protect_docs))


SETTINGS: dict[str, Limits] = {}
"""The replica's limits under "limits" (set by its constructor and reconfigure())."""


def _needs_token(path: str, lim: Limits) -> bool:
    if path.startswith("/v1/"):
        return True
    if path == "/metrics":
        return lim.protect_metrics
    return lim.protect_docs and (path in ("/docs", "/openapi.json") or path.startswith("/docs/"))


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v  # type: ignore[no-any-return]
    return None


def refusal(scope: dict[str, Any], lim: Limits | None = None) -> JSONResponse | None:
    """401 without the configured bearer token, 413 for a declared body over the limit; None lets it in."""
    lim = lim or SETTINGS.get("limits")
    if lim is None:
        return None
    path = scope.get("path", "")
    if (lim.bearer is not None and _needs_token(path, lim)
            and not hmac.compare_digest(_header(scope, b"authorization") or b"", lim.bearer)):
        metrics.REQUESTS.labels("401").inc()
        return JSONResponse(status_code=401, content={"detail": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                            headers={"WWW-Authenticate": "Bearer"})
    size = (_header(scope, b"content-length") or b"").decode("latin-1")
    if path.startswith("/v1/") and size.isdigit() and int(size) > lim.max_request_bytes:
        return too_large(lim, int(size))
    return None


def too_large(lim: Limits, size: int | None = None) -> JSONResponse:
    metrics.REQUESTS.labels("413").inc()
    what = f"body of {size} bytes" if size is not None else "body"
    return JSONResponse(status_code=413, content={"detail": f"{what} > serve.max_request_bytes ({lim.max_request_bytes})"})


class BodyTooLarge(Exception):
    """Raised while a body is read, once the bytes received pass the limit (a chunked body has no length)."""


class LimitsMiddleware:
    """Pure ASGI middleware (Starlette's @app.middleware("http") wraps every request in extra tasks and
    streams, which cost a small replica more than the refusal itself)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        lim = SETTINGS.get("limits")
        if scope["type"] != "http" or lim is None:
            await self.app(scope, receive, send)
            return
        refused = refusal(scope, lim)
        if refused is not None:
            await refused(scope, receive, send)
            return
        limit, received = lim.max_request_bytes, 0

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
                await too_large(lim)(scope, receive, send)
