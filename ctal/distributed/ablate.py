"""An ablation study's grid as Ray Tune trials (the Ray glue of `ctal.ablation`).

One Tune experiment, `<out>/grid`: a grid search over (cell, seed), repeated `num_samples` times with
fresh hyperparameters when the study tunes them (a nested random sweep per cell and seed), FIFO so
every cell gets the same budget. Each trial is `ctal.distributed.tune`'s trial on the cell's config,
so a trial reports its dev metrics with a checkpoint every epoch. Rerunning on the same `<out>`
restores the experiment: finished trials are not rerun, unfinished ones continue from their last
epoch checkpoint. At the end, per (cell, seed) the run best on dev is scored once on test
(`ctal.finetune.evaluate`) and `ctal.ablation.write_report` writes results.csv and report.md.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import pandas as pd

from ctal import manifest
from ctal.ablation import GRID_PARAMETERS, Study, cell_config, cell_key
from ctal.ablation_inputs import Frames, check_paired, frames_inputs
from ctal.checkpoint import local_copy
from ctal.config import ConfigError, FinetuneConfig, SweepConfig, to_dict
from ctal.data import TaskData
from ctal.finetune import prepare
from ctal.redact import redact
from ctal.report import trial_row
from ctal.search_space import SearchSpace, check_sweep, load_search_space
from ctal.tasks import get_task

from .signing import StateSigner, sign_sweep, state_entries, verify_state
from .results import checkpoint_of, first_line
from .tune import TrialProgress, _check_resources, _param_space, _trial, resumable

GRID = "grid"
STUDY_FILE = "study.json"


def callbacks(metric: str, mode: str, total: int, configs: dict[str, FinetuneConfig], grid: Path) -> list:
    """The one place the study's Tune run takes its callbacks: progress, and with tracking=mlflow|wandb
    one tracker run per ablation run (tagged with its cell, fusion and seed; the store in ``grid``)."""
    first = next(iter(configs.values()))
    tracked = []
    if first.tracking != "none":  # mlflow/wandb load only if asked
        from .tracking import sweep_callbacks

        tracked = sweep_callbacks(first, grid, GRID, cells=configs)
    return [TrialProgress(metric, mode, total), *tracked]


def prepare_study(base: FinetuneConfig, study: Study, init: Optional[str], data: TaskData,
                  frames: Optional[dict[str, Frames]] = None
                  ) -> tuple[dict[str, FinetuneConfig], Optional[SearchSpace], dict[Optional[str], TaskData]]:
    """Before Ray starts: every cell's checked config (cell key → config), the nested sweep's space and
    each frames level's opened data set (level → TaskData; a study without frames: ``data`` under None).
    ``base.data``/``data`` and ``init`` are the baseline's frames level, ``frames`` the other levels
    (ctal.ablation_inputs.parse_frames): each cell gets its level's data set and checkpoint, each checkpoint is
    checked against its level's frames, and the levels' data sets must hold the same utterances."""
    space = None
    if study.tuning:
        space = load_search_space(study.tuning["space"])
        owned = sorted(set(space.params) & set(GRID_PARAMETERS))
        if owned:
            raise ConfigError(f"tuning.space {study.tuning['space']} sets {owned}: the grid and the budget own "
                              "those (every cell the same budget); remove them from the space")
    levels = frames_inputs(study, base.data, init, frames or {})  # ConfigError: a level's input missing
    datas = {name: data if name == study.baseline.get("frames") else _load_level(name, f) for name, f in levels.items()}
    check_paired(datas, get_task(base.task), study, base)  # the same utterances, tokens and label subsets
    inits, archs = {}, {}
    for name, f in levels.items():
        if f.init:  # the run directory's newest checkpoint, checked against the level's frames
            inits[name] = prepare(replace(base, data=f.data, init=f.init), datas[name])[0].init
            archs[name] = json.loads((local_copy(inits[name]) / "config.json").read_text())
    fallback = next(iter(archs.values()), None)  # scratch cells copy their level's architecture, else another's
    configs = {}
    for cell in study.cells():
        name = cell.get("frames")
        arch = archs.get(name) or (fallback and {**fallback, **datas[name].audio_format.model_dims()})
        cfg = cell_config(replace(base, data=levels[name].data), cell, inits.get(name), study.subset_seed, arch)
        cfg, _ = prepare(cfg, datas[name])  # ranges, the protocol, init against the data: once per cell
        configs[cell_key(cell)] = cfg
    if space is not None:
        check_sweep(next(iter(configs.values())), space, SweepConfig(search="random"), data)
    return configs, space, datas


def _load_level(name: str, frames: Frames) -> TaskData:
    try:
        return TaskData.load(frames.data)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--frames {name}: {e}") from None
    except ValueError as e:
        raise ValueError(f"--frames {name}: {e}") from None


def run_study(configs: dict[str, FinetuneConfig], study: Study, space: Optional[SearchSpace], data,
              out: Path, *, cpus_per_trial: float = 1.0, max_concurrent: Optional[int] = None) -> pd.DataFrame:
    """Run (or continue) the grid in ``<out>/grid``; returns one row per run (needs ray.init first).
    ``data``: the opened TaskData, or frames level → TaskData (``prepare_study``'s)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from .console import quiet_driver

    first = next(iter(configs.values()))
    task = get_task(first.task)
    metric = f"dev_{task.metric}"
    sweep = SweepConfig(search="grid", scheduler="fifo", cpus_per_trial=cpus_per_trial,
                        max_concurrent=max_concurrent, verbose=0)
    _check_resources(sweep)
    quiet_driver()
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # as written to disk: a tracking_uri's password redacted (ctal.redact)
    record = redact({"study": study.source, "configs": {k: to_dict(c) for k, c in configs.items()}})
    experiment = out / GRID
    trainable = tune.with_resources(
        resumable(_cell_trial, configs={k: to_dict(c) for k, c in configs.items()}, data=cell_data(study, data),
                  sweep=asdict(sweep), train_storage=str(experiment / "train_runs"),
                  run=manifest.run_link(out, "ablation")),
        {"CPU": cpus_per_trial})
    samples = study.tuning.get("num_samples", 1) if study.tuning else 1
    total = len(configs) * len(study.seeds) * samples
    if tune.Tuner.can_restore(str(experiment)):
        if json.loads((out / STUDY_FILE).read_text()) != json.loads(json.dumps(record)):
            raise ConfigError(f"{out} holds a study with another grid or config: use another --out or --fresh")
        # Before Ray unpickles anything there: only state this user's study signed (issue 15.1)
        sign_sweep(str(experiment), (), verify_state(str(experiment)))
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
    else:
        check_grid(out)  # the new study signs the state it writes: nothing may be there before it
        out.mkdir(parents=True, exist_ok=True)
        (out / STUDY_FILE).write_text(json.dumps(record, indent=1))
        params = {"cell": tune.grid_search(list(configs)), "seed": tune.grid_search(list(study.seeds)),
                  **(_param_space(space, "random") if space is not None else {})}
        tuner = tune.Tuner(trainable, param_space=params, tune_config=tune.TuneConfig(
            metric=metric, mode=task.mode, num_samples=samples, trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
            reuse_actors=True,
            search_alg=BasicVariantGenerator(random_state=study.subset_seed, max_concurrent=max_concurrent or 0)),
            run_config=tune.RunConfig(name=GRID, storage_path=str(out), verbose=0,
                                      callbacks=[*callbacks(metric, task.mode, total, configs, experiment),
                                                 StateSigner()],
                                      checkpoint_config=tune.CheckpointConfig(  # 2 kept: see the sweep's (tune.py)
                                          num_to_keep=2, checkpoint_score_attribute=metric,
                                          checkpoint_score_order=task.mode)))
        sign_sweep(str(experiment))  # tuner.pkl, as Tuner() wrote it
    grid = tuner.fit()
    return collect(grid, study, configs, task)


def check_grid(out: Path) -> None:
    """Before Ray starts and before anything there is unpickled: a study to continue (``tuner.pkl``) must
    hold only state this user's study signed; a grid that cannot be continued must hold no Ray state at
    all, since the new study signs the state files it finds beside its own (issue 30.1: a planted
    ``callback-states-*.pkl`` would be signed, then unpickled by the next run)."""
    experiment = out / GRID
    if (experiment / "tuner.pkl").is_file():
        verify_state(str(experiment))
    elif found := state_entries(str(experiment)):
        raise ConfigError(f"{experiment} holds Ray state that no run of this study wrote ({', '.join(found)}): "
                          "a new study would trust it; remove it, or use another --out")


def cell_data(study: Study, data) -> dict[str, TaskData]:
    """Cell key → the data set its runs train on: its frames level's (one object per level)."""
    return {cell_key(c): data[c.get("frames")] if isinstance(data, dict) else data for c in study.cells()}


def _cell_trial(params: dict, *, configs: dict, data: dict, sweep: dict, train_storage: str,
                run: dict) -> None:
    """One run: the cell's config with the run's seed (and sampled hyperparameters), on its data set."""
    hp = {k: v for k, v in params.items() if k != "cell"}
    _trial(hp, base=configs[params["cell"]], data=data[params["cell"]], sweep=sweep, train_storage=train_storage,
           run=run)


def collect(grid, study: Study, configs: dict, task) -> pd.DataFrame:
    """One row per run with its best dev epoch and checkpoint; per (cell, seed) the best on dev selected."""
    metric = f"dev_{task.metric}"
    cells = {cell_key(c): c for c in study.cells()}
    rows = []
    for result in grid:
        config = dict(result.config)
        cell = cells[config.pop("cell")]
        cfg = configs[cell_key(cell)]
        df = result.metrics_dataframe
        history = df[df[metric].notna()] if df is not None and metric in df else None
        error = first_line(result.error) if result.error is not None else ""
        trial = Path(result.path).name.removeprefix("trial_")
        row, best = trial_row(trial, {**config, "fusion": cell["fusion"]}, history, error, cfg.epochs, metric,
                              task.mode)
        row.update({"cell": cell_key(cell), **cell, "checkpoint": None})
        if best is not None:
            ckpt = checkpoint_of(result, best, metric, task.mode)
            row["checkpoint"] = str(ckpt) if ckpt else None
        rows.append(row)
    runs = pd.DataFrame(rows)
    if metric not in runs:  # no run reported an epoch (every one failed): nothing to select
        runs[metric] = float("nan")
    sign = 1 if task.mode == "min" else -1
    runs["rank"] = (sign * runs[metric]).where(runs["checkpoint"].notna())
    best = runs.dropna(subset=["rank"]).sort_values(["rank", "trial"]).groupby(["cell", "seed"]).head(1).index
    runs["selected"] = runs.index.isin(best)
    return runs.drop(columns="rank").sort_values(["cell", "seed", "trial"]).reset_index(drop=True)
