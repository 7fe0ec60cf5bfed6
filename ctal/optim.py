"""The optimizer and learning-rate schedule of both loops (pretraining and fine-tuning).

One schedule, Hugging Face's ``get_linear_schedule_with_warmup``: the rate multiplier is
``step / warmup`` during warmup (0 at step 0, so the first optimizer step only fills AdamW's
moments) and then falls linearly to 0 at ``total_steps``. ``warmup = round(warmup_ratio x total)``.
"""
from __future__ import annotations

from typing import Callable

import torch


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW (cfg.lr, cfg.weight_decay) over trainable parameters; no weight decay on biases,
    LayerNorm and other 1-d parameters (as BERT/nanoGPT). A fine-tuned upstream inside the model
    (``model.upstream``) has groups of its own at ``cfg.upstream_lr`` when set."""
    upstream = getattr(model, "upstream", None)
    own = {id(p) for p in upstream.parameters()} if upstream is not None else set()
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())  # tied weights once
    groups = []
    for lr, ps in ((cfg.lr, [p for p in params if id(p) not in own]),
                   (getattr(cfg, "upstream_lr", None) or cfg.lr, [p for p in params if id(p) in own])):
        groups += [{"params": [p for p in ps if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr": lr},
                   {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
    groups = groups[:2] + [g for g in groups[2:] if g["params"]]  # the upstream's only when it trains
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused_adamw_supported(params))


def fused_adamw_supported(params) -> bool:
    """AdamW's fused kernel (one pass over each parameter instead of foreach's several) serves
    floating parameters all on the CPU or all on one CUDA device; else foreach, the default."""
    devices = {p.device.type for p in params}
    return bool(params) and len(devices) == 1 and devices <= {"cpu", "cuda"} and all(
        p.is_floating_point() for p in params)


def linear_warmup_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The lr multiplier at ``step`` (module docstring): HF's linear schedule with warmup."""
    def fn(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return fn


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_ratio: float,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``linear_warmup_decay`` over ``total_steps`` optimizer steps, stepped once per optimizer step."""
    warmup = round(warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(warmup, total_steps))
