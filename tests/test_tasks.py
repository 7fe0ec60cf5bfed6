"""Task interface and protocols: leave-one-session-out without leakage, held-out speaker trials,
metrics on model outputs checked against scikit-learn / scipy."""
import math

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from ctal.metrics import eer
from ctal.tasks import TASKS, Fold, Meta, Outputs, check_fold, get_task


def meta(ids, splits, speakers, labels):
    obj = lambda xs: np.array(xs, dtype=object)
    return Meta(obj(ids), obj(splits), obj(speakers), np.array(labels, dtype=np.float64))


@pytest.fixture
def iemocap():
    """5 sessions x 2 speakers x 6 utterances, labels cycling over the 4 classes."""
    ids, splits, speakers, labels = [], [], [], []
    for s in range(1, 6):
        for g in "FM":
            for u in range(6):
                ids.append(f"Ses0{s}{g}_impro01_{g}{u:03d}")
                splits.append(f"Session{s}")
                speakers.append(f"Ses0{s}_{g}")
                labels.append((s + u) % 4)
    return meta(ids, splits, speakers, labels)


@pytest.fixture
def librispeech():
    """12 train, 4 dev and 4 test speakers (held out, as LibriSpeech's subsets), 3 utterances each."""
    ids, splits, speakers = [], [], []
    for k in range(20):
        split = "train-clean-100" if k < 12 else "dev-clean" if k < 16 else "test-clean"
        for u in range(3):
            ids.append(f"{1000 + k}-1-{u:04d}")
            splits.append(split)
            speakers.append(str(1000 + k))
    return meta(ids, splits, speakers, [np.nan] * len(ids))


# -- the interface ---------------------------------------------------------------------------------

def test_registry_names_the_three_tasks_with_their_selection_metric():
    assert set(TASKS) == {"emotion", "sentiment", "speaker"}
    assert (get_task("emotion").metric, get_task("emotion").mode) == ("ua", "max")
    assert (get_task("sentiment").metric, get_task("sentiment").mode) == ("mae", "min")
    assert (get_task("speaker").metric, get_task("speaker").mode) == ("eer", "min")
    assert get_task("sentiment").problem_type == "regression"
    for t in TASKS.values():
        assert t.metric in t.metric_names
    with pytest.raises(ValueError, match="unknown task 'asr'"):
        get_task("asr")


# -- emotion: leave-one-session-out ----------------------------------------------------------------

def test_leave_one_session_out_has_no_session_or_speaker_leakage(iemocap):
    folds = get_task("emotion").folds(iemocap)
    assert [f.name for f in folds] == [f"Session{k}" for k in range(1, 6)]
    for f in folds:
        assert set(iemocap.split[f.test]) == {f.name}
        assert f.name not in set(iemocap.split[f.train]) | set(iemocap.split[f.dev])
        # dev is one whole speaker of the training sessions, unseen in train, like the test speakers
        assert len(set(iemocap.speaker[f.dev])) == 1
        assert not set(iemocap.speaker[f.dev]) & set(iemocap.speaker[f.train])
        assert not set(iemocap.speaker[f.test]) & (set(iemocap.speaker[f.train]) | set(iemocap.speaker[f.dev]))
        # every row is used exactly once
        assert sorted(np.concatenate([f.train, f.dev, f.test])) == list(range(len(iemocap)))


def test_emotion_folds_are_deterministic_and_a_chosen_fold_is_the_same(iemocap):
    task = get_task("emotion")
    a, b = task.folds(iemocap, seed=3), task.folds(iemocap, seed=3)
    assert all(np.array_equal(x.dev, y.dev) and np.array_equal(x.train, y.train) for x, y in zip(a, b))
    one = task.folds(iemocap, fold="Session3", seed=3)
    assert len(one) == 1 and np.array_equal(one[0].dev, a[2].dev) and np.array_equal(one[0].test, a[2].test)
    with pytest.raises(ValueError, match="fold='Session9' is not one of"):
        task.folds(iemocap, fold="Session9")


def test_emotion_refuses_data_that_is_not_split_by_session(iemocap):
    bad = meta(iemocap.id, ["train"] * len(iemocap), iemocap.speaker, iemocap.label)
    with pytest.raises(ValueError, match="Session1..Session5"):
        get_task("emotion").folds(bad)


def test_emotion_scores_match_sklearn(iemocap):
    task = get_task("emotion")
    fold = task.folds(iemocap)[0]
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(fold.test), 4))
    m = task.score(Outputs(logits, logits), iemocap, fold.test, task.classes(iemocap, fold))
    y = iemocap.label[fold.test].astype(int)
    assert m["wa"] == pytest.approx(accuracy_score(y, logits.argmax(1)))
    assert m["ua"] == pytest.approx(balanced_accuracy_score(y, logits.argmax(1)))


def test_aggregate_gives_the_mean_and_each_fold():
    out = get_task("emotion").aggregate({"Session1": {"wa": 0.5, "ua": 0.4}, "Session2": {"wa": 0.7, "ua": 0.6}})
    assert out["wa"] == pytest.approx(0.6) and out["ua"] == pytest.approx(0.5)
    assert out["ua_Session2"] == 0.6
    assert get_task("sentiment").aggregate({"main": {"mae": 1.0}}) == {"mae": 1.0}


