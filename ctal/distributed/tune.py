"""Ray Tune sweeps of CTAL fine-tuning: hyperparameters and fusion variants per task (the Ray glue).

The search space (`ctal.search_space`) and the sweep settings (`ctal.config.SweepConfig`) are checked
before Ray starts (`check_sweep`). Each trial runs `ctal.finetune.finetune` (or, with workers_per_trial
> 1, a TorchTrainer whose workers run it under DDP) and reports the epoch's dev metrics with a
checkpoint. ASHA stops weak trials at epoch rungs; Optuna, random or grid search proposes them. At the
end, from Tune's ResultGrid: a results table (CSV + Markdown) and plots (`ctal.report`), and the best
checkpoint copied to `<experiment>/best_checkpoint`, loadable with
`CTALForSequenceClassification.from_pretrained` (per fold for emotion) and `ctal.finetune.evaluate`.
With a URI storage (s3://, gs://, file://) Tune writes there and the summary is uploaded beside it.
"""
from __future__ import annotations

import json
import os
import posixpath
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

from ray.tune import Callback

from ctal import manifest, storage
from ctal.config import ConfigError, FinetuneConfig, SweepConfig, from_dict, to_dict
from ctal.console import Progress
from ctal.data import TaskData
from ctal.finetune import FRESH_MODEL_WARNING, finetune, prepare
from ctal.redact import redact
from ctal.report import SweepResult
from ctal.search_space import SearchSpace, apply_params, check_sweep, parse_search_space
from ctal.tasks import get_task

from .results import published, summarize
from .signing import StateSigner, sign_sweep, verify_state

SWEEP_FILE = "sweep.json"


# --------------------------------------------------------------------------------------------------
# the trial


def _trial(params: dict, *, base: dict, data: TaskData, sweep: dict, train_storage: str, run: dict) -> None:
    """One Tune trial: fine-tune with the sampled `params`, reporting every epoch."""
    import torch
    from ray import tune

    manifest.adopt(run)  # the trial's checkpoints name the sweep's manifest and command line
    cfg = apply_params(base, params)
    workers = sweep["workers_per_trial"]
    torch.set_num_threads(max(1, int(sweep["cpus_per_trial"] / workers)))  # Ray gives CPUs, not threads
    if workers > 1:
        return _trial_ddp(cfg, data, sweep, train_storage)
    checkpoint = tune.get_checkpoint()  # set when Tune resumes this trial

    def report(metrics, ckpt_dir):
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(ckpt_dir))

    if checkpoint is None:
        finetune(cfg, data=data, report=report)
    else:
        with checkpoint.as_directory() as d:
            finetune(cfg, data=data, report=report, resume_from=d)


def _trial_ddp(cfg: FinetuneConfig, data: TaskData, sweep: dict, train_storage: str) -> None:
    """workers_per_trial > 1: a TorchTrainer runs the same loop under DDP; TuneReportCallback passes
    each epoch's metrics (and the checkpoint's path as `checkpoint_path`) on to Tune."""
    import ray
    import ray.train
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .torch_backend import torch_trainer

    workers, gpus = sweep["workers_per_trial"], sweep["gpus_per_trial"]
    per_worker = {"CPU": sweep["cpus_per_trial"] / workers, **({"GPU": gpus / workers} if gpus else {})}
    trainer = torch_trainer(
        _ddp_worker,
        train_loop_config={"cfg": to_dict(cfg), "data": ray.put(data), "run": manifest.run_info()},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpus > 0,
                                               resources_per_worker=per_worker),
        # A stable name per trial: a trial resumed by Tuner.restore resumes its Train run too.
        run_config=ray.train.RunConfig(name=tune.get_context().get_trial_id(), storage_path=train_storage,
                                       callbacks=[TuneReportCallback()],
                                       failure_config=ray.train.FailureConfig(max_failures=0)))
    trainer.fit()


