"""slurm/ctal.sbatch under a real Slurm: one machine, slurmctld + slurmd on loopback (slow tier).

- pretraining submitted as ``sbatch slurm/ctal.sbatch python pipelines/pretrain.py ...`` completes,
  with its workers sized by the allocation (``ctal.slurm``), checkpoints and metrics in --storage;
- a two-trial sweep submitted the same way, requeued after its first trial, continues from its
  signed state (the script adds --resume) and completes with its results table and best checkpoint;
- a job signalled as at its time limit (--signal=B:USR1) requeues itself and runs again;
- a pretraining job requeued mid-run (``scontrol requeue``) is started again by Slurm, is not
  refused by its first run's claim, resumes from its newest checkpoint and logs the losses of the
  uninterrupted run step for step.

Each job run starts Ray (minutes on 2 cores), so the jobs are few: the requeued pretraining job is
also the one whose allocation, Ray cluster and run the first test reads, and the uninterrupted
run it is held to is the same config run without Slurm or Ray (``launch_local``: 2 processes,
gloo DDP; tests/test_pretrain.py holds its losses to Ray Train's, bitwise).

The default tier checks what needs no Slurm: workers sized by SLURM_* variables, a requeued job's
takeover of its earlier run's claim (from another node too), the script's syntax and usage line.

Slurm (Debian's slurm-wlm 22.05 and munge) is installed with apt-get when missing; the tests skip
where that cannot be done (not root, no apt-get or no network) or where Linux namespaces cannot be
made. The Slurm daemons and their jobs live in a PID and mount namespace of their own: a job's
``ray stop`` (``ray symmetric-run`` ends with it) stops the Ray processes it can see, and there it
sees only its own, never this pytest's Ray or another's on the machine; and ending the namespace's
first process ends every process in it, whatever a failed test left running. (A network namespace
would keep ports apart too, but slurmd cannot bind its port in one here; Slurm's and Ray's GCS ports
are free ones instead.)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from ctal.checkpoint import CHECKPOINTS
from ctal.outputs import claim_output, release_output
from ctal.runlog import read_metrics
from ctal.slurm import worker_defaults
from test_pretrain import checkpoint_steps, losses, resumes

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "ctal.sbatch"
STEPS, EVERY = 20, 5
NARROW = ["model.hidden_size=32", "model.num_attention_heads=4", "model.intermediate_size=64",
          "model.num_text_layers=1", "model.num_audio_layers=1", "model.max_audio_positions=200",
          "model.max_position_embeddings=66", "max_frames=100"]
PRETRAIN = [*NARROW, f"max_steps={STEPS}", f"checkpoint_every={EVERY}", "log_every=1", "batch_size=4",
            "lr=1e-3", "bucket_pool_rows=16", "keep_checkpoints=2", "seed=3", "use_gpu=false"]
SWEEP = [*NARROW, "epochs=1", "batch_size=8", "lr=1e-3", "sweep.search=grid", "sweep.scheduler=fifo"]
JOB_S = 600  # the longest wait for one job; a requeued job took 6 minutes in all at load average 25


# -- the allocation and the claims, without Slurm (default tier) ----------------------------------


@pytest.mark.parametrize("env, num_workers, given, expected", [
    ({}, None, (), {}),  # outside Slurm: nothing changes
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_CPUS_PER_NODE": "48(x2)",
      "SLURM_GPUS_ON_NODE": "4"}, None, (), {"num_workers": 8, "cpus_per_worker": 12}),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_CPUS_PER_NODE": "8(x2),6"},
     None, (), {"num_workers": 3, "cpus_per_worker": 6}),  # one worker per CPU node, the smallest node's CPUs
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_CPUS_PER_NODE": "2"},
     3, ("num_workers",), {"cpus_per_worker": 0.66}),  # given workers kept, CPUs shared, rounded down
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_CPUS_PER_NODE": "16", "SLURM_GPUS_ON_NODE": "2"},
     None, ("cpus_per_worker",), {"num_workers": 2}),
])
def test_pretraining_workers_follow_the_slurm_allocation_unless_given(env, num_workers, given, expected):
    assert worker_defaults(env, num_workers, given) == expected


def test_a_requeued_job_takes_over_its_earlier_runs_claim_from_any_node_and_no_other(tmp_path, monkeypatch):
    out = tmp_path / "run"
    claims = tmp_path / "run.claims"
    claims.mkdir()
    other_node = {"host": "node-that-ran-it", "pid": 1, "started": "then"}
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for holder in ({**other_node, "slurm": {"job": "40", "run": 0}},  # another job
                   {**other_node, "slurm": {"job": "41", "run": 1}},  # this very run, elsewhere
                   {**other_node, "slurm": None}):  # not a Slurm job
        (claims / "a.json").write_text(json.dumps(holder))
        with pytest.raises(FileExistsError, match="is being written by another run"):
            claim_output(out, say=print)
    (claims / "a.json").write_text(json.dumps({**other_node, "slurm": {"job": "41", "run": 0}}))
    said = []
    mine = claim_output(out, say=said.append)
    assert "removed the claim of an earlier run" in said[0] and json.loads(Path(mine).read_text())["slurm"] == {
        "job": "41", "run": 1}
    release_output(mine)
    assert not claims.exists()


def test_the_batch_script_is_valid_bash_and_refuses_no_command():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    done = subprocess.run(["bash", SCRIPT], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("usage: sbatch")



# -- Slurm on this machine --------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _install_slurm() -> str:
    """'' when slurmctld, slurmd, munged and the clients are there (installed now if need be), else
    why not."""
    tools = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "squeue", "unshare")
    if all(shutil.which(t) for t in tools):
        return ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and cannot be (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge", "util-linux"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode:
            return f"could not install Slurm ({' '.join(cmd)}): {done.stderr.strip()[-300:]}"
    missing = [t for t in tools if not shutil.which(t)]
    return f"installed, but {', '.join(missing)} missing" if missing else ""


def _conf(root: Path, node: str, cpus: int, ports: list[int]) -> str:
    # One node on loopback; linuxproc and task/none: no cgroups needed. Requeued jobs may start again
    # once the old run's credential expires (cred_expire, default 120 s): 5 s here. The main scheduling
    # loop runs every second (sched_interval, default 60 s): a requeued job whose begin time has passed
    # waits for that loop, which left it pending 20 to 60 s after it was eligible.
    return f"""\
