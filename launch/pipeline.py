"""adsfm-pipeline: train → export + parity → register → promote → serve → one ranking over HTTP → summary.

What `make demo` runs. Takes the same overrides as adsfm-train (e.g. `adsfm-pipeline train.epochs=1`).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from training.config import conf_dir, register_configs

register_configs()


@hydra.main(config_path=conf_dir(), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from training.pipeline import run_pipeline

    cfg.run_dir = HydraConfig.get().runtime.output_dir
    run_pipeline(cfg)


def main() -> None:
    _main()
