"""Ray Tune sweep of CTAL fine-tuning for one task: hyperparameters and fusion variants.

    python pipelines/tune_finetune.py --task {emotion,sentiment,speaker} --data DIR [--init DIR]
        [--config FILE ...] [--space FILE] [--search random|grid|optuna] [--scheduler asha|fifo]
        [--num-samples N] [--gpus-per-trial F] [--cpus-per-trial F] [--workers-per-trial N]
        [--max-concurrent N] [--storage DIR] [--name NAME] [--sweep-config FILE ...] [--resume] [--share]
        [key=value ...] [sweep.key=value ...]

Config: configs/finetune.yaml, then each --config (e.g. configs/narrow.yaml), then key=value overrides
of FinetuneConfig; overriding a searched key (e.g. epochs=3) takes it out of the search. The search
space defaults to search_spaces/<task>.yaml. Sweep settings (SweepConfig): configs/sweep.yaml, then
each --sweep-config, then the flags above, then sweep.key=value (e.g. sweep.grace_period=2,
sweep.reduction_factor=2, sweep.seed=1, sweep.verbose=0). --resume continues the sweep at
<storage>/<name> with the config, space and sweep settings it was started with (and a
tracking_uri=URI given again: the sweep recorded its password redacted). Bad settings fail
before Ray starts (exit code 2).
"""
from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import fields, replace

from ctal import storage
from ctal.checkpoint import CheckpointError, record_command
from ctal.config import ConfigError, FinetuneConfig, SweepConfig, load_config
from ctal.console import SHARE_HELP, VERBOSE_HELP, error_line, set_verbose, stage
from ctal.distributed.signing import UntrustedStateError, verify_state
from ctal.distributed.tune import SWEEP_FILE, experiment_location, load_sweep, run_sweep
from ctal.finetune import prepare
from ctal.report import describe
from ctal.search_space import check_sweep, load_search_space
from ctal.shipped import shipped
from ctal.tasks import TASKS, get_task

SWEEP_KEYS = [f.name for f in fields(SweepConfig) if f.name != "verbose"]  # --verbose is the console's
VERBATIM = ("storage", "name")  # paths and names are not parsed as YAML


def one_of(key: str) -> str:
    """A flag's choices as SweepConfig's Literal type lists them, e.g. {asha,fifo}."""
    return "{" + ",".join(typing.get_args(typing.get_type_hints(SweepConfig)[key])) + "}"


def load_sweep_config(args) -> SweepConfig:
    """configs/sweep.yaml, each --sweep-config, the flags, then the sweep.key=value overrides."""
    flags = {k: v for k, v in vars(args).items() if k in SWEEP_KEYS and v is not None}
    overrides = [f"{k}={json.dumps(v) if k in VERBATIM else v}" for k, v in flags.items()]
    overrides += [o.removeprefix("sweep.") for o in args.overrides if o.startswith("sweep.")]
    try:
        return load_config(SweepConfig, [shipped("configs", "sweep.yaml"), *args.sweep_config], overrides)
    except ConfigError as e:  # say which config: FinetuneConfig has keys of the same names (seed)
        raise ConfigError(f"sweep settings: {e}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASKS))
    p.add_argument("--data", help="Parquet data set from pipelines/preprocess.py")
    p.add_argument("--init", help="pretraining checkpoint, or a pretraining run directory for its newest one "
                                  "(default: a fresh model, with a warning)")
    p.add_argument("--config", action="append", default=[], help="FinetuneConfig YAML (repeatable)")
    p.add_argument("--space", help="search space YAML (default: search_spaces/<task>.yaml)")
    # Sweep settings (SweepConfig; defaults in configs/sweep.yaml): each flag is an override of one.
    p.add_argument("--search", metavar=one_of("search"))
    p.add_argument("--scheduler", metavar=one_of("scheduler"))
    p.add_argument("--num-samples", metavar="N", help="trials (grid: repeats of the grid); default 8 / 1")
    p.add_argument("--gpus-per-trial", metavar="F", help="fractions share a GPU")
    p.add_argument("--cpus-per-trial", metavar="F")
    p.add_argument("--workers-per-trial", metavar="N", help="> 1: DDP with a TorchTrainer per trial")
    p.add_argument("--max-concurrent", metavar="N")
    p.add_argument("--storage", help="where sweeps live: a directory or a URI (s3://bucket/prefix, gs://, "
                                     "file://)")
    p.add_argument("--name", help="experiment name (default: ctal-<task>)")
    p.add_argument("--sweep-config", action="append", default=[], help="SweepConfig YAML (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the sweep at <storage>/<name>")
    p.add_argument("--share", action="store_true", help=SHARE_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="FinetuneConfig; sweep.key=value: SweepConfig")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP + "; Tune at sweep.verbose")
    args = p.parse_args(argv)
    set_verbose(args.verbose)
    record_command()  # for the model cards of the checkpoints this run writes

    try:
        sweep = load_sweep_config(args)
        if args.resume:
            experiment = experiment_location(sweep, args.task)
            if not storage.is_file(storage.join(experiment, SWEEP_FILE)):
                raise FileNotFoundError(f"no sweep to resume at {experiment}")
            verify_state(experiment, (SWEEP_FILE,))  # Ray's state there is pickled: ours, or refused
            cfg, space, sweep = load_sweep(experiment)
            for o in args.overrides:  # sweep.json holds it redacted: the password comes again
                cfg = replace(cfg, tracking_uri=o.split("=", 1)[1]) if o.startswith("tracking_uri=") else cfg
            print(f"resuming {experiment} with the config, search space and sweep settings it started with")
        else:
            if not args.task or not args.data:
                raise ConfigError("--task and --data are required (unless --resume)")
            overrides = [o for o in args.overrides if not o.startswith("sweep.")]
            extra = [f"task={args.task}", f"data={args.data}"] + ([f"init={args.init}"] if args.init else [])
            extra += ["share=true"] if args.share else []
            cfg = load_config(FinetuneConfig, [shipped("configs", "finetune.yaml"), *args.config],
                              [*overrides, *extra])
            space = load_search_space(args.space or shipped("search_spaces", f"{args.task}.yaml"))
            space, pinned = space.pin([o.split("=", 1)[0] for o in overrides])
            if pinned:
                print(f"not searched, set on the command line: {', '.join(pinned)}")
        # ranges, absolute paths, the data set, init against it: now, not inside every trial
        cfg, data = prepare(cfg)
        check_sweep(cfg, space, sweep, data)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, CheckpointError) as e:
        p.exit(2, error_line(p.prog, e))

    from ctal.distributed.console import init_ray

    stage("sweep", f"fine-tuning {cfg.task} on {cfg.data} from {cfg.init or 'a fresh model'}: "
          f"{sweep.search} search, {sweep.scheduler} scheduler, with Ray Tune")
    init_ray()  # joins the cluster named by RAY_ADDRESS, else starts a local one
    try:
        result = run_sweep(cfg, space, sweep, resume=args.resume, data=data, checked=True)
    except (ConfigError, FileNotFoundError, FileExistsError, RuntimeError, UntrustedStateError) as e:
        p.exit(2, error_line(p.prog, e))
    print(describe(result, get_task(cfg.task)))
    return 0 if result.best_checkpoint else 1


if __name__ == "__main__":
    sys.exit(main())
