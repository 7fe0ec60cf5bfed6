"""Fine-tune CTAL on one task and evaluate a fine-tuned checkpoint, without Ray.

`finetune(cfg)` trains one model per fold of the task's protocol (emotion: up to five sessions, the
others: one), epoch by epoch, scoring every fold on its dev rows after each epoch; the epoch's metrics
(mean over folds, and per fold) and a checkpoint go to `report` (Ray Tune / Ray Train pass theirs) or to
`out_dir/{last,best}`. `evaluate(checkpoint, data, role)` scores a checkpoint on the protocol's dev or
test rows; it is the only code that reads test rows.

Checkpoints are `ctal.checkpoint`'s format, kind "finetuning": per fold a model directory
(`CTALForSequenceClassification.from_pretrained` loads it) with its `optimizer.safetensors` (optimizer
and schedule, to resume), one fold at the top level, several in sub-directories named after them;
`tokenizer/`, and `checkpoint.json` with the task, folds, epoch, metrics, history, config and data set.

Determinism: batches come from (seed, epoch), dropout is reseeded from (seed, fold, epoch, rank), so a
run resumed from an epoch checkpoint repeats the epochs it would have run.
"""
from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ctal import checkpoint as checkpoints
from ctal import checkpoint_data
from ctal import storage, tracking
from ctal.batching import bucket_batches, collate, derive_seed, padding_efficiency
from ctal.checkpoint import Part, latest_checkpoint
from ctal.config import ConfigError, FinetuneConfig, from_dict, to_dict, validate_finetune_config
from ctal.data import TOKENIZER_DIR, TaskData, check_vocabulary
from ctal.finetune_model import build_model, check_architecture, check_init, freeze, resolve_model_upstream
from ctal.model import CTALForSequenceClassification
from ctal.optim import build_optimizer, build_scheduler
from ctal.tasks import Fold, Outputs, Task, fold_subset, get_task

KIND = "finetuning"  # checkpoint.json's kind
EVAL_BATCH_SIZE = 16  # fixed, so a checkpoint's metrics do not depend on the training batch size

FRESH_MODEL_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!! Fine-tuning a FRESHLY INITIALIZED CTAL: no pretraining checkpoint was given (init / --init).\n"
    "!! Scores measure the architecture trained from scratch on this task, not CTAL pretraining.\n"
    + "!" * 78 + "\n")

# Reported: metrics of the epoch (incl. "epoch"), and the checkpoint directory (None on ranks > 0).
ReportFn = Callable[[dict, Optional[str]], None]


def position_limits(model) -> dict:
    """Crop lengths the model's learned positions allow (for a model with its upstream: in samples)."""
    cfg = model.config
    max_tokens = cfg.max_position_embeddings - (cfg.pad_token_id + 1 if cfg.text_position_style == "roberta" else 0)
    return {"max_tokens": max_tokens, "max_frames": audio_budget(model, cfg.max_audio_positions, 0)[0]}


def audio_budget(model, max_frames: int, max_frames_per_batch: int) -> tuple[int, int]:
    """(crop length, batch budget) in the data's units: the audio stream's frames, or for a model
    running its own upstream on waveforms (whose ``n_frames`` count samples) the samples that give
    that many frames, so ``max_frames`` and ``max_frames_per_batch`` mean the same for every front end."""
    up = getattr(_unwrap(model), "upstream", None)
    if up is None:
        return max_frames, max_frames_per_batch
    per_batch = up.samples_for(max_frames_per_batch) if max_frames_per_batch > 0 else 0
    return up.samples_for(max_frames), per_batch


def _batch(data: TaskData, idx, targets, pad_token_id: int, limits: dict, max_frames: int, device) -> dict:
    b = collate(data.rows(idx, targets), max_frames=min(max_frames, limits["max_frames"]),
                pad_token_id=pad_token_id, max_tokens=limits["max_tokens"], frontend=data.frontend)
    return {k: v.to(device) for k, v in b.items()}


