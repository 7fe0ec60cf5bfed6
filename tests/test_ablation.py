"""Ablation studies (issue 18): the statistics against scipy on fixed inputs, nested stratified label
subsets, the grid as YAML, the report's numbers recomputed from results.csv, and the quick demo end
to end with its driver killed after the first finished run and resumed without rerunning it. The
frames factor (issue 31.5): log-mel vs SSL features, one data set and checkpoint per level, checked
before Ray to be a paired comparison of the same utterances."""
import json
import math
import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ctal.ablation import (Interval, cell_key, load_study, paired_difference, parse_study, reading, t_interval,
                           write_report)
from ctal.ablation_inputs import Frames, frames_inputs, parse_frames
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
        frames = f"{levels['frames']} | " if "frames" in levels else ""  # a study with the frames factor
        row = (f"| {levels['init']} | {levels['fusion']} | {float(levels['orthogonality_weight']):.3f} | "
               f"{float(levels['fraction']):.3f} | {frames}{len(x)} | {x.mean():.4f} ± {x.std(ddof=1):.4f} | "
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
    marker = tmp_path / "planted-code-ran"
    (grid / "callback-states-9999-12-31_00-00-00.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    code, err = run_recipe("ablate", "--task", "sentiment", "--data", tiny_data, "--config", study,
                           "--out", tmp_path / "out")
    assert code == 2, err
    assert "holds Ray state that no run of this study wrote (callback-states-9999-12-31_00-00-00.pkl)" in err
    assert sorted(p.name for p in grid.iterdir()) == ["callback-states-9999-12-31_00-00-00.pkl"]
    assert not (grid / SIGNATURE_FILE).exists() and not marker.exists()
    # a study to continue whose experiment state is gone (a partial copy) stops too: Ray would start over
    (grid / "callback-states-9999-12-31_00-00-00.pkl").unlink()
    (grid / "tuner.pkl").write_bytes(b"as a run wrote it")
    code, err = run_recipe("ablate", "--task", "sentiment", "--data", tiny_data, "--config", study,
                           "--out", tmp_path / "out")
    assert code == 2 and "its experiment_state-*.json is missing" in err, err
    assert sorted(p.name for p in grid.iterdir()) == ["tuner.pkl"]
    pickle.loads(pickle.dumps(_Planted(tmp_path / "control")))  # the payload is real: loading it runs it
    assert (tmp_path / "control").exists() and not marker.exists()


class _Planted:
    """A pickle that, when loaded, creates the file ``marker`` (stands for any code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_fraction_that_leaves_almost_nothing_to_train_on_is_named():
    from ctal.ablation_inputs import thin_subsets

    subsets = {"seed=0": {"all": {"0.05": ["a"], "1.0": list("abcdefghij")}},
               "seed=1": {"all": {"0.05": ["a", "b"], "1.0": list("abcdefghij")}}}
    assert thin_subsets(subsets) == ["fold all: fraction 0.05 leaves 1 training utterance(s)"]



def test_the_recipe_warns_of_a_thin_fraction_and_reports_the_budget_the_cells_trained_with(
        tmp_path, tiny_data, no_ray, monkeypatch, capsys):
    """Issue 30 (weak): a label fraction that leaves one utterance trained without a warning, and the
    report's "Budget for every cell" line gave the study's epochs where an ``epochs=`` override won.
    The grid's training and scoring are stood in for (no Ray): what is checked is the recipe around them."""
    import ctal.ablation
    import ctal.distributed.ablate
    import ctal.distributed.console

    study = tmp_path / "study.yaml"
    study.write_text("seeds: [0, 1, 2]\nfractions: [0.01, 1.0]\nmetric: mae\nbudget: {epochs: 1}\ntuning: fixed\n"
                     "baseline: {init: scratch, fusion: ctal, orthogonality_weight: 0.0, fraction: 1.0}\n"
                     "questions:\n  fusion:\n    ask: which fusion?\n    vary: {fusion: [ctal, late_concat]}\n"
                     "    across: [fraction]\n")
    trained = {}

    def run_study(configs, study, space, datas, out, **_):
        trained["epochs"] = {c.epochs for c in configs.values()}
        return pd.DataFrame([{"trial": f"t{i}", "status": "done", "cell": cell_key(c), **c, "seed": s,
                              "selected": True, "checkpoint": "", "test_mae": 1.0 + 0.1 * i}
                             for i, (c, s) in enumerate((c, s) for c in study.cells() for s in study.seeds)])

    monkeypatch.setattr(ctal.distributed.console, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(ctal.distributed.ablate, "run_study", run_study)
    monkeypatch.setattr(ctal.ablation, "score_on_test", lambda runs, data, task: runs)
    from pipelines.ablate import main

    assert main(["--task", "sentiment", "--data", str(tiny_data), "--config", str(study),
                 "--out", str(tmp_path / "out"), "epochs=3", *NARROW]) == 0
    said = capsys.readouterr().out
    assert re.search(r"warning\] fold \S+: fraction 0.01 leaves [1-7] training utterance\(s\): too few to learn",
                     said), said
    assert trained["epochs"] == {3}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Budget for every cell: {'epochs': 3," in report, report


# -- the frames factor: log-mel vs SSL features, a data set (and checkpoint) per level (issue 31.5) ----

FRAMES_GOOD = {**GOOD, "baseline": {**GOOD["baseline"], "frames": "fbank"},
               "questions": {"frames": {"vary": {"frames": ["fbank", "ssl"]}, "across": ["fraction"]},
                             "init": {"vary": {"init": ["pretrained", "scratch"]}}}}


def test_the_shipped_frames_study_asks_fbank_vs_ssl_and_other_studies_keep_their_cells():
    study = load_study(ROOT / "configs" / "ablate_frames.yaml")
    assert study.frames_levels() == ("fbank", "ssl") and study.factors[-1] == "frames"
    cells = [cell_key(c) for c in study.cells()]
    assert len(cells) == 2 * 3 and all(k.startswith("init=pretrained,fusion=ctal,") for k in cells)
    assert {k.rsplit(",", 1)[1] for k in cells} == {"frames=fbank", "frames=ssl"}
    # a study that does not name frames: the cells, keys and report columns as before (resumable)
    release = load_study(ROOT / "configs" / "ablate.yaml")
    assert release.frames_levels() == () and "frames" not in release.factors
    assert cell_key(release.cells()[0]) == "init=pretrained,fusion=ctal,orthogonality_weight=1.0,fraction=0.1"


@pytest.mark.parametrize("study, message", [
    ({**GOOD, "questions": {"q": {"vary": {"frames": ["fbank", "ssl"]}}}},
     "questions.q.vary.frames: set baseline.frames too, the level of the data set given as --data"),
    ({**FRAMES_GOOD, "baseline": {**FRAMES_GOOD["baseline"], "frames": "log mel"}},
     "baseline.frames='log mel' is not allowed: a name"),
    ({**FRAMES_GOOD, "questions": {"q": {"vary": {"frames": ["fbank", "a,b"]}}}},
     "questions.q.vary.frames='a,b' is not allowed"),
    ({**FRAMES_GOOD, "questions": {"q": {"vary": {"frames": ["fbank", "fbank"]}}}},
     "questions.q.vary.frames: a level is repeated in ['fbank', 'fbank']"),
    ({**FRAMES_GOOD, "baseline": {**FRAMES_GOOD["baseline"], "feats": "x"}}, "baseline must set exactly"),
])
def test_a_bad_frames_level_fails_naming_the_key(study, message):
    with pytest.raises(ConfigError, match=re.escape(f"study.yaml: {message}")):
        parse_study(study, "study.yaml")


def test_frames_options_parse_and_a_malformed_one_is_named():
    assert parse_frames(["ssl=d/mosei,ssl,init=runs/ssl", "mfcc=s3://b/m"]) == {
        "ssl": Frames("d/mosei,ssl", "runs/ssl"), "mfcc": Frames("s3://b/m", None)}
    for bad, message in (("d/mosei", "expected LEVEL=DIR"), ("ssl=", "expected"), ("ssl=d,init=", "expected")):
        with pytest.raises(ConfigError, match=f"--frames {re.escape(bad)}: {message}"):
            parse_frames([bad])
    with pytest.raises(ConfigError, match="--frames ssl: given twice"):
        parse_frames(["ssl=a", "ssl=b"])


def test_each_frames_level_gets_its_data_set_and_checkpoint_and_a_missing_one_is_named():
    study = parse_study(FRAMES_GOOD)
    levels = frames_inputs(study, "d/fbank", "runs/fbank", {"ssl": Frames("d/ssl", "runs/ssl")})
    assert levels == {"fbank": Frames("d/fbank", "runs/fbank"), "ssl": Frames("d/ssl", "runs/ssl")}
    assert frames_inputs(parse_study(GOOD), "d", "r", {}) == {None: Frames("d", "r")}  # no frames: one level
    for given, message in (
            ({}, "the study uses frames level 'ssl': give its data set (and, for 'pretrained' cells, the "
                 "checkpoint pretrained on its frames): --frames ssl=DIR[,init=CKPT]"),
            ({"ssl": Frames("d/ssl")}, "the study has 'pretrained' cells on frames 'ssl': give the checkpoint "
                                       "pretrained on them, --frames ssl=d/ssl,init=CKPT"),
            ({"ssl": Frames("d/ssl", "r"), "mfcc": Frames("d/m")}, "--frames mfcc: no question of the study uses "
                                                                   "frames level 'mfcc' (its levels: ['fbank', 'ssl'])"),
            ({"ssl": Frames("d/ssl", "r"), "fbank": Frames("d/f")}, "'fbank' is the baseline's frames level")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            frames_inputs(study, "d/fbank", "runs/fbank", given)
    with pytest.raises(ConfigError, match=re.escape("no question of the study uses frames level 'ssl' (it does not")):
        frames_inputs(parse_study(GOOD), "d", "r", {"ssl": Frames("d/ssl", "r")})


# Two tiny data sets of the same 24 utterances (one BPE): log-mel frames, and "SSL features" of a made-up
# WavLM (2 layers of 8, 20 ms) as preprocessing records them; a narrow CTAL pretrained 1 step on each.
NARROW = ["model.hidden_size=32", "model.num_attention_heads=4", "model.intermediate_size=64",
          "model.num_text_layers=1", "model.num_audio_layers=1", "model.max_audio_positions=200",
          "model.max_position_embeddings=66"]
UTTERANCES = 24


def write_frames_dataset(out: Path, frames: str, tok, *, drop=(), relabel=None, reverse=False) -> Path:
    from ctal.data import FBANK_DIM, write_dataset
    from ctal.upstream import UpstreamInfo

    rng = np.random.default_rng(0)
    words = "the a cat dog sat ran on under mat happy sad good bad".split()
    records = []
    for i in range(UTTERANCES):
        text, split = " ".join(rng.choice(words, size=5)), ("train", "dev", "test")[i % 3]
        t = 20 + i if frames == "fbank" else 10 + i // 2
        audio = rng.normal(size=(t, FBANK_DIM if frames == "fbank" else 16))
        records.append({"id": f"utt{i:04d}", "corpus": "tiny", "split": split, "speaker": f"{split}-spk{i % 4}",
                        "text": text, "input_ids": np.asarray(tok(text)["input_ids"], dtype=np.int32),
                        "n_frames": t, frames: audio.astype(np.float32 if frames == "fbank" else np.float16),
                        "label": (relabel or {}).get(i, float(i % 7 - 3)), "label_name": None,
                        "duration_s": (20 + i) / 100, "sample_rate": 16000})
    records = [r for i, r in enumerate(records) if i not in drop][::-1 if reverse else 1]
    ssl = {} if frames == "fbank" else {
        "features": {"frontend": "ssl", "ssl_model": "/models/wavlm", "ssl_layers": [0, 2]},
        "upstream": UpstreamInfo("wavlm", "ab" * 32, (0, 2), 8, 20.0, 16000, 400).to_dict()}
    write_dataset(out, records, tok, corpus="tiny", source="tests/test_ablation.py", **ssl)
    return out


@pytest.fixture(scope="module")
def frames_pair(tmp_path_factory):
    """fbank and ssl: the data sets, and each level's pretraining run directory."""
    from ctal.config import PretrainConfig, load_config
    from ctal.pretrain import pretrain_loop
    from ctal.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("frames")
    tok = train_bpe_tokenizer(["the a cat dog sat ran on under mat happy sad good bad"] * 4, 300, root / "bpe",
                              model_max_length=64)
    out = {"tok": tok, "root": root}
    for frames in ("fbank", "ssl"):
        out[frames] = write_frames_dataset(root / frames, frames, tok)
        cfg = load_config(PretrainConfig, [ROOT / "configs/pretrain.yaml"],
                          [*NARROW, f"data={out[frames]}", "max_frames=100", "max_steps=1", "checkpoint_every=1",
                           "batch_size=4", "bucket_pool_rows=16"])
        pretrain_loop(cfg, run_dir=root / f"run-{frames}", log=lambda _: None)
        out[f"run-{frames}"] = root / f"run-{frames}"
    return out


def _base(data) -> FinetuneConfig:
    from ctal.config import load_config

    return load_config(FinetuneConfig, [ROOT / "configs/finetune.yaml"],
                       [*NARROW, "task=sentiment", f"data={data}", "epochs=1", "batch_size=4"])


def test_each_cell_trains_on_its_frames_levels_data_set_and_checkpoint(frames_pair):
    from ctal.data import TaskData
    from ctal.distributed.ablate import cell_data, prepare_study

    fp, study = frames_pair, parse_study(FRAMES_GOOD)
    configs, _, datas = prepare_study(_base(fp["fbank"]), study, str(fp["run-fbank"]), TaskData.load(fp["fbank"]),
                                      {"ssl": Frames(str(fp["ssl"]), str(fp["run-ssl"]))})
    assert set(datas) == {"fbank", "ssl"} and datas["ssl"].frontend == "ssl" and datas["fbank"].frontend == "kaldi"
    per_cell = cell_data(study, datas)
    for cell in study.cells():
        cfg, level = configs[cell_key(cell)], cell["frames"]
        assert cfg.data == str(fp[level]) and per_cell[cell_key(cell)] is datas[level]
        if cell["init"] == "pretrained":  # the newest checkpoint of the level's own run directory
            assert cfg.init == str(fp[f"run-{level}"] / "checkpoints" / "step-00000001")
        else:
            assert cfg.init is None and cell["frames"] == "fbank"
    # scratch on SSL features: the architecture of the level's checkpoint, or of another level's with the
    # audio input of its own frames (2 layers x 8)
    scratch = parse_study({**FRAMES_GOOD, "baseline": {**FRAMES_GOOD["baseline"], "init": "scratch"}})
    for ssl_init in (str(fp["run-ssl"]), None):
        configs, _, _ = prepare_study(_base(fp["fbank"]), scratch, str(fp["run-fbank"]), TaskData.load(fp["fbank"]),
                                      {"ssl": Frames(str(fp["ssl"]), ssl_init)})
        ssl = configs[cell_key({**scratch.baseline, "frames": "ssl"})]
        assert (ssl.init, ssl.data, ssl.model.audio_dim, ssl.model.audio_layers) == (None, str(fp["ssl"]), 16, 2)
        assert ssl.model.hidden_size == 32  # narrow, as the pretrained checkpoints


def test_a_checkpoint_of_other_frames_is_refused_for_a_level(frames_pair):
    from ctal.data import TaskData
    from ctal.distributed.ablate import prepare_study

    fp = frames_pair
    with pytest.raises(ValueError, match="front end mismatch: checkpoint .*run-fbank.* was trained on "
                                         "features.frontend=kaldi frames, the data set holds features.frontend=ssl"):
        prepare_study(_base(fp["fbank"]), parse_study(FRAMES_GOOD), str(fp["run-fbank"]), TaskData.load(fp["fbank"]),
                      {"ssl": Frames(str(fp["ssl"]), str(fp["run-fbank"]))})


def test_unpaired_frames_levels_are_refused_before_ray_naming_the_difference(frames_pair, run_recipe, tmp_path):
    """Through the recipe: the shipped study, and the SSL data set missing, of other utterances, in
    another row order (other label subsets) or tokenized otherwise; nothing is written, Ray never starts."""
    from ctal.tokenizer import train_bpe_tokenizer

    fp, out = frames_pair, tmp_path / "out"
    args = ["--task", "sentiment", "--data", fp["fbank"], "--init", fp["run-fbank"],
            "--config", ROOT / "configs" / "ablate_frames.yaml", "--out", out, *NARROW]
    other_tok = train_bpe_tokenizer(["a quite different text for another byte pair encoding"] * 4, 300,
                                    tmp_path / "bpe", model_max_length=64)
    cases = [
        ([], "the study uses frames level 'ssl': give its data set"),
        ([f"ssl={tmp_path / 'nowhere'},init={fp['run-ssl']}"], "--frames ssl: '"),
        ([f"ssl={write_frames_dataset(tmp_path / 'other', 'ssl', fp['tok'], drop=(3, 7), relabel={5: 2.5})},"
          f"init={fp['run-ssl']}"],
         f"frames levels 'fbank' ({fp['fbank']}) and 'ssl' ({tmp_path / 'other'}) hold different utterances: 2 only "
         "in 'fbank' (utt0003, utt0007); 1 with another split, speaker or label (first utt0005: label 2.0 vs 2.5)"),
        ([f"ssl={write_frames_dataset(tmp_path / 'reversed', 'ssl', fp['tok'], reverse=True)},init={fp['run-ssl']}"],
         "hold the same utterances in another row order, which gives other label subsets (seed=0, fold "),
        ([f"ssl={write_frames_dataset(tmp_path / 'retok', 'ssl', other_tok)},init={fp['run-ssl']}"],
         "are tokenized differently, so the text would differ too"),
    ]
    for frames, message in cases:
        code, err = run_recipe("ablate", *args, *[f"--frames={f}" for f in frames])
        assert code == 2 and message in err, err
        assert not out.exists()


def test_each_run_is_scored_on_its_frames_levels_test_split(monkeypatch):
    import ctal.finetune

    from ctal.ablation import score_on_test

    seen = []
    monkeypatch.setattr(ctal.finetune, "evaluate",
                        lambda ckpt, data, role, task: (seen.append((ckpt, data, role)) or {"mae": 1.0}, None))
    runs = pd.DataFrame({"selected": [True, True, False], "checkpoint": ["a", "b", "c"],
                         "frames": ["fbank", "ssl", "ssl"]})
    scored = score_on_test(runs, {"fbank": "FBANK", "ssl": "SSL"}, "sentiment")
    assert seen == [("a", "FBANK", "test"), ("b", "SSL", "test")] and scored["test_mae"].notna().sum() == 2
    seen.clear()
    score_on_test(runs.drop(columns="frames"), {None: "ONE"}, "sentiment")  # a study without frames
    assert [d for _, d, _ in seen] == ["ONE", "ONE"]


def test_the_report_of_a_frames_study_has_the_frames_column_and_pairs_by_seed_and_fraction(tmp_path):
    study = parse_study(FRAMES_GOOD)
    rng = np.random.default_rng(1)
    rows = [{"trial": f"t{i}", "status": "done", "cell": cell_key(c), **c, "seed": s, "selected": True,
             "test_mae": float(rng.uniform(0.5, 1.5))}
            for i, (c, s) in enumerate((c, s) for c in study.cells() for s in study.seeds)]
    write_report(tmp_path, study, pd.DataFrame(rows), "mae", task="sentiment", header=[])
    report = (tmp_path / "report.md").read_text()
    assert "| init | fusion | orthogonality_weight | fraction | frames | n |" in report
    sel = pd.DataFrame(rows).set_index(["cell", "seed"])["test_mae"]
    diff = [sel[(cell_key({**study.baseline, "fraction": 0.5}), s)] -
            sel[(cell_key({**study.baseline, "fraction": 0.5, "frames": "ssl"}), s)] for s in study.seeds]
    ci = stats.ttest_1samp(diff, 0.0).confidence_interval(0.95)
    assert f"| fbank − ssl | fraction=0.5 | 3 | {np.mean(diff):+.4f} | [{ci.low:.4f}, {ci.high:.4f}] |" in report
    assert (tmp_path / "label_efficiency.png").stat().st_size > 0 and (tmp_path / "question_frames.png").is_file()


@pytest.mark.slow
def test_a_frames_study_runs_each_level_on_its_own_frames_end_to_end(frames_pair, ray_local, tmp_path):
    """The recipe with Ray Tune: 2 cells (fbank, ssl) x 3 seeds, 1 epoch; every run's checkpoint was
    fine-tuned on its level's frames and scored on its level's test split."""
    from ctal.checkpoint_data import trained_frontend
    from pipelines.ablate import main

    fp, out, config = frames_pair, tmp_path / "study", tmp_path / "frames.yaml"
    config.write_text("seeds: [0, 1, 2]\nfractions: [1.0]\nmetric: mae\nbudget: {epochs: 1}\ntuning: fixed\n"
                      "baseline: {init: pretrained, fusion: ctal, orthogonality_weight: 0.0, fraction: 1.0, "
                      "frames: fbank}\nquestions:\n  frames:\n    ask: fbank or ssl?\n"
                      "    vary: {frames: [fbank, ssl]}\n")
    assert main(["--task", "sentiment", "--data", str(fp["fbank"]), "--init", str(fp["run-fbank"]),
                 "--frames", f"ssl={fp['ssl']},init={fp['run-ssl']}", "--config", str(config), "--out", str(out),
                 *NARROW, "batch_size=4"]) == 0
    runs, report = recompute_and_compare(out, "mae")
    assert len(runs) == 6 and set(runs["status"]) == {"done"} and runs["selected"].all()
    assert runs["test_mae"].notna().all()
    for frames, ckpt in zip(runs["frames"], runs["checkpoint"]):
        assert trained_frontend(ckpt) == {"fbank": "kaldi", "ssl": "ssl"}[frames]
    assert "| fbank − ssl | all | 3 |" in report and f"frames ssl: data {fp['ssl']}" in report
