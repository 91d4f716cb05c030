"""Serving under load: adsfm's Ray Serve app against Ray Serve's own floor and a naive FastAPI server.

    python bench/serve.py [--quick] [--out FILE.json] [--seconds 8] [--concurrency 1,8,32] [--qps 200]

One run on this machine, 127.0.0.1 only. It trains the MovieLens DLRM (one process, 1 epoch) and the
MovieLens HSTU (one process, 40 steps, 200-event histories), exports and registers them, then serves each
three ways, fed the same request stream:
- adsfm: the Ray Serve app in its shipped configuration (conf/serve/default.yaml);
- noop: a Ray Serve deployment that answers a constant, in the same configuration (Ray Serve's own cost);
- naive: bench/naive_server.py, FastAPI + uvicorn running the eager PyTorch model as trained, one forward
  per request, no cross-request batching, no cache.
The stream is realistic: users drawn with their MovieLens frequency (a random rating's user), each with the
real features and history of that moment, candidates drawn from the item catalogue. Workload A: the DLRM,
100 candidates per request; workload B: the HSTU (split graphs and cached user state in adsfm, the whole
model per request in the naive server), 500 candidates per request for users with a full 200-event history. Closed loop: C clients, each sending its next request when the
last is answered, for --seconds per point; --qps adds an open-loop point (fixed arrival rate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]  # bench/export.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import free_port, result, write  # noqa: E402

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Before Ray is imported: otherwise Ray 2.60 may advertise the host's interface instead of 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def request_stream(cfg: Any, n_candidates: int, count: int, seed: int, full_history: int = 0) -> list[bytes]:
    import numpy as np

    from adsfm.training.data import example_request, load_features, load_frame

    fs = load_features(cfg.data)
    df, _ = load_frame(cfg.data)
    rng = np.random.default_rng(seed)
    catalogue = np.array(sorted(fs.item_store))
    pool = np.flatnonzero(fs.sparse["history"][1] == full_history) if full_history else np.arange(len(df))
    rows = rng.choice(pool, size=count)  # a random rating: users weighted by how often they rate
    out = []
    for r in rows:
        cands = rng.choice(catalogue, size=min(n_candidates, len(catalogue)), replace=n_candidates > len(catalogue))
        out.append(json.dumps(example_request(df, fs.spec, int(r), [str(c) for c in cands])).encode())
    return out


async def _post(session: Any, url: str, body: bytes) -> bool:
    """One request; True when it was answered 200 (an error status or a broken connection counts as an error)."""
    import aiohttp

    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
            await r.read()
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def closed_loop(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> dict[str, float]:
    import aiohttp

    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(k: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            errors += not await _post(session, url, bodies[i % len(bodies)])
            lat.append(time.perf_counter() - t0)
            i += concurrency

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(k, session) for k in range(concurrency)))
        wall = time.perf_counter() - t0
    return _summary(lat, errors, wall)


async def open_loop(url: str, bodies: list[bytes], qps: float, seconds: float) -> dict[str, float]:
    """Requests arrive every 1/qps s whatever the server does; latency counts from the scheduled time."""
    import aiohttp

    lat: list[float] = []
    errors = 0

    async def one(session: aiohttp.ClientSession, body: bytes, due: float) -> None:
        nonlocal errors
        errors += not await _post(session, url, body)
        lat.append(time.perf_counter() - due)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)) as session:
        start = time.perf_counter()
        tasks = []
        for k in range(int(qps * seconds)):
            due = start + k / qps
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(session, bodies[k % len(bodies)], due)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return _summary(lat, errors, wall)


def _summary(lat: list[float], errors: int, wall: float) -> dict[str, float]:
    import numpy as np

    a = np.sort(np.array(lat)) * 1e3 if lat else np.array([float("nan")])
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)), "p99_ms": float(np.percentile(a, 99)),
            "qps": (len(lat) - errors) / wall, "errors": float(errors), "n": float(len(lat))}


def _wait_http(url: str, seconds: float = 120) -> None:
    import requests

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {seconds} s")


def setup(root: Path, overrides: list[str], name: str, max_steps: int = 0) -> tuple[Any, Path, str]:
    """Train (one process), checkpoint, export, register as `name`: (config, checkpoint, tracking uri)."""
    from omegaconf import OmegaConf

    from adsfm.contract.config import as_config, compose
    from adsfm.contract.tracking import ensure_experiment
    from adsfm.export.bundle import export_bundle
    from adsfm.export.register import log_and_register
    from adsfm.training.checkpoint import save_checkpoint
    from adsfm.training.data import load_features
    from adsfm.training.local import train_local

    cfg = as_config(compose([f"run_root={root}", "train.epochs=1", "parallel=single", "train.progress=false",
                             f"export.model_name={name}", "export.parity_rows=2000", *overrides]))
    fs = load_features(cfg.data)
    model = train_local(cfg, fs, max_steps=max_steps)
    ckpt = save_checkpoint(model, root / name / "checkpoints" / "step_1")
    export_bundle(cfg, ckpt, root / name / "bundle")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    exp = ensure_experiment(uri, "bench-serve", str(root))
    log_and_register(root / name / "bundle", name, uri, run_id=None, experiment_id=exp)
    (root / name / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return cfg, ckpt, uri


def deploy_noop(serve_cfg: Any) -> None:
    """Ray Serve's own floor: a deployment answering a constant at /noop, in the ranker's configuration."""
    from fastapi import FastAPI
    from ray import serve

    noop_api = FastAPI()

    @serve.deployment(max_ongoing_requests=serve_cfg.max_ongoing_requests, num_replicas=serve_cfg.num_replicas,
                      logging_config={"enable_access_log": serve_cfg.access_log, "log_level": "WARNING"})
    @serve.ingress(noop_api)
    class Noop:
        @noop_api.post("/v1/rank")
        async def rank(self) -> dict[str, list[Any]]:
            return {"candidates": []}

    serve.start(http_options={"host": serve_cfg.host, "port": serve_cfg.port})
    serve.run(Noop.bind(), name="noop", route_prefix="/noop", blocking=False)  # type: ignore[attr-defined]


def run(a: argparse.Namespace) -> dict[str, Any]:
    from omegaconf import OmegaConf
    from ray import serve

    from adsfm.contract.cluster import init_ray
    from adsfm.serving import app as serve_app

    root = Path(tempfile.mkdtemp(prefix="adsfm-bench-serve-"))
    models = {"a": setup(root, [], "bench-serve"),
              "b": setup(root, ["experiment=movielens_hstu", "data.history.length=200"], "bench-serve-hstu", max_steps=40)}
    streams = {"a": request_stream(models["a"][0], 100, 500, seed=1),
               "b": request_stream(models["b"][0], 500, 200, seed=2, full_history=200)}

    init_ray(None)
    cfg = models["a"][0]
    cfg.serve.port = free_port()
    deploy_noop(cfg.serve)
    base = f"http://{cfg.serve.host}:{cfg.serve.port}"
    values: dict[str, float] = {}
    rows = []
    naive: subprocess.Popen[bytes] | None = None
    try:
        for wl, bodies in streams.items():
            wl_cfg, ckpt, uri = models[wl]
            name_ = wl_cfg.export.model_name
            serve_app.start(OmegaConf.merge(cfg.serve, {"model_name": name_}), uri, name="adsfm")  # type: ignore[arg-type]
            naive_port = free_port()
            naive = subprocess.Popen([sys.executable, str(Path(__file__).with_name("naive_server.py")),
                                      str(root / name_ / "config.yaml"), str(ckpt), str(naive_port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            servers = {"adsfm": f"{base}/v1/rank", "noop": f"{base}/noop/v1/rank", "naive": f"http://127.0.0.1:{naive_port}/v1/rank"}
            _wait_http(f"{base}/healthz")
            _wait_http(f"http://127.0.0.1:{naive_port}/healthz")
            for name, url in servers.items():
                asyncio.run(closed_loop(url, bodies, 4, 1.0))  # warm-up: caches, connections, first-call costs
                points = [("c", c) for c in a.concurrency] + ([("qps", a.qps)] if a.qps else [])
                for mode, level in points:
                    r = asyncio.run(closed_loop(url, bodies, int(level), a.seconds) if mode == "c"
                                    else open_loop(url, bodies, float(level), a.seconds))
                    tag = f"c{level}" if mode == "c" else f"qps{level:g}"
                    suffix = "" if wl == "a" else "_b"
                    for k in ("p50_ms", "p95_ms", "p99_ms", "qps", "errors"):
                        values[f"{name}_{k.replace('_ms', '')}_ms_{tag}{suffix}" if k.endswith("_ms") else f"{name}_{k}_{tag}{suffix}"] = r[k]
                    rows.append((wl.upper(), name, tag, r))
                    print(f"  {wl.upper()} {name:<6} {tag:<7} p50 {r['p50_ms']:7.2f}  p99 {r['p99_ms']:7.2f} ms  "
                          f"{r['qps']:7.1f} req/s  errors {r['errors']:.0f}", flush=True)
            naive.terminate()
            naive.wait()
            serve_app.stop("adsfm")
    finally:
        if naive is not None:
            naive.terminate()
        serve.shutdown()
    ratios = {}
    top = max(a.concurrency)
    for suffix in ("", "_b"):
        if f"naive_qps_c{top}{suffix}" in values:
            ratios[f"adsfm_vs_naive_qps_c{top}{suffix}"] = values[f"adsfm_qps_c{top}{suffix}"] / values[f"naive_qps_c{top}{suffix}"]
            ratios[f"naive_vs_adsfm_p99_c{top}{suffix}"] = values[f"naive_p99_ms_c{top}{suffix}"] / values[f"adsfm_p99_ms_c{top}{suffix}"]
    print(f"\n{'workload':<9} {'server':<7} {'load':<8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>8} {'errors':>7}")
    for wl, name, tag, r in rows:
        print(f"{wl + (' (100)' if wl == 'A' else ' (500)'):<9} {name:<7} {tag:<8} {r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f} "
              f"{r['p99_ms']:>8.2f} {r['qps']:>8.1f} {r['errors']:>7.0f}")
    print()
    for k, v in ratios.items():
        print(f"{k:<32} {v:.2f}")
    return result("serve", {"seconds": a.seconds, "concurrency": a.concurrency, "qps": a.qps, "quick": a.quick,
                            "serve": {k: getattr(cfg.serve, k) for k in ("num_replicas", "max_ongoing_requests", "batch_max_requests",
                                                                          "batch_wait_ms", "user_cache_size", "intra_op_threads")},
                            "ray_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE")}}, values, ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 s per point")
    ap.add_argument("--seconds", type=float, help="duration of each load point (default 8; --quick 3)")
    ap.add_argument("--concurrency", default="1,8,32", help="closed-loop client counts")
    ap.add_argument("--qps", type=float, default=0.0, help="also an open-loop point at this arrival rate")
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    a = ap.parse_args()
    a.seconds = a.seconds or (3.0 if a.quick else 8.0)
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    res = run(a)
    write(res, a.out)


if __name__ == "__main__":
    main()
