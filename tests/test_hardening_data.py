"""Issue 15, the data side: each test reproduces one adversarial finding, scaled down (items 6, 7, 9,
13, 14, 15, 16). Only the preprocessing run of items 14/15 needs Ray (the session's ``ray_local``)."""
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ctal.config import ConfigError, DataConfig, load_config
from ctal.corpora import read_corpus
from ctal.featurize import encode_text, featurize_row
from ctal.features import MAX_RESAMPLE_TERM, compute_fbank, resample_ratio
from ctal.tokenizer import load_backend, train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _tones(seconds, sr):
    t = np.arange(int(seconds * sr)) / sr
    return (0.2 * np.sin(2 * np.pi * 300 * t) + 0.2 * np.sin(2 * np.pi * 1000 * t)
            + 0.1 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return train_bpe_tokenizer(["hello world the movie was good"] * 5, 300, d), d


# ------------------------------------------------------------------ 6: odd sample rates, bounded memory

def test_an_odd_sample_rate_resamples_fast_with_a_bounded_kernel():
    for sr in (16001, 15999, 44101, 176089):  # coprime with 16 kHz: an exact kernel is orig x new taps
        assert max(resample_ratio(sr, 16000)) <= MAX_RESAMPLE_TERM
    # usual rates stay exact (as before): 44.1 kHz is 441 → 160, 8 kHz 1 → 2
    assert resample_ratio(44100, 16000) == (441, 160) and resample_ratio(8000, 16000) == (1, 2)
    x = _tones(0.3, 16001)
    rss0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    fbank = compute_fbank(x, 16001)  # was a 16000 x 16001 kernel: gigabytes and tens of seconds
    assert time.perf_counter() - t0 < 5 and fbank.shape[1] == 80 and np.isfinite(fbank).all()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 300 * 1024  # KiB: < 300 MB more
    # against scipy's exact polyphase resampling, on the bins that carry the tones
    from scipy.signal import resample_poly
    for sr in (16001, 44101):
        x = _tones(0.3, sr)
        ours = compute_fbank(x, sr)
        ref = compute_fbank(resample_poly(x.astype(np.float64), 16000, sr).astype(np.float32), 16000)
        n = min(len(ours), len(ref))
        ours, ref = ours[2:n - 2], ref[2:n - 2]
        strong = ours > ours.max() - 10
        assert np.abs(ours - ref)[strong].mean() < 0.02 and np.abs(ours - ref)[strong].max() < 0.05


def test_a_rate_outside_the_supported_range_is_quarantined_by_name(tmp_path, tok):
    sf.write(tmp_path / "low.wav", _tones(0.5, 2000), 2000)
    sf.write(tmp_path / "odd.wav", _tones(0.5, 16001), 16001)
    rows = {r["id"]: r for r in _manifest(tmp_path, {"low": "low.wav", "odd": "odd.wav"})}
    record, bad = featurize_row(rows["low"], tok[0], DataConfig())
    assert record is None and bad["reason"] == "unsupported_sample_rate" and "2000 Hz" in bad["detail"]
    record, bad = featurize_row(rows["odd"], tok[0], DataConfig())
    assert bad is None and record["sample_rate"] == 16001 and record["n_frames"] == 48


def _manifest(d: Path, files: dict, texts: dict | None = None) -> list[dict]:
    lines = ["id,audio_path,text"] + [f"{u},{f},{(texts or {}).get(u, 'hello world')}" for u, f in files.items()]
    (d / "manifest.csv").write_text("\n".join(lines) + "\n")
    return read_corpus("csv", d / "manifest.csv")


# ------------------------------------------------------------------ 7: an exclusive claim on --out

@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_a_second_run_to_the_same_output_is_refused(tmp_path, as_uri, capsys):
    from ctal.distributed.preprocess import run_preprocess
    from ctal.outputs import claim_output, release_output

    out = f"file://{tmp_path}/data" if as_uri else tmp_path / "data"
    first = claim_output(out)  # a run that is writing `out` right now
    with pytest.raises(FileExistsError, match="being written by another run .*pid %d" % os.getpid()):
        run_preprocess("csv", tmp_path / "no.csv", out, DataConfig(), rows=[{"id": "a"}])
    with pytest.raises(FileExistsError, match="being written by another run"):
        claim_output(out)
    release_output(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, the claims folder gone
    # a claim whose process is gone is taken over, and said so
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claims = tmp_path / "data.claims"
    claims.mkdir()
    (claims / "old.json").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                 "started": "earlier"}))
    release_output(claim_output(out))
    assert "removed the claim of an earlier run that is gone" in capsys.readouterr().out
    assert not claims.exists()


