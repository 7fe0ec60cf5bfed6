"""pipelines/embed.py: fused embeddings for a manifest, bad rows reported and not fatal."""
import numpy as np
import pyarrow.parquet as pq
import soundfile as sf
import torch

from ctal.model import CTALConfig, CTALForSequenceClassification
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
    assert emb.shape == (3, 32) and np.isfinite(emb).all()
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
