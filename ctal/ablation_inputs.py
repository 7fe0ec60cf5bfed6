"""What each cell of an ablation study trains on, checked to make a paired comparison: the ``frames``
factor's inputs (a data set, and the pretraining checkpoint trained on its frames, per level) and the
nested label subsets every run of a (seed, fold, fraction) shares.

The study itself (its grid, statistics and report) is ``ctal.ablation``; ``ctal.distributed.ablate``
opens the levels and runs the grid.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ctal.ablation import FRAMES_NAME, Study
from ctal.config import ConfigError, FinetuneConfig
from ctal.tasks import fold_subset


# --------------------------------------------------------------------------------------------------
# the frames factor: a data set (and a pretraining checkpoint) per level


@dataclass(frozen=True)
class Frames:
    """A level of the frames factor: its data set and the pretraining checkpoint (or run directory)
    trained on its frames; a checkpoint refuses other frames, so each level has its own."""
    data: str
    init: Optional[str] = None


FRAMES_OPTION = "LEVEL=DIR[,init=CKPT]"


def parse_frames(values: list[str]) -> dict[str, Frames]:
    """The recipe's ``--frames LEVEL=DIR[,init=CKPT]`` options, each level once (ConfigError naming a
    malformed one)."""
    out = {}
    for value in values:
        name, eq, rest = value.partition("=")
        data, _, init = rest.rpartition(",init=") if ",init=" in rest else (rest, "", "")
        if not eq or not FRAMES_NAME.fullmatch(name) or not data or (",init=" in rest and not init):
            raise ConfigError(f"--frames {value}: expected {FRAMES_OPTION}, e.g. "
                              "ssl=data/mosei-ssl,init=runs/ctal-base-ssl")
        if name in out:
            raise ConfigError(f"--frames {name}: given twice")
        out[name] = Frames(data, init or None)
    return out


def frames_inputs(study: Study, data: str, init: Optional[str], given: dict[str, Frames]
                  ) -> dict[Optional[str], Frames]:
    """Each frames level → its data set and checkpoint, the baseline's level first: that level is
    ``data``/``init`` (--data, --init), every other one a ``given`` level (--frames); a study that does
    not vary frames has the one, under None. ConfigError naming a level the grid uses without a data
    set, a given one no question uses, and a level with 'pretrained' cells but no checkpoint."""
    ref, used = study.baseline.get("frames"), study.frames_levels()
    if ref is not None and ref in given:
        raise ConfigError(f"--frames {ref}=...: {ref!r} is the baseline's frames level, whose data set is --data "
                          "(and checkpoint --init)")
    for name in given:
        if name not in used:
            raise ConfigError(f"--frames {name}: no question of the study uses frames level {name!r} "
                              + (f"(its levels: {list(used)})" if used else "(it does not vary frames)"))
    for name in used:
        if name != ref and name not in given:
            raise ConfigError(f"the study uses frames level {name!r}: give its data set (and, for 'pretrained' "
                              f"cells, the checkpoint pretrained on its frames): --frames {name}=DIR[,init=CKPT]")
    out = {ref: Frames(data, init), **given}
    for name, frames in out.items():
        if not frames.init and any(c["init"] == "pretrained" and c.get("frames") == name for c in study.cells()):
            raise ConfigError("the study has 'pretrained' cells: give the pretraining checkpoint (--init)"
                              if name == ref else f"the study has 'pretrained' cells on frames {name!r}: give the "
                              f"checkpoint pretrained on them, --frames {name}={frames.data},init=CKPT")
    return out


def utterance_difference(a, b, a_name: str, b_name: str, show: int = 3) -> str:
    """'' when two data sets' Meta hold the same utterances (id with its split, speaker and label),
    else the difference in words, naming the first few ids."""
    def rows(meta):
        return {i: (s, sp, float(x)) for i, s, sp, x in zip(meta.id, meta.split, meta.speaker, meta.label)}

    def same(x, y):
        return all(u == v or (isinstance(u, float) and math.isnan(u) and math.isnan(v)) for u, v in zip(x, y))

    def named(ids):
        return ", ".join(map(str, ids[:show])) + (f", … ({len(ids)} in all)" if len(ids) > show else "")

    ra, rb = rows(a), rows(b)
    parts = [f"{len(ids)} only in {n!r} ({named(ids)})" for n, ids in
             ((a_name, [i for i in ra if i not in rb]), (b_name, [i for i in rb if i not in ra])) if ids]
    changed = [i for i in ra if i in rb and not same(ra[i], rb[i])]
    if changed:
        i = changed[0]
        what = ", ".join(f"{c} {x!r} vs {y!r}" for c, x, y in zip(("split", "speaker", "label"), ra[i], rb[i])
                         if not same((x,), (y,)))
        parts.append(f"{len(changed)} with another split, speaker or label (first {i}: {what})")
    if not parts and (len(ra) != len(a) or len(rb) != len(b)):
        parts.append(f"repeated ids ({len(a)} rows for {len(ra)} ids vs {len(b)} for {len(rb)})")
    return "; ".join(parts)


def check_paired(levels: dict, task, study: Study, cfg: FinetuneConfig) -> None:
    """Refuse frames levels whose data sets would not make a paired comparison at equal budget: other
    utterances (ids, splits, speakers, labels), another tokenizer (the text would differ too), or rows
    in another order, which gives other label subsets. ``levels``: level → opened TaskData, the
    baseline's first. ConfigError naming both data sets and the difference."""
    (ref, first), *others = levels.items()
    for name, other in others:
        where = f"frames levels {ref!r} ({first.data_dir}) and {name!r} ({other.data_dir})"
        diff = utterance_difference(first.meta, other.meta, ref, name)
        if diff:
            raise ConfigError(f"{where} hold different utterances: {diff}. A paired comparison at equal budget "
                              "needs the same ones: preprocess both front ends from the same corpus (what one of "
                              "them quarantined is listed in its quarantine.parquet)")
        if first.tokenizer.hash != other.tokenizer.hash:
            raise ConfigError(f"{where} are tokenized differently, so the text would differ too: preprocess "
                              f"one with the other's tokenizer (tokenizer={first.data_dir})")
        mine, theirs = subsets(task, first.meta, study, cfg), subsets(task, other.meta, study, cfg)
        if mine != theirs:
            first_diff = next((f"{s}, fold {f}, fraction {x}" for s in mine for f in mine[s] for x in mine[s][f]
                               if mine[s][f][x] != theirs.get(s, {}).get(f, {}).get(x)), "their folds")
            raise ConfigError(f"{where} hold the same utterances in another row order, which gives other label "
                              f"subsets ({first_diff}): preprocess both from the same corpus manifest")


