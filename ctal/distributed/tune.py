"""Ray Tune sweeps of CTAL fine-tuning: hyperparameters and fusion variants per task.

A search space is YAML data (`search_spaces/<task>.yaml`), checked before Ray starts. Each trial runs
`ctal.finetune.finetune` (or, with workers_per_trial > 1, a TorchTrainer whose workers run it under DDP)
and reports the epoch's dev metrics with a checkpoint. ASHA stops weak trials at epoch rungs; Optuna,
random or grid search proposes them. At the end: a results table (CSV + Markdown), plots (best dev metric
per fusion variant, learning curves) and the best checkpoint copied to `<experiment>/best_checkpoint`,
loadable with `CTALForSequenceClassification.from_pretrained` (per fold for emotion) and
`ctal.finetune.evaluate`.

Search-space YAML: one entry per parameter of PARAMETERS, either a constant or a mapping with one
distribution (`loguniform: [low, high]`, `uniform: [low, high]`, `randint: [low, high)` or
`choice: [values]`) and, optionally, `grid: [values]`, the points `--search grid` uses for it.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from ctal import storage
from ctal.config import ConfigError, FinetuneConfig, from_dict, to_dict
from ctal.finetune import FRESH_MODEL_WARNING, TaskData, finetune
from ctal.tasks import get_task

# Search-space name → the FinetuneConfig keys it sets (dropout sets both dropout probabilities).
PARAMETERS = {
    "lr": ("lr",),
    "batch_size": ("batch_size",),
    "epochs": ("epochs",),
    "warmup_ratio": ("warmup_ratio",),
    "weight_decay": ("weight_decay",),
    "dropout": ("model.hidden_dropout_prob", "model.attention_probs_dropout_prob"),
    "orthogonality_weight": ("model.orthogonality_weight",),
    "freeze_layers": ("freeze_layers",),
    "fusion": ("model.fusion",),
    "seed": ("seed",),  # restarts: an objective with plateaus (an interaction label) can need them
}
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
SWEEP_FILE = "sweep.json"
BEST_DIR = "best_checkpoint"


# --------------------------------------------------------------------------------------------------
# search spaces


@dataclass(frozen=True)
class Param:
    name: str
    dist: Optional[str]  # None: a constant
    args: tuple  # (low, high), the choices, or (constant,)
    grid: Optional[tuple] = None

    def values(self) -> Optional[tuple]:
        """The finite set grid search walks, or None."""
        if self.dist is None:
            return self.args
        return self.grid or (self.args if self.dist == "choice" else None)


@dataclass(frozen=True)
class SearchSpace:
    params: dict[str, Param]
    source: dict = field(default_factory=dict)  # the YAML as read, stored with the sweep

    def max_of(self, name: str, default: Any) -> Any:
        p = self.params.get(name)
        if p is None:
            return default
        if p.dist in ("uniform", "loguniform"):
            return p.args[1]
        if p.dist == "randint":
            return p.args[1] - 1
        return max(p.values())

    def pin(self, keys) -> tuple["SearchSpace", list[str]]:
        """The space without the parameters that set any of the config `keys` (a command-line
        key=value fixes them), and the names of those removed."""
        drop = sorted(n for n in self.params if set(PARAMETERS[n]) & set(keys))
        keep = lambda d: {k: v for k, v in d.items() if k not in drop}
        return SearchSpace(keep(self.params), keep(self.source)), drop

    def check(self, search: str) -> None:
        """Grid search needs a finite set of values for every parameter."""
        missing = [p.name for p in self.params.values() if p.values() is None]
        if search == "grid" and missing:
            raise ConfigError(f"--search grid needs a finite set for {', '.join(missing)}: use choice or "
                              "add 'grid: [...]' to those entries")

    def to_tune(self, search: str) -> dict:
        """Ray Tune's param_space for `search` ("optuna", "random" or "grid")."""
        from ray import tune

        out = {}
        for p in self.params.values():
            if search == "grid":
                vals = p.values()
                out[p.name] = vals[0] if len(vals) == 1 else tune.grid_search(list(vals))
            elif p.dist is None:
                out[p.name] = p.args[0]
            else:
                out[p.name] = getattr(tune, p.dist)(*p.args) if p.dist != "choice" else tune.choice(list(p.args))
        return out


