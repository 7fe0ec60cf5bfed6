"""The authors' released checkpoints (CTAL-Base, CTAL-Large) → a ctal-ray pretraining checkpoint.

A release checkpoint is one ``torch.save`` dict, as the release's ``Runner.save_model`` writes it:
``semantic_model`` (a Hugging Face RobertaForMaskedLM state dict), ``acoustic_model`` (their masked
acoustic model), ``Optimizer`` (``optimizer.state_dict()``), ``Global_step`` and ``Settings`` =
{``Config``: the pretraining YAML, ``Paras``: an ``argparse.Namespace``}. ``load_release_checkpoint``
reads it with torch's ``weights_only`` unpickler, allowing ``argparse.Namespace`` and, by name only,
the few classes of the release's own training code its optimizer state holds (``RELEASE_CLASSES``:
BertAdam's and Lamb's schedule objects, apex's loss scalers). Those become ``ReleaseRecord``s: inert
stand-ins that keep the pickled state as data; nothing of the release is imported or run. A file that
needs any other global is refused before any of it is unpickled, naming the global. Only the weights,
``Settings`` and ``Global_step`` are used; ``Optimizer`` and anything else is dropped (``dropped``).

``convert_release`` maps the two state dicts onto ``CTALForPretraining`` (../shared/RELEASE.md's key
table: RoBERTa and encoder names one to one; the audio token-type row every frame adds is folded
into the frame projection's bias; ``position_ids`` buffers are dropped, positions are computed; the
MLM decoder is tied to the word embeddings, as ours is), strictly: every source tensor used, every
parameter filled, every shape right and every value finite, else refused naming the key, before the
model is allocated and before anything is written (shapes are checked against a model on the meta
device). The result is an ordinary ``ctal.checkpoint`` pretraining checkpoint, recorded as trained
on ``features.frontend=release`` frames, with the release's byte-level BPE as its tokenizer.
"""
from __future__ import annotations

import argparse
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Optional

import torch

from . import checkpoint, storage
from .checkpoint import STATE_FILE, CheckpointError, Part
from .model import CTALConfig, CTALForPretraining
from .tokenizer import (TOKENIZER_FILES, load_tokenizer, read_normalization, save_normalization,
                        tokenizer_hash, tokenizer_info)

ALLOWED_GLOBALS = (argparse.Namespace,)  # Settings["Paras"]; tensors and containers need none
# The release's own classes its Optimizer entry pickles (code/m2p_optimization.py's schedules, which
# BertAdam and Lamb keep in every param group; the loss scalers of apex's FP16_Optimizer state):
# read by name as inert ReleaseRecords, never imported.
RELEASE_CLASSES = (*(f"m2p_optimization.{n}" for n in (
    "ConstantLR", "WarmupConstantSchedule", "WarmupLinearSchedule", "WarmupCosineSchedule",
    "WarmupCosineWithHardRestartsSchedule", "WarmupCosineWithWarmupRestartsSchedule")),
    "apex.fp16_utils.loss_scaler.LossScaler", "apex.fp16_utils.loss_scaler.DynamicLossScaler")
REQUIRED_ENTRIES = ("semantic_model", "acoustic_model", "Settings")
USED_ENTRIES = (*REQUIRED_ENTRIES, "Global_step")  # everything else (Optimizer) is dropped
FRONTEND = "release"  # the released weights were trained on the release's librosa features

# What RobertaConfig assumes where the release's YAML is silent (it builds its configs from them).
ROBERTA_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
                    "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512,
                    "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 1, "vocab_size": 50265,
                    "position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False}
