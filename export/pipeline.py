"""The whole path in order, as `adsfm-pipeline` (and `make demo`) runs it; returns the summary."""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import numpy as np
import requests
from omegaconf import DictConfig

from adsfm.contract.cluster import init_ray_for
from adsfm.contract.config import AdsfmConfig, as_config
from adsfm.training.job import run_training


def run_pipeline(cfg_in: DictConfig | AdsfmConfig, keep_serving: bool = False) -> dict[str, Any]:
    from adsfm.export.bundle import export_bundle
    from adsfm.export.gate import GateRefused, gated_promote
    from adsfm.export.register import log_and_register
    from adsfm.serving import app as serve_app
    from adsfm.training.data import example_request, load_features, load_frame

    cfg = as_config(cfg_in)
    t_start = time.time()
    print("[adsfm] 1/4 train", flush=True)
    tr = run_training(cfg)

    print("[adsfm] 2/4 export + parity check", flush=True)
    bundle = tr.run_dir / "bundle"
    manifest = export_bundle(cfg, tr.checkpoint, bundle, train_run_id=tr.run_id)
    assert manifest.parity is not None

    print("[adsfm] 3/4 register + promote", flush=True)
    mv = log_and_register(bundle, cfg.export.model_name, tr.tracking_uri, tr.run_id)
    try:
        report = gated_promote(
            cfg.export.model_name, tr.tracking_uri, str(mv.version), cfg.export.gate, tr.run_dir / "gate",
            reason=f"adsfm-pipeline run {tr.run_dir.name}",
        )
        promoted = True
    except GateRefused as e:  # the champion keeps serving; the new version stays challenger
        report, promoted = e.report, False
    print(report.table(), flush=True)

    print("[adsfm] 4/4 serve + rank over HTTP", flush=True)
    init_ray_for(cfg)
    url = serve_app.start(cfg.serve, tr.tracking_uri)
    fs = load_features(cfg.data, cfg.model.tables)
    df, _ = load_frame(cfg.data)
    row = int(fs.holdout_idx[0])
    # 100 candidates from the catalogue, the item this user actually rated next among them.
    catalogue = np.array(sorted(fs.item_store) or ["0"])
    picks = np.random.default_rng(0).choice(catalogue, size=min(99, len(catalogue)), replace=False).tolist()
    actual = str(df[manifest.item_column].iloc[row]) if manifest.item_column else picks[0]
    req = example_request(df, fs.spec, row, [actual, *[p for p in picks if p != actual]][:100])
    try:
        answer, latencies = _rank_over_http(url, req)
    finally:
        if not keep_serving:
            serve_app.stop()
    summary = {
        "holdout_auc": tr.holdout["auc"],
        "holdout_logloss": tr.holdout["logloss"],
        "holdout_ne": tr.holdout["ne"],
        "parity_max_abs_diff": manifest.parity.max_abs_diff,
        "model_name": cfg.export.model_name,
        "model_version": str(mv.version),
        "alias": "champion" if promoted else "challenger",
        "promoted": promoted,
        "rank_latency_ms": statistics.median(latencies),
        "rank_latency_ms_p_max": max(latencies),
        "rank_candidates": len(req["candidates"]),
        "top_items": [c["item"] for c in answer["candidates"][:5]],
        "served_version": answer["model_version"],
        "train_samples_per_second": tr.raw["samples_per_second"],
        "train_run_id": tr.run_id,
        "tracking_uri": tr.tracking_uri,
        "run_dir": str(tr.run_dir),
        "wall_seconds": time.time() - t_start,
    }
    if cfg.data.labels:  # several tasks: each one's holdout figures, and what the service ranks by
        summary["tasks"] = {t.name: {k: tr.holdout[f"{t.name}_{k}"] for k in ("auc", "logloss", "ne", "calibration")}
                            for t in cfg.data.labels}
        summary["rank_by"] = answer.get("rank_by")
    if "baseline" in tr.raw:  # train.baseline=true: does the model beat logistic regression?
        summary["baseline_holdout_auc"] = tr.raw["baseline"]["baseline_holdout_auc"]
        summary["holdout_auc_vs_baseline"] = tr.raw["baseline"]["holdout_auc_vs_baseline"]
    path = tr.run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=1))
    print(_table(summary))
    print(f"[adsfm] summary: {path}")
    return summary


def _rank_over_http(url: str, req: dict[str, Any], n: int = 20) -> tuple[dict[str, Any], list[float]]:
    """One warm-up then n timed requests (client-side latency, HTTP included)."""
    deadline = time.time() + 60
    while True:
        try:
            requests.get(f"{url}/healthz", timeout=5).raise_for_status()
            break
        except requests.RequestException:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
    latencies = []
    answer: dict[str, Any] = {}
    for i in range(n + 1):
        t0 = time.perf_counter()
        r = requests.post(f"{url}/v1/rank", json=req, timeout=30)
        if r.status_code != 200:
            raise RuntimeError(f"POST {url}/v1/rank answered {r.status_code}: {r.text[:2000]}")
        if i:
            latencies.append((time.perf_counter() - t0) * 1e3)
        answer = r.json()
    return answer, latencies


def _table(s: dict[str, Any]) -> str:
    rows = [
        ("holdout AUC", f"{s['holdout_auc']:.4f}"),
        ("holdout logloss", f"{s['holdout_logloss']:.4f}"),
        ("holdout NE", f"{s['holdout_ne']:.4f}"),
        *((f"  task {t}", f"AUC {m['auc']:.4f}, logloss {m['logloss']:.4f}, calibration {m['calibration']:.3f}")
          for t, m in s.get("tasks", {}).items()),
        *([("ranked by", s["rank_by"])] if s.get("rank_by") else []),
        *([("vs logistic regression", f"AUC {s['holdout_auc_vs_baseline']:+.4f} (baseline {s['baseline_holdout_auc']:.4f})")]
          if "holdout_auc_vs_baseline" in s else []),
        ("parity max |diff|", f"{s['parity_max_abs_diff']:.2e}"),
        ("registered model", f"{s['model_name']} v{s['model_version']} @{s['alias']}"),
        ("served by version", s["served_version"]),
        (f"rank 1 user x {s['rank_candidates']} over HTTP", f"{s['rank_latency_ms']:.1f} ms (median of 20)"),
        ("top items", ", ".join(str(i.get("item_id", i)) for i in s["top_items"])),
        ("train throughput", f"{s['train_samples_per_second']:.0f} samples/s"),
        ("wall time", f"{s['wall_seconds']:.0f} s"),
    ]
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 40)
    return "\n".join([line, "adsfm pipeline summary", line, *(f"{k:<{w}}  {v}" for k, v in rows), line])