def parse_search_space(data: Any, source: str = "search space") -> SearchSpace:
    """Validate a search-space mapping: names, distributions, bounds and every value's type."""
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{source}: expected a non-empty mapping of parameter → distribution")
    unknown = [k for k in data if k not in PARAMETERS]
    if unknown:
        raise ConfigError(f"{source}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(PARAMETERS)}")
    params = {}
    for name, spec in data.items():
        where = f"{source}: {name}"
        if not isinstance(spec, dict):
            p = Param(name, None, (spec,))
        else:
            dists = [k for k in spec if k in DISTRIBUTIONS]
            bad = [k for k in spec if k not in DISTRIBUTIONS and k != "grid"]
            if bad:
                raise ConfigError(f"{where}: unknown distribution(s) {', '.join(map(repr, bad))}; "
                                  f"allowed: {', '.join(DISTRIBUTIONS)} (+ optional 'grid')")
            if len(dists) != 1:
                raise ConfigError(f"{where}: give exactly one of {', '.join(DISTRIBUTIONS)}, got {dists or 'none'}")
            dist, args = dists[0], spec[dists[0]]
            grid = spec.get("grid")
            if grid is not None and (not isinstance(grid, list) or not grid):
                raise ConfigError(f"{where}: grid must be a non-empty list")
            if not isinstance(args, list) or not args:
                raise ConfigError(f"{where}: {dist} needs a non-empty list")
            if dist != "choice":
                if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                             for a in _floats(args)):
                    raise ConfigError(f"{where}: {dist} needs [low, high], got {args!r}")
                args = _floats(args) if dist != "randint" else args
                if not args[0] < args[1] or (dist == "loguniform" and args[0] <= 0):
                    raise ConfigError(f"{where}: {dist} bounds {args!r} need 0 < low < high"
                                      if dist == "loguniform" else f"{where}: {dist} bounds {args!r} need low < high")
                if dist == "randint" and not all(isinstance(a, int) for a in args):
                    raise ConfigError(f"{where}: randint bounds must be integers, got {args!r}")
            p = Param(name, dist, tuple(args), tuple(grid) if grid else None)
        for value in _candidates(p):  # every value the config could receive must fit its field
            try:
                apply_params(FinetuneConfig(), {name: value})
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        params[name] = p
    return SearchSpace(params, copy.deepcopy(data))


def _floats(args: list) -> list:
    """YAML reads 1e-4 (no dot) as a string; accept it as a number."""
    out = []
    for a in args:
        try:
            out.append(float(a) if isinstance(a, str) else a)
        except ValueError:
            out.append(a)
    return out


def _candidates(p: Param) -> list:
    vals = list(p.values() or [])
    if p.dist in ("uniform", "loguniform", "randint"):
        vals += list(p.args)
    return vals


def load_search_space(path: str | Path) -> SearchSpace:
    with open(path, encoding="utf-8") as f:
        return parse_search_space(yaml.safe_load(f), str(path))


def apply_params(base: FinetuneConfig | dict, params: dict) -> FinetuneConfig:
    """The trial's FinetuneConfig: `base` with the sampled parameters set (validated)."""
    d = to_dict(base) if isinstance(base, FinetuneConfig) else copy.deepcopy(base)
    for name, value in params.items():
        for key in PARAMETERS[name]:
            node = d
            *parents, leaf = key.split(".")
            for k in parents:
                node = node[k]
            node[leaf] = value
    return from_dict(FinetuneConfig, d)


# --------------------------------------------------------------------------------------------------
# sweep options and the trial


