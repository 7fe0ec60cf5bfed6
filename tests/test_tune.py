"""Ray Tune sweeps end to end on synthetic corpora (eSpeak NG → preprocess → Parquet), one local Ray.

Search-space and sweep-setting validation (before Ray starts, also through the recipe), the results
table without Ray, a tiny sweep per task, a crashing trial, a sweep whose driver is killed and
resumed, the best checkpoint loading and re-evaluating to its dev metric, and exact resume of the
fine-tuning loop itself.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ctal.variants import FUSION_VARIANTS

from ctal.config import ConfigError, FinetuneConfig, SweepConfig, load_config
from ctal.distributed.tune import SWEEP_FILE, experiment_location, load_sweep, run_sweep
from ctal.data import TaskData
from ctal.finetune import evaluate, finetune, fold_dirs
from ctal.model import CTALForSequenceClassification
from ctal.report import trial_row, write_results
from ctal.search_space import PARAMETERS, check_sweep, load_search_space, parse_search_space
from sweep_kill import kill_mid_grid

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"emotion": "iemocap", "sentiment": "mosei", "speaker": "librispeech"}
NARROW = ["model.hidden_size=32", "model.num_attention_heads=4", "model.intermediate_size=64",
          "model.num_text_layers=1", "model.num_audio_layers=1", "model.max_audio_positions=200",
          "model.max_position_embeddings=66", "max_frames=80", "epochs=1", "batch_size=8", "lr=1e-3"]


def narrow_config(task, data, *overrides):
    return load_config(FinetuneConfig, [ROOT / "configs" / "finetune.yaml"],
                       [*NARROW, f"task={task}", f"data={data}", *overrides])


@pytest.fixture(scope="session")
def dataset(synthetic_data):
    """task → the shared synthetic corpus of that task's layout, preprocessed (conftest.py)."""
    return lambda task: synthetic_data(LAYOUTS[task])


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
    with pytest.raises(ConfigError, match="search=grid needs a finite set for lr"):
        check_sweep(FinetuneConfig(), space, SweepConfig(search="grid"))
    check_sweep(FinetuneConfig(), space, SweepConfig(search="optuna"))
    check_sweep(FinetuneConfig(), parse_search_space({"lr": {"loguniform": [1e-5, 1e-3], "grid": [1e-5, 1e-4]}}),
                SweepConfig(search="grid"))


@pytest.mark.parametrize("settings, message", [
    ({"num_samples": 0}, "num_samples must be >= 1, got 0"),
    ({"cpus_per_trial": 0.0}, "cpus_per_trial must be > 0"),
    ({"gpus_per_trial": -1.0}, "gpus_per_trial must be >= 0"),
    ({"workers_per_trial": 0}, "workers_per_trial must be >= 1"),
    ({"max_concurrent": 0}, "max_concurrent must be >= 1"),
    ({"reduction_factor": 1}, "reduction_factor must be >= 2"),
    ({"verbose": 4}, "verbose must be 0..3"),
    ({"grace_period": 0}, "grace_period must be >= 1"),
    ({"grace_period": 4}, "grace_period=4: ASHA needs it <= the most epochs a trial runs (3)"),
])
def test_sweep_settings_out_of_range_fail_naming_the_setting(settings, message):
    space = parse_search_space({"epochs": {"choice": [2, 3]}})
    with pytest.raises(ConfigError) as e:
        check_sweep(FinetuneConfig(), space, SweepConfig(**settings))
    assert message in str(e.value)
    if "grace_period" in settings:  # FIFO has no rungs: any grace period is fine there
        check_sweep(FinetuneConfig(), space, SweepConfig(scheduler="fifo", grace_period=4))


def test_every_bad_sweep_setting_is_named_at_once():
    with pytest.raises(ConfigError, match="num_samples must be >= 1.*; max_concurrent must be >= 1"):
        check_sweep(FinetuneConfig(), parse_search_space({"lr": 1e-4}), SweepConfig(num_samples=0, max_concurrent=0))


