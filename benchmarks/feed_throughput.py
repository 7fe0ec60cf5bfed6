"""The per-worker pretraining feed alone, against what a GPU eats.

    python benchmarks/feed_throughput.py [--utterances 256] [--batches 32] [--repeats 3]
        [--model-batch 2] [--model-steps 2] [--tokens 45] [--mfu 0.45] [--workdir DIR]
        [--feed-workers 0,1,2] [--process-batches 96]

Writes a Parquet data set of the real schema with LibriSpeech-like lengths (``train_throughput``'s),
then runs, in this process with one torch thread, exactly what a pretraining worker runs per batch:
``PretrainBatches`` (read the worker's row groups, length-bucket) and ``collate`` with the config's
masking (delta, per-utterance normalization, MLM and acoustic span masking, padding), seeded as
``ctal.pretrain`` seeds it. Rates are samples per CPU-second (process CPU time, so the machine's
other load hardly moves them), the median of ``--repeats`` interleaved runs; each stage is timed
alone to say where a sample's time goes. The tiny model's forward + backward + AdamW step on the
same batches (one thread) puts the feed beside the model on this CPU. Then the feed as pretraining
runs it (``ctal.feed.feed``) with its thread and with ``--feed-workers`` processes, wall-clock
samples/s side by side and CPU per sample over all processes; then, from
``ctal.flops.pretraining_flops`` at LibriSpeech-like lengths, the feed cores one GPU needs at
``--mfu`` of its dense bf16 peak, for tiny / base / large, on an H100 and on a g5.12xlarge, at the
CPU cost per sample of the largest feed of processes measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # after PYTHONPATH: another checkout's ctal can be measured with this script
sys.path.append(str(REPO / "benchmarks"))

# Dense bf16 peaks (FLOP/s) and the CPUs beside them, as issue 16 gives them.
MACHINES = {"H100 (one GPU)": (1, 989e12, None), "g5.12xlarge (4 x A10G)": (4, 125e12, 48)}
SIZES = ("tiny", "base", "large")


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{names[0] if names else 'unknown CPU'} ({os.cpu_count()} cores)"


def load() -> str:
    return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def size_config(size: str):
    from ctal.config import PretrainConfig, load_config

    return load_config(PretrainConfig, [REPO / "configs" / "pretrain.yaml", REPO / "configs" / f"{size}.yaml"])


class Feed:
    """One worker's feed, set up as ``ctal.pretrain.pretrain_loop`` sets it up."""

    def __init__(self, data: Path, cfg, batch_size: int):
        from ctal.batching import PretrainBatches
        from ctal.data import feature_frontend, open_dataset

        ds = open_dataset(data)
        self.tok, self.cfg, self.frontend = ds.tokenizer, cfg, feature_frontend(ds.report)
        self.batches = PretrainBatches(data, rank=0, world_size=1, seed=cfg.seed, split=cfg.split,
                                       batch_size=batch_size, max_frames=cfg.max_frames,
                                       pool_rows=cfg.bucket_pool_rows,
                                       halve_above_frames=cfg.halve_batch_above_frames)
        from ctal.pretrain import MakeBatch

        tok, m = self.tok, cfg.model
        self.max_tokens = m.max_position_embeddings - (tok.pad_token_id + 1 if m.text_position_style == "roberta" else 0)
        # what ctal.pretrain's feed calls per batch
        self.make_batch = MakeBatch(cfg, tok, 0, self.max_tokens, ds.report,
                                    dataclasses.replace(m, vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id))

    def collate(self, rows, index: int, masking: bool = True):
        import torch

        from ctal.batching import collate, derive_seed

        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, 0, index, 1))
        tok = self.tok
        return collate(rows, max_frames=self.cfg.max_frames, pad_token_id=tok.pad_token_id,
                       masking=self.cfg.masking if masking else None, mask_token_id=tok.mask_token_id,
                       vocab_size=tok.vocab_size, special_token_ids=list(tok.special_token_ids), generator=g,
                       max_tokens=self.max_tokens, frontend=self.frontend)

    def rows(self, n_batches: int) -> list[list[dict]]:
        out = []
        for rows in self.batches.iter_from(0):
            out.append(rows)
            if len(out) == n_batches:
                return out