@dataclass
class SweepOptions:
    search: Literal["optuna", "random", "grid"] = "optuna"
    scheduler: Literal["asha", "fifo"] = "asha"
    num_samples: Optional[int] = None  # None: 1 for grid (Ray repeats the grid this often), else 8
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0
    workers_per_trial: int = 1  # > 1: a TorchTrainer (DDP) inside each trial
    max_concurrent: Optional[int] = None
    storage: str = "runs/tune"
    name: Optional[str] = None  # default: ctal-<task>
    grace_period: int = 1  # ASHA: epochs before the first cut
    reduction_factor: int = 3  # ASHA: keep the best 1/rf at each rung
    seed: int = 0  # of the search algorithm
    verbose: int = 1

    def check(self) -> None:
        errors = []
        if self.search not in ("optuna", "random", "grid"):
            errors.append(f"search={self.search!r} is not one of optuna, random, grid")
        if self.scheduler not in ("asha", "fifo"):
            errors.append(f"scheduler={self.scheduler!r} is not one of asha, fifo")
        if self.num_samples is not None and self.num_samples < 1:
            errors.append(f"num_samples must be >= 1, got {self.num_samples}")
        if self.gpus_per_trial < 0 or self.cpus_per_trial <= 0:
            errors.append("gpus_per_trial must be >= 0 and cpus_per_trial > 0")
        if self.workers_per_trial < 1:
            errors.append(f"workers_per_trial must be >= 1, got {self.workers_per_trial}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            errors.append(f"max_concurrent must be >= 1, got {self.max_concurrent}")
        if errors:
            raise ConfigError("; ".join(errors))


def _trial(params: dict, *, base: dict, data: TaskData, opts: dict, train_storage: str) -> None:
    """One Tune trial: fine-tune with the sampled `params`, reporting every epoch."""
    import torch
    from ray import tune

    cfg = apply_params(base, params)
    workers = opts["workers_per_trial"]
    torch.set_num_threads(max(1, int(opts["cpus_per_trial"] / workers)))  # Ray gives CPUs, not threads
    if workers > 1:
        return _trial_ddp(cfg, data, opts, train_storage)
    checkpoint = tune.get_checkpoint()  # set when Tune resumes this trial

    def report(metrics, ckpt_dir):
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(ckpt_dir))

    if checkpoint is None:
        finetune(cfg, data=data, report=report)
    else:
        with checkpoint.as_directory() as d:
            finetune(cfg, data=data, report=report, resume_from=d)


def _trial_ddp(cfg: FinetuneConfig, data: TaskData, opts: dict, train_storage: str) -> None:
    """workers_per_trial > 1: a TorchTrainer runs the same loop under DDP; TuneReportCallback passes
    each epoch's metrics (and the checkpoint's path as `checkpoint_path`) on to Tune."""
    import ray
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    workers, gpus = opts["workers_per_trial"], opts["gpus_per_trial"]
    per_worker = {"CPU": opts["cpus_per_trial"] / workers, **({"GPU": gpus / workers} if gpus else {})}
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"cfg": to_dict(cfg), "data": ray.put(data)},
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


# --------------------------------------------------------------------------------------------------
# running a sweep


@dataclass
class SweepResult:
    # Paths, or URI strings when the sweep's storage is a URI (ctal.storage reads either)
    experiment: Path
    table_csv: Path
    table_md: Path
    plots: list[Path]
    best_checkpoint: Optional[Path]
    best: Optional[dict]  # the best trial's row of the table
    table: Any  # pandas DataFrame, one row per trial
    errors: dict  # trial → error message
    trial_checkpoints: dict = field(default_factory=dict)  # trial → its best checkpoint

    def best_per_fusion(self) -> dict:
        """fusion variant → the best checkpoint of its trial best on dev (the table is sorted by it)."""
        best = {}
        for trial, fusion in zip(self.table["trial"], self.table["fusion"]):
            if trial in self.trial_checkpoints:
                best.setdefault(fusion, self.trial_checkpoints[trial])
        return best