def _ddp_worker(config: dict) -> None:
    import ray
    import ray.train
    from ray.train.torch import prepare_model

    ctx = ray.train.get_context()
    manifest.adopt(config["run"])
    cfg = from_dict(FinetuneConfig, config["cfg"])
    data = ray.get(config["data"]) if isinstance(config["data"], ray.ObjectRef) else config["data"]

    def report(metrics, ckpt_dir):
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)

    def prepare(model):  # fusion variants leave parameters unused (e.g. text_only: the audio stream)
        return prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    checkpoint = ray.train.get_checkpoint()
    kwargs = dict(data=data, report=report, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                  prepare_model=prepare)
    if checkpoint is None:
        finetune(cfg, **kwargs)
    else:
        with checkpoint.as_directory() as d:
            finetune(cfg, resume_from=d, **kwargs)


class RestoresWhatExists:
    """Mixin for our Tune trainables (``resumable``): a resumed trial whose state names a checkpoint
    that is gone restarts from its newest checkpoint still on storage, else from scratch, with a
    warning, instead of failing ("does not exist on storage anymore"). Tune deletes a checkpoint that
    drops out of ``num_to_keep`` before it saves the experiment state that stops naming it, so a
    driver killed in between leaves such a state."""

    def restore(self, checkpoint_path):
        from ray.train._internal.session import _TrainingResult

        if isinstance(checkpoint_path, _TrainingResult):
            ckpt = checkpoint_path.checkpoint
            found = existing_checkpoint(ckpt.filesystem, ckpt.path)
            if found is None:
                _warn(f"{ckpt.path} is gone and no other checkpoint of this trial is left: "
                      "restarting the trial from scratch")
                return None
            if found != ckpt.path:
                _warn(f"{ckpt.path} is gone: resuming the trial from {found}, its newest checkpoint left")
                from ray.tune import Checkpoint

                checkpoint_path = _TrainingResult(checkpoint=Checkpoint(found, filesystem=ckpt.filesystem),
                                                  metrics={})
        return super().restore(checkpoint_path)


def existing_checkpoint(fs, path: str) -> Optional[str]:
    """``path`` if it exists on ``fs`` (pyarrow), else the newest ``checkpoint_*`` beside it, else None."""
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        return path
    parent = posixpath.dirname(path.rstrip("/"))
    infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    found = sorted(i.path for i in infos if i.type == pafs.FileType.Directory
                   and posixpath.basename(i.path).startswith("checkpoint_"))
    return found[-1] if found else None


def _warn(message: str) -> None:
    import logging

    logging.getLogger("ctal.tune").warning(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)


def resumable(fn, **params):
    """``tune.with_parameters(fn, **params)`` whose trials restore with ``RestoresWhatExists``."""
    from ray import tune

    inner = tune.with_parameters(fn, **params)
    inner.__mixins__ = (RestoresWhatExists,)  # Tune's wrap_function puts mixins before FunctionTrainable
    return inner


# --------------------------------------------------------------------------------------------------
# running a sweep