def test_search_space_and_report_import_without_ray():
    code = "import sys, ctal.search_space, ctal.report; print(sorted({'ray', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_sweep_json_of_an_older_version_still_loads(tmp_path):
    """Sweeps started before SweepConfig stored their settings under "options"."""
    (tmp_path / SWEEP_FILE).write_text(json.dumps({
        "config": {"task": "emotion", "epochs": 2}, "space": {"fusion": {"choice": ["ctal", "text_only"]}},
        "options": {"search": "grid", "scheduler": "fifo", "num_samples": None, "max_concurrent": 1,
                    "storage": "runs/tune", "name": "old", "verbose": 1}}))
    cfg, space, sweep = load_sweep(tmp_path)
    assert cfg.task == "emotion" and cfg.epochs == 2 and set(space.params) == {"fusion"}
    # where it is now, not the recorded runs/tune/old
    assert sweep == SweepConfig(search="grid", scheduler="fifo", max_concurrent=1, name=tmp_path.name,
                                storage=str(tmp_path.parent))


@pytest.mark.parametrize("moved_to", ["path", "file_uri"])
def test_a_moved_sweep_resumes_where_it_is_named_not_where_it_started(tmp_path, moved_to):
    """Issue 15.2: sweep.json records the storage and name it started with; a copy elsewhere must
    resume (and write) at the copy."""
    original = tmp_path / "orig" / "tune" / "emotion"
    original.mkdir(parents=True)
    (original / SWEEP_FILE).write_text(json.dumps({
        "config": {"task": "emotion", "epochs": 2}, "space": {"fusion": "ctal"},
        "sweep": {"search": "grid", "scheduler": "fifo", "storage": str(original.parent), "name": "emotion"}}))
    copy = tmp_path / "bucket" / "tune" / "emotion-copy"
    shutil.copytree(original, copy)
    where = f"file://{copy}" if moved_to == "file_uri" else str(copy)
    _, _, sweep = load_sweep(where)
    assert experiment_location(sweep, "emotion") == where  # resumes at the copy ...
    assert str(original) not in (sweep.storage, experiment_location(sweep, "emotion"))  # ... not the original


def test_results_table_sorts_trials_best_first_and_says_how_each_ended(tmp_path):
    history = lambda maes: pd.DataFrame({"epoch": range(1, len(maes) + 1), "dev_mae": maes, "dev_corr": 0.5})
    trials = [("a", {"fusion": "ctal", "lr": 1e-3}, history([0.9, 0.7, 0.8]), ""),
              ("b", {"fusion": "text_only", "lr": 1e-4}, history([0.6]), ""),
              ("c", {"fusion": "audio_only", "lr": 1e-2}, None, "ValueError: lr | too high")]
    rows, bests = zip(*(trial_row(t, c, h, e, 3, "dev_mae", "min") for t, c, h, e in trials))
    assert [b if b is None else int(b["epoch"]) for b in bests] == [2, 1, None]
    curves = {"a": ("ctal", [1, 2, 3], [0.9, 0.7, 0.8])}
    table, csv_path, md_path, plots = write_results(list(rows), curves, "dev_mae", "min", tmp_path)
    assert list(table["trial"]) == ["b", "a", "c"]
    assert list(table["status"]) == ["stopped early", "done", "error"]
    assert list(table["best_epoch"].fillna(0)) == [1, 2, 0]
    assert pd.read_csv(csv_path, dtype={"trial": str})["trial"].tolist() == ["b", "a", "c"]
    md = md_path.read_text().splitlines()
    assert md[0].startswith("| trial | status | fusion | lr |") and len(md) == 5
    assert "| c | error | audio_only | 0.01 |" in md[4] and "lr \\| too high" in md[4]
    assert {p.name for p in plots} == {"best_per_fusion.png", "learning_curves.png"}


def test_bad_sweep_settings_exit_2_naming_the_key_before_ray_starts(tmp_path, run_recipe, tiny_data):
    base = ["--task", "sentiment", "--data", str(tiny_data), "--storage", str(tmp_path / "runs")]
    cases = {
        "search: 'bogus' is not one of ['optuna', 'random', 'grid']": ["--search", "bogus"],
        "workers_per_trial: expected an integer, got 1.5": ["--workers-per-trial", "1.5"],
        "sweep settings: unknown config key 'grace_perod'": ["sweep.grace_perod=2"],
        "num_samples must be >= 1, got 0": ["--num-samples", "0"],
        "grace_period=3: ASHA needs it <= the most epochs a trial runs (2)": ["sweep.grace_period=3", "epochs=2"],
    }
    for message, argv in cases.items():
        code, err = run_recipe("tune_finetune", *base, *argv)
        assert code == 2 and message in err, (message, err)
    assert not (tmp_path / "runs").exists()


