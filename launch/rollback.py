"""adsfm-rollback NAME: move champion back to the version it replaced, in one step."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="adsfm-rollback", description=__doc__)
    ap.add_argument("name", help="registered model name")
    ap.add_argument("--reason", default="", help="recorded in the champion history")
    ap.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else runs/mlflow.db")
    args = ap.parse_args(argv)

    from adsfm.contract.registry import rollback
    from adsfm.contract.tracking import tracking_uri

    old, new = rollback(args.name, tracking_uri(args.tracking_uri, "runs"), args.reason)
    print(f"[adsfm] {args.name}: champion {old} -> {new} (rolled back)")
