"""CTAL's Hugging Face config (``config.json`` of every checkpoint), kept beside the modeling file as
Hugging Face keeps a model's configuration: every field of ``ctal.config.ModelConfig`` plus the task
fields, the text architecture adopted from ``text_init``, an in-model upstream's shape recorded; and
the registration with transformers' Auto classes that ``ctal.model`` runs."""
from __future__ import annotations

from transformers import PretrainedConfig

from .config import ModelConfig
from .loading import MODEL_FIELDS
from .text_init import adopt_text_init
from .variants import FUSION_VARIANTS


class CTALConfig(PretrainedConfig):
    """Hugging Face config carrying every field of `ctal.config.ModelConfig` (+ task fields).

    With `text_init=DIR` the text architecture comes from DIR's config.json (`adopt_text_init`); a
    keyword given here that disagrees with DIR raises ValueError naming both values.
    """
    model_type = "ctal"

    def __init__(self, **kwargs):
        kwargs.update(adopt_text_init(kwargs, explicit=kwargs))
        defaults = ModelConfig()
        for name in MODEL_FIELDS:
            setattr(self, name, kwargs.pop(name, getattr(defaults, name)))
        # model.audio_upstream: what rebuilds the encoder without its folder (ctal.upstream.upstream_spec)
        self.audio_upstream_spec = kwargs.pop("audio_upstream_spec", None)
        if self.audio_upstream:
            from .upstream import upstream_spec

            self.audio_upstream_spec = upstream_spec(self.audio_upstream, self.audio_upstream_layers)
        if self.audio_upstream_spec:  # the stream reads the kept layers
            info = self.audio_upstream_spec["info"]
            self.audio_upstream_layers = list(info["layers"])
            self.audio_layers, self.audio_dim = len(info["layers"]), len(info["layers"]) * int(info["hidden_size"])
        if self.fusion not in FUSION_VARIANTS:
            raise ValueError(f"fusion={self.fusion!r} is not one of {list(FUSION_VARIANTS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        kwargs.setdefault("pad_token_id", self.pad_token_id)
        kwargs.setdefault("tie_word_embeddings", False)  # we tie by hand; see CTALForPretraining
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> "CTALConfig":
        # Only fields that differ from ModelConfig's defaults count as set, so text_init may replace the rest.
        defaults = ModelConfig()
        given = {k: v for k, v in vars(cfg).items() if v != getattr(defaults, k)}
        return cls(**{**given, **kwargs})


def register_auto_classes(config: type, model: type, pretraining: type, classification: type) -> None:
    """Make transformers' Auto classes load CTAL checkpoints (``ctal.model`` calls it once, at its end)."""
    # at call time: importing modeling_auto is what fires ctal/__init__.py's hook
    from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoModelForSequenceClassification

    AutoConfig.register(config.model_type, config, exist_ok=True)
    for auto, cls in ((AutoModel, model), (AutoModelForPreTraining, pretraining),
                      (AutoModelForSequenceClassification, classification)):
        auto.register(config, cls, exist_ok=True)
