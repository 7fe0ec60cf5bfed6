"""A fine-tuning step with the upstream inside CTAL (issue 28): frozen vs fine-tuned vs precomputed features.

    python benchmarks/upstream_finetune.py [--size base] [--batch-size 4] [--seconds 8] [--steps 3] [--device cpu]

One CTAL classification model (base: 768 wide, 3 + 3 layers) over a random base-sized WavLM
(``save_random_upstream``: 12 layers of 768, the standard CNN of 512 channels; layers [6, 12] kept),
on a batch of equal-length utterances:
- ``features``: stored SSL features in (what ``features.frontend=ssl`` gives), no upstream in the step;
- ``frozen``: waveforms in, the upstream without gradient (``freeze_upstream=true``);
- ``finetuned``: waveforms in, the upstream's transformer trained (CNN frozen, ``freeze_feature_encoder``).
Each variant runs in its own process; printed: utterances/s of a full step (forward, backward,
AdamW) after one warm-up step, and peak memory: on CUDA ``max_memory_allocated``, on the CPU the
process's peak resident set (model, optimizer and activations together).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {"base": dict(hidden_size=768, num_layers=12, conv_dim=512, num_attention_heads=12),
         "tiny": dict(hidden_size=32, num_layers=2, conv_dim=16, num_attention_heads=2)}
CTAL = {"base": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072),
        "tiny": dict(hidden_size=32, num_attention_heads=4, intermediate_size=64)}


def run_variant(variant: str, upstream: str, args) -> dict:
    import torch

    from ctal.model import CTALConfig, CTALForSequenceClassification
    from ctal.optim import build_optimizer

    top = SIZES[args.size]["num_layers"]
    layers = [min(args.layers_low, top // 2), top]
    common = dict(CTAL[args.size], num_text_layers=3, num_audio_layers=3, vocab_size=2000, num_labels=4,
                  max_audio_positions=3000)
    if variant == "features":
        width = SIZES[args.size]["hidden_size"]
        model = CTALForSequenceClassification(CTALConfig(**common, audio_dim=len(layers) * width, audio_layers=len(layers)))
    else:
        model = CTALForSequenceClassification(CTALConfig(**common, audio_upstream=upstream, audio_upstream_layers=layers))
        model.upstream.set_trainable(frozen=variant == "frozen")
    device = torch.device(args.device)
    model.to(device).train()
    opt = build_optimizer(model, argparse.Namespace(lr=1e-5, weight_decay=0.01, upstream_lr=1e-5))
    B, N = args.batch_size, int(args.seconds * 16000)
    g = torch.Generator().manual_seed(0)
    if variant == "features":
        T = (N - 400) // 320 + 1
        frames = torch.randn(B, T, model.config.audio_dim, generator=g)
        mask = torch.ones(B, T, dtype=torch.bool)
    else:
        frames = (torch.randn(B, N, 1, generator=g) * 0.1).clamp(-1, 1)
        mask = torch.ones(B, N, dtype=torch.bool)
    batch = {"input_ids": torch.randint(5, 2000, (B, 40), generator=g), "attention_mask": torch.ones(B, 40, dtype=torch.long),
             "frames": frames, "frame_mask": mask, "labels": torch.randint(0, 4, (B,), generator=g)}
    batch = {k: v.to(device) for k, v in batch.items()}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: allocator, AdamW's moments
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": variant, "utterances_per_s": B * args.steps / dt, "peak_gib": peak / 2**30,
            "trainable": model.count_parameters(trainable_only=True)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="base")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers-low", type=int, default=6)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--upstream", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:  # one variant, in its own process (clean peak memory)
        print(json.dumps(run_variant(args.variant, args.upstream, args)))
        return 0
    from ctal.upstream import save_random_upstream

    with tempfile.TemporaryDirectory() as tmp:
        up = save_random_upstream(Path(tmp) / "wavlm", "wavlm", **SIZES[args.size])
        rows = []
        for variant in ("features", "frozen", "finetuned"):
            cmd = [sys.executable, __file__, "--variant", variant, "--upstream", str(up)] + [
                a for a in (argv if argv is not None else sys.argv[1:])]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{args.size}, batch {args.batch_size} x {args.seconds:g} s, {args.steps} steps, {args.device}")
    print(f"{'variant':<10} {'utt/s':>8} {'peak GiB':>9} {'trainable':>12}")
    for r in rows:
        print(f"{r['variant']:<10} {r['utterances_per_s']:>8.2f} {r['peak_gib']:>9.2f} {r['trainable']:>12,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