# --------------------------------------------------------------------------------------------------
# a run checked once (its model built and checked: ctal.finetune_model)


def _unwrap(model):
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module


def prepare(cfg: FinetuneConfig, data: Optional[TaskData] = None) -> tuple[FinetuneConfig, TaskData]:
    """Check a fine-tuning run once, before Ray starts: value ranges, the data set (opened, unless
    given) against the task's protocol, and ``init`` (a checkpoint, or a pretraining run directory
    for its newest one) against the data set. Returns the config with ``data`` and ``init`` absolute
    (trials do not run in the driver's working directory) or URIs, and the opened data set.
    Raises ConfigError, FileNotFoundError or ValueError naming what is wrong."""
    validate_finetune_config(cfg)
    if not cfg.data:
        raise ConfigError("data: give the preprocessed data set (a directory or a URI)")
    for key in ("data", "init"):
        if getattr(cfg, key):
            storage.resolve(getattr(cfg, key))  # an unknown scheme fails here, naming the URI
    tracking.check_tracking(cfg.tracking, cfg.tracking_uri)  # a sweep's store place: checked by run_sweep
    cfg = replace(cfg, data=storage.normalize(cfg.data), init=cfg.init and storage.normalize(cfg.init))
    data = data if data is not None else TaskData.load(cfg.data)
    if cfg.init and not storage.is_file(storage.join(cfg.init, checkpoints.STATE_FILE)):
        newest = latest_checkpoint(cfg.init)  # a pretraining run directory: its newest checkpoint
        if newest is None:
            raise FileNotFoundError(f"init={cfg.init} is neither a ctal checkpoint (no {checkpoints.STATE_FILE}) "
                                    "nor a pretraining run directory holding one")
        cfg = replace(cfg, init=str(newest))
    cfg, upstream = resolve_model_upstream(cfg, data)
    if cfg.init:
        check_architecture(cfg, check_init(cfg.init, data, upstream))
    check_vocabulary(cfg.model, data.tokenizer)
    get_task(cfg.task).folds(data.meta, cfg.fold, cfg.seed)  # the protocol fits the data
    return cfg, data


# --------------------------------------------------------------------------------------------------
# checkpoints


def read_state(checkpoint: str | Path) -> dict:
    """The state of a fine-tuning checkpoint (task, folds, epoch, metrics, history, config, data)."""
    state = checkpoints.read_state(checkpoint)
    if state.get("kind") != KIND:
        raise ValueError(f"{checkpoint} is a {state.get('kind')} checkpoint, not a fine-tuning one")
    return state


def fold_dirs(checkpoint: str | Path) -> dict[str, Path]:
    """Fold name → the (ordinary model) directory holding that fold's model."""
    return checkpoints.model_dirs(checkpoint, read_state(checkpoint))


@dataclass
class _FoldRun:
    fold: Fold
    classes: Optional[list[str]]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    targets: np.ndarray  # of fold.train


def _save(dest: str | Path, runs: list[_FoldRun], cfg: FinetuneConfig, epoch: int, metrics: dict,
          history: list[dict], data: TaskData) -> None:
    tok_dir = (storage.localize(storage.join(data.data_dir, TOKENIZER_DIR), kind="tokenizers")
               if storage.is_uri(data.data_dir) else Path(data.data_dir) / TOKENIZER_DIR)
    state = {"task": cfg.task, "folds": [r.fold.name for r in runs], "epoch": epoch, "metrics": metrics,
             "history": history, "config": to_dict(cfg), "data": data.data_dir,
             **checkpoint_data.frames_entry(data.report), "data_config": checkpoint_data.data_config_entry(data.report)}
    spec = _unwrap(runs[0].model).config.audio_upstream_spec
    if spec:  # the upstream the model runs (as it was before fine-tuning: its weights are the checkpoint's)
        state["upstream"] = spec["info"]
    checkpoints.write(dest, KIND, {r.fold.name: Part(_unwrap(r.model), r.optimizer, r.scheduler) for r in runs},
                      tokenizer_dir=tok_dir, tokenizer_hash=data.tokenizer.hash, state=state)