def test_search_space_values_out_of_range_exit_2_naming_the_file_key_and_value_before_ray(tmp_path, run_recipe,
                                                                                         tiny_data):
    """Issue 15 leftovers: candidate values are range-checked against the sweep's config (a negative
    weight decay, a dropout of 1.5, more frozen layers than the model has) and a YAML syntax error is one line
    naming the file and position: all before Ray starts."""
    data = tiny_data
    spaces = {
        "weight_decay: weight_decay=-1.0 is out of range: must be >= 0": "weight_decay: {choice: [0.0, -1]}\n",
        "dropout: model.hidden_dropout_prob=1.5 is out of range: must be in [0, 1)": "dropout: {uniform: [0.1, 1.5]}\n",
        "freeze_layers: freeze_layers=2, but the model has 1 text and 1 audio layers": "freeze_layers: {choice: [0, 2]}\n",
        "fusion: model.fusion: 'concat' is not one of": "fusion: {choice: [ctal, concat]}\n",
        "invalid YAML at line 2, column 1": "lr: {choice: [1.0e-3\n",
        "lr: lr=-1.0 is out of range: must be > 0": "lr: {choice: [-1, 1.0e-3]}\n",
    }
    unpinned = [o for o in NARROW if not o.startswith("lr=")]  # lr=... on the command line takes lr out of the space
    argv = []
    for k, (message, text) in enumerate(spaces.items()):
        (tmp_path / f"space{k}.yaml").write_text(text)
        argv.append(["--task", "sentiment", "--data", str(data), "--space", str(tmp_path / f"space{k}.yaml"),
                     "--storage", str(tmp_path / "runs"), *unpinned])
    for k, (message, args) in enumerate(zip(spaces, argv)):
        code, err = run_recipe("tune_finetune", *args)
        assert code == 2, (message, err)
        assert f"space{k}.yaml: {message}" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_optuna_over_constants_only_exits_2_before_ray(tmp_path, run_recipe, tiny_data):
    """Issue 30 (weak): a space of constants only reached Ray, and Optuna failed there with Ray's own
    "no search space has been defined"."""
    (tmp_path / "space.yaml").write_text("seed: 0\nfusion: ctal\n")
    code, err = run_recipe("tune_finetune", "--task", "sentiment", "--data", tiny_data, "--space",
                           tmp_path / "space.yaml", "--storage", tmp_path / "runs", "--search", "optuna", *NARROW)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"search=optuna needs a distribution to search, and every entry of {tmp_path / 'space.yaml'}" in err, err
    assert not (tmp_path / "runs").exists()
    check_sweep(FinetuneConfig(), parse_search_space({"seed": {"choice": [0, 1]}}), SweepConfig(search="optuna"))


@pytest.mark.parametrize("task", sorted(LAYOUTS))
def test_shipped_search_spaces_cover_every_parameter_and_fusion_variant(task):
    space = load_search_space(ROOT / "search_spaces" / f"{task}.yaml")
    # the upstream's parameters are for waveform data with model.audio_upstream (tests/test_waveform.py)
    assert set(space.params) >= set(PARAMETERS) - {"weight_decay", "seed", "freeze_upstream", "upstream_lr"}
    assert space.params["lr"].dist == "loguniform"
    assert set(space.params["fusion"].args) == set(FUSION_VARIANTS)


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
    result = run_sweep(cfg, space, SweepConfig(num_samples=2, storage=str(tmp_path), name=task, verbose=0))

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
    # check_sweep refuses freeze_layers=5 before Ray starts: skip it (checked=True) to make the trial
    # fail the way a check cannot foresee (a node lost, memory run out), inside Tune
    result = run_sweep(cfg, space, SweepConfig(search="grid", scheduler="fifo", storage=str(tmp_path),
                                               name="crash", verbose=0), checked=True)
    table = result.table.set_index("freeze_layers")
    assert table.loc[0, "status"] == "done" and table.loc[5, "status"] == "error"
    assert "freeze_layers=5, but the model has 1 text and 1 audio layers" in table.loc[5, "error"]
    assert list(result.errors.values()) == [table.loc[5, "error"]]
    assert result.best["freeze_layers"] == 0 and result.best_checkpoint.is_dir()
    assert "freeze_layers=5" in result.table_md.read_text()


