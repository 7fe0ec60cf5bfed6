"""How CTAL's ``from_pretrained`` reads Hugging Face's loading keywords (ctal.model): what it takes,
what it ignores (the hub's: CTAL loads local folders only), what it refuses by name; the dtype asked
for; and the saved config.json read and held to what the caller asks (``saved_config``). The strict
loading of the weights themselves stays with the model (``CTALPreTrainedModel._load_strict``)."""
from __future__ import annotations

import difflib
import json
from pathlib import Path

import torch

from .config import ModelConfig

MODEL_FIELDS = tuple(ModelConfig.__dataclass_fields__)
# Fields that change parameter shapes or which parameters exist: a checkpoint must agree on all of them.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_text_layers", "num_audio_layers",
                       "num_attention_heads", "intermediate_size", "max_position_embeddings",
                       "type_vocab_size", "audio_dim", "audio_layers", "max_audio_positions")
# What a task head adds to the config (PretrainedConfig's own fields); from_pretrained accepts them.
TASK_FIELDS = ("num_labels", "problem_type", "id2label", "label2id")
# HF loading options: AutoModel passes the hub ones along (and _from_auto, adapter_kwargs, trust_remote_code).
HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token",
               "trust_remote_code", "adapter_kwargs", "_from_auto")
LOADING_OPTIONS = ("config", "output_loading_info", "dtype", "torch_dtype", "subfolder", *HUB_OPTIONS)


def refuse_unknown(owner: str, kwargs: dict) -> None:
    known = (*MODEL_FIELDS, *TASK_FIELDS, *LOADING_OPTIONS)
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, n=1))
                 else repr(k) for k in unknown]
        raise TypeError(f"{owner}.from_pretrained() got unknown keyword argument(s) {', '.join(hints)}; it "
                        f"takes ModelConfig fields, task fields ({', '.join(TASK_FIELDS)}) and loading "
                        f"options ({', '.join(LOADING_OPTIONS[:5])})")


def requested_dtype(dtype, torch_dtype):
    """None (float32, as built), "auto", or a floating torch.dtype from a dtype or its name."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; give dtype only "
                         "(torch_dtype is its old name)")
    dtype = dtype if dtype is not None else torch_dtype
    if dtype is None or dtype == "auto":
        return dtype
    resolved = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not (isinstance(resolved, torch.dtype) and resolved.is_floating_point):
        raise ValueError(f"dtype={dtype!r} is not a floating torch dtype, its name (e.g. 'bfloat16') or 'auto'")
    return resolved


def loading_request(owner: str, path, args: tuple, kwargs: dict, config_class: type) -> tuple:
    """``from_pretrained(path, *args, **kwargs)`` sorted into (the folder, the loading options, the
    dtype, the config overrides); ``kwargs`` loses the options. TypeError or ValueError naming a
    keyword it refuses."""
    if args:
        raise TypeError(f"{owner}.from_pretrained() takes no positional arguments after the path")
    refuse_unknown(owner, kwargs)
    options = {k: kwargs.pop(k) for k in LOADING_OPTIONS if k in kwargs}
    if "_adapter_model_path" in (options.get("adapter_kwargs") or {}):
        raise ValueError(f"{path}: PEFT adapters are not supported by CTAL checkpoints")
    path = Path(path) / options.get("subfolder", "")
    dtype = requested_dtype(options.get("dtype"), options.get("torch_dtype"))
    overrides = kwargs
    if options.get("config") is not None:  # AutoModel passes the config it read; kwargs win over it
        given = options["config"]
        if not isinstance(given, config_class):
            raise TypeError(f"config must be a {config_class.__name__}, got {type(given).__name__}")
        overrides = {**{k: getattr(given, k) for k in (*MODEL_FIELDS, *TASK_FIELDS)}, **kwargs}
    return path, options, dtype, overrides


def saved_config(path: Path, overrides: dict, owner: str) -> tuple[dict, bool]:
    """The checkpoint's config.json with ``overrides`` applied, and whether it was saved by ``owner``
    (the same model class). Refuses a folder that is no CTAL checkpoint, an override of its
    architecture, and another fusion for a model of the same class (it was fine-tuned with its own)."""
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not a CTAL checkpoint (needs config.json and "
                                "model.safetensors)")
    saved = json.loads((path / "config.json").read_text())
    if saved.get("model_type") != "ctal":
        raise ValueError(f"{path}: model_type={saved.get('model_type')!r}, expected 'ctal'")
    source = (saved.get("architectures") or ["?"])[0]
    same_kind = source == owner
    for key, value in overrides.items():
        if key in ARCHITECTURE_FIELDS and value != saved.get(key):
            raise ValueError(f"checkpoint {path} has {key}={saved.get(key)!r}, "
                             f"but {key}={value!r} was requested")
    if same_kind and "fusion" in overrides and overrides["fusion"] != saved.get("fusion"):
        raise ValueError(f"checkpoint {path} was fine-tuned with fusion={saved.get('fusion')!r}; "
                         f"it cannot be loaded as fusion={overrides['fusion']!r}")
    saved.update(overrides)
    saved["text_init"] = None  # the checkpoint already holds the text weights
    return saved, same_kind
