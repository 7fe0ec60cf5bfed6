"""Shared fixtures and the test tiers.

Tiers: the default run (``python -m pytest -q``) holds the unit tests and the in-process integration
tests on the shared session fixtures below; ``-m slow`` holds what needs its own processes or
minutes (killed workers and drivers, node loss, the installed wheel, the README walk-through, the
demos). A test named by its node id runs whatever its tier; ``-m "slow or not slow"`` runs both.
"""
import pytest


def pytest_configure(config):
    named = any("::" in arg for arg in config.args)  # `pytest tests/x.py::test_y` runs test_y
    if not config.option.markexpr and not named:
        config.option.markexpr = "not slow"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance per test session (``ray.init`` costs seconds; DESIGN.md), started as the
    recipes start it (ctal.distributed.console.init_ray): workers' output stays in their logs, so an
    actor left dying by one test never prints into a later test's captured stderr."""
    import ray

    from ctal.distributed.console import init_ray

    if ray.is_initialized():  # another fixture or test already started one: share it
        yield ray
        return
    init_ray(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def no_ray(monkeypatch):
    """For recipes' ``main()`` called in process: starting or joining Ray fails the test, so an exit
    before Ray is proven even when the session's Ray is already up."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started: the recipe should have exited before it")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    return refuse


@pytest.fixture(scope="session", autouse=True)
def sweep_key_file(tmp_path_factory):
    """Sweeps sign their state with the user's key (ctal.distributed.signing): tests use their own
    key file, never ~/.config/ctal/sweep.key; subprocesses inherit it through the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CTAL_SWEEP_KEY", raising=False)
        mp.setenv("CTAL_SWEEP_KEY_FILE", str(tmp_path_factory.mktemp("keys") / "sweep.key"))
        yield
