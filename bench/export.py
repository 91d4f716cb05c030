"""Export precision benchmark: fp32 vs fp16 vs int8 tables on the MovieLens DLRM, in one run.

    python bench/export.py [--quick] [--out FILE.json] [--dims 16,64]

For each embedding dim: train once (single process), checkpoint, export the same checkpoint at each
precision, and measure table bytes, export time, holdout AUC of the bundle and its drop against fp32
(eager model and fp32 bundle), and in-process scoring latency for 1 user x 100 candidates.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# `python bench/export.py` puts bench/ first on sys.path, where this file would shadow the export package.
sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import result, write  # noqa: E402


def run(quick: bool, dims: list[int]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from adsfm.contract.config import as_config, compose
    from adsfm.export.bundle import export_bundle
    from adsfm.export.gate import holdout_columns, scoring_latency
    from adsfm.serving.engine import DenseGraphEngine
    from adsfm.training.checkpoint import save_checkpoint
    from adsfm.training.data import load_features
    from adsfm.training.local import train_local

    values: dict[str, float] = {}
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="adsfm-bench-export-"))
    epochs = 1 if quick else 3
    for dim in dims:
        cfg = as_config(compose([f"model.embedding_dim={dim}", f"model.dense_arch=[64,{dim}]", f"train.epochs={epochs}"]))
        fs = load_features(cfg.data)
        t0 = time.perf_counter()
        model = train_local(cfg, fs)
        train_s = time.perf_counter() - t0
        ckpt = save_checkpoint(model, tmp / f"d{dim}" / "checkpoints" / "step_0")
        per: dict[str, dict[str, float]] = {}
        for precision in ("fp32", "fp16", "int8"):
            c = OmegaConf.merge(cfg, {"export": {"precision": precision}})
            t0 = time.perf_counter()
            m = export_bundle(c, ckpt, tmp / f"d{dim}" / precision)  # type: ignore[arg-type]
            export_s = time.perf_counter() - t0
            assert m.parity is not None
            engine = DenseGraphEngine(tmp / f"d{dim}" / precision)
            cols, _ = holdout_columns(m)
            p50, p99 = scoring_latency(engine, cols, 100, 50 if quick else 300)
            per[precision] = {
                "bytes": float(sum(t.bytes for t in m.tables.values())),
                "export_s": export_s,
                "auc": m.parity.auc_bundle,
                "auc_eager": m.parity.auc_eager,
                "drop_vs_eager": m.parity.auc_drop,
                "p50_ms": p50,
                "p99_ms": p99,
            }
        for precision, r in per.items():
            drop_vs_fp32 = per["fp32"]["auc"] - r["auc"]
            rows.append((dim, precision, r["bytes"], per["fp32"]["bytes"] / r["bytes"], r["export_s"], r["auc"], drop_vs_fp32, r["p50_ms"], r["p99_ms"]))
            sfx = "" if dim == dims[0] else f"_d{dim}"
            values[f"{precision}_table_bytes{sfx}"] = r["bytes"]
            values[f"{precision}_export_s{sfx}"] = r["export_s"]
            values[f"{precision}_holdout_auc{sfx}"] = r["auc"]
            values[f"{precision}_auc_drop{sfx}"] = drop_vs_fp32
            values[f"{precision}_auc_drop_vs_eager{sfx}"] = r["drop_vs_eager"]
            values[f"{precision}_score_p50_ms_n100{sfx}"] = r["p50_ms"]
            values[f"{precision}_score_p99_ms_n100{sfx}"] = r["p99_ms"]
        values[f"train_s_d{dim}"] = train_s
    d0 = dims[0]
    ratios = {"fp32_bytes_vs_int8": values["fp32_table_bytes"] / values["int8_table_bytes"],
              "fp32_bytes_vs_fp16": values["fp32_table_bytes"] / values["fp16_table_bytes"]}
    for dim in dims[1:]:
        ratios[f"fp32_bytes_vs_int8_d{dim}"] = values[f"fp32_table_bytes_d{dim}"] / values[f"int8_table_bytes_d{dim}"]
    head = f"{'dim':>4} {'precision':<9} {'table bytes':>12} {'vs fp32':>8} {'export s':>9} {'AUC':>7} {'drop':>9} {'p50 ms':>7} {'p99 ms':>7}"
    print(head)
    print("-" * len(head))
    for dim, prec, b, ratio, ex, auc, drop, p50, p99 in rows:
        print(f"{dim:>4} {prec:<9} {b:>12,.0f} {ratio:>7.2f}x {ex:>9.2f} {auc:>7.4f} {drop:>+9.5f} {p50:>7.2f} {p99:>7.2f}")
    print(f"(drop = fp32 bundle AUC - this bundle's AUC on the {len(load_features(cfg.data).holdout_idx)} holdout rows; "
          f"first dim {d0} is the shipped model; latency: 1 user x 100 candidates in-process)")
    return result("export", {"quick": quick, "dims": dims, "epochs": epochs, "data": "movielens-100k", "model": "dlrm"}, values, ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 epoch, fewer latency samples")
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    ap.add_argument("--dims", default="16,64", help="embedding dims to measure; the first is the shipped model's")
    args = ap.parse_args()
    res = run(args.quick, [int(d) for d in args.dims.split(",")])
    write(res, args.out)


if __name__ == "__main__":
    main()
