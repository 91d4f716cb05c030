"""adsfm-serve: Ray Serve app on 127.0.0.1 scoring with models:/NAME@champion until Ctrl-C.

    adsfm-serve                                  # serve.port=8000, alias champion
    curl -s 127.0.0.1:8000/v1/rank -d '{"user": {"user_id": "196"}, "candidates": [{"item_id": "242"}]}'
"""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig

from adsfm.contract.config import conf_dir, register_configs

register_configs()


@hydra.main(config_path=conf_dir(), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from adsfm.contract.cluster import init_ray_for, quiet_console
    from adsfm.contract.config import as_config
    from adsfm.contract.tracking import tracking_uri

    cfg.run_dir = HydraConfig.get().runtime.output_dir
    c = as_config(cfg)
    quiet_console(c)
    from adsfm.serving.app import start

    init_ray_for(c)
    url = start(c.serve, tracking_uri(c.mlflow.tracking_uri, c.run_root))
    print(f"[adsfm] serving {c.serve.model_name}@{c.serve.alias} at {url}/v1/rank (docs: {url}/docs); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def main() -> None:
    _main()
