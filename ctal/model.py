"""CTAL: Cross-modal Transformer for Audio-and-Language (Li et al., EMNLP 2021), in one file.

Read top to bottom the way a frame travels:
    text:  input_ids → TextEmbeddings → N_t × TransformerLayer(self-attn, FFN)           → text states
    audio: frames(160) → AudioEmbeddings → N_a × TransformerLayer(self-attn,
                                                   cross-attn to the *final* text states, FFN) → audio states
    heads: MLM (tied to word embeddings) + acoustic reconstruction (L1 on masked frames)  [pretraining]
           per-position tanh projections → pools → fusion + orthogonality loss → task head [fine-tuning]

Differences from the released code, on purpose:
- audio self-attention is bidirectional (the release used a causal mask); `audio_causal=True` restores it;
- the orthogonality loss divides by the text norm and the audio norm (the release used the audio norm twice);
  otherwise the fusion is the release's function (`Fusion`), its variants one table (`FUSION_VARIANTS`);
- the text stream uses Hugging Face BERT/RoBERTa weight names and math, so `text_init` can load a local
  BERT or RoBERTa checkpoint and reproduce its hidden states exactly.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .loading import loading_request, saved_config
from .model_config import CTALConfig, register_auto_classes
from .text_init import load_text_checkpoint
from .variants import FUSION_VARIANTS


# --------------------------------------------------------------------------------------------------
# building blocks (names follow Hugging Face BERT so text weights load one to one)


CAUSAL = "causal"  # an attn_mask value: SDPA's is_causal form, no (T, T) mask materialized


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, cross-attention otherwise."""

    def __init__(self, cfg: CTALConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x, context=None, attn_mask=None):
        context = x if context is None else context
        B, T, H = x.shape
        split = lambda t: t.view(B, t.shape[1], self.num_heads, H // self.num_heads).transpose(1, 2)
        q, k, v = split(self.query(x)), split(self.key(context)), split(self.value(context))
        # attn_mask: bool (B, 1, T or 1, S), True = may attend; CAUSAL: SDPA's own causal form
        causal = isinstance(attn_mask, str)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else attn_mask, is_causal=causal,
                                           dropout_p=self.dropout_p if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, H)  # (B, T, H)


class AddNorm(nn.Module):
    """Post-LN residual: LayerNorm(x + dropout(dense(y)))."""

    def __init__(self, cfg: CTALConfig, in_size: int):
        super().__init__()
        self.dense = nn.Linear(in_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, y, x):
        return self.LayerNorm(x + self.dropout(self.dense(y)))


class AttentionBlock(nn.Module):
    """Attention + output sub-block (HF: `attention.self`, `attention.output`)."""

    def __init__(self, cfg: CTALConfig):
        super().__init__()
        self.self = Attention(cfg)
        self.output = AddNorm(cfg, cfg.hidden_size)

    def forward(self, x, context=None, attn_mask=None):
        return self.output(self.self(x, context, attn_mask), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: CTALConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x):
        return self.act(self.dense(x))


class TransformerLayer(nn.Module):
    """Self-attention → [cross-attention to the text stream] → FFN, each residual + LayerNorm."""

    def __init__(self, cfg: CTALConfig, cross_attention: bool):
        super().__init__()
        self.attention = AttentionBlock(cfg)
        self.crossattention = AttentionBlock(cfg) if cross_attention else None
        self.intermediate = Intermediate(cfg)
        self.output = AddNorm(cfg, cfg.intermediate_size)

    def forward(self, x, self_mask, context=None, context_mask=None, queries=None):
        """`queries` (B, M) indices: the outputs wanted at those positions only, (B, M, H); every
        position still serves as a key and value, so each wanted output is the full layer's."""
        q = x if queries is None else x.gather(1, queries[..., None].expand(-1, -1, x.shape[-1]))
        x = self.attention(q, None if queries is None else x, attn_mask=self_mask)
        if self.crossattention is not None and context is not None:
            x = self.crossattention(x, context, context_mask)
        return self.output(self.intermediate(x), x)


