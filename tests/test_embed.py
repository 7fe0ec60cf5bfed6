"""pipelines/embed.py: fused embeddings for a manifest, bad rows reported and not fatal; stream vectors
follow the fusion variant's own path."""
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from ctal.batching import collate
from ctal.config import DataConfig
from ctal.corpora import read_manifest
from ctal.featurize import featurize_row
from ctal.embed import embed_rows
from ctal.model import CTALConfig, CTALForSequenceClassification, masked_mean
from ctal.tokenizer import train_bpe_tokenizer
from pipelines.embed import main as embed_main


def test_embed_writes_one_vector_per_good_row_and_reports_bad_ones(tmp_path, capsys):
    texts = ["the movie was great", "the food was awful", "a plain sentence here"]
    rng = np.random.default_rng(0)
    lines = ["id,audio_path,text"]
    for i, text in enumerate(texts):
        t = np.arange(16000 * (1 + i) // 2) / 16000
        wav = 0.3 * np.sin(2 * np.pi * (150 + 50 * i) * t) + 0.01 * rng.standard_normal(t.size)
        sf.write(tmp_path / f"u{i}.wav", wav.astype(np.float32), 16000)
        lines.append(f"u{i},u{i}.wav,{text}")
    lines.append("gone,missing.wav,no audio for this one")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")

    tok = train_bpe_tokenizer(texts * 5, vocab_size=300, out_dir=tmp_path / "ckpt" / "tokenizer")
    torch.manual_seed(0)
    cfg = CTALConfig(vocab_size=len(tok), hidden_size=32, num_attention_heads=4, intermediate_size=64,
                     num_text_layers=1, num_audio_layers=1, num_labels=2, max_audio_positions=400)
    model = CTALForSequenceClassification(cfg)
    model.save_pretrained(tmp_path / "ckpt")

    out = tmp_path / "emb.parquet"
    rc = embed_main(["--checkpoint", str(tmp_path / "ckpt"), "--manifest", str(tmp_path / "manifest.csv"),
                     "--out", str(out), "--streams", "--batch-size", "2"])
    assert rc == 0
    table = pq.read_table(out).to_pandas()
    assert list(table["id"]) == ["u0", "u1", "u2"]
    emb = np.stack(table["embedding"].to_numpy())
    assert emb.shape == (3, 64) and np.isfinite(emb).all()  # the fused vector: 2H for ctal
    assert np.stack(table["text_vector"].to_numpy()).shape == (3, 32)
    printed = capsys.readouterr().out
    assert "gone: missing_file" in printed
    assert (tmp_path / "emb.bad.csv").read_text().count("missing_file") == 1

    # batching does not change a row's vector
    rc = embed_main(["--checkpoint", str(tmp_path / "ckpt"), "--manifest", str(tmp_path / "manifest.csv"),
                     "--out", str(tmp_path / "one.parquet"), "--batch-size", "1"])
    single = np.stack(pq.read_table(tmp_path / "one.parquet").to_pandas()["embedding"].to_numpy())
    assert np.allclose(single, emb, atol=1e-5)


def test_embed_fails_cleanly_on_a_bad_checkpoint(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("audio_path,text\nx.wav,hello\n")
    assert embed_main(["--checkpoint", str(tmp_path / "nope"), "--manifest", str(tmp_path / "m.csv"),
                       "--out", str(tmp_path / "o.parquet")]) == 2
    assert "not a CTAL checkpoint" in capsys.readouterr().err


@pytest.fixture
def pairs(tmp_path):
    """Manifest rows of three utterances and a tokenizer for them."""
    texts = ["the movie was great", "the food was awful", "a plain sentence here"]
    for i in range(3):
        t = np.arange(8000 * (1 + i)) / 16000
        sf.write(tmp_path / f"u{i}.wav", (0.3 * np.sin(2 * np.pi * (150 + 50 * i) * t)).astype(np.float32), 16000)
    (tmp_path / "m.csv").write_text("id,audio_path,text\n" + "".join(f"u{i},u{i}.wav,{x}\n" for i, x in enumerate(texts)))
    tok = train_bpe_tokenizer(texts * 5, vocab_size=300, out_dir=tmp_path / "tokenizer")
    return read_manifest(tmp_path / "m.csv"), tok


def narrow_model(tok, fusion):
    torch.manual_seed(0)
    return CTALForSequenceClassification(CTALConfig(
        vocab_size=len(tok), hidden_size=32, num_attention_heads=4, intermediate_size=64, num_text_layers=1,
        num_audio_layers=1, num_labels=2, max_audio_positions=400, fusion=fusion)).eval()


def vectors(table, name):
    return np.stack(table[name].to_numpy(zero_copy_only=False))


def test_stream_vectors_follow_the_fusion_variants_own_path(pairs):
    rows, tok = pairs
    other_text = [{**r, "text": "an entirely different line"} for r in rows]

    late = narrow_model(tok, "late_concat")
    table, _ = embed_rows(late, rows, tok, streams=True)
    assert table.column_names == ["id", "embedding", "text_vector", "audio_vector"]
    batch = collate([featurize_row(r, tok, DataConfig())[0] for r in rows], max_frames=3000,
                    pad_token_id=late.config.pad_token_id)
    with torch.no_grad():  # the audio stream alone, as late_concat trains it
        _, audio = late.encode(batch["input_ids"], batch["attention_mask"], batch["frames"], batch["frame_mask"],
                               cross=False)
    assert np.allclose(vectors(table, "audio_vector"), masked_mean(audio, batch["frame_mask"]).numpy(), atol=1e-6)
    changed, _ = embed_rows(late, other_text, tok, streams=True)
    assert np.array_equal(vectors(changed, "audio_vector"), vectors(table, "audio_vector"))
    assert not np.allclose(vectors(changed, "text_vector"), vectors(table, "text_vector"))

    ctal_table, _ = embed_rows(narrow_model(tok, "ctal"), rows, tok, streams=True)
    ctal_changed, _ = embed_rows(narrow_model(tok, "ctal"), other_text, tok, streams=True)
    assert not np.allclose(vectors(ctal_changed, "audio_vector"), vectors(ctal_table, "audio_vector"))  # cross-attends

    model = narrow_model(tok, "audio_only")
    model.load_state_dict({k: v for k, v in late.state_dict().items() if k.startswith(("text.", "audio."))},
                          strict=False)  # late_concat's streams
    audio_only, _ = embed_rows(model, rows, tok, streams=True)
    assert audio_only.column_names == ["id", "embedding", "audio_vector"]
    assert np.allclose(vectors(audio_only, "audio_vector"), vectors(table, "audio_vector"), atol=1e-6)
    text_only, _ = embed_rows(narrow_model(tok, "text_only"), rows, tok, streams=True)
    assert text_only.column_names == ["id", "embedding", "text_vector"]
    assert embed_rows(late, rows, tok)[0].column_names == ["id", "embedding"]
