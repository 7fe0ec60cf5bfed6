"""ctal-ray's pretraining step against the release's architecture built from Hugging Face modules.

    python benchmarks/step_vs_reference.py [--sizes tiny,base] [--repeats 5] [--steps 3] [--device cpu]

The reference (``ReleaseReference``) is what the authors' release builds, from transformers' own
modules: a ``RobertaForMaskedLM`` text stream (its LM head tied to the word embeddings), an audio
stream of a frame projection feeding a ``RobertaModel`` with ``is_decoder=True,
add_cross_attention=True`` (causal self-attention over frames, cross-attention to the final text
states) and a ``RobertaLMHead`` over the 160 frame dimensions as the acoustic head; MLM cross-entropy
over all positions, L1 over the masked frames, as the release computes them. ``copy_weights`` puts
a ``CTALForPretraining``'s weights into it. The benchmark first checks both give the same losses on
one fixed collated batch (eval mode, 1e-5), then times forward + backward + clip + AdamW step of
each in interleaved rounds (train mode, dropout on), printing medians, minima and their ratio.
ctal runs with ``audio_causal=true`` here: the release's function, so the two compute the same thing.
tests/test_speed.py checks the equality on a narrow model, so this check cannot rot.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctal.config import MaskingConfig, ModelConfig, from_dict  # noqa: E402
from ctal.model import CTALConfig, CTALForPretraining  # noqa: E402

MASK_TOKEN_ID, SPECIAL_TOKEN_IDS = 4, (0, 1, 2, 3, 4)  # the byte-level BPE's <s> <pad> </s> <unk> <mask>


class ReleaseReference(nn.Module):
    """The release's pretraining model from transformers' RoBERTa modules (module docstring)."""

    def __init__(self, cfg: CTALConfig):
        super().__init__()
        from transformers import RobertaConfig, RobertaForMaskedLM, RobertaModel
        from transformers.models.roberta.modeling_roberta import RobertaLMHead

        common = dict(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                      intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act,
                      hidden_dropout_prob=cfg.hidden_dropout_prob,
                      attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
                      layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id, attn_implementation="sdpa")
        self.text = RobertaForMaskedLM(RobertaConfig(
            vocab_size=cfg.vocab_size, num_hidden_layers=cfg.num_text_layers, type_vocab_size=cfg.type_vocab_size,
            max_position_embeddings=cfg.max_position_embeddings, **common))
        self.frame_projection = nn.Linear(cfg.audio_dim, cfg.hidden_size)
        # Frame positions start after the padding row, as RoBERTa's do, so no row is a padding_idx.
        self.position_offset = cfg.pad_token_id + 1
        audio_cfg = RobertaConfig(vocab_size=cfg.pad_token_id + 1, num_hidden_layers=cfg.num_audio_layers,
                                  type_vocab_size=1, bos_token_id=None, eos_token_id=None, is_decoder=True, add_cross_attention=True, use_cache=False,
                                  max_position_embeddings=cfg.max_audio_positions + self.position_offset, **common)
        self.audio = RobertaModel(audio_cfg, add_pooling_layer=False)
        self.acoustic_head = RobertaLMHead(RobertaConfig(vocab_size=cfg.audio_dim, **common))
        self.mlm_weight, self.acoustic_weight = cfg.mlm_weight, cfg.acoustic_weight

    def forward(self, input_ids, attention_mask, frames, frame_mask, mlm_labels, acoustic_mask, target_frames):
        """(loss, mlm loss, masked acoustic loss) of one batch, as the release computes them."""
        text = self.text(input_ids, attention_mask=attention_mask, labels=mlm_labels, output_hidden_states=True)
        T = frames.shape[1]
        positions = torch.arange(T, device=frames.device)[None] + self.position_offset
        audio = self.audio(inputs_embeds=self.frame_projection(frames), attention_mask=frame_mask.long(),
                           position_ids=positions, encoder_hidden_states=text.hidden_states[-1],
                           encoder_attention_mask=attention_mask).last_hidden_state
        reconstructed = self.acoustic_head(audio)
        select = (acoustic_mask & frame_mask)[..., None].expand_as(reconstructed)
        acoustic = F.l1_loss(reconstructed.masked_select(select), target_frames.masked_select(select))
        return self.mlm_weight * text.loss + self.acoustic_weight * acoustic, text.loss, acoustic


def copy_weights(ours: CTALForPretraining, ref: ReleaseReference) -> None:
    """Put ``ours``' weights into ``ref``: every reference tensor filled (the audio word and
    token-type rows, which our model lacks, with zeros: one adds nothing, the other is never read)."""
    src = {k: v for k, v in ours.state_dict().items() if k != "mlm_head.decoder.weight"}
    offset = ref.position_offset
    renames = (("text.", "text.roberta."), ("mlm_head.decoder.", None), ("mlm_head.", "text.lm_head."),
               ("audio.embeddings.projection.", "frame_projection."), ("audio.", "audio."),
               ("acoustic_head.decoder.bias", "acoustic_head.bias"), ("acoustic_head.", "acoustic_head."))
    target = ref.state_dict()
    filled = set()
    with torch.no_grad():
        for key, value in src.items():
            old, new = next((o, n) for o, n in renames if key.startswith(o))
            name = new + key[len(old):]
            if name == "audio.embeddings.position_embeddings.weight":
                target[name][offset:offset + len(value)].copy_(value)
            else:
                if target[name].shape != value.shape:
                    raise ValueError(f"{key} {tuple(value.shape)} does not fit {name} {tuple(target[name].shape)}")
                target[name].copy_(value)
            filled.add(name)
        zeros = {"audio.embeddings.word_embeddings.weight", "audio.embeddings.token_type_embeddings.weight"}
        for name in zeros:
            target[name].zero_()
        # transformers ties the LM decoder to the word embeddings and each head's decoder bias to its bias
        ref.text.lm_head.decoder.weight = ref.text.roberta.embeddings.word_embeddings.weight
        ref.text.lm_head.decoder.bias = ref.text.lm_head.bias
        ref.acoustic_head.decoder.bias = ref.acoustic_head.bias
        tied = {"text.lm_head.decoder.weight", "text.lm_head.decoder.bias", "acoustic_head.decoder.bias"}
    unfilled = set(target) - filled - zeros - tied
    if unfilled:
        raise ValueError(f"copy_weights left reference tensors unfilled: {sorted(unfilled)[:3]}")


def reference_pair(cfg: CTALConfig, seed: int = 0) -> tuple[CTALForPretraining, ReleaseReference]:
    """A seeded ctal model and the reference holding the same weights."""
    torch.manual_seed(seed)
    ours = CTALForPretraining(cfg)
    ref = ReleaseReference(cfg)
    copy_weights(ours, ref)
    return ours, ref


def fixed_batch(cfg: CTALConfig, frames: list[int], tokens: list[int], seed: int = 0) -> dict:
    """One collated, masked pretraining batch (ctal.batching.collate, as the loop feeds it) of random
    fbank and token ids with the given lengths per utterance."""
    from ctal.batching import collate

    rng = np.random.default_rng(seed)
    rows = [{"fbank": rng.normal(size=(t, 80)).astype(np.float32),
             "input_ids": np.r_[0, rng.integers(len(SPECIAL_TOKEN_IDS), cfg.vocab_size, n - 2), 2]}
            for t, n in zip(frames, tokens)]
    return collate(rows, max_frames=cfg.max_audio_positions, pad_token_id=cfg.pad_token_id,
                   masking=MaskingConfig(), mask_token_id=MASK_TOKEN_ID, vocab_size=cfg.vocab_size,
                   special_token_ids=list(SPECIAL_TOKEN_IDS), generator=torch.Generator().manual_seed(seed))


def losses(model: nn.Module, batch: dict) -> tuple[float, float, float]:
    """(loss, mlm, acoustic) of either model on ``batch``, without dropout."""
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    model.train()
    if isinstance(out, tuple):
        return tuple(float(x) for x in out)
    return float(out.loss), float(out.mlm_loss), float(out.masked_acoustic_loss)


def size_config(size: str, **overrides) -> CTALConfig:
    import yaml

    model = from_dict(ModelConfig, yaml.safe_load((REPO / f"configs/{size}.yaml").read_text())["model"])
    return CTALConfig.from_model_config(model, audio_causal=True, **overrides)


def make_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer, sync):
    def step():
        out = model(**batch)
        loss = out[0] if isinstance(out, tuple) else out.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
    return step


def compare(size: str, args, device: torch.device) -> dict:
    from ctal.config import PretrainConfig
    from ctal.optim import build_optimizer

    cfg = size_config(size)
    ours, ref = reference_pair(cfg)
    batch = fixed_batch(cfg, args.frames, args.tokens)
    ours_l, ref_l = losses(ours, batch), losses(ref, batch)
    gap = max(abs(a - b) for a, b in zip(ours_l, ref_l))
    print(f"{size}: losses ctal {ours_l[0]:.6f} (mlm {ours_l[1]:.6f}, acoustic {ours_l[2]:.6f}), "
          f"reference {ref_l[0]:.6f}; max |diff| {gap:.1e}")
    if gap > 1e-5:
        raise SystemExit(f"{size}: the models disagree by {gap:.1e} (> 1e-5): not timing different functions")
    batch = {k: v.to(device) for k, v in batch.items()}
    ours.to(device).train(), ref.to(device).train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps = {"reference": make_step(ref, batch, torch.optim.AdamW(ref.parameters(), lr=5e-5), sync),
             "ctal": make_step(ours, batch, build_optimizer(ours, PretrainConfig()), sync)}
    for step in steps.values():
        step()  # warm-up: allocator, kernels, optimizer state
    times = {k: [] for k in steps}
    for r in range(args.repeats):
        for kind, step in steps.items():  # interleaved, so drifting load hits both alike
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[kind].append((time.perf_counter() - t) / args.steps)
        print(f"  round {r + 1}: reference {times['reference'][-1]:.2f} s/step, ctal {times['ctal'][-1]:.2f} s/step, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
    B = len(args.frames)
    rate = {k: {"median": B / statistics.median(v), "max": B / min(v)} for k, v in times.items()}
    for kind in steps:
        print(f"  {kind:>9s}: {rate[kind]['median']:7.3f} samples/s median, {rate[kind]['max']:7.3f} best")
    ratio = statistics.median(r / c for r, c in zip(times["reference"], times["ctal"]))
    print(f"  ctal / reference: {ratio:.2f}x (median of {args.repeats} interleaved rounds; "
          f"best vs best {rate['ctal']['max'] / rate['reference']['max']:.2f}x)")
    return {"size": size, "ratio": ratio, "gap": gap, **{k: v["median"] for k, v in rate.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,base")
    p.add_argument("--frames", type=lambda s: [int(x) for x in s.split(",")], default=[400, 352],
                   help="frames per utterance of the fixed batch")
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[40, 33],
                   help="tokens per utterance (with <s> and </s>)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds; medians and best are reported")
    p.add_argument("--steps", type=int, default=2, help="steps per round")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if len(args.frames) != len(args.tokens):
        p.error("--frames and --tokens need one length per utterance each")
    device = torch.device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{cpu_model()}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"step: forward + backward + clip + AdamW, batch {len(args.frames)} x frames {args.frames} x tokens "
          f"{args.tokens}, fp32, on {where}")
    for size in args.sizes.split(","):
        compare(size, args, device)
    if device.type == "cpu":
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
