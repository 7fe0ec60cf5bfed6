"""The model a fine-tuning run trains: its ``init`` checkpoint checked against the data set (front end,
tokenizer, the upstream it ran), the encoder a model runs on waveform data (``model.audio_upstream``),
and the task model built from either and frozen as the config says.

``ctal.finetune.prepare`` runs the checks once before Ray starts; ``ctal.finetune.finetune`` builds a
model per fold here.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from ctal import checkpoint as checkpoints
from ctal import checkpoint_data
from ctal.config import ConfigError, FinetuneConfig, ModelConfig, to_dict
from ctal.data import TaskData
from ctal.loading import ARCHITECTURE_FIELDS
from ctal.model import CTALConfig, CTALForSequenceClassification
from ctal.tasks import Task


def check_init(init: str | Path, data: TaskData, upstream: Optional[dict] = None) -> Path:
    """The local copy of checkpoint ``init`` (a URI is downloaded once per node), after checking that
    it was trained on the data set's front end and with its tokenizer. Recipes call it before Ray
    starts, so a mismatch fails in seconds with the command that preprocesses the data for this
    checkpoint. ``upstream`` (``model_upstream``): the encoder a model runs on waveform data, whose
    SSL features (same hash, same layers) the checkpoint must have been pretrained on."""
    local = checkpoints.local_copy(init)
    if upstream is not None and checkpoint_data.trained_frontend(local) == "waveform":  # its upstream inside
        theirs = checkpoint_data.trained_upstream(local) or {}
        if (theirs.get("hash"), theirs.get("layers")) != (upstream["hash"], upstream["layers"]):
            raise ConfigError(f"model.audio_upstream: init={init} runs its own upstream ({theirs.get('architecture')} "
                              f"sha256 {str(theirs.get('hash'))[:12]}…, layers {theirs.get('layers')}), not "
                              f"{upstream['architecture']} sha256 {upstream['hash'][:12]}…, layers {upstream['layers']}; "
                              "give that folder and those layers")
    elif upstream is not None:
        try:
            checkpoint_data.check_frontend(local, {"features": {"frontend": "ssl"}, "upstream": upstream})
        except ValueError as e:
            raise ConfigError(f"model.audio_upstream: {e}; pretrain on features.frontend=ssl features of this "
                              "upstream and layers (or give the upstream and layers the checkpoint was trained on)") from None
        checkpoint_data.check_tokenizer(local, data.tokenizer.hash)
        return local
    report = data.report
    command = (f"python pipelines/preprocess.py --corpus {report.get('corpus', 'CORPUS')} "
               f"--root {report.get('root', 'ROOT')} --out {data.data_dir}-{{}} tokenizer={init}")
    wanted = checkpoint_data.trained_frontend(local)
    checkpoint_data.check_frontend(local, report, fix=(
        f"preprocess the data with the checkpoint's front end and tokenizer: "
        f"{command.format(wanted)} {checkpoint_data.preprocess_options(local)}"))
    checkpoint_data.check_tokenizer(local, data.tokenizer.hash,
                                fix=f"re-tokenize the data with the checkpoint's tokenizer: {command.format('retok')}")
    return local


# What an init checkpoint fixes of the model: its architecture, but for what the data decide (the
# vocabulary, the audio input), which check_init and the tokenizer check hold to the data set.
INIT_FIXES = tuple(f for f in ARCHITECTURE_FIELDS if f not in ("vocab_size", "audio_dim", "audio_layers"))


def check_architecture(cfg: FinetuneConfig, local: Path) -> None:
    """With ``init`` the model's architecture is the checkpoint's: a ``model.*`` size set to another
    value than the checkpoint's is refused naming the key (it used to be dropped without a word). A
    value left at its default is not told from one given equal to it, so only changed ones are seen."""
    path = Path(local) / "config.json"
    if not path.is_file():  # from_pretrained names what is missing
        return
    saved, default = json.loads(path.read_text()), ModelConfig()
    for key in INIT_FIXES:
        value = getattr(cfg.model, key)
        if value != getattr(default, key) and key in saved and value != saved[key]:
            raise ConfigError(f"model.{key}={value}, but init={cfg.init} has {key}={saved[key]}: a checkpoint "
                              f"fixes the architecture it was trained with; drop model.{key} (or the size "
                              "config that sets it), or give a checkpoint of that size")


def resolve_model_upstream(cfg: FinetuneConfig, data: TaskData) -> tuple[FinetuneConfig, Optional[dict]]:
    """Waveform data and ``model.audio_upstream`` go together; the folder made absolute and, unset, its
    layers those ``init`` was pretrained on (else the last). Returns the config and ``model_upstream``
    of it (checked once: hashing a large encoder's weights takes seconds). ConfigError naming the key."""
    m = cfg.model
    if data.frontend == "waveform" and not m.audio_upstream:
        raise ConfigError(f"data={cfg.data} holds waveforms (features.frontend=waveform): give the encoder to "
                          "run on them, model.audio_upstream=DIR (a local wav2vec2/HuBERT/WavLM/data2vec-audio folder)")
    if not m.audio_upstream:
        return cfg, None
    if data.frontend != "waveform":
        raise ConfigError(f"model.audio_upstream={m.audio_upstream} runs on waveforms, but data={cfg.data} holds "
                          f"features.frontend={data.frontend} frames; preprocess with features.frontend=waveform")
    layers = m.audio_upstream_layers
    if layers is None and cfg.init:
        layers = (checkpoint_data.trained_upstream(checkpoints.local_copy(cfg.init)) or {}).get("layers")
    m = replace(m, audio_upstream=str(Path(m.audio_upstream).expanduser().resolve()), audio_upstream_layers=layers)
    cfg = replace(cfg, model=m)
    return cfg, model_upstream(cfg)  # the folder and layers checked here, before Ray


def model_upstream(cfg: FinetuneConfig) -> Optional[dict]:
    """The UpstreamInfo (as a dict) of ``model.audio_upstream`` with its kept layers, or None."""
    if not cfg.model.audio_upstream:
        return None
    from ctal.upstream import UpstreamError, inspect_upstream

    try:
        return inspect_upstream(cfg.model.audio_upstream, cfg.model.audio_upstream_layers).to_dict()
    except UpstreamError as e:  # its messages name the SSL front end's keys
        msg = str(e).replace("features.ssl_model", "model.audio_upstream").replace(
            "features.ssl_layers", "model.audio_upstream_layers")
        raise ConfigError(msg) from None


def build_model(cfg: FinetuneConfig, task: Task, classes: Optional[list[str]], data: TaskData):
    """A task model from `cfg.init` (pretraining or fine-tuned checkpoint, path or URI; its tokenizer
    must be the data set's) or freshly initialized."""
    num_labels = task.num_labels(classes)
    head = dict(num_labels=num_labels, problem_type=task.problem_type,
                id2label={i: str(c) for i, c in enumerate(classes or ["score"])})
    tok = data.tokenizer
    torch.manual_seed(cfg.seed)  # fresh weights (and a pretrained model's new head) depend on the seed only
    if cfg.init:
        init = check_init(cfg.init, data, model_upstream(cfg))
        m = cfg.model
        up = {"audio_upstream": m.audio_upstream, "audio_upstream_layers": m.audio_upstream_layers} \
            if m.audio_upstream and checkpoint_data.trained_frontend(init) != "waveform" else {}
        model = CTALForSequenceClassification.from_pretrained(
            init, fusion=m.fusion, orthogonality_weight=m.orthogonality_weight,
            hidden_dropout_prob=m.hidden_dropout_prob,
            attention_probs_dropout_prob=m.attention_probs_dropout_prob, **up, **head)
        if tok.vocab_size > model.config.vocab_size:
            raise ValueError(f"init={cfg.init} has vocab_size={model.config.vocab_size} but the data's "
                             f"tokenizer has {tok.vocab_size} tokens")
    else:
        model_cfg = to_dict(cfg.model)
        # A fresh model takes its vocabulary from the data set's tokenizer, its audio input from its frames.
        model_cfg.update(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, **data.audio_format.model_dims())
        model = CTALForSequenceClassification(CTALConfig(**model_cfg, **head))
    freeze(model, cfg)
    return model


def freeze(model, cfg: FinetuneConfig) -> None:
    """Freeze both streams' embeddings and their lowest ``freeze_layers`` layers (the embeddings feed
    them), and the upstream as ``freeze_upstream`` / ``freeze_feature_encoder`` say."""
    if model.upstream is not None:
        model.upstream.set_trainable(cfg.freeze_upstream, cfg.freeze_feature_encoder, cfg.upstream_checkpointing)
    n = cfg.freeze_layers
    n_text, n_audio = len(model.text.encoder.layer), len(model.audio.encoder.layer)
    if not 0 <= n <= min(n_text, n_audio):
        raise ValueError(f"freeze_layers={n}, but the model has {n_text} text and {n_audio} audio layers")
    if n == 0:
        return
    frozen = [model.text.embeddings, model.audio.embeddings,
              *model.text.encoder.layer[:n], *model.audio.encoder.layer[:n]]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
