"""Shared fixtures."""
import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance per test session (``ray.init`` costs seconds; DESIGN.md)."""
    import ray

    if ray.is_initialized():  # another fixture or test already started one: share it
        yield ray
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
