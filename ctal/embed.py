"""Fused CTAL embeddings for new audio+text pairs (no Ray): featurize → batch → `model.embed`.

Bad rows (missing/corrupt audio, missing transcript, ...) are returned with their reason, never fatal.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import torch

from . import checkpoint as ctal_checkpoint
from . import checkpoint_data
from . import storage
from .batching import collate
from .config import DataConfig
from .featurize import check_upstream_hash, featurize_rows, load_upstream
from .finetune import position_limits
from .model import CTALForSequenceClassification, masked_mean
from .variants import FUSION_VARIANTS
from .tokenizer import TOKENIZER_FILES, load_tokenizer, read_normalization, tokenizer_hash


def find_tokenizer(checkpoint: str | Path, tokenizer: Optional[str | Path] = None) -> Path:
    """``tokenizer`` if given, else the tokenizer saved with a (local) checkpoint: its ``tokenizer/``,
    or for one fold's model directory the ``tokenizer/`` of the checkpoint it belongs to."""
    found = Path(tokenizer) if tokenizer else checkpoint_data.tokenizer_dir(checkpoint)
    if found is None or not any((found / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer in {tokenizer or checkpoint}; pass the data set's tokenizer dir")
    return found


@torch.no_grad()
def embed_rows(model: CTALForSequenceClassification, rows: list[dict], tokenizer, *,
               data_cfg: Optional[DataConfig] = None, batch_size: int = 16, device: str = "cpu",
               max_frames: int = 3000, streams: bool = False, upstream=None) -> tuple[pa.Table, list[dict]]:
    """Manifest rows → (table of id + embedding [+ text_vector, audio_vector], bad rows).
    ``data_cfg``: featurizer and text normalization (``load_for_embedding`` gives the checkpoint's);
    for SSL features its upstream (``features.ssl_model``, checked by ``load_for_embedding``) is
    loaded here unless ``upstream`` is given.

    With `streams`, each stream the model's fusion variant runs adds the mean of its final states,
    computed on that variant's own path: no text_vector for audio_only, no audio_vector for text_only,
    and audio without cross-attention where the variant has none (late_concat, audio_only).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    data_cfg = data_cfg or DataConfig()
    model = model.to(device).eval()
    max_tokens = position_limits(model)["max_tokens"]
    if model.upstream is not None:  # waveforms: the crop in samples
        max_frames = model.upstream.samples_for(max_frames)
    good, bad = [], []
    if data_cfg.features.frontend == "ssl" and upstream is None:
        upstream = load_upstream(data_cfg.features, device=device)
    for row, (record, problem) in zip(rows, featurize_rows(rows, tokenizer, data_cfg, upstream)):
        if record is not None and len(record["input_ids"]) > max_tokens:
            record, problem = None, {"id": record["id"], "audio_path": str(row.get("audio_path")),
                                     "reason": "text_too_long",
                                     "detail": f"{len(record['input_ids'])} tokens, the model has positions "
                                               f"for {max_tokens}"}
        (good if record is not None else bad).append(record if record is not None else problem)
    variant = FUSION_VARIANTS[model.config.fusion]
    columns = ["embedding"] + [name for name, runs in (("text_vector", variant.text),
                                                      ("audio_vector", variant.audio)) if streams and runs]
    ids, out = [], {name: [] for name in columns}
    for start in range(0, len(good), batch_size):
        chunk = good[start:start + batch_size]
        batch = collate(chunk, max_frames=max_frames, pad_token_id=model.config.pad_token_id,
                        frontend=data_cfg.features.frontend)
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        batch["frames"], batch["frame_mask"] = model.audio_input(batch["frames"], batch["frame_mask"])
        text, audio = model.stream_states(batch["input_ids"], batch["attention_mask"], batch["frames"],
                                          batch["frame_mask"])
        fused, _ = model.fusion(text, batch["attention_mask"], audio, batch["frame_mask"])  # = model.embed
        vectors = {"embedding": fused}
        if text is not None:
            vectors["text_vector"] = masked_mean(text, batch["attention_mask"])
        if audio is not None:
            vectors["audio_vector"] = masked_mean(audio, batch["frame_mask"])
        ids += [r["id"] for r in chunk]
        for name in columns:
            out[name] += list(vectors[name].float().cpu().numpy())
    H = model.config.hidden_size
    width = {"embedding": model.fusion.dense.out_features, "text_vector": H, "audio_vector": H}
    vec = lambda name: pa.array([np.asarray(x, np.float32) for x in out[name]], pa.list_(pa.float32(), width[name]))
    return pa.table({"id": pa.array(ids, pa.string()), **{name: vec(name) for name in columns}}), bad


def load_for_embedding(checkpoint: str | Path, tokenizer: Optional[str | Path] = None,
                       ssl_model: Optional[str | Path] = None):
    """(model, tokenizer, data_cfg) of a fine-tuned checkpoint (a path or URI) with one model, or of
    one fold's model directory of a checkpoint with several. ``data_cfg`` is the preprocessing the
    checkpoint's training data went through (featurizer, front end, max_text_tokens, recorded with
    the checkpoint) and the text normalization saved with the tokenizer, so new audio and text
    look like what the model was trained on. For SSL features that is the upstream recorded with the
    checkpoint, or ``ssl_model``, a copy of it elsewhere: either must hash as recorded.

    A pretraining checkpoint is refused (ValueError): its fusion head was never trained, so its
    "embeddings" would be a random projection, different on every load. Damaged files raise
    CheckpointError naming the file."""
    local = ctal_checkpoint.local_copy(checkpoint)
    if (local / ctal_checkpoint.STATE_FILE).is_file():
        state = ctal_checkpoint.verify(local)  # every file against its sha256, and readable
        if state.get("kind") == "pretraining":
            raise ValueError(f"{checkpoint} is a pretraining checkpoint: it has no trained fusion head, so it "
                             f"gives no defined embedding; fine-tune it first (pipelines/tune_finetune.py "
                             f"--init {checkpoint}) and embed with the fine-tuned checkpoint")
        dirs = ctal_checkpoint.model_dirs(local, state)
        if len(dirs) > 1:
            raise ValueError(f"{checkpoint} holds {len(dirs)} models ({', '.join(dirs)}); pass one fold's "
                             f"directory, e.g. {storage.join(checkpoint, next(iter(dirs)))}")
        local = next(iter(dirs.values()))
    elif (local.parent / ctal_checkpoint.STATE_FILE).is_file():  # one fold's directory
        ctal_checkpoint.verify(local.parent)
    else:  # a bare model directory (save_pretrained): nothing recorded to check it against
        ctal_checkpoint.check_model_dir(local)
    model, info = CTALForSequenceClassification.from_pretrained(local, output_loading_info=True)
    if info["missing_keys"]:  # a bare pretraining model directory: the same refusal
        raise ValueError(f"{checkpoint} is not a fine-tuned checkpoint (no trained {sorted(info['missing_keys'])[0]} "
                         "among others): it gives no defined embedding; fine-tune it first")
    tok_dir = find_tokenizer(local, tokenizer)
    if tokenizer and checkpoint_data.tokenizer_dir(local) is not None:  # another tokenizer: same ids?
        checkpoint_data.check_tokenizer(local, tokenizer_hash(tok_dir),
                                        fix=f"drop --tokenizer to use the checkpoint's own ({tokenizer} differs)")
    # A tokenizer without a recorded normalization predates it: its text was tokenized as read.
    data_cfg = replace(checkpoint_data.trained_data_config(local),
                       text_normalization=read_normalization(tok_dir) or "none")
    if ssl_model and data_cfg.features.frontend != "ssl":
        raise ValueError(f"--ssl-model {ssl_model}: {checkpoint} was trained on features.frontend="
                         f"{data_cfg.features.frontend} frames, not on an SSL upstream's")
    if data_cfg.features.frontend == "ssl":  # featurized with the checkpoint's upstream, or refused
        from .upstream import inspect_upstream

        fc = replace(data_cfg.features, ssl_model=str(ssl_model or data_cfg.features.ssl_model))
        data_cfg = replace(data_cfg, features=fc)
        check_upstream_hash(fc.ssl_model, inspect_upstream(fc.ssl_model, fc.ssl_layers).hash,
                            checkpoint_data.trained_upstream(local) or {"hash": ""})
    return model, load_tokenizer(tok_dir), data_cfg
