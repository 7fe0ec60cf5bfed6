"""CTAL pretraining loop in plain PyTorch: one function per worker, callable with or without Ray.

``pretrain_loop`` is what every worker runs (Ray Train calls it from ``ctal.distributed.train``;
``launch_local`` runs it in processes of its own). It is exactly resumable: the data position is a
function of the step, dropout is reseeded every step from (seed, rank, step) and the masks from
(seed, rank, batch index), so a checkpoint holds only model, optimizer, scheduler and step, and
a resumed run logs the same losses as an uninterrupted one (bitwise on CPU).

Run directory layout::

    <run_dir>/checkpoints/step-00000100/   config.json, model.safetensors  (from_pretrained-loadable)
                                           optimizer.safetensors, trainer_state.json, tokenizer/
    <run_dir>/tensorboard/                 per-step scalars (rank 0)
    <run_dir>/metrics.jsonl                the same, one JSON line per logged step (rank 0)

``run_dir`` may be a URI (``s3://``, ``gs://``, ``file://``; ctal.storage): rank 0 then works in a
local staging directory and uploads each checkpoint (trainer_state.json last, so a checkpoint
without it is incomplete), metrics.jsonl and tensorboard/ after every checkpoint; a resume on any
node downloads the newest intact checkpoint. ``cfg.data`` may be a URI too (shards are read
through pyarrow's filesystem, the tokenizer is cached locally).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from . import storage
from .batching import PretrainBatches, collate, derive_seed, prefetch
from .config import ConfigError, PretrainConfig, from_dict, to_dict
from .data import TOKENIZER_DIR, open_dataset
from .model import CTALConfig, CTALForPretraining

CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete or damaged (the loop then falls back to an older one)."""


# --------------------------------------------------------------------------------------------------
# checks that run before any work starts


def validate_pretrain_config(cfg: PretrainConfig) -> None:
    """Value ranges the typed schema cannot express; raises ConfigError naming the key."""
    positive = ("max_steps", "batch_size", "grad_accum_steps", "log_every", "checkpoint_every",
                "keep_checkpoints", "num_workers", "bucket_pool_rows", "max_frames")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {getattr(cfg, key)}")
    if cfg.cpus_per_worker <= 0:
        raise ConfigError(f"cpus_per_worker: must be > 0, got {cfg.cpus_per_worker}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ConfigError(f"warmup_ratio: must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.max_frames_per_batch < 0 or cfg.max_failures < -1:
        raise ConfigError("max_frames_per_batch must be >= 0 and max_failures >= -1 (-1 = unlimited)")




def check_data(data_dir: str | Path) -> dict:
    """The data set's verified tokenizer facts (``ctal.data.open_dataset``) as the loop uses them."""
    tok = open_dataset(data_dir).tokenizer
    return {**dataclasses.asdict(tok), "dir": str(tok.dir), "special_token_ids": list(tok.special_token_ids)}


# --------------------------------------------------------------------------------------------------
# optimizer and schedule


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW (cfg.lr, cfg.weight_decay) over trainable parameters; no weight decay on biases,
    LayerNorm and other 1-d parameters (as BERT/nanoGPT). Pretraining and fine-tuning share it."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # tied weights once
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def lr_lambda(cfg: PretrainConfig) -> Callable[[int], float]:
    """Linear warmup over warmup_ratio x max_steps, then linear decay to 0 (HF's linear schedule)."""
    warmup = round(cfg.warmup_ratio * cfg.max_steps)

    def fn(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (cfg.max_steps - step) / max(1, cfg.max_steps - warmup))
    return fn


# --------------------------------------------------------------------------------------------------
# checkpoints: written to a temporary directory and renamed, so a directory named step-N is complete


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``ckpt_dir``, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path | str]:
    """The newest checkpoint of a run directory (or None); it loads with ``from_pretrained``.
    For a URI run directory: the checkpoint's URI (``storage.localize`` gives a local copy)."""
    if storage.is_uri(run_dir):
        steps = remote_checkpoints(storage.join(run_dir, CHECKPOINTS))
        return steps[-1][1] if steps else None
    found = list_checkpoints(Path(run_dir) / CHECKPOINTS)
    return found[-1][1] if found else None


