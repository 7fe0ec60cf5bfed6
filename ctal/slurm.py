"""What a Slurm allocation holds, read from the SLURM_* variables of a job (slurm/ctal.sbatch).

Pretraining inside a job sizes its workers by the allocation unless told otherwise
(``worker_defaults``); a claim left by an earlier run of a requeued job is that job's own
(``same_job_earlier_run``, ctal.outputs). Outside Slurm both are inert.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Optional


def cpus_per_node(env: Mapping[str, str]) -> list[int]:
    """SLURM_JOB_CPUS_PER_NODE (``"72(x2),36"``) as one count per node."""
    counts = []
    for part in env.get("SLURM_JOB_CPUS_PER_NODE", "").split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            counts += [int(m[1])] * int(m[2] or 1)
    return counts


def worker_defaults(env: Mapping[str, str], num_workers: Optional[int] = None, given=()) -> dict:
    """``{"num_workers", "cpus_per_worker"}`` for pretraining in this allocation, less the keys in
    ``given`` (set by the user); {} outside Slurm.

    One worker per GPU (nodes x SLURM_GPUS_ON_NODE), else one per node; ``num_workers``, when given,
    is kept. Each worker gets an even share of its node's CPUs (the smallest node's, as Ray Train
    spreads workers evenly), the fraction rounded down to what Ray resolves."""
    nodes, cpus = int(env.get("SLURM_JOB_NUM_NODES") or 0), cpus_per_node(env)
    if "SLURM_JOB_ID" not in env or not nodes or not cpus:
        return {}
    gpus = int(env.get("SLURM_GPUS_ON_NODE") or 0)
    workers = num_workers or nodes * max(gpus, 1)
    per_node = math.ceil(workers / nodes)
    layout = {"num_workers": workers, "cpus_per_worker": max(math.floor(min(cpus) / per_node * 100) / 100, 0.01)}
    return {k: v for k, v in layout.items() if k not in given}


def job_run(env: Mapping[str, str]) -> Optional[dict]:
    """This process's Slurm job and which run of it (requeued jobs keep their id, the count grows)."""
    if "SLURM_JOB_ID" not in env:
        return None
    return {"job": env["SLURM_JOB_ID"], "run": int(env.get("SLURM_RESTART_COUNT") or 0)}


def same_job_earlier_run(claim: Mapping, env: Mapping[str, str]) -> bool:
    """Whether ``claim`` (ctal.outputs) was taken by an earlier run of this requeued job: that run is
    over (Slurm ends a job before starting it again), wherever it ran."""
    mine, theirs = job_run(env), claim.get("slurm")
    return bool(mine and isinstance(theirs, dict) and theirs.get("job") == mine["job"]
                and int(theirs.get("run", 0)) < mine["run"])
