"""Continuous training in a process of its own (a gloo world of one), for tests that kill it:

    python -m tests.integration.continuous CONFIG.json

CONFIG.json: {"cfg": <AdsfmConfig>, "bundle": dir, "checkpoint": dir, "work_dir": dir}."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def run(cfg_json: dict, port: int) -> None:
    import torch.distributed as dist

    from adsfm.contract.config import AdsfmConfig, typed
    from adsfm.contract.delta import DeltaLog
    from adsfm.contract.manifest import Manifest
    from adsfm.export.delta import DeltaPublisher
    from adsfm.training.continuous import ContinuousTrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        cfg = typed(AdsfmConfig, cfg_json["cfg"])
        manifest = Manifest.read(Path(cfg_json["bundle"]))
        work = Path(cfg_json["work_dir"])
        publisher = DeltaPublisher(cfg, manifest, DeltaLog(cfg.continuous.delta_log))
        ContinuousTrainer(cfg, manifest.features, Path(cfg_json["checkpoint"]), work, publisher).run()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    from tests.conftest import free_port

    run(json.loads(Path(sys.argv[1]).read_text()), free_port())