def read_metrics(run_dir: str | Path) -> dict[int, dict]:
    """step → logged metrics from ``metrics.jsonl``; after a resume the later lines win."""
    out: dict[int, dict] = {}
    if storage.is_uri(run_dir):
        path = storage.join(run_dir, METRICS_FILE)
        text = storage.read_text(path) if storage.is_file(path) else ""
    else:
        path = Path(run_dir) / METRICS_FILE
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if text:
        for line in text.splitlines():
            rec = json.loads(line)
            if "event" not in rec:
                out[rec["step"]] = rec
    return out


def save_checkpoint(ckpt_dir: Path, step: int, model: CTALForPretraining, optimizer, scheduler,
                    state: dict, tokenizer_dir: Optional[str], keep: int) -> Path:
    """Write step-N atomically (tmp dir + rename), then drop all but the newest ``keep``."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:08d}"
    tmp = ckpt_dir / f".step-{step:08d}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        opt = optimizer.state_dict()
        tensors = {f"state.{i}.{k}": v.detach().contiguous().cpu()
                   for i, s in opt["state"].items() for k, v in s.items()}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        if tokenizer_dir:
            shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR)
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        full_state = {**state, "step": step, "optimizer_param_groups": opt["param_groups"],
                      "scheduler": sched, "files": {f: _sha256(tmp / f) for f in files}}
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump(full_state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a leftover from a run that fell back past it
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> dict:
    """The trainer state of ``path`` after checking every file against its recorded sha256;
    raises CheckpointError if anything is missing or damaged."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        files = state["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable {STATE_FILE} ({e})") from e
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{path}: {name} does not match its recorded sha256 (damaged)")
    return state


