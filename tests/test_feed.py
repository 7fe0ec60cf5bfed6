"""Issue 16, items 3 and 4: fine-tuning batched by a frame budget, and the pretraining feed's speed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ctal.config import ConfigError, FinetuneConfig, load_config

REPO = Path(__file__).resolve().parents[1]
NARROW = ["model.hidden_size=32", "model.num_attention_heads=4", "model.intermediate_size=64",
          "model.num_text_layers=1", "model.num_audio_layers=1", "model.max_audio_positions=600",
          "model.max_position_embeddings=66"]
BUDGET = 400  # frames per fine-tuning batch in these tests; the data holds one row longer than it


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """48 utterances with LibriSpeech-like skewed lengths (many short, a long tail, one over BUDGET)."""
    from tiny_data import WORDS

    from ctal.data import FBANK_DIM, write_dataset
    from ctal.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("feed") / "skewed"
    rng = np.random.default_rng(0)
    n = 48
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) for _ in range(n)]
    tok = train_bpe_tokenizer(texts, 300, out / "tokenizer", model_max_length=64)
    lengths = np.minimum(rng.lognormal(3.8, 0.7, n).astype(int) + 12, 350)
    lengths[5] = 520  # longer than BUDGET: a batch of its own
    splits = ["train", "train", "dev", "test"]
    records = [{"id": f"utt{i:04d}", "corpus": "tiny", "split": splits[i % 4], "speaker": f"spk{i % 3}",
                "text": text, "input_ids": np.asarray(tok(text)["input_ids"], dtype=np.int32),
                "n_frames": int(t), "fbank": rng.normal(size=(int(t), FBANK_DIM)).astype(np.float32),
                "label": float(rng.uniform(-3, 3)), "label_name": None, "duration_s": t / 100,
                "sample_rate": 16000}
               for i, (text, t) in enumerate(zip(texts, lengths))]
    write_dataset(out, records, tok, corpus="tiny", source="tests/test_feed.py", rows_per_shard=24, row_group_size=8)
    return out


def _cfg(data, *extra) -> FinetuneConfig:
    return load_config(FinetuneConfig, [REPO / "configs/finetune.yaml"],
                       [*NARROW, "task=sentiment", f"data={data}", "max_frames=600", "epochs=2", "batch_size=4",
                        "lr=1e-3", *extra])


# --------------------------------------------------------------------------------------------------
# item 3: fine-tuning by frame budget


def test_finetuning_by_frame_budget_pads_less_than_by_count_on_skewed_lengths(skewed):
    from ctal.data import TaskData
    from ctal.finetune import train_padding_efficiency
    from ctal.tasks import get_task

    data = TaskData.load(skewed)
    by_count, by_frames = _cfg(skewed), _cfg(skewed, f"max_frames_per_batch={BUDGET}")
    folds = get_task("sentiment").folds(data.meta)
    for epoch in (1, 2):
        count = train_padding_efficiency(data, folds, by_count, epoch)
        frames = train_padding_efficiency(data, folds, by_frames, epoch)
        assert frames > count + 0.02, (count, frames)


def test_frame_budget_batches_fit_and_hold_every_training_row_once_per_epoch(skewed):
    from ctal.data import TaskData
    from ctal.finetune import _train_batches
    from ctal.tasks import get_task

    data = TaskData.load(skewed)
    cfg = _cfg(skewed, f"max_frames_per_batch={BUDGET}")
    fold = get_task("sentiment").folds(data.meta)[0]
    n = np.minimum(data.n_frames[fold.train], cfg.max_frames)
    assert n.max() > BUDGET  # the long row is in the training rows
    for epoch in (1, 2, 3):
        batches = _train_batches(data, fold, cfg, epoch, 0, 1)
        assert sorted(i for b in batches for i in b) == list(range(len(fold.train)))
        for b in batches:
            assert len(b) * n[b].max() <= BUDGET or len(b) == 1, (b, n[b])
        assert any(len(b) == 1 and n[b[0]] > BUDGET for b in batches)
        assert len({len(b) for b in batches}) > 1  # by frames, not by count


def test_two_frame_budget_runs_with_one_seed_give_the_same_losses_and_metrics(skewed):
    from ctal.finetune import finetune

    cfg = _cfg(skewed, f"max_frames_per_batch={BUDGET}")
    runs = [finetune(cfg, log=lambda _: None).history for _ in range(2)]
    strip = [[{k: v for k, v in h.items() if k != "epoch_s"} for h in run] for run in runs]
    assert strip[0] == strip[1]
    assert all(0 < h["padding_efficiency"] <= 1 for h in runs[0])
    other = finetune(_cfg(skewed, f"max_frames_per_batch={BUDGET}", "seed=1", "epochs=1"),
                     log=lambda _: None).history
    assert other[0]["train_loss"] != runs[0][0]["train_loss"]  # the seed does reach the batches


def test_predictions_by_frame_budget_map_back_to_their_rows(skewed):
    from ctal.data import TaskData
    from ctal.finetune import build_model, predict
    from ctal.tasks import get_task

    data = TaskData.load(skewed)
    cfg = _cfg(skewed)
    model = build_model(cfg, get_task("sentiment"), None, data)
    idx = np.arange(len(data.n_frames))[::-1].copy()  # any order: outputs come back in this one
    by_count = predict(model, data, idx, cfg.max_frames)
    by_frames = predict(model, data, idx, cfg.max_frames, BUDGET)
    np.testing.assert_allclose(by_frames.logits, by_count.logits, atol=1e-5)
    np.testing.assert_allclose(by_frames.embeddings, by_count.embeddings, atol=1e-5)
    for k in (0, int(np.flatnonzero(idx == 5)[0]), len(idx) // 2):  # alone, each row is its own reference
        alone = predict(model, data, idx[k:k + 1], cfg.max_frames, BUDGET)
        np.testing.assert_allclose(alone.logits[0], by_frames.logits[k], atol=1e-5)


def test_a_negative_frame_budget_is_refused_naming_the_key(skewed):
    from ctal.config import validate_finetune_config

    with pytest.raises(ConfigError, match="max_frames_per_batch"):
        validate_finetune_config(_cfg(skewed, "max_frames_per_batch=-1"))


# --------------------------------------------------------------------------------------------------
# item 4: the feed's load-time rules in numpy, checked against torchaudio and a float64 CMVN


def _reference_frames(fbank: np.ndarray, frontend: str) -> np.ndarray:
    """The rules as torch computes them: torchaudio's deltas (or librosa's fitted edges), float64 CMVN."""
    import torchaudio.functional as AF

    from ctal.features import FRONTENDS, _fitted_deltas

    rule = FRONTENDS[frontend]
    x = torch.from_numpy(fbank)
    delta = (AF.compute_deltas(x.T, win_length=rule.delta_width).T if rule.delta_edges == "replicate"
             else _fitted_deltas(x, rule.delta_width))
    f = torch.cat([x, delta], 1).double()
    out = (f - f.mean(0)) / (torch.sqrt(f.var(0, unbiased=False) + rule.var_eps) + rule.std_eps)
    return out.float().numpy()


@pytest.mark.parametrize("frontend", ["kaldi", "release"])
@pytest.mark.parametrize("T", [1, 3, 9, 1234])
def test_model_frames_match_torchaudio_deltas_and_a_float64_normalization(frontend, T):
    from ctal.features import model_frames

    fbank = (np.random.default_rng(T).normal(size=(T, 80)) * 4 - 6).astype(np.float32)
    fbank[:, 3] = -2.5  # a constant dim stays exactly 0
    ref = _reference_frames(fbank, frontend)
    out = model_frames(fbank, frontend)
    assert out.dtype == np.float32 and out.shape == (T, 160)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    assert (out[:, 3] == 0).all()
    as_torch = model_frames(torch.from_numpy(fbank), frontend)
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_array_equal(as_torch.numpy(), out)


def test_collate_reads_read_only_rows_without_copying_or_touching_them():
    import pyarrow as pa

    from ctal.batching import collate

    fbank = np.random.default_rng(0).normal(size=(50, 80)).astype(np.float32)
    frozen = pa.array(fbank.ravel()).to_numpy(zero_copy_only=True).reshape(50, 80)  # Arrow memory: read-only
    assert not frozen.flags.writeable
    rows = [{"input_ids": np.array([0, 5, 2]), "fbank": frozen}]
    b = collate(rows, max_frames=40, pad_token_id=1)
    torch.testing.assert_close(b["frames"][0], torch.from_numpy(_reference_frames(fbank[:40], "kaldi")),
                               atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(frozen, fbank)
