"""Ablation studies (issue 18): the statistics against scipy on fixed inputs, nested stratified label
subsets, the grid as YAML, the report's numbers recomputed from results.csv, and the quick demo end
to end with its driver killed after the first finished run and resumed without rerunning it."""
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ctal.ablation import (Interval, cell_key, load_study, paired_difference,
                           parse_study, reading, t_interval, write_report)
from ctal.config import ConfigError, FinetuneConfig
from ctal.tasks import label_subset
from sweep_kill import kill_mid_grid

ROOT = Path(__file__).resolve().parents[1]
X = [0.61, 0.55, 0.72, 0.48, 0.66]
Y = [0.52, 0.57, 0.60, 0.41, 0.58]


# -- statistics against scipy ------------------------------------------------------------------------

@pytest.mark.parametrize("values", [X, X[:3], [1.0, 3.0]])
def test_t_interval_matches_scipy(values):
    iv = t_interval(values)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    ci = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    assert iv.n == len(values) and iv.mean == pytest.approx(np.mean(values))
    assert iv.std == pytest.approx(np.std(values, ddof=1))
    assert (iv.low, iv.high) == pytest.approx((lo, hi))
    assert (iv.low, iv.high) == pytest.approx((ci.low, ci.high))


def test_t_interval_of_three_uses_the_t_quantile_with_two_degrees_of_freedom():
    iv = t_interval([1.0, 2.0, 3.0])  # mean 2, std 1, half width t(0.975, 2) / sqrt(3)
    assert iv.high - 2.0 == pytest.approx(4.302652729911275 / math.sqrt(3))


def test_paired_difference_matches_scipys_paired_t_test_and_pairs_by_key():
    a = {(s, 0.1): x for s, x in enumerate(X)}
    b = {(s, 0.1): y for s, y in reversed(list(enumerate(Y)))}  # order must not matter: keys pair them
    b[(99, 0.1)] = 5.0  # no partner: left out
    d = paired_difference(a, b)
    ci = stats.ttest_rel(X, Y).confidence_interval(0.95)
    assert d.n == 5 and d.mean == pytest.approx(np.mean(np.subtract(X, Y)))
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high))


def test_one_value_gives_no_interval_and_the_reading_says_so():
    assert math.isnan(t_interval([0.5]).low) and t_interval([]).n == 0
    assert "no interval" in reading(paired_difference({1: 0.5}, {1: 0.4}), "a", "b", "acc2", "max")


@pytest.mark.parametrize("diff, mode, words", [
    (Interval(3, 0.02, 0.03, -0.05, 0.09), "max", "interval includes 0: no evidence of a difference at n=3"),
    (Interval(3, 0.2, 0.02, 0.15, 0.25), "max", "a is better than b by 0.2 acc2"),
    (Interval(3, 0.2, 0.02, 0.15, 0.25), "min", "a is worse than b"),
    (Interval(3, 0.0, 0.0, 0.0, 0.0), "max", "no spread over seeds"),
])
def test_the_reading_follows_the_numbers(diff, mode, words):
    assert words in reading(diff, "a", "b", "acc2", mode)


# -- label subsets -----------------------------------------------------------------------------------

def test_label_subsets_are_nested_stratified_and_independent_of_row_order():
    rng = np.random.default_rng(5)
    train = np.sort(rng.choice(10_000, size=200, replace=False))
    classes = rng.integers(0, 4, size=200)
    subsets = {f: label_subset(train, classes, f, seed=0) for f in (0.1, 0.3, 1.0)}
    assert set(subsets[0.1]) < set(subsets[0.3]) < set(subsets[1.0]) == set(train)
    for f in (0.1, 0.3):
        picked = classes[np.isin(train, subsets[f])]
        for c in range(4):
            assert (picked == c).sum() == math.ceil(f * (classes == c).sum())  # per class, not overall
    assert np.array_equal(label_subset(train, classes, 0.3, seed=0), subsets[0.3])  # chosen once: repeatable
    assert not np.array_equal(label_subset(train, classes, 0.3, seed=1), subsets[0.3])
    assert len(label_subset(train, None, 0.1, seed=0)) == 20  # regression: one stratum


