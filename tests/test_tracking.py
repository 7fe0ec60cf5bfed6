"""Experiment tracking (ctal.tracking, ctal.distributed.tracking), read back through the trackers' own
readers: MLflow's MlflowClient on a real SQLite store, W&B's offline run files through
``wandb leet inspect --json`` (wandb's reader of its .wandb transaction log).

Pretraining (rank 0, without Ray) and a resumed run continuing its tracker run, a tiny Ray Tune
sweep (one run per trial, tags, dev metric per epoch), evaluation of its best checkpoint, and the
failure policy: an unreachable server stops the recipe before Ray starts, a server that fails
once the run is under way costs one warning line and nothing else.
"""
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient  # the `track` extra, part of `test`
from tiny_data import write_tiny_dataset

from ctal.config import ConfigError, FinetuneConfig, PretrainConfig, SweepConfig, load_config, to_dict
from ctal.pretrain import prepare, pretrain_loop
from ctal.runlog import read_metrics
from ctal.tracking import STORE_FILE, check_tracking, flat_params

ROOT = Path(__file__).resolve().parents[1]
NARROW = ["model.hidden_size=32", "model.num_attention_heads=4", "model.intermediate_size=64",
          "model.num_text_layers=1", "model.num_audio_layers=1", "model.max_audio_positions=200",
          "model.max_position_embeddings=66"]
STEP_METRICS = ("loss", "mlm_loss", "masked_acoustic_loss", "lr", "samples_per_s", "padding_efficiency")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("tracking") / "data", 48, splits=("train", "dev", "test"))


def pretrain_cfg(data, storage, *extra) -> PretrainConfig:
    return load_config(PretrainConfig, [ROOT / "configs/pretrain.yaml"],
                       [f"data={data}", f"storage_path={storage}", "run_name=run", "log_every=1", "checkpoint_every=2",
                        "batch_size=4", "num_workers=1", "bucket_pool_rows=16", "split=train", *NARROW, *extra])


