"""Multi-node behaviour on one machine: a ``ray.cluster_utils.Cluster`` of several raylets.

- pretraining with 2 workers placed on 2 different nodes logs the same losses as on 1 node;
- a worker node removed mid-run: the run restores from the latest checkpoint on the nodes left
  (the surviving worker's node and a spare) and finishes with the losses of an uninterrupted run;
- a Tune sweep's trials spread over both nodes left.

One pretraining run on the cluster serves both pretraining tests: its 2 workers start on 2 nodes,
one of which is then removed, and every step it logs comes from a group on 2 nodes (before the loss
and after the restore). The uninterrupted run it is held to is the same config in one place without
Ray (``launch_local``: 2 processes, gloo DDP, on the driver's machine; tests/test_pretrain.py holds
its losses to Ray Train's, bitwise): a Ray Train run on one node and an uninterrupted one on two
nodes, half a minute each on 2 cores, proved no more.

Data and runs live behind ``file://`` URIs, i.e. the code path ``s3://``/``gs://`` take: every node
reads and writes through the URI, no node relies on another's disk (the workers stage locally).

The cluster runs in a subprocess (``python tests/test_multinode.py ARGS``) that plays all scenarios
in order on one cluster and writes what it saw to a JSON file: this pytest process may hold the
session's local Ray (``ray_local``), and a process can be connected to one Ray cluster only. Its
``RAY_TMPDIR`` is private, so its sessions and address file never meet another Ray on the machine.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The node is removed once the first checkpoint is uploaded: the 4 checkpoints after it (each
# report waits for the controller's poll) leave a window of seconds, even on a loaded machine.
STEPS, EVERY = 40, 8
NARROW = ["model.hidden_size=32", "model.num_attention_heads=4", "model.intermediate_size=64",
          "model.num_text_layers=1", "model.num_audio_layers=1", "model.max_audio_positions=200",
          "model.max_position_embeddings=66", "max_frames=100"]
PRETRAIN = [*NARROW, f"max_steps={STEPS}", f"checkpoint_every={EVERY}", "log_every=1", "batch_size=4",
            "lr=1e-3", "bucket_pool_rows=16", "keep_checkpoints=2", "seed=3", "num_workers=2",
            "cpus_per_worker=1", "use_gpu=false"]
TIMEOUT_S = 900  # a loaded CI machine: node death detection and worker restarts take minutes there
# The GCS checks each raylet every second instead of every 3 s: a removed node (its raylet killed,
# the check refused at once) is declared dead after 5 failed checks, ~5 s instead of ~15 s. A slow
# raylet is judged as before: each check still waits up to 10 s for its answer.
HEALTH_CHECK_PERIOD_MS = "1000"

pytestmark = pytest.mark.slow


# -- the pytest side ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory):
    """Everything the scenarios observed (``{"error": ...}`` for one that failed) plus the log."""
    from tiny_data import write_tiny_dataset

    root = tmp_path_factory.mktemp("multinode")
    write_tiny_dataset(root / "data", n=48)
    write_tiny_dataset(root / "tune_data", n=36, splits=("train", "dev", "test"), seed=1)
    out = root / "observed.json"
    # A short private RAY_TMPDIR: Ray's socket paths must stay under 107 characters.
    ray_tmp = tempfile.mkdtemp(prefix="ctal-mn-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    (root / "tmp").mkdir()
    # TMPDIR: what killed workers leave behind (their local staging) stays under this test's tmp_path.
    env.update(RAY_TMPDIR=ray_tmp, TMPDIR=str(root / "tmp"), PYTHONPATH=str(REPO),
               CTAL_CACHE_DIR=str(root / "cache"), RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="120",
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5",  # the controller's poll: reports and failures
               RAY_health_check_period_ms=HEALTH_CHECK_PERIOD_MS)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, str(root), str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    def end_the_cluster():
        # Its processes share the subprocess's session: end them by that process group's id.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        end_the_cluster()
        log = f"(timed out after {TIMEOUT_S} s)\n" + proc.communicate()[0]
    finally:
        end_the_cluster()
        proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    observed = json.loads(out.read_text()) if out.is_file() else {}
    observed["log"] = log
    observed["wall_s"] = time.perf_counter() - t0
    return observed


def _scenario(observed: dict, name: str) -> dict:
    got = observed.get(name)
    if not got or "error" in got:
        pytest.fail(f"scenario {name!r} did not complete: {(got or {}).get('error', 'not reached')}\n"
                    f"--- cluster log (tail) ---\n{observed['log'][-6000:]}")
    return got


def test_two_workers_on_two_nodes_log_the_losses_of_one_node(cluster_runs):
    one, two = _scenario(cluster_runs, "one_place"), _scenario(cluster_runs, "node_loss")
    assert sorted(one["losses"], key=int) == [str(s) for s in range(1, STEPS + 1)]
    # the run started on two nodes, and its restarted group ran on two nodes as well
    assert len(set(two["workers_before"])) == 2 and set(two["workers_before"]) <= set(two["nodes"])
    assert len(two["workers_after"]) == 2 and set(two["workers_after"]) <= set(two["nodes"])
    assert two["losses"] == one["losses"]  # step for step, bitwise (CPU, gloo)
    assert two["checkpoint"].startswith("file://") and two["checkpoint"].endswith(f"step-{STEPS:08d}")
    # the driver's log relay lives on the driver's node: losing a worker node must not take it along
    assert two["sink_nodes"] == [two["driver_node"]] and two["driver_node"] not in two["nodes"]


def test_losing_a_worker_node_mid_run_restores_from_the_latest_checkpoint(cluster_runs):
    lost, ref = _scenario(cluster_runs, "node_loss"), _scenario(cluster_runs, "one_place")
    assert lost["removed_at_step"] < STEPS
    assert len(lost["resumes"]) == 1 and lost["resumes"][0] % EVERY == 0 and lost["resumes"][0] > 0
    assert lost["resumes"][0] <= lost["removed_at_step"]
    # the restarted group runs on the nodes left (the survivor's and the spare), not the removed one
    assert set(lost["workers_after"]) == {lost["node_left"], lost["spare"]}
    assert lost["removed_node"] not in lost["workers_after"]
    assert lost["losses"] == ref["losses"]  # the resumed run logs what the uninterrupted one did
    assert lost["final_step"] == STEPS


def test_tune_trials_spread_over_both_nodes(cluster_runs):
    sweep = _scenario(cluster_runs, "tune")
    assert sweep["statuses"] == ["done", "done"], sweep
    assert sweep["n_trial_actors"] == 2
    assert set(sweep["trial_nodes"]) == set(sweep["nodes"]) and len(sweep["nodes"]) == 2
    assert sweep["experiment"].startswith("file://") and sweep["results_csv"]
    assert "model.safetensors" in sweep["best_checkpoint_files"]
    assert "tokenizer" in sweep["best_checkpoint_files"]  # copied from the file:// data set


# -- the cluster side (runs in the subprocess) -------------------------------------------------------


def _actors(cls: str) -> dict[str, dict]:
    """actor id → GCS actor-table entry of every actor (dead ones too) of class ``cls``. The table
    names a class defined in a function by its qualified name when it reaches the GCS pickled
    (``wrap_function.<locals>.ImplicitFunc`` on a multi-node cluster): compare its last part."""
    import ray

    return {a: info for a, info in ray._private.state.actors().items()
            if info["ActorClassName"].rpartition(".")[2] == cls}


def _start_time(pid: int):
    """A process's start time (None once it is gone): a pid alone may have been reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def _pretrain_cfg(root: Path, name: str, *extra):
    from ctal.config import PretrainConfig, load_config

    return load_config(PretrainConfig, [REPO / "configs/pretrain.yaml"],
                       [*PRETRAIN, f"data=file://{root}/data", f"storage_path=file://{root}/runs",
                        f"run_name={name}", *extra])


