"""Pretraining: synthetic corpus → preprocess → Ray Train with 2 workers; exact restore after a worker
SIGKILL and after a driver kill + rerun; damaged checkpoints; over-asking; the recipe's fail-fast paths.

Every fault test compares its per-step losses with one uninterrupted run of the same config (CPU,
deterministic): equal step for step, not merely close.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

from ctal.checkpoint import CheckpointStore
from ctal.config import ConfigError, PretrainConfig, load_config
from ctal.data import open_dataset
from ctal.model import CTALForPretraining
from ctal.checkpoint import latest_checkpoint
from ctal.pretrain import CHECKPOINTS, pretrain_loop, prepare
from ctal.runlog import read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 40, 10
OVERRIDES = [f"max_steps={STEPS}", f"checkpoint_every={EVERY}", "log_every=1", "batch_size=4", "lr=1e-3",
             "num_workers=2", "cpus_per_worker=1", "bucket_pool_rows=16", "keep_checkpoints=3",
             "max_failures=1", "seed=3"]


def make_cfg(data, storage, name, *extra) -> PretrainConfig:
    # exactly what `pipelines/pretrain.py --size narrow` builds from the same overrides
    return load_config(PretrainConfig, [REPO / "configs/pretrain.yaml", REPO / "configs/narrow.yaml"],
                       [f"data={data}", f"storage_path={storage}", f"run_name={name}", *OVERRIDES, *extra])


def losses(run_dir) -> dict[int, float]:
    return {s: m["loss"] for s, m in read_metrics(run_dir).items()}


def checkpoint_steps(run_dir) -> list[int]:
    return [s for s, _ in CheckpointStore(Path(run_dir) / CHECKPOINTS).list()]


def resumes(run_dir) -> list[int]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r.get("event") == "resume"]


# -- processes, by PID (never by name: other jobs share this machine) -------------------------------


def _process_table() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, start time) from /proc."""
    table = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            table[int(d)] = (int(fields[1]), fields[19])
    return table


def descendants(pid: int) -> dict[int, str]:
    """pid → start time of every process below ``pid``."""
    table = _process_table()
    out, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for p, (pp, start) in table.items():
            if pp == parent and p not in out:
                out[p] = start
                frontier.append(p)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_if_same(pid: int, start: str) -> None:
    """SIGKILL ``pid`` unless it has exited (or its number now belongs to another process)."""
    if _process_table().get(pid, (None, None))[1] == start:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_first(procs: dict[int, str], title) -> Optional[int]:
    """SIGKILL the first of ``procs`` (pid → start time, ``descendants``) whose process title ``title(pid)``
    says it is a Ray Train worker; its pid, or None if none is."""
    for pid, start in procs.items():
        if title(pid).startswith("ray::RayTrainWorker"):
            kill_if_same(pid, start)
            return pid
    return None


