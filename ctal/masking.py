"""CTAL pretraining masks: masked language modelling on tokens, span masking on acoustic frames.

All randomness comes from the `torch.Generator` passed in (a CPU one: masks are drawn in collate), so
a collate seeded from (seed, step) reproduces the same masks after a restart. Inputs are never
modified in place; tensors may live on any device.
"""

import torch

IGNORE_INDEX = -100  # label for positions the MLM loss skips (torch CrossEntropyLoss default)
# masking.span_min / span_max count frames of this shift (the paper's 10 ms filterbank frames)
SPAN_FRAME_MS = 10.0


def spans_at(masking, frame_shift_ms: float):
    """A MaskingConfig whose spans last as many milliseconds at ``frame_shift_ms`` frames (e.g. SSL
    features' 20 ms: spans of 20-50 frames become 10-25), at least one frame each."""
    if frame_shift_ms == SPAN_FRAME_MS:
        return masking
    from dataclasses import replace

    scale = SPAN_FRAME_MS / frame_shift_ms
    return replace(masking, span_min=max(1, round(masking.span_min * scale)),
                   span_max=max(1, round(masking.span_max * scale)))


def _check_probs(**probs: float) -> None:
    for name, p in probs.items():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")


def _rand(shape, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device)


def mask_tokens(
    input_ids: torch.Tensor,
    special_tokens_mask: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
    mask_prob: float = 0.15,
    replace_prob: float = 0.8,
    random_prob: float = 0.1,
    special_token_ids=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style MLM masking (as HF's DataCollatorForLanguageModeling).

    Each non-special position is chosen with probability `mask_prob` (Bernoulli); a chosen position
    becomes `mask_token_id` with `replace_prob`, a random token with `random_prob`, else stays.
    `special_tokens_mask` is True for special tokens and padding, which are never chosen. Random
    tokens avoid `special_token_ids` when given. Returns (masked_input_ids, mlm_labels) with labels
    = original id at chosen positions and -100 elsewhere.
    """
    if input_ids.shape != special_tokens_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and special_tokens_mask "
                         f"{tuple(special_tokens_mask.shape)} differ in shape")
    _check_probs(mask_prob=mask_prob, replace_prob=replace_prob, random_prob=random_prob)
    if replace_prob + random_prob > 1.0 + 1e-9:
        raise ValueError(f"replace_prob + random_prob must be <= 1, got {replace_prob + random_prob}")
    device = input_ids.device
    special = special_tokens_mask.to(device=device, dtype=torch.bool)

    chosen = (_rand(input_ids.shape, generator) < mask_prob).to(device) & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    # One uniform draw per position splits the chosen ones into [MASK] / random / kept.
    u = _rand(input_ids.shape, generator).to(device)
    to_mask = chosen & (u < replace_prob)
    to_random = chosen & (u >= replace_prob) & (u < replace_prob + random_prob)

    candidates = torch.arange(vocab_size)
    if special_token_ids is not None:
        special_ids = torch.as_tensor(list(special_token_ids), dtype=torch.long)
        candidates = candidates[~torch.isin(candidates, special_ids)]
        if len(candidates) == 0:
            raise ValueError("special_token_ids cover the whole vocabulary: no random replacement tokens")
    pick = torch.randint(len(candidates), input_ids.shape, generator=generator, device=generator.device)
    random_ids = candidates.to(pick.device)[pick].to(device=device, dtype=input_ids.dtype)

    masked = input_ids.clone()
    masked[to_mask] = mask_token_id
    masked[to_random] = random_ids[to_random]
    return masked, labels


def _span_lengths(target: int, span_min: int, span_max: int, generator: torch.Generator) -> list[int]:
    """Uniform lengths in [span_min, span_max] summing exactly to `target`; the last one is clipped."""
    lengths, total = [], 0
    while total < target:
        n_draw = (target - total) // span_min + 1  # enough draws to reach the target in one go
        for length in torch.randint(span_min, span_max + 1, (n_draw,), generator=generator).tolist():
            length = min(length, target - total)
            lengths.append(length)
            total += length
            if total == target:
                break
    return lengths


def _span_starts(lengths: list[int], n: int, generator: torch.Generator) -> list[int]:
    """Random non-overlapping starts for spans of `lengths` within n frames.

    Spans and gaps are arranged uniformly at random; one free frame separates consecutive spans when
    there is room, so every span stays a distinct contiguous run.
    """
    k, target = len(lengths), sum(lengths)
    sep = 1 if n - target >= k - 1 else 0
    # Choose k distinct slots among the (free frames + k) positions; span i starts after slot p_i.
    slots = n - target - sep * (k - 1) + k
    picks = torch.randperm(slots, generator=generator)[:k].sort().values.tolist()
    starts, offset = [], 0
    for i, (p, length) in enumerate(zip(picks, lengths)):
        starts.append(p - i + offset + sep * i)
        offset += length
    return starts


def mask_frames(frames: torch.Tensor, frame_mask: torch.Tensor, masking, *,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Span masking of acoustic frames, as in CTAL's (Mockingjay-derived) released code, with the
    ``frame_*`` and ``span_*`` settings of ``masking`` (a MaskingConfig: the paper's defaults live there).

    For an utterance with n real frames (`frame_mask` True), round(mask_prob * n) frames (at least 1
    when n > 0 and mask_prob > 0) are chosen as non-overlapping spans of uniform length in
    [span_min, span_max], the last span clipped so the total is exact. `decide="frame"` (the
    release's): each chosen frame is zeroed with `zero_prob`, replaced by a random real frame of the
    same utterance with `random_prob`, else kept. `decide="span"`: one such draw per span, random
    frames from the whole batch. Returns (masked_frames, acoustic_mask) where acoustic_mask marks all
    chosen frames (the L1 loss scores them, kept ones included); padding is never chosen.
    """
    mask_prob, zero_prob, random_prob = masking.frame_mask_prob, masking.frame_zero_prob, masking.frame_random_prob
    span_min, span_max, decide = masking.span_min, masking.span_max, masking.frame_decide
    if decide not in ("frame", "span"):
        raise ValueError(f"decide must be 'frame' or 'span', got {decide!r}")
    if frames.ndim != 3 or frame_mask.shape != frames.shape[:2]:
        raise ValueError(f"expected frames (B, T, D) and frame_mask (B, T), got "
                         f"{tuple(frames.shape)} and {tuple(frame_mask.shape)}")
    _check_probs(mask_prob=mask_prob, zero_prob=zero_prob, random_prob=random_prob)
    if zero_prob + random_prob > 1.0 + 1e-9:
        raise ValueError(f"zero_prob + random_prob must be <= 1, got {zero_prob + random_prob}")
    if not 1 <= span_min <= span_max:
        raise ValueError(f"need 1 <= span_min <= span_max, got {span_min}, {span_max}")

    real = frame_mask.detach().to("cpu", torch.bool)
    real_flat = real.reshape(-1).nonzero().squeeze(1)  # donors for random replacement
    acoustic_mask = torch.zeros_like(real)
    zeroed = torch.zeros_like(real)
    replaced = torch.zeros_like(real)
    donor_of = torch.full(real.shape, -1, dtype=torch.long)  # per-frame: flat index of its donor
    T = real.shape[1]
    for b in range(real.shape[0]):
        positions = real[b].nonzero().squeeze(1)  # spans run over real frames, wherever padding sits
        n = len(positions)
        target = int(mask_prob * n + 0.5)  # round half up
        if n > 0 and mask_prob > 0:
            target = max(target, 1)
        if target == 0:
            continue
        lengths = _span_lengths(target, span_min, span_max, generator)
        starts = _span_starts(lengths, n, generator)
        if decide == "span":
            fate = torch.rand(len(lengths), generator=generator).tolist()
            for start, length, u in zip(starts, lengths, fate):
                span = positions[start:start + length]
                acoustic_mask[b, span] = True
                if u < zero_prob:
                    zeroed[b, span] = True
                elif u < zero_prob + random_prob:
                    replaced[b, span] = True
            continue
        chosen = torch.cat([positions[start:start + length] for start, length in zip(starts, lengths)])
        acoustic_mask[b, chosen] = True
        u = torch.rand(len(chosen), generator=generator)
        zeroed[b, chosen[u < zero_prob]] = True
        swap = chosen[(u >= zero_prob) & (u < zero_prob + random_prob)]
        donor_of[b, swap] = b * T + positions[torch.randint(n, (len(swap),), generator=generator)]

    masked = frames.clone()
    device = frames.device
    masked[zeroed.to(device)] = 0.0
    if decide == "frame":
        swap = donor_of >= 0
        if swap.any():  # donors read the unmasked input: a donor zeroed itself still gives its frame
            masked[swap.to(device)] = frames.reshape(-1, frames.shape[-1])[donor_of[swap].to(device)]
        return masked, acoustic_mask.to(device)
    n_replaced = int(replaced.sum())
    if n_replaced:
        donors = real_flat[torch.randint(len(real_flat), (n_replaced,), generator=generator)]
        masked[replaced.to(device)] = frames.reshape(-1, frames.shape[-1])[donors.to(device)]
    return masked, acoustic_mask.to(device)