def test_the_cli_refuses_a_second_run_before_ray(tmp_path, run_recipe):
    from ctal.outputs import claim_output, release_output

    sf.write(tmp_path / "a.wav", _tones(0.5, 16000), 16000)
    _manifest(tmp_path, {"a": "a.wav"})
    claim = claim_output(tmp_path / "data")
    try:
        code, err = run_recipe("preprocess", "--corpus", "csv", "--root", tmp_path / "manifest.csv",
                               "--out", tmp_path / "data")
    finally:
        release_output(claim)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert "being written by another run" in err and "Ray" not in err
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------ 9: preprocessing values, range-checked

@pytest.mark.parametrize("override,key", [
    ("num_cpus_per_task=0", "num_cpus_per_task"), ("features.num_mel_bins=40", "features.num_mel_bins"),
    ("features.frame_shift_ms=0", "features.frame_shift_ms"), ("max_duration_s=-1", "max_duration_s"),
    ("max_text_tokens=0", "max_text_tokens"), ("features.sample_rate=0", "features.sample_rate"),
    ("rows_per_shard=0", "rows_per_shard"), ("vocab_size=10", "vocab_size"),
])
def test_preprocessing_values_out_of_range_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}=.* is out of range: "):
        load_config(DataConfig, [REPO / "configs" / "preprocess.yaml"], [override])


def test_the_cli_refuses_bad_values_duplicate_ids_and_no_cpus_before_ray(tmp_path, run_recipe, capsys):
    # the same utterance in two LibriSpeech subsets: two rows with one id
    for subset in ("train-clean-100", "dev-clean"):
        chapter = tmp_path / "ls" / subset / "1000" / "10000"
        chapter.mkdir(parents=True)
        sf.write(chapter / "1000-10000-0000.flac", _tones(0.5, 16000), 16000)
        (chapter / "1000-10000.trans.txt").write_text("1000-10000-0000 HELLO WORLD\n")
    out = tmp_path / "data"
    for extra, message in ((["max_duration_s=-1"], "max_duration_s=-1.0 is out of range"),
                           ([], "utterance ids must be unique"),
                           (["--num-cpus", "0"], "num_cpus=0 (--num-cpus) is less than one actor needs")):
        code, err = run_recipe("preprocess", "--corpus", "librispeech", "--root", tmp_path / "ls", "--out", out,
                               *extra)
        assert code == 2 and message in err and "Traceback" not in err, err[-2000:]
        assert len(err.strip().splitlines()) == 1 and "Ray" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ls"]  # no output, no claim left


# ------------------------------------------------------------------ 13: true quarantine reasons

def _streamed_flac(src: Path, dest: Path) -> None:
    """``src`` with STREAMINFO's total-samples field zeroed, as a streaming encoder leaves it."""
    b = bytearray(src.read_bytes())
    assert b[:4] == b"fLaC" and b[4] & 0x7F == 0  # STREAMINFO comes first
    field = int.from_bytes(b[18:26], "big") & ~((1 << 36) - 1)  # its last 36 bits: the length
    b[18:26] = field.to_bytes(8, "big")
    dest.write_bytes(bytes(b))


def test_each_bad_file_gets_its_true_reason(tmp_path, tok):
    sf.write(tmp_path / "good.flac", _tones(1.0, 16000), 16000)
    sf.write(tmp_path / "long.flac", _tones(3.0, 16000), 16000)
    os.symlink(tmp_path / "loop_b.flac", tmp_path / "loop_a.flac")
    os.symlink(tmp_path / "loop_a.flac", tmp_path / "loop_b.flac")
    os.symlink(tmp_path / "gone.flac", tmp_path / "dangling.flac")
    (tmp_path / "dir.flac").mkdir()
    _streamed_flac(tmp_path / "good.flac", tmp_path / "streamed.flac")
    _streamed_flac(tmp_path / "long.flac", tmp_path / "streamed_long.flac")
    assert sf.info(tmp_path / "streamed.flac").frames > 10**18  # libsndfile: "unknown"
    files = {"loop": "loop_a.flac", "dir": "dir.flac", "dangling": "dangling.flac", "missing": "nope.flac",
             "streamed": "streamed.flac", "streamed_long": "streamed_long.flac"}
    rows = {r["id"]: r for r in _manifest(tmp_path, files)}
    cfg = DataConfig(max_duration_s=2.0)
    got = {u: featurize_row(rows[u], tok[0], cfg) for u in files}
    reasons = {u: (bad or {}).get("reason") for u, (_, bad) in got.items()}
    assert reasons == {"loop": "symlink_loop", "dir": "not_a_file", "dangling": "missing_file",
                       "missing": "missing_file", "streamed": None, "streamed_long": "too_long"}
    assert "symbolic link" in got["dangling"][1]["detail"] and "directory" in got["dir"][1]["detail"]
    # the streamed FLAC is read whole, as the same file with its length would be
    wav, _ = sf.read(tmp_path / "good.flac", dtype="float32")
    record = got["streamed"][0]
    np.testing.assert_array_equal(record["fbank"], compute_fbank(wav, 16000))
    assert record["duration_s"] == pytest.approx(1.0)


