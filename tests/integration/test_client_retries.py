"""RankClient's retries against a real HTTP server on 127.0.0.1 that misbehaves on purpose: an answer cut
off mid-body (a replica killed while sending) and a 5xx are retried; a 4xx
is not (the same request would fail again), and the client says how many attempts it retried."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

pytestmark = pytest.mark.integration

HEALTH = {"status": "ok", "model_name": "m", "model_version": "1"}


class Script(BaseHTTPRequestHandler):
    """Answers the n-th request as the server's `plan[n]` says: "cut", a status code, or "ok"."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        server: Any = self.server
        what = server.plan[min(server.calls, len(server.plan) - 1)]
        server.calls += 1
        if what == "cut":  # a chunked answer whose connection closes inside the first chunk
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"40\r\n{\"status\": \"o")
            self.wfile.flush()
            self.close_connection = True
            return
        status, body = (200, HEALTH) if what == "ok" else (int(what), {"detail": f"scripted {what}"})
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Any]:
    srv: Any = ThreadingHTTPServer(("127.0.0.1", 0), Script)
    srv.plan, srv.calls = ["ok"], 0
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _client(server: Any, retries: int = 2) -> Any:
    from adsfm.serving.client import RankClient

    return RankClient(f"http://127.0.0.1:{server.server_address[1]}", retries=retries, timeout_s=5)


@pytest.mark.parametrize("plan", [["cut", "ok"], ["503", "ok"], ["cut", "500", "ok"]], ids=["cut-mid-body", "5xx", "both"])
def test_a_broken_answer_or_a_5xx_is_retried(server: Any, plan: list[str]) -> None:
    server.plan = plan
    client = _client(server)
    assert client.health().model_version == "1"
    assert server.calls == len(plan) and client.retried == len(plan) - 1


def test_retries_run_out(server: Any) -> None:
    import requests

    server.plan = ["cut"]
    client = _client(server, retries=1)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        client.health()
    assert server.calls == 2


def test_a_4xx_is_not_retried(server: Any) -> None:
    from adsfm.serving.client import RankError

    server.plan = ["422", "ok"]
    client = _client(server)
    with pytest.raises(RankError, match="scripted 422") as e:
        client.health()
    assert e.value.status == 422 and server.calls == 1 and client.retried == 0
