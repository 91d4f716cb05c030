"""How HTTP requests reach the ranker replicas: Ray Serve's ingress, fixed when the Ray cluster starts.

- haproxy (the default where the binary is installed; scripts/setup_venv.sh installs Debian's package when
  it runs as root): Ray Serve's throughput-optimized mode with HAProxy in front. HAProxy listens on
  serve.port and balances across the replicas' own HTTP servers (direct ingress); user code runs on the
  replica's event loop; Serve's Python proxy is out of the request path.
- direct: throughput-optimized without HAProxy: replicas still serve HTTP themselves, but the public port is
  Serve's Python proxy (the only balancer left), so only the replica-side savings remain.
- proxy: Ray Serve's defaults (the Python HTTP proxy actor forwards every request to a replica).

bench/ingress.py measures all three on a no-op deployment and on the ranker; the README has the table.
The settings are environment variables that Ray's processes read when they start: init_ray sets them for a
local cluster (with a 5 s drain for a stopping replica instead of Ray's 30 s, since HAProxy runs on the same
node); for `ray start` clusters set them on every node (launch/cluster.yaml), where the 30 s drain stays.
"""

from __future__ import annotations

import os
import shutil

MODES = ("auto", "haproxy", "direct", "proxy")


def ingress_env(mode: str) -> tuple[str, dict[str, str]]:
    """(mode in effect, the environment that selects it); `auto` is haproxy when the binary is there."""
    if mode not in MODES:
        raise ValueError(f"cluster.serve_ingress={mode!r}: use one of {', '.join(MODES)}")
    binary = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or shutil.which("haproxy") or ""
    if mode == "auto":
        mode = "haproxy" if binary else "direct"
    if mode == "haproxy" and not binary:
        raise ValueError("cluster.serve_ingress=haproxy: no haproxy binary on PATH; `apt-get install haproxy` "
                         "(scripts/setup_venv.sh does as root) or use cluster.serve_ingress=direct")
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if mode in ("haproxy", "direct") else "0",
           "RAY_SERVE_ENABLE_HA_PROXY": "1" if mode == "haproxy" else "0"}
    if mode == "haproxy":
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = binary
    if mode in ("haproxy", "direct"):
        # Throughput-optimized Serve stops copying replica logs to stderr: a replica that fails to start would
        # then fail `serve.run` with no reason on the console. Errors are rare lines; keep them visible.
        env["RAY_SERVE_LOG_TO_STDERR"] = "1"
        # A stopping ingress replica drains 30 s by default so that remote load balancers stop sending to it;
        # on one node HAProxy learns of it within 0.1 s, and 30 s would hold `serve.delete` (and a CPU) that long.
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "5"
    return mode, env


def apply(mode: str) -> str:
    """Set the ingress environment for Ray processes started from here on; a variable already set wins
    (one can still turn a single knob by hand). Returns the mode in effect."""
    mode, env = ingress_env(mode)
    for k, v in env.items():
        os.environ.setdefault(k, v)
    return mode
