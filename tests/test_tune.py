"""Ray Tune sweeps end to end on synthetic corpora (eSpeak NG → preprocess → Parquet), one local Ray.

Search-space validation, a tiny sweep per task, a crashing trial, a sweep whose driver is killed and
resumed, the best checkpoint loading and re-evaluating to its dev metric, and exact resume of the
fine-tuning loop itself.
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ctal.config import ConfigError, DataConfig, FinetuneConfig, load_config
from ctal.corpora.synthetic import synthesize
from ctal.distributed.tune import (PARAMETERS, SweepOptions, load_search_space, load_sweep,
                                   parse_search_space, run_sweep)
from ctal.finetune import TaskData, evaluate, finetune, fold_dirs
from ctal.model import CTALForSequenceClassification

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"emotion": "iemocap", "sentiment": "mosei", "speaker": "librispeech"}
NARROW = ["model.hidden_size=32", "model.num_attention_heads=4", "model.intermediate_size=64",
          "model.num_text_layers=1", "model.num_audio_layers=1", "model.max_audio_positions=200",
          "model.max_position_embeddings=66", "max_frames=80", "epochs=1", "batch_size=8", "lr=1e-3"]


def narrow_config(task, data, *overrides):
    return load_config(FinetuneConfig, [ROOT / "configs" / "finetune.yaml"],
                       [*NARROW, f"task={task}", f"data={data}", *overrides])


@pytest.fixture(scope="session")
def dataset(ray_local, tmp_path_factory):
    """task → Parquet data set of a 60-utterance synthetic corpus in that task's layout (built once)."""
    from ctal.distributed.preprocess import run_preprocess

    root, built = tmp_path_factory.mktemp("corpora"), {}

    def get(task):
        if task not in built:
            layout = LAYOUTS[task]
            synthesize(layout, root / layout, 60, seed=0)
            run_preprocess(layout, root / layout, root / f"{layout}.pq", DataConfig(vocab_size=300), verbose=False)
            built[task] = root / f"{layout}.pq"
        return built[task]

    return get


# -- search spaces ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ({"learning_rate": {"loguniform": [1e-5, 1e-3]}}, "unknown parameter(s) 'learning_rate'"),
    ({"lr": {"normal": [0.0, 1.0]}}, "unknown distribution(s) 'normal'"),
    ({"lr": {"loguniform": [0.0, 1e-3]}}, "need 0 < low < high"),
    ({"lr": {"uniform": [1e-3]}}, "uniform needs [low, high]"),
    ({"lr": {"uniform": [1e-3, 1e-4]}}, "need low < high"),
    ({"lr": {"uniform": [1e-5, 1e-3], "choice": [1e-4]}}, "exactly one of"),
    ({"fusion": {"choice": ["ctal", "concat"]}}, "'concat' is not one of"),
    ({"batch_size": {"choice": [2, 2.5]}}, "batch_size: expected an integer"),
    ({"freeze_layers": {"randint": [0.5, 2]}}, "randint bounds must be integers"),
    ({"epochs": {"choice": []}}, "needs a non-empty list"),
])
def test_search_space_errors_name_the_parameter(spec, message):
    with pytest.raises(ConfigError) as e:
        parse_search_space(spec, "space.yaml")
    assert message in str(e.value) and "space.yaml" in str(e.value)


def test_grid_search_needs_finite_values():
    space = parse_search_space({"lr": {"loguniform": [1e-5, 1e-3]}, "fusion": {"choice": ["ctal"]}})
    with pytest.raises(ConfigError, match="--search grid needs a finite set for lr"):
        space.check("grid")
    space.check("optuna")
    parse_search_space({"lr": {"loguniform": [1e-5, 1e-3], "grid": [1e-5, 1e-4]}}).check("grid")


@pytest.mark.parametrize("task", sorted(LAYOUTS))
def test_shipped_search_spaces_cover_every_parameter_and_fusion_variant(task):
    space = load_search_space(ROOT / "search_spaces" / f"{task}.yaml")
    assert set(space.params) >= set(PARAMETERS) - {"weight_decay", "seed"}
    assert space.params["lr"].dist == "loguniform"
    assert set(space.params["fusion"].args) == {"ctal", "first_token", "mean_pool", "late_concat",
                                                "text_only", "audio_only"}


