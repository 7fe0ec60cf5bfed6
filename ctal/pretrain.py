"""CTAL pretraining loop in plain PyTorch: one function per worker, callable with or without Ray.

``prepare(cfg)`` (``ctal.pretrain_plan``) checks a run once (config value ranges, URIs, the data set
and its tokenizer) and returns the ``PretrainPlan`` that ``pretrain_loop`` runs; Ray Train's workers get the plan the
driver checked (``ctal.distributed.train``), ``launch_local`` runs it in processes of its own, and a
direct call with a plain config prepares it first. The loop is exactly resumable: the data position
is a function of the step, dropout is reseeded every step from (seed, rank, step) and the masks from
(seed, rank, batch index), so a checkpoint holds only model, optimizer, scheduler and step, and
a resumed run logs the same losses as an uninterrupted one (bitwise on CPU).

Run directory layout::

    <run_dir>/checkpoints/step-00000100/   a ctal.checkpoint checkpoint: config.json, model.safetensors
                                           (from_pretrained-loadable), optimizer.safetensors,
                                           tokenizer/, checkpoint.json (last)
    <run_dir>/tensorboard/                 per-step scalars (rank 0)
    <run_dir>/metrics.jsonl                the same, one JSON line per logged step (rank 0)

``run_dir`` may be a URI (``s3://``, ``gs://``, ``file://``; ctal.storage): checkpoints are written
there by the same store as locally, while rank 0 keeps metrics.jsonl and tensorboard/ in a local
staging directory and uploads them after every checkpoint (object stores cannot append); a resume
on any node downloads the newest intact checkpoint. ``cfg.data`` may be a URI too (shards are read
through pyarrow's filesystem, the tokenizer is cached locally).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import checkpoint, manifest, rendezvous, storage
from . import checkpoint_data
from .batching import PretrainBatches, collate, derive_seed
from .checkpoint import CHECKPOINTS, CheckpointStore, Part
from .config import PretrainConfig, to_dict
from .data import TOKENIZER_DIR, TokenizerInfo, audio_format, feature_frontend
from .feed import FeedError, feed
from .flops import batch_flops, peak_flops
from .masking import spans_at
from .model import CTALConfig, CTALForPretraining
from .optim import build_optimizer, build_scheduler
from .pretrain_plan import PretrainPlan, check_resumable, prepare, worker_batch_size
from .runlog import RunLog, step_line


# --------------------------------------------------------------------------------------------------
# the loop


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Default ``prepare_model`` without Ray: DDP when a process group is up."""
    model = model.to(device)
    if _is_distributed() and dist.get_world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def training_autocast(device: torch.device, bf16: bool):
    """The step's precision: bf16 autocast on ``device`` (matmuls in bf16; the model casts its
    losses to fp32), or fp32 with no context. The loop asks for bf16 on GPUs only."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# Compiled layers see padded lengths in steps of these, so a run compiles a few shapes, not one per batch.
FRAME_BUCKET, TOKEN_BUCKET = 64, 8


def pad_to_buckets(batch: dict, model_cfg) -> dict:
    """``batch`` (collate's keys) padded to the next multiple of FRAME_BUCKET frames and TOKEN_BUCKET
    tokens (capped at the model's positions); padding is masked and never scored, so the losses stay."""
    def grow(n, step, cap):
        return min(-(-n // step) * step, max(n, cap))

    L, T = batch["input_ids"].shape[1], batch["frames"].shape[1]
    dl = grow(L, TOKEN_BUCKET, model_cfg.max_position_embeddings) - L
    dt = grow(T, FRAME_BUCKET, model_cfg.max_audio_positions) - T
    pad = {"input_ids": (dl, model_cfg.pad_token_id), "attention_mask": (dl, 0), "mlm_labels": (dl, -100),
           "frames": (dt, 0.0), "frame_mask": (dt, False), "acoustic_mask": (dt, False), "target_frames": (dt, 0.0)}
    out = dict(batch)
    for key, (n, value) in pad.items():
        if key in out and n:
            x = out[key]
            widths = (0, 0, 0, n) if x.ndim == 3 else (0, n)  # frames: (B, T, 160); masks and ids: (B, T)
            out[key] = torch.nn.functional.pad(x, widths, value=value)
    return out


def _resume_point(store: CheckpointStore, rank: int, device: torch.device, log) -> Optional[tuple[int, Path]]:
    """(step, local copy) of the checkpoint to resume from, or None for a fresh run: rank 0 chooses
    (verifying it), every rank gets the same answer and its own local copy (for a URI, in this
    node's cache). When every checkpoint is damaged all ranks raise CheckpointError (check_resumable)."""
    chosen, refused = None, None
    if rank == 0:
        chosen = store.choose(log)
        try:
            if chosen is None:
                check_resumable(store)
        except checkpoint.CheckpointError as e:  # raised on every rank, below
            refused = e
    if _is_distributed():
        # NCCL broadcasts only CUDA tensors, gloo only CPU ones; -2: rank 0 refuses to resume.
        where = device if dist.get_backend() == "nccl" else "cpu"
        step = torch.tensor([-2 if refused else -1 if chosen is None else chosen[0]], device=where)
        dist.broadcast(step, src=0)
        if int(step) == -2 and refused is None:
            refused = checkpoint.CheckpointError(f"every checkpoint in {store.root} is damaged (rank 0 says more)")
        if rank != 0 and int(step) >= 0:
            chosen = int(step), checkpoint.local_copy(store.path(int(step)))
    if refused is not None:
        raise refused
    return chosen


def _local_tokenizer(tok: TokenizerInfo, data: str) -> Path:
    """The data set's tokenizer on this node: the copy ``prepare`` checked, or (a worker on another
    node than the driver) one fetched from the data set; ``checkpoint.write`` checks its hash."""
    return tok.dir if tok.dir.is_dir() else storage.localize(storage.join(data, TOKENIZER_DIR), kind="tokenizers")


class MakeBatch:
    """Rows + global batch index → one training batch, masks seeded from (seed, rank, index): the
    same batch whichever thread or process of the feed builds it."""

    def __init__(self, cfg: PretrainConfig, tok: TokenizerInfo, rank: int, max_tokens: int, report: dict,
                 model_cfg):
        self.cfg, self.rank, self.max_tokens, self.model_cfg = cfg, rank, max_tokens, model_cfg
        self.frontend = feature_frontend(report)  # the frames' load-time rule (data set's report.json)
        self.masking = spans_at(cfg.masking, audio_format(report).frame_shift_ms)  # spans keep their duration
        self.ids = {"pad_token_id": tok.pad_token_id, "mask_token_id": tok.mask_token_id,
                    "vocab_size": tok.vocab_size, "special_token_ids": list(tok.special_token_ids)}

    def __call__(self, rows: list[dict], index: int) -> dict:
        cfg = self.cfg
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, self.rank, index, 1))
        b = collate(rows, max_frames=cfg.max_frames, masking=self.masking, generator=g, max_tokens=self.max_tokens,
                    frontend=self.frontend, **self.ids)
        b["n_real"], b["n_padded"] = int(b["frame_mask"].sum()), b["frame_mask"].numel()
        if cfg.compile:  # after counting: the efficiency reported is the feed's, not the buckets'
            b = pad_to_buckets(b, self.model_cfg)
        return b


def pretrain_loop(plan: PretrainPlan | PretrainConfig, *, run_dir: str | Path, rank: int = 0, world_size: int = 1,
                  device: Optional[torch.device] = None,
                  prepare_model: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None,
                  report: Optional[Callable[[dict, Optional[str]], None]] = None,
                  log: Callable[[str], None] = print, alert: Optional[Callable[[str], None]] = None) -> dict:
    """Pretrain CTAL on this worker's share of the data until ``cfg.max_steps``.

    ``plan``: from ``prepare(cfg)``; a plain PretrainConfig is prepared (checked) here first.
    Resumes from the newest intact checkpoint in ``run_dir/checkpoints`` (one damaged beyond repair
    is moved aside with a warning); ``run_dir`` and ``cfg.data`` may be URIs (module docstring).
    ``prepare_model`` wraps the model for data parallelism (Ray's ``prepare_model``; default: DDP
    when torch.distributed is initialized). ``report(metrics, checkpoint_path)`` is called on every
    rank after each checkpoint (path on rank 0, else None). ``log`` takes this rank's lines (a
    driver may show rank 0's only); ``alert`` (default ``log``) the ones every rank must get onto the
    console: why it stops. Returns the last logged metrics and the final checkpoint path.
    """
    plan = plan if isinstance(plan, PretrainPlan) else prepare(plan)
    cfg, tok = plan.cfg, plan.tokenizer
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    store = CheckpointStore(storage.join(run_dir, CHECKPOINTS), keep=cfg.keep_checkpoints)
    fmt = audio_format(plan.report)  # the frames: the model's audio input, the masks' span lengths
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id,
                                    **fmt.model_dims())

    resume = _resume_point(store, rank, device, log)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every fresh run
    if resume is None:
        model = CTALForPretraining(CTALConfig.from_model_config(model_cfg))
        step = 0
    else:
        checkpoint_data.check_tokenizer(resume[1], tok.hash)
        model = CTALForPretraining.from_pretrained(resume[1], **vars(model_cfg))
    raw = model.to(device)  # before the optimizer, so its restored state lands on the device too
    optimizer = build_optimizer(raw, cfg)
    scheduler = build_scheduler(optimizer, cfg.warmup_ratio, cfg.max_steps)
    if resume is not None:
        checkpoint.load_training_state(resume[1], optimizer, scheduler)
        state = checkpoint.read_state(resume[1])
        step = state["step"]
        if state.get("world_size") != world_size:
            log(f"note: resuming a run of {state.get('world_size')} workers with {world_size}: "
                "the data order differs from an uninterrupted run")
        if rank == 0:
            log(f"resumed from {store.path(step)} (step {step})")
        if step >= cfg.max_steps:
            return {"metrics": state.get("metrics", {}), "checkpoint": str(store.path(step)) if rank == 0 else None,
                    "step": step}
    if cfg.gradient_checkpointing:
        raw.gradient_checkpointing_enable()
    if cfg.compile:
        raw.compile_layers()
    model = (prepare_model or (lambda m: _ddp(m, device)))(raw)

    data = PretrainBatches(cfg.data, rank=rank, world_size=world_size, seed=cfg.seed, split=cfg.split,
                           batch_size=worker_batch_size(cfg, world_size) or 1,
                           max_frames_per_batch=cfg.max_frames_per_batch, max_frames=cfg.max_frames,
                           pool_rows=cfg.bucket_pool_rows, halve_above_frames=cfg.halve_batch_above_frames,
                           drop_longer=cfg.long_utterances == "drop")
    frames = checkpoint_data.frames_entry(plan.report)  # the frames' front end (and upstream); checkpoints record it
    data_config = checkpoint_data.data_config_entry(plan.report)  # and how the data was made
    max_tokens = model_cfg.max_position_embeddings - (model_cfg.pad_token_id + 1
                                                      if model_cfg.text_position_style == "roberta" else 0)

    make_batch = MakeBatch(cfg, tok, rank, max_tokens, plan.report, model_cfg)
    runlog = None
    if rank == 0:
        n_params = raw.count_parameters()
        per = worker_batch_size(cfg, world_size)
        batch = (f"{cfg.batch_size} utterances per step ({per} per worker micro-step)" if per
                 else f"up to {cfg.max_frames_per_batch} frames per worker micro-step")
        dropped = f", {data.n_dropped} over max_frames dropped" if data.n_dropped else ""
        feeders = f"; batches built by {cfg.feed_workers} feed processes per worker" if cfg.feed_workers else ""
        if cfg.feed_workers > (os.cpu_count() or 1):
            log(f"warning: feed_workers={cfg.feed_workers} is more than this machine's {os.cpu_count()} cores: the feed "
                "processes only compete with training for them; use at most cpus_per_worker - 1")
        log(f"pretraining {n_params / 1e6:.2f} M parameters on {world_size} worker(s), {device.type}; {batch}; "
            f"{data.batches_per_epoch} batches per epoch per worker{dropped}{feeders}; steps {step} → {cfg.max_steps}")
        runlog = RunLog(run_dir, cfg, step=step, world_size=world_size, log=log)

    autocast = training_autocast(device, cfg.bf16 and device.type == "cuda")
    accum = cfg.grad_accum_steps
    it = feed(data, make_batch, step * accum, workers=cfg.feed_workers, pin_memory=device.type == "cuda")
    # Running sums since the last log, kept on the device so there is no sync per step.
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, mlm, acoustic, micro-batches
    counts = torch.zeros(4, dtype=torch.float64)  # samples, real frames, padded frames, FLOPs
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else device.type)  # MFU
    last = {}
    t0 = time.perf_counter()
    model.train()
    finished = False  # what the tracker is told: FINISHED only when the loop ran to its end
    try:
        while step < cfg.max_steps:
            torch.manual_seed(derive_seed(cfg.seed, rank, step))  # dropout: a function of the step
            for micro in range(accum):
                batch = next(it)
                counts += torch.tensor([len(batch["input_ids"]), batch.pop("n_real"), batch.pop("n_padded"),
                                        batch_flops(model_cfg, batch)], dtype=torch.float64)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                sync = micro == accum - 1 or not hasattr(model, "no_sync")
                with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                    out = model(**batch)
                (out.loss / accum).backward()
                sums += torch.stack([out.loss.detach(), out.mlm_loss.detach(),
                                     out.masked_acoustic_loss.detach(), torch.ones((), device=device)]).double()
            if cfg.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.clip_grad_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                stats = torch.cat([sums, counts.to(device)])
                if _is_distributed():
                    dist.all_reduce(stats)
                stats = stats.cpu()
                dt = time.perf_counter() - t0
                loss, mlm, acoustic, n = stats[:4].tolist()
                samples, real, padded, flops = stats[4:].tolist()
                last = {"step": step, "loss": loss / n, "mlm_loss": mlm / n,
                        "masked_acoustic_loss": acoustic / n, "lr": lr, "samples_per_s": samples / dt,
                        "padding_efficiency": real / padded, "epoch": step * accum / data.batches_per_epoch,
                        "tflops_per_s": flops / dt / 1e12}
                if peak:  # every worker's FLOPs over every worker's peak
                    last["mfu"] = flops / dt / (peak * world_size)
                if rank == 0:
                    log(step_line(last))
                    runlog.metrics(last)
                sums.zero_()
                counts.zero_()
                t0 = time.perf_counter()

            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                path, t_save = None, time.perf_counter()
                if rank == 0:
                    epoch, skip = data.position(step * accum)
                    state = {"step": step, "world_size": world_size, "seed": cfg.seed, **frames,
                             "data_config": data_config,
                             "data_position": {"batch_index": step * accum, "epoch": epoch, "skip": skip,
                                               "batches_per_epoch": data.batches_per_epoch},
                             "metrics": last,
                             "rng": "none saved: dropout and masks are reseeded from (seed, rank, step)",
                             "config": to_dict(cfg)}
                    path = str(store.save(step, "pretraining", {"main": Part(raw, optimizer, scheduler)},
                                          tokenizer_dir=_local_tokenizer(tok, cfg.data), tokenizer_hash=tok.hash,
                                          state=state))
                    runlog.checkpoint(step, path)
                    log(f"checkpoint {path}")
                if report is not None:
                    report({**last, "step": step}, path)
                t0 += time.perf_counter() - t_save  # checkpointing is not training throughput
        finished = True
    except FeedError as e:  # said on the console (every rank's own): Ray Train's restart says only "failed"
        (alert or log)(f"rank {rank}: {e}; stopping this worker (with max_failures the group restarts from the last checkpoint)")
        raise
    finally:
        it.close()
        if runlog is not None:
            runlog.close(finished)
    done = store.latest()
    return {"metrics": last, "checkpoint": str(done) if rank == 0 and done else None, "step": step}