def test_label_fraction_is_range_checked_naming_the_key():
    from ctal.config import validate_finetune_config

    with pytest.raises(ConfigError, match="label_fraction=0.0 is out of range"):
        validate_finetune_config(FinetuneConfig(label_fraction=0.0))


# -- the grid as data --------------------------------------------------------------------------------

def test_the_grid_is_the_union_of_the_questions_cells_not_the_cross_product():
    study = load_study(ROOT / "configs" / "ablate.yaml")
    cells = {cell_key(c) for c in study.cells()}
    # pretraining: 2 inits x 3 fractions; fusion: 4 more variants; orthogonality: 1 more weight
    assert len(cells) == 6 + 4 + 1 < 2 * 7 * 2 * 3
    for f in ("demo", "demo_quick"):
        assert load_study(ROOT / "configs" / f"ablate_{f}.yaml").cells()


GOOD = {"seeds": [0, 1, 2], "fractions": [0.5, 1.0],
        "baseline": {"init": "pretrained", "fusion": "ctal", "orthogonality_weight": 1.0, "fraction": 1.0},
        "questions": {"q": {"vary": {"init": ["pretrained", "scratch"]}}}}


@pytest.mark.parametrize("change, message", [
    ({"seeds": [0, 1]}, "seeds must be >= 3 distinct integers"),
    ({"fractions": [0.0, 1.0]}, "fractions must be distinct values in (0, 1]"),
    ({"baseline": {"init": "pretrained"}}, "baseline must set exactly"),
    ({"questions": {"q": {"vary": {"fusion": ["ctal", "concat"]}}}}, "questions.q.vary.fusion='concat' is not allowed"),
    ({"questions": {"q": {"vary": {"fraction": [0.5, 0.2]}}}}, "one of the study's fractions"),
    ({"tuning": {"space": "x.yaml", "num_samples": 0}}, "tuning:"),
    ({"budget_epochs": 3}, "unknown key(s) ['budget_epochs']"),
    ({"fractions": ["abc"]}, "study.yaml: fractions must be a list of numbers in (0, 1], got ['abc']"),
    ({"questions": [{"vary": {"init": ["pretrained", "scratch"]}}]}, "study.yaml: questions: a mapping"),
])
def test_a_bad_study_fails_naming_the_key(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_study({**GOOD, **change}, "study.yaml")


@pytest.mark.parametrize("content, message", [
    (b"seeds: [0, 1, 2\nfractions: [1.0]\n", "invalid YAML at line"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not a UTF-8 text file"),
])
def test_a_study_file_that_is_not_yaml_fails_in_one_line_naming_it(tmp_path, content, message):
    (tmp_path / "study.yaml").write_bytes(content)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'study.yaml'}: {message}"):
        load_study(tmp_path / "study.yaml")


# -- the report from results.csv ---------------------------------------------------------------------

def recompute_and_compare(out: Path, metric: str):
    """Every cell's n, mean ± std and interval in report.md, recomputed from results.csv with scipy."""
    runs = pd.read_csv(out / "results.csv")
    report = (out / "report.md").read_text()
    assert len(runs) == len(report.split("## Every run")[1].strip().splitlines()) - 4  # every run listed
    selected = runs[runs["selected"]]
    assert not selected.duplicated(["cell", "seed"]).any()
    for cell, group in selected.groupby("cell"):
        x = group[f"test_{metric}"].to_numpy()
        lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x)) if x.std() > 0 else (x[0], x[0])
        levels = dict(kv.split("=") for kv in cell.split(","))
        row = (f"| {levels['init']} | {levels['fusion']} | {float(levels['orthogonality_weight']):.3f} | "
               f"{float(levels['fraction']):.3f} | {len(x)} | {x.mean():.4f} ± {x.std(ddof=1):.4f} | "
               f"[{lo:.4f}, {hi:.4f}] |")
        assert row in report, (row, report)
    return runs, report


