"""A pretraining run checked once, before any work starts: ``prepare(cfg)`` checks the config's value
ranges, URIs, the data set and its tokenizer, that the run directory resumes the same run, and returns
the ``PretrainPlan`` that ``ctal.pretrain.pretrain_loop`` runs (Ray Train's workers get the plan the
driver checked: ``ctal.distributed.train``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from . import checkpoint, manifest, storage, tracking
from .batching import split_matches
from .checkpoint import CHECKPOINTS, CheckpointStore
from .config import (AT_LEAST_1, BELOW_1, NON_NEGATIVE, POSITIVE, PROBABILITY, ConfigError, PretrainConfig,
                     check_ranges, validate_model_config)
from .data import TokenizerInfo, check_vocabulary, open_dataset
from .redact import redact


@dataclass(frozen=True)
class PretrainPlan:
    """A checked pretraining run, made by ``prepare``: what the loop and the Ray launcher take."""
    cfg: PretrainConfig  # value ranges checked; data and storage_path absolute or URIs; max_frames
    #                      within the model's learned positions
    tokenizer: TokenizerInfo  # the data set's, verified (``ctal.data.open_dataset``)
    report: dict  # the data set's report.json: its front end and how it was made, for the checkpoints


def prepare(cfg: PretrainConfig) -> PretrainPlan:
    """Check ``cfg`` and its data set (ConfigError, ValueError or OSError naming what is wrong)."""
    validate_pretrain_config(cfg)
    for key in ("data", "storage_path"):
        storage.resolve(getattr(cfg, key))  # an unknown scheme fails here, naming the URI
    # Absolute paths (Ray workers do not share the driver's working directory); URIs as given.
    cfg = dataclasses.replace(cfg, data=storage.normalize(cfg.data), storage_path=storage.normalize(cfg.storage_path),
                              max_frames=min(cfg.max_frames, cfg.model.max_audio_positions))
    if cfg.model.audio_upstream:
        raise ConfigError("model.audio_upstream is for fine-tuning on waveforms; pretraining reads stored "
                          "frames: preprocess with features.frontend=ssl features.ssl_model=DIR instead")
    ds = open_dataset(cfg.data)
    if ds.frontend == "waveform":  # masked acoustic modelling reconstructs stored frames
        raise ConfigError(f"data={cfg.data} holds waveforms (features.frontend=waveform), which only fine-tuning "
                          "with model.audio_upstream=DIR reads; pretrain on features.frontend=ssl features of "
                          "that upstream (same folder, same layers), then fine-tune from that checkpoint")
    if not ds.splits:
        raise ValueError(f"{cfg.data} holds no utterances: nothing to pretrain on")
    wanted = [p for p in cfg.split.split(",") if p]  # as PretrainBatches selects them
    if not any(n for name, n in ds.splits.items() if split_matches(name, wanted)):
        raise ConfigError(f"split={cfg.split!r}: the data set {cfg.data} has no rows in it; its splits: "
                          + ", ".join(f"{k} ({v} rows)" for k, v in ds.splits.items()))
    check_resumable(CheckpointStore(storage.join(cfg.storage_path, cfg.run_name, CHECKPOINTS)))
    check_same_run(cfg)
    tracking.check_tracking(cfg.tracking, cfg.tracking_uri, storage.join(cfg.storage_path, cfg.run_name))
    tok = ds.tokenizer
    check_vocabulary(cfg.model, tok)
    worker_batch_size(cfg, cfg.num_workers)
    return PretrainPlan(cfg, tok, ds.report)


def worker_batch_size(cfg: PretrainConfig, world_size: int) -> int:
    """Utterances per worker micro-step: the global ``batch_size`` split over workers and accumulation
    steps (ConfigError when it does not split evenly). Frame-budget batching has no count: 0."""
    if cfg.max_frames_per_batch > 0:
        return 0
    parts = world_size * cfg.grad_accum_steps
    if cfg.batch_size % parts:
        fits = [k * parts for k in (cfg.batch_size // parts, cfg.batch_size // parts + 1) if k]
        raise ConfigError(
            f"batch_size: {cfg.batch_size} utterances per optimizer step (the global batch) do not split over "
            f"{world_size} worker(s) x grad_accum_steps={cfg.grad_accum_steps}; use a multiple of {parts} "
            f"({' or '.join(map(str, fits))}), or max_frames_per_batch=N to batch by frames per worker")
    return cfg.batch_size // parts


def validate_pretrain_config(cfg: PretrainConfig) -> None:
    """Value ranges the typed schema cannot express; raises ConfigError naming the key."""
    positive = ("max_steps", "batch_size", "grad_accum_steps", "log_every", "checkpoint_every",
                "keep_checkpoints", "num_workers", "bucket_pool_rows", "max_frames")
    check_ranges(cfg, {**dict.fromkeys(positive, AT_LEAST_1), "lr": POSITIVE, "weight_decay": NON_NEGATIVE,
                       "cpus_per_worker": POSITIVE, "warmup_ratio": BELOW_1, "clip_grad_norm": NON_NEGATIVE,
                       "max_frames_per_batch": NON_NEGATIVE, "halve_batch_above_frames": NON_NEGATIVE,
                       "feed_workers": NON_NEGATIVE,
                       "max_failures": (lambda v: v >= -1, ">= -1 (-1 = unlimited)")})
    m = cfg.masking
    check_ranges(m, {**dict.fromkeys(("token_mask_prob", "token_replace_prob", "token_random_prob",
                                      "frame_mask_prob", "frame_zero_prob", "frame_random_prob"), PROBABILITY),
                     "span_min": AT_LEAST_1}, "masking.")
    if m.span_max < m.span_min:
        raise ConfigError(f"masking.span_max={m.span_max} is below masking.span_min={m.span_min}")
    for a, b in (("token_replace_prob", "token_random_prob"), ("frame_zero_prob", "frame_random_prob")):
        if getattr(m, a) + getattr(m, b) > 1:
            raise ConfigError(f"masking.{a} + masking.{b} = {getattr(m, a) + getattr(m, b):g}: must be <= 1")
    validate_model_config(cfg.model)

def check_resumable(store: CheckpointStore) -> None:
    """CheckpointError if the run's checkpoints were all found damaged (only ``corrupt-*`` left): a
    rerun must not quietly start over from step 0 where training was lost."""
    if store.list():
        return
    corrupt = [n for n in storage.listdir(store.root) if n.startswith("corrupt-")]
    if corrupt:
        raise checkpoint.CheckpointError(
            f"every checkpoint of this run is damaged (moved aside in {store.root}: {', '.join(corrupt)}); "
            "stopping instead of starting over from step 0: put an intact checkpoint back, or delete those "
            "directories (or choose another run_name) to start afresh")


def check_same_run(cfg: PretrainConfig) -> None:
    """ConfigError if ``run_name`` names a run started on another data set or model: the same name
    resumes, and would quietly go on training on other data, or fail after Ray starts on a model of
    another shape."""
    try:
        earlier = manifest.read(storage.join(cfg.storage_path, cfg.run_name)) or {}
    except (OSError, ValueError):
        return  # no readable record: the checkpoints' own configs still guard the resume
    was = earlier.get("config") if earlier.get("kind") == "pretraining" else None
    if not isinstance(was, dict):
        return
    # as the manifest recorded them: credentials redacted (ctal.manifest.write), tuples as JSON lists
    now = redact(json.loads(json.dumps({"data": cfg.data, **{f"model.{k}": v for k, v in
                                                             dataclasses.asdict(cfg.model).items()}})))
    then = {"data": was.get("data"), **{f"model.{k}": v for k, v in (was.get("model") or {}).items()}}
    changed = [f"{k}={now[k]!r} (the run has {then[k]!r})" for k in now if k in then and then[k] != now[k]]
    if changed:
        raise ConfigError(f"run_name={cfg.run_name!r} names a run started with other settings: {', '.join(changed)}; "
                          "the same name resumes that run: give the same settings, or another --name")
