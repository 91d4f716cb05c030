"""Ray Serve's ingress modes on this machine, on a no-op deployment and on the ranker (workload A).

    python bench/ingress.py [--seconds 4] [--out FILE.json]

The mode is fixed when a Ray cluster starts (serving/ingress.py), so each mode gets a fresh local cluster in
a child process: proxy (Ray Serve's defaults), direct (RAY_SERVE_THROUGHPUT_OPTIMIZED: replicas serve HTTP
themselves, user code on the replica's loop, gRPC between deployments, Serve's proxy still the public
port) and haproxy (the same with HAProxy in front, balancing across the replicas' own ports). Each child
serves the no-op and the MovieLens DLRM (trained once, here) and is fed the same stream as bench/serve.py's
workload A at concurrency 1 and 32. Ratios are against `proxy` measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import free_port, result, write  # noqa: E402

MODES = ("proxy", "direct", "haproxy")


def child(mode: str, root: Path, seconds: float) -> None:
    """One mode on a fresh cluster; prints one JSON line of results."""
    from omegaconf import OmegaConf
    from ray import serve

    from adsfm.contract.cluster import init_ray
    from adsfm.serving import app as serve_app
    from bench.serve import _wait_http, closed_loop, deploy_noop

    spec = json.loads((root / "spec.json").read_text())
    bodies = [b.encode() for b in spec["stream"]]
    cfg = OmegaConf.load(root / "config.yaml")
    cfg.serve.port = free_port()
    init_ray(None, serve_ingress=mode)
    out: dict[str, dict[str, float]] = {}
    try:
        deploy_noop(cfg.serve)
        serve_app.start(OmegaConf.merge(cfg.serve, {"model_name": spec["name"]}), spec["uri"], name="adsfm")  # type: ignore[arg-type]
        base = f"http://{cfg.serve.host}:{cfg.serve.port}"
        _wait_http(f"{base}/healthz")
        for server, url in (("noop", f"{base}/noop/v1/rank"), ("adsfm", f"{base}/v1/rank")):
            asyncio.run(closed_loop(url, bodies, 4, 1.0))  # warm-up
            for c in (1, 32):
                out[f"{server}_c{c}"] = asyncio.run(closed_loop(url, bodies, c, seconds))
    finally:
        serve.shutdown()
    print("RESULT " + json.dumps(out), flush=True)


def run(a: argparse.Namespace) -> dict[str, Any]:
    from bench.serve import request_stream, setup

    root = Path(tempfile.mkdtemp(prefix="adsfm-bench-ingress-"))
    cfg, _, uri = setup(root, [], "bench-ingress")
    (root / "config.yaml").write_text((root / "bench-ingress" / "config.yaml").read_text())
    stream = [b.decode() for b in request_stream(cfg, 100, 500, seed=1)]
    (root / "spec.json").write_text(json.dumps({"name": "bench-ingress", "uri": uri, "stream": stream}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}  # each child picks its own
    modes = [m for m in MODES if m != "haproxy" or shutil.which("haproxy")]
    values: dict[str, float] = {}
    for mode in modes:
        print(f"[ingress] {mode} ...", flush=True)
        p = subprocess.run([sys.executable, __file__, "--child", mode, "--root", str(root), "--seconds", str(a.seconds)],
                           env=env, capture_output=True, text=True, timeout=900)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"mode {mode} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        for point, r in json.loads(line[7:]).items():
            for k in ("p50_ms", "p99_ms", "qps", "errors"):
                values[f"{mode}_{point}_{k}"] = r[k]
    print(f"\n{'ingress':<8} {'server':<6} {'load':<5} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'errors':>7}")
    for mode in modes:
        for server in ("noop", "adsfm"):
            for c in (1, 32):
                k = f"{mode}_{server}_c{c}"
                print(f"{mode:<8} {server:<6} c{c:<4} {values[k + '_p50_ms']:>8.2f} {values[k + '_p99_ms']:>8.2f} "
                      f"{values[k + '_qps']:>8.1f} {values[k + '_errors']:>7.0f}")
    ratios = {f"{m}_vs_proxy_qps_{s}_c{c}": values[f"{m}_{s}_c{c}_qps"] / values[f"proxy_{s}_c{c}_qps"]
              for m in modes if m != "proxy" for s in ("noop", "adsfm") for c in (1, 32)}
    print()
    for k, v in ratios.items():
        print(f"{k:<32} {v:.2f}")
    return result("ingress", {"seconds": a.seconds, "modes": modes, "workload": "A: DLRM, 100 candidates"}, values, ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="duration of each load point")
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.root, a.seconds)
        return
    write(run(a), a.out)


if __name__ == "__main__":
    main()
