"""A real local Ray cluster on 127.0.0.1 for the integration tests, started once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    from training.job import init_ray

    init_ray(None, num_cpus=2)
    yield
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_port() -> int:
    """One HTTP port for the session: Ray Serve's proxy keeps the options of its first start."""
    from tests.conftest import free_port

    return free_port()