# -- sentiment -------------------------------------------------------------------------------------

def test_sentiment_uses_the_dev_split_and_scores_match_references():
    rng = np.random.default_rng(1)
    n = 60
    splits = ["train"] * 30 + ["dev"] * 15 + ["test"] * 15
    labels = np.round(rng.uniform(-3, 3, n) * 3) / 3
    m = meta([f"v{i}_1" for i in range(n)], splits, [f"v{i}" for i in range(n)], labels)
    task = get_task("sentiment")
    (fold,) = task.folds(m)
    assert set(m.split[fold.dev]) == {"dev"} and set(m.split[fold.test]) == {"test"}
    pred = rng.uniform(-3, 3, (len(fold.dev), 1))
    s = task.score(Outputs(pred, pred), m, fold.dev, None)
    y, p = labels[fold.dev], pred[:, 0]
    nz = y != 0
    assert s["mae"] == pytest.approx(np.mean(np.abs(y - p)))
    assert s["corr"] == pytest.approx(pearsonr(y, p)[0])
    assert s["acc2"] == pytest.approx(accuracy_score(y[nz] > 0, p[nz] > 0))
    assert s["f1"] == pytest.approx(f1_score(y[nz] > 0, p[nz] > 0, average="weighted"))
    assert s["acc7"] == pytest.approx(np.mean(np.clip(np.round(y), -3, 3) == np.clip(np.round(p), -3, 3)))
    with pytest.raises(ValueError, match="fold='Session1' applies to emotion"):
        task.folds(m, fold="Session1")


def test_sentiment_binary_metrics_are_nan_when_a_split_holds_only_neutral_labels():
    m = meta(["a", "b", "c"], ["train", "dev", "test"], ["x", "y", "z"], [1.0, 0.0, -1.0])
    s = get_task("sentiment").score(Outputs(np.array([[0.5]]), np.zeros((1, 2))), m, np.array([1]), None)
    assert math.isnan(s["acc2"]) and math.isnan(s["f1"]) and s["mae"] == 0.5


def test_a_missing_split_is_named():
    m = meta(["a", "b"], ["train", "test"], ["x", "y"], [1.0, 0.0])
    with pytest.raises(ValueError, match="no rows for dev"):
        get_task("sentiment").folds(m)


# -- speaker ---------------------------------------------------------------------------------------

def test_speaker_classes_are_train_speakers_and_dev_test_speakers_are_held_out(librispeech):
    task = get_task("speaker")
    (fold,) = task.folds(librispeech)
    classes = task.classes(librispeech, fold)
    assert classes == [str(1000 + k) for k in range(12)]
    assert task.num_labels(classes) == 12
    assert list(task.targets(librispeech, fold.train[:4], classes)) == [0, 0, 0, 1]
    assert not set(librispeech.speaker[fold.dev]) & set(classes)


def test_speaker_refuses_dev_speakers_seen_in_training(librispeech):
    leaky = meta(librispeech.id, librispeech.split, ["1000"] * len(librispeech), librispeech.label)
    with pytest.raises(ValueError, match="also appear in train"):
        get_task("speaker").folds(leaky)


def test_speaker_trials_are_deterministic_balanced_and_held_out(librispeech):
    task = get_task("speaker")
    (fold,) = task.folds(librispeech)
    trials = task.trials(librispeech, fold.dev, seed=0)
    assert trials == task.trials(librispeech, fold.dev, seed=0)
    assert sum(t[0] for t in trials) == len(trials) // 2 == 12  # all 4 x 3 same-speaker pairs
    dev_ids = set(librispeech.id[fold.dev])
    assert all(a in dev_ids and b in dev_ids for _, a, b in trials)


def test_speaker_eer_scores_trials_by_cosine_of_embeddings(librispeech):
    task = get_task("speaker")
    (fold,) = task.folds(librispeech)
    rng = np.random.default_rng(2)
    centers = {s: rng.normal(size=8) for s in sorted(set(librispeech.speaker))}
    emb = np.stack([centers[s] + rng.normal(scale=0.7, size=8) for s in librispeech.speaker[fold.test]])
    m = task.score(Outputs(np.zeros((len(emb), 12)), emb), librispeech, fold.test, None, seed=5)
    # reference: cosine computed here, pair by pair; EER as metrics.eer (itself checked against sklearn)
    pos = {u: i for i, u in enumerate(librispeech.id[fold.test])}
    trials = task.trials(librispeech, fold.test, seed=5)
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    scores = [cos(emb[pos[a]], emb[pos[b]]) for _, a, b in trials]
    assert m["eer"] == pytest.approx(eer([t[0] for t in trials], scores), abs=1e-12)
    assert 0.0 <= m["eer"] < 0.5  # same-speaker embeddings are closer: better than chance
    assert m["n_trials"] == len(trials)


def test_check_fold_refuses_rows_shared_between_roles(librispeech):
    f = Fold("x", np.array([0, 1]), np.array([1, 2]), np.array([3]))
    with pytest.raises(ValueError, match="train and dev share rows"):
        check_fold(f, librispeech, held_out_speakers=False)