# --------------------------------------------------------------------------------------------------
# the label subsets


def subsets(task, meta, study: Study, cfg: FinetuneConfig) -> dict:
    """The training ids of every fold at every fraction, per seed (emotion's dev speaker, and so its
    training rows, depend on the seed; the other tasks' do not), as the runs use them."""
    return {f"seed={s}": {f.name: {str(x): meta.id[fold_subset(task, meta, f, x, study.subset_seed).train].tolist()
                                   for x in study.fractions}
                          for f in task.folds(meta, cfg.fold, s)}
            for s in study.seeds}


def write_subsets(path: Path, task, meta, study: Study, cfg: FinetuneConfig) -> dict:
    """``subsets``, written to ``path`` for the record."""
    out = subsets(task, meta, study, cfg)
    Path(path).write_text(json.dumps(out, indent=1))
    return out


def thin_subsets(subsets: dict, least: int = 8) -> list[str]:
    """A line per (fold, fraction) of ``write_subsets``' record that leaves fewer than ``least`` training
    utterances under some seed: such a run trains, but on too little to say anything."""
    fewest: dict = {}
    for folds in subsets.values():
        for fold, fractions in folds.items():
            for x, ids in fractions.items():
                fewest[fold, x] = min(len(ids), fewest.get((fold, x), len(ids)))
    return [f"fold {fold}: fraction {x} leaves {n} training utterance(s)"
            for (fold, x), n in fewest.items() if n < least]
