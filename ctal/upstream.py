"""A local self-supervised speech encoder (wav2vec 2.0, HuBERT, WavLM, data2vec-audio) as the
acoustic front end (``features.frontend=ssl``).

``features.ssl_model`` is a LOCAL Hugging Face folder (config.json, weights, preprocessor_config.json):
nothing is ever downloaded. ``features.ssl_layers`` picks the hidden states kept, in the encoder's own
``output_hidden_states`` numbering: 0 is the input of the first transformer layer (CNN features,
projection and positional convolution), k the output of transformer layer k. Note that in
transformers 5 hidden state ``num_hidden_layers`` of a stable-layer-norm ("layer") model is the last
layer's output *before* the encoder's final LayerNorm (unlike ``last_hidden_state``, and unlike
transformers 4, which appended the normed one).

The stored features of one utterance are a (T, len(layers) * hidden_size) float16 array, the kept
layers side by side in the order given, T the model's own frame count (20 ms frames).

Padding: a batch is padded (with its attention mask) only where padding cannot change an
utterance's features, i.e. CNN layers normed per frame (``feat_extract_norm == "layer"``) and a
single positional convolution. Group norm (wav2vec2-base style) takes its statistics over the whole
padded signal, and data2vec-audio's stack of positional convolutions lets each layer see the previous
one's output over padded frames, so those models run in groups of equal length (in practice one
utterance at a time).

`inspect_upstream` reads the folder's files only (quick, for the driver); `Upstream` loads the model.
"""

import hashlib
import json
import math
import operator
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

SUPPORTED = {"wav2vec2", "hubert", "wavlm", "data2vec-audio"}  # config.json model_type values
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin",
                "model.safetensors.index.json", "pytorch_model.bin.index.json")
MAX_BATCH_SAMPLES = 16000 * 320  # padded samples per forward pass: bounds activation memory
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class UpstreamError(ValueError):
    """A features.ssl_model / features.ssl_layers (or a waveform) the encoder cannot take."""


@dataclass(frozen=True)
class UpstreamInfo:
    """What the data set's report.json records about its encoder."""
    architecture: str  # config.json's model_type
    hash: str  # upstream_hash: the files that decide the features
    layers: tuple[int, ...]
    hidden_size: int  # per kept layer
    frame_shift_ms: float
    sample_rate: int  # the feature extractor's sampling_rate
    min_samples: int  # the shortest waveform that gives one frame

    @property
    def dim(self) -> int:
        return len(self.layers) * self.hidden_size

    def to_dict(self) -> dict:
        return {**asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict) -> "UpstreamInfo":
        return cls(architecture=str(d["architecture"]), hash=str(d["hash"]),
                   layers=tuple(int(x) for x in d["layers"]), hidden_size=int(d["hidden_size"]),
                   frame_shift_ms=float(d["frame_shift_ms"]), sample_rate=int(d["sample_rate"]),
                   min_samples=int(d["min_samples"]))