def store(path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{Path(path) / STORE_FILE}")


def only_run(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def wandb_records(run_dir) -> list[dict]:
    """The records of an offline W&B run, as wandb's own reader prints them."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wandb_runs(wandb_dir) -> list[Path]:
    return sorted(Path(wandb_dir).glob("offline-run-*"))


# -- pretraining -------------------------------------------------------------------------------------


def test_pretraining_logs_resolved_config_step_metrics_and_checkpoint_uris_to_mlflow(data, tmp_path):
    plan = prepare(pretrain_cfg(data, tmp_path, "max_steps=4", "tracking=mlflow"))
    run_dir = tmp_path / "run"
    pretrain_loop(plan, run_dir=run_dir)
    run = only_run(store(run_dir), "ctal-pretrain")
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params == flat_params(to_dict(plan.cfg))  # the resolved config: absolute data path
    assert run.data.params["data"] == str(Path(data).resolve())

    logged = read_metrics(run_dir)
    client = store(run_dir)
    for key in STEP_METRICS:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx({s: m[key] for s, m in logged.items()}), key
    checkpoints = {k: v for k, v in run.data.tags.items() if k.startswith("checkpoint.step-")}
    assert sorted(checkpoints) == ["checkpoint.step-00000002", "checkpoint.step-00000004"]
    assert all(Path(v).is_dir() and Path(v).parent == run_dir / "checkpoints" for v in checkpoints.values())
    assert run.data.tags["checkpoint.latest"] == checkpoints["checkpoint.step-00000004"]
    assert not list(tmp_path.glob("**/mlruns"))  # nothing in the working directory's default place

    # the same run directory resumed to more steps continues the same tracker run
    lines = []
    pretrain_loop(prepare(pretrain_cfg(data, tmp_path, "max_steps=6", "tracking=mlflow")), run_dir=run_dir,
                  log=lines.append)
    resumed = only_run(store(run_dir), "ctal-pretrain")
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert "checkpoint.step-00000006" in resumed.data.tags
    assert any("keeps the params it started with for max_steps" in line for line in lines)


def test_pretraining_wandb_runs_offline_into_the_run_directory(data, tmp_path):
    plan = prepare(pretrain_cfg(data, tmp_path, "max_steps=4", "tracking=wandb"))
    run_dir = tmp_path / "run"
    pretrain_loop(plan, run_dir=run_dir)
    (offline,) = wandb_runs(run_dir / "wandb")
    records = wandb_records(offline)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["project"] == "ctal-pretrain" and run["display_name"] == "run"
    config = {k: v for k, v in run["config"]["update"].items() if k != "_wandb"}
    assert json.loads(json.dumps(config)) == json.loads(json.dumps(to_dict(plan.cfg)))
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    logged = read_metrics(run_dir)
    assert sorted(history) == sorted(logged)
    for step, m in logged.items():
        assert {k: history[step][k] for k in STEP_METRICS} == pytest.approx({k: m[k] for k in STEP_METRICS})
    refs = [entry["ref"] for r in records if r["type"] == "artifact"
            for entry in r["artifact"]["manifest"]["contents"]]  # references, not uploads
    assert any("/checkpoints/step-00000004/" in ref for ref in refs) and all(ref.startswith("file://") for ref in refs)


# -- sweeps and evaluation -------------------------------------------------------------------------------


def finetune_cfg(data, *extra) -> FinetuneConfig:
    return load_config(FinetuneConfig, [ROOT / "configs/finetune.yaml"],
                       [*NARROW, "max_frames=80", "epochs=2", "batch_size=8", "lr=1e-3", "seed=5", "task=sentiment",
                        f"data={data}", *extra])


def tiny_sweep(data, tmp_path, name, tracking, fusions=("ctal", "text_only")):
    from ctal.distributed.tune import run_sweep
    from ctal.search_space import parse_search_space

    space = parse_search_space({"fusion": {"choice": list(fusions)}})
    return run_sweep(finetune_cfg(data, f"tracking={tracking}"), space,
                     SweepConfig(search="grid", scheduler="fifo", storage=str(tmp_path), name=name, verbose=0))


@pytest.fixture(scope="module")
def mlflow_sweep(data, ray_local, tmp_path_factory):
    return tiny_sweep(data, tmp_path_factory.mktemp("sweeps"), "tracked", "mlflow")


@pytest.mark.slow
def test_a_sweep_logs_one_mlflow_run_per_trial_tagged_with_fusion_and_seed(mlflow_sweep, data):
    client = store(mlflow_sweep.experiment)
    exp = client.get_experiment_by_name("tracked")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == len(mlflow_sweep.table) == 2
    assert sorted(r.data.tags["fusion"] for r in runs) == ["ctal", "text_only"]
    table = mlflow_sweep.table.set_index("fusion")
    for run in runs:
        fusion = run.data.tags["fusion"]
        assert run.data.tags["seed"] == "5" and run.data.tags["task"] == "sentiment" and run.info.status == "FINISHED"
        resolved = flat_params(to_dict(finetune_cfg(data, "tracking=mlflow", f"model.fusion={fusion}")))
        assert {k: run.data.params[k] for k in resolved} == resolved
        history = client.get_metric_history(run.info.run_id, "dev_mae")
        assert [m.step for m in history] == [1, 2]  # one value per epoch
        assert min(m.value for m in history) == pytest.approx(table.loc[fusion, "dev_mae"])


@pytest.mark.slow
def test_evaluating_the_best_checkpoint_logs_its_test_metrics_into_the_sweeps_store(mlflow_sweep, capsys):
    from ctal.finetune import evaluate
    from pipelines import evaluate as recipe

    best = mlflow_sweep.best_checkpoint
    assert recipe.main(["--task", "sentiment", "--checkpoint", str(best), "tracking=mlflow"]) == 0
    assert "tracked: mlflow run at sqlite:///" in capsys.readouterr().out
    run = only_run(store(mlflow_sweep.experiment), "ctal-evaluate")
    metrics, _ = evaluate(best)
    assert run.data.metrics == pytest.approx({f"test_{k}": v for k, v in metrics.items()})
    assert run.data.tags["checkpoint"] == str(best) and run.data.tags["fusion"] == mlflow_sweep.best["fusion"]


@pytest.mark.slow
def test_a_sweep_tracked_with_wandb_writes_an_offline_run_per_trial(data, ray_local, tmp_path):
    result = tiny_sweep(data, tmp_path, "wb", "wandb", fusions=("text_only",))  # one trial: the MLflow test counts
    (offline,) = wandb_runs(Path(result.experiment) / "wandb")
    deadline = time.time() + 60  # W&B's own service process may still be writing the file (a busy machine)
    records = wandb_records(offline)
    while not any(r["type"] == "run" for r in records) and time.time() < deadline:
        time.sleep(1)
        records = wandb_records(offline)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["project"] == "wb"
    assert sorted(run["tags"]) == ["fusion:text_only", "seed:5", "sweep:wb", "task:sentiment"]
    assert run["config"]["update"]["model"]["fusion"] == "text_only"
    dev = {r["history"]["item"]["epoch"]: r["history"]["item"]["dev_mae"] for r in records
           if r["type"] == "history" and "dev_mae" in r["history"]["item"]}
    assert sorted(dev) == [1, 2]  # the dev metric of every epoch
    assert min(dev.values()) == pytest.approx(result.best["dev_mae"])


# -- failure policy ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracking_server_stops_the_recipe_before_ray_starts(data, tmp_path, capsys):
    from pipelines import pretrain as recipe

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit) as exit_:
        recipe.main(["--data", str(data), "--storage", str(tmp_path), "--size", "narrow",
                     "tracking=mlflow", f"tracking_uri={url}"])
    assert exit_.value.code == 2
    assert f"tracking_uri={url}: no tracking server answers there" in capsys.readouterr().err
    assert not (tmp_path / "ctal-pretrain").exists()


@pytest.mark.parametrize("tracking, uri, message", [
    ("none", "http://localhost:5000", "tracking_uri='http://localhost:5000' is set but tracking=none"),
    ("wandb", "sqlite:///x.db", "W&B takes a server (http(s)://) or a directory"),
    ("mlflow", "s3://bucket/runs", "give a server (http(s)://), a database"),
])
def test_tracking_settings_that_cannot_work_are_config_errors(tracking, uri, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_tracking(tracking, uri)


def test_a_run_on_object_storage_needs_a_tracking_uri():
    with pytest.raises(ConfigError, match="give tracking_uri="):
        check_tracking("mlflow", None, "s3://bucket/runs/run")
    with pytest.raises(ConfigError, match="unknown config key 'tracking_url'"):
        load_config(PretrainConfig, [], ["tracking_url=http://x"])


def test_a_tracker_failing_mid_run_warns_once_then_stays_quiet(tmp_path):
    from ctal.tracking import open_run

    lines = []
    run = open_run("mlflow", None, home=tmp_path, experiment="x", run_name="r", config={"lr": 1.0}, log=lines.append)
    run.log_metrics({"loss": 2.0}, step=1)
    run.client.delete_run(run.run_id)  # from now on the store refuses this run's writes
    run.log_metrics({"loss": 1.0}, step=2)
    run.log_checkpoint(2, str(tmp_path))
    run.finish()
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "the run goes on without it" in warnings[0], lines
    assert [m.value for m in run.client.get_metric_history(run.run_id, "loss")] == [2.0]


def test_a_sweep_tracker_that_fails_warns_once_and_never_raises_into_tune(monkeypatch, capsys):
    from ctal.distributed.tracking import MLflowTrials

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    callback = MLflowTrials({}, f"http://127.0.0.1:{free_port()}", "sweep", {})  # the server went away
    callback.setup()
    callback.log_trial_start(trial=None)
    callback.log_trial_result(1, None, {"dev_mae": 1.0})
    callback.log_trial_end(None)
    err = capsys.readouterr().err.splitlines()
    assert len([line for line in err if line.startswith("warning: mlflow tracking failed")]) == 1, err


class FailingServer(http.server.BaseHTTPRequestHandler):
    """Answers the reachability check, then fails every tracking request (a server gone bad)."""

    def _fail(self):
        self.send_response(503)
        self.end_headers()

    do_GET = do_POST = _fail

    def log_message(self, *args):
        pass


def test_a_tracking_server_failing_after_the_check_costs_one_warning_and_the_run_finishes(data, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FailingServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        plan = prepare(pretrain_cfg(data, tmp_path, "max_steps=4", "tracking=mlflow", f"tracking_uri={url}"))
        lines = []
        out = pretrain_loop(plan, run_dir=tmp_path / "run", log=lines.append)
    finally:
        server.shutdown()
    assert out["step"] == 4 and sorted(read_metrics(tmp_path / "run")) == [1, 2, 3, 4]
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "mlflow tracking" in warnings[0] and "the run goes on without it" in warnings[0]