# --------------------------------------------------------------------------------------------------
# training


@dataclass
class FinetuneResult:
    history: list[dict]  # one entry per epoch: "epoch", "train_loss", "dev_<metric>"...
    best: dict  # the entry with the best dev selection metric
    best_checkpoint: Optional[Path] = None  # out_dir/best when out_dir was given


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def finetune(cfg: FinetuneConfig, *, data: Optional[TaskData] = None, out_dir: Optional[str | Path] = None,
             report: Optional[ReportFn] = None, resume_from: Optional[str | Path] = None,
             rank: int = 0, world_size: int = 1,
             prepare_model: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None,
             log: Callable[[str], None] = print) -> FinetuneResult:
    """Fine-tune `cfg.task` on `cfg.data` (or `data`); see the module docstring.

    rank / world_size / prepare_model: data-parallel training (Ray Train passes its rank and
    `prepare_model`); each rank takes every world_size-th batch and all ranks score dev in full.
    """
    validate_finetune_config(cfg)
    task = get_task(cfg.task)
    data = data if data is not None else TaskData.load(cfg.data)
    folds = [_label_subset(task, data, f, cfg) for f in task.folds(data.meta, cfg.fold, cfg.seed)]
    if cfg.init is None and rank == 0:
        print(FRESH_MODEL_WARNING, file=sys.stderr, flush=True)
    device = _device()
    resume = checkpoints.local_copy(resume_from) if resume_from else None
    state = _resume_state(resume, data) if resume else None
    if state and state["folds"] != [f.name for f in folds]:
        raise ValueError(f"resume_from={resume} holds folds {state['folds']}, this run has "
                         f"{[f.name for f in folds]}")

    runs = []
    for fold in folds:
        classes = task.classes(data.meta, fold)
        targets = task.targets(data.meta, fold.train, classes)
        if state:  # the checkpoint's weights; the config's other fields still apply
            model = CTALForSequenceClassification.from_pretrained(checkpoints.model_dirs(resume, state)[fold.name])
            freeze(model, cfg)
        else:
            model = build_model(cfg, task, classes, data)
        model.to(device)
        if prepare_model is not None:
            model = prepare_model(model)
        # batching in the data's units (a waveform's samples); checkpoints keep cfg as given
        bcfg = replace(cfg, **dict(zip(("max_frames", "max_frames_per_batch"),
                                       audio_budget(model, cfg.max_frames, cfg.max_frames_per_batch))))
        steps = len(_train_batches(data, fold, bcfg, 0, rank, world_size)) * cfg.epochs
        opt = build_optimizer(_unwrap(model), cfg)
        sched = build_scheduler(opt, cfg.warmup_ratio, steps)
        if state:
            checkpoints.load_training_state(checkpoints.model_dirs(resume, state)[fold.name], opt, sched)
        runs.append(_FoldRun(fold, classes, model, opt, sched, targets))
    if rank == 0:
        m = _unwrap(runs[0].model)
        log(f"{cfg.task}: {len(folds)} fold(s) {[f.name for f in folds]}, fusion={m.config.fusion}, "
            f"{m.count_parameters(trainable_only=True):,} trainable parameters, device={device}")

    history = list(state["history"]) if state else []
    best = min(history, key=lambda h: _sort_key(task, h), default=None)
    out = Path(out_dir) if out_dir else None
    for epoch in range(state["epoch"] + 1 if state else 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        losses = [_train_epoch(run, k, data, bcfg, epoch, rank, world_size, device) for k, run in enumerate(runs)]
        per_fold = {}
        for run in runs:
            outputs = predict(_unwrap(run.model), data, run.fold.dev, cfg.max_frames, cfg.max_frames_per_batch)
            per_fold[run.fold.name] = task.score(outputs, data.meta, run.fold.dev, run.classes, cfg.seed)
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)),
                   "padding_efficiency": train_padding_efficiency(data, folds, bcfg, epoch, rank, world_size),
                   **{f"dev_{k}": v for k, v in task.aggregate(per_fold).items()},
                   "epoch_s": time.perf_counter() - t0}
        history.append(metrics)
        improved = best is None or _sort_key(task, metrics) < _sort_key(task, best)
        best = metrics if improved else best
        if rank == 0:
            log(f"epoch {epoch}/{cfg.epochs}: train_loss {metrics['train_loss']:.4f}  "
                + "  ".join(f"dev {m} {metrics['dev_' + m]:.4f}" for m in task.metric_names)
                + f"  ({metrics['epoch_s']:.1f} s)")
        if out is not None and rank == 0:
            _save(out / "last", runs, cfg, epoch, metrics, history, data)
            if improved:
                _save(out / "best", runs, cfg, epoch, metrics, history, data)
        if report is not None:
            if rank == 0:
                with tempfile.TemporaryDirectory(prefix="ctal-ckpt-") as tmp:
                    _save(Path(tmp) / "checkpoint", runs, cfg, epoch, metrics, history, data)
                    report(metrics, str(Path(tmp) / "checkpoint"))  # Tune / Train copy it before returning
            else:
                report(metrics, None)
    return FinetuneResult(history, best, out / "best" if out is not None and best else None)


