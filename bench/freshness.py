"""Freshness: continuous training pushing embedding deltas into a live Ray Serve replica.

    python bench/freshness.py [--quick] [--out FILE.json] [--plot PNG] [--interval 1.0] [--runs 3]

One run on this machine, 127.0.0.1 only, through the real commands:
1. `adsfm-train experiment=movielens_dlrm parallel=single` (the champion trains on each user's earlier 80%),
   `adsfm-export --precision int8` (registered: the first version is the champion).
2. The champion on Ray Serve (serve.delta_poll_s=0.2), and `adsfm-continuous` following an event directory,
   publishing a delta every second.
3. Replay: the holdout's events in global time order, --events-per-file to a file, a file landing every
   --interval seconds (an accelerated clock). Before a file lands, each of its events is scored over HTTP
   by the live replica (progressive validation: the score before the event is trained on) and in process
   by the static champion (the same bundle with no deltas).
4. Freshness: the seconds from a file landing to the replica applying the first delta whose source position
   covers it (watched on /metrics), and whether the file's last event's score then differs from its score
   before landing.
5. Replica p99 at concurrency 8 (wrk, 1 user x 100 candidates, holdout moments) while deltas are applied
   against idle. To measure the replica rather than the trainer's CPU, the trainer is stopped first and
   the run's deltas are withdrawn and published again, one every --interval, while wrk runs; --runs times.

6. New ids (`--collisions-only` runs just this part, merged into --out): MovieLens' user and item tables at
   the same size under hashing and under managed collision (LFU eviction), trained in one process
   (training/local.py, the configured optimizers and epochs) with the full vocabulary as the reference.
   The collision rate is the share of the training ids that share a row with another id: under hashing,
   ids whose bucket holds another; under managed collision, ids holding no row at the end of training
   (they share the unknown row). Two sizes: about the vocabulary (the headline keys) and half of it.

Reported: values.freshness_p50_s / freshness_p99_s, ratios.progressive_auc_fresh_vs_static (the two AUCs in
values), ratios.delta_bytes_vs_full (median delta bytes over the int8 bundle's table bytes), values.p99_ms_c8
idle / during deltas and their ratio; values.collision_rate_hash / collision_rate_managed and
holdout_auc_hash / holdout_auc_managed (holdout_auc_vocabulary for reference), and the same with `_half`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import free_port, result, write  # noqa: E402
from bench.serve import _wait_http, holdout_rows, requests_at, wrk_point  # noqa: E402

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
BIN = Path(sys.executable).parent
NAME = "fresh-bench"


def sh(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)


def applied_seq(base: str) -> int:
    import requests

    for line in requests.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("adsfm_delta_applied_seq "):
            return int(float(line.split()[1]))
    return 0


def covering_seq(log: Any, name: str) -> int | None:
    """The first delta whose source position is past the file `name`."""
    for d in log.published():
        f, r, n = str(d.position.get("file", "")), int(d.position.get("row", 0)), int(d.position.get("rows", 0))
        if f > name or (f == name and r >= n):
            return d.seq
    return None


def run(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import requests

    from adsfm.contract.cluster import init_ray
    from adsfm.contract.config import ServeConfig
    from adsfm.contract.delta import DeltaLog
    from adsfm.contract.manifest import Manifest
    from adsfm.export.bundle import load_run
    from adsfm.serving import app as serve_app
    from adsfm.serving.engine import DenseGraphEngine
    from adsfm.training.data import example_request, load_features, load_frame
    from adsfm.training.metrics import ranking_metrics

    root = Path(a.work or tempfile.mkdtemp(prefix="adsfm-bench-fresh-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "bench.log"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    print(f"[bench] work in {root}; commands log to {log}", flush=True)

    # 1. the champion
    sh([str(BIN / "adsfm-train"), "experiment=movielens_dlrm", "parallel=single", f"run_root={root}", "train.progress=false",
        f"mlflow.tracking_uri={uri}", f"export.model_name={NAME}", "export.parity_rows=2000", f"run_dir={root / 'run'}"], log)
    run_dir = root / "run"
    sh([str(BIN / "adsfm-export"), str(run_dir), "--precision", "int8"], log)
    cfg, _ = load_run(run_dir)
    bundle = run_dir / "bundle-int8"
    manifest = Manifest.read(bundle)
    full_bytes = sum(t.bytes for t in manifest.tables.values())

    # 2. serving and the continuous trainer
    init_ray(None)
    serve_cfg = ServeConfig(model_name=NAME, port=free_port(), max_candidates=200, reload_interval_s=0.5, delta_poll_s=0.2)
    base = serve_app.start(serve_cfg, uri, name="adsfm")
    _wait_http(f"{base}/healthz", 600)
    events_dir, deltas = root / "events", root / "deltas"
    events_dir.mkdir()
    trainer_log = open(root / "continuous.log", "w")  # noqa: SIM115 - open for the trainer's life
    trainer = subprocess.Popen([str(BIN / "adsfm-continuous"), f"continuous.start_from=models:/{NAME}@champion",
                                f"continuous.source_dir={events_dir}", f"continuous.delta_log={deltas}",
                                f"continuous.publish_every_s={a.publish_every}", "continuous.poll_s=0.1", f"mlflow.tracking_uri={uri}"],
                               stdout=trainer_log, stderr=subprocess.STDOUT, env={**os.environ, "ADSFM_RUNS": str(root)})

    # 3. the events, in time order, with each one's request at its moment (history, features) and label
    fs = load_features(cfg.data)
    df, _ = load_frame(cfg.data)
    rows = holdout_rows(cfg)[: a.events]
    key = fs.spec.item_column
    bodies = [example_request(df, fs.spec, r, [str(df[key].iloc[r])]) for r in rows]
    labels = np.asarray(fs.labels[rows], dtype=np.float64)
    static = DenseGraphEngine(bundle)
    files = [rows[i : i + a.events_per_file] for i in range(0, len(rows), a.events_per_file)]
    fresh_p = np.zeros(len(rows))
    static_p = np.array([float(static.score(b["user"], b["candidates"])[0]) for b in bodies])
    session = requests.Session()

    def score(i: int) -> float:
        r = session.post(f"{base}/v1/rank", json=bodies[i], timeout=30)
        r.raise_for_status()
        return float(r.json()["candidates"][0]["score"])

    delta_log = DeltaLog(deltas)
    landed: dict[int, float] = {}
    probes: dict[int, dict[str, float]] = {}
    stop = threading.Event()

    def watch() -> None:  # the replica's applied delta against each landed file's covering delta
        while not stop.is_set():
            seq = applied_seq(base)
            for k, t0 in list(landed.items()):
                if k in probes:
                    continue
                cover = covering_seq(delta_log, f"events_{k:05d}.parquet")
                if cover is not None and seq >= cover:
                    probes[k] = {"seconds": time.time() - t0, "seq": float(cover)}
            time.sleep(0.1)

    deadline = time.time() + 300
    while "at delta" not in (root / "continuous.log").read_text():  # started: the version tagged, the model loaded
        if trainer.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"adsfm-continuous did not start:\n{(root / 'continuous.log').read_text()[-3000:]}")
        time.sleep(0.2)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    offset = 0
    before: dict[int, float] = {}
    with ThreadPoolExecutor(2) as pool:
        for k, chunk in enumerate(files):
            t_next = time.time() + a.interval
            idx = list(range(offset, offset + len(chunk)))
            fresh_p[idx] = list(pool.map(score, idx))
            before[k] = fresh_p[idx[-1]]
            part = df.iloc[chunk]
            tmp = events_dir / f".events_{k:05d}.tmp"
            part.to_parquet(tmp)
            os.rename(tmp, events_dir / f"events_{k:05d}.parquet")
            landed[k] = time.time()
            offset += len(chunk)
            print(f"[bench] file {k + 1}/{len(files)} landed ({len(chunk)} events); replica at delta {applied_seq(base)}", flush=True)
            time.sleep(max(0.0, t_next - time.time()))
    deadline = time.time() + 120
    while len(probes) < len(files) and time.time() < deadline:
        time.sleep(0.2)
    stop.set()
    watcher.join()
    changed = []
    for k in probes:
        last = offset_of(files, k) + len(files[k]) - 1
        changed.append(score(last) != before[k])
    trainer.send_signal(signal.SIGTERM)
    trainer.wait(60)
    trainer_log.close()

    fresh_m = ranking_metrics(_t(fresh_p), _t(labels))
    static_m = ranking_metrics(_t(static_p), _t(labels))
    infos = delta_log.published()
    seconds = sorted(p["seconds"] for p in probes.values())
    values: dict[str, float] = {
        "events": float(len(rows)), "files": float(len(files)), "deltas": float(len(infos)),
        "freshness_p50_s": float(np.percentile(seconds, 50)) if seconds else float("nan"),
        "freshness_p99_s": float(np.percentile(seconds, 99)) if seconds else float("nan"),
        "freshness_max_s": max(seconds) if seconds else float("nan"),
        "files_covered": float(len(probes)), "probe_scores_changed_share": float(np.mean(changed)) if changed else float("nan"),
        "progressive_auc_fresh": fresh_m["auc"], "progressive_auc_static": static_m["auc"],
        "progressive_logloss_fresh": fresh_m["logloss"], "progressive_logloss_static": static_m["logloss"],
        "delta_bytes_median": float(statistics.median(i.bytes for i in infos)) if infos else float("nan"),
        "delta_rows_median": float(statistics.median(sum(i.rows.values()) for i in infos)) if infos else float("nan"),
        "full_int8_table_bytes": float(full_bytes),
    }

    # 5. replica p99 at c=8: idle, and while the run's deltas are published again one every interval
    load = root / "load.jsonl"
    load.write_bytes(b"\n".join(requests_at(cfg, holdout_rows(cfg)[-2000:], 100, seed=1)))
    idle, busy = [], []
    for _ in range(a.runs):
        idle.append(wrk_point(f"{base}/v1/rank", load, 8, a.seconds))
        busy.append(republish_under_load(delta_log, base, load, a))
    values["p99_ms_c8_idle"] = statistics.median(r["p99_ms"] for r in idle)
    values["p99_ms_c8_deltas"] = statistics.median(r["p99_ms"] for r in busy)
    values["p99_ms_c8_idle_min"], values["p99_ms_c8_idle_max"] = min(r["p99_ms"] for r in idle), max(r["p99_ms"] for r in idle)
    values["p99_ms_c8_deltas_min"], values["p99_ms_c8_deltas_max"] = min(r["p99_ms"] for r in busy), max(r["p99_ms"] for r in busy)
    values["deltas_applied_per_load_run"] = statistics.median(r["applied"] for r in busy)
    values["load_errors"] = float(sum(r["errors"] for r in idle + busy))
    serve_app.stop("adsfm")
    print("[bench] 6. new ids: hashed and managed tables at the same size", flush=True)
    new_ids, new_ids_config = collisions()
    values.update(new_ids)
    ratios = {
        "progressive_auc_fresh_vs_static": fresh_m["auc"] / static_m["auc"],
        "delta_bytes_vs_full": values["delta_bytes_median"] / full_bytes,
        "p99_c8_deltas_vs_idle": values["p99_ms_c8_deltas"] / values["p99_ms_c8_idle"],
    }
    for k, v in {**values, **ratios}.items():
        print(f"  {k:<36} {v:,.4g}", flush=True)
    if a.plot:
        plot(probes, seconds, a.plot)
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    return result("freshness", {"events": a.events, "events_per_file": a.events_per_file, "interval_s": a.interval,
                                "publish_every_s": a.publish_every, "runs": a.runs, "seconds": a.seconds,
                                "load_generator": "wrk -t1 -c8 (closed loop), 1 user x 100 candidates, holdout moments",
                                "delta_poll_s": 0.2, "precision": "int8", "collisions": new_ids_config}, values, ratios)


SIZES = {"": {"user_id": 1024, "item": 2048}, "_half": {"user_id": 512, "item": 1024}}
"""Table rows per point: MovieLens-100k's training vocabularies are 943 users and 1,614 items."""