def key_padding_mask(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """(B, S) 1/True for real positions → bool (B, 1, 1, S) for SDPA; None when nothing is padded,
    so SDPA takes its unmasked kernels (eager only: a compiled graph keeps one form for every batch)."""
    mask = mask.bool()
    if has_values(mask) and bool(mask.all()):
        return None
    return mask[:, None, None, :]


def is_right_padded(mask: torch.Tensor) -> bool:
    """True when every row's real positions come first (collate's layout): then a causal mask alone
    keeps every real query off the padding, which only ever follows it."""
    return has_values(mask) and bool((mask[:, 1:] <= mask[:, :-1]).all())


def has_values(t: torch.Tensor) -> bool:
    """Whether t's values may choose a fast path: not while compiling, nor for shape-only tensors
    (meta, or FakeTensorMode's, as memory planning uses); those take the general masked path."""
    from torch._subclasses.fake_tensor import is_fake

    return not torch.compiler.is_compiling() and t.device.type != "meta" and not is_fake(t)


def run_layers(layers: nn.ModuleList, x, *args, checkpointed: bool = False):
    """x through each layer; `checkpointed` keeps only each layer's input for the backward and
    recomputes the rest there (activation checkpointing: less memory for ~1/3 more compute; the
    dropout masks are replayed, so losses and gradients are unchanged)."""
    for layer in layers:
        if checkpointed and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(layer, x, *args, use_reentrant=False)
        else:
            x = layer(x, *args)
    return x


# --------------------------------------------------------------------------------------------------
# the two streams


class TextEmbeddings(nn.Module):
    """Token + learned position (+ token type) embeddings → LayerNorm (BERT/RoBERTa)."""

    def __init__(self, cfg: CTALConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.pad_token_id = cfg.pad_token_id
        self.roberta_positions = cfg.text_position_style == "roberta"
        # Tied to a dense MLM decoder (CTALForPretraining), the word rows' gradient can be sparse: the
        # decoder's dense gradient absorbs it in place, instead of a (V, H) zero-filled copy plus a sum.
        self.sparse_word_grad = False

    def forward(self, input_ids):
        B, L = input_ids.shape
        if self.roberta_positions:  # RoBERTa counts positions from pad+1 and gives padding pad's slot
            real = input_ids.ne(self.pad_token_id).long()
            position_ids = torch.cumsum(real, dim=1) * real + self.pad_token_id
        else:
            position_ids = torch.arange(L, device=input_ids.device).expand(B, L)
        words = F.embedding(input_ids, self.word_embeddings.weight, self.pad_token_id, sparse=self.sparse_word_grad)
        x = (words + self.position_embeddings(position_ids)
             + self.token_type_embeddings(torch.zeros_like(input_ids)))
        return self.dropout(self.LayerNorm(x))


def layer_stack(cfg: CTALConfig, n: int, cross_attention: bool) -> nn.Module:
    """`encoder.layer.N.*`: N layers under HF BERT's names, so text weights load one to one."""
    encoder = nn.Module()
    encoder.layer = nn.ModuleList(TransformerLayer(cfg, cross_attention=cross_attention) for _ in range(n))
    return encoder


class TextStream(nn.Module):
    """RoBERTa-style bidirectional encoder (HF names: `embeddings.*`, `encoder.layer.N.*`)."""

    def __init__(self, cfg: CTALConfig):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = layer_stack(cfg, cfg.num_text_layers, cross_attention=False)
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask):
        x = self.embeddings(input_ids)  # (B, L, H)
        return run_layers(self.encoder.layer, x, key_padding_mask(attention_mask),
                          checkpointed=self.gradient_checkpointing)


class AudioEmbeddings(nn.Module):
    """Linear(audio_dim → H) + learned frame positions (max 3000) → LayerNorm. Frames of several SSL
    layers side by side (``audio_layers`` > 1) are first combined by learned softmax weights, one per
    layer (SUPERB's weighted sum), so the projection reads one layer's width."""

    def __init__(self, cfg: CTALConfig):
        super().__init__()
        self.audio_layers = cfg.audio_layers
        if cfg.audio_layers > 1:
            self.layer_weights = nn.Parameter(torch.zeros(cfg.audio_layers))  # uniform at the start
        self.projection = nn.Linear(cfg.audio_dim // cfg.audio_layers, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_audio_positions, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, frames):
        T = frames.shape[1]
        if T > self.position_embeddings.num_embeddings:
            raise ValueError(f"{T} frames exceed max_audio_positions="
                             f"{self.position_embeddings.num_embeddings}; crop utterances first")
        positions = torch.arange(T, device=frames.device)
        if self.audio_layers > 1:
            layers = frames.unflatten(-1, (self.audio_layers, -1))  # (B, T, layers, D)
            frames = torch.einsum("btld,l->btd", layers, self.layer_weights.softmax(0).to(frames.dtype))
        return self.dropout(self.LayerNorm(self.projection(frames) + self.position_embeddings(positions)))


class AudioStream(nn.Module):
    """Frames attend to themselves, then to the final text layer (the cross-modal part of CTAL)."""

    def __init__(self, cfg: CTALConfig):
        super().__init__()
        self.embeddings = AudioEmbeddings(cfg)
        self.encoder = layer_stack(cfg, cfg.num_audio_layers, cross_attention=True)
        self.causal = cfg.audio_causal
        self.gradient_checkpointing = False

    def forward(self, frames, frame_mask, text=None, text_mask=None, wanted=None):
        """Final audio states (B, T, H); with `wanted` (B, T) bool, only those frames' states (N, H) in
        row-major order (as `states[wanted]`): the last layer then computes nothing else."""
        x = self.embeddings(frames)  # (B, T, H)
        self_mask = self.self_attention_mask(frame_mask)
        cross_mask = key_padding_mask(text_mask) if text is not None else None
        # text=None: no cross-attention (unimodal)
        if wanted is None:
            return run_layers(self.encoder.layer, x, self_mask, text, cross_mask,
                              checkpointed=self.gradient_checkpointing)
        *lower, last = self.encoder.layer
        x = run_layers(lower, x, self_mask, text, cross_mask, checkpointed=self.gradient_checkpointing)
        # each row's wanted frames first, in order; a row with fewer fills its last slots with others (dropped)
        counts = wanted.sum(1)
        queries = torch.argsort((~wanted).to(torch.uint8), dim=1, stable=True)[:, :int(counts.max())]  # (B, M)
        used = torch.arange(queries.shape[1], device=x.device) < counts[:, None]  # (B, M)
        keys = frame_mask.bool()[:, None, :]  # (B, 1, T)
        if self.causal:
            keys = keys & (torch.arange(x.shape[1], device=x.device) <= queries[..., None])
        last_mask = (keys | ~used[..., None])[:, None]  # (B, 1, M, T); filler slots see every frame: no NaN
        out = run_layers([last], x, last_mask, text, cross_mask, queries,
                         checkpointed=self.gradient_checkpointing)  # (B, M, H)
        return out[used]  # (N, H)

    def self_attention_mask(self, frame_mask):
        """SDPA's mask for the frames' self-attention: None, CAUSAL or a bool (B, 1, 1 or T, T) mask."""
        if self.causal and is_right_padded(frame_mask):
            return CAUSAL  # real frames precede the padding: causality alone keeps them off it
        self_mask = key_padding_mask(frame_mask)
        if self.causal:
            T = frame_mask.shape[1]
            tril = torch.ones(T, T, dtype=torch.bool, device=frame_mask.device).tril()
            self_mask = tril if self_mask is None else self_mask & tril
        return self_mask


# --------------------------------------------------------------------------------------------------
# the shared base: init, parameter count, strict checkpoints


class CTALPreTrainedModel(PreTrainedModel):
    config_class = CTALConfig
    base_model_prefix = "ctal"
    # Keys a task model may lack in a pretraining checkpoint (fresh heads) and keys it may drop from it.
    _fresh_prefixes: tuple[str, ...] = ()
    _dropped_prefixes: tuple[str, ...] = ()

    def __init__(self, config: CTALConfig):
        super().__init__(config)
        self.text = TextStream(config)
        self.audio = AudioStream(config)
        if config.audio_upstream_spec:  # waveforms in: the encoder runs here (ctal.upstream.AudioUpstream)
            from .upstream import AudioUpstream

            self.upstream = AudioUpstream(config.audio_upstream_spec)
        else:
            self.upstream = None

    def audio_input(self, frames, frame_mask):
        """The audio stream's frames: as given, or the upstream's of waveform samples (B, N, 1)."""
        return (frames, frame_mask) if self.upstream is None else self.upstream(frames, frame_mask)

    def _init_weights(self, module):
        """BERT init: N(0, 0.02) for linear/embedding weights, zero biases, unit LayerNorm."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, AudioEmbeddings) and module.audio_layers > 1:
            nn.init.zeros_(module.layer_weights)  # every kept layer weighed alike at the start

    def init_parameters(self):
        """Initialize all weights (once), tie, then load `text_init` if the config names one."""
        upstream, self.upstream = self.upstream, None  # its own init, or its folder's weights
        self.apply(self._init_weights)
        self.upstream = upstream
        self._tie()
        if self.config.text_init:
            load_text_checkpoint(self.text, self.config.text_init, self.config)
        if self.upstream is not None and self.config.audio_upstream:
            self.upstream.load_folder(self.config.audio_upstream)

    def _tie(self):
        pass

    supports_gradient_checkpointing = True

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """Activation checkpointing of every layer of both streams (``run_layers``); HF's name. Only the
        non-reentrant form exists here: kwargs other than use_reentrant=False are refused."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.pop("use_reentrant", False) or kwargs:
            raise ValueError(f"gradient_checkpointing_kwargs={gradient_checkpointing_kwargs!r}: CTAL checkpoints "
                             "with use_reentrant=False only")
        self.text.gradient_checkpointing = self.audio.gradient_checkpointing = True
        if self.upstream is not None and not self.upstream.frozen:
            self.upstream.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def gradient_checkpointing_disable(self):
        self.text.gradient_checkpointing = self.audio.gradient_checkpointing = False

    def compile_layers(self, **options) -> None:
        """``torch.compile`` (with ``options``) every Transformer layer in place (``nn.Module.compile``,
        so parameter names and checkpoints do not change); embeddings and heads stay eager, the heads
        running on a number of scored positions that changes with every batch."""
        for stream in (self.text, self.audio):
            for layer in stream.encoder.layer:
                layer.compile(**options)

    def count_parameters(self, trainable_only: bool = False) -> int:
        """The one place parameters are counted (tied weights once)."""
        params = {id(p): p for p in self.parameters() if p.requires_grad or not trainable_only}
        return sum(p.numel() for p in params.values())

    def encode_text(self, input_ids, attention_mask):
        """Final text hidden states (B, L, H)."""
        return self.text(input_ids, attention_mask)

    def encode(self, input_ids, attention_mask, frames, frame_mask, cross: bool = True):
        """Both streams: (text states, audio states). `cross=False` skips cross-attention."""
        text = self.text(input_ids, attention_mask)
        frames, frame_mask = self.audio_input(frames, frame_mask)
        audio = self.audio(frames, frame_mask, text if cross else None, attention_mask)
        return text, audio

    # -- checkpoints: config.json + model.safetensors, never unpickled --------------------------
    def save_pretrained(self, save_directory, **_):
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.config.architectures = [type(self).__name__]
        config = copy.deepcopy(self.config)
        # the weights hold the text stream (and the upstream) now; DIR need not exist where this loads
        config.text_init = config.audio_upstream = None
        config.to_json_file(path / "config.json")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                 if k not in self._tied_keys()}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})

    def _tied_keys(self) -> set:
        return set()

    @classmethod
    def from_pretrained(cls, path, *model_args, **kwargs):
        """Load a CTAL checkpoint strictly, the Hugging Face way.

        Keywords: ModelConfig fields and task fields (TASK_FIELDS) override the saved config, but
        not its architecture; `output_loading_info=True` returns (model, info) with HF's keys;
        `dtype`/`torch_dtype` (a torch.dtype, its name, or "auto" = as saved) sets the dtype; `config`
        and `subfolder` as in HF. Hub options (ctal.loading.HUB_OPTIONS) have no effect: CTAL loads local folders
        only. Anything else is refused by name. A task model may start from a pretraining checkpoint
        (its heads are then fresh); anything else missing, unexpected or mis-shaped raises.
        """
        path, options, dtype, overrides = loading_request(cls.__name__, path, model_args, kwargs, CTALConfig)
        saved, same_kind = saved_config(path, overrides, cls.__name__)
        config = CTALConfig(**{k: v for k, v in saved.items() if k not in ("architectures",)})
        model = cls(config)
        state = load_file(str(path / "model.safetensors"))
        info = model._load_strict(state, path, allow_fresh=not same_kind)
        if dtype == "auto":  # as saved: the first floating tensor's dtype, like HF
            dtype = next((v.dtype for v in state.values() if v.is_floating_point()), None)
        if dtype is not None:
            model.to(dtype)
        return (model, info) if options.get("output_loading_info") else model

    def _load_strict(self, state: dict, path, allow_fresh: bool) -> dict:
        """Load `state`; returns HF's loading info (fresh heads missing, dropped heads unexpected)."""
        own = {k: v for k, v in self.state_dict().items() if k not in self._tied_keys()}
        fresh = [k for k in own if k not in state]
        dropped = [k for k in state if k not in own]
        missing = [k for k in fresh if not (allow_fresh and k.startswith(self._fresh_prefixes))
                   and not (self.config.audio_upstream and k.startswith("upstream."))]  # from its folder
        unexpected = [k for k in dropped if not (allow_fresh and k.startswith(self._dropped_prefixes))]
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not fit {type(self).__name__} "
                             f"(fusion={self.config.fusion!r}): "
                             f"{len(missing)} missing keys (first: {missing[:1]}), "
                             f"{len(unexpected)} unexpected keys (first: {unexpected[:1]})")
        for k, v in state.items():
            if k in own and own[k].shape != v.shape:
                raise ValueError(f"checkpoint {path}: {k} has shape {tuple(v.shape)}, "
                                 f"model expects {tuple(own[k].shape)}")
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        self._tie()
        # strict loading leaves nothing mismatched or in error: either would have raised above
        return {"missing_keys": set(fresh), "unexpected_keys": set(dropped), "mismatched_keys": set(),
                "error_msgs": []}


