"""adsfm-promote NAME [--version V]: move the champion alias (default: to the challenger)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="adsfm-promote", description=__doc__)
    ap.add_argument("name", help="registered model name")
    ap.add_argument("--version", help="model version to promote (default: the challenger)")
    ap.add_argument("--reason", default="", help="recorded on the model version")
    ap.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else runs/mlflow.db")
    args = ap.parse_args(argv)

    from export.registry import promote
    from training.tracking import tracking_uri

    v = promote(args.name, tracking_uri(args.tracking_uri, "runs"), args.version, args.reason)
    print(f"[adsfm] {args.name}: champion -> version {v}")