# Our model has one value of these for both streams.
SHARED_FIELDS = ("hidden_size", "num_attention_heads", "intermediate_size", "hidden_act",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps")

# (release prefix, ctal-ray prefix), the first match wins; release keys are "<model>.<name>".
RENAMES = (
    ("semantic_model.roberta.embeddings.", "text.embeddings."),
    ("semantic_model.roberta.encoder.layer.", "text.encoder.layer."),
    ("semantic_model.lm_head.dense.", "mlm_head.dense."),
    ("semantic_model.lm_head.layer_norm.", "mlm_head.layer_norm."),
    ("semantic_model.lm_head.bias", "mlm_head.bias"),
    ("acoustic_model.acoustic.embeddings.dense.", "audio.embeddings.projection."),
    ("acoustic_model.acoustic.embeddings.position_embeddings.", "audio.embeddings.position_embeddings."),
    ("acoustic_model.acoustic.embeddings.LayerNorm.", "audio.embeddings.LayerNorm."),
    ("acoustic_model.acoustic.encoder.layer.", "audio.encoder.layer."),
    ("acoustic_model.am_head.dense.", "acoustic_head.dense."),
    ("acoustic_model.am_head.layer_norm.", "acoustic_head.layer_norm."),
    ("acoustic_model.am_head.decoder.weight", "acoustic_head.decoder.weight"),
    ("acoustic_model.am_head.bias", "acoustic_head.decoder.bias"),
)
DROPPED = ("semantic_model.roberta.embeddings.position_ids", "acoustic_model.acoustic.embeddings.position_ids")
AUDIO_TOKEN_TYPE = "acoustic_model.acoustic.embeddings.token_type_embeddings.weight"
AUDIO_PROJECTION_BIAS = "acoustic_model.acoustic.embeddings.dense.bias"
WORD_EMBEDDINGS = "semantic_model.roberta.embeddings.word_embeddings.weight"
# Aliases the release's state dicts carry of tensors mapped above (Hugging Face ties the LM decoder
# to the word embeddings and links each head's decoder bias to its bias): checked equal, not mapped.
ALIASES = {"semantic_model.lm_head.decoder.weight": WORD_EMBEDDINGS,
           "semantic_model.lm_head.decoder.bias": "semantic_model.lm_head.bias",
           "acoustic_model.am_head.decoder.bias": "acoustic_model.am_head.bias"}
TIED = "mlm_head.decoder.weight"  # ours is the word embeddings too


class ReleaseFormatError(ValueError):
    """A file that is not a release checkpoint ctal-ray can convert exactly; the message names why."""


def _name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


class ReleaseRecord:
    """An object of the release's training code (a schedule, a loss scaler), read as data: the class's
    name (``release_class``) and what the pickle gave it (``state``, ``args``). The unpickler may only
    create one and hand it its state; no code of the release is imported and no method of it runs."""
    release_class = ""

    def __init__(self, *args):  # a REDUCE of the class with arguments: kept, not interpreted
        self.args = args

    def __setstate__(self, state):  # BUILD: kept whole, so it can set no other attribute
        self.state = state

    def __repr__(self) -> str:
        return f"<record of {self.release_class}>"


# One stand-in class per name, registered under that name for torch's weights_only unpickler.
RECORDS = {name: type(name.rsplit(".", 1)[1], (ReleaseRecord,), {"release_class": name, "__module__": __name__})
           for name in RELEASE_CLASSES}


def load_release_checkpoint(path: str | Path) -> dict:
    """The dict the authors' ``torch.save`` wrote, on the CPU, loaded with ``weights_only=True``:
    ``argparse.Namespace`` and the ``RELEASE_CLASSES`` (as ``ReleaseRecord``s) allowed, nothing else.
    Tensors of a zip-format file are memory-mapped, so the dropped optimizer state is never read.
    ReleaseFormatError names any other global the file needs, says why a file is unreadable, or
    names the entries it lacks."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"release checkpoint {path} does not exist (download CTAL-Base from the "
                                "authors' README yourself; nothing is downloaded here)")
    allowed = {_name(t) for t in ALLOWED_GLOBALS} | set(RECORDS)
    refusal = (f"a release checkpoint needs only {', '.join(_name(t) for t in ALLOWED_GLOBALS)} and the "
               "release's optimizer classes (m2p_optimization.*, apex's loss scalers): refusing it")
    try:  # reads the pickle's opcodes without running them (zip-format files, torch >= 1.6)
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (RuntimeError, ValueError):
        needed = set()  # an older format: torch.load below refuses what is not allowed
    if needed - allowed:
        raise ReleaseFormatError(f"{path} needs {', '.join(sorted(needed - allowed))} to load; {refusal}")
    try:
        with torch.serialization.safe_globals([*ALLOWED_GLOBALS, *((t, n) for n, t in RECORDS.items())]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found is None:
            # (torch's own message suggests weights_only=False: not repeated here)
            raise ReleaseFormatError(f"{path} is not a torch.save checkpoint readable with "
                                     "weights_only=True") from None
        raise ReleaseFormatError(f"{path} needs {found.group(1)} to load; {refusal}") from None
    except Exception as e:  # empty, text, truncated: the restricted unpickler ran nothing, say why
        raise ReleaseFormatError(f"{path} is not a torch.save checkpoint ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    missing = [k for k in REQUIRED_ENTRIES if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ReleaseFormatError(f"{path} is not a CTAL release checkpoint: no {', '.join(missing)} "
                                 f"(has {sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__})")
    return ckpt


def _records(obj, depth: int = 0) -> list[str]:
    """The release classes of the ReleaseRecords inside ``obj`` (dicts, lists and tuples walked)."""
    if isinstance(obj, ReleaseRecord):
        return [obj.release_class]
    if depth > 8:
        return []
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return [name for item in items for name in _records(item, depth + 1)]


def dropped(ckpt: dict) -> list[str]:
    """One line for each entry of the release checkpoint the conversion does not use (``Optimizer``:
    the release's training state, which fine-tuning never resumes), naming the records it held."""
    out = []
    for key in ckpt:
        if key in USED_ENTRIES:
            continue
        names = _records(ckpt[key])
        held = "; ".join(f"{n} ×{names.count(n)}" for n in sorted(set(names)))
        out.append(f"{key}" + (f" (held, as inert records: {held})" if held else ""))
    return out


# --------------------------------------------------------------------------------------------------
# the model config from the release's Settings


_KIND = {int: "a positive integer", float: "a number", str: "a string", bool: "true or false"}


def _right_type(default, value, zero: bool = False) -> bool:
    """``value`` is of the kind RobertaConfig's ``default`` is (YAML gives ints where floats are
    meant); sizes are positive (an id may be 0)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool) and value >= (0 if zero else 1)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    return isinstance(value, type(default))


def release_model_config(settings: dict) -> dict:
    """CTALConfig keywords that reproduce the release's encoders, from ``Settings["Config"]``
    (its ``semantic`` and ``acoustic`` sections, RobertaConfig's defaults where they are silent)."""
    config = settings.get("Config") if isinstance(settings, dict) else None
    if not isinstance(config, dict) or not all(isinstance(config.get(s), dict) for s in ("semantic", "acoustic")):
        raise ReleaseFormatError("Settings['Config'] holds no 'semantic' and 'acoustic' sections")
    text, audio = ({**ROBERTA_DEFAULTS, **config[s]} for s in ("semantic", "acoustic"))
    for section, values in (("semantic", text), ("acoustic", audio)):
        for key, value in values.items():
            if key in ROBERTA_DEFAULTS and not _right_type(ROBERTA_DEFAULTS[key], value, zero=key == "pad_token_id"):
                raise ReleaseFormatError(f"Settings['Config']['{section}']['{key}'] is {value!r}, not "
                                         f"{_KIND[type(ROBERTA_DEFAULTS[key])]}")
    for key in SHARED_FIELDS:
        if text[key] != audio[key]:
            raise ReleaseFormatError(f"the release's streams differ in {key} ({text[key]!r} vs {audio[key]!r}); "
                                     "ctal-ray's model has one value for both")
    for key in ("audio_size", "downsample_rate"):
        if key not in audio:
            raise ReleaseFormatError(f"Settings['Config']['acoustic'] has no {key}")
        if not _right_type(1, audio[key]):
            raise ReleaseFormatError(f"Settings['Config']['acoustic']['{key}'] is {audio[key]!r}, not {_KIND[int]}")
    problems = [f"{s} position_embedding_type={c['position_embedding_type']!r} (needs 'absolute')"
                for s, c in (("semantic", text), ("acoustic", audio)) if c["position_embedding_type"] != "absolute"]
    if audio["downsample_rate"] != 1:
        problems.append(f"acoustic downsample_rate={audio['downsample_rate']} (ctal-ray stacks no frames: needs 1)")
    if not audio["add_cross_attention"]:
        problems.append("acoustic add_cross_attention is off (ctal-ray's audio layers attend to the text)")
    if problems:
        raise ReleaseFormatError("cannot convert exactly: " + "; ".join(problems))
    return dict(vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
                num_text_layers=text["num_hidden_layers"], num_audio_layers=audio["num_hidden_layers"],
                num_attention_heads=text["num_attention_heads"], intermediate_size=text["intermediate_size"],
                hidden_act=text["hidden_act"], hidden_dropout_prob=text["hidden_dropout_prob"],
                attention_probs_dropout_prob=text["attention_probs_dropout_prob"],
                max_position_embeddings=text["max_position_embeddings"], type_vocab_size=text["type_vocab_size"],
                layer_norm_eps=text["layer_norm_eps"], pad_token_id=text["pad_token_id"],
                text_position_style="roberta", audio_dim=audio["audio_size"],
                max_audio_positions=audio["max_position_embeddings"],
                audio_causal=bool(audio["is_decoder"]))  # is_decoder: the release's causal frames


# --------------------------------------------------------------------------------------------------
# the weights


def _source_tensors(ckpt: dict) -> dict[str, torch.Tensor]:
    """The two state dicts under "<model>.<name>" keys, each value a finite tensor, else refused by name."""
    source = {}
    for part in ("semantic_model", "acoustic_model"):
        if not isinstance(ckpt[part], dict):
            raise ReleaseFormatError(f"{part} is a {type(ckpt[part]).__name__}, not a state dict")
        for k, tensor in ckpt[part].items():
            key = f"{part}.{k}"
            if not isinstance(tensor, torch.Tensor):
                raise ReleaseFormatError(f"release key {key} is a {type(tensor).__name__}, not a tensor")
            # a diverged run's weights would convert into a model that only outputs NaN
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ReleaseFormatError(f"release key {key} holds NaN or infinite values: refusing to convert "
                                         "damaged weights")
            source[key] = tensor
    return source


def build_model(ckpt: dict, config: CTALConfig) -> CTALForPretraining:
    """The release's weights in a CTALForPretraining of ``config``. The layer counts are checked
    against the layers the state dicts hold, then every key and shape against a model on the meta
    device, so a config that does not fit the tensors (a vocab_size of 200 000 000) is refused
    before anything is allocated."""
    source = _source_tensors(ckpt)
    for field, prefix in (("num_text_layers", "semantic_model.roberta.encoder.layer."),
                          ("num_audio_layers", "acoustic_model.acoustic.encoder.layer.")):
        held = {k[len(prefix):].split(".", 1)[0] for k in source if k.startswith(prefix)}
        if getattr(config, field) != len(held):
            raise ReleaseFormatError(f"Settings['Config'] gives {prefix.split('_')[0]} num_hidden_layers="
                                     f"{getattr(config, field)}, but the file holds {len(held)} such layers")
    with torch.device("meta"):
        skeleton = CTALForPretraining(config)
    state = map_release_state(source, skeleton)
    model = CTALForPretraining(config)
    model.load_state_dict(state)  # strict: every key and shape was checked above
    return model


def map_release_state(source: dict[str, torch.Tensor], model: CTALForPretraining) -> dict[str, torch.Tensor]:
    """``model``'s state dict (its tied decoder included) from the release's tensors (``_source_tensors``);
    ReleaseFormatError names the first source key without a place, the first parameter left
    unfilled, a shape that does not fit, or an alias that is not its tensor's copy."""
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}

    def put(target: str, tensor: torch.Tensor, origin: str) -> None:
        if target not in own:
            raise ReleaseFormatError(f"release key {origin} maps to {target}, which CTALForPretraining "
                                     f"({model.config.num_text_layers}+{model.config.num_audio_layers} layers) "
                                     "does not have")
        if tuple(tensor.shape) != tuple(own[target].shape):
            raise ReleaseFormatError(f"release key {origin} has shape {tuple(tensor.shape)}, {target} needs "
                                     f"{tuple(own[target].shape)}")
        mapped[target] = tensor

    for key, tensor in source.items():
        if key in DROPPED:
            continue
        if key in ALIASES:
            other = source.get(ALIASES[key])
            if other is None or other.shape != tensor.shape or not torch.equal(other, tensor):
                raise ReleaseFormatError(f"release key {key} should equal {ALIASES[key]} (tied), but differs")
            continue
        if key == AUDIO_TOKEN_TYPE:  # every frame adds row 0: fold it into the projection's bias
            if AUDIO_PROJECTION_BIAS not in source:
                raise ReleaseFormatError(f"release checkpoint has {key} but no {AUDIO_PROJECTION_BIAS}")
            if tensor.ndim != 2 or tensor.shape[1:] != source[AUDIO_PROJECTION_BIAS].shape:
                raise ReleaseFormatError(f"release key {key} has shape {tuple(tensor.shape)}, which does not fit "
                                         f"{AUDIO_PROJECTION_BIAS}'s {tuple(source[AUDIO_PROJECTION_BIAS].shape)}")
            # in fp32, as the model adds them: an FP16 (apex) checkpoint's halves would round the sum
            put("audio.embeddings.projection.bias", source[AUDIO_PROJECTION_BIAS].float() + tensor[0].float(), key)
            continue
        if key == AUDIO_PROJECTION_BIAS:
            continue  # folded with the token-type row above
        target = next((new + key[len(old):] for old, new in RENAMES if key.startswith(old)), None)
        if target is None:
            raise ReleaseFormatError(f"release key {key} has no place in CTALForPretraining; refusing a "
                                     "partial conversion")
        put(target, tensor, key)
    if AUDIO_PROJECTION_BIAS in source and "audio.embeddings.projection.bias" not in mapped:
        raise ReleaseFormatError(f"release checkpoint has {AUDIO_PROJECTION_BIAS} but no {AUDIO_TOKEN_TYPE}")
    if WORD_EMBEDDINGS in source:
        mapped[TIED] = mapped["text.embeddings.word_embeddings.weight"]
    unfilled = [k for k in own if k not in mapped]
    if unfilled:
        raise ReleaseFormatError(f"the release checkpoint leaves {len(unfilled)} parameters of "
                                 f"CTALForPretraining unfilled (first: {unfilled[0]})")
    return mapped


# --------------------------------------------------------------------------------------------------
# the tokenizer


def prepare_tokenizer(tokenizer_dir: str | Path, dest: Path, *, vocab_size: int, pad_token_id: int) -> str:
    """Put the tokenizer of ``tokenizer_dir`` into ``dest`` as a ctal-ray tokenizer folder and return
    its hash. ``tokenizer_dir``: a ctal-ray tokenizer folder (copied as is) or a Hugging Face
    byte-level BPE folder, vocab.json + merges.txt (the release's ``tokenizer/libri-roberta_train-960``).
    Its vocabulary size and pad id must be the checkpoint's. A folder that records no text
    normalization gets the release's ("release": lower case, ``.,?!`` dropped)."""
    src = Path(tokenizer_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer directory {src} does not exist")
    if any((src / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = load_tokenizer(src)
        dest.mkdir(parents=True)
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, dest / f)
    elif (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        from transformers import RobertaTokenizer  # the release loads its BPE folder with this class

        tok = RobertaTokenizer.from_pretrained(str(src), local_files_only=True, model_max_length=512)
        tok.save_pretrained(str(dest))
    else:
        raise FileNotFoundError(f"{src} is neither a ctal-ray tokenizer folder (tokenizer.json) nor a byte-level "
                                "BPE folder (vocab.json + merges.txt)")
    info = tokenizer_info(tok)
    if (info["vocab_size"], info["pad_token_id"]) != (vocab_size, pad_token_id):
        raise ReleaseFormatError(f"tokenizer {src} has {info['vocab_size']} tokens and pad id {info['pad_token_id']}, "
                                 f"the checkpoint's embeddings {vocab_size} and pad id {pad_token_id}: "
                                 "give the tokenizer the checkpoint was trained with")
    if read_normalization(dest) is None:
        save_normalization(dest, "release")
    return tokenizer_hash(dest)


# --------------------------------------------------------------------------------------------------
# the whole conversion


def check_output(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse an existing ``out_dir`` that is not a checkpoint this converter wrote (its
    checkpoint.json records the ``release`` it came from): a foreign directory or a file is never
    replaced. An earlier conversion is replaced only with ``overwrite``."""
    if not storage.exists(out_dir):
        return
    try:
        state = checkpoint.read_state(out_dir)
    except (FileNotFoundError, CheckpointError, OSError):
        state = {}
    if not (state.get("kind") == "pretraining" and "release" in state):
        raise FileExistsError(f"refusing to write {str(out_dir)!r}: it exists and is not a checkpoint converted "
                              f"from a release (no {STATE_FILE} recording one); choose another --out")
    if not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")


def convert_release(ckpt: dict | str | Path, tokenizer_dir: str | Path, out_dir: str | Path, *,
                    overwrite: bool = False, source: Optional[str] = None, audio_causal: Optional[bool] = None,
                    log: Callable[[str], None] = print) -> Path | str:
    """Write the release checkpoint ``ckpt`` (a path, or the dict ``load_release_checkpoint`` gave)
    to ``out_dir`` (a path or URI) as a ctal-ray pretraining checkpoint that fine-tuning takes as
    ``init``: model, ``tokenizer/`` (from ``tokenizer_dir``, see ``prepare_tokenizer``), model card
    and checkpoint.json, which records ``frontend: release``. ``audio_causal`` (default: the file's
    ``is_decoder``) says whether the weights were trained with causal audio self-attention; the
    card says which was used and why. Everything is checked before anything is written or removed;
    an existing ``out_dir`` is replaced only with ``overwrite`` and only if it is an earlier
    conversion (``check_output``). ``source`` names the original in the state (default: the file's
    name). ``log`` gets what was dropped and the attention used. Returns ``out_dir``."""
    check_output(out_dir, overwrite)  # fails fast; checked again before anything is replaced
    release = {}
    if not isinstance(ckpt, dict):
        path = Path(ckpt)
        release = {"file": path.name, "sha256": checkpoint._sha256(path)}  # provenance
        source = source or path.name
        ckpt = load_release_checkpoint(path)
    kwargs = release_model_config(ckpt["Settings"])
    causal_from = "the file's is_decoder" if audio_causal is None else "given (--audio-causal)"
    kwargs["audio_causal"] = kwargs["audio_causal"] if audio_causal is None else bool(audio_causal)
    config = CTALConfig(**kwargs)
    model = build_model(ckpt, config)
    step = ckpt.get("Global_step")
    step = step if isinstance(step, int) and not isinstance(step, bool) else None
    skipped = dropped(ckpt)
    state = {"frontend": FRONTEND, "step": step,
             "data": f"the authors' pretraining (LibriSpeech 960 h), converted from {source or 'a release checkpoint'}",
             "release": {**release, "global_step": step, "dropped": skipped},
             "config": {"features": {"frontend": FRONTEND}, "converted_from": source or "release checkpoint",
                        "model": {"audio_causal": config.audio_causal}, "audio_causal_from": causal_from}}
    with tempfile.TemporaryDirectory(prefix="ctal-release-tokenizer-") as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        tok_hash = prepare_tokenizer(tokenizer_dir, tok_dir, vocab_size=config.vocab_size,
                                     pad_token_id=config.pad_token_id)
        check_output(out_dir, overwrite)  # inputs all valid: only now may an earlier conversion go
        out = checkpoint.write(out_dir, "pretraining", {"main": Part(model)}, tokenizer_dir=tok_dir,
                               tokenizer_hash=tok_hash, state=state)
    for line in skipped:
        log(f"dropped {line}: not needed to fine-tune")
    log(f"audio self-attention: {'causal' if config.audio_causal else 'bidirectional'} "
        f"(model.audio_causal={str(config.audio_causal).lower()}, {causal_from})")
    return out
