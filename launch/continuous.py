"""adsfm-continuous: keep a registered model training on new event files, publishing embedding deltas.

    adsfm-continuous continuous.start_from=models:/adsfm-movielens-dlrm@champion continuous.source_dir=events/
    adsfm-continuous ... continuous.publish_every_s=5 continuous.idle_exit_s=60 train.batch_size=256

The model, features and optimizer are the registered version's training run's (its lineage names the
checkpoint); `continuous.*` and `train.*` overrides apply on top. The version is tagged with the delta
log (`adsfm.delta_log`), which replicas serving it follow. Training runs in this one process, with the
run's table sharding types on one rank. Killed, it resumes after the last published delta.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

_USAGE = "usage: adsfm-continuous continuous.start_from=models:/NAME@ALIAS continuous.source_dir=DIR [key=value ...]"


def _split_ref(ref: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (name, alias, version)."""
    body = ref.removeprefix("models:/")
    if body == ref or not body:
        raise ValueError(f"continuous.start_from={ref!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, alias, None
    name, _, version = body.partition("/")
    if not version.isdigit():
        raise ValueError(f"continuous.start_from={ref!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, None, version


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    bad = [a for a in args if "=" not in a or not a.split("=", 1)[0].startswith(("continuous.", "train.", "mlflow."))]
    if bad:
        raise SystemExit(f"adsfm-continuous: {bad}: only continuous.*, train.* and mlflow.* overrides\n{_USAGE}")

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from adsfm.contract.config import AdsfmConfig, ContinuousConfig, typed
    from adsfm.contract.delta import DeltaLog
    from adsfm.contract.registry import alias_version, download_version
    from adsfm.contract.tracking import tracking_uri

    try:
        given = OmegaConf.from_dotlist(args)
        c = typed(ContinuousConfig, given.get("continuous", {}))
    except OmegaConfBaseException as e:  # a misspelt key or a wrong type: said before anything starts
        raise SystemExit(f"adsfm-continuous: {e}\n{_USAGE}") from None
    if not c.start_from or not c.source_dir:
        raise SystemExit(f"adsfm-continuous: continuous.start_from and continuous.source_dir are required\n{_USAGE}")
    if not Path(c.source_dir).is_dir():
        raise SystemExit(f"adsfm-continuous: continuous.source_dir={c.source_dir!r} is not a directory")
    try:
        name, alias, version = _split_ref(c.start_from)
    except ValueError as e:
        raise SystemExit(f"adsfm-continuous: {e}") from None
    uri = tracking_uri(given.get("mlflow", {}).get("tracking_uri"), os.environ.get("ADSFM_RUNS", "runs"))

    # setup: the version's bundle (precision, features) and its training run (model, optimizer, layout)
    from mlflow.tracking import MlflowClient

    from adsfm.contract.manifest import Manifest

    client = MlflowClient(uri)
    if version is None:
        version = alias_version(client, name, alias or "champion")
        if version is None:
            raise SystemExit(f"adsfm-continuous: model {name!r} has no alias {alias!r} in {uri}")
    bundle = download_version(name, version, uri, Path(os.environ.get("ADSFM_RUNS", "runs")) / "continuous-cache")
    manifest = Manifest.read(bundle)
    if manifest.sequence is not None:
        raise SystemExit("adsfm-continuous: sequence (HSTU) bundles take no deltas yet; use a pooled model (dlrm, dcnv2, logreg)")
    checkpoint = Path(manifest.source_checkpoint)
    from adsfm.export.bundle import load_run

    run_cfg, _ = load_run(checkpoint.parent.parent)
    try:
        cfg = typed(AdsfmConfig, OmegaConf.merge(OmegaConf.structured(run_cfg), {k: v for k, v in given.items() if k != "mlflow"}))
    except OmegaConfBaseException as e:
        raise SystemExit(f"adsfm-continuous: {e}\n{_USAGE}") from None
    cfg.parallel.num_workers = 1
    log_dir = Path(cfg.continuous.delta_log or checkpoint.parent.parent / "deltas").resolve()
    cfg.continuous.delta_log = str(log_dir)
    client.set_model_version_tag(name, version, "adsfm.delta_log", str(log_dir))
    print(f"[adsfm] continuous: {name} version {version}, events from {c.source_dir}, deltas into {log_dir}", flush=True)

    # train: one process, a gloo world of one on loopback
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    from adsfm.export.delta import DeltaPublisher
    from adsfm.training.continuous import ContinuousTrainer

    try:
        trainer = ContinuousTrainer(cfg, manifest.features, checkpoint, log_dir, DeltaPublisher(cfg, manifest, DeltaLog(log_dir)))
        published = trainer.run()
        print(f"[adsfm] continuous: stopped after delta {trainer.seq} ({len(published)} published by this process)")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