def run_sweep(cfg: FinetuneConfig, space: SearchSpace, sweep: SweepConfig, *, resume: bool = False,
              data: Optional[TaskData] = None, checked: bool = False) -> SweepResult:
    """Run (or with `resume`, continue) a sweep; needs `ray.init` done by the caller.

    `checked`: the caller already ran `check_sweep(cfg, space, sweep, data)` on these arguments before
    starting Ray (as pipelines/tune_finetune.py does); otherwise it runs here, before anything else.
    """
    import ray
    from ray import tune

    from .console import quiet_driver, tune_verbosity

    if not checked:
        cfg, data = prepare(cfg, data)
        check_sweep(cfg, space, sweep, data)
    data = data if data is not None else TaskData.load(cfg.data)
    task = get_task(cfg.task)
    experiment, remote = _experiment(sweep, cfg.task)
    where = remote or str(experiment)  # what Tune reads and writes: the URI, else the local dir
    if resume:
        if not tune.Tuner.can_restore(where):
            raise FileNotFoundError(f"no sweep to resume at {where}")
    elif storage.exists(remote) if remote else experiment.exists():
        raise FileExistsError(f"{where} exists: pass --resume to continue it or choose another --name")
    if cfg.init is None:
        print(FRESH_MODEL_WARNING, file=sys.stderr, flush=True)
    if not ray.is_initialized():
        raise RuntimeError("run_sweep needs ray.init() first")
    _check_resources(sweep)
    tracked = []  # the tracker's Tune callbacks, checked before any trial; mlflow/wandb load only if asked
    if cfg.tracking != "none":
        from .tracking import sweep_callbacks

        tracked = sweep_callbacks(cfg, remote or experiment, posixpath.basename(where))
    quiet_driver()

    metric = f"dev_{task.metric}"
    # Keeping 1 checkpoint per trial forces a state snapshot per report; with epochs of seconds Tune
    # warns about it on every report. The snapshot is what makes --resume exact, so keep it, quietly.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trainable = _trainable(cfg, data, sweep, where)
    trials = TrialProgress(metric, task.mode, _n_trials(space, sweep))
    if resume:
        # Before Ray unpickles anything there (tuner.pkl first): only versions this user's sweep signed.
        sign_sweep(where, (SWEEP_FILE,), verify_state(where, (SWEEP_FILE,)))  # drops versions long gone
        tuner = tune.Tuner.restore(where, trainable, resume_errored=True)
        experiment.mkdir(parents=True, exist_ok=True)  # for a URI sweep: the new staging directory
    else:
        experiment.mkdir(parents=True)
        (experiment / SWEEP_FILE).write_text(json.dumps(
            # a tracking_uri's password redacted: a --resume is given it again (tracking_uri=...)
            {"config": redact(to_dict(cfg)), "space": space.source, "sweep": asdict(sweep)}, indent=2))
        if remote:
            storage.upload_file(experiment / SWEEP_FILE, storage.join(remote, SWEEP_FILE))
        tuner = tune.Tuner(trainable, param_space=_param_space(space, sweep.search),
                           tune_config=_tune_config(space, sweep, metric, task.mode, cfg.epochs),
                           run_config=tune.RunConfig(
                               name=experiment.name, storage_path=storage.parent(where),
                               verbose=tune_verbosity(sweep.verbose),
                               callbacks=[trials, *tracked, StateSigner((SWEEP_FILE,))],
                               checkpoint_config=tune.CheckpointConfig(
                                   # The 2 best + the latest. Tune deletes a checkpoint that drops out
                                   # as soon as a better one arrives, but saves its experiment state
                                   # seconds later: with 1 kept, a driver killed in between left a state
                                   # naming a deleted checkpoint, and that trial could not resume.
                                   num_to_keep=2, checkpoint_score_attribute=metric,
                                   checkpoint_score_order=task.mode)))
        sign_sweep(where, (SWEEP_FILE,))  # tuner.pkl (Tuner() wrote it) and sweep.json
    with manifest.recorded_run(where, "sweep", {"config": cfg, "sweep": sweep, "space": space.source}):
        try:
            grid = tuner.fit()
        finally:
            trials.close()
        result = summarize(grid, experiment, task, space, cfg.epochs, remote=remote)
    return published(result, remote) if remote else result


def _n_trials(space: SearchSpace, sweep: SweepConfig) -> int:
    """How many trials the sweep runs: grid search repeats the whole grid ``num_samples`` times."""
    n = sweep.num_samples or (1 if sweep.search == "grid" else 8)
    if sweep.search == "grid":
        for p in space.params.values():
            n *= len(p.values())
    return n