@dataclass
class CTALModelOutput(ModelOutput):
    text_last_hidden_state: Optional[torch.Tensor] = None  # (B, L, H)
    audio_last_hidden_state: Optional[torch.Tensor] = None  # (B, T, H)


class CTALModel(CTALPreTrainedModel):
    """The two streams without heads (what AutoModel loads); takes the streams of any CTAL checkpoint."""
    _dropped_prefixes = ("mlm_head.", "acoustic_head.", "fusion.", "classifier.")

    def __init__(self, config: CTALConfig):
        super().__init__(config)
        self.init_parameters()

    def forward(self, input_ids, attention_mask, frames, frame_mask):
        text, audio = self.encode(input_ids, attention_mask, frames, frame_mask)
        return CTALModelOutput(text_last_hidden_state=text, audio_last_hidden_state=audio)


# --------------------------------------------------------------------------------------------------
# pretraining: MLM on the text stream + masked acoustic modeling on the audio stream


class MLMHead(nn.Module):
    """dense + GELU + LayerNorm + decoder tied to the word embeddings (RoBERTa's LM head)."""

    def __init__(self, cfg: CTALConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x):
        return self.decoder(self.layer_norm(F.gelu(self.dense(x)))) + self.bias


class AcousticHead(nn.Module):
    """dense + GELU + LayerNorm + Linear(H → 160): reconstructs the (masked) input frames."""

    def __init__(self, cfg: CTALConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.audio_dim)

    def forward(self, x):
        return self.decoder(self.layer_norm(F.gelu(self.dense(x))))