@pytest.mark.slow
def test_a_sweep_killed_after_its_first_trial_resumes_without_rerunning_it(dataset, ray_local, tmp_path, capsys):
    data = dataset("sentiment")
    space = tmp_path / "space.yaml"
    space.write_text("fusion: {choice: [ctal, text_only, audio_only]}\n")
    storage, name = tmp_path / "runs", "killed"
    # Tune saves its experiment state every second, not when its "auto" period says (>= 10 s, by
    # which time an idle machine has finished the grid): the kill must land mid-grid.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    cmd = [sys.executable, str(ROOT / "pipelines" / "tune_finetune.py"), "--task", "sentiment", "--data", str(data),
           "--space", str(space), "--search", "grid", "--scheduler", "fifo", "--max-concurrent", "1",
           "--storage", str(storage), "--name", name, *NARROW, "epochs=2"]
    experiment = storage / name
    done = kill_mid_grid(cmd, env, experiment, 3, tmp_path / "driver.log", timeout=240)

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


def test_a_resumed_trial_whose_checkpoint_is_gone_restarts_from_the_newest_left_or_from_scratch(tmp_path, capsys):
    """A driver killed between Tune deleting a checkpoint and saving the state that stops naming it
    left a state that names a deleted checkpoint: the trial resumes from what exists, with a warning."""
    import pyarrow.fs as pafs
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint
    from ray.tune.trainable.function_trainable import wrap_function

    from ctal.distributed.tune import RestoresWhatExists, resumable

    class Trainable:  # what Tune's FunctionTrainable.restore receives
        def restore(self, result):
            self.restored = result

    class Trial(RestoresWhatExists, Trainable):
        pass

    fs, trial_dir = pafs.LocalFileSystem(), tmp_path / "trial_1"
    (trial_dir / "checkpoint_000001").mkdir(parents=True)
    (trial_dir / "checkpoint_000003").mkdir()

    def restore(name):
        t = Trial()
        t.restored = "nothing"
        t.restore(_TrainingResult(checkpoint=Checkpoint(str(trial_dir / name), filesystem=fs), metrics={}))
        return t.restored

    assert restore("checkpoint_000003").checkpoint.path == str(trial_dir / "checkpoint_000003")
    assert "warning" not in capsys.readouterr().err
    assert restore("checkpoint_000004").checkpoint.path == str(trial_dir / "checkpoint_000003")
    assert "checkpoint_000004 is gone: resuming the trial from" in capsys.readouterr().err
    for name in ("checkpoint_000001", "checkpoint_000003"):
        (trial_dir / name).rmdir()
    assert restore("checkpoint_000004") == "nothing"
    assert "restarting the trial from scratch" in capsys.readouterr().err
    # the sweeps' and the ablations' trainables carry the mixin into Tune's class
    assert issubclass(wrap_function(resumable(lambda config: None)), RestoresWhatExists)


# -- 15.1: --resume loads only state this user's sweeps signed --------------------------------------

