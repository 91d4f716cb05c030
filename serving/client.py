"""A Python client for services that call the ranking endpoint."""

from __future__ import annotations

import time
from typing import Any

import requests

from adsfm.contract.request import Health, RankResponse


class RankError(RuntimeError):
    """The server refused the request (4xx): `status` and the server's `detail`, which names the field."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class RankClient:
    """`RankClient("http://127.0.0.1:8000").rank({"user_id": "196"}, [{"item_id": "1"}, ...])`.

    Keeps one HTTP connection pool; retries connection errors, answers cut off mid-body and 5xx (a replica
    restarting, a model swap) with a short backoff, never a 4xx (the same request would fail again):
    ranking is idempotent."""

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout_s: float = 5.0,
                 retries: int = 2) -> None:
        self.url = url.rstrip("/")
        self.timeout_s, self.retries = timeout_s, retries
        self.retried = 0
        """Attempts that failed with a connection error or a 5xx and were retried (for a service's metrics)."""
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def rank(self, user: dict[str, Any], candidates: list[dict[str, Any]], deadline_ms: float | None = None) -> RankResponse:
        """Scores best first; with `deadline_ms`, a model that would answer later is replaced by the fallback's
        answer (the response's `fallback` says so)."""
        body: dict[str, Any] = {"user": user, "candidates": candidates}
        if deadline_ms is not None:
            body["deadline_ms"] = deadline_ms
        return RankResponse.model_validate(self._call("POST", "/v1/rank", body))

    def health(self) -> Health:
        return Health.model_validate(self._call("GET", "/healthz", None))

    def _call(self, method: str, path: str, body: Any) -> Any:
        for attempt in range(self.retries + 1):
            try:
                r = self.session.request(method, self.url + path, json=body, timeout=self.timeout_s)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
                # ChunkedEncodingError: the connection broke mid-answer (a replica killed while it was sending)
                if attempt == self.retries:
                    raise
            else:
                if r.status_code < 400:
                    return r.json()
                if r.status_code < 500 or attempt == self.retries:
                    try:
                        detail = r.json().get("detail", r.text)
                    except ValueError:
                        detail = r.text
                    raise RankError(r.status_code, detail)
            self.retried += 1
            time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")
