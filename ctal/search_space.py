"""Fine-tuning search spaces as data, and the one check of a sweep request before Ray starts.

A search space is YAML (`search_spaces/<task>.yaml`): one entry per parameter of PARAMETERS, either a
constant or a mapping with one distribution (`loguniform: [low, high]`, `uniform: [low, high]`,
`randint: [low, high)` or `choice: [values]`) and, optionally, `grid: [values]`, the points grid search
uses for it. Parsing validates names, bounds and every value a trial's config could receive; no Ray
here: `ctal.distributed.tune` turns a SearchSpace into Tune's sampling objects.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ctal.config import (ConfigError, FinetuneConfig, SweepConfig, from_dict, read_yaml, to_dict,
                         validate_finetune_config)

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
    # model.audio_upstream (waveform data): fine-tune the encoder or not, and at which rate
    "freeze_upstream": ("freeze_upstream",),
    "upstream_lr": ("upstream_lr",),
    "seed": ("seed",),  # restarts: an objective with plateaus (an interaction label) can need them
}
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")


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
    origin: str = "search space"  # where it was read: errors name it

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
        return SearchSpace(keep(self.params), keep(self.source), self.origin), drop


def parse_search_space(data: Any, source: str = "search space") -> SearchSpace:
    """Validate a search-space mapping: names, distributions, bounds and every value's type."""
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{source}: expected a non-empty mapping of parameter → distribution")
    unknown = ", ".join(repr(k) for k in data if k not in PARAMETERS)
    if unknown:
        raise ConfigError(f"{source}: unknown parameter(s) {unknown}; allowed: {', '.join(PARAMETERS)}")
    params = {name: _param(name, spec, f"{source}: {name}") for name, spec in data.items()}
    for p in params.values():
        for value in _candidates(p):  # every value the config could receive must fit its field
            try:
                apply_params(FinetuneConfig(), {p.name: value})
            except ConfigError as e:
                raise ConfigError(f"{source}: {p.name}: {e}") from None
    return SearchSpace(params, copy.deepcopy(data), source)


def _param(name: str, spec: Any, where: str) -> Param:
    """One entry: a constant, or one distribution and its optional grid."""
    if not isinstance(spec, dict):
        return Param(name, None, (spec,))
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
    return Param(name, dist, tuple(args), tuple(grid) if grid else None)


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
    return parse_search_space(read_yaml(path), str(path))  # a syntax error: one line, file and position


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


def check_candidates(cfg: FinetuneConfig, space: SearchSpace) -> None:
    """Every value the space can give a trial, set on this sweep's `cfg`, within the ranges a run
    checks (``validate_finetune_config``): ConfigError naming the space, the parameter and the value,
    before Ray starts rather than inside that trial. Parameters are set one at a time: none of them
    constrains another."""
    for p in space.params.values():
        for value in _candidates(p):
            try:
                validate_finetune_config(apply_params(cfg, {p.name: value}))
            except ConfigError as e:
                raise ConfigError(f"{space.origin}: {p.name}: {e}") from None


def check_sweep(cfg: FinetuneConfig, space: SearchSpace, sweep: SweepConfig, data=None) -> None:
    """The one check of a sweep request, before Ray starts: the settings' ranges, the space against
    the search mode and the scheduler, and (given the opened `data`, a ctal.data.TaskData) the
    data set against the task's protocol. Types and key names were checked when the configs loaded.
    Raises ConfigError naming every setting that does not fit, or the protocol's ValueError."""
    s = sweep
    errors = [message for bad, message in (
        (s.num_samples is not None and s.num_samples < 1, f"num_samples must be >= 1, got {s.num_samples}"),
        (s.cpus_per_trial <= 0, f"cpus_per_trial must be > 0, got {s.cpus_per_trial}"),
        (s.gpus_per_trial < 0, f"gpus_per_trial must be >= 0, got {s.gpus_per_trial}"),
        (s.workers_per_trial < 1, f"workers_per_trial must be >= 1, got {s.workers_per_trial}"),
        (s.max_concurrent is not None and s.max_concurrent < 1,
         f"max_concurrent must be >= 1, got {s.max_concurrent}"),
        (s.grace_period < 1, f"grace_period must be >= 1, got {s.grace_period}"),
        (s.reduction_factor < 2, f"reduction_factor must be >= 2, got {s.reduction_factor}"),
        (not 0 <= s.verbose <= 3, f"verbose must be 0..3 (Tune's verbosity), got {s.verbose}"),
    ) if bad]
    missing = [p.name for p in space.params.values() if p.values() is None]
    if s.search == "grid" and missing:
        errors.append(f"search=grid needs a finite set for {', '.join(missing)}: use choice or add "
                      "'grid: [...]' to those entries")
    if s.search == "optuna" and not any(p.dist for p in space.params.values()):  # Optuna would fail inside Ray
        errors.append(f"search=optuna needs a distribution to search, and every entry of {space.origin} is a "
                      "constant (or was set on the command line): add one, or use --search random or grid")
    max_epochs = space.max_of("epochs", cfg.epochs)
    if s.scheduler == "asha" and s.grace_period > max_epochs:
        errors.append(f"grace_period={s.grace_period}: ASHA needs it <= the most epochs a trial runs "
                      f"({max_epochs})")
    if errors:
        raise ConfigError("; ".join(errors))
    check_candidates(cfg, space)
    if data is not None:
        from ctal.tasks import get_task  # (its metrics import scikit-learn: seconds, only needed here)

        get_task(cfg.task).folds(data.meta, cfg.fold, cfg.seed)  # the protocol fits the data