# -- the fine-tuning loop (no Ray) -----------------------------------------------------------------

def test_finetune_resumed_from_an_epoch_checkpoint_repeats_the_uninterrupted_run(dataset, tmp_path):
    cfg = narrow_config("sentiment", dataset("sentiment"), "epochs=2")
    data = TaskData.load(cfg.data)
    reports = []

    def keep(metrics, ckpt):
        shutil.copytree(ckpt, tmp_path / f"epoch{metrics['epoch']}")
        reports.append(metrics)

    finetune(cfg, data=data, report=keep, log=lambda s: None)
    resumed = []
    finetune(cfg, data=data, resume_from=tmp_path / "epoch1", report=lambda m, c: resumed.append(m),
             log=lambda s: None)
    assert [m["epoch"] for m in resumed] == [2]
    for key in ("train_loss", "dev_mae", "dev_corr"):
        assert resumed[0][key] == reports[1][key]


def test_freeze_layers_beyond_the_model_is_refused(dataset):
    cfg = narrow_config("sentiment", dataset("sentiment"), "freeze_layers=2")
    with pytest.raises(ValueError, match="freeze_layers=2, but the model has 1 text and 1 audio layers"):
        finetune(cfg, log=lambda s: None)


# -- sweeps ----------------------------------------------------------------------------------------

def pipeline(name):
    """A pipelines/<name>.py module, loaded by path (`evaluate` is also a PyPI package's name)."""
    spec = importlib.util.spec_from_file_location(f"pipeline_{name}", ROOT / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(LAYOUTS))
def test_tiny_sweep_per_task_keeps_a_best_checkpoint_that_reevaluates_to_its_dev_metric(
        task, dataset, ray_local, tmp_path, capsys):
    cfg = narrow_config(task, dataset(task))
    space = parse_search_space({"lr": {"loguniform": [3e-4, 3e-3]},
                                "fusion": {"choice": ["ctal", "late_concat"]}})
    result = run_sweep(cfg, space, SweepOptions(num_samples=2, storage=str(tmp_path), name=task, verbose=0))

    metric = {"emotion": "dev_ua", "sentiment": "dev_mae", "speaker": "dev_eer"}[task]
    table = result.table
    assert len(table) == 2 and set(table["status"]) == {"done"}
    assert {"trial", "fusion", "lr", "epochs_run", metric} <= set(table.columns)
    for path in (result.table_csv, result.table_md, *result.plots):
        assert path.is_file() and path.stat().st_size > 0
    assert {p.name for p in result.plots} == {"best_per_fusion.png", "learning_curves.png"}

    best = result.best
    dirs = fold_dirs(result.best_checkpoint)
    assert len(dirs) == (5 if task == "emotion" else 1)
    for d in dirs.values():
        model = CTALForSequenceClassification.from_pretrained(d)
        assert model.config.fusion == best["fusion"]
    metrics, per_fold = evaluate(result.best_checkpoint, role="dev")
    assert metrics[metric[4:]] == pytest.approx(best[metric], abs=1e-6)
    assert pipeline("evaluate").main(["--task", task, "--checkpoint", str(result.best_checkpoint),
                                      "--split", "dev"]) == 0
    out = capsys.readouterr().out
    assert f"{best[metric]:.4f}" in out
    test_metrics, _ = evaluate(result.best_checkpoint, role="test")
    assert set(test_metrics) >= set(metrics)