@dataclass
class CTALPretrainingOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    mlm_loss: Optional[torch.Tensor] = None
    masked_acoustic_loss: Optional[torch.Tensor] = None
    mlm_logits: Optional[torch.Tensor] = None
    reconstructed_frames: Optional[torch.Tensor] = None


class CTALForPretraining(CTALPreTrainedModel):
    def __init__(self, config: CTALConfig):
        super().__init__(config)
        self.mlm_head = MLMHead(config)
        self.acoustic_head = AcousticHead(config)
        self.init_parameters()

    def _tie(self):
        self.mlm_head.decoder.weight = self.text.embeddings.word_embeddings.weight
        self.text.embeddings.sparse_word_grad = True  # the decoder always runs, so the sum is dense

    def _tied_keys(self):
        return {"mlm_head.decoder.weight"}

    def forward(self, input_ids, attention_mask, frames, frame_mask,
                mlm_labels=None, acoustic_mask=None, target_frames=None, return_logits: Optional[bool] = None):
        """input_ids/frames are the *masked* inputs; target_frames the unmasked 160-d frames.

        With labels the heads, and the last audio layer, run only where the losses look (the masked
        tokens, the masked real frames: ~15 % of positions, padding never; the last layer's other frames
        are only keys and values) and mlm_logits / reconstructed_frames stay None;
        without labels, or with ``return_logits=True``, they hold every position (B, L, V), (B, T, 160).
        """
        scored = mlm_labels is not None and acoustic_mask is not None
        full = return_logits or not scored
        frames_scored = acoustic_mask.bool() & frame_mask.bool() if scored else None  # padding never scored
        # the last audio layer too runs only where the acoustic loss looks (nothing else reads it here)
        wanted = None if full or not has_values(frames_scored) or not bool(frames_scored.any()) else frames_scored
        text = self.text(input_ids, attention_mask)
        audio = self.audio(frames, frame_mask, text, attention_mask, wanted=wanted)  # (B, T, H) or (M, H)
        out = CTALPretrainingOutput()
        if full:
            out.mlm_logits = self.mlm_head(text)  # (B, L, V)
            out.reconstructed_frames = self.acoustic_head(audio)  # (B, T, 160)
        if scored:
            tokens = mlm_labels != -100
            logits = out.mlm_logits[tokens] if full else self.mlm_head(text[tokens])  # (N, V)
            predicted = (out.reconstructed_frames[frames_scored] if full
                         else self.acoustic_head(audio if wanted is not None else audio[frames_scored]))  # (M, 160)
            # a batch with nothing masked: zero, still through the heads (DDP expects their gradients)
            out.mlm_loss = (F.cross_entropy(logits.float(), mlm_labels[tokens]) if len(logits)
                            else logits.sum() * 0.0)
            out.masked_acoustic_loss = (F.l1_loss(predicted.float(), target_frames[frames_scored].float())
                                        if len(predicted) else predicted.sum() * 0.0)
            out.loss = (self.config.mlm_weight * out.mlm_loss
                        + self.config.acoustic_weight * out.masked_acoustic_loss)
        return out