def _check_resources(opts: SweepOptions) -> None:
    """Tune waits forever for a trial that asks more than the cluster has: fail now instead."""
    import ray

    have = ray.cluster_resources()
    need = {"CPU": opts.cpus_per_trial, "GPU": opts.gpus_per_trial}
    short = [f"{k}={v:g} (cluster has {have.get(k, 0):g})" for k, v in need.items() if v > have.get(k, 0)]
    if short:
        raise RuntimeError(f"one trial asks for {', '.join(short)}; lower cpus/gpus_per_trial")


def _trainable(cfg: FinetuneConfig, data: TaskData, opts: SweepOptions, experiment: Path | str):
    from ray import tune

    fn = tune.with_parameters(_trial, base=to_dict(cfg), data=data, opts=asdict(opts),
                              train_storage=storage.join(experiment, "train_runs"))
    if opts.workers_per_trial > 1:
        # The trial only drives a TorchTrainer, whose workers hold the trial's CPUs and GPUs.
        return tune.with_resources(fn, {"CPU": 0.01})
    return tune.with_resources(fn, {"CPU": opts.cpus_per_trial, "GPU": opts.gpus_per_trial})


def run_sweep(cfg: FinetuneConfig, space: SearchSpace, opts: SweepOptions, *, resume: bool = False,
              data: Optional[TaskData] = None) -> SweepResult:
    """Run (or with `resume`, continue) a sweep; needs `ray.init` done by the caller.

    Everything that can be checked without Ray is checked first: the options, the search space against
    the config, the data set against the task protocol, the experiment directory.
    """
    import ray
    from ray import tune

    opts.check()
    task = get_task(cfg.task)
    experiment, remote = _experiment(opts, cfg.task)
    where = remote or str(experiment)  # what Tune reads and writes: the URI, else the local dir
    if resume:
        if not tune.Tuner.can_restore(where):
            raise FileNotFoundError(f"no sweep to resume at {where}")
    elif storage.exists(remote) if remote else experiment.exists():
        raise FileExistsError(f"{where} exists: pass --resume to continue it or choose another --name")
    space.check(opts.search)
    data = data if data is not None else TaskData.load(cfg.data)
    task.folds(data.meta, cfg.fold, cfg.seed)  # the protocol fits the data
    if cfg.init is None:
        print(FRESH_MODEL_WARNING, file=sys.stderr, flush=True)
    if not ray.is_initialized():
        raise RuntimeError("run_sweep needs ray.init() first")
    _check_resources(opts)

    metric = f"dev_{task.metric}"
    # Keeping 1 checkpoint per trial forces a state snapshot per report; with epochs of seconds Tune
    # warns about it on every report. The snapshot is what makes --resume exact, so keep it, quietly.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trainable = _trainable(cfg, data, opts, where)
    if resume:
        tuner = tune.Tuner.restore(where, trainable, resume_errored=True)
        experiment.mkdir(parents=True, exist_ok=True)  # for a URI sweep: the new staging directory
    else:
        experiment.mkdir(parents=True)
        (experiment / SWEEP_FILE).write_text(json.dumps(
            {"config": to_dict(cfg), "space": space.source, "options": asdict(opts)}, indent=2))
        if remote:
            storage.upload_file(experiment / SWEEP_FILE, storage.join(remote, SWEEP_FILE))
        tuner = tune.Tuner(trainable, param_space=space.to_tune(opts.search),
                           tune_config=_tune_config(space, opts, metric, task.mode, cfg.epochs),
                           run_config=tune.RunConfig(
                               name=experiment.name, storage_path=storage.parent(where), verbose=opts.verbose,
                               checkpoint_config=tune.CheckpointConfig(
                                   num_to_keep=1, checkpoint_score_attribute=metric,
                                   checkpoint_score_order=task.mode)))  # best + latest (kept to resume)
    grid = tuner.fit()
    result = summarize(grid, experiment, task, space, cfg.epochs, remote=remote)
    return _published(result, remote) if remote else result