def test_upper_case_flac_and_a_byte_order_mark_read_correctly(tmp_path):
    chapter = tmp_path / "train-clean-100" / "1000" / "10000"
    chapter.mkdir(parents=True)
    sf.write(chapter / "1000-10000-0000.FLAC", _tones(0.5, 16000), 16000, format="FLAC")
    sf.write(chapter / "1000-10000-0001.flac", _tones(0.5, 16000), 16000)
    (chapter / "1000-10000.trans.txt").write_bytes(
        b"\xef\xbb\xbf1000-10000-0000 HELLO WORLD\n1000-10000-0001 GOOD MOVIE\n")
    rows = read_corpus("librispeech", tmp_path)
    assert [(r["id"], r["text"], r["text_error"]) for r in rows] == [
        ("1000-10000-0000", "HELLO WORLD", None), ("1000-10000-0001", "GOOD MOVIE", None)]
    assert rows[0]["audio_path"].endswith("1000-10000-0000.FLAC")


# ------------------------------------------------------------------ 14, 15: leftovers; cut transcripts

def test_a_rerun_removes_a_killed_runs_leftovers_and_counts_cut_transcripts(tmp_path, ray_local, capsys):
    from ctal.distributed.preprocess import run_preprocess

    sf.write(tmp_path / "a.wav", _tones(0.5, 16000), 16000)
    sf.write(tmp_path / "b.wav", _tones(0.5, 16000), 16000)
    rows = _manifest(tmp_path, {"a": "a.wav", "b": "b.wav"}, {"a": "hello world " * 40, "b": "hello"})
    out = tmp_path / "data"
    (tmp_path / "data.tmp-0123456789ab").mkdir()  # what a SIGKILLed run leaves
    (tmp_path / "data.tmp-0123456789ab" / ".part-00000000.parquet.x.inprogress").write_bytes(b"PAR1")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "data.claims").mkdir()
    (tmp_path / "data.claims" / "killed.json").write_text(json.dumps({"host": socket.gethostname(),
                                                                      "pid": dead.pid}))
    report = run_preprocess("csv", tmp_path / "manifest.csv", out, DataConfig(vocab_size=300, max_text_tokens=16),
                            rows=rows)
    said = capsys.readouterr().out
    assert "removed data.tmp-0123456789ab, left by an earlier run that did not finish" in said
    assert "removed the claim of an earlier run" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "b.wav", "data", "manifest.csv"]
    assert report["counts"]["text_truncated"] == 1 and report["counts"]["written"] == 2
    assert json.loads((out / "report.json").read_text())["counts"]["text_truncated"] == 1
    assert "1 transcripts cut to max_text_tokens=16" in said


def test_encode_text_says_when_it_cuts(tok):
    tokenizer, d = tok
    for t in (tokenizer, load_backend(d, 8)):
        ids, cut = encode_text(t, "hello world " * 10, 8)
        assert len(ids) == 8 and cut
        ids, cut = encode_text(t, "hello", 8)
        assert len(ids) < 8 and not cut


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_damaged_checkpoints_set_aside_are_deleted_on_the_next_run(tmp_path, as_uri):
    from ctal import storage
    from ctal.checkpoint import CheckpointStore

    aside = tmp_path / "corrupt-step-00000002-abc123"
    aside.mkdir()
    (aside / "model.safetensors").write_bytes(b"torn")
    log = []
    assert CheckpointStore(f"file://{tmp_path}" if as_uri else tmp_path).choose(log=log.append) is None
    assert storage.listdir(tmp_path) == []
    assert log == ["deleted corrupt-step-00000002-abc123, a damaged checkpoint an earlier run set aside"]


# ------------------------------------------------------------------ 16: synthesize.py input errors

@pytest.mark.parametrize("args,message", [
    (["--utterances", "0"], "--utterances must be at least 1"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--out-is-a-file"], "is a file, not a directory"),
    (["--out-not-empty"], "is not empty"),
])
def test_synthesize_input_errors_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    from pipelines.synthesize import main

    out = tmp_path / "corpus"
    if args == ["--out-is-a-file"]:
        out.write_text("x")
        args = []
    elif args == ["--out-not-empty"]:
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
        args = []
    with pytest.raises(SystemExit) as exit_:
        main(["--layout", "mosei", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err
    # Ray's log monitor may print, into this test's stderr, the death of an actor an earlier test left:
    # those lines carry Ray's "(ActorName pid=N)" prefix, ours never do.
    ours = [line for line in err.splitlines() if not re.match(r"(\x1b\[\d+m)?\(\S+.* pid=\d+", line)]
    assert len([line for line in ours if "error" in line]) == 1