# --------------------------------------------------------------------------------------------------
# fine-tuning: fusion of the two streams + orthogonality loss + task head


def masked_max(x, mask):
    mask = mask.bool()
    out = x.masked_fill(~mask[..., None], torch.finfo(x.dtype).min).amax(dim=1)
    return out.masked_fill(~mask.any(1, keepdim=True), 0.0)  # a row with no position: 0, not -inf


def masked_mean(x, mask):
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def lecun_normal_(linear: nn.Linear) -> None:
    nn.init.normal_(linear.weight, mean=0.0, std=linear.in_features ** -0.5)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def orthogonality(t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Batch mean of |cos(t, a)|, each side divided by its own norm (the release divides by the
    audio norm twice, a bug not kept)."""
    return F.cosine_similarity(t, a, dim=-1, eps=1e-6).abs().mean()


class Fusion(nn.Module):
    """The release's fusion: project every position, then pool, then combine (paper, `ctal`).

    t = tanh(W_t h_text) at every token and a = tanh(W_a h_audio) at every frame; pools read the
    projected states: first = t_0, text max over tokens 1..L (<s> excluded), audio max over real
    frames, attention = softmax over frames of w·a, weighting a. The variant's pairs give the parts
    of z; fused = tanh(W_z z) keeps z's width (2H for ctal). No dropout: the release applies none here.
    """

    def __init__(self, cfg: CTALConfig):
        super().__init__()
        H = cfg.hidden_size
        self.variant = v = FUSION_VARIANTS[cfg.fusion]
        # creation order fixes the init's random draws: keep text, audio, attention pool, dense
        self.text_proj = nn.Linear(H, H) if v.text_pools else None
        self.audio_proj = nn.Linear(H, H) if v.audio_pools else None
        self.attention_pool = nn.Linear(H, 1) if "attention" in v.audio_pools else None
        self.dense = nn.Linear(v.fused_width(H), v.fused_width(H))

    def reset_parameters(self):
        """LeCun init, N(0, 1/fan_in), for the tanh layers (BERT's N(0, 0.02) elsewhere).

        Width-aware so the tanh units start in their non-linear range at any hidden size: with 0.02 a
        narrow head (H=64: pre-activation std 0.16) is almost linear, and a label that is an interaction
        of the two streams (the demo's ironic-sentiment task) then gets no gradient until the weights
        grow. At H=768 the two inits differ little (std 0.036 vs 0.02).
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                lecun_normal_(module)

    def pool(self, name, x, mask, exclude_first: bool = False):
        """One pool of projected states x (B, T, H) over the real positions of mask (B, T)."""
        if name == "first":
            return x[:, 0]
        mask = mask.bool()
        if exclude_first:
            mask = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, 1:]], dim=1)
        if name == "max":
            return masked_max(x, mask)
        if name == "mean":
            return masked_mean(x, mask)
        scores = self.attention_pool(x).squeeze(-1).masked_fill(~mask, float("-inf"))
        return torch.einsum("bt,bth->bh", scores.softmax(-1), x)

    def forward(self, text, text_mask, audio, audio_mask):
        """Returns (fused (B, fused width), orthogonality loss: the sum over summed pairs of the batch
        mean |cos(t, a)|, as the release; zero for a variant without summed pairs)."""
        v = self.variant
        t_states = torch.tanh(self.text_proj(text)) if self.text_proj is not None else None
        a_states = torch.tanh(self.audio_proj(audio)) if self.audio_proj is not None else None
        t_pooled = {p: self.pool(p, t_states, text_mask, exclude_first=p == "max") for p in v.text_pools}
        a_pooled = {p: self.pool(p, a_states, audio_mask) for p in v.audio_pools}
        parts, terms = [], []
        for t_pool, a_pool in v.pairs:
            t, a = t_pooled.get(t_pool), a_pooled.get(a_pool)
            if t is not None and a is not None and v.combine == "sum":
                parts.append(t + a)
                terms.append(orthogonality(t, a))
            else:
                parts += [x for x in (t, a) if x is not None]
        fused = torch.tanh(self.dense(torch.cat(parts, dim=-1)))
        ortho = torch.stack(terms).sum() if terms else fused.new_zeros(())
        return fused, ortho