def cpu_seconds(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def measure_feed(feed: Feed, n_batches: int, repeats: int) -> dict:
    """Samples per CPU-second of the whole feed and CPU ms per sample of each stage (medians)."""
    from ctal.features import model_frames

    held = feed.rows(n_batches)  # the same rows for the stage timings
    samples = sum(len(b) for b in held)
    runs = {k: [] for k in ("feed", "read", "features", "collate", "masking")}
    for _ in range(repeats):  # interleaved: each stage sees the same load
        runs["feed"].append(cpu_seconds(lambda: [feed.collate(rows, i) for i, rows in
                                                 zip(range(n_batches), feed.batches.iter_from(0))]))
        runs["read"].append(cpu_seconds(lambda: feed.rows(n_batches)))
        runs["features"].append(cpu_seconds(lambda: [model_frames(np.asarray(r["fbank"])[:feed.cfg.max_frames],
                                                                  feed.frontend) for b in held for r in b]))
        plain = cpu_seconds(lambda: [feed.collate(b, i, masking=False) for i, b in enumerate(held)])
        masked = cpu_seconds(lambda: [feed.collate(b, i) for i, b in enumerate(held)])
        runs["collate"].append(plain - runs["features"][-1])
        runs["masking"].append(masked - plain)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"samples": samples, "samples_per_cpu_s": samples / med["feed"],
            "ms_per_sample": {k: 1e3 * v / samples for k, v in med.items()}}


