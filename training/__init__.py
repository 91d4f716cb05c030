"""Training side of adsfm: data, models, train loop, metrics, checkpoints, the Ray Train worker."""
