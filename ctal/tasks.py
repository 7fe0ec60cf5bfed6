"""The three downstream tasks of CTAL behind one interface (protocols: DESIGN.md, "Downstream protocols").

A task says how targets come out of Parquet rows, what head and loss the model needs (`problem_type`,
`num_labels`), how rows split into folds of train / dev / test row indices, how model outputs on a set
of rows are scored, and which dev metric selects (`metric`, `mode`). Fine-tuning, Tune and evaluation
only ever talk to this interface.

- emotion: IEMOCAP 4 classes, leave-one-session-out. Fold SessionK tests on SessionK; its dev set is one
  speaker of the four training sessions (picked by (seed, K)), so dev, like test, is an unseen speaker.
- sentiment: CMU-MOSEI regression with L1 on the train / dev / test splits.
- speaker: classification over the train speakers; dev and test are verification trials
  (`ctal.corpora.trials`, VoxCeleb format, seeded) between utterances of held-out speakers, scored by the
  cosine of the fused embeddings → EER.

Selection reads dev only; only evaluation reads a fold's test rows.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from ctal import metrics
from ctal.corpora.iemocap import EMOTION_CLASSES
from ctal.corpora.trials import make_trials

ROLES = ("train", "dev", "test")
MAX_TRIALS = 20000  # per split; VoxCeleb1-O has 37,720


@dataclass(frozen=True)
class Meta:
    """The label-bearing columns of a data set (no features), one numpy array per column."""
    id: np.ndarray
    split: np.ndarray
    speaker: np.ndarray
    label: np.ndarray  # float64, NaN where the Parquet label is null

    @classmethod
    def from_table(cls, table) -> "Meta":
        cols = {c: table.column(c).to_pylist() for c in ("id", "split", "speaker")}
        label = np.array([np.nan if v is None else v for v in table.column("label").to_pylist()], dtype=np.float64)
        return cls(**{c: np.array(v, dtype=object) for c, v in cols.items()}, label=label)

    def __len__(self) -> int:
        return len(self.id)


@dataclass(frozen=True)
class Fold:
    """Row indices of one train / dev / test partition of the protocol."""
    name: str
    train: np.ndarray
    dev: np.ndarray
    test: np.ndarray

    def rows(self, role: str) -> np.ndarray:
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {ROLES}")
        return getattr(self, role)


@dataclass
class Outputs:
    """What the model produced for a list of rows, in that order."""
    logits: np.ndarray  # (N, num_labels)
    embeddings: np.ndarray  # (N, H): the fused vector


def _where(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask).astype(np.int64)


def _split_role(split: str) -> Optional[str]:
    """"train-clean-100" → "train", "dev" → "dev", "valid" → "dev" (LibriSpeech, MOSEI and CSV names)."""
    s = str(split).lower()
    for role, prefixes in (("train", ("train",)), ("dev", ("dev", "valid")), ("test", ("test",))):
        if s.startswith(prefixes):
            return role
    return None


class Task:
    """Base: targets from the Parquet `label` column; one fold from the train / dev / test splits."""
    name: str = ""
    problem_type: str = "single_label_classification"  # or "regression"
    metric: str = ""  # selection metric on dev
    mode: str = "max"
    metric_names: tuple[str, ...] = ()
    held_out_speakers: bool = False  # dev/test speakers must not appear in train

    # -- labels ---------------------------------------------------------------------------------
    def classes(self, meta: Meta, fold: Fold) -> Optional[list[str]]:
        """Class names (index = target) or None for regression."""
        return None

    def num_labels(self, classes: Optional[list[str]]) -> int:
        return 1 if classes is None else len(classes)

    def targets(self, meta: Meta, idx: np.ndarray, classes: Optional[list[str]]) -> np.ndarray:
        y = meta.label[idx]
        if np.isnan(y).any():
            bad = meta.id[idx][np.isnan(y)][0]
            raise ValueError(f"{self.name}: row {bad!r} has no label")
        return y if classes is None else y.astype(np.int64)

    # -- protocol -------------------------------------------------------------------------------
    def folds(self, meta: Meta, fold: Optional[str] = None, seed: int = 0) -> list[Fold]:
        if fold not in (None, "main"):
            raise ValueError(f"{self.name} has one train/dev/test partition; fold={fold!r} applies to emotion")
        roles = np.array([_split_role(s) for s in meta.split], dtype=object)
        parts = {r: _where(roles == r) for r in ROLES}
        empty = [r for r in ROLES if len(parts[r]) == 0]
        if empty:
            raise ValueError(f"{self.name}: no rows for {', '.join(empty)} (splits present: "
                             f"{sorted(set(meta.split))}; expected train*/dev*|valid*/test*)")
        out = Fold("main", parts["train"], parts["dev"], parts["test"])
        check_fold(out, meta, held_out_speakers=self.held_out_speakers)
        return [out]

    # -- scoring --------------------------------------------------------------------------------
    def score(self, outputs: Outputs, meta: Meta, idx: np.ndarray, classes, seed: int = 0) -> dict:
        raise NotImplementedError

    def aggregate(self, per_fold: dict[str, dict]) -> dict:
        """Mean over folds of each metric, plus `<metric>_<fold>` when there are several folds."""
        names = list(next(iter(per_fold.values())))
        out = {m: float(np.mean([f[m] for f in per_fold.values()])) for m in names}
        if len(per_fold) > 1:
            out.update({f"{m}_{fold}": f[m] for fold, f in per_fold.items() for m in names})
        return out


class EmotionTask(Task):
    name = "emotion"
    metric, mode = "ua", "max"  # class-balanced; IEMOCAP's classes are uneven
    metric_names = ("wa", "ua")

    def classes(self, meta, fold):
        return list(EMOTION_CLASSES)

    def folds(self, meta, fold=None, seed=0):
        sessions = sorted({s for s in meta.split if re.fullmatch(r"Session\d+", str(s))})
        others = sorted(set(meta.split) - set(sessions))
        if len(sessions) < 2 or others:
            raise ValueError(f"emotion expects IEMOCAP splits Session1..Session5, got {sorted(set(meta.split))}")
        if fold is not None and fold not in sessions:
            raise ValueError(f"fold={fold!r} is not one of {sessions}")
        out = []
        for k, session in enumerate(sessions, 1):
            if fold is not None and session != fold:
                continue
            test = meta.split == session
            pool_speakers = sorted(set(meta.speaker[~test]))
            if len(pool_speakers) < 2:
                raise ValueError(f"fold {session}: the training sessions hold {len(pool_speakers)} speaker(s); "
                                 "a held-out dev speaker needs at least 2")
            dev_speaker = pool_speakers[np.random.default_rng([seed, k]).integers(len(pool_speakers))]
            dev = ~test & (meta.speaker == dev_speaker)
            out.append(Fold(session, _where(~test & ~dev), _where(dev), _where(test)))
            check_fold(out[-1], meta, held_out_speakers=True)
        return out

    def score(self, outputs, meta, idx, classes, seed=0):
        y, pred = self.targets(meta, idx, classes), outputs.logits.argmax(-1)
        return {"wa": metrics.weighted_accuracy(y, pred), "ua": metrics.unweighted_accuracy(y, pred)}


class SentimentTask(Task):
    name = "sentiment"
    problem_type = "regression"
    metric, mode = "mae", "min"  # defined for any prediction (Corr is NaN for a constant one)
    metric_names = ("mae", "corr", "acc2", "f1", "acc7")

    def score(self, outputs, meta, idx, classes, seed=0):
        y, pred = self.targets(meta, idx, classes), outputs.logits[:, 0].astype(np.float64)
        out = {"mae": metrics.mae(y, pred), "corr": metrics.pearson_corr(y, pred), "acc7": metrics.acc7(y, pred)}
        nonzero = (y != 0).any()  # Acc-2 / F1 exclude neutral labels; a tiny split may hold only those
        out["acc2"] = metrics.acc2(y, pred) if nonzero else math.nan
        out["f1"] = metrics.f1_weighted(y, pred) if nonzero else math.nan
        return {m: out[m] for m in self.metric_names}


class SpeakerTask(Task):
    name = "speaker"
    metric, mode = "eer", "min"
    metric_names = ("eer", "n_trials")
    held_out_speakers = True

    def classes(self, meta, fold):
        return sorted(set(meta.speaker[fold.train]))

    def targets(self, meta, idx, classes):
        index = {s: i for i, s in enumerate(classes)}
        unknown = [s for s in meta.speaker[idx] if s not in index]
        if unknown:
            raise ValueError(f"speaker: {unknown[0]!r} is not a training speaker")
        return np.array([index[s] for s in meta.speaker[idx]], dtype=np.int64)

    def trials(self, meta: Meta, idx: np.ndarray, seed: int = 0) -> list[tuple[int, str, str]]:
        """Balanced target / non-target pairs over the rows `idx` (as many as exist, up to MAX_TRIALS)."""
        _, counts = np.unique(meta.speaker[idx].astype(str), return_counts=True)
        n_target = int(sum(c * (c - 1) // 2 for c in counts))
        n_non = len(idx) * (len(idx) - 1) // 2 - n_target
        n_pairs = 2 * min(n_target, n_non, MAX_TRIALS // 2)
        if n_pairs == 0:
            raise ValueError("speaker: verification needs two utterances of one speaker and two speakers")
        rows = [{"id": meta.id[i], "speaker": meta.speaker[i]} for i in idx]
        return make_trials(rows, n_pairs, seed)

    def score(self, outputs, meta, idx, classes, seed=0):
        trials = self.trials(meta, idx, seed)
        pos = {u: i for i, u in enumerate(meta.id[idx])}
        e = outputs.embeddings / np.maximum(np.linalg.norm(outputs.embeddings, axis=1, keepdims=True), 1e-12)
        a = np.array([pos[t[1]] for t in trials])
        b = np.array([pos[t[2]] for t in trials])
        scores = np.sum(e[a] * e[b], axis=1)  # cosine similarity
        labels = np.array([t[0] for t in trials])
        return {"eer": metrics.eer(labels, scores), "n_trials": float(len(trials))}


def check_fold(fold: Fold, meta: Meta, held_out_speakers: bool) -> None:
    """Refuse a fold whose roles share rows, or (when held out) share speakers with train."""
    sets = {r: set(fold.rows(r).tolist()) for r in ROLES}
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        if sets[a] & sets[b]:
            raise ValueError(f"fold {fold.name}: {a} and {b} share rows")
    if held_out_speakers:
        train = set(meta.speaker[fold.train])
        for role in ("dev", "test"):
            leak = sorted(train & set(meta.speaker[fold.rows(role)]))
            if leak:
                raise ValueError(f"fold {fold.name}: {role} speakers {leak[:3]} also appear in train; "
                                 "the protocol needs held-out speakers")


TASKS: dict[str, Task] = {t.name: t for t in (EmotionTask(), SentimentTask(), SpeakerTask())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


# --------------------------------------------------------------------------------------------------
# label subsets: the fraction of each fold's training labels a run sees (ctal.ablation's questions)


def label_subset(train: np.ndarray, strata: Optional[np.ndarray], fraction: float, seed: int) -> np.ndarray:
    """The first ceil(fraction · n) rows of each stratum's fixed permutation (seeded by ``seed`` only),
    in ``train``'s order: the same rows for every model seed, and nested (10 % ⊂ 30 % ⊂ 100 %)
    because a larger fraction takes a longer prefix of the same permutations. ``strata``: the class of
    each training row (None: regression, one stratum); every class keeps at least one row."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label_fraction={fraction} must be in (0, 1]")
    if fraction == 1:
        return train
    strata = np.zeros(len(train), dtype=np.int64) if strata is None else np.asarray(strata)
    rng = np.random.default_rng(seed)
    keep = []
    for s in sorted(set(strata.tolist())):  # sorted: the permutation does not depend on row order
        members = np.flatnonzero(strata == s)
        keep.append(rng.permutation(members)[:max(1, math.ceil(fraction * len(members)))])
    return train[np.sort(np.concatenate(keep))]


def fold_subset(task, meta, fold, fraction: float, seed: int):
    """``fold`` with its training rows cut to ``fraction`` by ``label_subset``,
    stratified by class when the task has classes; dev and test rows stay whole."""
    classes = task.classes(meta, fold)
    strata = None if classes is None else task.targets(meta, fold.train, classes)
    return replace(fold, train=label_subset(fold.train, strata, fraction, seed))