def choose_checkpoint(ckpt_dir: Path, log: Callable[[str], None] = print) -> Optional[Path]:
    """The newest intact checkpoint; damaged newer ones are renamed aside with a warning.
    Leftover temporary directories of interrupted saves are removed."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob(".step-*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
    for step, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            aside = path.with_name(f"corrupt-{path.name}-{uuid.uuid4().hex[:6]}")
            path.rename(aside)
            msg = (f"checkpoint step {step} is damaged ({e}); falling back to an older one "
                   f"(moved to {aside.name})")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log(f"WARNING: {msg}")
    return None


# --------------------------------------------------------------------------------------------------
# checkpoints in a URI run directory (s3://, gs://, file://): object stores cannot rename, so a
# checkpoint counts as complete once its trainer_state.json exists, and that file is uploaded last


def remote_checkpoints(ckpt_uri: str) -> list[tuple[int, str]]:
    """(step, URI) of the complete checkpoints below ``ckpt_uri``, oldest first."""
    found = []
    for n in storage.listdir(ckpt_uri):
        m = _STEP_DIR.match(n)
        if m and storage.is_file(storage.join(ckpt_uri, n, STATE_FILE)):
            found.append((int(m.group(1)), storage.join(ckpt_uri, n)))
    return sorted(found)


def push_checkpoint(local: Path, ckpt_uri: str, keep: int) -> str:
    """Upload the finished local checkpoint ``local`` (step-N) to ``ckpt_uri/step-N`` with
    trainer_state.json last, then delete all but the newest ``keep`` there. Returns its URI."""
    dest = storage.join(ckpt_uri, local.name)
    storage.delete(storage.join(dest, STATE_FILE))  # a leftover of this step turns incomplete first
    storage.delete(dest)
    storage.upload_dir(local, dest, last=STATE_FILE)
    for _, old in remote_checkpoints(ckpt_uri)[:-keep] if keep > 0 else []:
        storage.delete(old)
    return dest


def pull_checkpoint(uri: str, local_ckpt_dir: Path) -> Path:
    """Download checkpoint ``uri`` to ``local_ckpt_dir/step-N`` (replacing an older copy)."""
    final = local_ckpt_dir / storage.name(uri)
    tmp = local_ckpt_dir / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        storage.download_dir(uri, tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def choose_remote_checkpoint(ckpt_uri: str, local_ckpt_dir: Path,
                             log: Callable[[str], None] = print) -> Optional[Path]:
    """``choose_checkpoint`` for a URI: the newest intact checkpoint, downloaded to
    ``local_ckpt_dir`` and verified. Damaged ones are moved aside with a warning; step directories
    without trainer_state.json (an upload that was cut off) are deleted."""
    for n in storage.listdir(ckpt_uri):
        if _STEP_DIR.match(n) and not storage.is_file(storage.join(ckpt_uri, n, STATE_FILE)):
            storage.delete(storage.join(ckpt_uri, n))
    for step, uri in reversed(remote_checkpoints(ckpt_uri)):
        path = pull_checkpoint(uri, local_ckpt_dir)
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            aside = storage.join(ckpt_uri, f"corrupt-{storage.name(uri)}-{uuid.uuid4().hex[:6]}")
            storage.move(uri, aside)
            shutil.rmtree(path, ignore_errors=True)
            msg = (f"checkpoint step {step} is damaged ({e}); falling back to an older one "
                   f"(moved to {storage.name(aside)})")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log(f"WARNING: {msg}")
    return None


def _push_logs(run_dir: Path, remote: str, writer) -> None:
    """Upload metrics.jsonl and tensorboard/ of the local staging ``run_dir`` to ``remote``."""
    writer.flush()
    if (run_dir / METRICS_FILE).is_file():
        storage.upload_file(run_dir / METRICS_FILE, storage.join(remote, METRICS_FILE))
    if (run_dir / "tensorboard").is_dir():
        storage.upload_dir(run_dir / "tensorboard", storage.join(remote, "tensorboard"))


def load_training_state(path: Path, optimizer, scheduler) -> dict:
    """Restore optimizer and scheduler from a checkpoint (tensors from safetensors, the rest JSON)."""
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    flat = load_file(str(path / "optimizer.safetensors"))
    opt_state: dict = {}
    for key, value in flat.items():
        _, idx, name = key.split(".", 2)
        opt_state.setdefault(int(idx), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g
              for g in state["optimizer_param_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    return state


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


def _resume_point(ckpt_dir: Path, rank: int, device: torch.device, log,
                  remote: Optional[str] = None) -> Optional[Path]:
    """Rank 0 picks the checkpoint (verifying it); every rank gets the same answer. With a URI run
    directory (``remote``) each rank downloads it into its own ``ckpt_dir``."""
    path = None
    if rank == 0:
        path = (choose_remote_checkpoint(storage.join(remote, CHECKPOINTS), ckpt_dir, log) if remote
                else choose_checkpoint(ckpt_dir, log))
    if _is_distributed():
        # NCCL broadcasts only CUDA tensors, gloo only CPU ones.
        where = device if dist.get_backend() == "nccl" else "cpu"
        step = torch.tensor([-1 if path is None else int(_STEP_DIR.match(path.name).group(1))], device=where)
        dist.broadcast(step, src=0)
        path = None if int(step) < 0 else ckpt_dir / f"step-{int(step):08d}"
        if remote and path is not None and rank != 0:
            path = pull_checkpoint(storage.join(remote, CHECKPOINTS, path.name), ckpt_dir)
    return path


def pretrain_loop(cfg: PretrainConfig, *, run_dir: str | Path, rank: int = 0, world_size: int = 1,
                  device: Optional[torch.device] = None,
                  prepare_model: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None,
                  report: Optional[Callable[[dict, Optional[str]], None]] = None,
                  log: Callable[[str], None] = print) -> dict:
    """Pretrain CTAL on this worker's share of ``cfg.data`` until ``cfg.max_steps``.

    Resumes from the newest intact checkpoint in ``run_dir/checkpoints`` (one damaged beyond repair
    is moved aside with a warning); ``run_dir`` and ``cfg.data`` may be URIs (module docstring).
    ``prepare_model`` wraps the model for data parallelism (Ray's ``prepare_model``; default: DDP
    when torch.distributed is initialized). ``report(metrics, checkpoint_path)`` is called on every
    rank after each checkpoint (path on rank 0, else None). Returns the last logged metrics and the
    final checkpoint path.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    validate_pretrain_config(cfg)
    tok = check_data(cfg.data)
    remote, staging = None, None
    if storage.is_uri(run_dir):
        # A URI run directory: this worker stages locally (rank 0 uploads at every checkpoint).
        remote = storage.normalize(run_dir)
        staging = tempfile.TemporaryDirectory(prefix="ctal-run-")  # removed even if we fail below
        run_dir = Path(staging.name)
        if rank == 0 and storage.is_file(storage.join(remote, METRICS_FILE)):
            storage.download_file(storage.join(remote, METRICS_FILE), run_dir / METRICS_FILE)
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / CHECKPOINTS
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tok["vocab_size"], pad_token_id=tok["pad_token_id"])
    # Crop to what the model's learned positions cover (narrow.yaml: 1000 frames).
    cfg = dataclasses.replace(cfg, max_frames=min(cfg.max_frames, model_cfg.max_audio_positions))

    resume = _resume_point(ckpt_dir, rank, device, log, remote)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every fresh run
    if resume is None:
        model = CTALForPretraining(CTALConfig.from_model_config(model_cfg))
        step = 0
    else:
        model = CTALForPretraining.from_pretrained(resume, **vars(model_cfg))
    raw = model.to(device)  # before the optimizer, so its restored state lands on the device too
    optimizer = build_optimizer(raw, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if resume is not None:
        state = load_training_state(resume, optimizer, scheduler)
        if state.get("tokenizer_hash") != tok["hash"]:
            theirs = str(state.get("tokenizer_hash"))[:12]
            raise ValueError(f"checkpoint {resume} was trained with tokenizer {theirs}…, the data set uses "
                             f"{tok['hash'][:12]}…; refusing to resume")
        step = state["step"]
        if state.get("world_size") != world_size:
            log(f"note: resuming a run of {state.get('world_size')} workers with {world_size}: "
                "the data order differs from an uninterrupted run")
        if rank == 0:
            log(f"resumed from {storage.join(remote, CHECKPOINTS, resume.name) if remote else resume} "
                f"(step {step})")
        if step >= cfg.max_steps:
            done = storage.join(remote, CHECKPOINTS, resume.name) if remote else str(resume)
            return {"metrics": state.get("metrics", {}), "checkpoint": done if rank == 0 else None,
                    "step": step}
    model = (prepare_model or (lambda m: _ddp(m, device)))(raw)

    data = PretrainBatches(cfg.data, rank=rank, world_size=world_size, seed=cfg.seed, split=cfg.split,
                           batch_size=cfg.batch_size, max_frames_per_batch=cfg.max_frames_per_batch,
                           max_frames=cfg.max_frames, pool_rows=cfg.bucket_pool_rows)
    max_tokens = model_cfg.max_position_embeddings - (model_cfg.pad_token_id + 1
                                                      if model_cfg.text_position_style == "roberta" else 0)

    def batches(start: int):
        for index, rows in enumerate(data.iter_from(start), start):
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, rank, index, 1))
            b = collate(rows, max_frames=cfg.max_frames, pad_token_id=tok["pad_token_id"],
                        masking=cfg.masking, mask_token_id=tok["mask_token_id"], vocab_size=tok["vocab_size"],
                        special_token_ids=tok["special_token_ids"], generator=g, max_tokens=max_tokens)
            b["n_real"], b["n_padded"] = int(b["frame_mask"].sum()), b["frame_mask"].numel()
            if device.type == "cuda":  # pinned in the prefetch thread, so the copy is asynchronous
                b = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()}
            yield b

    writer, metrics_file = None, None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        run_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step or None)
        metrics_file = open(run_dir / METRICS_FILE, "a", encoding="utf-8")
        if step:  # lines after this one supersede earlier lines of the same steps
            metrics_file.write(json.dumps({"event": "resume", "step": step}) + "\n")
        n_params = raw.count_parameters()
        log(f"pretraining {n_params / 1e6:.2f} M parameters on {world_size} worker(s), {device.type}; "
            f"{data.batches_per_epoch} batches per epoch per worker; steps {step} → {cfg.max_steps}")

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda"
                else contextlib.nullcontext())
    accum = cfg.grad_accum_steps
    it = prefetch(batches(step * accum))
    # Running sums since the last log, kept on the device so there is no sync per step.
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, mlm, acoustic, micro-batches
    counts = torch.zeros(3, dtype=torch.float64)  # samples, real frames, padded frames
    last = {}
    t0 = time.perf_counter()
    model.train()
    try:
        while step < cfg.max_steps:
            torch.manual_seed(derive_seed(cfg.seed, rank, step))  # dropout: a function of the step
            for micro in range(accum):
                batch = next(it)
                counts += torch.tensor([len(batch["input_ids"]), batch.pop("n_real"), batch.pop("n_padded")],
                                       dtype=torch.float64)
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
                samples, real, padded = stats[4:].tolist()
                last = {"step": step, "loss": loss / n, "mlm_loss": mlm / n,
                        "masked_acoustic_loss": acoustic / n, "lr": lr, "samples_per_s": samples / dt,
                        "padding_efficiency": real / padded, "epoch": step * accum / data.batches_per_epoch}
                if rank == 0:
                    log(f"step {step:>7d} | loss {last['loss']:.4f} | mlm {last['mlm_loss']:.4f} | "
                        f"acoustic {last['masked_acoustic_loss']:.4f} | lr {last['lr']:.2e} | "
                        f"{last['samples_per_s']:.1f} samples/s | "
                        f"padding eff {last['padding_efficiency']:.3f}")
                    for k, v in last.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, step)
                    metrics_file.write(json.dumps(last) + "\n")
                    metrics_file.flush()
                sums.zero_()
                counts.zero_()
                t0 = time.perf_counter()

            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                path, t_save = None, time.perf_counter()
                if rank == 0:
                    epoch, skip = data.position(step * accum)
                    state = {"world_size": world_size, "seed": cfg.seed, "tokenizer_hash": tok["hash"],
                             "data_position": {"batch_index": step * accum, "epoch": epoch, "skip": skip,
                                               "batches_per_epoch": data.batches_per_epoch},
                             "metrics": last,
                             "rng": "none saved: dropout and masks are reseeded from (seed, rank, step)",
                             "config": to_dict(cfg)}
                    path = str(save_checkpoint(ckpt_dir, step, raw, optimizer, scheduler, state,
                                               tok["dir"], 1 if remote else cfg.keep_checkpoints))
                    if remote:
                        path = push_checkpoint(Path(path), storage.join(remote, CHECKPOINTS),
                                               cfg.keep_checkpoints)
                        _push_logs(run_dir, remote, writer)
                    log(f"checkpoint {path}")
                if report is not None:
                    report({**last, "step": step}, path)
                t0 += time.perf_counter() - t_save  # checkpointing is not training throughput
    finally:
        it.close()
        if writer is not None:
            writer.close()
            metrics_file.close()
    if remote:
        if rank == 0:
            _push_logs(run_dir, remote, writer)
        staging.cleanup()
    done = latest_checkpoint(remote or run_dir)
    return {"metrics": last, "checkpoint": str(done) if rank == 0 and done else None, "step": step}


# --------------------------------------------------------------------------------------------------
# without Ray: N local processes with torch.distributed (the baseline of benchmarks/train_throughput)


def _local_worker(rank: int, cfg_dict: dict, run_dir: str, world_size: int, port: int, threads: int):
    torch.set_num_threads(threads)
    cfg = from_dict(PretrainConfig, cfg_dict)
    use_cuda = torch.cuda.is_available() and cfg.use_gpu != "false"
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world_size)
    try:
        pretrain_loop(cfg, run_dir=run_dir, rank=rank, world_size=world_size, device=device)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def launch_local(cfg: PretrainConfig, run_dir: str | Path, num_workers: Optional[int] = None) -> None:
    """Run ``pretrain_loop`` in ``num_workers`` local processes (DDP over gloo, or NCCL on GPUs),
    each with ``max(1, int(cfg.cpus_per_worker))`` torch threads — the same as under Ray."""
    import socket

    import torch.multiprocessing as mp

    n = num_workers or cfg.num_workers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, int(cfg.cpus_per_worker))
    args = (to_dict(cfg), str(run_dir), n, port, threads)
    if n == 1:
        _local_worker(0, *args)
    else:
        mp.spawn(_local_worker, args=args, nprocs=n, join=True)