def collisions(seeds: tuple[int, ...] = (0, 1, 2)) -> tuple[dict[str, float], dict[str, Any]]:
    """Collision rates and holdout AUCs of hashed and managed user and item tables at the same sizes: the
    median over `seeds` (training's initialization and batch order), with the smallest and largest."""
    runs = [_collisions(seed) for seed in seeds]
    values: dict[str, float] = {}
    for k in runs[0][0]:
        got = [r[0][k] for r in runs]
        values[k] = statistics.median(got)
        if k.startswith("holdout_auc"):
            values[f"{k}_min"], values[f"{k}_max"] = min(got), max(got)
    return values, {**runs[0][1], "seeds": list(seeds)}


def _collisions(seed: int) -> tuple[dict[str, float], dict[str, Any]]:
    import numpy as np

    from adsfm.contract.config import as_config, compose
    from adsfm.contract.features import managed_id, stable_hash
    from adsfm.training.data import load_features
    from adsfm.training.local import train_local
    from adsfm.training.loop import evaluate

    def trained(tables: dict[str, str]) -> tuple[Any, float]:
        over = [f"+model.tables.{t}={v}" for t, v in tables.items()]
        cfg = as_config(compose(["parallel=single", "train.progress=false", f"train.seed={seed}", *over]))
        fs = load_features(cfg.data, cfg.model.tables)
        model = train_local(cfg, fs, seed=seed)
        return fs, float(evaluate(model, fs, fs.holdout_idx, cfg.train.eval_batch_size)["auc"])

    vocab_fs, vocab_auc = trained({})
    keys = {t: vocab_fs.spec.tables[t].vocab for t in SIZES[""]}  # every training id (min_count 1)
    values: dict[str, float] = {"holdout_auc_vocabulary": vocab_auc}
    for suffix, sizes in SIZES.items():
        _, values[f"holdout_auc_hash{suffix}"] = trained({t: f"{{collision:hash,size:{n}}}" for t, n in sizes.items()})
        fs, values[f"holdout_auc_managed{suffix}"] = trained(
            {t: f"{{collision:managed,size:{n},eviction:lfu}}" for t, n in sizes.items()})
        shared_hash = shared_managed = 0
        for t, n in sizes.items():
            buckets = np.array([stable_hash(k, n) for k in keys[t]])
            _, inverse, counts = np.unique(buckets, return_inverse=True, return_counts=True)
            shared_hash += int((counts[inverse] > 1).sum())
            assert fs.managed is not None
            held = set(fs.managed.slot_keys(t).tolist())
            homeless = sum(managed_id(k) not in held for k in keys[t])
            shared_managed += homeless if homeless > 1 else 0
            values[f"collision_rate_hash_{t}{suffix}"] = float((counts[inverse] > 1).mean())
            values[f"collision_rate_managed_{t}{suffix}"] = homeless / len(keys[t]) if homeless > 1 else 0.0
        total = sum(len(keys[t]) for t in sizes)
        values[f"collision_rate_hash{suffix}"] = shared_hash / total
        values[f"collision_rate_managed{suffix}"] = shared_managed / total
    config = {"tables": SIZES, "eviction": "lfu", "ids": {t: len(k) for t, k in keys.items()}, "trainer": "training/local.py"}
    return values, config