def test_report_numbers_are_recomputable_from_results_csv(tmp_path):
    study = parse_study({**GOOD, "questions": {
        "pretraining": {"ask": "Pretraining?", "vary": {"init": ["pretrained", "scratch"]}, "across": ["fraction"]},
        "fusion": {"ask": "Fusion?", "vary": {"fusion": ["ctal", "late_concat"]}}}})
    rng = np.random.default_rng(0)
    rows = [{"trial": f"t{i}", "status": "done", "cell": cell_key(c), **c, "seed": s, "selected": True,
             "test_acc2": float(rng.uniform(0.4, 0.9))}
            for i, (c, s) in enumerate((c, s) for c in study.cells() for s in study.seeds)]
    rows.append({**rows[0], "trial": "unselected", "selected": False, "test_acc2": math.nan})
    write_report(tmp_path, study, pd.DataFrame(rows), "acc2", task="sentiment", header=[])
    runs, report = recompute_and_compare(tmp_path, "acc2")
    sel = runs[runs["selected"]].set_index(["cell", "seed"])["test_acc2"]
    pre = {s: sel[(cell_key({**study.baseline, "fraction": 0.5}), s)] -
           sel[(cell_key({**study.baseline, "init": "scratch", "fraction": 0.5}), s)] for s in study.seeds}
    ci = stats.ttest_1samp(list(pre.values()), 0.0).confidence_interval(0.95)
    assert f"| pretrained − scratch | fraction=0.5 | 3 | {np.mean(list(pre.values())):+.4f} | [{ci.low:.4f}, {ci.high:.4f}] |" in report
    assert "| pretrained − scratch | all | 6 |" in report and "| ctal − late_concat | all | 3 |" in report
    for name in ("label_efficiency.png", "question_pretraining.png", "question_fusion.png"):
        assert (tmp_path / name).stat().st_size > 0


# -- the quick demo's stages and a smaller grid, killed after its first finished run and resumed ------

# Half of --demo --quick's grid (what the installed wheel's demo and the README already run end to end
# need not run again here): one question at one fraction, the three seeds an interval needs.
SMALL_GRID = """seeds: [0, 1, 2]
fractions: [0.5, 1.0]
subset_seed: 0
metric: acc2
budget: {epochs: 1}
tuning: fixed
baseline: {init: pretrained, fusion: ctal, orthogonality_weight: 0.0, fraction: 0.5}
questions:
  pretraining:
    ask: Does pretraining help at half the labels?
    vary: {init: [pretrained, scratch]}
"""


@pytest.mark.slow
def test_quick_demo_killed_mid_grid_resumes_without_rerunning_a_finished_run(tmp_path, ray_local, capsys):
    out, config = tmp_path / "study", tmp_path / "small_grid.yaml"
    config.write_text(SMALL_GRID)
    # One run at a time: the first finishes while five remain, however fast or loaded the machine.
    argv = ["--demo", "--quick", "--config", str(config), "--out", str(out), "--max-concurrent", "1",
            "tracking=mlflow"]
    # Tune saves its experiment state every second, not when its "auto" period says (>= 10 s, by
    # which time an idle machine has finished the grid): the kill must land mid-grid.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    cmd = [sys.executable, str(ROOT / "pipelines" / "ablate.py"), *argv]
    study = load_study(config)
    total = len(study.cells()) * len(study.seeds)
    assert total == 6
    done = kill_mid_grid(cmd, env, out / "grid", total, tmp_path / "driver.log", timeout=420)

    def epochs_run(trial):
        lines = (out / "grid" / f"trial_{trial}" / "result.json").read_text().splitlines()
        return [(r["epoch"], r["epoch_s"]) for r in map(json.loads, lines)]

    before = {t: epochs_run(t) for t in done}
    from pipelines.ablate import main

    assert main(argv) == 0
    printed = capsys.readouterr().out
    for stage in ("corpus", "data", "pretrain"):
        assert f"[{stage}] reusing" in printed
    for t, runs in before.items():
        assert epochs_run(t) == runs  # finished before the kill: not trained again
    runs, report = recompute_and_compare(out, "acc2")
    assert len(runs) == total and set(runs["status"]) == {"done"} and runs["selected"].sum() == total
    assert set(runs["trial"]) >= set(done)
    assert "| pretrained − scratch | all | 3 |" in report
    subsets = json.loads((out / "subsets.json").read_text())["seed=0"]["main"]
    assert set(subsets["0.5"]) < set(subsets["1.0"])
    # tracking=mlflow: every run of results.csv has its MLflow run, tagged with its cell and seed
    # (a run interrupted by the kill may have a second one from the resumed driver)
    from mlflow import MlflowClient

    from ctal.tracking import mlflow_store
    client = MlflowClient(mlflow_store(None, out / "grid"))
    tracked = client.search_runs([client.get_experiment_by_name("grid").experiment_id])
    tagged = {(r.data.tags["cell"], r.data.tags["seed"]) for r in tracked}
    assert tagged == {(c, str(s)) for c, s in zip(runs["cell"], runs["seed"])}
    assert all(r.data.tags["fusion"] in runs["fusion"].values for r in tracked)


