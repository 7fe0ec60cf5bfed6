import math

import pytest
import torch

from ctal.config import MaskingConfig
from ctal.masking import IGNORE_INDEX, mask_frames, mask_tokens

VOCAB, PAD, CLS, SEP, MASK = 1000, 0, 1, 2, 3
SPECIAL_IDS = [PAD, CLS, SEP, MASK]


def _token_batch(seed: int, batch: int = 64, length: int = 128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL_IDS), VOCAB, (batch, length), generator=g)
    lengths = torch.randint(10, length + 1, (batch,), generator=g)
    pos = torch.arange(length)
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    ids[pos >= lengths[:, None]] = PAD
    return ids, torch.isin(ids, torch.tensor(SPECIAL_IDS))


def _mask_tokens(ids, special, seed):
    return mask_tokens(ids, special, mask_token_id=MASK, vocab_size=VOCAB,
                       generator=torch.Generator().manual_seed(seed), special_token_ids=SPECIAL_IDS)


def test_token_masking_rates_and_split():
    n_candidates = n_chosen = n_mask = n_random = n_kept = 0
    for seed in range(20):
        ids, special = _token_batch(seed)
        masked, labels = _mask_tokens(ids, special, seed + 100)
        chosen = labels != IGNORE_INDEX
        assert not (chosen & special).any(), "special tokens or padding were chosen"
        assert torch.equal(labels[chosen], ids[chosen])
        assert torch.equal(masked[~chosen], ids[~chosen]), "unchosen positions changed"
        n_candidates += int((~special).sum())
        n_chosen += int(chosen.sum())
        n_mask += int((masked[chosen] == MASK).sum())
        n_kept += int((masked[chosen] == ids[chosen]).sum())
        randomized = masked[chosen][(masked[chosen] != MASK) & (masked[chosen] != ids[chosen])]
        assert not torch.isin(randomized, torch.tensor(SPECIAL_IDS)).any()
        n_random += len(randomized)
    assert n_chosen > 10_000
    assert abs(n_chosen / n_candidates - 0.15) < 0.015
    assert abs(n_mask / n_chosen - 0.8) < 0.015
    assert abs(n_random / n_chosen - 0.1) < 0.015
    assert abs(n_kept / n_chosen - 0.1) < 0.015


def test_token_masking_is_seeded_and_leaves_input_alone():
    ids, special = _token_batch(0)
    before = ids.clone()
    a, la = _mask_tokens(ids, special, 7)
    b, lb = _mask_tokens(ids, special, 7)
    c, _ = _mask_tokens(ids, special, 8)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert torch.equal(ids, before)