def _label_subset(task: Task, data: TaskData, fold: Fold, cfg: FinetuneConfig) -> Fold:
    """The fold with its training rows cut to cfg.label_fraction (ctal.tasks.fold_subset)."""
    if cfg.label_fraction == 1:
        return fold
    return fold_subset(task, data.meta, fold, cfg.label_fraction, cfg.label_subset_seed)


def _resume_state(resume: Path, data: TaskData) -> dict:
    """The state of the checkpoint to resume from, after checking its files, front end and tokenizer."""
    state = checkpoints.verify(resume)
    if state.get("kind") != KIND:
        raise ValueError(f"resume_from={resume} is a {state.get('kind')} checkpoint, not a fine-tuning one")
    checkpoint_data.check_frontend(resume, data.report)
    checkpoint_data.check_tokenizer(resume, data.tokenizer.hash)
    return state


def _sort_key(task: Task, metrics: dict) -> float:
    """Smaller is better; NaN ranks last."""
    v = metrics[f"dev_{task.metric}"]
    if v is None or math.isnan(v):
        return math.inf
    return v if task.mode == "min" else -v


def _train_batches(data: TaskData, fold: Fold, cfg: FinetuneConfig, epoch: int, rank: int, world_size: int):
    """This rank's batches of ``epoch`` (positions into ``fold.train``): by count, or by frame budget."""
    batches = bucket_batches(np.minimum(data.n_frames[fold.train], cfg.max_frames), batch_size=cfg.batch_size,
                             max_frames_per_batch=cfg.max_frames_per_batch, seed=cfg.seed, epoch=epoch)
    usable = len(batches) // world_size * world_size  # equal step counts keep DDP ranks in lock step
    if usable == 0:
        per = (f"of up to {cfg.max_frames_per_batch} frames" if cfg.max_frames_per_batch > 0
               else f"of {cfg.batch_size}")
        raise ValueError(f"fold {fold.name}: {len(fold.train)} training rows make {len(batches)} batches {per}, "
                         f"fewer than the {world_size} workers")
    return batches[rank:usable:world_size]


def train_padding_efficiency(data: TaskData, folds: list[Fold], cfg: FinetuneConfig, epoch: int, rank: int = 0,
                             world_size: int = 1) -> float:
    """Real / padded frames (after cropping) of this rank's training batches in ``epoch``, all folds."""
    batches = [fold.train[b] for fold in folds for b in _train_batches(data, fold, cfg, epoch, rank, world_size)]
    return padding_efficiency(batches, np.minimum(data.n_frames, cfg.max_frames))


