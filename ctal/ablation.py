"""Controlled ablation studies of CTAL fine-tuning: the grid as data, nested label subsets, and the
statistics and report (no Ray here; `ctal.distributed.ablate` runs the grid as Ray Tune trials).

A study (YAML, `configs/ablate.yaml`) names its seeds, label fractions, the budget every cell gets,
how hyperparameters are chosen (fixed, or a nested sweep on dev per cell), a baseline cell and the
questions. A question varies one factor (its first level is the reference) at the baseline, optionally
across other factors (e.g. every label fraction); the grid is the union of the questions' cells, not
the full cross product. The ``frames`` factor names data sets: the baseline's level is the recipe's
--data (and --init), each other level its own data set of the same utterances with other frames (e.g.
SSL features) and the pretraining checkpoint trained on them, so a question can compare front ends
(``ctal.ablation_inputs`` reads and checks those inputs, and the label subsets).
A run is cell × seed (× hyperparameter sample when tuned); per (cell, seed) the run best on dev is
scored once on test. Differences are paired by seed and the `across` levels, with a
Student-t interval over the pairs, and every number in the report is recomputed from results.csv.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from ctal.config import ConfigError, FinetuneConfig, ModelConfig, read_yaml, to_dict
from ctal.variants import FUSION_VARIANTS
from ctal.report import markdown_table, plot_label_efficiency, plot_question
from ctal.tasks import TASKS

INIT_LEVELS = ("pretrained", "scratch")
FACTORS = ("init", "fusion", "orthogonality_weight", "fraction", "frames")
# Optional in a study's baseline: a study without it has one data set and cells (and cell keys) without it.
OPTIONAL_FACTORS = ("frames",)
FRAMES_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")  # a frames level: a name (it goes into cell keys)
# Cell factors that the grid owns: a nested sweep may not tune them (nor the budget's epochs).
GRID_PARAMETERS = ("fusion", "orthogonality_weight", "seed", "epochs")
# Architecture keys a scratch model copies from the pretrained checkpoint, so the two differ only in
# their initial weights (the cell's fusion, loss weight and the budget's dropout stay the study's).
_NOT_ARCHITECTURE = {"fusion", "orthogonality_weight", "hidden_dropout_prob", "attention_probs_dropout_prob",
                     "mlm_weight", "acoustic_weight", "text_init"}
CONFIDENCE = 0.95


def metric_mode(metric: str) -> str:
    """"min" for a metric where lower is better (a task's selection metric in min mode), else "max"."""
    return "min" if any(t.metric == metric and t.mode == "min" for t in TASKS.values()) else "max"


# --------------------------------------------------------------------------------------------------
# the grid


@dataclass(frozen=True)
class Question:
    name: str
    ask: str  # the question in words, for the report
    factor: str
    levels: tuple  # the first is the reference: differences are reference − level
    across: tuple = ()  # factors whose every study level gets its own cells (pairs match on them)


@dataclass(frozen=True)
class Study:
    seeds: tuple
    fractions: tuple
    baseline: dict
    questions: tuple
    budget: dict = field(default_factory=dict)  # FinetuneConfig keys, the same for every cell
    tuning: dict = field(default_factory=dict)  # {} fixed, else {"space": path, "num_samples": n}
    metric: Optional[str] = None  # reported test metric; None: the task's selection metric
    subset_seed: int = 0
    source: dict = field(default_factory=dict)

    @property
    def factors(self) -> tuple:
        """The factors the study's cells have: FACTORS, less an optional one its baseline leaves out."""
        return tuple(f for f in FACTORS if f in self.baseline)

    def levels(self, factor: str) -> tuple:
        return self.fractions if factor == "fraction" else ()

    def frames_levels(self) -> tuple:
        """The frames levels the grid uses, in question order (the baseline's first when it has cells)."""
        return tuple(dict.fromkeys(c["frames"] for c in self.cells() if "frames" in c))

    def question_cells(self, q: Question) -> list[dict]:
        """The cells question ``q`` needs: its levels × every level of its ``across`` factors."""
        spans = [self.levels(a) for a in q.across]
        return [{**self.baseline, q.factor: level, **dict(zip(q.across, combo))}
                for level in q.levels for combo in itertools.product(*spans)]

    def cells(self) -> list[dict]:
        """Every cell some question needs, each once, in question order."""
        out = {}
        for q in self.questions:
            for c in self.question_cells(q):
                out.setdefault(cell_key(c), c)
        return list(out.values())


def cell_key(cell: dict) -> str:
    return ",".join(f"{f}={cell[f]}" for f in FACTORS if f in cell)  # a study without frames: as before it


def parse_study(data, source: str = "study") -> Study:
    """Validate a study mapping (see configs/ablate.yaml); ConfigError names the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping")
    known = {"seeds", "fractions", "baseline", "questions", "budget", "tuning", "metric", "subset_seed"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    seeds, fractions = tuple(data.get("seeds") or ()), data.get("fractions") or ()
    try:
        fractions = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: fractions must be a list of numbers in (0, 1], got {fractions!r}") from None
    if len(seeds) < 3 or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{source}: seeds must be >= 3 distinct integers (an interval needs repeats), got {list(seeds)}")
    if not fractions or not all(0 < f <= 1 for f in fractions) or len(set(fractions)) != len(fractions):
        raise ConfigError(f"{source}: fractions must be distinct values in (0, 1], got {list(fractions)}")
    baseline = dict(data.get("baseline") or {})
    required = [f for f in FACTORS if f not in OPTIONAL_FACTORS]
    if not set(required) <= set(baseline) <= set(FACTORS):
        raise ConfigError(f"{source}: baseline must set exactly {required} (and optionally frames: the level "
                          f"name of --data, e.g. fbank), got {sorted(baseline)}")
    for factor, value in baseline.items():
        _check_level(factor, value, fractions, f"{source}: baseline.{factor}")
    questions = []
    if not isinstance(data.get("questions") or {}, dict):
        raise ConfigError(f"{source}: questions: a mapping of name → {{ask: ..., vary: {{factor: [levels]}}}}, "
                          f"got a {type(data['questions']).__name__}")
    for name, q in (data.get("questions") or {}).items():
        where = f"{source}: questions.{name}"
        vary = q.get("vary") if isinstance(q, dict) else None
        if not isinstance(vary, dict) or len(vary) != 1:
            raise ConfigError(f"{where}.vary: give one factor and its levels, e.g. {{init: [pretrained, scratch]}}")
        (factor, levels), = vary.items()
        if factor not in FACTORS or not isinstance(levels, list) or len(levels) < 2:
            raise ConfigError(f"{where}.vary: a factor of {list(FACTORS)} with >= 2 levels, got {factor}: {levels!r}")
        for level in levels:
            _check_level(factor, level, fractions, f"{where}.vary.{factor}")
        if factor not in baseline:
            raise ConfigError(f"{where}.vary.{factor}: set baseline.{factor} too, the level of the data set given "
                              f"as --data (e.g. baseline: {{..., {factor}: {levels[0]}}})")
        if len(set(levels)) != len(levels):
            raise ConfigError(f"{where}.vary.{factor}: a level is repeated in {levels!r}")
        across = tuple(q.get("across") or ())
        if any(a != "fraction" or a == factor for a in across):
            raise ConfigError(f"{where}.across: only [fraction] (the study's fractions), got {list(across)}")
        levels = [float(v) if factor in ("fraction", "orthogonality_weight") else v for v in levels]
        questions.append(Question(name, str(q.get("ask", name)), factor, tuple(levels), across))
    if not questions:
        raise ConfigError(f"{source}: questions: give at least one")
    tuning = data.get("tuning", "fixed")
    if tuning == "fixed":
        tuning = {}
    elif not (isinstance(tuning, dict) and set(tuning) <= {"space", "num_samples"} and tuning.get("space")
              and isinstance(tuning.get("num_samples", 1), int) and tuning.get("num_samples", 1) >= 1):
        raise ConfigError(f"{source}: tuning: 'fixed' or {{space: FILE, num_samples: N >= 1}}, got {tuning!r}")
    budget = dict(data.get("budget") or {})
    metric = data.get("metric")
    study = Study(seeds, fractions, {**baseline, "fraction": float(baseline["fraction"]),
                                     "orthogonality_weight": float(baseline["orthogonality_weight"])},
                  tuple(questions), budget, dict(tuning), metric, int(data.get("subset_seed", 0)), dict(data))
    return study


def _check_level(factor: str, value, fractions: tuple, where: str) -> None:
    ok = {"init": lambda v: v in INIT_LEVELS, "fusion": lambda v: v in FUSION_VARIANTS,
          "orthogonality_weight": lambda v: isinstance(v, (int, float)) and v >= 0,
          "fraction": lambda v: isinstance(v, (int, float)) and float(v) in fractions,
          "frames": lambda v: isinstance(v, str) and FRAMES_NAME.fullmatch(v) is not None}[factor]
    if not ok(value):
        allowed = {"init": list(INIT_LEVELS), "fusion": list(FUSION_VARIANTS), "orthogonality_weight": ">= 0",
                   "fraction": f"one of the study's fractions {list(fractions)}",
                   "frames": "a name (letters, digits, _ . -) for a data set, e.g. fbank or ssl"}[factor]
        raise ConfigError(f"{where}={value!r} is not allowed: {allowed}")


def load_study(path: str | Path) -> Study:
    return parse_study(read_yaml(path), str(path))  # syntax errors and binary files: ConfigError naming it


def cell_config(base: FinetuneConfig, cell: dict, init: Optional[str], subset_seed: int,
                arch: Optional[dict] = None) -> FinetuneConfig:
    """The fine-tuning config of one cell: ``base`` (with the study's budget) and the cell's levels;
    a scratch cell gets the architecture ``arch`` (the pretrained checkpoint's config.json) when given."""
    model = replace(base.model, fusion=cell["fusion"], orthogonality_weight=float(cell["orthogonality_weight"]))
    if cell["init"] == "scratch" and arch:
        keys = {f for f in to_dict(ModelConfig()) if f not in _NOT_ARCHITECTURE and f in arch}
        model = replace(model, **{k: arch[k] for k in keys})
    return replace(base, model=model, init=init if cell["init"] == "pretrained" else None,
                   label_fraction=float(cell["fraction"]), label_subset_seed=subset_seed)


# --------------------------------------------------------------------------------------------------
# scoring (the frames levels' inputs and the label subsets: ctal.ablation_inputs)


def report_metric(study: Study, task: str) -> str:
    """The study's reported test metric (default: the task's selection metric), checked against the task."""
    names = TASKS[task].metric_names
    metric = study.metric or TASKS[task].metric
    if metric not in names:
        raise ConfigError(f"metric={metric!r}: {task} reports {list(names)}")
    return metric


def score_on_test(runs: pd.DataFrame, data, task: str) -> pd.DataFrame:
    """Test metrics (`test_<name>`) of each selected run's best-on-dev checkpoint, each scored once
    through ctal.finetune.evaluate (the only reader of test rows); ``data``: the opened TaskData, or
    frames level → TaskData (``prepare_study``'s; a study without frames: under None)."""
    from ctal.finetune import evaluate

    runs = runs.copy()
    for i in runs.index[runs["selected"]]:
        level = data if not isinstance(data, dict) else data[runs.at[i, "frames"] if "frames" in runs else None]
        metrics, _ = evaluate(runs.at[i, "checkpoint"], level, role="test", task=task)
        for k, v in metrics.items():
            runs.loc[i, f"test_{k}"] = float(v)
    return runs


# --------------------------------------------------------------------------------------------------
# statistics


@dataclass(frozen=True)
class Interval:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof 1); NaN for n < 2
    low: float  # the Student-t interval of the mean; NaN for n < 2
    high: float


def t_interval(values, confidence: float = CONFIDENCE) -> Interval:
    """Mean, sample std and the two-sided Student-t confidence interval of the mean of ``values``."""
    from scipy.stats import t

    x = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Interval(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half)


def paired_difference(a: dict, b: dict, confidence: float = CONFIDENCE) -> Interval:
    """The interval of the mean of a[k] − b[k] over the keys both have (e.g. (seed, fraction))."""
    keys = sorted(k for k in a if k in b and not (math.isnan(a[k]) or math.isnan(b[k])))
    return t_interval([a[k] - b[k] for k in keys], confidence)


def reading(diff: Interval, reference: str, other: str, metric: str, mode: str) -> str:
    """One sentence that says what the interval supports and what it does not."""
    if diff.n < 2:
        return f"only {diff.n} pair(s): no interval, no conclusion about {reference} vs {other}."
    better = (diff.mean > 0) == (mode == "max")
    size = f"{abs(diff.mean):.3g} {metric}"
    if diff.std == 0:
        return (f"all {diff.n} pairs differ by exactly {diff.mean:+.3g}: no spread over seeds, so the interval "
                "is degenerate; it supports nothing beyond these seeds (often both sides stuck at one prediction).")
    if diff.low <= 0 <= diff.high:
        return (f"interval includes 0: no evidence of a difference at n={diff.n} (differences from "
                f"{diff.low:+.3g} to {diff.high:+.3g} are not ruled out).")
    return (f"{reference} is {'better' if better else 'worse'} than {other} by {size} (interval excludes 0, "
            f"n={diff.n}); this holds for this data and budget, not beyond them.")


# --------------------------------------------------------------------------------------------------
# the report


def summarize_cells(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per cell, over its selected runs (one per seed): n, mean, std and the 95 % interval."""
    rows = []
    sel = runs[runs["selected"]]
    for key, group in sel.groupby("cell", sort=False):
        iv = t_interval(group[f"test_{metric}"].astype(float).tolist())
        first = group.iloc[0]
        rows.append({"cell": key, **{f: first[f] for f in FACTORS if f in group}, "n": iv.n, "mean": iv.mean,
                     "std": iv.std, "ci_low": iv.low, "ci_high": iv.high})
    return pd.DataFrame(rows)


def compare(study: Study, runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per question, reference − each other level, per level of its `across` factors and pooled."""
    mode = metric_mode(metric)
    sel = runs[runs["selected"]]
    rows = []
    for q in study.questions:
        cells = study.question_cells(q)
        ref, others = q.levels[0], q.levels[1:]
        spans = [("all", None)] + ([(f"{q.across[0]}={v}", v) for v in study.levels(q.across[0])]
                                   if q.across else [])
        for other in others:
            for label, at in spans:
                def values(level):
                    keys = {cell_key(c) for c in cells if c[q.factor] == level
                            and (at is None or c[q.across[0]] == at)}
                    part = sel[sel["cell"].isin(keys)]
                    return {(s, f): float(v) for s, f, v in zip(part["seed"], part["fraction"], part[f"test_{metric}"])}
                d = paired_difference(values(ref), values(other))
                rows.append({"question": q.name, "comparison": f"{ref} − {other}", "at": label, "n": d.n,
                             "diff": d.mean, "ci_low": d.low, "ci_high": d.high,
                             "reading": reading(d, str(ref), str(other), metric, mode)})
    return pd.DataFrame(rows)


def _pm(row) -> str:
    return f"{row['mean']:.4f} ± {row['std']:.4f}" if not math.isnan(row["std"]) else f"{row['mean']:.4f}"


def _ci(row) -> str:
    return "" if math.isnan(row["ci_low"]) else f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}]"


# FinetuneConfig keys each cell or run sets itself: an override of one is no budget of every cell
CELL_OWNED = {"task", "data", "init", "seed", "label_fraction", "label_subset_seed", "model.fusion",
              "model.orthogonality_weight"}


def cell_budget(study_budget: dict, overrides: list[str], base: FinetuneConfig) -> dict:
    """The budget every cell trained with: the study's keys and the command line's overrides, with the
    values the loaded config holds (an override such as ``epochs=3`` wins over the study's budget)."""
    values = to_dict(base)

    def get(key: str):
        v = values
        try:
            for part in key.split("."):
                v = v[part]
        except (KeyError, TypeError):  # not a config key as written: say it as the study or command gave it
            return study_budget.get(key, "as given")
        return v

    keys = [*study_budget, *(o.split("=", 1)[0] for o in overrides if "=" in o)]
    return {k: get(k) for k in dict.fromkeys(keys) if k not in CELL_OWNED}


def write_report(out: Path, study: Study, runs: pd.DataFrame, metric: str, *, task: str, header: list[str],
                 budget: Optional[dict] = None) -> Path:
    """results.csv (every run), report.md (cells, questions, plots) in ``out``. ``budget``: what every
    cell trained with (the study's budget after the command line's overrides); default the study's."""
    out = Path(out)
    runs.to_csv(out / "results.csv", index=False)
    cells, diffs = summarize_cells(runs, metric), compare(study, runs, metric)
    how = ("fixed (the fine-tuning config as given, no tuning)" if not study.tuning else
           f"tuned per cell and seed on dev by a nested random sweep of {study.tuning.get('num_samples', 1)} "
           f"sample(s) over {study.tuning['space']}")
    lines = ["# Ablation report", "", *header, "",
             f"Task: {task}. Reported metric: test {metric} ({'lower' if metric_mode(metric) == 'min' else 'higher'} "
             f"is better). Seeds: {list(study.seeds)}; label fractions: {list(study.fractions)} (nested subsets "
             f"of the training split, seed {study.subset_seed}, the same rows in every cell). Budget for every "
             f"cell: {(study.budget if budget is None else budget) or 'the config as given'}. Hyperparameters: {how}. Selection on dev only; "
             "each (cell, seed)'s best-on-dev checkpoint scored once on test. Intervals: 95 % Student-t over seeds.",
             "", "## Cells", ""]
    table = [{**r, "mean ± std": _pm(r), "95 % CI": _ci(r)} for r in cells.to_dict("records")]
    lines += [markdown_table(table, [*study.factors, "n", "mean ± std", "95 % CI"]), ""]
    plots = []
    curves = cells  # one curve per init level; with several frames levels, per init and frames level
    if "frames" in cells and cells["frames"].nunique() > 1:
        curves = cells.assign(init=[f"{i}, {f}" for i, f in zip(cells["init"], cells["frames"])])
    curve = plot_label_efficiency(curves, metric, out / "label_efficiency.png")
    if curve is not None:
        plots.append(curve)
        lines += [f"![label efficiency]({curve.name})", ""]
    lines += ["## Questions", ""]
    for q in study.questions:
        part = diffs[diffs["question"] == q.name]
        rows = [{**r, "difference": f"{r['diff']:+.4f}" if not math.isnan(r["diff"]) else "",
                 "95 % CI": _ci(r)} for r in part.to_dict("records")]
        bars = plot_question(cells[cells["cell"].isin({cell_key(c) for c in study.question_cells(q)})],
                             q.factor, q.across, metric, q.ask, out / f"question_{q.name}.png")
        plots.append(bars)
        lines += [f"### {q.ask}", "", markdown_table(rows, ["comparison", "at", "n", "difference", "95 % CI", "reading"]),
                  "", f"![{q.name}]({bars.name})", ""]
    lines += ["## Every run", "", "All runs are in results.csv (one row each, selected or not, failed included).", "",
              markdown_table(runs.to_dict("records"), [c for c in runs.columns if c != "checkpoint"], ".4g"), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
