"""Shared fixtures and the test tiers.

Tiers: the default run (``python -m pytest -q``) holds the unit tests and the in-process integration
tests on the shared session fixtures below; ``-m slow`` holds what needs its own processes or
minutes (killed workers and drivers, node loss, the installed wheel, the README walk-through, the
demos). A test named by its node id runs whatever its tier; ``-m "slow or not slow"`` runs both.
"""
import os
from pathlib import Path

import pytest

# Ray Train's controller polls its workers every 2 s by default, so each Train run (pretraining, a
# DDP trial) ends up to a poll late: 0.5 s saved ~8 s on one two-worker pretraining test. Set before
# any Ray starts, so in-process Ray and the recipes' subprocesses inherit it; Slurm jobs keep Ray's
# default (tests/test_slurm.py), as a user's would.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def pytest_configure(config):
    named = any("::" in arg for arg in config.args)  # `pytest tests/x.py::test_y` runs test_y
    if not config.option.markexpr and not named:
        config.option.markexpr = "not slow"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance per test session (``ray.init`` costs seconds; DESIGN.md). Workers'
    output stays in their logs (``log_to_driver=False``, as the recipes run without --verbose): an
    actor left dying by one test never prints into a later test's captured stderr. Not bound to
    loopback like the recipes' own local Ray: subprocesses join it at its GCS address."""
    import ray

    if ray.is_initialized():  # another fixture or test already started one: share it
        yield ray
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# -- shared data, built once per session and read-only (a test that changes one copies it first) -------

SYNTHETIC_UTTERANCES = 60  # per layout: enough for a sweep's train/dev/test and held-out speakers


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A 24-utterance train/dev/test Parquet data set written with pyarrow alone (tests/tiny_data.py):
    random frames, for the mechanics rather than the learning."""
    from tiny_data import write_tiny_dataset

    return write_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data", n=24, splits=("train", "dev", "test"))


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory):
    """layout ("librispeech", "iemocap", "mosei") → a synthetic corpus in that layout (eSpeak NG,
    ``SYNTHETIC_UTTERANCES``, seed 0), synthesized on first use."""
    from ctal.corpora.synthetic import synthesize

    root, built = tmp_path_factory.mktemp("corpora"), {}

    def get(layout: str) -> Path:
        if layout not in built:
            synthesize(layout, root / layout, SYNTHETIC_UTTERANCES, seed=0)
            built[layout] = root / layout
        return built[layout]

    return get


@pytest.fixture(scope="session")
def synthetic_data(synthetic_corpus, ray_local, tmp_path_factory):
    """layout → its synthetic corpus preprocessed by the real pipeline (Ray Data; a BPE of 300)."""
    from ctal.config import DataConfig
    from ctal.distributed.preprocess import run_preprocess

    root, built = tmp_path_factory.mktemp("data"), {}

    def get(layout: str) -> Path:
        if layout not in built:
            run_preprocess(layout, synthetic_corpus(layout), root / layout, DataConfig(vocab_size=300), verbose=False)
            built[layout] = root / layout
        return built[layout]

    return get


# -- recipes in process ----------------------------------------------------------------------------------

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


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory) -> Path:
    """A byte-level BPE folder as a release's tokenizer stands in the tests (test_release.write_bpe),
    built once for test_release and test_release_files."""
    from test_release import write_bpe

    return write_bpe(tmp_path_factory.mktemp("bpe"))


@pytest.fixture
def run_recipe(no_ray, capsys):
    """``run_recipe("tune_finetune", *argv)`` → (exit code, stderr): ``pipelines/<name>.py``'s
    ``main(argv)`` in this process, Ray start-up failing the test (``no_ray``)."""
    import importlib

    def run(name: str, *argv) -> tuple[int, str]:
        recipe = importlib.import_module(f"pipelines.{name}")
        capsys.readouterr()
        try:
            code = recipe.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().err

    return run


@pytest.fixture(scope="session", autouse=True)
def sweep_key_file(tmp_path_factory):
    """Sweeps sign their state with the user's key (ctal.distributed.signing): tests use their own
    key file, never ~/.config/ctal/sweep.key; subprocesses inherit it through the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CTAL_SWEEP_KEY", raising=False)
        mp.setenv("CTAL_SWEEP_KEY_FILE", str(tmp_path_factory.mktemp("keys") / "sweep.key"))
        yield


@pytest.fixture(scope="session")
def ssl_models(tmp_path_factory) -> dict[str, Path]:
    """architecture ("wav2vec2", "hubert", "wavlm", "data2vec-audio") → a tiny random encoder folder
    (ctal.upstream.save_random_upstream: layer-norm layout, 2 layers of 32, standard 20 ms CNN)."""
    from ctal.upstream import SUPPORTED, save_random_upstream

    root = tmp_path_factory.mktemp("ssl")
    return {arch: save_random_upstream(root / arch, arch) for arch in sorted(SUPPORTED)}