class TrialProgress(Callback):
    """Tune callback on the driver: a bar over the sweep's trials and one line per finished trial
    (its parameters and best dev metric), in place of Tune's status tables."""

    def __init__(self, metric: str, mode: str, total: int):
        self.metric, self.mode, self.total = metric, mode, total
        self._best: dict[str, tuple[float, int]] = {}
        self._bar: Optional[Progress] = None

    def __getstate__(self):  # Tune saves its callbacks with the experiment: not the live bar
        return {**self.__dict__, "_bar": None}

    def _progress(self) -> Progress:
        if self._bar is None:
            self._bar = Progress(self.total, "sweep", unit="trials")
        return self._bar

    def setup(self, **info):
        self._progress()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if value is None:
            return
        best = self._best.get(trial.trial_id)
        if best is None or (value > best[0] if self.mode == "max" else value < best[0]):
            self._best[trial.trial_id] = (value, result.get("epoch", 0))

    def _finished(self, trial, outcome: str) -> None:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in sorted((trial.config or {}).items()))
        bar = self._progress()
        bar.update()
        bar.write(f"trial {trial.trial_id} ({params}): {outcome}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        best = self._best.get(trial.trial_id)
        self._finished(trial, "no result" if best is None else
                       f"best {self.metric} {best[0]:.4f} at epoch {best[1]}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finished(trial, "failed (see the results table)")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


DDP_DRIVER_CPU = 0.01  # the trial actor of a DDP trial: it only drives the TorchTrainer


def _check_resources(sweep: SweepConfig) -> None:
    """Tune waits forever for a trial that asks more than the cluster has: fail now instead."""
    from .train import cluster_capacity

    check_trial_resources(sweep, cluster_capacity()[0])


def check_trial_resources(sweep: SweepConfig, cluster: dict) -> None:
    """ResourceError unless one trial fits a cluster of ``cluster`` resources (``cluster_capacity()``):
    its CPUs and GPUs, and with workers_per_trial > 1 a CPU per DDP worker (each is a process with
    its own model copy; more of them than CPUs only thrash and run out of memory) and a GPU of its
    own per worker when trials use GPUs (NCCL refuses two ranks on one device)."""
    from .train import ResourceError

    cpus, gpus, n = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0)), sweep.workers_per_trial
    need = {"CPU": sweep.cpus_per_trial, "GPU": sweep.gpus_per_trial}
    short = [f"{k}={v:g} (cluster has {cluster.get(k, 0):g})" for k, v in need.items() if v > cluster.get(k, 0)]
    if short:
        raise ResourceError(f"one trial asks for {', '.join(short)}; lower cpus/gpus_per_trial")
    if n > 1 and sweep.cpus_per_trial + DDP_DRIVER_CPU > cpus:  # Ray would wait forever, silently
        raise ResourceError(f"cpus_per_trial={sweep.cpus_per_trial:g} for the DDP workers plus {DDP_DRIVER_CPU:g} for the "
                            f"trial that drives them is more than the Ray cluster's {cpus:g} CPUs; use "
                            f"cpus_per_trial <= {cpus - DDP_DRIVER_CPU:g}")
    if n > 1 and n > cpus:
        raise ResourceError(f"workers_per_trial={n}: each DDP worker needs a CPU, the Ray cluster has {cpus:g} "
                            f"CPUs; use workers_per_trial <= {int(cpus)}")
    if n > 1 and 0 < sweep.gpus_per_trial < n:
        raise ResourceError(f"workers_per_trial={n} with gpus_per_trial={sweep.gpus_per_trial:g}: each DDP worker "
                            f"needs a GPU of its own; use gpus_per_trial={n} (the cluster has {gpus:g} GPUs), "
                            "or gpus_per_trial=0")


