"""A tiny Parquet data set in the contract's layout, written with pyarrow alone (no audio, no Ray).

Random log-mel frames and BPE-tokenized random sentences: enough for the pretraining loop and for
a fine-tuning sweep (sentiment labels in [-3, 3]) when the mechanics, not the learning, are tested.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ctal.data import FBANK_DIM, TOKENIZER_DIR, write_dataset
from ctal.tokenizer import train_bpe_tokenizer

WORDS = ("the a cat dog sat ran on under mat log happy sad very not good bad day night blue red "
         "quick slow bird sang loud soft").split()


def write_tiny_dataset(out: str | Path, n: int = 48, *, splits: tuple[str, ...] = ("train",),
                       seed: int = 0, rows_per_shard: int = 24, frames: tuple[int, int] = (30, 90)) -> Path:
    """``n`` utterances, split round-robin over ``splits`` (each split with its own speakers)."""
    out = Path(out)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) for _ in range(n)]
    tok = train_bpe_tokenizer(texts, 300, out / TOKENIZER_DIR, model_max_length=64)
    records = []
    for i, text in enumerate(texts):
        split = splits[i % len(splits)]
        t = int(rng.integers(*frames))
        records.append({
            "id": f"utt{i:04d}", "corpus": "tiny", "split": split, "speaker": f"{split}-spk{i % 4}",
            "text": text, "input_ids": np.asarray(tok(text)["input_ids"], dtype=np.int32), "n_frames": t,
            "fbank": rng.normal(size=(t, FBANK_DIM)).astype(np.float32),
            "label": float(rng.uniform(-3, 3)), "label_name": None, "duration_s": t / 100, "sample_rate": 16000,
        })
    write_dataset(out, records, tok, corpus="tiny", source="tests/tiny_data.py", rows_per_shard=rows_per_shard,
                  row_group_size=8)
    return out
