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


@pytest.fixture(scope="session", autouse=True)
def sweep_key_file(tmp_path_factory):
    """Sweeps sign their state with the user's key (ctal.distributed.signing): tests use their own
    key file, never ~/.config/ctal/sweep.key; subprocesses inherit it through the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CTAL_SWEEP_KEY", raising=False)
        mp.setenv("CTAL_SWEEP_KEY_FILE", str(tmp_path_factory.mktemp("keys") / "sweep.key"))
        yield