def _experiment(opts: SweepOptions, task: str) -> tuple[Path, Optional[str]]:
    """(local experiment directory, URI or None). With a URI ``opts.storage`` (s3://, gs://, file://)
    Tune writes trials and checkpoints there itself; the local directory only stages sweep.json and
    the summary (table, plots, best checkpoint), which ``_published`` uploads."""
    name = opts.name or f"ctal-{task}"
    if not storage.is_uri(opts.storage):
        return Path(opts.storage).resolve() / name, None
    return Path(tempfile.mkdtemp(prefix="ctal-sweep-")) / name, storage.join(opts.storage, name)


def _published(result: "SweepResult", remote: str) -> "SweepResult":
    """Upload the staged summary next to Tune's trials; the result then names URIs."""
    local = result.experiment
    storage.upload_dir(local, remote)
    shutil.rmtree(local.parent, ignore_errors=True)

    def uri(p):
        return None if p is None else storage.join(remote, str(Path(p).relative_to(local)))

    return replace(result, experiment=remote, table_csv=uri(result.table_csv), table_md=uri(result.table_md),
                   plots=[uri(p) for p in result.plots], best_checkpoint=uri(result.best_checkpoint))


def _tune_config(space: SearchSpace, opts: SweepOptions, metric: str, mode: str, epochs: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    max_t = int(space.max_of("epochs", epochs))
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=opts.grace_period,
                               reduction_factor=opts.reduction_factor)
                 if opts.scheduler == "asha" else FIFOScheduler())
    if opts.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg, limit = OptunaSearch(seed=opts.seed), opts.max_concurrent  # Tune wraps it in a limiter
    else:
        # Tune ignores max_concurrent_trials (with only a warning) for a BasicVariantGenerator passed
        # in: the limit must be the generator's own.
        search_alg, limit = BasicVariantGenerator(random_state=opts.seed, max_concurrent=opts.max_concurrent or 0), None
    num_samples = opts.num_samples or (1 if opts.search == "grid" else 8)
    return tune.TuneConfig(metric=metric, mode=mode, search_alg=search_alg, scheduler=scheduler,
                           num_samples=num_samples, max_concurrent_trials=limit,
                           trial_dirname_creator=_trial_dirname)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"  # short and parseable (Ray's default packs the parameters in)


def load_sweep(experiment: str | Path) -> tuple[FinetuneConfig, SearchSpace, SweepOptions]:
    """The config, search space and options a sweep was started with (for --resume)."""
    d = storage.read_json(storage.join(experiment, SWEEP_FILE))  # a local dir or a URI
    return (from_dict(FinetuneConfig, d["config"]), parse_search_space(d["space"], SWEEP_FILE),
            SweepOptions(**d["options"]))


# --------------------------------------------------------------------------------------------------
# results: table, plots, best checkpoint


def summarize(grid, experiment: Path, task, space: SearchSpace, epochs: int,
              remote: Optional[str] = None) -> SweepResult:
    """Results table (best epoch of each trial), plots and the best checkpoint of a finished sweep.
    With ``remote`` (the sweep's URI) checkpoint paths are paths in that URI's filesystem."""
    import pandas as pd

    metric = f"dev_{task.metric}"
    sign = 1 if task.mode == "min" else -1
    rows, curves, errors, best_ckpt = [], {}, {}, {}
    for result in grid:
        trial = Path(result.path).name.removeprefix("trial_")
        row = {"trial": trial, "status": "", "fusion": result.config.get("fusion"),
               **{k: result.config[k] for k in PARAMETERS if k in result.config and k != "fusion"}}
        df = result.metrics_dataframe
        history = df[df[metric].notna()] if df is not None and metric in df else None
        if history is not None and len(history):
            curves[trial] = (row["fusion"], history["epoch"].tolist(), history[metric].tolist())
            best = history.loc[(sign * history[metric]).idxmin()]
            row.update({"epochs_run": int(history["epoch"].max()), "best_epoch": int(best["epoch"]),
                        **{k: float(best[k]) for k in history.columns if k.startswith("dev_")}})
            best_ckpt[trial] = _checkpoint_of(result, best, metric, task.mode)
        if result.error is not None:
            errors[trial] = _first_line(result.error)
        row["status"] = ("error" if result.error is not None else
                         "done" if row.get("epochs_run") == result.config.get("epochs", epochs) else "stopped early")
        row["error"] = errors.get(trial, "")
        rows.append(row)
    table = pd.DataFrame(rows)
    if metric in table:
        table = table.sort_values(metric, ascending=task.mode == "min", na_position="last", kind="stable")
    table = table.reset_index(drop=True)
    csv_path, md_path = experiment / "results.csv", experiment / "results.md"
    table.to_csv(csv_path, index=False)
    md_path.write_text(to_markdown(table))
    plots = plot_results(table, curves, metric, task.mode, experiment)

    best_row, best_dir = None, None
    if metric in table and table[metric].notna().any():
        best_row = table.iloc[0].to_dict()
        src = best_ckpt.get(best_row["trial"])
        if src is not None:
            best_dir = experiment / BEST_DIR
            if best_dir.exists():
                shutil.rmtree(best_dir)
            if remote:  # a path inside the sweep's filesystem: give it the URI's scheme back
                storage.download_dir(f"{remote.split('://', 1)[0]}://{src}", best_dir)
            else:
                shutil.copytree(src, best_dir)
    return SweepResult(experiment, csv_path, md_path, plots, best_dir, best_row, table, errors,
                       {t: p for t, p in best_ckpt.items() if p is not None})


