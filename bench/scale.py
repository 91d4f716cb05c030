"""Scale: Criteo-shaped DLRMs of about 1M, 10M, 100M and 1B embedding parameters, each from files to HTTP
on this machine, with the time and memory of every stage.

    python bench/scale.py [--quick] [--out FILE.json] [--plot bench/results/scale.png] [--points 1e6,1e7,1e8,1e9]

Per point (embedding dim 32; 26 tables whose rows are the Criteo 1TB logs' cardinalities times one factor,
solved so that the tables hold the point's parameters; 2 workers, every table row-wise):
  1. data      `adsfm-data synth`: parquet shards and a holdout shard at those cardinalities.
  2. step      adsfm's training step against TorchRec's DistributedModelParallel driven directly, and
               adsfm under train.pipeline=sparse_dist (TrainPipelineSparseDist): bench/train.py's loops on
               the same layout and the same Zipf batches over the point's tables; 3 runs each in alternating order, the fastest.
  3. train     `adsfm-train experiment=criteo_dlrm parallel=rw2` on the files, one epoch: samples/s end to
               end (reading, featurizing, evaluation included), each worker's peak RSS, the final
               checkpoint's bytes and write seconds, holdout AUC.
  4. load      every table read back from that checkpoint into one process (what export and a resharded
               resume do): seconds.
  5. export    `adsfm-export --no-register` at int8 and at fp32: seconds and the process's peak RSS
               (tables stream one at a time, so the peak should follow the largest table, not the model).
  6. register  the int8 bundle logged and registered in MLflow: seconds.
  7. serve     in process: the scoring engine over the int8 bundle (tables memory-mapped, item rows
               gathered and dequantized per request): load seconds, RSS, p50/p99 of one user x 100
               candidates, each request a different holdout row's user (the user cache never hits).
               Over HTTP: the registered version on Ray Serve, 127.0.0.1: seconds from deployment to
               healthy, the replica's RSS, p50/p99 of the same requests sent one at a time.
Every figure lands in one JSON (`values.<figure>_<point>`), and a log-log plot shows time and memory
against parameters. `--quick` stops at 100M. The 1B point writes about 11 GB (checkpoint 4.1, fp32 and int8 bundles 4.0 and 1.1,
the registered copy 1.1) and peaks near 10 GB of RAM (two training workers of 5 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import free_port, result, write  # noqa: E402

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

DIM = 32
ITEM_COLUMNS = ["cat_2", "cat_3", "cat_10", "cat_11", "int_12"]
"""The columns a request sends per candidate (the ad's); the other 30 come once, with the user."""
BIN = Path(sys.executable).parent


def label(params: float) -> str:
    for unit, div in (("b", 1e9), ("m", 1e6), ("k", 1e3)):
        if params >= div:
            return f"{params / div:g}{unit}"
    return f"{params:g}"


def cardinalities(params: float) -> tuple[float, list[int]]:
    """The synth scale whose tables hold about `params` parameters at DIM, and its cardinalities."""
    from adsfm.training.synth import SynthSpec

    lo, hi = 1e-7, 1.0
    for _ in range(60):  # bisection on a monotone step function
        mid = (lo * hi) ** 0.5
        if sum(SynthSpec(rows=1, scale=mid).cardinalities()) * DIM < params:
            lo = mid
        else:
            hi = mid
    return hi, SynthSpec(rows=1, scale=hi).cardinalities()


def timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run a command to completion: (wall seconds, peak RSS GB of the process and the children it waited for)."""
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        f.write(("\n$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return seconds, usage.ru_maxrss * 1024 / 1e9


def rss_gb(pid: int | str = "self") -> tuple[float, float]:
    """(current, peak) resident memory of a process in GB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024 / 1e9, int(fields["VmHWM"].split()[0]) * 1024 / 1e9


def percentiles(ms: list[float]) -> tuple[float, float]:
    import numpy as np

    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


# ------------------------------------------------------------------------------------------------ stages


def step_figures(cards: list[int], a: argparse.Namespace) -> dict[str, float]:
    """Steady-state samples/s of each training loop on 2 row-wise workers (the faster of `a.step_runs`)."""
    from bench import train as bt

    ns = argparse.Namespace(tables=len(cards), rows=cards, dim=DIM, batch=a.batch, steps=a.steps, warmup=5,
                            sharding="row_wise", quick=a.quick)
    out: dict[str, float] = {}
    loops = ["torchrec_raw", "adsfm", "adsfm_pipelined"]
    for r in range(a.step_runs):
        for loop in loops if r % 2 == 0 else loops[::-1]:
            out[loop] = max(out.get(loop, 0.0), bt.samples_per_s(ns, loop, 2))
            print(f"  step {loop}: {out[loop]:,.0f} samples/s (best so far)", flush=True)
    return out


def requests(holdout: Path, n: int, candidates: int) -> list[dict[str, Any]]:
    """n requests: the user side of n different holdout rows, each with `candidates` other rows' ad sides."""
    import numpy as np
    import pandas as pd

    from adsfm.contract.features import is_missing

    frame = pd.read_parquet(holdout).drop(columns=["label"])
    rng = np.random.default_rng(0)
    out = []
    for i in rng.choice(len(frame), size=min(n, len(frame)), replace=False):
        user = {k: v for k, v in frame.iloc[int(i)].items() if k not in ITEM_COLUMNS and not is_missing(v)}
        picks = frame.iloc[rng.integers(0, len(frame), candidates)][ITEM_COLUMNS].to_dict("records")
        cands = [{k: v for k, v in c.items() if not is_missing(v)} for c in picks]
        out.append({"user": {k: (int(v) if k.startswith("int_") else v) for k, v in user.items()},
                    "candidates": [{k: (int(v) if k.startswith("int_") else v) for k, v in c.items()} for c in cands]})
    return out


def serve_in_process(bundle: Path, bodies: Path, out: Path) -> None:
    """Child process: load the engine, score every request once (cold users), write the figures."""
    t0 = time.perf_counter()
    from adsfm.serving.engine import DenseGraphEngine

    engine = DenseGraphEngine(bundle)
    load_s = time.perf_counter() - t0
    rss_loaded, _ = rss_gb()
    reqs = [json.loads(line) for line in bodies.read_text().splitlines()]
    for r in reqs[:5]:  # first-call costs of ONNX Runtime; these users then leave the measured set
        engine.score(r["user"], r["candidates"])
    ms = []
    for r in reqs[5:]:
        t = time.perf_counter()
        engine.score(r["user"], r["candidates"])
        ms.append((time.perf_counter() - t) * 1e3)
    info = engine.user_cache_info()
    rss, peak = rss_gb()
    p50, p99 = percentiles(ms)
    out.write_text(json.dumps({"load_s": load_s, "rss_loaded_gb": rss_loaded, "rss_gb": rss, "peak_rss_gb": peak,
                               "p50_ms": p50, "p99_ms": p99, "n": len(ms), "cache_hits": info.hits}))


def load_checkpoint_tables(run_dir: Path, out: Path) -> None:
    """Child process: every table of the run's checkpoint read into this process, one at a time."""
    import torch.distributed.checkpoint as dcp

    from adsfm.export.sparse import load_table

    ckpt = Path(json.loads((run_dir / "train_result.json").read_text())["checkpoint"])
    meta = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    keys = [k for k in meta if k.startswith("model.sparse.embedding_bags.") and k.endswith(".weight")]
    t0 = time.perf_counter()
    total = 0
    for k in keys:
        w = load_table(ckpt, k.removeprefix("model."), tuple(meta[k].size))  # type: ignore[union-attr,arg-type]
        total += w.numel()
        del w
    out.write_text(json.dumps({"seconds": time.perf_counter() - t0, "params": total, "tables": len(keys)}))


def serve_http(cfg_overrides: dict[str, Any], uri: str, name: str, reqs: list[dict[str, Any]]) -> dict[str, float]:
    """The registered version on Ray Serve: deployment → healthy seconds, replica RSS, sequential latencies."""
    import requests as http
    from omegaconf import OmegaConf

    from adsfm.contract.cluster import init_ray
    from adsfm.contract.config import ServeConfig
    from adsfm.serving import app as serve_app

    init_ray(None)
    cfg = OmegaConf.merge(OmegaConf.structured(ServeConfig), {"model_name": name, "port": free_port(), **cfg_overrides})
    t0 = time.perf_counter()
    base = serve_app.start(cfg, uri, name="adsfm")  # type: ignore[arg-type]
    deadline = time.time() + 900
    while True:
        try:
            if http.get(f"{base}/healthz", timeout=5).status_code == 200:
                break
        except http.RequestException:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"{base}/healthz not healthy after 900 s")
        time.sleep(0.5)
    load_s = time.perf_counter() - t0
    s = http.Session()
    for r in reqs[:5]:
        s.post(f"{base}/v1/rank", json=r, timeout=60).raise_for_status()
    ms = []
    for r in reqs[5:]:
        t = time.perf_counter()
        resp = s.post(f"{base}/v1/rank", json=r, timeout=60)
        ms.append((time.perf_counter() - t) * 1e3)
        resp.raise_for_status()
    pids = subprocess.run(["pgrep", "-f", "ServeReplica:adsfm"], capture_output=True, text=True).stdout.split()
    rss = max((rss_gb(p)[0] for p in pids), default=float("nan"))
    p50, p99 = percentiles(ms)
    serve_app.stop("adsfm")
    from ray import serve

    serve.shutdown()  # the next point starts Serve afresh, on its own port
    return {"load_s": load_s, "rss_gb": rss, "p50_ms": p50, "p99_ms": p99}


