"""The fusion variants: what each one pools, from which stream, and how it combines (one table).

Torch-free, so a config naming a variant is checked without importing the model (ctal.config), and
the model (ctal.model.Fusion), the sweeps and the ablations read the same table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

POOLS = ("first", "max", "mean", "attention")


@dataclass(frozen=True)
class FusionVariant:
    """What one fusion variant computes; `FUSION_VARIANTS` below is the only place variants are defined.

    pairs: one (text pool, audio pool) per part of z; None where that stream is not pooled.
    text, audio: which streams run. cross_attention: the audio stream attends to the final text states.
    combine: "sum" puts t + a of a matched pair in one part and adds |cos(t, a)| to the orthogonality
    loss (the paper's orthogonal fusion); "concat" puts them side by side, no orthogonality term.
    """
    name: str
    pairs: tuple[tuple[Optional[str], Optional[str]], ...]
    text: bool
    audio: bool
    cross_attention: bool
    combine: str = "sum"

    def __post_init__(self):
        pools = [p for pair in self.pairs for p in pair if p is not None]
        problems = [f"unknown pool {p!r} (known: {', '.join(POOLS)})" for p in pools if p not in POOLS]
        if self.combine not in ("sum", "concat"):
            problems.append(f"combine={self.combine!r} is neither 'sum' nor 'concat'")
        if any(t is None and a is None for t, a in self.pairs) or not self.pairs:
            problems.append("every pair needs a text or an audio pool")
        if any(t == "attention" for t, _ in self.pairs):
            problems.append("the attention pool scores audio frames only")
        if self.cross_attention and not (self.text and self.audio):
            problems.append("cross-attention needs both streams")
        # a stream runs exactly when something reads it: its pools, or the audio's cross-attention
        for stream, runs, read in (("text", self.text, bool(self.text_pools) or self.cross_attention),
                                   ("audio", self.audio, bool(self.audio_pools))):
            if runs != read:
                problems.append(f"{stream}={runs}, but " + ("no pool or cross-attention reads that stream"
                                                            if runs else "a pool or cross-attention reads it"))
        if problems:
            raise ValueError(f"fusion variant {self.name!r}: {'; '.join(problems)}")

    @property
    def text_pools(self) -> list[str]:
        return sorted({t for t, _ in self.pairs if t})

    @property
    def audio_pools(self) -> list[str]:
        return sorted({a for _, a in self.pairs if a})

    @property
    def orthogonal(self) -> bool:
        return self.combine == "sum" and any(t and a for t, a in self.pairs)

    def fused_width(self, hidden_size: int) -> int:
        """Width of z, the concatenated parts the fusion's dense layer reads (and writes)."""
        matched = sum(1 for t, a in self.pairs if t and a)
        return (len(self.pairs) + (matched if self.combine == "concat" else 0)) * hidden_size


FUSION_VARIANTS: dict[str, FusionVariant] = {v.name: v for v in (
    # the paper's (and the release's, orthogonal_fusion=True): [t_first + a_att ; t_max + a_max]
    FusionVariant("ctal", (("first", "attention"), ("max", "max")),
                  text=True, audio=True, cross_attention=True),
    # the release's non-orthogonal fusion (orthogonal_fusion=False): [t_first ; a_att], no orthogonality term
    FusionVariant("ctal_concat", (("first", "attention"),),
                  text=True, audio=True, cross_attention=True, combine="concat"),
    FusionVariant("first_token", (("first", "first"),), text=True, audio=True, cross_attention=True),
    FusionVariant("mean_pool", (("mean", "mean"),), text=True, audio=True, cross_attention=True),
    # the baseline without a cross-modal layer: the unimodal pooled vectors side by side
    FusionVariant("late_concat", (("first", "attention"), ("max", "max")),
                  text=True, audio=True, cross_attention=False, combine="concat"),
    # the release's single-stream heads (head=semantic / head=acoustic)
    FusionVariant("text_only", (("first", None), ("max", None)), text=True, audio=False, cross_attention=False),
    FusionVariant("audio_only", ((None, "attention"), (None, "max")),
                  text=False, audio=True, cross_attention=False),
)}
