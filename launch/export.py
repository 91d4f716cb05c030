"""adsfm-export RUN_DIR: checkpoint → bundle (ONNX + tables + manifest), parity check, MLflow model version.

    adsfm-export runs/movielens_dlrm-20261127-101500            # registers; alias challenger
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="adsfm-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a finished adsfm-train run directory")
    ap.add_argument("--checkpoint", type=Path, help="default: the run's checkpoint (its best epoch's with train.early_stopping)")
    ap.add_argument("--model-name", help="registered model name (default: export.model_name of the run)")
    ap.add_argument("--precision", choices=["fp32", "fp16", "int8"], help="table precision (default: export.precision of the run)")
    ap.add_argument("--no-register", action="store_true", help="write and check the bundle only")
    args = ap.parse_args(argv)

    from adsfm.contract.tracking import tracking_uri
    from adsfm.export.bundle import export_bundle, load_run
    from adsfm.export.register import log_and_register

    cfg, result = load_run(args.run_dir.resolve())
    if args.precision:
        cfg.export.precision = args.precision
    ckpt = args.checkpoint or Path(result["checkpoint"])
    bundle = args.run_dir.resolve() / f"bundle-{cfg.export.precision}" if args.precision else args.run_dir.resolve() / "bundle"
    manifest = export_bundle(cfg, ckpt, bundle, train_run_id=result.get("run_id", ""))
    assert manifest.parity is not None
    print(f"[adsfm] bundle {bundle}: parity passed ({manifest.parity.reason()})")
    if args.no_register:
        return
    name = args.model_name or cfg.export.model_name
    mv = log_and_register(bundle, name, tracking_uri(cfg.mlflow.tracking_uri, cfg.run_root), result.get("run_id"))
    print(f"[adsfm] registered {name} version {mv.version} (aliases: {', '.join(mv.aliases) or '-'})")
