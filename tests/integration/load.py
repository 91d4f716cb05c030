"""Steady client load on a running Serve app, for the tests that change models under it."""

from __future__ import annotations

from typing import Any


class SteadyLoad:
    """Clients sending requests through RankClient in a loop until stopped: answers counted by (model
    version, fallback), failures kept; retries=0 counts every 5xx or broken connection as a failure."""

    def __init__(self, url: str, requests_: list[dict[str, Any]], clients: int, retries: int) -> None:
        import threading

        self.url, self.requests_, self.retries = url, requests_, retries
        self.ok = self.failed = self.retried = 0
        self.answers: dict[tuple[str, str | None], int] = {}
        self.errors: list[str] = []
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(k,)) for k in range(clients)]

    def _run(self, k: int) -> None:
        from adsfm.serving.client import RankClient, RankError

        client = RankClient(self.url, timeout_s=30, retries=self.retries)
        i = k
        while not self._stop.is_set():
            req = self.requests_[i % len(self.requests_)]
            i += 1
            try:
                res = client.rank(req["user"], req["candidates"])
            except (RankError, OSError) as e:
                with self._lock:
                    self.failed += 1
                    self.errors.append(repr(e)[:200])
                continue
            with self._lock:
                self.ok += 1
                key = (res.model_version, res.fallback)
                self.answers[key] = self.answers.get(key, 0) + 1
        with self._lock:
            self.retried += client.retried

    def versions(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (v, _), n in self.answers.items():
            out[v] = out.get(v, 0) + n
        return out

    def __enter__(self) -> SteadyLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
