"""Typed configs: dataclasses loaded from YAML with dotted ``key=value`` overrides.

Every knob lives in a dataclass field. ``load_config`` merges YAML files in order, applies overrides,
and validates every key and value *before* any work starts: an unknown key or a value of the wrong
type raises ``ConfigError`` naming the key and what is allowed. This file is the schema; reading
YAML and overrides and checking values against field types is ``ctal.config_parsing``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

# the parsing machinery (torch-free); the names the stages import from here re-exported
from .config_parsing import (AT_LEAST_1, BELOW_1, NON_NEGATIVE, POSITIVE, ConfigError, Fusion, _merge,
                             check_ranges, from_dict, parse_overrides, read_yaml)
from .config_parsing import PROBABILITY, to_dict  # noqa: F401  (re-exported: the stages' import)

# Log-mel bins per frame: fixed by the Parquet contract (ctal.data's fbank column) and the model's
# audio input (the bins and their deltas: 2 x FBANK_DIM).
FBANK_DIM = 80


# Experiment trackers (ctal.tracking): none, or where runs also go besides the run directory.
Tracking = Literal["none", "mlflow", "wandb"]


@dataclass
class ModelConfig:
    """CTAL architecture (paper: hidden 768, 12 heads, FFN 3072; sizes are configs/*.yaml)."""
    vocab_size: int = 30000
    hidden_size: int = 768
    num_text_layers: int = 3
    num_audio_layers: int = 3
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    # "roberta": positions start after the padding index (RoBERTa); "bert": 0..L-1.
    text_position_style: Literal["roberta", "bert"] = "roberta"
    # The audio stream's input frame: set from the data set by every run (like vocab_size from its
    # tokenizer): 2 x FBANK_DIM for log-mel + delta, or audio_layers x the upstream's hidden size for
    # SSL features (features.frontend=ssl), whose kept layers a learned softmax weighting combines.
    audio_dim: int = 2 * FBANK_DIM
    audio_layers: int = 1
    max_audio_positions: int = 3000
    audio_causal: bool = False  # the released code's causal audio self-attention; off = paper
    fusion: Fusion = "ctal"
    orthogonality_weight: float = 1.0
    mlm_weight: float = 1.0
    acoustic_weight: float = 1.0
    # Local Hugging Face BERT/RoBERTa directory to initialize the text stream from (never downloads);
    # its config.json decides the text architecture (load_config and CTALConfig adopt it).
    text_init: Optional[str] = None
    # Local wav2vec2 / HuBERT / WavLM / data2vec-audio folder run inside the model on waveform data
    # (features.frontend=waveform), its kept layers (default the last) the audio stream's input; the
    # model's config then records the upstream's, and its weights travel with CTAL's (DIR need not exist
    # where a checkpoint loads).
    audio_upstream: Optional[str] = None
    audio_upstream_layers: Optional[list[int]] = None


@dataclass
class FeatureConfig:
    """The audio front end (stored with the data set). ``frontend``: "kaldi" (Kaldi fbank), "release"
    (the authors' librosa features, for their released weights; both ctal.features.FRONTENDS) or
    "ssl": the hidden states ``ssl_layers`` (0 = the CNN's projected output, k = transformer layer k;
    default the last) of the local wav2vec 2.0 / HuBERT / WavLM / data2vec-audio folder ``ssl_model``
    (ctal.upstream; never a hub id), run in preprocessing's actors with ``ssl_num_gpus`` each (a
    fraction shares a GPU; 0 = CPU) on batches of at most ``ssl_batch_seconds`` of audio; or
    "waveform": the decoded audio itself (``sample_rate`` mono, int16 PCM), for a model that runs
    its encoder inside (``model.audio_upstream``)."""
    sample_rate: int = 16000
    num_mel_bins: int = FBANK_DIM
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    dither: float = 0.0  # kaldi only
    frontend: Literal["kaldi", "release", "ssl", "waveform"] = "kaldi"
    ssl_model: Optional[str] = None
    ssl_layers: Optional[list[int]] = None
    ssl_num_gpus: float = 0.0
    # None: 60 s of audio per pass on a GPU, one utterance per pass on a CPU, where padded batches cost
    # more CPU than they save (docs/performance.md, SSL extraction)
    ssl_batch_seconds: Optional[float] = None

    def __post_init__(self):
        if self.frontend == "release" and self.dither:
            raise ConfigError(f"features.dither={self.dither}: the release front end has no dither "
                              "(kaldi only); drop it or use features.frontend=kaldi")
        if self.frontend == "ssl" and not self.ssl_model:
            raise ConfigError("features.frontend=ssl needs features.ssl_model=DIR: a local folder of a "
                              "wav2vec2, HuBERT, WavLM or data2vec-audio model")
        if self.frontend != "ssl":
            for key in ("ssl_model", "ssl_layers"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"features.{key} is for features.frontend=ssl, not "
                                      f"features.frontend={self.frontend}")
        if self.frontend in ("ssl", "waveform") and self.dither:
            raise ConfigError(f"features.dither={self.dither} is for features.frontend=kaldi")
        window_ms = 1000.0 * 2 / self.sample_rate if self.sample_rate > 0 else 0.0  # at least 2 samples
        window = (lambda v: window_ms <= v <= 1000.0, f"{window_ms:g} to 1000 ms (two samples to a second)")
        bins = (lambda v: v == FBANK_DIM,
                f"{FBANK_DIM} (the Parquet fbank column and the model's audio input are {FBANK_DIM} log-mel)")
        check_ranges(self, {"num_mel_bins": bins,
                            "sample_rate": (lambda v: 8000 <= v <= 48000, "8000 to 48000 Hz"),
                            "frame_length_ms": window, "frame_shift_ms": window, "dither": NON_NEGATIVE,
                            "ssl_num_gpus": NON_NEGATIVE, "ssl_batch_seconds": POSITIVE},
                     "features.")


@dataclass
class DataConfig:
    """Preprocessing: quarantine thresholds, tokenizer, shard sizes."""
    features: FeatureConfig = field(default_factory=FeatureConfig)
    min_duration_s: float = 0.2
    max_duration_s: float = 35.0
    silence_peak: float = 1e-4  # audio whose absolute peak is below this is "all silent"
    # A Hugging Face tokenizer folder, a ctal checkpoint or another data set (path or URI): their
    # tokenizer is used, one vocabulary across stages; None = train a byte-level BPE.
    tokenizer: Optional[str] = None
    # Applied to transcripts before tokenizing (ctal.tokenizer.TEXT_NORMALIZATIONS), saved with the
    # tokenizer; None: the one recorded with `tokenizer`, else "release" (the authors' rule).
    text_normalization: Optional[Literal["release", "lower", "none"]] = None
    vocab_size: int = 30000  # for the trained BPE (paper: 30k on LibriSpeech)
    max_text_tokens: int = 512
    rows_per_shard: int = 2000
    num_cpus_per_task: float = 1.0

    def __post_init__(self):
        check_ranges(self, {
            "min_duration_s": (lambda v: v >= 0, ">= 0 seconds"),
            "max_duration_s": (lambda v: v > self.min_duration_s, f"> min_duration_s={self.min_duration_s} seconds"),
            "silence_peak": (lambda v: 0 <= v < 1, "in [0, 1) (samples are in [-1, 1])"),
            # 256 byte symbols + the 5 specials: a smaller byte-level BPE cannot encode every text
            "vocab_size": (lambda v: v >= 261, ">= 261 (256 bytes + 5 specials)"),
            "max_text_tokens": (lambda v: v >= 3, ">= 3 (the two special tokens and at least one of the text)"),
            "rows_per_shard": AT_LEAST_1,
            "num_cpus_per_task": (lambda v: v > 0, "> 0 (a fraction such as 0.5 shares a CPU)")})


@dataclass
class MaskingConfig:
    """Pretraining masks (paper: 15 % tokens 80/10/10; 15 % frames in spans of 20-50, 80/10/10)."""
    token_mask_prob: float = 0.15
    token_replace_prob: float = 0.8
    token_random_prob: float = 0.1
    frame_mask_prob: float = 0.15
    # span lengths in 10 ms frames (ctal.masking.SPAN_FRAME_MS): kept in milliseconds on SSL features
    span_min: int = 20
    span_max: int = 50
    frame_zero_prob: float = 0.8
    frame_random_prob: float = 0.1
    # zero / random / keep drawn for every chosen frame, random frames from the same utterance (the
    # release's), or once per span with random frames from the batch ("span")
    frame_decide: Literal["frame", "span"] = "frame"


@dataclass
class PretrainConfig:
    """CTAL pretraining (paper defaults: lr 5e-5, 7 % warmup, linear decay, clip 1.0, small batches)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    data: str = ""  # Parquet directory written by pipelines/preprocess.py
    split: str = "train"
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.07
    max_steps: int = 1000
    # Utterances per optimizer step, all workers together: the release's global batch (8 / 6 / 4 for
    # tiny / base / large). Each worker takes batch_size / (num_workers x grad_accum_steps) per micro-step.
    batch_size: int = 8
    max_frames_per_batch: int = 0  # > 0: batch by a frame budget per worker micro-step instead (batch_size unused)
    halve_batch_above_frames: int = 2000  # a batch whose longest utterance is longer holds half (release); 0: never
    bucket_pool_rows: int = 1024  # rows read and length-bucketed together per worker (memory bound)
    grad_accum_steps: int = 1
    # Processes per worker that read and build its batches (sharing each pool's reading); 0: one
    # thread in the worker, one core's worth. Give the worker the cores: cpus_per_worker >= this + 1.
    feed_workers: int = 0
    clip_grad_norm: float = 1.0
    max_frames: int = 3000  # learned audio positions stop at 3000
    long_utterances: Literal["crop", "drop"] = "crop"  # over max_frames: cropped, or dropped (the release)
    seed: int = 0
    bf16: bool = True  # autocast on GPU only
    # torch.compile each Transformer layer; batches are padded to bucketed lengths so shapes repeat
    compile: bool = False
    gradient_checkpointing: bool = False  # recompute each layer in the backward: long audio in less memory
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    num_workers: int = 2
    use_gpu: Literal["auto", "true", "false"] = "auto"
    cpus_per_worker: float = 1.0
    shrink_cpus_per_worker: bool = False  # over-asking: scale per-worker CPUs down instead of failing
    max_failures: int = 1
    storage_path: str = "runs/pretrain"
    run_name: str = "ctal-pretrain"
    tracking: Tracking = "none"  # rank 0 logs config, step metrics and checkpoint URIs there (ctal.tracking)
    tracking_uri: Optional[str] = None  # None: a local store in the run directory; http(s)://: a server
    share: bool = False  # checkpoints without absolute paths or the host name, to hand on (docs/tracking.md)


@dataclass
class FinetuneConfig:
    """Fine-tuning one downstream task (paper: AdamW lr 1e-5, ~10 epochs, batch 2 / 8 for speaker)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    task: Literal["emotion", "sentiment", "speaker"] = "sentiment"
    data: str = ""
    init: Optional[str] = None  # pretraining checkpoint dir; None = fresh initialization
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    epochs: int = 10
    batch_size: int = 2
    # > 0: length-bucketed batches of at most this many padded frames (count x longest, after
    # cropping to max_frames; batch_size unused), the dev/test batches too
    max_frames_per_batch: int = 0
    freeze_layers: int = 0  # lowest text+audio layers kept frozen
    # model.audio_upstream: frozen (no gradient, eval mode) or fine-tuned at upstream_lr (None: lr),
    # its CNN feature encoder frozen all the same unless freeze_feature_encoder=false; activation
    # checkpointing in its layers with upstream_checkpointing
    freeze_upstream: bool = True
    upstream_lr: Optional[float] = None
    freeze_feature_encoder: bool = True
    upstream_checkpointing: bool = False
    max_frames: int = 3000
    clip_grad_norm: float = 1.0
    fold: Optional[str] = None  # emotion: the held-out session; None = all five folds
    seed: int = 0
    bf16: bool = True  # autocast on GPU only
    # Train on a nested, class-stratified subset of each fold's training rows (ctal.tasks.label_subset),
    # chosen by label_subset_seed alone so every model seed and cell sees the same rows.
    label_fraction: float = 1.0
    label_subset_seed: int = 0
    tracking: Tracking = "none"  # sweeps: one tracker run per trial (ctal.distributed.tracking)
    tracking_uri: Optional[str] = None  # None: a local store in the sweep's directory; http(s)://: a server
    share: bool = False  # checkpoints without absolute paths or the host name, to hand on (docs/tracking.md)


@dataclass
class TrackingConfig:
    """Tracking for a recipe without a config of its own (pipelines/evaluate.py's key=value)."""
    tracking: Tracking = "none"
    tracking_uri: Optional[str] = None


@dataclass
class SweepConfig:
    """A Ray Tune sweep of fine-tuning (configs/sweep.yaml); ranges and the fit with the search space
    are checked by ``ctal.search_space.check_sweep``."""
    search: Literal["optuna", "random", "grid"] = "optuna"
    scheduler: Literal["asha", "fifo"] = "asha"
    num_samples: Optional[int] = None  # None: 1 for grid (Ray repeats the grid this often), else 8
    gpus_per_trial: float = 0.0  # fractions share a GPU
    cpus_per_trial: float = 1.0
    workers_per_trial: int = 1  # > 1: a TorchTrainer (DDP) inside each trial
    max_concurrent: Optional[int] = None
    storage: str = "runs/tune"  # a directory or a URI (s3://, gs://, file://)
    name: Optional[str] = None  # default: ctal-<task>
    grace_period: int = 1  # ASHA: epochs before the first cut
    reduction_factor: int = 3  # ASHA: keep the best 1/rf at each rung
    seed: int = 0  # of the search algorithm (a trial's own seed is FinetuneConfig.seed)
    verbose: int = 1  # Tune's console verbosity, 0..3


def load_config(cls: type, files: list[str | Path] = (), overrides: list[str] = (),
                return_adopted: bool = False) -> Any:
    """Merge YAML ``files`` in order, then ``overrides``; validate into dataclass ``cls``.

    A ``model.text_init=DIR`` then decides the text architecture: DIR's config.json values replace
    what the files say, and an override that contradicts DIR is a ConfigError naming both values.
    ``return_adopted=True`` returns ``(cfg, adopted)``, adopted = {dotted key: (before, DIR's value)}
    for every value text_init changed, so a recipe can say so.
    """
    merged: dict = {}
    for f in files:
        data = read_yaml(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{f}: expected a mapping at the top level")
        merged = _merge(merged, data)
    given = parse_overrides(list(overrides))
    cfg = from_dict(cls, _merge(merged, given))
    adopted = _adopt_text_init(cfg, given)
    return (cfg, adopted) if return_adopted else cfg


def validate_model_config(m: ModelConfig, prefix: str = "model.") -> None:
    """The architecture's ranges, for pretraining and fine-tuning alike: sizes, the heads dividing
    the hidden size, dropout probabilities, audio frames that split into the kept layers."""
    check_ranges(m, {**dict.fromkeys(("vocab_size", "hidden_size", "num_text_layers", "num_audio_layers",
                                      "num_attention_heads", "intermediate_size", "max_position_embeddings",
                                      "type_vocab_size", "max_audio_positions"), AT_LEAST_1),
                     "hidden_dropout_prob": BELOW_1, "attention_probs_dropout_prob": BELOW_1,
                     "layer_norm_eps": POSITIVE, "pad_token_id": NON_NEGATIVE,
                     **dict.fromkeys(("orthogonality_weight", "mlm_weight", "acoustic_weight"), NON_NEGATIVE)},
                 prefix)
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"{prefix}hidden_size={m.hidden_size} is not a multiple of "
                          f"{prefix}num_attention_heads={m.num_attention_heads}: each head takes an equal share")
    if m.audio_layers < 1 or m.audio_dim % m.audio_layers:
        raise ConfigError(f"{prefix}audio_dim={m.audio_dim} does not split into {prefix}audio_layers="
                          f"{m.audio_layers} equal layers (both come from the data set)")
    from transformers.activations import ACT2FN  # (torch: only once a run is checked)

    if m.hidden_act not in ACT2FN:
        raise ConfigError(f"{prefix}hidden_act={m.hidden_act!r} is not one of {sorted(ACT2FN)}")


def validate_finetune_config(cfg: FinetuneConfig) -> None:
    """A fine-tuning run's ranges (the data set and the protocol are checked by ctal.finetune.prepare)."""
    check_ranges(cfg, {"lr": POSITIVE, "weight_decay": NON_NEGATIVE, "warmup_ratio": BELOW_1,
                       "epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "freeze_layers": NON_NEGATIVE,
                       "max_frames": AT_LEAST_1, "max_frames_per_batch": NON_NEGATIVE, "clip_grad_norm": NON_NEGATIVE,
                       "label_fraction": (lambda v: 0 < v <= 1, "in (0, 1]")})
    validate_model_config(cfg.model)
    if cfg.upstream_lr is not None and not cfg.upstream_lr > 0:
        raise ConfigError(f"upstream_lr={cfg.upstream_lr} must be > 0 (or unset: lr)")
    if not cfg.model.audio_upstream:
        for key, default in (("upstream_lr", None), ("freeze_upstream", True), ("upstream_checkpointing", False)):
            if getattr(cfg, key) != default:
                raise ConfigError(f"{key}={getattr(cfg, key)} is for a model with model.audio_upstream=DIR "
                                  "(fine-tuning on features.frontend=waveform data)")
    m = cfg.model  # with init the checkpoint's layers count: ctal.finetune_model.freeze checks those
    if not cfg.init and cfg.freeze_layers > min(m.num_text_layers, m.num_audio_layers):
        raise ConfigError(f"freeze_layers={cfg.freeze_layers}, but the model has {m.num_text_layers} text and "
                          f"{m.num_audio_layers} audio layers")


def _adopt_text_init(cfg: Any, given: dict, prefix: str = "") -> dict:
    """Apply text_init to every ModelConfig inside ``cfg`` (in place); ``given`` holds the overrides."""
    if not isinstance(cfg, ModelConfig):
        adopted = {}
        for f in dataclasses.fields(cfg):
            value, sub = getattr(cfg, f.name), given.get(f.name)
            if dataclasses.is_dataclass(value):
                adopted.update(_adopt_text_init(value, sub if isinstance(sub, dict) else {},
                                                prefix + f.name + "."))
        return adopted
    if not cfg.text_init:
        return {}
    from .text_init import adopt_text_init  # transformers: only when a config names a text_init

    try:
        values = adopt_text_init(vars(cfg), explicit=given, prefix=prefix)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    adopted = {prefix + k: (getattr(cfg, k), v) for k, v in values.items() if getattr(cfg, k) != v}
    for k, v in values.items():
        setattr(cfg, k, v)
    return adopted
