"""A local Hugging Face BERT / RoBERTa checkpoint as CTAL's text stream (``text_init``).

``text_config_from_hf`` is the one mapping from its config.json to ModelConfig fields;
``adopt_text_init`` applies it to a config (ctal.config calls it, importing this module only when a
config names a ``text_init``: it needs transformers); ``load_text_checkpoint`` loads the weights into
the text stream, strictly.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers.activations import ACT2FN

# The HF model types whose weight names and math the text stream follows, with the position style of each.
TEXT_INIT_TYPES = {"bert": "bert", "roberta": "roberta"}


def text_config_from_hf(hf_dir) -> dict:
    """The ModelConfig fields a local HF BERT/RoBERTa checkpoint fixes, read from its config.json.

    The one mapping from an HF config to ours; the audio stream shares hidden size, heads and FFN, so
    it follows the checkpoint's width too. Anything the text stream cannot reproduce is refused,
    naming the file.
    """
    from transformers import AutoConfig

    file = Path(hf_dir) / "config.json"
    if not file.is_file():
        raise ValueError(f"text_init={hf_dir}: {file} does not exist (text_init needs a local Hugging Face "
                         "BERT or RoBERTa folder)")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"text_init={hf_dir}: {file} is not JSON ({e})") from None
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    if kind not in TEXT_INIT_TYPES:
        raise ValueError(f"text_init={hf_dir}: {file} has model_type={kind!r}; text_init supports "
                         f"{' and '.join(TEXT_INIT_TYPES)}")
    hf = AutoConfig.for_model(**raw)  # BertConfig / RobertaConfig: their defaults fill absent keys
    unsupported = {"position_embedding_type": (getattr(hf, "position_embedding_type", "absolute"), "absolute"),
                   "is_decoder": (getattr(hf, "is_decoder", False), False)}
    for key, (value, needed) in unsupported.items():
        if value != needed:
            raise ValueError(f"text_init={hf_dir}: {file} has {key}={value!r}; the text stream needs {needed!r}")
    if hf.hidden_act not in ACT2FN:
        raise ValueError(f"text_init={hf_dir}: {file} has hidden_act={hf.hidden_act!r}, not one of "
                         "transformers' activations")
    return dict(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_text_layers=hf.num_hidden_layers,
                num_attention_heads=hf.num_attention_heads, intermediate_size=hf.intermediate_size,
                hidden_act=hf.hidden_act, max_position_embeddings=hf.max_position_embeddings,
                type_vocab_size=hf.type_vocab_size, layer_norm_eps=hf.layer_norm_eps,
                pad_token_id=hf.pad_token_id, text_position_style=TEXT_INIT_TYPES[kind])


def adopt_text_init(values: dict, explicit=(), prefix: str = "") -> dict:
    """What `values["text_init"]` decides: {field: value} from its config.json ({} without text_init).

    `values` maps ModelConfig fields to what a config has now; those named in `explicit` were set by
    the user (a keyword, a command-line override), the rest are defaults that text_init replaces. An
    explicit value that disagrees raises ValueError naming the key (with `prefix`), both values and
    the file.
    """
    hf_dir = values.get("text_init")
    if not hf_dir:
        return {}
    try:
        adopted = text_config_from_hf(hf_dir)
    except ValueError as e:
        raise ValueError(f"{prefix}{e}") from None  # its messages start with text_init=…
    conflicts = [f"{prefix}{k}={values[k]!r} but {Path(hf_dir) / 'config.json'} has {k}={v!r}"
                 for k, v in adopted.items() if k in explicit and values[k] != v]
    if conflicts:
        raise ValueError(f"{prefix}text_init={hf_dir} sets the text architecture: {'; '.join(conflicts)} "
                         f"(drop the setting or give the checkpoint's value)")
    return adopted


def _read_hf_state(hf_dir: Path) -> dict:
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(hf_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors or pytorch_model.bin weights")
    state = {}
    for f in bins:
        state.update(torch.load(f, map_location="cpu", weights_only=True))  # never unpickle objects
    return state


def load_text_checkpoint(text, hf_dir, cfg) -> None:
    """Load embeddings + encoder layers of a local HF checkpoint into ``text`` (ctal.model.TextStream),
    strictly; ``cfg`` (a CTALConfig) must hold the checkpoint's architecture (``adopt_text_init``)."""
    hf_dir = Path(hf_dir)
    expected = text_config_from_hf(hf_dir)
    for key, value in expected.items():
        if getattr(cfg, key) != value:
            raise ValueError(f"text_init={hf_dir}: checkpoint has {key}={value!r} but the model config "
                             f"has {key}={getattr(cfg, key)!r} (CTALConfig(text_init=...) adopts the "
                             "checkpoint's values; do not change them afterwards)")
    state = {}
    for k, v in _read_hf_state(hf_dir).items():
        for prefix in ("bert.", "roberta.", "model."):
            k = k.removeprefix(prefix)
        if k.startswith(("pooler.", "cls.", "lm_head.")) or k.endswith("position_ids"):
            continue  # heads and buffers the text stream does not have
        state[k] = v
    own = text.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"text_init={hf_dir}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"text_init={hf_dir}: {k} has shape {tuple(v.shape)}, "
                             f"expected {tuple(own[k].shape)}")
    text.load_state_dict(state, strict=True)