def wait_for_step(run_dir: Path, step: int, timeout: float, proc=None) -> int:
    """Block until metrics.jsonl shows ``step`` (after the checkpoint before it); return the last step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        logged = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else {}
        if logged and max(logged) >= step and checkpoint_steps(run_dir):
            return max(logged)
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(synthetic_data):
    """The shared synthetic LibriSpeech-layout corpus, preprocessed with the real pipeline (conftest.py)."""
    return synthetic_data("librispeech")


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory, ray_local):
    """One uninterrupted 2-worker Ray Train run: the losses every fault test must reproduce."""
    from ctal.distributed.train import pretrain

    storage = tmp_path_factory.mktemp("runs")
    result = pretrain(make_cfg(dataset, storage, "reference"))
    return result, losses(result.run_dir)


# -- without Ray ---------------------------------------------------------------------------------------


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one_with_a_warning(dataset, tmp_path):
    cfg = make_cfg(dataset, tmp_path, "x", "max_steps=12", "checkpoint_every=5")
    run = tmp_path / "single"
    pretrain_loop(cfg, run_dir=run, log=lambda _: None)
    before = losses(run)
    assert checkpoint_steps(run) == [5, 10, 12]
    model_file = run / CHECKPOINTS / "step-00000012" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])  # torn write

    with pytest.warns(RuntimeWarning, match="step-00000012 is damaged.*falling back"):
        pretrain_loop(cfg, run_dir=run, log=lambda _: None)
    assert resumes(run) == [10]
    assert losses(run) == before  # steps 11-12 again, identical
    assert checkpoint_steps(run) == [5, 10, 12]
    assert CTALForPretraining.from_pretrained(latest_checkpoint(run)).count_parameters() > 0


def test_a_data_set_whose_tokenizer_was_swapped_is_refused(dataset, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(dataset, copy)
    vocab = copy / "tokenizer" / "tokenizer.json"
    tok = json.loads(vocab.read_text())
    tok["added_tokens"].append({**tok["added_tokens"][-1], "id": 10_000, "content": "<extra>"})
    vocab.write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        prepare(PretrainConfig(data=str(copy)))  # before any worker starts


# -- over-asking and the recipe ------------------------------------------------------------------------


def test_plan_resources_fails_or_shrinks_and_never_shrinks_gpus():
    from ctal.distributed.train import ResourceError, plan_resources

    cfg = PretrainConfig(num_workers=8, cpus_per_worker=1.0, use_gpu="auto")
    with pytest.raises(ResourceError, match=r"8 workers x 1 CPUs = 8 CPUs, the Ray cluster has 2 CPUs"):
        plan_resources(cfg, {"CPU": 2.0})
    shrunk = plan_resources(PretrainConfig(num_workers=8, shrink_cpus_per_worker=True), {"CPU": 2.0})
    assert (shrunk.cpus_per_worker, shrunk.use_gpu) == (0.25, False) and "shrinking" in shrunk.note
    assert plan_resources(PretrainConfig(num_workers=2), {"CPU": 16.0, "GPU": 2.0}).use_gpu
    with pytest.raises(ResourceError, match="4 GPUs, the Ray cluster has 2 GPUs"):
        plan_resources(PretrainConfig(num_workers=4, shrink_cpus_per_worker=True), {"CPU": 64.0, "GPU": 2.0})
    with pytest.raises(ResourceError, match="has 0 GPUs"):
        plan_resources(PretrainConfig(num_workers=1, use_gpu="true"), {"CPU": 4.0})


def test_an_autoscaling_cluster_is_judged_by_what_it_can_grow_to(ray_local, tmp_path, monkeypatch):
    from ctal.distributed.train import cluster_capacity, plan_resources

    assert cluster_capacity() == (dict(ray_local.cluster_resources()), False)
    # what `ray up cluster.yaml` leaves on the head node: 2 x 4-GPU workers, none started yet
    boot = {"head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 8}, "max_workers": 0},
        "gpu_worker": {"resources": {"CPU": 48, "GPU": 4}, "min_workers": 0, "max_workers": 2}}}
    (tmp_path / "ray_bootstrap_config.yaml").write_text(json.dumps(boot))
    monkeypatch.setenv("HOME", str(tmp_path))
    capacity, autoscaling = cluster_capacity()
    assert autoscaling and capacity["GPU"] == 8 and capacity["CPU"] == 8 + 96
    res = plan_resources(PretrainConfig(num_workers=8), capacity)
    assert res.use_gpu and res.cpus_per_worker == 1.0


def test_over_asking_fails_within_seconds_naming_asked_and_available(dataset, tmp_path, ray_local):
    from ctal.distributed.train import ResourceError, pretrain

    cpus = ray_local.cluster_resources()["CPU"]
    t0 = time.perf_counter()
    asked = rf"8 workers x 1 CPUs = 8 CPUs, the Ray cluster has {cpus:g} CPUs"
    with pytest.raises(ResourceError, match=asked):
        pretrain(make_cfg(dataset, tmp_path, "too-big", "num_workers=8", "batch_size=8"))
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "too-big").exists()


@pytest.mark.parametrize("args, message", [
    (["model.hiden_size=32"], "unknown config key 'model.hiden_size'"),
    (["lr=fast"], "lr: expected a number"),
    (["--use-gpu", "maybe"], "invalid choice: 'maybe'"),
])
def test_recipe_config_errors_exit_2_before_ray_starts(dataset, args, message, run_recipe):
    code, err = run_recipe("pretrain", "--data", dataset, *args)
    assert code == 2 and message in err, err


def test_recipe_refuses_a_directory_that_is_not_a_data_set(tmp_path, run_recipe):
    code, err = run_recipe("pretrain", "--data", tmp_path)
    assert code == 2 and "no report.json" in err, err


def test_a_second_run_on_one_name_and_a_name_run_on_other_settings_are_refused_before_ray(
        dataset, tiny_data, tmp_path, run_recipe):
    """Issue 30: two runs on one --name deleted each other's staging folders; a finished run's name on
    another data set resumed it silently; another model width failed after Ray started."""
    from ctal import manifest
    from ctal.outputs import claimed

    argv = ("--data", dataset, "--storage", tmp_path, "--name", "r", "--size", "narrow")
    with claimed(tmp_path / "r"):  # a run that is writing runs/r right now (this process: alive)
        code, err = run_recipe("pretrain", *argv)
    assert code == 2 and "is being written by another run" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run started, the claim gone
    cfg = make_cfg(dataset, tmp_path, "r")
    with manifest.recorded_run(tmp_path / "r", "pretraining", cfg):  # as a finished run on `dataset` left it
        pass
    code, err = run_recipe("pretrain", *argv[2:], "--data", tiny_data)
    assert code == 2 and f"data={str(tiny_data)!r} (the run has {str(dataset)!r})" in err, err
    code, err = run_recipe("pretrain", *argv, "model.hidden_size=32", "model.intermediate_size=64")
    assert code == 2 and "model.hidden_size=32 (the run has 64)" in err, err


def test_feed_workers_above_the_cores_are_warned(tiny_data, tmp_path, monkeypatch):
    """Issue 30 (weak): feed_workers far above the machine's cores ran without a word (the feed processes
    only compete with training for the cores)."""
    from test_secrets import pretrain_cfg

    from ctal.pretrain import pretrain_loop

    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    said = []
    pretrain_loop(pretrain_cfg(tiny_data, tmp_path, "feed_workers=2", "max_steps=1", "checkpoint_every=1"),
                  run_dir=tmp_path / "run", log=said.append)
    assert any(line.startswith("warning: feed_workers=2 is more than this machine's 1 cores") for line in said), said


def test_the_same_run_with_a_credential_in_its_data_uri_is_still_the_same_run(tmp_path):
    """The manifest records the data URI redacted: the comparison reads both sides that way."""
    from dataclasses import replace

    from ctal import manifest
    from ctal.pretrain_plan import check_same_run

    cfg = replace(make_cfg("s3://bucket/data?token=hunter2", tmp_path, "r"), storage_path=str(tmp_path))
    with manifest.recorded_run(tmp_path / "r", "pretraining", cfg):
        pass
    assert "hunter2" not in (tmp_path / "r" / "manifest.json").read_text()
    check_same_run(cfg)  # not "other settings"
    with pytest.raises(ConfigError, match="data="):
        check_same_run(replace(cfg, data="s3://bucket/other?token=hunter2"))


# -- Ray Train -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_workers_pretrain_loss_falls_and_the_checkpoint_loads(reference, dataset):
    result, ref = reference
    assert sorted(ref) == list(range(1, STEPS + 1))
    first, last = [ref[s] for s in range(1, 6)], [ref[s] for s in range(STEPS - 4, STEPS + 1)]
    assert sum(last) / 5 < sum(first) / 5 - 0.5, (first, last)
    assert checkpoint_steps(result.run_dir) == [20, 30, 40]  # last 3 kept
    assert result.checkpoint.name == "step-00000040" and result.metrics["step"] == STEPS

    model = CTALForPretraining.from_pretrained(result.checkpoint)
    assert model.config.vocab_size == open_dataset(dataset).tokenizer.vocab_size and model.config.hidden_size == 64
    from safetensors.torch import load_file
    saved = load_file(str(result.checkpoint / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert (result.checkpoint / "tokenizer" / "tokenizer.json").is_file()
    assert list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert all(0 < read_metrics(result.run_dir)[s]["padding_efficiency"] <= 1 for s in ref)


@pytest.mark.slow
def test_same_loop_without_ray_gives_the_same_losses(reference, dataset, tmp_path):
    from ctal.pretrain import launch_local

    _, ref = reference
    launch_local(make_cfg(dataset, tmp_path, "local"), tmp_path / "local")  # 2 processes, gloo DDP
    assert losses(tmp_path / "local") == ref


@pytest.fixture(scope="module")
def loaded_then_worker_killed(dataset, tmp_path_factory, ray_local) -> dict:
    """One run for two faults, in turn: CPU hogs from its first logged step until a checkpoint has been
    reported under them (Ray 2.60's placement-group cleaner removed live runs' groups under such load:
    ray-project/ray PR 65447), then, the machine quiet again, a Ray Train worker SIGKILLed. A restart
    under the load would show as a resume before the kill (and the kill is then not made). One run
    instead of a loaded run and a killed run: each Ray Train run costs half a minute of start-up here.

    Load ≈ 5+ on 2 cores (3 hogs + 2 training workers + Ray's own). Loaded from the start, the
    workers' start-up alone took minutes, and the whole run twelve: the hogs start once it trains."""
    from ctal.distributed.train import pretrain

    run = tmp_path_factory.mktemp("runs") / "loaded-then-killed"
    seen: dict = {"hogs": []}

    def load_then_kill():
        deadline = time.time() + 600
        while not ((run / "metrics.jsonl").is_file() and read_metrics(run)):
            if time.time() > deadline or "result" in seen:
                return
            time.sleep(0.05)
        seen["from_step"] = max(read_metrics(run))
        seen["hogs"].extend(subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3))
        try:
            seen["to_step"] = wait_for_step(run, EVERY + 1, timeout=600)
        finally:
            for hog in seen["hogs"]:
                hog.kill()
        seen["at_step"] = wait_for_step(run, EVERY + 5, timeout=300)
        seen["resumes_before_kill"] = resumes(run)
        if seen["resumes_before_kill"]:
            return  # restarted under the load: the hog test fails on it; a kill would end the run
        pid = kill_first(descendants(os.getpid()), cmdline)
        if pid is not None:
            seen["pid"] = pid

    thread = threading.Thread(target=load_then_kill, daemon=True)
    thread.start()
    try:
        # max_failures=1: the kill's restart; a restart under the load as well would end the run
        seen["result"] = pretrain(make_cfg(dataset, run.parent, run.name))
    finally:
        thread.join(timeout=60)
        for hog in seen["hogs"]:
            hog.kill()
            hog.wait()
    seen["run"] = run
    return seen


