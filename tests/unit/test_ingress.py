"""The Ray Serve ingress modes select the environment Ray Serve 2.60 reads, and a bad choice names the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from adsfm.contract.cluster import ingress_env


def test_modes_set_the_variables_ray_serve_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/opt/haproxy")
    mode, env = ingress_env("auto")
    assert mode == "haproxy"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    # a wrapper that binds HAProxy's stats and prometheus front ends to the serving host, then runs the binary
    wrapper = Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"]).read_text()
    assert "exec /opt/haproxy" in wrapper and "127.0.0.1" in wrapper
    assert ingress_env("auto", bind="0.0.0.0")[1]["RAY_SERVE_HAPROXY_BINARY_PATH"] == "/opt/haproxy"  # configured: all interfaces
    mode, env = ingress_env("direct")
    assert (mode, env["RAY_SERVE_THROUGHPUT_OPTIMIZED"], env["RAY_SERVE_ENABLE_HA_PROXY"]) == ("direct", "1", "0")
    mode, env = ingress_env("proxy")
    assert (env["RAY_SERVE_THROUGHPUT_OPTIMIZED"], env["RAY_SERVE_ENABLE_HA_PROXY"]) == ("0", "0")
    # the names must be the ones Ray Serve defines, or setting them does nothing
    from ray.serve._private import constants

    for name in (*ingress_env("auto")[1], "RAY_SERVE_THROUGHPUT_OPTIMIZED"):
        assert hasattr(constants, name), name


def test_without_haproxy_auto_falls_back_and_haproxy_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert ingress_env("auto")[0] == "direct"
    with pytest.raises(ValueError, match="apt-get install haproxy"):
        ingress_env("haproxy")
    with pytest.raises(ValueError, match="cluster.serve_ingress='nginx'"):
        ingress_env("nginx")