def measure_model_step(feed: Feed, model_batch: int, steps: int) -> dict:
    """Samples per CPU-second of the tiny model's training step (one thread) on the feed's rows."""
    import torch

    from ctal.model import CTALConfig, CTALForPretraining
    from ctal.optim import build_optimizer

    cfg = size_config("tiny")
    model_cfg = dataclasses.replace(cfg.model, vocab_size=feed.tok.vocab_size, pad_token_id=feed.tok.pad_token_id)
    torch.manual_seed(0)
    model = CTALForPretraining(CTALConfig.from_model_config(model_cfg))
    opt = build_optimizer(model, cfg)
    rows = [r for b in feed.rows(4) for r in b]
    times = []
    for s in range(steps + 1):  # the first step warms up allocators and kernels
        batch = feed.collate(rows[s * model_batch:(s + 1) * model_batch], s)
        t = time.process_time()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.process_time() - t)
    return {"samples_per_cpu_s": model_batch / statistics.median(times[1:]), "batch": model_batch,
            "frames": int(batch["frame_mask"].sum()) // model_batch}


def measure_processes(feed: Feed, workers: list[int], n_batches: int, repeats: int) -> dict[int, dict]:
    """``ctal.feed.feed`` as ``pretrain_loop`` runs it, with 0 (a thread) or N feed processes,
    drained as fast as it goes (a trainer that eats instantly): wall-clock samples/s after the first
    batch (start-up, the processes' fork and first pool, apart) and CPU-seconds per sample of the
    trainer process and its feed processes together. Interleaved; medians."""
    import resource

    from ctal.feed import feed as run_feed

    runs = {w: {"rate": [], "startup": [], "cpu_ms": []} for w in workers}
    for _ in range(repeats):
        for w in workers:
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu0, t0 = time.process_time(), time.perf_counter()
            it = run_feed(feed.batches, feed.make_batch, 0, workers=w)
            first = next(it)
            t1, samples = time.perf_counter(), 0
            for _ in range(n_batches):
                samples += len(next(it)["input_ids"])
            t2 = time.perf_counter()
            it.close()  # joins the processes, so their CPU time is counted below
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = time.process_time() - cpu0 + (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
            runs[w]["rate"].append(samples / (t2 - t1))
            runs[w]["startup"].append(t1 - t0)
            runs[w]["cpu_ms"].append(1e3 * cpu / (samples + len(first["input_ids"])))
    return {w: {k: statistics.median(v) for k, v in r.items()} for w, r in runs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--utterances", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="utterances per worker batch (the tiny release's)")
    p.add_argument("--batches", type=int, default=32, help="batches per feed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model-batch", type=int, default=2)
    p.add_argument("--model-steps", type=int, default=2, help="0: skip the model step")
    p.add_argument("--tokens", type=int, default=45, help="LibriSpeech-like tokens per utterance (~34 words)")
    p.add_argument("--mfu", type=float, default=0.45)
    p.add_argument("--feed-workers", default="0,1,2", help="feed processes to compare (0: the thread)")
    p.add_argument("--process-batches", type=int, default=96, help="batches per run of the feed-process comparison")
    p.add_argument("--workdir", default=None, help="keeps the data set (default: a temp dir)")
    args = p.parse_args()

    import torch

    import ctal
    from ctal.flops import pretraining_flops
    from train_throughput import librispeech_like_frames, make_dataset

    torch.set_num_threads(1)  # per CPU core: one worker's feed is one thread
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ctal-feed-"))
    data = work / "data"
    if not (data / "report.json").is_file():
        make_dataset(data, args.utterances)
    print(f"ctal from {Path(ctal.__file__).parent}; {cpu_model()}; {load()}")
    feed = Feed(data, size_config("tiny"), args.batch_size)
    f = measure_feed(feed, args.batches, args.repeats)
    ms = f["ms_per_sample"]
    print(f"\nfeed, one thread, {f['samples']} samples of {np.mean(feed.batches.n_frames):.0f} frames on average, "
          f"batch {args.batch_size}: {f['samples_per_cpu_s']:.0f} samples per CPU-second")
    print("  where a sample's CPU time goes (ms): " + ", ".join(
        f"{k} {ms[k]:.2f}" for k in ("read", "features", "masking", "collate")) +
          f"  (the whole feed {ms['feed']:.2f}; read = Parquet + bucketing, features = delta + normalization)")
    m = measure_model_step(feed, args.model_batch, args.model_steps) if args.model_steps else None
    if m:
        print(f"tiny model step (forward + backward + AdamW), one thread, batch {m['batch']} x {m['frames']} frames: "
              f"{m['samples_per_cpu_s']:.2f} samples per CPU-second; the feed is "
              f"{f['samples_per_cpu_s'] / m['samples_per_cpu_s']:.0f}x faster on this CPU")

    workers = [int(w) for w in args.feed_workers.split(",") if w]
    per_core, basis = f["samples_per_cpu_s"], "one thread"
    if workers:
        r = measure_processes(feed, workers, args.process_batches, args.repeats)
        print(f"\nthe feed as pretraining runs it (ctal.feed.feed), drained as fast as it goes, "
              f"{args.process_batches} batches of {args.batch_size} after the first; {os.cpu_count()} cores here:")
        for w, x in r.items():
            name = "thread (feed_workers=0)" if w == 0 else f"feed_workers={w}"
            print(f"  {name:<24} {x['rate']:7.0f} samples/s  ({x['rate'] / r[workers[0]]['rate']:.2f}x)  "
                  f"{x['cpu_ms']:.2f} CPU-ms per sample, all processes  start-up {x['startup']:.1f} s")
        if max(workers) > 0:  # what a feed of processes costs per sample (their hand-over included)
            per_core, basis = 1e3 / r[max(workers)]["cpu_ms"], f"feed_workers={max(workers)}"

    frames = int(np.mean(np.minimum(librispeech_like_frames(20000, seed=1), 3000)))
    tokens = args.tokens
    # Heads only where the loss looks (15 % of tokens and frames): the fewest FLOPs per sample, the most
    # samples a GPU eats, so the most feed cores it needs.
    mask = size_config("tiny").masking
    print(f"\nfeed cores per GPU at {args.mfu:.0%} of dense bf16 peak, LibriSpeech-like {frames} frames + "
          f"{tokens} tokens per sample, heads on masked positions only; feed {per_core:.0f} "
          f"samples/s per core of this CPU ({basis}):")
    print(f"  {'size':<6}{'GFLOP/sample':>13}" + "".join(f"{name:>44}" for name in MACHINES))
    for size in SIZES:
        flops = pretraining_flops(size_config(size).model, tokens, frames,
                                  mlm_tokens=round(mask.token_mask_prob * tokens),
                                  acoustic_frames=round(mask.frame_mask_prob * frames))
        cells = []
        for gpus, peak, vcpus in MACHINES.values():
            eats = gpus * args.mfu * peak / flops
            cores = eats / per_core
            spare = f", {cores / vcpus:.0%} of {vcpus} vCPUs" if vcpus else ""
            cells.append(f"{eats:7.0f} samples/s -> {cores:5.1f} cores{spare}")
        print(f"  {size:<6}{flops / 1e9:>13.0f}" + "".join(f"{c:>44}" for c in cells))
    print(f"({load()}; a vCPU is a hyperthread: count about half a core each when all are busy, and one per "
          "GPU for its training process)")


if __name__ == "__main__":
    main()