# --------------------------------------------------------------------------------------------------
# without Ray: N local processes with torch.distributed (the baseline of benchmarks/train_throughput)


def _local_worker(rank: int, plan: PretrainPlan, run_dir: str, world_size: int, port: int, threads: int):
    torch.set_num_threads(threads)
    use_cuda = torch.cuda.is_available() and plan.cfg.use_gpu != "false"
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        if rank == 0:  # the rendezvous store on the loopback interface only, not every interface
            rendezvous.serve_store("127.0.0.1", port)
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world_size)
    try:
        pretrain_loop(plan, run_dir=run_dir, rank=rank, world_size=world_size, device=device)
    finally:
        if world_size > 1:
            dist.destroy_process_group()
            rendezvous.release_store(port)


def launch_local(cfg: PretrainConfig, run_dir: str | Path, num_workers: Optional[int] = None) -> None:
    """Run ``pretrain_loop`` in ``num_workers`` local processes (DDP over gloo, or NCCL on GPUs),
    each with ``max(1, int(cfg.cpus_per_worker))`` torch threads — the same as under Ray. The run
    is checked (``prepare``) once, here."""
    import socket

    import torch.multiprocessing as mp

    n = num_workers or cfg.num_workers
    cfg = dataclasses.replace(cfg, num_workers=n)  # the batch check (prepare) splits over these workers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, int(cfg.cpus_per_worker))
    args = (prepare(cfg), str(run_dir), n, port, threads)
    with manifest.recorded_run(run_dir, "pretraining", cfg):  # the spawned workers inherit the run
        if n == 1:
            _local_worker(0, *args)
        else:
            mp.spawn(_local_worker, args=args, nprocs=n, join=True)
