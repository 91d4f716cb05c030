"""Ranking models: a sparse arch built on the meta device + a dense arch. They know nothing of parallelism."""