# ------------------------------------------------------------------------------------------------ a point


def point(params: float, root: Path, a: argparse.Namespace, log: Path) -> dict[str, float]:
    from adsfm.export.register import log_and_register

    tag = label(params)
    d = root / tag
    scale, cards = cardinalities(params)
    real = sum(cards) * DIM
    largest_fp32_gb = max(cards) * DIM * 4 / 1e9
    print(f"\n== {tag}: {sum(cards):,} rows x {DIM} = {real:,} parameters (scale {scale:.3g}, largest table "
          f"{max(cards):,} rows = {largest_fp32_gb:.2f} GB fp32)", flush=True)
    v: dict[str, float] = {"params": real, "table_rows": sum(cards), "largest_table_fp32_gb": largest_fp32_gb}

    data = d / "data"
    v["synth_s"], _ = timed([str(BIN / "adsfm-data"), "synth", "--out", str(data), "--rows", str(a.rows), "--scale", repr(scale),
                             "--shards", "2", "--holdout-rows", str(a.holdout_rows), "--formats", "parquet", "--no-progress"], log)
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["cardinalities"] == cards, "synth's cardinalities differ from the ones solved for"

    for loop, sps in step_figures(cards, a).items():
        v[f"step_{loop}_samples_per_s"] = sps

    run = d / "run"
    uri = f"sqlite:///{d / 'mlflow.db'}"  # explicit: MLflow exports the last URI it was set to into the environment
    overrides = [f"mlflow.tracking_uri={uri}",
        "experiment=criteo_dlrm", "parallel=rw2", f"run_root={d}", f"run_dir={run}", "train.progress=false",
        f"model.embedding_dim={DIM}", f"model.dense_arch=[64,{DIM}]", f"train.batch_size={a.batch}",
        f"data.stream.paths=[{','.join(manifest['files']['parquet'])}]",
        f"data.stream.holdout_paths=[{','.join(manifest['holdout']['parquet'])}]",
        f"data.stream.num_embeddings_per_feature=[{','.join(map(str, cards))}]",
        f"data.stream.item_columns=[{','.join(ITEM_COLUMNS)}]",
        f"data.stream.holdout_rows={a.holdout_rows}", "data.stream.stats_rows=50000",
        f"export.model_name=scale-{tag}", "export.parity_rows=2000",
    ]
    v["train_wall_s"], _ = timed([str(BIN / "adsfm-train"), *overrides], log)
    res = json.loads((run / "train_result.json").read_text())
    v["train_samples_per_s"] = res["samples_per_second"]
    v["train_peak_rss_gb_max_worker"] = max(res["peak_rss_bytes"]) / 1e9
    for rank, b in enumerate(res["peak_rss_bytes"]):
        v[f"train_peak_rss_gb_rank{rank}"] = b / 1e9
    v["checkpoint_gb"] = res["checkpoint_bytes"] / 1e9
    v["checkpoint_write_s"] = res["checkpoint_seconds"]
    v["holdout_auc"] = res["holdout"]["auc"]
    v["rows_trained"] = sum(e["trained"] for e in res["epoch_rows"])

    child = d / "child.json"
    timed([sys.executable, __file__, "_load", str(run), str(child)], log)
    v["checkpoint_load_s"] = json.loads(child.read_text())["seconds"]

    for precision in ("int8", "fp32"):
        s, peak = timed([str(BIN / "adsfm-export"), str(run), "--precision", precision, "--no-register"], log)
        bundle = run / f"bundle-{precision}"
        v[f"export_s_{precision}"], v[f"export_peak_rss_gb_{precision}"] = s, peak
        v[f"bundle_gb_{precision}"] = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) / 1e9
    v["export_peak_rss_gb"] = max(v["export_peak_rss_gb_int8"], v["export_peak_rss_gb_fp32"])
    shutil.rmtree(run / "bundle-fp32")  # the fp32 bundle was for its figures; serving takes int8

    t0 = time.perf_counter()
    log_and_register(run / "bundle-int8", f"scale-{tag}", uri, run_id=res["run_id"])
    v["register_s"] = time.perf_counter() - t0

    reqs = requests(Path(manifest["holdout"]["parquet"][0]), a.requests + 5, 100)
    bodies = d / "requests.jsonl"
    bodies.write_text("\n".join(json.dumps(r) for r in reqs))
    timed([sys.executable, __file__, "_serve", str(run / "bundle-int8"), str(bodies), str(child)], log)
    s = json.loads(child.read_text())
    assert s["cache_hits"] == 0, "a user repeated: the in-process latencies would not be cold"
    v.update({"serve_load_s": s["load_s"], "serve_rss_gb": s["rss_gb"], "serve_p50_ms_cold_1x100": s["p50_ms"],
              "serve_p99_ms_cold_1x100": s["p99_ms"]})
    if a.http:
        h = serve_http({}, uri, f"scale-{tag}", reqs)
        v.update({"http_load_s": h["load_s"], "http_replica_rss_gb": h["rss_gb"], "http_p50_ms_cold_1x100": h["p50_ms"],
                  "http_p99_ms_cold_1x100": h["p99_ms"]})
    if not a.keep:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
    for k, x in v.items():
        print(f"  {k:<34} {x:,.4g}", flush=True)
    return v


