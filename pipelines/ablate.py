"""A controlled ablation study of CTAL fine-tuning as Ray Tune trials, with honest statistics.

    python pipelines/ablate.py --task T --data D --init CKPT [--config configs/ablate.yaml]
        [--frames LEVEL=DIR[,init=CKPT] ...] [--finetune-config FILE ...] [--out runs/ablate]
        [--cpus-per-trial F] [--max-concurrent N] [--fresh] [key=value ...]
    python pipelines/ablate.py --demo [--quick] [--out runs/ablate-demo] [--fresh]

The study (--config, format in configs/ablate.yaml): seeds, label fractions, the budget, fixed or
tuned hyperparameters, and the questions (pretrained vs scratch across fractions; fusion variants;
orthogonality weight; configs/ablate_frames.yaml: log-mel vs SSL features, where --data/--init are the
baseline's frames level and each --frames another level's data set of the same utterances with the
checkpoint pretrained on its frames) whose cells make the grid. Fine-tuning config:
configs/finetune.yaml, each --finetune-config, the study's budget, then key=value overrides of
FinetuneConfig. Rerunning on the same --out continues the study (finished runs are kept); --fresh
starts over. Writes <out>/report.md, results.csv (every run), subsets.json and the plots. --demo: the
whole study on the synthetic corpora (read speech to pretrain on, the fusion task), reusing the demo's
stages; --quick: a reduced grid.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from ctal.checkpoint import CheckpointError, record_command
from ctal.config import ConfigError, FinetuneConfig, load_config
from ctal.console import VERBOSE_HELP, error_line, set_verbose, stage as say
from ctal.manifest import recorded_run
from ctal.outputs import check_own, own_output
from ctal.shipped import folder
from ctal.tasks import TASKS

CONFIGS = folder("configs")


def demo_inputs(args, out: Path) -> tuple[str, Path, str, list[str], list[str]]:
    """The demo's corpora, Parquet and pretraining (ctal.demo's stages, reused when finished):
    (task, data, init, fine-tuning config files, report lines)."""
    from ctal.demo import SIZES, check_size, preprocess_corpora, pretrain_read_speech, stage, synthesize_corpora
    from ctal.distributed.console import init_ray
    from ctal.distributed.preprocess import run_preprocess
    from ctal.distributed.train import pretrain

    size = SIZES["ablate-quick" if args.quick else "ablate"]
    check_size(out, size)
    corpus, pre_corpus, data, pre_data = (out / n for n in ("corpus", "corpus_pretrain", "data", "data_pretrain"))
    if not stage(out, "corpus"):
        synthesize_corpora(out, size, 0, corpus, pre_corpus)
    init_ray()  # joins the cluster named by RAY_ADDRESS, else starts a local one
    if not stage(out, "data"):
        say("data", "both corpora to Parquet with Ray Data, one shared BPE")
        preprocess_corpora(out, CONFIGS, {"pretrain": ("librispeech", pre_corpus, pre_data),
                                          "task": ("mosei", corpus, data)}, run_preprocess)
    if not (pre := stage(out, "pretrain")):
        say("pretrain", f"narrow 3+3 CTAL on the read speech, {size['steps']} steps")
        pre = pretrain_read_speech(out, CONFIGS, size, pre_data, 2, 0, pretrain)
    header = [f"Synthetic corpora (eSpeak NG): {size['pretrain_utterances']} read-speech utterances pretrain a "
              f"narrow 3+3 CTAL for {size['steps']} steps; the task is the demo's fusion task (label = text "
              f"polarity, flipped by ironic prosody) on {size['utterances']} utterances."]
    files = [CONFIGS / "finetune.yaml", CONFIGS / "narrow.yaml", CONFIGS / "demo.yaml"]
    return "sentiment", data, pre["checkpoint"], files, header


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASKS))
    p.add_argument("--data", help="Parquet data set of the task (pipelines/preprocess.py)")
    p.add_argument("--init", help="pretraining checkpoint or run directory (the 'pretrained' level)")
    p.add_argument("--frames", action="append", default=[], metavar="LEVEL=DIR[,init=CKPT]",
                   help="another frames level's data set and pretraining checkpoint (repeatable)")
    p.add_argument("--config", help="the study YAML (default configs/ablate.yaml; --demo: configs/ablate_demo*.yaml)")
    p.add_argument("--finetune-config", action="append", default=[], help="FinetuneConfig YAML (repeatable)")
    p.add_argument("--out", help="the study's directory (default runs/ablate, --demo runs/ablate-demo)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--max-concurrent", type=int, help="default: as many as the CPUs allow")
    p.add_argument("--demo", action="store_true", help="the study on the synthetic corpora (about 30 min)")
    p.add_argument("--quick", action="store_true", help="with --demo: the reduced grid (about 5 min)")
    p.add_argument("--fresh", action="store_true", help="start over: remove --out first (only a ctal ablation's)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="FinetuneConfig")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    args = p.parse_args(argv)
    set_verbose(args.verbose)
    record_command()
    from ctal.ablation import cell_budget, load_study, report_metric, score_on_test, write_report
    from ctal.ablation_inputs import parse_frames, thin_subsets, write_subsets
    from ctal.data import TaskData

    t0 = time.time()
    out = Path(args.out or ("runs/ablate-demo" if args.demo else "runs/ablate")).resolve()
    default = "ablate_demo_quick.yaml" if args.demo and args.quick else "ablate_demo.yaml" if args.demo else "ablate.yaml"
    try:
        study = load_study(args.config or CONFIGS / default)
        if not (args.demo or (args.task and args.data)):
            raise ConfigError("--task and --data are required (or --demo)")
        check_own(out, ("ablation",))  # a foreign --out is never written into or removed (--fresh)
        if args.demo:  # the demo's stages write into --out: it is ours from here
            task, data, init, files, header = demo_inputs(args, own_output(out, "ablation", fresh=args.fresh))
        else:
            task, data, init, files, header = args.task, args.data, args.init, [CONFIGS / "finetune.yaml"], []
        files += args.finetune_config
        budget = [f"{k}={v}" for k, v in study.budget.items()]
        base = load_config(FinetuneConfig, files, [*budget, *args.overrides, f"task={task}", f"data={data}"])
        metric = report_metric(study, task)
        task_data = TaskData.load(base.data)
        from ctal.distributed.ablate import check_grid, prepare_study

        frames = parse_frames(args.frames)
        configs, space, datas = prepare_study(base, study, init, task_data, frames)
        if not args.demo:
            own_output(out, "ablation", fresh=args.fresh)  # every argument checked: now --fresh may remove
        check_grid(out)  # a study to continue is trusted, and a new one finds no state, before Ray starts
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, CheckpointError) as e:
        p.exit(2, error_line(p.prog, e))
    for line in thin_subsets(write_subsets(out / "subsets.json", TASKS[task], task_data.meta, study, base)):
        say("warning", f"{line}: too few to learn from; use larger fractions or more data")

    from ctal.distributed.ablate import run_study
    from ctal.distributed.console import init_ray

    runs_per_cell = len(study.seeds) * (study.tuning.get("num_samples", 1) if study.tuning else 1)
    say("ablate", f"{len(configs)} cells x {runs_per_cell} runs of {task} with Ray Tune (the grid in {out / 'grid'})")
    init_ray()  # joins the cluster named by RAY_ADDRESS, else starts a local one
    with recorded_run(out, "ablation", {"config": base, "study": vars(args)}):  # out/manifest.json
        runs = run_study(configs, study, space, datas, out, cpus_per_trial=args.cpus_per_trial,
                         max_concurrent=args.max_concurrent)
        say("evaluate", "each (cell, seed)'s best-on-dev checkpoint on the test split, once")
        runs = score_on_test(runs, datas, task)
    command = "python pipelines/ablate.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    header = [f"`{command}`", "", *header, f"Data: {base.data}; pretrained level: {init or '(none given)'}"
              + "".join(f"; frames {k}: data {f.data}, pretrained level {f.init or '(none given)'}" for k, f in
                        frames.items()) + ".",
              f"Fine-tuning config: lr {base.lr:g}, batch {base.batch_size}, warmup {base.warmup_ratio:g}, "
              f"weight decay {base.weight_decay:g}, dropout {base.model.hidden_dropout_prob:g}, epochs {base.epochs}.",
              f"Wall time: {time.time() - t0:.0f} s (this invocation)."]
    path = write_report(out, study, runs, metric, task=task, header=header,
                        budget=cell_budget(study.budget, args.overrides, base))
    print(path.read_text().split("## Every run")[0])
    print(f"report: {path}")
    failed = int((runs["status"] == "error").sum())
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