def _train_epoch(run: _FoldRun, k: int, data: TaskData, cfg: FinetuneConfig, epoch: int, rank: int,
                 world_size: int, device) -> float:
    model = run.model
    inner = _unwrap(model)
    limits = position_limits(inner)
    model.train()
    torch.manual_seed(derive_seed(cfg.seed, k, epoch, rank))  # dropout: no RNG state to checkpoint
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for positions in _train_batches(data, run.fold, cfg, epoch, rank, world_size):
        idx = run.fold.train[positions]
        batch = _batch(data, idx, run.targets[positions], inner.config.pad_token_id, limits, cfg.max_frames,
                       device)
        with _autocast(device, cfg):
            out = model(**batch)
        run.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        losses.append(float(out.loss.detach()))
    return float(np.mean(losses))


def _autocast(device, cfg: FinetuneConfig):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.bf16)


# --------------------------------------------------------------------------------------------------
# prediction and evaluation


@torch.no_grad()
def predict(model, data: TaskData, idx: np.ndarray, max_frames: int = 3000,
            max_frames_per_batch: int = 0) -> Outputs:
    """Logits and fused embeddings for rows `idx` (in that order), batched by length: EVAL_BATCH_SIZE
    rows, or up to `max_frames_per_batch` > 0 padded frames, per batch (no shuffling: no seed needed).
    Frames are the audio stream's (``audio_budget``)."""
    model.eval()
    device = next(model.parameters()).device
    limits = position_limits(model)
    max_frames, max_frames_per_batch = audio_budget(model, max_frames, max_frames_per_batch)
    batches = bucket_batches(np.minimum(data.n_frames[idx], max_frames), batch_size=EVAL_BATCH_SIZE,
                             max_frames_per_batch=max_frames_per_batch, seed=0, epoch=0, shuffle=False)
    logits, emb = [None] * len(idx), [None] * len(idx)
    for pos in batches:
        pos = np.asarray(pos, dtype=np.int64)
        batch = _batch(data, idx[pos], None, model.config.pad_token_id, limits, max_frames, device)
        out = model(**batch)
        for j, p in enumerate(pos):
            logits[p], emb[p] = out.logits[j].float().cpu().numpy(), out.embedding[j].float().cpu().numpy()
    return Outputs(np.stack(logits), np.stack(emb))


def evaluate(checkpoint: str | Path, data: Optional[TaskData] = None, role: str = "test",
             task: Optional[str] = None) -> tuple[dict, dict]:
    """Score a fine-tuning checkpoint on the protocol's `role` rows ("dev" or "test") of `data` (default:
    the data set it was trained on). `checkpoint` may be a URI. Returns (metrics aggregated over
    folds, metrics per fold)."""
    original, checkpoint = checkpoint, checkpoints.local_copy(checkpoint)
    state = read_state(checkpoint)
    checkpoints.verify(checkpoint)  # a damaged file: CheckpointError naming it, not a loader's error
    if task is not None and task != state["task"]:
        raise ValueError(f"{checkpoint} was fine-tuned for {state['task']!r}, not {task!r}")
    t = get_task(state["task"])
    cfg = from_dict(FinetuneConfig, state["config"])
    data = data if data is not None else TaskData.load(state["data"])
    check_init(original, data)
    folds = {f.name: f for f in t.folds(data.meta, cfg.fold, cfg.seed)}
    missing = [f for f in state["folds"] if f not in folds]
    if missing:
        raise ValueError(f"{checkpoint} holds fold(s) {missing} that the data set does not have")
    device = _device()
    per_fold = {}
    for name, d in fold_dirs(checkpoint).items():
        fold = folds[name]
        model = CTALForSequenceClassification.from_pretrained(d).to(device)
        idx = fold.rows(role)
        per_fold[name] = t.score(predict(model, data, idx, cfg.max_frames, cfg.max_frames_per_batch), data.meta, idx,
                                 t.classes(data.meta, fold), cfg.seed)
    return t.aggregate(per_fold), per_fold
