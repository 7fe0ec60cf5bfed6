"""Metrics of a fine-tuned checkpoint on the task protocol's test (or dev) rows, as a table.

    python pipelines/evaluate.py --task {emotion,sentiment,speaker} --checkpoint DIR [--data DIR]
        [--split test|dev] [--out DIR] [tracking=mlflow|wandb tracking_uri=URI]

--checkpoint: a checkpoint of pipelines/tune_finetune.py (e.g. <experiment>/best_checkpoint).
--data defaults to the data set the checkpoint was fine-tuned on. Emotion prints each fold's session
and the mean over folds. --out (a directory or URI) keeps the metrics as metrics.json beside the
run's manifest.json (code, versions, command, machine, times). ``tracking=mlflow`` (or wandb) also
logs the metrics as a tracker run (ctal.tracking.log_evaluation), by default into the store beside
the checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

from ctal import storage
from ctal.checkpoint import CheckpointError, record_command
from ctal.config import TrackingConfig, load_config
from ctal.console import error_line
from ctal.manifest import recorded_run
from ctal.outputs import check_own
from ctal.data import TaskData
from ctal.finetune import evaluate, read_state
from ctal.tasks import TASKS
from ctal.tracking import check_tracking, log_evaluation


def format_table(metrics: dict, per_fold: dict, split: str) -> str:
    names = list(next(iter(per_fold.values())))
    rows = [(fold, m) for fold, m in per_fold.items()]
    if len(per_fold) > 1:
        rows.append(("mean", {n: metrics[n] for n in names}))
    width = max(len("fold"), *(len(r[0]) for r in rows))
    lines = ["fold".ljust(width) + "  " + "  ".join(f"{n:>8}" for n in names)]
    lines += [f"{fold:<{width}}  " + "  ".join(f"{m[n]:>8.4f}" for n in names) for fold, m in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--checkpoint", required=True, help="a directory or a URI (s3://…/best_checkpoint)")
    p.add_argument("--data", help="Parquet data set (default: the one the checkpoint was trained on)")
    p.add_argument("--split", choices=("test", "dev"), default="test")
    p.add_argument("--out", help="write metrics.json and manifest.json to this directory (or URI)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="tracking=mlflow|wandb|none, tracking_uri=URI")
    args = p.parse_args(argv)
    record_command()
    try:
        # absolute, so the messages name the files (and the checkpoint records where its data is)
        checkpoint = storage.normalize(args.checkpoint)
        track = load_config(TrackingConfig, [], args.overrides)
        check_tracking(track.tracking, track.tracking_uri, storage.parent(checkpoint))
        state = read_state(checkpoint)  # a URI is downloaded (once per version) by evaluate
        data = TaskData.load(storage.normalize(args.data) if args.data else state["data"])
        if args.out:  # never into a checkpoint (its manifest would call it damaged) or anything not ours
            check_own(args.out, ("evaluation",))
        with recorded_run(args.out, "evaluation", vars(args)) if args.out else contextlib.nullcontext():
            metrics, per_fold = evaluate(checkpoint, data, role=args.split, task=args.task)
            if args.out:
                storage.write_text(storage.join(args.out, "metrics.json"), json.dumps(
                    {"checkpoint": checkpoint, "data": str(data.data_dir), "split": args.split,
                     "metrics": metrics, "per_fold": per_fold}, indent=2, default=float))
    except (FileNotFoundError, FileExistsError, ValueError, CheckpointError) as e:
        p.exit(2, error_line(p.prog, e))
    print(f"{args.task} checkpoint {args.checkpoint} (epoch {state['epoch']}), {args.split} rows of {data.data_dir}")
    print(format_table(metrics, per_fold, args.split))
    run = log_evaluation(track.tracking, track.tracking_uri, checkpoint, state, metrics, args.split)
    if run is not None and not run.broken:
        print(f"tracked: {run.tracking} run at {run.where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
