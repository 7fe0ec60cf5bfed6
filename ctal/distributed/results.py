"""A finished sweep's (or ablation grid's) Tune results → the results table and plots (ctal.report), the
best checkpoint copied beside them, and for a sweep on a URI, all of it published there."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Optional

from ctal import storage
from ctal.report import SweepResult, trial_row, write_results
from ctal.search_space import SearchSpace

BEST_DIR = "best_checkpoint"


def summarize(grid, experiment: Path, task, space: SearchSpace, epochs: int,
              remote: Optional[str] = None) -> SweepResult:
    """Results table (best epoch of each trial), plots and the best checkpoint of a finished sweep.
    With ``remote`` (the sweep's URI) checkpoint paths are paths in that URI's filesystem."""
    metric = f"dev_{task.metric}"
    rows, curves, errors, best_ckpt = [], {}, {}, {}
    for result in grid:
        trial = Path(result.path).name.removeprefix("trial_")
        df = result.metrics_dataframe
        history = df[df[metric].notna()] if df is not None and metric in df else None
        if result.error is not None:
            errors[trial] = first_line(result.error)
        row, best = trial_row(trial, result.config, history, errors.get(trial, ""), epochs, metric, task.mode)
        rows.append(row)
        if best is not None:
            curves[trial] = (row["fusion"], history["epoch"].tolist(), history[metric].tolist())
            best_ckpt[trial] = checkpoint_of(result, best, metric, task.mode)
    table, csv_path, md_path, plots = write_results(rows, curves, metric, task.mode, experiment)

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


def first_line(error) -> str:
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    # Ray wraps the trial's exception; its last line names the original one.
    return f"{type(error).__name__}: {lines[-1] if lines else text}"[:300]


def checkpoint_of(result, best_row, metric: str, mode: str) -> Optional[Path]:
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


def published(result: SweepResult, remote: str) -> SweepResult:
    """Upload the staged summary next to Tune's trials; the result then names URIs."""
    local = result.experiment
    storage.upload_dir(local, remote)
    shutil.rmtree(local.parent, ignore_errors=True)

    def uri(p):
        return None if p is None else storage.join(remote, str(Path(p).relative_to(local)))

    return replace(result, experiment=remote, table_csv=uri(result.table_csv), table_md=uri(result.table_md),
                   plots=[uri(p) for p in result.plots], best_checkpoint=uri(result.best_checkpoint))
