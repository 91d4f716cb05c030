"""Serving under load: adsfm's Ray Serve app against Ray Serve's own floor and a naive FastAPI server.

    python bench/serve.py [--quick] [--out FILE.json] [--seconds 8] [--concurrency 1,8,32] [--runs 3] [--replicas N]

One run on this machine, 127.0.0.1 only. It trains the MovieLens DLRM (one process, 1 epoch) and the
MovieLens HSTU (one process, 40 steps, 200-event histories), exports and registers them, then serves each
three ways, fed the same request streams:
- adsfm: the Ray Serve app in its shipped configuration (conf/serve/default.yaml, HAProxy ingress) with one
  replica per core (--replicas, default the host's cores: a replica is one Python process);
- noop: a Ray Serve deployment that answers a constant, in the same configuration (Ray Serve's own cost),
  deployed twice, with adsfm's replicas and with one ("noop1"): the floor adsfm is compared with is the
  better of the two at each point;
- naive: bench/naive_server.py, FastAPI + uvicorn running the eager PyTorch model as trained, one forward
  per request, no cross-request batching, no cache; as many worker processes as the host has cores,
  uvloop, httptools and orjson (the CPU budget adsfm's replica, HAProxy and Ray share).
Streams (every request a real MovieLens moment: the user's features and history then, the item the user
rated among the candidates, the rest drawn from the catalogue):
- holdout (the headline): the holdout's ratings in time order, each a distinct (user, moment), so the
  user state is new unless the user really came back with the same history; every point starts with
  adsfm's user caches empty (a new cache_generation: the app deployed again with that knob, which every
  replica takes through reconfigure, without a restart) and the hit rate it reached, summed over the
  replicas, is reported. Workload A: the DLRM, 100 candidates; workload B: the HSTU (split graphs and the
  cached user state in adsfm, the whole model per request in the naive server), 500 candidates, the
  holdout moments of users with a full 200-event history.
- returning (labelled as such, workload A): 64 (user, moment) pairs over and over, to show what the cache
  is worth when users do come back; its hit rate is reported beside it.
Load: wrk (a compiled generator, one thread, the same for every server) in a closed loop of C connections
for --seconds per point, the bodies from a Lua list; each point runs --runs times, servers interleaved; the
figures are the median, with the spread (min, max) beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
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

WRK_LUA = """-- adsfm bench/serve.py: POST each body of the list in order, once per request
local bodies, i = {}, 0
for line in io.lines(os.getenv("ADSFM_BODIES")) do bodies[#bodies + 1] = line end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i + 1
  return wrk.format(nil, nil, nil, bodies[(i - 1) % #bodies + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('ADSFM {"requests": %d, "duration_us": %d, "socket_errors": %d, "non2xx": %d, '
    .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
"""


def requests_at(cfg: Any, rows: list[int], n_candidates: int, seed: int) -> list[bytes]:
    """A request per row: that user's features and history at that moment, the rated item and n-1 others."""
    import numpy as np

    from adsfm.training.data import example_request, load_features, load_frame

    fs = load_features(cfg.data)
    df, _ = load_frame(cfg.data)
    rng = np.random.default_rng(seed)
    catalogue = np.array(sorted(fs.item_store))
    key = fs.spec.item_column
    out = []
    for r in rows:
        actual = str(df[key].iloc[r])
        others = rng.choice(catalogue, size=min(n_candidates, len(catalogue)), replace=n_candidates > len(catalogue))
        cands = [actual, *[str(c) for c in others if str(c) != actual]][:n_candidates]
        out.append(json.dumps(example_request(df, fs.spec, int(r), cands)).encode())
    return out


def holdout_rows(cfg: Any, full_history: int = 0) -> list[int]:
    """The holdout's rows in time order (with `full_history`, those whose history is that long)."""
    import numpy as np

    from adsfm.training.data import load_features

    fs = load_features(cfg.data)
    rows = fs.holdout_idx
    if full_history:
        rows = rows[fs.sparse["history"][1][rows] == full_history]
    assert fs.times is not None
    return [int(r) for r in rows[np.argsort(fs.times[rows], kind="stable")]]


def wrk_point(url: str, bodies: Path, connections: int, seconds: float) -> dict[str, float]:
    """One closed-loop point with wrk: p50/p99 ms (wrk's own latency record), requests per second, errors."""
    script = bodies.with_suffix(".lua")
    script.write_text(WRK_LUA)
    proc = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "30s", "-s", str(script), url],
                          capture_output=True, text=True, env={**os.environ, "ADSFM_BODIES": str(bodies)}, timeout=seconds + 120)
    m = re.search(r"^ADSFM (\{.*\})$", proc.stdout, re.M)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    w = json.loads(m.group(1))
    errors = w["socket_errors"] + w["non2xx"]
    return {"p50_ms": w["p50_us"] / 1e3, "p99_ms": w["p99_us"] / 1e3, "qps": (w["requests"] - errors) / (w["duration_us"] / 1e6),
            "errors": float(errors), "n": float(w["requests"])}


def cache_counts(base: str, replicas: int) -> tuple[float, float]:
    """The user-cache (hits, misses) summed over the replicas, from their Prometheus text: /metrics is
    scraped until each replica (named in adsfm_replica_info) has answered once."""
    import requests

    seen: dict[str, tuple[float, float]] = {}
    for _ in range(50 * replicas):
        text = requests.get(f"{base}/metrics", timeout=10).text
        replica = re.search(r'^adsfm_replica_info\{replica="([^"]+)"\}', text, re.M)
        got = {k: float(v) for k, v in re.findall(r'^adsfm_user_cache\{kind="(hits|misses)"\} ([0-9.e+]+)$', text, re.M)}
        seen[replica.group(1) if replica else "?"] = (got.get("hits", 0.0), got.get("misses", 0.0))
        if len(seen) >= replicas:
            break
    if len(seen) < replicas:
        raise RuntimeError(f"/metrics answered from {len(seen)} of {replicas} replicas")
    return sum(h for h, _ in seen.values()), sum(m for _, m in seen.values())


def _wait_http(url: str, seconds: float = 180) -> None:
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


def deploy_noop(serve_cfg: Any, name: str, replicas: int) -> None:
    """Ray Serve's own floor: a deployment answering a constant at /NAME, in the ranker's configuration
    with `replicas` replicas. It reserves no CPU (the ranker's replicas hold the host's), so both deploy."""
    from fastapi import FastAPI
    from ray import serve

    noop_api = FastAPI()

    @serve.deployment(max_ongoing_requests=serve_cfg.max_ongoing_requests, num_replicas=replicas, ray_actor_options={"num_cpus": 0},
                      logging_config={"enable_access_log": serve_cfg.access_log, "log_level": "WARNING"})
    @serve.ingress(noop_api)
    class Noop:
        @noop_api.post("/v1/rank")
        async def rank(self) -> dict[str, list[Any]]:
            return {"candidates": []}

    serve.start(http_options={"host": serve_cfg.host, "port": serve_cfg.port})
    serve.run(Noop.bind(), name=name, route_prefix=f"/{name}", blocking=False)  # type: ignore[attr-defined]


def run(a: argparse.Namespace) -> dict[str, Any]:
    from omegaconf import OmegaConf
    from ray import serve

    from adsfm.contract.cluster import init_ray
    from adsfm.serving import app as serve_app

    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: `apt-get install wrk` (scripts/setup_venv.sh does as root)")
    root = Path(tempfile.mkdtemp(prefix="adsfm-bench-serve-"))
    models = {"a": setup(root, [], "bench-serve"),
              "b": setup(root, ["experiment=movielens_hstu", "data.history.length=200"], "bench-serve-hstu", max_steps=40)}
    a_rows, b_rows = holdout_rows(models["a"][0]), holdout_rows(models["b"][0], full_history=200)
    streams = {"a": requests_at(models["a"][0], a_rows, 100, seed=1),
               "b": requests_at(models["b"][0], b_rows, 500, seed=2),
               "a_returning": requests_at(models["a"][0], a_rows[:: max(1, len(a_rows) // 64)][:64], 100, seed=3)}
    files = {}
    for name, bodies in streams.items():
        files[name] = root / f"{name}.bodies"
        files[name].write_bytes(b"\n".join(bodies) + b"\n")
    print(f"streams: A {len(streams['a'])} holdout moments in time order, B {len(streams['b'])} (200-event histories), "
          f"A returning: {len(streams['a_returning'])} moments repeated", flush=True)

    init_ray(None)
    cfg = models["a"][0]
    cfg.serve.port = free_port()
    cfg.serve.num_replicas = a.replicas
    # The floor is the no-op's best: with the ranker's replicas, and with one (on a small host more
    # replicas of a no-op only share the same cores with more processes).
    noops = {"noop": a.replicas} if a.replicas == 1 else {"noop": a.replicas, "noop1": 1}
    for name, n in noops.items():
        deploy_noop(cfg.serve, name, n)
    base = f"http://{cfg.serve.host}:{cfg.serve.port}"
    values: dict[str, float] = {}
    table: list[tuple[str, str, str, dict[str, Any]]] = []
    naive: subprocess.Popen[bytes] | None = None
    generation = 0
    plan = [("a", "a", list(a.concurrency)), ("a", "a_returning", [max(a.concurrency)]), ("b", "b", list(a.concurrency))]
    try:
        for wl in ("a", "b"):
            wl_cfg, ckpt, uri = models[wl]
            name_ = wl_cfg.export.model_name
            serve_cfg = OmegaConf.merge(cfg.serve, {"model_name": name_})
            serve_app.start(serve_cfg, uri, name="adsfm")  # type: ignore[arg-type]
            naive_port = free_port()
            naive = subprocess.Popen([sys.executable, str(Path(__file__).with_name("naive_server.py")),
                                      str(root / name_ / "config.yaml"), str(ckpt), str(naive_port), str(os.cpu_count() or 1)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            servers = {"adsfm": f"{base}/v1/rank", **{n: f"{base}/{n}/v1/rank" for n in noops},
                       "naive": f"http://127.0.0.1:{naive_port}/v1/rank"}
            _wait_http(f"{base}/healthz")
            _wait_http(f"http://127.0.0.1:{naive_port}/healthz")
            for url in servers.values():  # warm-up: connections, first-call costs (the caches are emptied below)
                wrk_point(url, files[wl], 4, 1.0)
            for wl_, stream, levels in plan:
                if wl_ != wl:
                    continue
                suffix = {"a": "", "b": "_b", "a_returning": "_returning"}[stream]
                for c in levels:
                    runs: dict[str, list[dict[str, float]]] = {n: [] for n in servers}
                    for _ in range(a.runs):
                        for name, url in servers.items():
                            if name in noops and stream == "a_returning":
                                continue
                            if name == "adsfm":  # every point starts as cold as real traffic finds it
                                generation += 1
                                # the same app with a new knob: every replica's reconfigure, no restart
                                serve_app.start(serve_cfg, uri, name="adsfm", knobs={"cache_generation": generation})  # type: ignore[arg-type]
                                before = cache_counts(base, a.replicas)
                            r = wrk_point(url, files[stream], c, a.seconds)
                            if name == "adsfm":
                                after = cache_counts(base, a.replicas)
                                hits, misses = after[0] - before[0], after[1] - before[1]
                                r["cache_hit_rate"] = hits / max(hits + misses, 1.0)
                            runs[name].append(r)
                    for name, rs in runs.items():
                        if not rs:
                            continue
                        agg = _aggregate(rs)
                        for k, v in agg.items():
                            values[f"{name}_{k}_c{c}{suffix}"] = v
                        table.append((stream, name, f"c{c}", agg))
                        hit = f"  cache hits {agg['cache_hit_rate']:.1%}" if "cache_hit_rate" in agg else ""
                        print(f"  {stream:<12} {name:<6} c{c:<3} p50 {agg['p50_ms']:7.2f}  p99 {agg['p99_ms']:7.2f} "
                              f"[{agg['p99_ms_min']:.2f}, {agg['p99_ms_max']:.2f}] ms  {agg['qps']:7.1f} "
                              f"[{agg['qps_min']:.1f}, {agg['qps_max']:.1f}] req/s  errors {agg['errors']:.0f}{hit}", flush=True)
            naive.terminate()
            naive.wait()
            naive = None
            serve_app.stop("adsfm")
    finally:
        if naive is not None:
            naive.terminate()
        serve.shutdown()
    top = max(a.concurrency)
    values["cache_hit_rate_a"] = statistics.median(values[f"adsfm_cache_hit_rate_c{c}"] for c in a.concurrency)
    values["cache_hit_rate_b"] = statistics.median(values[f"adsfm_cache_hit_rate_c{c}_b"] for c in a.concurrency)
    values["cache_hit_rate_a_returning"] = values[f"adsfm_cache_hit_rate_c{top}_returning"]
    ratios = {}
    for suffix in ("", "_b", "_returning"):
        ratios[f"adsfm_vs_naive_qps_c{top}{suffix}"] = values[f"adsfm_qps_c{top}{suffix}"] / values[f"naive_qps_c{top}{suffix}"]
        ratios[f"naive_vs_adsfm_p99_c{top}{suffix}"] = values[f"naive_p99_ms_c{top}{suffix}"] / values[f"adsfm_p99_ms_c{top}{suffix}"]
    for suffix in ("", "_b"):
        floor = max(values[f"{n}_qps_c{top}{suffix}"] for n in noops)
        ratios[f"adsfm_vs_noop_qps_c{top}{suffix}"] = values[f"adsfm_qps_c{top}{suffix}"] / floor
    print(f"\n{'stream':<12} {'server':<7} {'load':<5} {'p50 ms':>8} {'p99 ms (min-max)':>22} {'req/s (min-max)':>24} {'errors':>7} {'cache hits':>10}")
    for stream, name, tag, r in table:
        hit = f"{r['cache_hit_rate']:.1%}" if "cache_hit_rate" in r else "-"
        print(f"{stream:<12} {name:<7} {tag:<5} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} ({r['p99_ms_min']:>5.2f}-{r['p99_ms_max']:<6.2f}) "
              f"{r['qps']:>8.1f} ({r['qps_min']:>6.1f}-{r['qps_max']:<6.1f}) {r['errors']:>7.0f} {hit:>10}")
    print()
    for k, v in ratios.items():
        print(f"{k:<34} {v:.2f}")
    return result("serve", {"seconds": a.seconds, "concurrency": a.concurrency, "runs": a.runs, "quick": a.quick,
                            "load_generator": "wrk -t1 (closed loop), Lua body list",
                            "streams": {k: len(v) for k, v in streams.items()},
                            "naive_workers": os.cpu_count(), "noop_replicas": noops,
                            "serve": {k: getattr(cfg.serve, k) for k in ("num_replicas", "max_ongoing_requests", "batch_max_requests",
                                                                          "batch_wait_ms", "user_cache_size", "intra_op_threads")},
                            "ray_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE")}}, values, ratios)


def _aggregate(runs: list[dict[str, float]]) -> dict[str, float]:
    """The median of each figure over the runs, with the spread (min, max) of p99 and throughput."""
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    for k in ("p99_ms", "qps"):
        out[f"{k}_min"], out[f"{k}_max"] = min(r[k] for r in runs), max(r[k] for r in runs)
    out["errors"] = sum(r["errors"] for r in runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 s per point")
    ap.add_argument("--seconds", type=float, help="duration of each load point (default 8; --quick 3)")
    ap.add_argument("--concurrency", default="1,8,32", help="closed-loop connection counts")
    ap.add_argument("--runs", type=int, default=3, help="runs per point (median and spread reported)")
    ap.add_argument("--replicas", type=int, default=os.cpu_count() or 1,
                    help="adsfm replicas (serve.num_replicas; default one per core, as the naive server's workers)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    a = ap.parse_args()
    a.seconds = a.seconds or (3.0 if a.quick else 8.0)
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    res = run(a)
    write(res, a.out)


if __name__ == "__main__":
    main()