def _losses(run_uri: str) -> dict[str, float]:
    from ctal.runlog import read_metrics

    return {str(s): m["loss"] for s, m in read_metrics(run_uri).items()}


def _pretrain(root: Path, name: str, *extra) -> dict:
    from ctal.distributed.train import pretrain

    import ray

    before, sinks = set(_actors("RayTrainWorker")), set(_actors("_LogSink"))
    result = pretrain(_pretrain_cfg(root, name, *extra))
    workers = [a for a in _actors("RayTrainWorker").items() if a[0] not in before]
    return {"losses": _losses(str(result.run_dir)), "checkpoint": str(result.checkpoint),
            "worker_nodes": [info["Address"]["NodeID"] for _, info in workers],
            "driver_node": ray.get_runtime_context().get_node_id(),
            "sink_nodes": [i["Address"]["NodeID"] for a, i in _actors("_LogSink").items() if a not in sinks]}


def _node_loss(root: Path, cluster, nodes: dict) -> tuple[dict, list[str]]:
    """Freeze the run after its first checkpoint and remove one of its two nodes; the third worker
    node (a spare) takes its place. Returns what was seen and the worker nodes left."""
    from ctal.checkpoint import CheckpointStore
    from ctal.pretrain import CHECKPOINTS
    from ctal.runlog import read_metrics

    run = f"file://{root}/runs/node-loss"
    box: dict = {}
    before = set(_actors("RayTrainWorker"))

    def train():
        try:
            box["r"] = _pretrain(root, "node-loss", "max_failures=2")
        except BaseException as e:
            box["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    deadline = time.time() + 300
    while not CheckpointStore(f"{run}/{CHECKPOINTS}").list():
        assert thread.is_alive(), f"the run ended before its first checkpoint: {box}"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    workers = {a: i for a, i in _actors("RayTrainWorker").items() if a not in before and i["State"] == "ALIVE"}
    by_node = {i["Address"]["NodeID"]: i["Pid"] for i in workers.values()}
    assert len(by_node) == 2, f"the run's workers are gone already (it finished?): {box}"
    started = {pid: _start_time(pid) for pid in by_node.values()}
    remove_id, keep_id = sorted(by_node)
    spare_id = next(n for n in nodes if n not in by_node)
    survivor = by_node[keep_id]
    os.kill(survivor, signal.SIGSTOP)  # freeze training: the run cannot finish before the loss
    # How far the run got: its newest checkpoint, or a later logged step (the logs are uploaded after
    # the checkpoint, so at this moment they may not be there yet).
    removed_at = max([s for s, _ in CheckpointStore(f"{run}/{CHECKPOINTS}").list()]
                     + [int(s) for s in read_metrics(run)])
    cluster.remove_node(nodes[remove_id], allow_graceful=False)
    gone = by_node[remove_id]
    if _start_time(gone) == started[gone]:  # normally gone with its raylet; never kill a reused pid
        os.kill(gone, signal.SIGKILL)
    os.kill(survivor, signal.SIGCONT)
    thread.join(timeout=420)
    assert not thread.is_alive(), "the run did not finish after the node loss"
    assert "r" in box, f"the run failed after the node loss: {box.get('error')}"
    r = box["r"]
    lines = [json.loads(x) for x in (root / "runs/node-loss/metrics.jsonl").read_text().splitlines()]
    after = {a: i for a, i in _actors("RayTrainWorker").items() if a not in before and a not in workers}
    return {**r, "removed_at_step": removed_at, "node_left": keep_id,
            "removed_node": remove_id, "spare": spare_id, "nodes": sorted(nodes),
            "resumes": [x["step"] for x in lines if x.get("event") == "resume"],
            "workers_before": sorted(by_node),
            "workers_after": sorted({i["Address"]["NodeID"] for i in after.values()}),
            "final_step": max(int(s) for s in r["losses"])}, [keep_id, spare_id]


def _one_place(root: Path) -> dict:
    """The same config's uninterrupted run in this process's machine, without Ray."""
    from ctal.pretrain import launch_local

    run = f"file://{root}/runs/one-place"
    launch_local(_pretrain_cfg(root, "one-place"), run)
    return {"losses": _losses(run)}


def _alive_worker_nodes() -> list[str]:
    import ray

    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)