def _runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of True in a 1-D bool tensor."""
    runs, start = [], None
    for t, v in enumerate(row.tolist() + [False]):
        if v and start is None:
            start = t
        elif not v and start is not None:
            runs.append((start, t - start))
            start = None
    return runs


def _frame_batch(seed: int, batch: int = 32, max_len: int = 1000, dim: int = 4):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(300, max_len + 1, (batch,), generator=g)
    frame_mask = torch.arange(max_len) < lengths[:, None]
    frames = torch.rand(batch, max_len, dim, generator=g) + 1.0  # never 0, so zeroing is visible
    frames[~frame_mask] = 1e6  # sentinel: padding must never be chosen or copied in
    return frames, frame_mask


def test_per_span_decisions_rate_spans_and_fates():
    n_real = n_chosen = 0
    fates = {"zero": 0, "random": 0, "kept": 0}
    for seed in range(16):
        frames, frame_mask = _frame_batch(seed)
        masked, acoustic_mask = mask_frames(frames, frame_mask, MaskingConfig(frame_decide="span"),
                                            generator=torch.Generator().manual_seed(seed))
        assert not (acoustic_mask & ~frame_mask).any(), "padding was chosen"
        assert torch.equal(masked[~acoustic_mask], frames[~acoustic_mask])
        assert (masked[frame_mask] < 1e6).all(), "a padding frame was copied into a real one"
        n_real += int(frame_mask.sum())
        n_chosen += int(acoustic_mask.sum())
        for b in range(frames.shape[0]):
            n = int(frame_mask[b].sum())
            assert int(acoustic_mask[b].sum()) == math.floor(0.15 * n + 0.5)
            runs = _runs(acoustic_mask[b])
            assert all(length <= 50 for _, length in runs)
            assert sum(length < 20 for _, length in runs) <= 1, "only the clipped last span may be short"
            for start, length in runs:
                span, orig = masked[b, start:start + length], frames[b, start:start + length]
                if (span == 0).all():
                    fates["zero"] += 1
                elif torch.equal(span, orig):
                    fates["kept"] += 1
                else:
                    fates["random"] += 1
    assert abs(n_chosen / n_real - 0.15) < 0.015
    n_spans = sum(fates.values())
    assert n_spans > 1000
    for fate, p in [("zero", 0.8), ("random", 0.1), ("kept", 0.1)]:
        tol = 4 * math.sqrt(p * (1 - p) / n_spans)  # 4 binomial standard deviations
        assert abs(fates[fate] / n_spans - p) < tol, (fate, fates)


def test_per_frame_decisions_take_random_frames_from_the_same_utterance():
    """The release's default: zero / random / keep drawn for every chosen frame (80/10/10), a random
    frame copied from a real position of the same utterance, spans and rate as per span."""
    fates = {"zero": 0, "random": 0, "kept": 0}
    n_real = n_chosen = 0
    mixed_spans = 0
    for seed in range(6):
        frames, frame_mask = _frame_batch(seed)
        masked, acoustic_mask = mask_frames(frames, frame_mask, MaskingConfig(),
                                            generator=torch.Generator().manual_seed(seed))
        assert not (acoustic_mask & ~frame_mask).any()
        assert torch.equal(masked[~acoustic_mask], frames[~acoustic_mask])
        n_real += int(frame_mask.sum())
        n_chosen += int(acoustic_mask.sum())
        for b in range(frames.shape[0]):
            own = frames[b, frame_mask[b]]  # this utterance's real frames
            for t in acoustic_mask[b].nonzero().squeeze(1).tolist():
                x = masked[b, t]
                if (x == 0).all():
                    fates["zero"] += 1
                elif torch.equal(x, frames[b, t]):
                    fates["kept"] += 1
                else:
                    fates["random"] += 1
                    assert (own == x).all(1).any(), "a random frame not from the same utterance"
            for start, length in _runs(acoustic_mask[b]):
                span = masked[b, start:start + length]
                mixed_spans += bool((span == 0).all(1).any() and not (span == 0).all())
    assert abs(n_chosen / n_real - 0.15) < 0.015
    n = sum(fates.values())
    for fate, p in [("zero", 0.8), ("random", 0.1), ("kept", 0.1)]:
        assert abs(fates[fate] / n - p) < 4 * math.sqrt(p * (1 - p) / n), (fate, fates)
    assert mixed_spans > 100  # fates differ inside a span: decided per frame, not per span


def test_short_and_empty_utterances():
    frame_mask = torch.zeros(4, 40, dtype=torch.bool)
    for b, n in enumerate([0, 1, 5, 30]):
        frame_mask[b, :n] = True
    frames = torch.randn(4, 40, 3)
    _, acoustic_mask = mask_frames(frames, frame_mask, MaskingConfig(), generator=torch.Generator().manual_seed(0))
    assert acoustic_mask.sum(1).tolist() == [0, 1, 1, 5]
    assert not (acoustic_mask & ~frame_mask).any()
    for b in range(1, 4):
        assert len(_runs(acoustic_mask[b])) == 1  # below span_min: one clipped span


def test_non_prefix_padding_is_never_chosen():
    g = torch.Generator().manual_seed(3)
    frame_mask = torch.rand(8, 400, generator=g) < 0.7
    frames = torch.randn(8, 400, 2, generator=g)
    masked, acoustic_mask = mask_frames(frames, frame_mask, MaskingConfig(), generator=g)
    assert not (acoustic_mask & ~frame_mask).any()
    assert torch.equal(masked[~frame_mask], frames[~frame_mask])


def test_frame_masking_is_seeded_and_leaves_input_alone():
    frames, frame_mask = _frame_batch(0, batch=4)
    before = frames.clone()
    a, ma = mask_frames(frames, frame_mask, MaskingConfig(), generator=torch.Generator().manual_seed(5))
    b, mb = mask_frames(frames, frame_mask, MaskingConfig(), generator=torch.Generator().manual_seed(5))
    _, mc = mask_frames(frames, frame_mask, MaskingConfig(), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert not torch.equal(ma, mc)
    assert torch.equal(frames, before)


@pytest.mark.parametrize("kwargs", [{"span_min": 0}, {"span_min": 30, "span_max": 20}, {"frame_mask_prob": 1.5},
                                    {"frame_zero_prob": 0.95, "frame_random_prob": 0.1}])
def test_frame_masking_rejects_bad_settings(kwargs):
    frames, frame_mask = _frame_batch(0, batch=2)
    with pytest.raises(ValueError):
        mask_frames(frames, frame_mask, MaskingConfig(**kwargs), generator=torch.Generator().manual_seed(0))
