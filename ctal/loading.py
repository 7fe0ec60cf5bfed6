"""How CTAL's ``from_pretrained`` reads Hugging Face's loading keywords (ctal.model): what it takes,
what it ignores (the hub's: CTAL loads local folders only), what it refuses by name."""
from __future__ import annotations

import difflib

import torch

from .config import ModelConfig

MODEL_FIELDS = tuple(ModelConfig.__dataclass_fields__)
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