@pytest.mark.slow
def test_worker_sigkill_restores_from_the_latest_checkpoint_exactly(reference, loaded_then_worker_killed):
    _, ref = reference
    seen = loaded_then_worker_killed
    assert "pid" in seen, "no Ray Train worker was found to kill"
    [resumed_at] = resumes(seen["run"])
    # restored from the newest checkpoint at the kill: at most one interval of steps redone
    assert seen["at_step"] - EVERY <= resumed_at <= seen["at_step"] and resumed_at % EVERY == 0
    assert seen["result"].metrics["step"] == STEPS
    assert losses(seen["run"]) == ref


@pytest.fixture(scope="module")
def feed_killed_then_driver_killed(dataset, tmp_path_factory) -> dict:
    """One command for two faults, in turn: ``pipelines/pretrain.py`` with feed_workers=2 (each Ray
    Train worker builds its batches in 2 processes) on a local Ray of its own, as on a laptop; one feed
    process SIGKILLed mid-run (its worker fails, the group restarts from the latest checkpoint), then,
    past the next checkpoint, the driver SIGKILLed; then the same command again. One command instead
    of a feed-kill run and a driver-kill command: each Ray Train start costs half a minute here.
    (The default feed, one thread, restores in test_worker_sigkill_restores_... above.)"""
    tmp = tmp_path_factory.mktemp("feed-then-driver")
    storage = tmp / "runs"
    cmd = [sys.executable, "pipelines/pretrain.py", "--data", str(dataset), "--size", "narrow",
           "--storage", str(storage), "--name", "killed", "--address", "local", *OVERRIDES, "feed_workers=2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run, seen = storage / "killed", {}
    log = open(tmp / "first.log", "w")
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    started: dict[int, str] = {}

    def logged() -> int:
        return max(read_metrics(run) or {0: 0}) if (run / "metrics.jsonl").is_file() else 0

    def wait_until(ready, what: str):
        deadline = time.time() + 300
        while not ready():
            started.update(descendants(first.pid))  # Ray's processes, to clean up after the kill
            assert first.poll() is None, (tmp / "first.log").read_text()[-3000:]
            assert time.time() < deadline, f"the first run did not reach {what}"
            time.sleep(0.05)

    try:
        wait_until(lambda: logged() >= EVERY + 5 and checkpoint_steps(run), "the feed kill")
        seen["feed_kill_at"] = logged()
        table = _process_table()
        # a feed process: forked, so its parent's title (Ray's own workers are the raylet's children)
        seen["feed_pid"] = kill_first(descendants(first.pid), lambda pid: cmdline(table.get(pid, (None,))[0]))
        assert seen["feed_pid"] is not None, "no feed process was found to kill"
        # restored, and past the checkpoint after the one it restored from
        wait_until(lambda: len(resumes(run)) == 1 and logged() >= resumes(run)[0] + EVERY + 5, "the driver kill")
        started.update(descendants(first.pid))
        seen["driver_kill_at"] = logged()
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        for pid, start in started.items():  # orphans of the dead driver (gcs, raylet, agents, workers)
            kill_if_same(pid, start)
        if first.poll() is None:
            first.kill()
        log.close()
    seen["first_log"] = (tmp / "first.log").read_text()
    seen["second"] = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    seen["run"] = run
    return seen


@pytest.mark.slow
def test_driver_killed_then_the_same_command_resumes(reference, feed_killed_then_driver_killed):
    _, ref = reference
    seen = feed_killed_then_driver_killed
    run, second, killed_at = seen["run"], seen["second"], seen["driver_kill_at"]
    assert killed_at < STEPS
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    [_, resumed_at] = resumes(run)  # the feed kill's restore, then this command's
    assert killed_at - EVERY <= resumed_at <= killed_at
    assert f"resumed from {run / CHECKPOINTS / f'step-{resumed_at:08d}'}" in second.stdout + second.stderr
    assert losses(run) == ref


# -- a busy machine (ray-project/ray PR 65447; the loaded run: loaded_then_worker_killed above) -----


def test_the_placement_group_cleaner_ignores_a_missing_state_api_answer_and_acts_on_death(ray_local, monkeypatch):
    """Ray 2.60's cleaner removes the workers' placement group when the State API does not find the
    live controller; ours asks the GCS and removes it only once the controller is dead."""
    import ray.train.v2._internal.execution.controller.placement_group_cleaner as ray_cleaner
    from ray.util.placement_group import placement_group, placement_group_table

    from ctal.distributed.pg_cleaner import SteadyPlacementGroupCleaner, controller_state

    @ray_local.remote(num_cpus=0)
    class Controller:
        def ping(self):
            return True

    monkeypatch.setattr(ray_cleaner, "is_actor_alive", lambda **kw: None)  # "not found" (a State API miss)

    def watch(cleaner_cls, controller):
        pg = placement_group([{"CPU": 0.01}])
        ray_local.get(pg.ready(), timeout=60)
        cleaner = cleaner_cls(controller_actor_id=controller._actor_id.hex(), check_interval_s=0.1,
                              get_actor_timeout_s=1, stop_timeout=5)  # in this process, not an actor
        cleaner.register_placement_group(pg)
        cleaner.start_monitoring()
        return pg, cleaner

    def state(pg):
        return placement_group_table(pg).get("state", "REMOVED")

    controller = Controller.remote()
    ray_local.get(controller.ping.remote())
    assert controller_state(controller._actor_id.hex()) == "ALIVE"
    pg, _ = watch(ray_cleaner.PlacementGroupCleaner, controller)  # Ray's own: fooled by the miss
    deadline = time.time() + 30
    while state(pg) != "REMOVED" and time.time() < deadline:
        time.sleep(0.1)
    assert state(pg) == "REMOVED"

    import ctal.distributed.pg_cleaner as steady

    checks = []  # the steady cleaner's checks of the controller, counted
    monkeypatch.setattr(steady, "controller_state", lambda actor_id: checks.append(actor_id) or
                        controller_state(actor_id))
    pg, cleaner = watch(SteadyPlacementGroupCleaner, controller)
    deadline = time.time() + 120
    while len(checks) < 20 and time.time() < deadline:
        time.sleep(0.05)
    assert len(checks) >= 20 and state(pg) == "CREATED"  # 20 checks with the State API missing: kept
    ray_local.kill(controller)
    deadline = time.time() + 30
    while state(pg) != "REMOVED" and time.time() < deadline:
        time.sleep(0.1)
    assert state(pg) == "REMOVED"
    assert controller_state(controller._actor_id.hex()) == "DEAD"
    cleaner.stop()


@pytest.mark.slow
def test_a_run_next_to_a_cpu_hog_finishes_with_the_losses_of_the_quiet_run(reference, loaded_then_worker_killed):
    seen = loaded_then_worker_killed
    assert seen["from_step"] < EVERY < seen["to_step"], seen  # a checkpoint and its report under load
    assert seen["resumes_before_kill"] == []  # nothing restarted while the hogs ran
    assert losses(seen["run"]) == reference[1]


@pytest.mark.parametrize("extra, message", [
    (["batch_size=6", "num_workers=4"], r"batch_size: 6 utterances per optimizer step .* over 4 worker\(s\) "
                                        r"x grad_accum_steps=1; use a multiple of 4 \(4 or 8\)"),
    (["batch_size=8", "num_workers=2", "grad_accum_steps=3"], r"use a multiple of 6 \(6 or 12\)"),
])
def test_the_global_batch_must_split_over_workers_before_ray(dataset, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        prepare(make_cfg(dataset, tmp_path, "indivisible", *extra))
    assert prepare(make_cfg(dataset, tmp_path, "budget", *extra, "max_frames_per_batch=400"))  # frames: no count


@pytest.mark.slow
def test_feed_processes_give_the_same_losses_and_a_killed_one_restores_exactly(reference,
                                                                              feed_killed_then_driver_killed):
    """feed_workers=2: each Ray Train worker builds its batches in 2 processes; SIGKILL one of them
    mid-run and the worker fails, restarts from the latest checkpoint and ends on the same losses."""
    _, ref = reference
    seen = feed_killed_then_driver_killed
    run = seen["run"]
    resumed_at = resumes(run)[0]
    # batches the killed process had already handed over are trained on: a checkpoint may follow
    assert seen["feed_kill_at"] - EVERY <= resumed_at < STEPS and resumed_at % EVERY == 0
    assert seen["second"].returncode == 0 and max(read_metrics(run)) == STEPS
    assert losses(run) == ref  # every step after the feed kill's restore, up to the driver kill, is its
    said = seen["first_log"]  # why the group restarted, on the console (issue 30)
    assert f"pid {seen['feed_pid']}" in said and "stopping this worker" in said, said[-3000:]