ClusterName=ctaltest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket,cred_expire=5
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=3600
KillWait=20
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


BOOT = """\
set -e
munged --force --socket={r}/munge.socket --key-file={r}/munge.key --pid-file={r}/munged.pid \
    --log-file={r}/munged.log --seed-file={r}/munge.seed
slurmctld -f {r}/slurm.conf
slurmd -D -f {r}/slurm.conf -N {node} &
wait  # this shell is the namespace's init: it reaps what jobs orphan (Ray's daemons), so `ray stop` sees them go
"""


class Slurm:
    """A single-machine Slurm in namespaces of its own (module docstring); clients run inside them."""

    def __init__(self, root: Path):
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        for d in ("state", "spool"):
            (root / d).mkdir(mode=0o700)
        (root / "munge.key").write_bytes(os.urandom(1024))
        (root / "munge.key").chmod(0o400)
        self.ports = free_ports(3)  # slurmctld, slurmd, Ray's GCS
        (root / "slurm.conf").write_text(_conf(root, self.node, os.cpu_count() or 2, self.ports))
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf"), "PYTHONPATH": str(REPO),
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)  # Ray's own poll, as a user's job has it
        self.env["CTAL_RAY_PORT"] = str(self.ports[2])
        # --kill-child: when unshare dies, so does the namespace's first process, and with it all in it
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--mount-proc", "--fork", "--kill-child", "bash", "-c",
             BOOT.format(r=root, node=self.node)],
            env=self.env, stdout=open(root / "boot.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.init_pid = self._first_child()
        self.wait(lambda: "State=IDLE" in self.run("scontrol", "show", "node", self.node, check=False).stdout,
                  60, "the Slurm node did not come up")

    def _first_child(self) -> int:
        deadline = time.time() + 10
        while time.time() < deadline:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            if kids.is_file() and kids.read_text().split():
                return int(kids.read_text().split()[0])
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"the Slurm namespace did not start: {self.log('boot.log')}")

    def run(self, *cmd, check=True, **kw) -> subprocess.CompletedProcess:
        """A Slurm client command (from this namespace: they speak to the daemons by TCP)."""
        done = subprocess.run(list(cmd), env={**self.env, **kw.pop("env", {})},
                              capture_output=True, text=True, timeout=60, cwd=REPO, **kw)
        if check and done.returncode:
            raise AssertionError(f"{' '.join(cmd)}: rc {done.returncode}: {done.stderr}")
        return done

    def sbatch(self, *args, env=None) -> str:
        out = self.run("sbatch", "--parsable", "--chdir", str(REPO), *map(str, args), env=env or {}).stdout
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, ready, timeout: float, what: str):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = ready()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"Slurm stopped: {self.log('slurmctld.log')}{self.log('slurmd.log')}")
            time.sleep(0.5)
        raise AssertionError(f"{what} within {timeout:.0f} s")

    def finished(self, job_id: str, timeout: float = JOB_S) -> dict:
        """The job's record once it has ended (COMPLETED, FAILED, ...)."""
        ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
        return self.wait(lambda: (j := self.job(job_id)).get("JobState") in ended and j, timeout,
                         f"job {job_id} did not end")

    def log(self, name: str) -> str:
        path = self.root / name
        return f"\n--- {name}\n{path.read_text()[-4000:]}" if path.is_file() else ""

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # unshare; --kill-child takes the namespace with it
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = _install_slurm()
    if why:
        pytest.skip(why)
    if subprocess.run(["unshare", "--pid", "--mount-proc", "--fork", "true"],
                      capture_output=True).returncode:
        pytest.skip("cannot create Linux namespaces here (unshare --pid --mount-proc)")
    # short: munge's and Ray's socket paths must stay under 107 characters
    root = Path(subprocess.check_output(["mktemp", "-d", "/tmp/ctal-slurm-XXXXXX"], text=True).strip())
    root.chmod(0o700)
    cluster = None
    try:
        cluster = Slurm(root)
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- jobs ------------------------------------------------------------------------------------------