def _trainable(cfg: FinetuneConfig, data: TaskData, sweep: SweepConfig, experiment: Path | str):
    from ray import tune

    fn = resumable(_trial, base=to_dict(cfg), data=data, sweep=asdict(sweep),
                   train_storage=storage.join(experiment, "train_runs"),
                   run=manifest.run_link(experiment, "sweep"))
    if sweep.workers_per_trial > 1:
        # The trial only drives a TorchTrainer, whose workers hold the trial's CPUs and GPUs.
        return tune.with_resources(fn, {"CPU": DDP_DRIVER_CPU})
    return tune.with_resources(fn, {"CPU": sweep.cpus_per_trial, "GPU": sweep.gpus_per_trial})


def _param_space(space: SearchSpace, search: str) -> dict:
    """Ray Tune's param_space for `search` ("optuna", "random" or "grid")."""
    from ray import tune

    out = {}
    for p in space.params.values():
        if search == "grid":
            vals = p.values()
            out[p.name] = vals[0] if len(vals) == 1 else tune.grid_search(list(vals))
        elif p.dist is None:
            out[p.name] = p.args[0]
        else:
            out[p.name] = getattr(tune, p.dist)(*p.args) if p.dist != "choice" else tune.choice(list(p.args))
    return out


def experiment_location(sweep: SweepConfig, task: Optional[str]) -> str:
    """Where the sweep lives: `<storage>/<name>`, a URI or an absolute local path."""
    if not (sweep.name or task):
        raise ConfigError("which sweep? give --name (or --task for the default name ctal-<task>)")
    name = sweep.name or f"ctal-{task}"
    if storage.is_uri(sweep.storage):
        return storage.join(sweep.storage, name)
    return str(Path(sweep.storage).resolve() / name)


def _experiment(sweep: SweepConfig, task: str) -> tuple[Path, Optional[str]]:
    """(local experiment directory, URI or None). With a URI storage (s3://, gs://, file://) Tune
    writes trials and checkpoints there itself; the local directory only stages sweep.json and the
    summary (table, plots, best checkpoint), which ``published`` uploads."""
    where = experiment_location(sweep, task)
    if not storage.is_uri(where):
        return Path(where), None
    return Path(tempfile.mkdtemp(prefix="ctal-sweep-")) / posixpath.basename(where), where


def _tune_config(space: SearchSpace, sweep: SweepConfig, metric: str, mode: str, epochs: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    max_t = int(space.max_of("epochs", epochs))
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=sweep.grace_period,
                               reduction_factor=sweep.reduction_factor)
                 if sweep.scheduler == "asha" else FIFOScheduler())
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg, limit = OptunaSearch(seed=sweep.seed), sweep.max_concurrent  # Tune wraps it in a limiter
    else:
        # Tune ignores max_concurrent_trials (with only a warning) for a BasicVariantGenerator passed
        # in: the limit must be the generator's own.
        search_alg = BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.max_concurrent or 0)
        limit = None
    num_samples = sweep.num_samples or (1 if sweep.search == "grid" else 8)
    return tune.TuneConfig(metric=metric, mode=mode, search_alg=search_alg, scheduler=scheduler,
                           num_samples=num_samples, max_concurrent_trials=limit,
                           trial_dirname_creator=_trial_dirname)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"  # short and parseable (Ray's default packs the parameters in)


def load_sweep(experiment: str | Path) -> tuple[FinetuneConfig, SearchSpace, SweepConfig]:
    """The config, search space and sweep settings a sweep was started with (for --resume), located
    at ``experiment``: the storage and name recorded when it started are replaced by where it is now,
    so a copied or moved sweep (local → s3) resumes there and never writes back to the original."""
    d = storage.read_json(storage.join(experiment, SWEEP_FILE))  # a local dir or a URI
    settings = d["sweep"] if "sweep" in d else d["options"]  # "options": sweeps started before SweepConfig
    where = str(experiment).rstrip("/")
    sweep = replace(from_dict(SweepConfig, settings, "sweep."), storage=storage.parent(where),
                    name=posixpath.basename(where))
    return from_dict(FinetuneConfig, d["config"]), parse_search_space(d["space"], SWEEP_FILE), sweep