def test_a_bad_request_exits_2_before_ray_starts_and_writes_nothing(tmp_path, capsys):
    from pipelines.ablate import main

    study = tmp_path / "study.yaml"
    study.write_text("seeds: [0, 1]\n")
    for argv, message in ((["--task", "sentiment"], "--task and --data are required"),
                          (["--demo", "--config", str(study)], "seeds must be >= 3")):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--out", str(tmp_path / "out")])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_state_planted_in_a_new_studys_grid_is_refused_before_ray_and_never_signed(tmp_path, tiny_data, run_recipe):
    """Issue 30.1: a new study signed every state file it found in <out>/grid, so a pickle planted
    there was unpickled by the next run. Now such a grid stops the study before Ray, naming the file."""
    from ctal.distributed.signing import SIGNATURE_FILE

    study = tmp_path / "study.yaml"
    study.write_text("seeds: [0, 1, 2]\nfractions: [1.0]\nmetric: mae\nbudget: {epochs: 1}\ntuning: fixed\n"
                     "baseline: {init: scratch, fusion: ctal, orthogonality_weight: 0.0, fraction: 1.0}\n"
                     "questions:\n  fusion:\n    ask: which fusion?\n    vary: {fusion: [ctal, late_concat]}\n")
    from ctal.outputs import own_output

    grid = own_output(tmp_path / "out", "ablation") / "grid"  # a study's own --out (killed before its grid)
    grid.mkdir()
    (grid / "callback-states-9999-12-31_00-00-00.pkl").write_bytes(b"not ours")
    code, err = run_recipe("ablate", "--task", "sentiment", "--data", tiny_data, "--config", study,
                           "--out", tmp_path / "out")
    assert code == 2, err
    assert "holds Ray state that no run of this study wrote (callback-states-9999-12-31_00-00-00.pkl)" in err
    assert sorted(p.name for p in grid.iterdir()) == ["callback-states-9999-12-31_00-00-00.pkl"]
    assert not (grid / SIGNATURE_FILE).exists()
    # a study to continue whose experiment state is gone (a partial copy) stops too: Ray would start over
    (grid / "callback-states-9999-12-31_00-00-00.pkl").unlink()
    (grid / "tuner.pkl").write_bytes(b"as a run wrote it")
    code, err = run_recipe("ablate", "--task", "sentiment", "--data", tiny_data, "--config", study,
                           "--out", tmp_path / "out")
    assert code == 2 and "its experiment_state-*.json is missing" in err, err
    assert sorted(p.name for p in grid.iterdir()) == ["tuner.pkl"]


def test_a_fraction_that_leaves_almost_nothing_to_train_on_is_named():
    from ctal.ablation import thin_subsets

    subsets = {"seed=0": {"all": {"0.05": ["a"], "1.0": list("abcdefghij")}},
               "seed=1": {"all": {"0.05": ["a", "b"], "1.0": list("abcdefghij")}}}
    assert thin_subsets(subsets) == ["fold all: fraction 0.05 leaves 1 training utterance(s)"]