def _tune(root: Path, nodes: list[str]) -> dict:
    from ctal import storage
    from ctal.config import FinetuneConfig, SweepConfig, load_config
    from ctal.distributed.tune import run_sweep
    from ctal.search_space import parse_search_space

    cfg = load_config(FinetuneConfig, [REPO / "configs/finetune.yaml"],
                      [*NARROW, "task=sentiment", f"data=file://{root}/tune_data", "epochs=1", "batch_size=8",
                       "lr=1e-3", "max_frames=80"])
    space = parse_search_space({"lr": {"choice": [1e-3, 3e-3]}, "fusion": "ctal"})
    opts = SweepConfig(search="grid", scheduler="fifo", cpus_per_trial=1, storage=f"file://{root}/tune",
                       name="spread", verbose=0)
    before = set(_actors("ImplicitFunc"))  # Tune's actor class for a function trainable
    result = run_sweep(cfg, space, opts)
    trials = {a: i for a, i in _actors("ImplicitFunc").items() if a not in before}
    best = storage.join(str(result.experiment), "best_checkpoint")
    return {"statuses": sorted(result.table["status"].tolist()), "nodes": nodes,
            "trial_nodes": sorted({i["Address"]["NodeID"] for i in trials.values()}),
            "n_trial_actors": len(trials),
            "experiment": str(result.experiment),
            "results_csv": storage.is_file(storage.join(str(result.experiment), "results.csv")),
            "best_checkpoint_files": storage.listdir(best)}