@dataclass
class CTALClassifierOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    task_loss: Optional[torch.Tensor] = None
    orthogonality_loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    embedding: Optional[torch.Tensor] = None  # the fused vector (speaker verification scores it)


class CTALForSequenceClassification(CTALPreTrainedModel):
    """Fusion + linear head. `problem_type="regression"` (num_labels=1) uses L1 (MOSEI), else CE."""
    _fresh_prefixes = ("fusion.", "classifier.")
    _dropped_prefixes = ("mlm_head.", "acoustic_head.")

    def __init__(self, config: CTALConfig):
        super().__init__(config)
        if config.num_labels < 1:
            raise ValueError("CTALForSequenceClassification needs num_labels >= 1")
        self.fusion = Fusion(config)
        # bias-free, as the release's classifier
        self.classifier = nn.Linear(self.fusion.dense.out_features, config.num_labels, bias=False)
        self.init_parameters()
        self.fusion.reset_parameters()
        lecun_normal_(self.classifier)

    def stream_states(self, input_ids, attention_mask, frames, frame_mask):
        """Final (text, audio) states of the streams the fusion variant runs, None for one it does not."""
        variant = self.fusion.variant
        text = self.text(input_ids, attention_mask) if variant.text else None  # (B, L, H)
        audio = None
        if variant.audio:
            context = text if variant.cross_attention else None
            audio = self.audio(frames, frame_mask, context, attention_mask)  # (B, T, H)
        return text, audio

    def embed(self, input_ids, attention_mask, frames, frame_mask):
        """Fused vector and orthogonality loss for a batch."""
        frames, frame_mask = self.audio_input(frames, frame_mask)
        text, audio = self.stream_states(input_ids, attention_mask, frames, frame_mask)
        return self.fusion(text, attention_mask, audio, frame_mask)

    def forward(self, input_ids, attention_mask, frames, frame_mask, labels=None):
        fused, ortho = self.embed(input_ids, attention_mask, frames, frame_mask)
        logits = self.classifier(fused)  # (B, num_labels)
        out = CTALClassifierOutput(logits=logits, embedding=fused, orthogonality_loss=ortho)
        if labels is not None:
            if self.config.problem_type == "regression":
                out.task_loss = F.l1_loss(logits.squeeze(-1).float(), labels.float())
            else:
                out.task_loss = F.cross_entropy(logits.float(), labels.long())
            out.loss = out.task_loss + self.config.orthogonality_weight * ortho
        return out


# --------------------------------------------------------------------------------------------------
# transformers' Auto classes: AutoModel.from_pretrained(checkpoint) without remote code. `import ctal`
# imports this module once transformers' Auto classes are imported (ctal/__init__.py says why then).

register_auto_classes(CTALConfig, CTALModel, CTALForPretraining, CTALForSequenceClassification)