def offset_of(files: list[list[int]], k: int) -> int:
    return sum(len(f) for f in files[:k])


def _t(x: Any) -> Any:
    import torch

    return torch.as_tensor(x, dtype=torch.float64)


def republish_under_load(log: Any, base: str, load: Path, a: argparse.Namespace) -> dict[str, float]:
    """Withdraw every delta (the replica goes back to its base), then publish them again one every
    --interval while wrk loads the replica; returns wrk's figures and how many deltas the replica applied."""
    infos = log.published()
    payloads = [(i, log.tables(i)) for i in infos]
    log.rollback(0)
    deadline = time.time() + 30
    while applied_seq(base) != 0 and time.time() < deadline:
        time.sleep(0.1)
    start = applied_seq(base)
    done = threading.Event()

    def publish() -> None:
        for info, tables in payloads:
            if done.wait(a.interval):
                return
            log.publish(info.model_copy(update={"published_at": 0.0}), tables)

    t = threading.Thread(target=publish)
    t.start()
    r = wrk_point(f"{base}/v1/rank", load, 8, a.seconds)
    done.set()
    t.join()
    r["applied"] = float(applied_seq(base) - start)
    # leave the log whole for the next run
    for info, tables in payloads[len(log.published()):]:
        log.publish(info, tables)
    return r