def plot(values: dict[str, float], tags: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [values[f"params_{t}"] for t in tags]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = [
        ("seconds", [("checkpoint_write_s", "checkpoint write"), ("checkpoint_load_s", "checkpoint load"),
                     ("export_s_int8", "export int8"), ("export_s_fp32", "export fp32"), ("serve_load_s", "replica load"),
                     ("train_wall_s", "adsfm-train, whole run")]),
        ("GB", [("train_peak_rss_gb_max_worker", "train peak RSS (worker)"), ("export_peak_rss_gb", "export peak RSS"),
                ("serve_rss_gb", "serving RSS"), ("checkpoint_gb", "checkpoint"), ("bundle_gb_int8", "int8 bundle"),
                ("largest_table_fp32_gb", "largest table fp32")]),
        ("samples/s  |  ms", [("step_adsfm_samples_per_s", "adsfm step (samples/s)"),
                              ("step_torchrec_raw_samples_per_s", "TorchRec DMP step (samples/s)"),
                              ("serve_p99_ms_cold_1x100", "p99 ms 1x100 in process (cold users)"),
                              ("http_p99_ms_cold_1x100", "p99 ms 1x100 HTTP")]),
    ]
    for ax, (unit, series) in zip(axes, panels, strict=True):
        for key, name in series:
            ys = [values.get(f"{key}_{t}") for t in tags]
            if all(y is not None and y > 0 for y in ys):
                ax.plot(x, ys, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("embedding parameters")
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("adsfm at scale: Criteo-shaped DLRM, dim 32, 2 row-wise workers, 2 cores / 24 GiB (bench/scale.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def run(a: argparse.Namespace) -> dict[str, Any]:
    root = Path(a.work or tempfile.mkdtemp(prefix="adsfm-bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    log = root / "bench.log"
    print(f"work directory {root}; commands' output in {log}", flush=True)
    values: dict[str, float] = {}
    tags = []
    for params in a.points:
        tag = label(params)
        for k, x in point(params, root, a, log).items():
            values[f"{k}_{tag}"] = x
        tags.append(tag)
        if a.out:  # a partial result survives a later point's failure
            write(_result(a, values, tags), a.out)
    res = _result(a, values, tags)
    if a.plot:
        plot(values, tags, a.plot)
    if not a.work:
        shutil.rmtree(root, ignore_errors=True)
    return res


def _result(a: argparse.Namespace, values: dict[str, float], tags: list[str]) -> dict[str, Any]:
    ratios: dict[str, float] = {}
    for t in tags:
        ratios[f"adsfm_vs_torchrec_raw_{t}"] = values[f"step_adsfm_samples_per_s_{t}"] / values[f"step_torchrec_raw_samples_per_s_{t}"]
        ratios[f"pipelined_vs_plain_step_{t}"] = values[f"step_adsfm_pipelined_samples_per_s_{t}"] / values[f"step_adsfm_samples_per_s_{t}"]
        values[f"export_peak_rss_limit_gb_{t}"] = 1.25 * values[f"largest_table_fp32_gb_{t}"] + 1
    config = {"points": tags, "dim": DIM, "layout": "rw2", "rows": a.rows, "holdout_rows": a.holdout_rows, "batch": a.batch,
              "steps": a.steps, "step_runs": a.step_runs, "requests": a.requests, "item_columns": ITEM_COLUMNS,
              "quick": a.quick}
    return result("scale", config, values, ratios)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_serve", "_load"):  # child processes of a point
        if sys.argv[1] == "_serve":
            serve_in_process(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
        else:
            load_checkpoint_tables(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="stop at 100M parameters")
    ap.add_argument("--out", type=Path, help="write the figures as JSON (after every point)")
    ap.add_argument("--plot", type=Path, help="write the log-log plot (PNG)")
    ap.add_argument("--points", help="embedding parameters per point, e.g. 1e6,1e7,1e8,1e9")
    ap.add_argument("--rows", type=int, default=400_000, help="training rows written and trained per point")
    ap.add_argument("--holdout-rows", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=50, help="timed steps of each step loop")
    ap.add_argument("--step-runs", type=int, default=3)
    ap.add_argument("--requests", type=int, default=300, help="cold requests per serving measurement")
    ap.add_argument("--no-http", dest="http", action="store_false", help="skip the Ray Serve measurement")
    ap.add_argument("--keep", action="store_true", help="keep each point's data and checkpoints")
    ap.add_argument("--work", type=Path, help="work directory (default: a temporary one, removed at the end)")
    a = ap.parse_args()
    a.points = [float(p) for p in a.points.split(",")] if a.points else ([1e6, 1e7, 1e8] if a.quick else [1e6, 1e7, 1e8, 1e9])
    write(run(a), a.out)


if __name__ == "__main__":
    main()