@pytest.mark.slow
def test_a_crashing_trial_is_reported_and_the_sweep_goes_on(dataset, ray_local, tmp_path):
    cfg = narrow_config("sentiment", dataset("sentiment"))
    space = parse_search_space({"freeze_layers": {"choice": [0, 5]}})
    result = run_sweep(cfg, space, SweepOptions(search="grid", scheduler="fifo", storage=str(tmp_path),
                                                name="crash", verbose=0))
    table = result.table.set_index("freeze_layers")
    assert table.loc[0, "status"] == "done" and table.loc[5, "status"] == "error"
    assert "freeze_layers=5, but the model has 1 text and 1 audio layers" in table.loc[5, "error"]
    assert list(result.errors.values()) == [table.loc[5, "error"]]
    assert result.best["freeze_layers"] == 0 and result.best_checkpoint.is_dir()
    assert "freeze_layers=5" in result.table_md.read_text()


def finished_trials(experiment):
    """Trial ids Tune's saved experiment state marks TERMINATED (empty while it is being written)."""
    try:
        state = json.loads(max(experiment.glob("experiment_state-*.json")).read_text())
    except (ValueError, OSError):  # none yet, or caught mid-write
        return []
    trials = [json.loads(t[0]) for t in state["trial_data"]]
    return [t["trial_id"] for t in trials if t["status"] == "TERMINATED"]


@pytest.mark.slow
def test_a_sweep_killed_after_its_first_trial_resumes_without_rerunning_it(dataset, ray_local, tmp_path, capsys):
    data = dataset("sentiment")
    space = tmp_path / "space.yaml"
    space.write_text("fusion: {choice: [ctal, text_only, audio_only]}\n")
    storage, name = tmp_path / "runs", "killed"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    cmd = [sys.executable, str(ROOT / "pipelines" / "tune_finetune.py"), "--task", "sentiment", "--data", str(data),
           "--space", str(space), "--search", "grid", "--scheduler", "fifo", "--max-concurrent", "1",
           "--storage", str(storage), "--name", name, *NARROW, "epochs=2"]
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    experiment = storage / name
    try:
        # Kill as soon as Tune's saved experiment state records a finished trial while others remain
        # (trial files in the experiment directory are synced together with that state).
        deadline = time.time() + 240
        while time.time() < deadline:
            done = finished_trials(experiment)
            if 1 <= len(done) < 3:
                break
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.1)
        else:
            pytest.fail("no trial finished in time:\n" + (tmp_path / "driver.log").read_text()[-3000:])
    finally:
        # SIGKILL the driver and anything it started (its own process group, by id).
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        log.close()
    def epochs_run(trial):
        lines = (experiment / f"trial_{trial}" / "result.json").read_text().splitlines()
        return [(r["epoch"], r["epoch_s"]) for r in map(json.loads, lines)]

    before = {t: epochs_run(t) for t in done}
    assert all([e for e, _ in runs] == [1, 2] for runs in before.values())

    assert pipeline("tune_finetune").main(["--resume", "--storage", str(storage), "--name", name]) == 0
    assert "best checkpoint:" in capsys.readouterr().out

    table = pd.read_csv(experiment / "results.csv", dtype={"trial": str})
    assert len(table) == 3 and set(table["status"]) == {"done"}
    assert sorted(table["fusion"]) == ["audio_only", "ctal", "text_only"]
    for t, runs in before.items():
        assert set(epochs_run(t)) == set(runs)  # finished before the kill: no epoch trained again
    for t in table["trial"]:
        assert sorted({e for e, _ in epochs_run(t)}) == [1, 2]
    cfg, _, opts = load_sweep(experiment)
    assert cfg.epochs == 2 and opts.max_concurrent == 1


@pytest.mark.slow
def test_a_trial_with_two_workers_runs_data_parallel(dataset, ray_local, tmp_path):
    cfg = narrow_config("sentiment", dataset("sentiment"))
    space = parse_search_space({"fusion": "text_only"})  # leaves the audio stream unused under DDP
    result = run_sweep(cfg, space, SweepOptions(search="random", scheduler="fifo", num_samples=1,
                                                workers_per_trial=2, storage=str(tmp_path), name="ddp",
                                                verbose=0))
    assert list(result.table["status"]) == ["done"]
    metrics, _ = evaluate(result.best_checkpoint, role="dev")
    assert metrics["mae"] == pytest.approx(result.best["dev_mae"], abs=1e-6)