def _folder(path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise UpstreamError(f"features.ssl_model={str(path)!r} is not a directory: it must be a local "
                            "Hugging Face model folder (config.json, weights, preprocessor_config.json)")
    if _HUB_ID.match(str(path)):
        raise UpstreamError(f"features.ssl_model={str(path)!r} is not a local folder (it looks like a Hugging "
                            "Face hub id): it must be a local folder, nothing is downloaded; download the "
                            "model yourself (e.g. `hf download ID --local-dir DIR`) and pass DIR")
    raise UpstreamError(f"features.ssl_model={str(path)!r} does not exist: it must be a local Hugging Face "
                        "model folder (nothing is downloaded)")


def _weight_files(folder: Path) -> list[Path]:
    """The weight files the model loads: a single file, or a sharded index and the shards it names."""
    files = []
    for name in WEIGHT_FILES:
        p = folder / name
        if p.is_file():
            files.append(p)
            if name.endswith(".index.json"):
                try:
                    shards = set(json.loads(p.read_text())["weight_map"].values())
                except (OSError, ValueError, LookupError, TypeError, AttributeError) as e:
                    raise UpstreamError(f"features.ssl_model={str(folder)!r}: {name} is not a weight index "
                                        f"(JSON with a weight_map): {e!r}") from None
                files += [folder / s for s in sorted(shards) if (folder / s).is_file()]
    return files


def upstream_hash(path) -> str:
    """sha256 over config.json, preprocessor_config.json and the weight files (sorted by name; each
    name, its size and its bytes): the files that decide the features, not a README or a tokenizer."""
    folder = _folder(path)
    files = [folder / "config.json", folder / "preprocessor_config.json", *_weight_files(folder)]
    h = hashlib.sha256()
    for p in sorted({f for f in files if f.is_file()}, key=lambda f: f.name):
        h.update(p.name.encode() + b"\0" + p.stat().st_size.to_bytes(8, "little"))
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _min_samples(kernels: Sequence[int], strides: Sequence[int]) -> int:
    """The shortest input whose CNN output has one frame: walk the (valid) convolutions backwards."""
    n = 1
    for k, s in reversed(list(zip(kernels, strides))):
        n = (n - 1) * s + k
    return n


def _layers(layers: Optional[Sequence[int]], num_hidden_layers: int) -> tuple[int, ...]:
    if layers is None:
        return (num_hidden_layers,)
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise UpstreamError(f"features.ssl_layers={layers!r} must be a list of layer numbers")
    try:
        if any(isinstance(x, bool) for x in layers):
            raise TypeError
        out = tuple(operator.index(x) for x in layers)
    except TypeError:
        raise UpstreamError(f"features.ssl_layers={list(layers)!r} must be whole numbers") from None
    if not out:
        raise UpstreamError("features.ssl_layers is empty: name at least one layer "
                            f"(0..{num_hidden_layers}; 0 = the CNN features, {num_hidden_layers} = the last layer)")
    bad = [x for x in out if not 0 <= x <= num_hidden_layers]
    if bad:
        raise UpstreamError(f"features.ssl_layers={list(out)}: {bad} out of range; this model has "
                            f"{num_hidden_layers} layers, so 0..{num_hidden_layers}")
    dup = sorted({x for x in out if out.count(x) > 1})
    if dup:
        raise UpstreamError(f"features.ssl_layers={list(out)} names {dup} more than once")
    return out


def inspect_upstream(path, layers: Optional[Sequence[int]] = None) -> UpstreamInfo:
    """Check a model folder and describe what its features will be, from its files alone (no model
    is built: this runs on the driver before Ray starts). layers=None keeps the last layer."""
    folder = _folder(path)
    where = f"features.ssl_model={str(path)!r}"
    if not (folder / "config.json").is_file():
        raise UpstreamError(f"{where} has no config.json: not a Hugging Face model folder")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UpstreamError(f"{where}: config.json is not readable JSON ({e})") from None
    arch = raw.get("model_type")
    if arch not in SUPPORTED:
        raise UpstreamError(f"{where} is a {arch!r} model (config.json model_type); the supported ones are "
                            f"{sorted(SUPPORTED)}")
    if not _weight_files(folder):
        raise UpstreamError(f"{where} has no weights: expected one of {list(WEIGHT_FILES)}")
    if not (folder / "preprocessor_config.json").is_file():
        raise UpstreamError(f"{where} has no preprocessor_config.json (the feature extractor: sampling rate, "
                            "normalization)")
    from transformers import AutoConfig  # the config class fills the keys config.json leaves out

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    prep = json.loads((folder / "preprocessor_config.json").read_text())
    sample_rate = int(prep.get("sampling_rate", 16000))  # Wav2Vec2FeatureExtractor's default
    return UpstreamInfo(
        architecture=arch, hash=upstream_hash(folder), layers=_layers(layers, config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        frame_shift_ms=math.prod(config.conv_stride) / sample_rate * 1000,
        sample_rate=sample_rate, min_samples=_min_samples(config.conv_kernel, config.conv_stride))


class Upstream:
    """The encoder loaded for extraction: waveforms in, per-utterance float16 features out."""

    def __init__(self, path, layers: Optional[Sequence[int]] = None, device: Union[str, torch.device] = "cpu",
                 autocast_dtype: Optional[torch.dtype] = None, max_batch_samples: int = MAX_BATCH_SAMPLES):
        from transformers import AutoFeatureExtractor, AutoModel

        self.info = inspect_upstream(path, layers)
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.max_batch_samples = max_batch_samples
        # float32 weights whatever the checkpoint's dtype: precision is autocast's business
        self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        self.model.eval().requires_grad_(False).to(self.device)
        self.feature_extractor = AutoFeatureExtractor.from_pretrained(path, local_files_only=True)
        self.pad_safe = pad_safe(self.model.config)
        keep_layers(self.model, self.info.layers)

    def num_frames(self, n_samples: int) -> int:
        """Frames the encoder gives for n_samples (0 below info.min_samples)."""
        return max(0, int(num_frames(self.model, torch.tensor(int(n_samples)))))

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Utterance indices per forward pass: longest first so padding is least; padded batches where
        padding is safe, else groups of equal length; at most max_batch_samples padded samples."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        out: list[list[int]] = []
        for i in order:
            if out and (self.pad_safe or lengths[out[-1][0]] == lengths[i]) \
                    and (len(out[-1]) + 1) * lengths[out[-1][0]] <= self.max_batch_samples:
                out[-1].append(i)
            else:
                out.append([i])
        return out

    @torch.no_grad()
    def __call__(self, waveforms: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each waveform 1-D float at info.sample_rate → (num_frames(len), info.dim) float16."""
        waves = [np.asarray(w, dtype=np.float32) for w in waveforms]
        for i, w in enumerate(waves):  # all checked before any runs: the caller quarantines the short one
            if w.ndim != 1:
                raise UpstreamError(f"waveform {i} has shape {w.shape}: expected 1-D mono samples")
            if len(w) < self.info.min_samples:
                raise UpstreamError(
                    f"waveform {i} has {len(w)} samples, shorter than one frame of the encoder "
                    f"({self.info.min_samples} samples at {self.info.sample_rate} Hz)")
        fe, sr = self.feature_extractor, self.info.sample_rate
        # the feature extractor's own normalization, one utterance at a time: over its unpadded samples
        inputs = [fe(w, sampling_rate=sr, return_tensors="np")["input_values"][0] for w in waves]
        layers = list(self.info.layers)
        out: list[Optional[np.ndarray]] = [None] * len(waves)
        for batch in self._batches([len(w) for w in waves]):
            width = len(inputs[batch[0]])
            x = np.zeros((len(batch), width), dtype=np.float32)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for row, i in enumerate(batch):
                x[row, :len(inputs[i])], mask[row, :len(inputs[i])] = inputs[i], 1
            x_t = torch.from_numpy(x).to(self.device)
            mask_t = torch.from_numpy(mask).to(self.device) if self.pad_safe else None
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                enabled=self.autocast_dtype is not None):
                feats = kept_states(self.model, x_t, mask_t, layers).to(torch.float16).cpu().numpy()
            for row, i in enumerate(batch):
                out[i] = np.ascontiguousarray(feats[row, :self.num_frames(len(waves[i]))])
        return out  # type: ignore[return-value]


def pad_safe(config) -> bool:
    """Whether padding a batch leaves each utterance's features as alone (module docstring)."""
    return getattr(config, "feat_extract_norm", "layer") == "layer" and config.model_type != "data2vec-audio"


def keep_layers(model, layers: Sequence[int]) -> None:
    """Drop the transformer layers above the highest kept one: they cannot change it (at least one
    stays, whose input hook records hidden state 0)."""
    model.encoder.layers = model.encoder.layers[:max(1, max(layers))]


def num_frames(model, lengths: torch.Tensor) -> torch.Tensor:
    """Frames the encoder gives for ``lengths`` samples: hidden states come from the encoder, before
    any adapter (which would shorten them further)."""
    kw = {"add_adapter": False} if getattr(model.config, "add_adapter", False) else {}
    return model._get_feat_extract_output_lengths(lengths, **kw)


def kept_states(model, x: torch.Tensor, mask: Optional[torch.Tensor], layers: Sequence[int]) -> torch.Tensor:
    """The hidden states ``layers`` of normalized waveforms ``x`` (B, N) side by side: (B, T, dim)."""
    with warnings.catch_warnings():
        # WavLM hands torch's attention a bool padding mask beside its float position bias:
        # correct, but torch warns on every actor
        warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
        hidden = model(x, attention_mask=mask, output_hidden_states=list(layers)).hidden_states
    return torch.cat([hidden[k] for k in layers], dim=-1)


def upstream_spec(path, layers: Optional[Sequence[int]] = None) -> dict:
    """What a CTAL model needs to rebuild the upstream of folder ``path`` without it
    (``model.audio_upstream``; the CTAL config stores it, the weights travel with CTAL's): its
    UpstreamInfo, its transformers config and whether its feature extractor normalizes."""
    from transformers import AutoConfig

    info = inspect_upstream(path, layers)
    prep = json.loads((Path(path) / "preprocessor_config.json").read_text())
    config = AutoConfig.from_pretrained(path, local_files_only=True).to_dict()
    return {"info": info.to_dict(), "config": config, "do_normalize": bool(prep.get("do_normalize", True))}


class AudioUpstream(torch.nn.Module):
    """The encoder inside a CTAL model (``model.audio_upstream``): float waveforms (B, N, 1) and their
    sample mask → its kept layers side by side (B, T, dim), float32, and the frame mask: what
    ``Upstream`` stores for the same waveform (float16 there), normalized the feature extractor's way.

    ``frozen`` (fine-tuning's freeze_upstream, the default): no gradient, and eval mode whatever the
    model's (no dropout, no time masking). Unfrozen, the CNN feature encoder may stay frozen
    (``freeze_feature_encoder``, as transformers and SpeechBrain do)."""

    def __init__(self, spec: dict):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        config = dict(spec["config"])
        self.info = UpstreamInfo.from_dict(spec["info"])
        self.do_normalize = bool(spec.get("do_normalize", True))
        # LayerDrop off: a layer skipped in training would shift the hidden states the kept layers index
        config["layerdrop"] = 0.0
        self.model = AutoModel.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
        keep_layers(self.model, self.info.layers)
        self.pad_safe = pad_safe(self.model.config)
        self.frozen = True
        self.requires_grad_(False)

    def load_folder(self, path) -> None:
        """The weights of the upstream folder ``path`` (the layers kept)."""
        from transformers import AutoModel

        own = self.model.state_dict()
        theirs = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).state_dict()
        self.model.load_state_dict({k: v for k, v in theirs.items() if k in own})

    def set_trainable(self, frozen: bool, freeze_feature_encoder: bool = True, checkpointing: bool = False) -> None:
        self.frozen = frozen
        self.requires_grad_(not frozen)
        if not frozen and freeze_feature_encoder:
            self.model.feature_extractor.requires_grad_(False)
        if checkpointing and not frozen:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.train(self.training)

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)

    def samples_for(self, frames: int) -> int:
        """The most samples that give at most ``frames`` frames (≥ 1): crop limits in samples."""
        hop = round(self.info.frame_shift_ms * self.info.sample_rate / 1000)
        return (max(1, int(frames)) - 1) * hop + self.info.min_samples

    def forward(self, waves: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = waves.squeeze(-1).float(), mask.bool()
        lengths = mask.sum(1)
        if self.do_normalize:  # Wav2Vec2FeatureExtractor's zero_mean_unit_var_norm over the real samples
            n = lengths.clamp(min=1)[:, None].to(x.dtype)
            mean = (x * mask).sum(1, keepdim=True) / n
            var = (((x - mean) * mask) ** 2).sum(1, keepdim=True) / n
            x = torch.where(mask, (x - mean) / torch.sqrt(var + 1e-7), 0.0)
        frames = num_frames(self.model, lengths)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.pad_safe:
                feats = kept_states(self.model, x, mask.long(), self.info.layers)
            else:  # each utterance alone: padding would change its features (module docstring)
                T = int(frames.max())
                feats = torch.stack([torch.nn.functional.pad(
                    kept_states(self.model, x[i:i + 1, :int(n)], None, self.info.layers)[0],
                    (0, 0, 0, T - int(f))) for i, (n, f) in enumerate(zip(lengths, frames))])
        feats = feats[:, :int(frames.max())]
        return feats.float(), torch.arange(feats.shape[1], device=x.device) < frames[:, None]


# -- tiny random models, for tests and benchmarks ----------------------------------------------------------

def save_random_upstream(path, architecture: str, *, hidden_size: int = 32, num_layers: int = 2, seed: int = 0,
                         feat_extract_norm: str = "layer", conv_dim: int = 16, num_attention_heads: int = 2) -> Path:
    """A randomly initialized encoder folder built with transformers' own classes, tiny but with the
    standard CNN (strides 5,2,2,2,2,2,2; kernels 10,3,3,3,3,2,2: 20 ms frames, 400-sample minimum).
    feat_extract_norm "layer" is the large models' layout (stable layer norm, attention masks),
    "group" wav2vec2-base's (no masks); data2vec-audio is "layer" only. conv_dim=512, hidden_size=768,
    num_layers=12, num_attention_heads=12 give a base-sized one (benchmarks)."""
    from transformers import (Data2VecAudioConfig, Data2VecAudioModel, HubertConfig, HubertModel,
                              Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model, WavLMConfig, WavLMModel)

    classes = {"wav2vec2": (Wav2Vec2Config, Wav2Vec2Model), "hubert": (HubertConfig, HubertModel),
               "wavlm": (WavLMConfig, WavLMModel), "data2vec-audio": (Data2VecAudioConfig, Data2VecAudioModel)}
    if architecture not in classes:
        raise ValueError(f"architecture={architecture!r} is not one of {sorted(classes)}")
    if feat_extract_norm not in ("layer", "group"):
        raise ValueError(f"feat_extract_norm={feat_extract_norm!r} is not 'layer' or 'group'")
    layer = feat_extract_norm == "layer"
    kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_attention_heads,
              intermediate_size=(4 if conv_dim > 16 else 2) * hidden_size, conv_dim=(conv_dim,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2),
              conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_bias=layer, num_conv_pos_embedding_groups=2)
    if architecture == "data2vec-audio":
        if not layer:
            raise ValueError("data2vec-audio has layer-normed convolutions only (feat_extract_norm='layer')")
        kw.update(conv_pos_kernel_size=5)  # keeps its stack of positional convolutions (5 of them)
    else:
        kw.update(num_conv_pos_embeddings=16, feat_extract_norm=feat_extract_norm, do_stable_layer_norm=layer)
    config_cls, model_cls = classes[architecture]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kw)).eval()
    path = Path(path)
    model.save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=layer).save_pretrained(path)
    return path
