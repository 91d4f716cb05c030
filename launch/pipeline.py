"""adsfm-pipeline: train → export + parity → register → promote → serve → one ranking over HTTP → summary.

What `make demo` runs. Takes the same overrides as adsfm-train (e.g. `adsfm-pipeline train.epochs=1`).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from adsfm.contract.config import conf_dir, register_configs

register_configs()


@hydra.main(config_path=conf_dir(), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from adsfm.contract.cluster import quiet_console
    from adsfm.contract.config import as_config

    cfg.run_dir = HydraConfig.get().runtime.output_dir
    config = as_config(cfg)
    quiet_console(config)
    from adsfm.export.pipeline import run_pipeline

    run_pipeline(config)


def main() -> None:
    _main()
