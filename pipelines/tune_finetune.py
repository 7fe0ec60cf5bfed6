"""Ray Tune sweep of CTAL fine-tuning for one task: hyperparameters and fusion variants.

    python pipelines/tune_finetune.py --task {emotion,sentiment,speaker} --data DIR [--init DIR]
        [--config FILE ...] [--space FILE] [--search random|grid|optuna] [--scheduler asha|fifo]
        [--num-samples N] [--gpus-per-trial F] [--cpus-per-trial F] [--workers-per-trial N]
        [--max-concurrent N] [--storage DIR] [--name NAME] [--resume] [key=value ...]

Config: configs/finetune.yaml, then each --config (e.g. configs/narrow.yaml), then key=value overrides
of FinetuneConfig; overriding a searched key (e.g. epochs=3) takes it out of the search. The search
space defaults to search_spaces/<task>.yaml. --resume continues the sweep at <storage>/<name> with the
config, space and options it was started with. Bad settings fail before Ray starts (exit code 2).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctal import storage
from ctal.config import ConfigError, FinetuneConfig, load_config
from ctal.distributed.tune import SweepOptions, describe, load_search_space, load_sweep, run_sweep
from ctal.finetune import TaskData
from ctal.tasks import TASKS, get_task

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASKS))
    p.add_argument("--data", help="Parquet data set from pipelines/preprocess.py")
    p.add_argument("--init", help="pretraining checkpoint (default: a fresh model, with a warning)")
    p.add_argument("--config", action="append", default=[], help="FinetuneConfig YAML (repeatable)")
    p.add_argument("--space", help="search space YAML (default: search_spaces/<task>.yaml)")
    p.add_argument("--search", choices=("optuna", "random", "grid"), default="optuna")
    p.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    p.add_argument("--num-samples", type=int, help="trials (grid: repeats of the grid); default 8 / 1")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="fractions share a GPU")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--workers-per-trial", type=int, default=1, help="> 1: DDP with a TorchTrainer per trial")
    p.add_argument("--max-concurrent", type=int)
    p.add_argument("--storage", default="runs/tune", help="where sweeps live: a directory or a URI "
                                                          "(s3://bucket/prefix, gs://, file://)")
    p.add_argument("--name", help="experiment name (default: ctal-<task>)")
    p.add_argument("--resume", action="store_true", help="continue the sweep at <storage>/<name>")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)

    try:
        if args.resume:
            name = args.name or f"ctal-{args.task}"
            experiment = (storage.join(args.storage, name) if storage.is_uri(args.storage)  # s3://, gs://, file://
                          else Path(args.storage).resolve() / name)
            if not storage.is_file(storage.join(experiment, "sweep.json")):
                raise FileNotFoundError(f"no sweep to resume at {experiment}")
            cfg, space, opts = load_sweep(experiment)
            print(f"resuming {experiment} with the config, search space and options it started with")
        else:
            if not args.task or not args.data:
                raise ConfigError("--task and --data are required (unless --resume)")
            extra = [f"task={args.task}", f"data={args.data}"] + ([f"init={args.init}"] if args.init else [])
            cfg = load_config(FinetuneConfig, [ROOT / "configs" / "finetune.yaml", *args.config],
                              [*args.overrides, *extra])
            space = load_search_space(args.space or ROOT / "search_spaces" / f"{args.task}.yaml")
            space, pinned = space.pin([o.split("=", 1)[0] for o in args.overrides])
            if pinned:
                print(f"not searched, set on the command line: {', '.join(pinned)}")
            opts = SweepOptions(search=args.search, scheduler=args.scheduler, num_samples=args.num_samples,
                                gpus_per_trial=args.gpus_per_trial, cpus_per_trial=args.cpus_per_trial,
                                workers_per_trial=args.workers_per_trial, max_concurrent=args.max_concurrent,
                                storage=args.storage, name=args.name)
            opts.check()
            space.check(opts.search)
        data = TaskData.load(cfg.data)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")

    import ray

    if not ray.is_initialized():
        ray.init()  # joins the cluster named by RAY_ADDRESS, else starts a local one
    try:
        result = run_sweep(cfg, space, opts, resume=args.resume, data=data)
    except (ConfigError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(describe(result, get_task(cfg.task)))
    return 0 if result.best_checkpoint else 1


if __name__ == "__main__":
    sys.exit(main())