def test_the_sweep_key_is_made_once_readable_only_by_its_user(tmp_path, monkeypatch):
    from ctal.distributed.signing import UntrustedStateError, sweep_key

    monkeypatch.setenv("CTAL_SWEEP_KEY_FILE", str(tmp_path / "cfg" / "sweep.key"))
    key = sweep_key()
    assert (tmp_path / "cfg" / "sweep.key").stat().st_mode & 0o777 == 0o600
    assert sweep_key() == key and len(key) >= 32
    (tmp_path / "cfg" / "sweep.key").chmod(0o644)
    with pytest.raises(UntrustedStateError, match="readable by other users.*chmod 600"):
        sweep_key()
    monkeypatch.setenv("CTAL_SWEEP_KEY", "from the environment")
    assert sweep_key() == b"from the environment"
    monkeypatch.delenv("CTAL_SWEEP_KEY")
    # a resume checks with the key that signed: a missing one is said, never silently made
    monkeypatch.setenv("CTAL_SWEEP_KEY_FILE", str(tmp_path / "elsewhere" / "sweep.key"))
    with pytest.raises(UntrustedStateError, match="no sweep key at .*elsewhere/sweep.key"):
        sweep_key(create=False)
    assert not (tmp_path / "elsewhere").exists()
    from ctal.distributed.signing import verify_state  # the resume's check: it says so too, and makes none

    (tmp_path / "sweep").mkdir()
    for name in ("tuner.pkl", "experiment_state-1.json"):
        (tmp_path / "sweep" / name).write_text("{}")
    with pytest.raises(UntrustedStateError, match="no sweep key at .*elsewhere/sweep.key"):
        verify_state(str(tmp_path / "sweep"))
    assert not (tmp_path / "elsewhere").exists()
    (tmp_path / "dir.key").mkdir()
    monkeypatch.setenv("CTAL_SWEEP_KEY_FILE", str(tmp_path / "dir.key"))
    with pytest.raises(UntrustedStateError, match="must be a regular file"):
        sweep_key()


def test_a_new_sweep_signs_only_what_it_wrote(tmp_path, monkeypatch):
    """Issue 30.1: a state file found beside a new sweep's own is refused, never signed."""
    import pickle

    from ctal.distributed.signing import UntrustedStateError, sign_sweep, verify_state

    monkeypatch.setenv("CTAL_SWEEP_KEY", "k")
    (tmp_path / "tuner.pkl").write_bytes(b"ours")
    (tmp_path / SWEEP_FILE).write_text("{}")
    (tmp_path / "callback-states-9999-12-31_00-00-00.pkl").write_bytes(pickle.dumps(_Planted(tmp_path / "m")))
    with pytest.raises(UntrustedStateError, match="callback-states-9999-12-31_00-00-00.pkl appeared"):
        sign_sweep(str(tmp_path), (SWEEP_FILE,))
    assert not (tmp_path / "ctal-state.hmac").exists()
    (tmp_path / "callback-states-9999-12-31_00-00-00.pkl").unlink()
    sign_sweep(str(tmp_path), (SWEEP_FILE,))
    (tmp_path / "experiment_state-1.json").write_text("{}")  # Tuner.fit() writes it; StateSigner signs it
    with pytest.raises(UntrustedStateError, match="experiment_state-1.json is not a version this sweep signed"):
        verify_state(str(tmp_path), (SWEEP_FILE,))


def test_state_that_cannot_be_read_is_refused_by_name_without_reading_it(tmp_path, monkeypatch):
    """Issue 30.2 and the bad FIFO/directory cases, in the default tier (the slow resume test plays
    them against a real sweep): a missing experiment state, and a FIFO or directory named like a state
    file, each refused by name before the signature is even read (a FIFO read would hang)."""
    from ctal.distributed.signing import UnreadableStateError, verify_state

    monkeypatch.setenv("CTAL_SWEEP_KEY", "k")
    for name in ("tuner.pkl", SWEEP_FILE):
        (tmp_path / name).write_text("{}")
    with pytest.raises(UnreadableStateError, match="its experiment_state-\\*.json is missing"):
        verify_state(str(tmp_path), (SWEEP_FILE,))
    (tmp_path / "experiment_state-1.json").write_text("{}")
    os.mkfifo(tmp_path / "callback-states-1.pkl")
    with pytest.raises(UnreadableStateError, match="callback-states-1.pkl is not a regular file"):
        verify_state(f"file://{tmp_path}", (SWEEP_FILE,))  # pyarrow's filesystem: the FIFO is "Unknown"
    (tmp_path / "callback-states-1.pkl").unlink()
    (tmp_path / "searcher-state-1.pkl").mkdir()
    with pytest.raises(UnreadableStateError, match="searcher-state-1.pkl is a directory"):
        verify_state(str(tmp_path), (SWEEP_FILE,))