def _first_line(error) -> str:
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    # Ray wraps the trial's exception; its last line names the original one.
    return f"{type(error).__name__}: {lines[-1] if lines else text}"[:300]


def _checkpoint_of(result, best_row, metric: str, mode: str) -> Optional[Path]:
    """The checkpoint reported with the best epoch: a Tune checkpoint, or a Train run's checkpoint path
    (multi-worker trials report it as `checkpoint_path`)."""
    path = best_row.get("checkpoint_path") if hasattr(best_row, "get") else None
    if isinstance(path, str) and path:
        return Path(path)
    for ckpt, m in result.best_checkpoints or []:
        if m.get("epoch") == best_row["epoch"]:
            return Path(ckpt.path)
    ckpt = result.get_best_checkpoint(metric, mode) if result.best_checkpoints else None
    return Path(ckpt.path) if ckpt else None


def to_markdown(table) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|")

    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def plot_results(table, curves: dict, metric: str, mode: str, out: Path) -> list[Path]:
    """best dev metric per fusion variant (bar) and dev learning curves (one line per trial)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if metric in table and "fusion" in table and table[metric].notna().any():
        best = table.dropna(subset=[metric]).groupby("fusion")[metric]
        best = best.min() if mode == "min" else best.max()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(best.index.astype(str), best.values, color="tab:blue")
        ax.set_ylabel(metric)
        ax.set_title(f"best {metric} per fusion variant")
        for i, v in enumerate(best.values):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
        fig.tight_layout()
        paths.append(out / "best_per_fusion.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        variants = sorted({str(f) for f, _, _ in curves.values()})
        colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
        for fusion, epochs, values in curves.values():
            ax.plot(epochs, values, marker="o", ms=3, color=colors[str(fusion)], alpha=0.8)
        for v in variants:
            ax.plot([], [], color=colors[v], label=v)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title("learning curves (one line per trial)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "learning_curves.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def describe(result: SweepResult, task) -> str:
    """What the pipeline prints at the end."""
    lines = [to_markdown(result.table)]
    if result.errors:
        lines.append(f"{len(result.errors)} trial(s) failed (the sweep went on):")
        lines += [f"  {t}: {e}" for t, e in result.errors.items()]
    if result.best:
        lines.append(f"best trial {result.best['trial']}: dev {task.metric} "
                     f"{result.best['dev_' + task.metric]:.4f} (epoch {result.best['best_epoch']})")
    lines += [f"results table: {result.table_csv}", f"results table: {result.table_md}"]
    lines += [f"plot: {p}" for p in result.plots]
    if result.best_checkpoint:
        lines.append(f"best checkpoint: {result.best_checkpoint}")
    return "\n".join(lines)
