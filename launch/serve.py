"""adsfm-serve: Ray Serve app on 127.0.0.1 scoring with models:/NAME@champion until Ctrl-C.

    adsfm-serve                                  # serve.port=8000, alias champion
    curl -s 127.0.0.1:8000/v1/rank -d '{"user": {"user_id": "196"}, "candidates": [{"item_id": "242"}]}'
"""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig

from training.config import conf_dir, register_configs

register_configs()


@hydra.main(config_path=conf_dir(), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from serving.app import start
    from training.job import as_config, init_ray
    from training.tracking import tracking_uri

    c = as_config(cfg)
    init_ray(c.cluster.address, c.cluster.num_cpus, c.cluster.serve_ingress)
    url = start(c.serve, tracking_uri(c.mlflow.tracking_uri, c.run_root))
    print(f"[adsfm] serving {c.serve.model_name}@{c.serve.alias} at {url}/v1/rank (docs: {url}/docs); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def main() -> None:
    _main()