def plot(probes: dict[int, dict[str, float]], seconds: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ks = sorted(probes)
    ax.plot(ks, [probes[k]["seconds"] for k in ks], "o-", ms=3)
    ax.axhline(30, color="grey", ls="--", lw=1, label="target p99 30 s")
    ax.set_xlabel("event file (landing order)")
    ax.set_ylabel("landing -> replica applied (s)")
    ax.set_title(f"freshness: p50 {statistics.median(seconds):.1f} s, max {max(seconds):.1f} s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2,000 events, 1 load run of 5 s")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--events", type=int, default=8000, help="holdout events replayed, in time order")
    ap.add_argument("--events-per-file", type=int, default=250)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between files landing (and republished deltas)")
    ap.add_argument("--publish-every", type=float, default=1.0, help="continuous.publish_every_s")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per wrk run")
    ap.add_argument("--work", help="work directory (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--collisions-only", action="store_true", help="only part 6, merged into --out's figures")
    a = ap.parse_args()
    if a.collisions_only:
        import json

        values, config = collisions()
        for k, v in values.items():
            print(f"  {k:<40} {v:,.4g}", flush=True)
        old = json.loads(a.out.read_text()) if a.out and a.out.exists() else result("freshness", {}, {}, {})
        old["values"].update(values)
        old["config"]["collisions"] = config
        write(old, a.out)
        return
    if a.quick:
        a.events, a.runs, a.seconds = 2000, 1, 5.0
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: `apt-get install wrk` (scripts/setup_venv.sh does as root)")
    write(run(a), a.out)


if __name__ == "__main__":
    main()
