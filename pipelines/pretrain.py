"""Pretrain CTAL (MLM + masked acoustic modeling) on a preprocessed Parquet data set with Ray Train.

    python pipelines/pretrain.py --data DIR --num-workers 8 [--config YAML ...] [--size tiny|base|large|narrow]
        [--use-gpu auto|true|false] [--storage DIR] [--name RUN] [--address ADDR] [--share] [key=value ...]

Configs merge in order: configs/pretrain.yaml, configs/<size>.yaml, each --config, the flags above,
then ``key=value`` overrides of PretrainConfig (``lr=1e-4 model.hidden_size=256``). Rerunning with
the same --storage and --name resumes the run. --data and --storage also take URIs (s3://, gs://,
file://), which every node of a cluster reads and writes alike. Bad keys or values, a missing data set
or a mismatched tokenizer fail before Ray starts (exit code 2); more workers than the cluster holds
fail within seconds naming both (exit code 1) unless ``shrink_cpus_per_worker=true``. In a Slurm job
(slurm/ctal.sbatch) num_workers and cpus_per_worker follow the allocation unless given.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from ctal.checkpoint import record_command
from ctal.config import ConfigError, PretrainConfig, load_config, read_yaml
from ctal.console import SHARE_HELP, VERBOSE_HELP, error_line, set_verbose, stage
from ctal.shipped import shipped
from ctal.slurm import worker_defaults

SIZES = ("tiny", "base", "large", "narrow")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True,
                   help="Parquet data set from pipelines/preprocess.py: a directory or a URI (s3://, gs://, file://)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (DDP ranks)")
    p.add_argument("--size", choices=SIZES, default="tiny", help="model size config (default: tiny, 3+3)")
    p.add_argument("--config", action="append", default=[], help="PretrainConfig YAML (repeatable)")
    p.add_argument("--use-gpu", choices=("auto", "true", "false"))
    p.add_argument("--storage", help="storage_path: where runs live; on a cluster a URI every node reaches "
                                     "(s3://bucket/prefix, gs://) or a shared mount")
    p.add_argument("--name", help="run_name: the same name resumes")
    p.add_argument("--address", help="Ray address ('local' = a fresh local cluster; default: RAY_ADDRESS "
                                     "or a running cluster, else a new local one)")
    p.add_argument("--share", action="store_true", help=SHARE_HELP)
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    set_verbose(args.verbose)
    record_command()  # for the model cards of the checkpoints this run writes

    flags = {"data": args.data, "num_workers": args.num_workers, "use_gpu": args.use_gpu,
             "storage_path": args.storage, "run_name": args.name, "share": args.share or None}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    try:
        cfg = load_config(PretrainConfig, [shipped("configs", "pretrain.yaml"),
                                           shipped("configs", f"{args.size}.yaml"), *args.config], overrides)
        given = {k for f in args.config for k in read_yaml(f) or {}} | {o.split("=", 1)[0] for o in overrides}
        sized = worker_defaults(os.environ, cfg.num_workers if "num_workers" in given else None, given)
        if sized:
            cfg = replace(cfg, **sized)
            print(f"Slurm allocation: {', '.join(f'{k}={v:g}' for k, v in sized.items())}")
        from ctal.pretrain import prepare  # a typo need not wait for torch

        plan = prepare(cfg)  # the only check of the run: config, URIs, data set and tokenizer
    except (ConfigError, ValueError, OSError) as e:
        p.exit(2, error_line(p.prog, e))

    from ctal.distributed.train import ResourceError, pretrain

    stage("pretrain", f"CTAL ({args.size}) by masked language + masked acoustic modeling on {cfg.data}, "
          f"{cfg.num_workers} Ray Train workers, {cfg.max_steps} steps → {cfg.storage_path}/{cfg.run_name}")
    try:
        result = pretrain(plan, address=args.address)
    except FileExistsError as e:  # another run holds --name: refused before Ray starts
        p.exit(2, error_line(p.prog, e))
    except ResourceError as e:
        p.exit(1, error_line(p.prog, e))
    print(f"done: step {result.metrics.get('step')}, loss {result.metrics.get('loss', float('nan')):.4f}; "
          f"checkpoint {result.checkpoint} (CTALForPretraining.from_pretrained loads it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
