"""Tracking of fine-tuning sweeps through Ray Tune's own integrations: one tracker run per trial.

``MLflowLoggerCallback`` and ``WandbLoggerCallback`` (ray.air.integrations) already map Tune's trial
lifecycle onto tracker runs on the driver: a run per trial, each reported epoch's metrics (the dev
metric among them) at step = training iteration (= epoch), the run ended FINISHED or FAILED with
the trial. What they lack, added here: the trial's resolved FinetuneConfig as params (not only the
sampled values), the fusion variant and seed as tags, a store placed by ctal.tracking's rules (and an
MLflow artifact root not in the working directory; a server's credentials and bounded retries set up
on the driver, where the callback logs), credentials redacted in params and tags, one MLflow run per
trial across a resumed sweep (tagged ``ctal_trial``; a resumed driver continues it, never opens a
second), and the house failure policy: a tracker that fails mid-sweep prints one warning line and
stops tracking, the sweep goes on.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import WandbLoggerCallback

from .. import tracking
from ..config import FinetuneConfig, to_dict
from ..redact import redact
from ..search_space import apply_params


def trial_tags(base: dict, params: dict, cells: Optional[dict] = None) -> tuple[FinetuneConfig, dict]:
    """(the trial's resolved config, its tags: task, fusion variant, seed). An ablation's trial names
    its cell (``params["cell"]``): its base is that cell's config in ``cells``, and the cell a tag."""
    extra = {}
    if cells is not None and "cell" in params:
        params = dict(params)
        extra["cell"] = params.pop("cell")
        base = cells[extra["cell"]]
    cfg = apply_params(base, params)
    return cfg, redact({"task": cfg.task, "fusion": cfg.model.fusion, "seed": str(cfg.seed), **extra})


class _NeverFails:
    """Wraps a LoggerCallback's hooks: the first exception warns once on the driver and disables it
    (an exception in a driver callback would otherwise end the whole sweep)."""

    _what = "tracking"
    _broken = False

    def _guard(self, hook, *args, **kwargs):
        if self._broken:
            return
        try:
            hook(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any tracker failure is the tracker's, not the sweep's
            self._broken = True
            print(f"warning: {self._what} failed ({tracking.first_line(e)}); the sweep goes on without it",
                  file=sys.stderr, flush=True)

    def setup(self, *args, **kwargs):
        if getattr(self, "tracking_uri", None):  # unpickled from tuner.pkl: redacted (__getstate__)
            self.tracking_uri = tracking.given(self.tracking_uri)
        self._guard(super().setup, *args, **kwargs)

    def __getstate__(self):
        # Tune pickles its callbacks into tuner.pkl: no credential may go there with them
        state = {**self.__dict__, "_base": redact(self._base), "_cells": redact(self._cells)}
        if state.get("tracking_uri"):
            state["tracking_uri"] = tracking.keep_secret(state["tracking_uri"])
        return state

    def log_trial_start(self, trial):
        self._guard(super().log_trial_start, trial)

    def log_trial_result(self, iteration, trial, result):
        self._guard(super().log_trial_result, iteration, trial, result)

    def log_trial_end(self, trial, failed: bool = False):
        self._guard(super().log_trial_end, trial, failed)


class _MLflowTrials(MLflowLoggerCallback):
    def __init__(self, base: dict, tracking_uri: str, experiment_name: str, tags: dict, cells=None):
        super().__init__(tracking_uri, experiment_name=experiment_name, tags=tags)
        self._base, self._sweep_tags, self._cells = base, dict(tags), cells

    def setup(self, *args, **kwargs):
        from mlflow import MlflowClient

        tracking.ensure_experiment(MlflowClient(self.tracking_uri), self.tracking_uri, self.experiment_name)
        super().setup(*args, **kwargs)

    def log_trial_start(self, trial):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        client = MlflowClient(self.tracking_uri)
        if trial not in self._trial_runs:  # a resumed sweep: the trial's run from before, if any
            runs = client.search_runs([self.mlflow_util.experiment_id], max_results=1,
                                      filter_string=f"tags.ctal_trial = '{trial.trial_id}'")
            if runs:
                self._trial_runs[trial] = runs[0].info.run_id
                client.update_run(runs[0].info.run_id, status="RUNNING")
        new = trial not in self._trial_runs
        cfg, tags = trial_tags(self._base, trial.config, self._cells)
        # Ray copies self.tags into the run it creates
        self.tags = {**self._sweep_tags, **tags, "ctal_trial": trial.trial_id}
        super().log_trial_start(trial)  # the run, with the sampled parameters as params
        if new:
            # The resolved config beside them, dotted keys (a sampled name like "fusion" differs
            # from its key "model.fusion", so the two sets never collide).
            params = [Param(k, v) for k, v in tracking.flat_params(to_dict(cfg)).items()]
            for i in range(0, len(params), 100):  # at most 100 params per batch
                client.log_batch(self._trial_runs[trial], params=params[i:i + 100])


class MLflowTrials(_NeverFails, _MLflowTrials):
    """Ray Tune's MLflowLoggerCallback: a run per trial in one experiment, tagged and guarded."""

    _what = "mlflow tracking"


class _WandbTrials(WandbLoggerCallback):
    def __init__(self, base: dict, tags: dict, cells=None, **kwargs):
        super().__init__(**kwargs)
        self._base, self._sweep_tags, self._init_kwargs = base, dict(tags), dict(self.kwargs)
        self._cells = cells

    def setup(self, *args, **kwargs):
        Path(self.kwargs["dir"]).mkdir(parents=True, exist_ok=True)  # the trials' actors write there
        super().setup(*args, **kwargs)

    def log_trial_start(self, trial):
        cfg, tags = trial_tags(self._base, trial.config, self._cells)
        # self.kwargs go to this trial's wandb.init: its tags, and its resolved config (nested)
        # with the sampled values at the top, as Ray logs them.
        self.kwargs = {**self._init_kwargs, "tags": tracking.wandb_tags({**self._sweep_tags, **tags}),
                       "config": redact({**to_dict(cfg), **trial.config})}
        super().log_trial_start(trial)


class WandbTrials(_NeverFails, _WandbTrials):
    """Ray Tune's WandbLoggerCallback (a logging actor per trial), offline by default, tagged and guarded."""

    _what = "wandb tracking"


def sweep_callbacks(cfg: FinetuneConfig, experiment: Path | str, name: str,
                    cells: Optional[dict[str, FinetuneConfig]] = None) -> list:
    """The Tune callbacks that track a sweep named ``name`` whose directory is ``experiment`` (where
    the embedded store goes): none for tracking=none. ``cells``: an ablation grid's configs by cell
    key (its trials name their cell). Raises ConfigError (ctal.tracking.check_tracking) before
    anything starts when runs cannot go where ``cfg`` says."""
    tracking.check_tracking(cfg.tracking, cfg.tracking_uri, experiment)
    base, tags = to_dict(cfg), {"sweep": name}
    cells = {k: to_dict(c) for k, c in cells.items()} if cells else None
    if cfg.tracking == "mlflow":
        return [MLflowTrials(base, tracking.mlflow_store(cfg.tracking_uri, experiment), name, tags, cells)]
    if cfg.tracking == "wandb":
        target = tracking.wandb_target(cfg.tracking_uri, experiment)
        # Ray's callback checks for an API key unless WANDB_MODE says offline, in this process;
        # the trial's logging actor gets the mode through wandb.init.
        if target["mode"] == "offline":
            os.environ["WANDB_MODE"] = "offline"
        return [WandbTrials(base, tags, cells, project=name, group=name, dir=target["dir"], mode=target["mode"],
                            settings=tracking.wandb_settings(target))]
    return []
