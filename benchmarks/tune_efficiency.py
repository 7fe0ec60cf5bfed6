"""ASHA vs a full grid: trial-epochs spent and best dev metric reached, same search space.

    python benchmarks/tune_efficiency.py [--data DIR --task T [--fold F]] [--work DIR] [--epochs 9]

Runs the grid of SPACE twice through `ctal.distributed.tune.run_sweep`: with FIFO (every trial runs all
epochs) and with ASHA (rungs at 1, 3, 9 epochs, keeping the best third). Target: ASHA within 1 point of
the grid's best dev metric with <= 35 % of its trial-epochs.

Default data: a synthetic IEMOCAP-layout emotion task written straight to Parquet (PARQUET_SCHEMA):
the class decides which block of 20 mel bins moves together over time (the other bins are independent
noise), which survives per-utterance normalization; the text is random, so `text_only` stays at chance.
2,400 utterances: fold Session1 trains on ~1,700 and selects on one held-out speaker (~240, so dev UA
moves in steps of ~0.4 points); an epoch takes seconds on one CPU. Good configurations reach 100 % dev UA,
so the comparison is about how many trial-epochs each scheduler spends to find one. `--data` runs the same comparison on any preprocessed data set instead (e.g. the eSpeak corpus).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ctal.config import FinetuneConfig, SweepConfig, load_config
from ctal.data import FBANK_DIM, TOKENIZER_DIR, write_dataset
from ctal.distributed.tune import run_sweep
from ctal.search_space import parse_search_space
from ctal.tasks import get_task
from ctal.tokenizer import train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SPACE = {
    "lr": {"choice": [3.0e-4, 1.0e-3, 3.0e-3]},
    "fusion": {"choice": ["ctal", "audio_only", "mean_pool", "text_only"]},
    "orthogonality_weight": {"choice": [0.0, 1.0]},
    "warmup_ratio": 0.0,
    "batch_size": 8,
}
MODEL = ["model.hidden_size=32", "model.num_attention_heads=4", "model.intermediate_size=64",
         "model.num_text_layers=1", "model.num_audio_layers=1", "model.max_audio_positions=200",
         "model.max_position_embeddings=66", "max_frames=80"]


def make_toy_emotion(out: Path, n: int = 2400, seed: int = 0, vocab: int = 64) -> Path:
    """IEMOCAP-layout Parquet data set: 5 sessions x 2 speakers, 4 classes carried by the audio only
    (token ids are random in [5, vocab); the saved BPE only satisfies the data contract)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        session, gender, label = 1 + i % 5, "FM"[(i // 5) % 2], int(rng.integers(4))
        T = int(rng.integers(30, 60))
        fbank = rng.normal(size=(T, FBANK_DIM)).astype(np.float32)
        block = slice(20 * label, 20 * label + 20)
        fbank[:, block] = 0.866 * fbank[:, block] + 0.5 * rng.normal(size=(T, 1))  # shared movement, var 1
        ids = np.concatenate([[0], rng.integers(5, vocab, int(rng.integers(4, 12))), [2]]).astype(np.int32)
        records.append(dict(id=f"Ses{session:02d}{gender}_toy_{gender}{i:05d}", corpus="toy",
                            split=f"Session{session}", speaker=f"Ses{session:02d}_{gender}", text="",
                            input_ids=ids, n_frames=T, fbank=fbank, label=float(label),
                            label_name="neu hap ang sad".split()[label], duration_s=T / 100, sample_rate=16000))
    tok = train_bpe_tokenizer(["toy"], 300, out / TOKENIZER_DIR)
    write_dataset(out, records, tok, corpus="toy", source="benchmarks/tune_efficiency.py", rows_per_shard=n)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="preprocessed data set (default: the synthetic toy emotion task)")
    p.add_argument("--task", default="emotion")
    p.add_argument("--fold", default="Session1", help="emotion fold (one, to keep it quick)")
    p.add_argument("--epochs", type=int, default=9)
    p.add_argument("--work", help="where data and sweeps go (default: a temporary directory)")
    args = p.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="ctal-tune-bench-")).resolve()
    data = Path(args.data) if args.data else make_toy_emotion(work / "toy-emotion")
    task = get_task(args.task)
    fold = [f"fold={args.fold}"] if args.task == "emotion" else []
    cfg = load_config(FinetuneConfig, [ROOT / "configs" / "finetune.yaml"],
                      [*MODEL, f"task={args.task}", f"data={data}", f"epochs={args.epochs}", *fold])
    space = parse_search_space(SPACE, "benchmark space")
    metric = f"dev_{task.metric}"

    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             log_to_driver=False)  # trial logs would bury the comparison
    runs = {}
    for scheduler in ("fifo", "asha"):
        t0 = time.perf_counter()
        r = run_sweep(cfg, space, SweepConfig(search="grid", scheduler=scheduler, storage=str(work / "sweeps"),
                                              name=f"{scheduler}-{int(time.time())}", verbose=0))
        runs[scheduler] = (r, time.perf_counter() - t0)

    fifo_epochs = runs["fifo"][0].table["epochs_run"].sum()
    scale = 100.0 if task.metric in ("ua", "wa", "acc2", "acc7", "f1", "eer") else 1.0  # points
    print(f"\n{args.task} ({'synthetic toy task' if not args.data else data}), {len(runs['fifo'][0].table)} "
          f"grid points x up to {args.epochs} epochs, {os.cpu_count()} CPUs; dev {task.metric} ({task.mode})")
    print(f"{'scheduler':<10}{'trial-epochs':>14}{'share':>8}{'best dev ' + task.metric:>16}{'wall s':>9}")
    for name, (r, wall) in runs.items():
        epochs = r.table["epochs_run"].sum()
        print(f"{name:<10}{epochs:>14}{epochs / fifo_epochs:>8.0%}{r.best[metric] * scale:>16.2f}{wall:>9.0f}")
    gap = (runs["asha"][0].best[metric] - runs["fifo"][0].best[metric]) * scale
    gap = -gap if task.mode == "max" else gap
    share = runs["asha"][0].table["epochs_run"].sum() / fifo_epochs
    ok = gap <= 1.0 and share <= 0.35
    print(f"ASHA: {gap:+.2f} points from the grid's best with {share:.0%} of its trial-epochs "
          f"(target: <= 1 point, <= 35 %): {'met' if ok else 'NOT met'}")
    print(f"sweeps: {work / 'sweeps'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
