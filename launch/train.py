"""adsfm-train: compose the config, validate it, train on Ray.

    adsfm-train                                   # experiment=movielens_dlrm, 2 workers, table-wise
    adsfm-train parallel=rw2 train.epochs=1
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
    from adsfm.training.job import run_training

    result = run_training(config)
    h = result.holdout
    print(f"[adsfm] holdout auc={h['auc']:.4f} logloss={h['logloss']:.4f} ne={h['ne']:.4f}")
    for task in config.data.labels:  # data.labels: every task's own figures (the line above is the first's)
        print(f"[adsfm]   task {task.name}: auc={h[f'{task.name}_auc']:.4f} logloss={h[f'{task.name}_logloss']:.4f} "
              f"ne={h[f'{task.name}_ne']:.4f} calibration={h[f'{task.name}_calibration']:.3f}")
    if "baseline" in result.raw:  # train.baseline=true
        b = result.raw["baseline"]
        print(f"[adsfm] vs logistic regression: auc {b['holdout_auc_vs_baseline']:+.4f}, "
              f"logloss {b['holdout_logloss_vs_baseline']:+.4f}")
    if "early_stopping" in result.raw:
        e = result.raw["early_stopping"]
        print(f"[adsfm] early stopping: best epoch {e['best_epoch']} of {e['epochs_run']} (valid logloss {e['valid_logloss']:.4f})")
    print(f"[adsfm] checkpoint {result.checkpoint}")
    print(f"[adsfm] mlflow run {result.run_id} ({result.tracking_uri})")


def main() -> None:
    _main()


if __name__ == "__main__":  # `python -m launch.train`: how adsfm-submit runs it in the job's working_dir
    main()
