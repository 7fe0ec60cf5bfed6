"""Pretraining throughput: plain PyTorch vs Ray Train, padding with vs without bucketing, GPU MFU.

    python benchmarks/train_throughput.py [--workers 2] [--steps 60] [--size narrow] [--utterances 512]
    python benchmarks/train_throughput.py --gpu [--sizes tiny,base,large] [--batch-size 8] [--compile both]
    python benchmarks/train_throughput.py --memory --frames 3000 --batch-size 4

Default mode: one synthetic Parquet data set with LibriSpeech-like lengths, the same config through
``ctal.pretrain.launch_local`` (N processes, torch.distributed) and through ``ctal.distributed.train``
(Ray Train, N workers), printing steady-state samples/s of each and their ratio (target: Ray at
most 1.05x slower), then padding efficiency of random vs length-bucketed batches (target >= 92 %).
``--gpu``: samples/s, tokens+frames/s and MFU of the paper sizes in bf16 on one GPU, with and without
compiled layers, without Ray; refuses (exit 2) without CUDA; ``--gpu --device cpu`` runs the same code on
the CPU (no MFU: there is no GPU peak to divide by). ``--memory``: peak memory of a large step with
and without ``gradient_checkpointing`` (memory_report says how it is measured).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def librispeech_like_frames(n: int, seed: int = 0) -> np.ndarray:
    """Utterance lengths in 10 ms frames: log-normal around 12 s, clipped to 1-35 s (LibriSpeech's
    train sets: mean ~12.3 s, most 10-17 s, none above 35 s)."""
    seconds = np.random.default_rng(seed).lognormal(np.log(12.0), 0.35, n).clip(1.0, 35.0)
    return (seconds * 100).astype(np.int64)


def make_dataset(out: Path, n: int, seed: int = 0, rows_per_group: int = 32) -> Path:
    """A Parquet data set of the real schema (random fbank, random BPE-range ids) + tokenizer + report."""
    from ctal.data import write_dataset
    from ctal.tokenizer import train_bpe_tokenizer

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    words = "the of and to a in that is was he for it with as his on be at by had not".split()
    texts = [" ".join(rng.choice(words, int(rng.integers(5, 40)))) for _ in range(n)]
    tok = train_bpe_tokenizer(texts, 2000, out / "tokenizer")
    frames = librispeech_like_frames(n, seed)
    recs = [{"id": f"u{i}", "corpus": "bench", "split": "train", "speaker": "s", "text": texts[i],
             "input_ids": np.asarray(tok(texts[i])["input_ids"], np.int32), "n_frames": int(frames[i]),
             "fbank": rng.normal(size=(frames[i], 80)).astype(np.float32), "label": None,
             "label_name": None, "duration_s": frames[i] / 100, "sample_rate": 16000} for i in range(n)]
    write_dataset(out, recs, tok, corpus="bench", source="benchmarks/train_throughput.py", rows_per_shard=n,
                  row_group_size=rows_per_group)
    return out


def steady_samples_per_s(run_dir: Path, skip_windows: int = 1) -> float:
    """Samples/s over all logged windows but the first (warm-up); windows hold equal sample counts
    (batching by count), so the overall rate is their harmonic mean."""
    from ctal.runlog import read_metrics

    rates = [m["samples_per_s"] for _, m in sorted(read_metrics(run_dir).items())][skip_windows:]
    return statistics.harmonic_mean(rates)


def compare_plain_and_ray(args) -> None:
    import ray

    from ctal.config import PretrainConfig, load_config
    from ctal.distributed.train import pretrain
    from ctal.pretrain import launch_local

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ctal-bench-"))
    data = work / "data"
    if not (data / "report.json").is_file():
        t = time.perf_counter()
        make_dataset(data, args.utterances)
        print(f"data set: {args.utterances} utterances in {time.perf_counter() - t:.1f} s → {data}")
    shutil.rmtree(work / "runs", ignore_errors=True)  # same run names would resume, not measure
    cpus = os.cpu_count() or 1
    overrides = [f"data={data}", f"max_steps={args.steps}", f"log_every={args.log_every}",
                 f"checkpoint_every={args.steps}", f"batch_size={args.batch_size}", f"max_frames={args.max_frames}",
                 f"num_workers={args.workers}", f"cpus_per_worker={max(1, cpus // args.workers)}",
                 f"storage_path={work / 'runs'}", "keep_checkpoints=1", "bucket_pool_rows=256"]
    cfg = load_config(PretrainConfig, [REPO / "configs/pretrain.yaml", REPO / f"configs/{args.size}.yaml"],
                      overrides)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    results = {"plain": [], "ray": []}
    walls = {"plain": [], "ray": []}
    for r in range(args.repeats):
        for kind in ("plain", "ray"):  # interleaved, so drifting machine load hits both alike
            name = f"{kind}-{r}"
            t = time.perf_counter()
            if kind == "plain":
                launch_local(cfg, work / "runs" / name, args.workers)
            else:
                pretrain(replace(cfg, run_name=name), log=lambda _: None)
            walls[kind].append(time.perf_counter() - t)
            results[kind].append(steady_samples_per_s(work / "runs" / name))
            print(f"  {name}: {results[kind][-1]:.2f} samples/s steady, {walls[kind][-1]:.1f} s wall incl. start-up")
    ray.shutdown()
    plain, ray_sps = statistics.median(results["plain"]), statistics.median(results["ray"])
    print(f"\nthroughput, {args.size} model, {args.workers} workers x {cfg.cpus_per_worker:g} CPUs, "
          f"batch {args.batch_size}/worker, max_frames {args.max_frames}, {args.steps} steps, CPU:")
    print(f"  plain PyTorch (torch.distributed): {plain:8.2f} samples/s")
    print(f"  Ray Train:                         {ray_sps:8.2f} samples/s")
    print(f"  Ray slowdown: {plain / ray_sps:.3f}x (target <= 1.05x)   "
          f"start-up + run wall: plain {statistics.median(walls['plain']):.1f} s, "
          f"Ray {statistics.median(walls['ray']):.1f} s")


def padding_report(args) -> None:
    from ctal.batching import PretrainBatches, bucket_batches, padding_efficiency

    n = np.minimum(librispeech_like_frames(args.padding_utterances, seed=1), 3000)  # cropped as in training
    B = args.batch_size
    perm = np.random.default_rng(0).permutation(len(n))
    random_batches = [perm[i:i + B] for i in range(0, len(n), B)]
    print(f"\npadding efficiency (real / padded frames), {len(n)} LibriSpeech-like utterances "
          f"(≤ 3000 frames), batch {B}:")
    row = lambda label, value, note="": print(f"  {label:<62s}{value:6.1%}{note}")
    row("random batches (a shuffled DataLoader)", padding_efficiency(random_batches, n))
    row("bucket_batches over the whole set", padding_efficiency(bucket_batches(n, batch_size=B, seed=0, epoch=0), n))
    budget = B * 1200
    row(f"bucket_batches by frame budget {budget}",
        padding_efficiency(bucket_batches(n, max_frames_per_batch=budget, seed=0, epoch=0), n))
    # The training feed buckets within pools of random row groups: the same, chunk by chunk.
    for pool in (64, 256, 1024):
        chunks = [perm[i:i + pool] for i in range(0, len(n), pool)]
        batches = [c[b] for c in chunks for b in bucket_batches(n[c], batch_size=B, seed=0, epoch=0)]
        row(f"bucketing within pools of {pool} rows", padding_efficiency(batches, n),
            "  (bucket_pool_rows default)" if pool == 1024 else "")
    data = Path(args.workdir) / "data"
    feed = PretrainBatches(data, rank=0, world_size=args.workers, seed=0, batch_size=B, max_frames=3000)
    row(f"the training feed on the benchmark data (rank 0, {feed.n_rows} rows)", feed.padding_efficiency(0),
        "  (target >= 92 %)")

# --------------------------------------------------------------------------------------------------
# --gpu: samples/s and MFU without Ray


def measure_size(size: str, *, device, batch_size: int, frames: int, tokens: int, steps: int, warmup: int,
                 compile_model: bool) -> dict:
    """One pretraining step as the loop takes it (heads where the loss looks, fused AdamW, bf16
    autocast, compiled layers on bucketed shapes when asked), timed over ``steps`` after ``warmup``."""
    import torch

    from benchmarks.step_vs_reference import fixed_batch
    from ctal.config import PretrainConfig
    from ctal.flops import pretraining_flops
    from ctal.model import CTALConfig, CTALForPretraining
    from ctal.optim import build_optimizer
    from ctal.pretrain import pad_to_buckets, training_autocast

    model_cfg = load_model_config(size)
    torch.manual_seed(0)
    model = CTALForPretraining(CTALConfig.from_model_config(model_cfg)).to(device)
    opt = build_optimizer(model, PretrainConfig())
    cpu_batch = fixed_batch(model.config, [frames] * batch_size, [tokens] * batch_size)
    # FLOPs of the real positions, the heads counted where they run (the scored positions)
    flops = sum(pretraining_flops(model_cfg, tokens, frames, mlm_tokens=int((labels != -100).sum()),
                                  acoustic_frames=int(scored.sum()), last_layer_frames=int(scored.sum()))
                for labels, scored in zip(cpu_batch["mlm_labels"], cpu_batch["acoustic_mask"]))
    if compile_model:
        model.compile_layers()
        cpu_batch = pad_to_buckets(cpu_batch, model.config)
    batch = {k: v.to(device) for k, v in cpu_batch.items()}
    autocast = training_autocast(device, True)

    def step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t) / steps
    out = {"size": size, "params_M": model.count_parameters() / 1e6, "samples_per_s": batch_size / dt,
           "positions_per_s": batch_size * (frames + tokens) / dt, "step_ms": dt * 1e3, "flops_per_s": flops / dt,
           "flops_per_sample": flops / batch_size}
    if device.type == "cuda":
        out["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def gpu_report(args) -> int:
    import torch

    from ctal.flops import peak_flops

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--gpu needs a CUDA device and torch sees none here; --gpu --device cpu runs the same code on "
              "the CPU (no MFU)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if on_gpu else cpu_name()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_flops(name) if on_gpu else None)
    why_no_mfu = ("no GPU: MFU is against a GPU's peak" if not on_gpu
                  else f"no dense bf16 peak listed for {name!r}: pass --peak-tflops")
    print(f"{name}: batch {args.batch_size} x {args.frames} frames x {args.tokens} tokens, bf16 autocast, "
          f"peak {f'{peak / 1e12:g} TFLOP/s' if peak else 'unknown'}; FLOPs from ctal.flops.pretraining_flops "
          "(matmuls, forward + backward, heads and last audio layer on the scored positions)")
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for size in args.sizes.split(","):
        for compiled in modes:
            r = measure_size(size, device=device, batch_size=args.batch_size, frames=args.frames,
                             tokens=args.tokens, steps=args.gpu_steps, warmup=args.gpu_warmup, compile_model=compiled)
            mfu = f"MFU {r['flops_per_s'] / peak:.1%}" if peak else f"MFU n/a ({why_no_mfu})"
            mem = f", peak mem {r['peak_mem_GiB']:.1f} GiB" if "peak_mem_GiB" in r else ""
            print(f"  {size:>6s} ({r['params_M']:6.1f} M){' compiled' if compiled else '         '}: "
                  f"{r['samples_per_s']:8.1f} samples/s, {r['positions_per_s']:10.0f} tokens+frames/s, "
                  f"{r['step_ms']:8.1f} ms/step, {r['flops_per_sample'] / 1e12:.2f} TFLOP/sample, "
                  f"{r['flops_per_s'] / 1e12:6.1f} TFLOP/s, {mfu}{mem}")
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    return 0


# --------------------------------------------------------------------------------------------------
# --memory: peak memory of one large step on long audio, with and without gradient_checkpointing


def memory_child(layers: int, checkpointed: bool, frames: int, batch_size: int, tokens: int) -> dict:
    """Peak tensor memory of one fp32 training step (forward, backward, clip, AdamW with its moments
    already allocated, as in every step but the first) of the large config with ``layers`` text and
    audio layers, traced under FakeTensorMode by torch's MemTracker: every tensor the eager step
    allocates is counted, nothing is computed. The heads run on every position here (the scored-
    position path needs real values to select them): slightly more than a training step needs."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from ctal.config import PretrainConfig
    from ctal.model import CTALConfig, CTALForPretraining
    from ctal.optim import build_optimizer

    cfg = load_model_config("large", num_text_layers=layers, num_audio_layers=layers)
    with FakeTensorMode():
        model = CTALForPretraining(CTALConfig.from_model_config(cfg))
        if checkpointed:
            model.gradient_checkpointing_enable()
        opt = build_optimizer(model, PretrainConfig())
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()  # allocates AdamW's moments
        opt.zero_grad(set_to_none=True)
        B, T, L = batch_size, frames, tokens
        ones = lambda n: torch.ones(B, n, dtype=torch.long)
        ids, frame_input = torch.randint(5, cfg.vocab_size, (B, L)), torch.randn(B, T, cfg.audio_dim)
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            out = model(ids, ones(L), frame_input, ones(T).bool())
            (out.mlm_logits.float().mean() + out.reconstructed_frames.mean()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        peak = tracker.get_tracker_snapshot("peak")
    return {"peak": sum(v["Total"] for v in peak.values())}


def load_model_config(size: str, **overrides):
    import yaml

    from ctal.config import ModelConfig, from_dict

    return from_dict(ModelConfig, {**yaml.safe_load((REPO / f"configs/{size}.yaml").read_text())["model"],
                                   **overrides})


def memory_report(args) -> int:
    """Peak memory of a large step with and without gradient_checkpointing, each setting traced in a
    fresh subprocess (memory_child says how: FakeTensorMode + MemTracker, since a real 12+12 x 4 x 3000
    step takes many CPU minutes and, without checkpointing, more memory than a small shared box has)."""
    import json
    import subprocess

    n = load_model_config("large").num_audio_layers
    print(f"peak tensor memory of one fp32 step of large ({n}+{n}), batch {args.batch_size} x {args.frames} "
          f"frames x {args.tokens} tokens (FakeTensorMode + torch MemTracker, a subprocess per setting):")
    peaks = {}
    for checkpointed in (False, True):
        cmd = [sys.executable, __file__, "--memory-child", f"{n},{int(checkpointed)}", "--frames", str(args.frames),
               "--batch-size", str(args.batch_size), "--tokens", str(args.tokens)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        peaks[checkpointed] = json.loads(out)["peak"]
        print(f"  gradient_checkpointing={str(checkpointed).lower():5s}: {peaks[checkpointed] / 2**30:6.1f} GiB")
    print(f"  checkpointing needs {peaks[True] / peaks[False]:.2f}x the memory")
    return 0


def cpu_name() -> str:
    from benchmarks.step_vs_reference import cpu_model

    return f"{cpu_model()} ({os.cpu_count()} cores)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1, help="plain/Ray pairs, interleaved; medians are reported")
    p.add_argument("--size", default="narrow", help="model config for the plain-vs-Ray comparison")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-frames", type=int, default=800, help="crop for the CPU comparison (paper: 3000)")
    p.add_argument("--utterances", type=int, default=512)
    p.add_argument("--padding-utterances", type=int, default=20000)
    p.add_argument("--workdir", help="keep the data set and runs here (default: a temporary directory)")
    p.add_argument("--gpu", action="store_true", help="measure tiny/base/large in bf16 on one GPU, no Ray")
    p.add_argument("--device", default="cuda", help="with --gpu: cpu runs the same code as a smoke test")
    p.add_argument("--sizes", default="tiny,base,large")
    p.add_argument("--frames", type=int, default=1200, help="with --gpu: frames per utterance (12 s)")
    p.add_argument("--tokens", type=int, default=48, help="with --gpu: tokens per utterance")
    p.add_argument("--gpu-steps", type=int, default=20)
    p.add_argument("--gpu-warmup", type=int, default=5)
    p.add_argument("--compile", choices=("off", "on", "both"), default="both",
                   help="with --gpu: measure eager, compiled layers (compile=true), or both")
    p.add_argument("--peak-tflops", type=float, help="with --gpu: the card's dense bf16 peak, if not listed")
    p.add_argument("--memory", action="store_true",
                   help="peak memory of a large step with and without gradient_checkpointing (CPU)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)  # "LAYERS,CHECKPOINTED": one measurement
    args = p.parse_args(argv)
    if args.memory_child:
        import json
        layers, checkpointed = map(int, args.memory_child.split(","))
        print(json.dumps(memory_child(layers, bool(checkpointed), args.frames, args.batch_size, args.tokens)))
        return 0
    if args.memory:
        return memory_report(args)
    if args.gpu:
        return gpu_report(args)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="ctal-bench-")
    compare_plain_and_ray(args)
    padding_report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