def pretrain_job(slurm: Slurm, data: Path, storage: Path, name: str) -> str:
    return slurm.sbatch("--output", storage / f"{name}.out", SCRIPT, sys.executable, "pipelines/pretrain.py",
                        "--data", data, "--size", "narrow", "--storage", storage, "--name", name,
                        "--num-workers", 2, *PRETRAIN)


def ended_well(slurm: Slurm, job: str, out: Path) -> dict:
    rec = slurm.finished(job)
    assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), out.read_text()[-6000:]
    return rec


def pretrain_cfg(data: Path, storage: Path, name: str):
    """What ``pipelines/pretrain.py --size narrow --num-workers 2`` builds from PRETRAIN in a job
    holding this whole machine (ctal.slurm sizes cpus_per_worker, hence the workers' torch threads)."""
    from ctal.config import PretrainConfig, load_config

    cfg = load_config(PretrainConfig, [REPO / "configs/pretrain.yaml", REPO / "configs/narrow.yaml"],
                      [f"data={data}", "num_workers=2", f"storage_path={storage}", f"run_name={name}", *PRETRAIN])
    allocation = {"SLURM_JOB_ID": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_CPUS_PER_NODE": str(os.cpu_count())}
    return replace(cfg, **worker_defaults(allocation, 2, {"num_workers"}))


@pytest.fixture(scope="module")
def reference(synthetic_data, tmp_path_factory) -> Path:
    """The uninterrupted run of the jobs' config, without Slurm or Ray: its run directory."""
    from ctal.pretrain import launch_local

    storage = tmp_path_factory.mktemp("reference")
    launch_local(pretrain_cfg(synthetic_data("librispeech"), storage, "reference"), storage / "reference")
    return storage / "reference"


@pytest.fixture(scope="module")
def requeued(slurm, synthetic_data, tmp_path_factory) -> dict:
    """A pretraining job requeued (``scontrol requeue``) once past its first checkpoint, and ended:
    its run directory, output, Slurm record, newest checkpoint and last logged step at the requeue."""
    storage = tmp_path_factory.mktemp("runs")
    run, out = storage / "requeued", storage / "requeued.out"
    job = pretrain_job(slurm, synthetic_data("librispeech"), storage, "requeued")

    def past_first_checkpoint():
        logged = read_metrics(run) if (run / "metrics.jsonl").is_file() else {}
        return logged and max(logged) > EVERY and (run / CHECKPOINTS).is_dir() and checkpoint_steps(run)

    slurm.wait(past_first_checkpoint, JOB_S, f"job {job} did not pass its first checkpoint")
    slurm.run("scontrol", "requeue", job)
    saved = max(checkpoint_steps(run))  # the first run goes on until SIGTERM lands: it may save one more
    logged = max(read_metrics(run))
    rec = ended_well(slurm, job, out)
    return {"run": run, "out": out.read_text(), "rec": rec, "saved": saved, "logged_at_requeue": logged}


@pytest.mark.slow
def test_sbatch_pretraining_runs_ray_on_the_allocation_and_writes_its_run(requeued):
    run, out = requeued["run"], requeued["out"]
    assert "On head node. Starting Ray cluster head" in out  # ray symmetric-run started Ray
    assert f"Slurm allocation: cpus_per_worker={os.cpu_count() // 2:g}" in out  # 2 workers share the node
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    assert (run / CHECKPOINTS / f"step-{STEPS:08d}" / "checkpoint.json").is_file()
    assert not (run.parent / "requeued.claims").exists()  # released at the end


@pytest.mark.slow
def test_a_sweep_near_its_time_limit_after_its_first_trial_requeues_itself_resumes_and_completes(
        slurm, synthetic_data, tmp_path):
    """The time-limit path (--signal=B:USR1@180 makes the job requeue itself) and a sweep's resume from
    its signed state (the script adds --resume to the second run), in one job: each Slurm job starts
    Ray twice here, minutes on 2 cores."""
    space = tmp_path / "space.yaml"
    space.write_text("fusion: {choice: [ctal, late_concat]}\n")
    out = tmp_path / "sweep.out"
    job = slurm.sbatch("--output", out, SCRIPT, sys.executable, "pipelines/tune_finetune.py",
                       "--task", "sentiment", "--data", synthetic_data("mosei"), "--space", space,
                       "--cpus-per-trial", 1, "--max-concurrent", 1, "--storage", tmp_path / "tune",
                       "--name", "sweep", *SWEEP)
    slurm.wait(lambda: out.is_file() and re.search(r"trial \S+ \(.*\): best", out.read_text()), JOB_S,
               f"job {job} did not finish its first trial")
    # what --signal=B:USR1@180 sends the batch shell 3 minutes before the time limit, sent now
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    rec = ended_well(slurm, job, out)
    assert rec["Restarts"] == "1", rec
    log = out.read_text()
    assert "time limit near: requeueing" in log
    assert "(run 2)" in log and "resuming " in log  # the script gave the second run --resume
    table = (tmp_path / "tune" / "sweep" / "results.csv").read_text().splitlines()
    assert len(table) == 3 and all(",done," in row for row in table[1:]), table
    assert (tmp_path / "tune" / "sweep" / "best_checkpoint" / "checkpoint.json").is_file()


@pytest.mark.slow
def test_a_requeued_pretraining_job_resumes_with_the_uninterrupted_losses(requeued, reference):
    run, log, saved = requeued["run"], requeued["out"], requeued["saved"]
    assert requeued["logged_at_requeue"] < STEPS, "the job finished before it was requeued"
    assert requeued["rec"]["Restarts"] == "1", requeued["rec"]
    [resumed_at] = resumes(run)
    assert saved <= resumed_at < STEPS and resumed_at % EVERY == 0
    assert "(run 2)" in log and "is being written by another run" not in log  # not refused by its own claim
    assert f"resumed from {run / CHECKPOINTS / f'step-{resumed_at:08d}'}" in log
    assert sorted(losses(reference)) == list(range(1, STEPS + 1)) and resumes(reference) == []
    assert losses(run) == losses(reference)
