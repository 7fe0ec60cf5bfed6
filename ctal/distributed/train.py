"""CTAL pretraining on Ray Train: a TorchTrainer whose workers run ``ctal.pretrain.pretrain_loop``.

Resources, failure policy and storage all come from ``PretrainConfig``. The run is checked once, on
the driver before Ray starts (``ctal.pretrain_plan.prepare``); the workers get the checked plan. The run directory is
``<storage_path>/<run_name>`` (Ray's experiment directory), so rerunning with the same name resumes
after a driver death and a restarted worker group (``max_failures``) resumes from the newest intact
checkpoint there. The loop manages its own checkpoints (atomic, last M kept, damaged ones skipped)
and reports metrics to Ray only at checkpoints: reporting every step throttles to the controller's
2 s poll (DESIGN.md). ``data`` and ``storage_path`` may be pyarrow URIs (``s3://``, ``gs://``,
``file://``; ctal.storage), which every node reads and writes alike; a plain path on a multi-node
cluster must be a shared mount (NFS/EFS) at the same path on every node.

Console (ctal.distributed.console): rank 0's log lines travel to the driver, which prints them and
moves a step bar with the time left; Ray's own output stays hidden unless ``--verbose``. The
trainer's placement-group cleaner acts only on a controller death the GCS confirms
(ctal.distributed.pg_cleaner), so a busy machine's State-API miss does not end a healthy run.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Optional

import ray
import ray.train
import ray.train.torch
import torch
import yaml

from .. import manifest, outputs, storage
from ..checkpoint import CHECKPOINTS, CheckpointStore, latest_checkpoint
from ..config import PretrainConfig, from_dict, to_dict
from ..console import Progress
from ..pretrain import PretrainPlan, pretrain_loop, prepare
from ..runlog import read_metrics, step_of
from .console import LogRelay, init_ray
from .torch_backend import torch_trainer


class ResourceError(RuntimeError):
    """The run asks for more than the Ray cluster has (raised before any worker starts)."""


@dataclass
class Resources:
    num_workers: int
    cpus_per_worker: float
    use_gpu: bool
    note: str = ""  # what was adjusted, if anything


def cluster_capacity() -> tuple[dict, bool]:
    """(resources the Ray cluster has or can grow to, whether it autoscales).

    An autoscaling cluster (``ray up cluster.yaml``) may hold no GPU node yet; its ceiling comes
    from the autoscaler's config as published in the GCS (what Ray Train itself checks), else from
    the launcher's ``~/ray_bootstrap_config.yaml`` on the head node. Elsewhere: what is there now.
    """
    now = dict(ray.cluster_resources())
    ceiling: dict = {}
    try:
        from ray._private.state import state  # private, but it is Ray Train's own pre-start check
        ceiling = state.get_max_resources_from_cluster_config() or {}
    except Exception:
        pass
    boot = Path("~/ray_bootstrap_config.yaml").expanduser()
    if not ceiling and boot.is_file():
        conf = yaml.safe_load(boot.read_text()) or {}
        for name, node in (conf.get("available_node_types") or {}).items():
            count = 1 if name == conf.get("head_node_type") else int(node.get("max_workers", 0))
            for k, v in (node.get("resources") or {}).items():
                ceiling[k] = ceiling.get(k, 0) + count * v
    if not ceiling:
        return now, False
    return {k: max(now.get(k, 0), ceiling.get(k, 0)) for k in set(now) | set(ceiling)}, True


def plan_resources(cfg: PretrainConfig, cluster: dict) -> Resources:
    """What each worker gets on a cluster with ``cluster`` resources (``cluster_capacity()``).

    Asking for more than the cluster has raises ResourceError naming both, unless
    ``shrink_cpus_per_worker`` lets per-worker CPUs shrink to fit (GPUs never shrink). Without this
    check Ray retries the worker-group start forever (DESIGN.md). A request within an autoscaling
    cluster's ceiling passes: the pending workers make the autoscaler add nodes.
    """
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    n = cfg.num_workers
    use_gpu = {"true": True, "false": False, "auto": gpus > 0}[cfg.use_gpu]
    if use_gpu and gpus < n:
        raise ResourceError(f"asked for {n} workers x 1 GPU = {n} GPUs, the Ray cluster has {gpus:g} GPUs "
                            f"(and {cpus:g} CPUs): lower num_workers to {int(gpus)} or set use_gpu=false")
    per = cfg.cpus_per_worker
    if n * per <= cpus + 1e-9:
        return Resources(n, per, use_gpu)
    asked = (f"asked for {n} workers x {per:g} CPUs = {n * per:g} CPUs, the Ray cluster has {cpus:g} CPUs"
             + (f" and {gpus:g} GPUs" if gpus else ""))
    if not cfg.shrink_cpus_per_worker:
        raise ResourceError(f"{asked}: lower num_workers or cpus_per_worker, or set "
                            "shrink_cpus_per_worker=true to fit the workers into the CPUs there are")
    shrunk = math.floor(cpus / n * 100) / 100  # Ray resolves fractional CPUs to 1/10000
    if shrunk <= 0:
        raise ResourceError(f"{asked}: even shrunk, {n} workers do not fit")
    return Resources(n, shrunk, use_gpu, note=f"{asked}; shrinking to {shrunk:g} CPUs per worker "
                                             f"({n * shrunk:g} CPUs in all)")


def _train_fn(config: dict) -> None:
    """What each Ray Train worker runs."""
    plan = PretrainPlan(from_dict(PretrainConfig, config["cfg"]), config["tokenizer"], config["report"])  # checked
    manifest.adopt(config["run"])  # the checkpoints name the driver's run and command line
    # fractional CPUs → 1 thread; the feed processes (feed_workers) take their share of the worker's CPUs
    torch.set_num_threads(max(1, int(config["cpus_per_worker"]) - plan.cfg.feed_workers))
    ctx = ray.train.get_context()

    def report(metrics: dict, checkpoint_path: Optional[str]) -> None:
        # Every rank must call report the same number of times; metrics only, the loop owns checkpoints.
        ray.train.report({**metrics, "checkpoint": checkpoint_path or ""})

    def log(msg: str) -> None:
        # Rank 0 speaks through the driver (ctal.distributed.console); the other ranks only repeat it.
        # Not print: Ray Train patches it to both print and log, so every line showed up twice.
        if ctx.get_world_rank() == 0:
            config["log"](msg)
        else:
            sys.stdout.write(msg + "\n")
            sys.stdout.flush()

    pretrain_loop(plan, run_dir=config["run_dir"], rank=ctx.get_world_rank(),
                  world_size=ctx.get_world_size(), device=ray.train.torch.get_device(),
                  prepare_model=ray.train.torch.prepare_model, report=report, log=log,
                  alert=config["log"])  # any rank's reason to stop reaches the driver


@dataclass
class PretrainResult:
    run_dir: Path | str  # a URI string when storage_path is one
    # newest checkpoint: CTALForPretraining.from_pretrained(checkpoint), or its URI:
    # from_pretrained(ctal.checkpoint.local_copy(checkpoint))
    checkpoint: Optional[Path | str]
    metrics: dict
    resources: Resources


def pretrain(cfg: PretrainConfig | PretrainPlan, *, address: Optional[str] = None, log=print) -> PretrainResult:
    """Pretrain CTAL with Ray Train. ``cfg``: a config, checked here before Ray starts, or the plan
    ``ctal.pretrain_plan.prepare`` made of one. Starts Ray (``ray.init(address)``) unless already connected."""
    plan = cfg if isinstance(cfg, PretrainPlan) else prepare(cfg)
    cfg = plan.cfg
    run_dir = storage.join(cfg.storage_path, cfg.run_name)
    run_dir = run_dir if storage.is_uri(run_dir) else Path(run_dir)
    with outputs.claimed(run_dir, log):  # one run per run directory: a second is refused before Ray
        return _pretrain(plan, run_dir, address, log)


def _pretrain(plan: PretrainPlan, run_dir: Path | str, address: Optional[str], log) -> PretrainResult:
    cfg = plan.cfg
    init_ray(address)
    capacity, autoscaling = cluster_capacity()
    res = plan_resources(cfg, capacity)
    if res.note:
        log(f"note: {res.note}")
    if autoscaling:
        log(f"autoscaling cluster: now {dict(ray.cluster_resources())}, up to {capacity}")
    local = [k for k in ("data", "storage_path") if not storage.is_uri(getattr(cfg, k))]
    if local and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        log(f"note: {' and '.join(local)} {'is a' if len(local) == 1 else 'are'} local path(s) on a multi-node "
            "cluster: every node must see them at the same path (a shared mount), else use s3:// or gs://")
    resources = {"CPU": res.cpus_per_worker, **({"GPU": 1} if res.use_gpu else {})}
    done = [s for s, _ in CheckpointStore(storage.join(run_dir, CHECKPOINTS)).list()]
    with manifest.recorded_run(run_dir, "pretraining", cfg) as run, \
            Progress(cfg.max_steps, "pretrain", unit="steps", initial=max(done, default=0)) as bar, \
            LogRelay(partial(_show, bar)) as relay:
        trainer = torch_trainer(
            _train_fn,
            train_loop_config={"cfg": to_dict(replace(cfg, cpus_per_worker=res.cpus_per_worker)),
                               "tokenizer": plan.tokenizer, "report": plan.report, "run_dir": str(run_dir),
                               "cpus_per_worker": res.cpus_per_worker, "log": relay.sender(),
                               "run": manifest.run_info()},
            scaling_config=ray.train.ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(name=cfg.run_name, storage_path=cfg.storage_path,
                                           failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                                           # keep Ray Train's own INFO chatter out of the loop's log
                                           logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        )
        trainer.fit()
        run["outputs"] = {"checkpoint": str(latest_checkpoint(run_dir))}
    logged = read_metrics(run_dir)
    return PretrainResult(run_dir=run_dir, checkpoint=latest_checkpoint(run_dir),
                          metrics=logged[max(logged)] if logged else {}, resources=res)


def _show(bar: Progress, line: str) -> None:
    """A line from rank 0, printed by the driver; a step line also moves the bar."""
    step = step_of(line)
    if step is not None:
        bar.set(step)
    bar.write(line)