def _play(root: Path, out: Path) -> None:
    import traceback

    import ray
    from ray.cluster_utils import Cluster

    observed: dict = {}

    def step(name, fn):
        t = time.perf_counter()
        try:
            observed[name] = fn()
        except BaseException as e:  # record and go on: the next scenario may still tell something
            observed[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
            print(f"== {name} failed: {type(e).__name__}: {e}", flush=True)
        observed.setdefault("timings_s", {})[name] = round(time.perf_counter() - t, 1)
        out.write_text(json.dumps(observed, indent=1))
        print(f"== {name}: {time.perf_counter() - t:.1f} s", flush=True)

    t = time.perf_counter()
    # Ray Train's PlacementGroupCleaner looks its controller up through the state API, which finds a
    # cluster by scanning the machine for GCS processes: with other Ray instances about, it may ask
    # the wrong one, be told the controller is gone and remove our placement group. RAY_ADDRESS,
    # inherited by every process of this cluster, pins it to ours.
    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    os.environ["RAY_ADDRESS"] = f"{ray._private.services.get_node_ip_address()}:{port}"
    # A CPU-less head: the driver and Ray's controllers live there, every worker on a worker node.
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False, "gcs_server_port": port})
    # Three 1-CPU worker nodes: two for the 2 workers, one spare to take over a lost node's worker.
    nodes = {n.node_id: n for n in (cluster.add_node(num_cpus=1) for _ in range(3))}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    observed.setdefault("timings_s", {})["start"] = round(time.perf_counter() - t, 1)

    step("one_place", lambda: _one_place(root))
    box = {}

    def loss():
        got, box["left"] = _node_loss(root, cluster, nodes)
        return got

    step("node_loss", loss)
    # The nodes the node-loss scenario left; if it failed, the worker nodes alive now (so the sweep's
    # own test still says something on its own).
    step("tune", lambda: _tune(root, box.get("left") or _alive_worker_nodes()))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    _play(Path(sys.argv[1]), Path(sys.argv[2]))
