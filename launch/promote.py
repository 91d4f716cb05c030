"""adsfm-promote NAME [--version V]: gate, then move the champion alias (default: to the challenger).

The gate: parity passed; holdout AUC not below the champion's by more than export.gate.auc_margin, both
measured now on the same holdout; scoring p99 within export.gate.latency_budget_ms. A refusal prints the
reasons and exits 1; --force promotes anyway and is recorded on the version and in the history.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="adsfm-promote", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="registered model name")
    ap.add_argument("--version", help="model version to promote (default: the challenger)")
    ap.add_argument("--reason", default="", help="recorded on the model version and in the champion history")
    ap.add_argument("--force", action="store_true", help="promote even if the gate refuses (recorded)")
    ap.add_argument("--auc-margin", type=float, help="default: export.gate.auc_margin from conf/")
    ap.add_argument("--latency-budget-ms", type=float, help="default: export.gate.latency_budget_ms from conf/")
    ap.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else runs/mlflow.db")
    args = ap.parse_args(argv)

    from adsfm.contract.config import as_config, compose
    from adsfm.contract.tracking import tracking_uri
    from adsfm.export.gate import GateRefused, gated_promote

    cfg = as_config(compose([]))
    gate = cfg.export.gate
    if args.auc_margin is not None:
        gate.auc_margin = args.auc_margin
    if args.latency_budget_ms is not None:
        gate.latency_budget_ms = args.latency_budget_ms
    uri = tracking_uri(args.tracking_uri, cfg.run_root)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            report = gated_promote(args.name, uri, args.version, gate, Path(tmp), force=args.force, reason=args.reason)
        except GateRefused as e:
            print(e.report.table())
            print(f"[adsfm] {e}", file=sys.stderr)
            sys.exit(1)
    print(report.table())
    forced = " (forced past the gate)" if args.force and not report.passed else ""
    print(f"[adsfm] {args.name}: champion -> version {report.version}{forced}")