class _Planted:
    """A pickle that, when loaded, creates the file ``marker`` (stands for any code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_resume_refuses_state_it_did_not_sign_before_unpickling_it(dataset, ray_local, tmp_path, capsys,
                                                                    monkeypatch):
    """Issue 15.1 on a URI storage (pyarrow's filesystem, as s3:// takes): an honest sweep's state is
    signed after the driver's last sync; a planted tuner.pkl, an added searcher state, a sweep
    without a signature and one signed with another key are refused, in one line naming the file,
    before anything is unpickled."""
    import pickle

    from ctal.distributed.signing import SIGNATURE_FILE, UntrustedStateError, verify_state

    cfg = narrow_config("sentiment", dataset("sentiment"))
    root = tmp_path / "bucket"
    sweep = SweepConfig(search="grid", scheduler="fifo", storage=f"file://{root}", name="signed", verbose=0)
    run_sweep(cfg, parse_search_space({"fusion": "text_only"}), sweep)
    experiment = root / "signed"
    where = f"file://{experiment}"
    signed = verify_state(where, (SWEEP_FILE,))  # every state file, as the final sync left it
    assert {"tuner.pkl", SWEEP_FILE} <= set(signed) and any(n.startswith("experiment_state-") for n in signed)

    def resume():
        capsys.readouterr()  # only what this resume prints
        with pytest.raises(SystemExit) as e:
            pipeline("tune_finetune").main(["--resume", "--storage", f"file://{root}", "--name", "signed"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err

    monkeypatch.setenv("CTAL_SWEEP_KEY", "somebody else's key")
    assert f"{SIGNATURE_FILE} was not made with your sweep key (CTAL_SWEEP_KEY)" in resume()
    monkeypatch.delenv("CTAL_SWEEP_KEY")

    honest = (experiment / "tuner.pkl").read_bytes()
    marker = tmp_path / "planted-code-ran"
    (experiment / "tuner.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    assert "tuner.pkl is not a version this sweep signed" in resume()
    with pytest.raises(UntrustedStateError, match="tuner.pkl"):
        run_sweep(cfg, parse_search_space({"fusion": "text_only"}), sweep, resume=True)
    assert not marker.exists()
    (experiment / "tuner.pkl").write_bytes(honest)

    (experiment / "searcher-state-2099.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    assert "searcher-state-2099.pkl is not a version this sweep signed" in resume()
    (experiment / "searcher-state-2099.pkl").unlink()

    # Issue 30.2: state that cannot be read stops the resume before Ray; the trials stay as they were
    trials = {p: p.read_bytes() for p in experiment.rglob("*") if p.is_file() and "trial_" in str(p)}
    state = next(experiment.glob("experiment_state-*.json"))
    kept = state.read_bytes()
    state.unlink()
    assert "its experiment_state-*.json is missing" in resume()
    state.mkdir()
    assert f"{state.name} is a directory, not a state file Ray wrote" in resume()
    state.rmdir()
    state.write_bytes(kept)
    os.mkfifo(experiment / "callback-states-2099.pkl")  # reading it would hang the resume
    assert "callback-states-2099.pkl is not a regular file" in resume()
    (experiment / "callback-states-2099.pkl").unlink()
    (experiment / "callback-states-2098.pkl").mkdir()  # it used to empty results.csv
    assert "callback-states-2098.pkl is a directory" in resume()
    (experiment / "callback-states-2098.pkl").rmdir()
    assert {p: p.read_bytes() for p in trials} == trials

    (experiment / SIGNATURE_FILE).unlink()
    assert f"has no {SIGNATURE_FILE}" in resume()
    assert not marker.exists()


@pytest.mark.slow
def test_a_trial_with_two_workers_runs_data_parallel(dataset, ray_local, tmp_path):
    cfg = narrow_config("sentiment", dataset("sentiment"))
    space = parse_search_space({"fusion": "text_only"})  # leaves the audio stream unused under DDP
    result = run_sweep(cfg, space, SweepConfig(search="random", scheduler="fifo", num_samples=1,
                                               workers_per_trial=2, storage=str(tmp_path), name="ddp",
                                               verbose=0))
    assert list(result.table["status"]) == ["done"]
    metrics, _ = evaluate(result.best_checkpoint, role="dev")
    assert metrics["mae"] == pytest.approx(result.best["dev_mae"], abs=1e-6)
