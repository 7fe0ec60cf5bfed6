"""The whole toolkit on the embedded default, on a laptop: no data, no GPU.

    python pipelines/demo.py [--quick] [--fresh] [--out runs/demo]

1. synthesize with eSpeak NG a LibriSpeech-layout corpus of read speech (for pretraining) and a
   CMU-MOSEI-layout corpus whose label needs both modalities (text polarity, flipped by ironic prosody);
2. preprocess both to Parquet with Ray Data, with one shared BPE tokenizer;
3. pretrain a narrow 3+3 CTAL on the read speech with 2 Ray Train workers;
4. sweep fine-tuning over the seven fusion variants x 2 seeds with Ray Tune (--quick: ctal, text_only,
   audio_only, one seed);
5. evaluate the best checkpoint of each variant on the test split;
6. write <out>/report.md with tables and plots, and print the table.
Finished stages are reused on a rerun unless --fresh. --quick is the small version the tests run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from ctal.checkpoint import record_command
from ctal.config import FinetuneConfig, load_config
from ctal.console import VERBOSE_HELP, error_line, set_verbose, stage as say
from ctal.manifest import recorded_run
from ctal.outputs import own_output
from ctal.shipped import folder, shipped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small version: ctal, text_only, audio_only (about 8 minutes on 2 cores)")
    p.add_argument("--fresh", action="store_true", help="redo every stage (removes --out: only a demo's own)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers for pretraining")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    args = p.parse_args(argv)
    set_verbose(args.verbose)
    record_command()  # for the model cards of the checkpoints this run writes
    from ctal.demo import SIZES, check_size  # torch and friends load after --help

    size = SIZES["quick" if args.quick else "full"]
    out = Path(args.out).resolve()
    try:
        check_size(own_output(out, "demo", fresh=args.fresh), size)  # --fresh removes only a demo's own output
    except (FileExistsError, ValueError) as e:
        p.exit(2, error_line(p.prog, e))
    with recorded_run(out, "demo", {**vars(args), "size": size}):  # each stage's output has its own too
        return stages(args, size, out)


def stages(args, size: dict, out: Path) -> int:
    from ctal.demo import (demo_report, done, evaluate_variants, preprocess_corpora, pretrain_read_speech,
                           restrict_space, stage, synthesize_corpora)

    narrow = shipped("configs", "narrow.yaml")
    t_start = time.time()

    from ctal.distributed.console import init_ray
    from ctal.distributed.preprocess import run_preprocess
    from ctal.distributed.train import pretrain
    from ctal.config import SweepConfig
    from ctal.distributed.tune import run_sweep
    from ctal.data import TaskData
    from ctal.runlog import read_metrics
    from ctal.search_space import parse_search_space

    # 1. corpora: unlabeled read speech to pretrain on (as the paper pretrains on LibriSpeech), and the
    # fusion task
    corpus, pre_corpus = out / "corpus", out / "corpus_pretrain"
    if not stage(out, "corpus"):
        synthesize_corpora(out, size, args.seed, corpus, pre_corpus)

    init_ray(include_dashboard=False)  # local Ray on this machine's cores

    # 2. Parquet, both corpora with one tokenizer (the fine-tuned model keeps the pretrained embeddings)
    data, pre_data = out / "data", out / "data_pretrain"
    if not stage(out, "data"):
        say("data", "log-Mel features and token ids of both corpora to Parquet with Ray Data, one shared BPE")
        preprocess_corpora(out, folder("configs"), {"pretrain": ("librispeech", pre_corpus, pre_data),
                                                   "task": ("mosei", corpus, data)}, run_preprocess)

    # 3. pretraining
    if not (pre := stage(out, "pretrain")):
        say("pretrain", f"narrow 3+3 CTAL, masked language + acoustic modeling, {size['steps']} steps on "
            f"{args.workers} Ray Train workers")
        pre = pretrain_read_speech(out, folder("configs"), size, pre_data, args.workers, args.seed, pretrain)

    # 4. sweep over the fusion variants
    task_data = TaskData.load(data)
    if not (sweep := stage(out, "sweep")):
        t0 = time.time()
        say("sweep", f"fine-tuning the fusion variants {', '.join(size['variants'])} with Ray Tune")
        cfg = load_config(FinetuneConfig, [shipped("configs", "finetune.yaml"), narrow,
                                           shipped("configs", "demo.yaml")],
                          ["task=sentiment", f"data={data}", f"init={pre['checkpoint']}",
                           f"epochs={size['epochs']}", f"seed={args.seed}"])
        space = restrict_space(yaml.safe_load(shipped("search_spaces", "demo.yaml").read_text()), size)
        space = parse_search_space(space, "search_spaces/demo.yaml")
        opts = SweepConfig(search="grid", scheduler="fifo", storage=str(out), name="sweep",
                           max_concurrent=2, cpus_per_trial=1.0, verbose=0)
        result = run_sweep(cfg, space, opts, data=task_data)
        sweep = done(out, "sweep", {
            "checkpoints": {f: str(c) for f, c in result.best_per_fusion().items()},
            "table_md": result.table_md.read_text()}, t0)

    # 5. test metrics of each variant's best checkpoint; 6. the report
    say("evaluate", "each variant's best checkpoint on the test split, then the report")
    rows = evaluate_variants(sweep["checkpoints"], task_data, size["variants"])
    path = demo_report(out, size, rows, workers=args.workers, wall_s=time.time() - t_start,
                       pretrain_metrics=read_metrics(pre["run_dir"]), sweep_table_md=sweep["table_md"])
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
