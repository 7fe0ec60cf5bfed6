"""Corpus readers against synthetic eSpeak corpora (ground truth in synthetic_meta.csv) and against
hand-written tiny layouts for the edge cases real downloads have."""

import csv
import hashlib
import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ctal.corpora import (EMOTION_CLASSES, READERS, ROW_KEYS, CorpusLayoutError, make_trials, read_corpus,
                          read_iemocap, read_librispeech, read_manifest, read_mosei)
from ctal.corpora.synthetic import BLEEP, META_FILE, VOICE_SPLIT, VOICES, plan_corpus, synthesize



@pytest.fixture(scope="session")
def corpora(synthetic_corpus):
    """The shared synthetic corpora of every layout (conftest.py)."""
    return {layout: synthetic_corpus(layout) for layout in ("librispeech", "iemocap", "mosei")}


def meta(corpus_dir: Path) -> dict[str, dict]:
    with open(corpus_dir / META_FILE, newline="", encoding="utf-8") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def file_hashes(root: Path, pattern="*") -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob(pattern)) if p.is_file()}


# ------------------------------------------------------------------------------ synthetic corpora

def test_librispeech_reader_matches_synthetic_truth(corpora):
    rows, truth = read_corpus("librispeech", corpora["librispeech"]), meta(corpora["librispeech"])
    assert [r["id"] for r in rows] == sorted(truth) and all(tuple(r) == ROW_KEYS for r in rows)
    for r in rows:
        t = truth[r["id"]]
        assert (r["text"], r["speaker"], r["split"], r["text_error"], r["label"]) == (t["text"], t["speaker"], t["split"], None, None)
        assert Path(r["audio_path"]).is_absolute() and r["audio_path"] == str(corpora["librispeech"] / t["audio_path"])
    info = sf.info(rows[0]["audio_path"])
    assert (info.format, info.samplerate) == ("FLAC", 16000)
    # root may also be one subset directory
    dev = read_librispeech(corpora["librispeech"] / "dev-clean")
    assert dev and {r["split"] for r in dev} == {"dev-clean"} and {r["id"] for r in dev} < set(truth)


def test_iemocap_reader_keeps_four_classes_merges_exc_and_drops_the_rest(corpora):
    stats = {}
    rows, truth = read_iemocap(corpora["iemocap"], stats=stats), meta(corpora["iemocap"])
    kept = {i for i, t in truth.items() if t["emotion"] in ("neu", "hap", "exc", "ang", "sad")}
    assert {r["id"] for r in rows} == kept
    n_fru = len(truth) - len(kept)
    assert stats == {"kept": len(kept), "merged_exc": sum(t["emotion"] == "exc" for t in truth.values()),
                     "dropped": {"fru": n_fru} if n_fru else {}}
    for r in rows:
        t = truth[r["id"]]
        name = "hap" if t["emotion"] == "exc" else t["emotion"]
        assert (r["label_name"], r["label"]) == (name, float(EMOTION_CLASSES.index(name)))
        assert (r["text"], r["split"], r["speaker"]) == (t["text"], t["split"], t["speaker"])
        assert r["speaker"] == f"Ses0{t['split'][-1]}_{t['gender']}"
    assert {r["split"] for r in rows} == {f"Session{s}" for s in range(1, 6)}
    assert sf.info(rows[0]["audio_path"]).samplerate == 16000


def test_mosei_reader_matches_synthetic_truth(corpora):
    rows, truth = read_mosei(corpora["mosei"]), meta(corpora["mosei"])
    assert {r["id"] for r in rows} == set(truth)
    for r in rows:
        t = truth[r["id"]]
        assert (r["label"], r["text"], r["speaker"], r["split"], r["label_name"]) == (
            float(t["label"]), t["text"], t["speaker"], t["split"], None)
        assert Path(r["audio_path"]).is_file()
    assert {r["split"] for r in rows} == {"train", "dev", "test"}


def test_fusion_label_is_text_polarity_flipped_by_ironic_prosody():
    plan = plan_corpus("mosei", 4000, seed=0)
    polarity, intensity, ironic, label = (np.array([u[k] for u in plan]) for k in ("polarity", "intensity", "ironic", "label"))
    assert np.array_equal(label, polarity * intensity * np.where(ironic == 1, -1, 1))
    assert np.abs(label).max() == 3
    nonzero = label != 0
    # Acc-2 of the best text-only rule (sign = polarity) and audio-only rule (sign from irony) is chance.
    assert abs(np.mean(np.sign(label[nonzero]) == polarity[nonzero]) - 0.5) < 0.03
    assert abs(np.mean((label[nonzero] > 0) == (ironic[nonzero] == 1)) - 0.5) < 0.03
    # ...while the pair determines it.
    assert np.all(np.sign(label[nonzero]) == polarity[nonzero] * np.where(ironic[nonzero] == 1, -1, 1))


def test_mosei_audio_carries_prosody_but_not_the_predicate(corpora):
    # The transcript has the adjective; the audio ends in the same censor tone whatever the adjective,
    # so an audio-only model cannot read the polarity (the fusion task's audio side holds by construction).
    truth = meta(corpora["mosei"])
    tails = []
    for t in truth.values():
        assert t["text"].startswith("The movie was ")
        audio, sr = sf.read(corpora["mosei"] / t["audio_path"], dtype="int16")
        tails.append(audio[-len(BLEEP):])
    assert np.abs(tails[0].astype(float) - np.rint(BLEEP)).max() <= 1
    assert all(np.array_equal(tail, tails[0]) for tail in tails)
    assert len({t["text"] for t in truth.values()}) > 5


def test_prosody_is_audible_in_the_audio(corpora):
    # Slow ironic speech and slow sad speech take longer per character than their counterparts.
    def sec_per_char(truth, key, value):
        return np.mean([float(t["duration_s"]) / len(t["text"]) for t in truth.values() if t[key] == value])
    mosei, iemocap = meta(corpora["mosei"]), meta(corpora["iemocap"])
    assert sec_per_char(mosei, "ironic", "1") > 1.3 * sec_per_char(mosei, "ironic", "0")
    assert sec_per_char(iemocap, "emotion", "sad") > 1.3 * sec_per_char(iemocap, "emotion", "ang")


def test_speakers_are_distinct_voices_with_fixed_held_out_splits(corpora):
    assert len(set(VOICES)) == len(VOICES) >= 8
    truth = meta(corpora["librispeech"])
    splits_of = {}
    for t in truth.values():
        splits_of.setdefault(t["speaker"], set()).add(t["split"])
        assert VOICE_SPLIT[int(t["speaker"]) - 1000] in t["split"]
    assert all(len(s) == 1 for s in splits_of.values())  # a speaker never crosses splits
    assert len({t["voice"] for t in meta(corpora["iemocap"]).values()}) == 10


def test_generation_is_deterministic_and_independent_of_workers(corpora, tmp_path):
    a = synthesize("mosei", tmp_path / "a", 12, seed=0, workers=1)  # the shared corpora's seed
    synthesize("mosei", tmp_path / "b", 12, seed=0, workers=2)
    assert a["n_utterances"] == 12 and file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")
    # utterance i does not depend on the corpus size: the 12 wavs equal the first 12 of the shared 60-utterance one
    small = file_hashes(tmp_path / "a", "*.wav")
    assert small.items() <= file_hashes(corpora["mosei"], "*.wav").items()


def test_synthesize_refuses_non_empty_dir_unless_overwriting_a_synthetic_corpus(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        synthesize("iemocap", tmp_path, 2, overwrite=True)  # not a synthetic corpus: never deleted
    assert (tmp_path / "notes.txt").read_text() == "mine"
    spec = importlib.util.spec_from_file_location("synth_cli", Path(__file__).parents[1] / "pipelines" / "synthesize.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "c"
    assert cli.main(["--layout", "librispeech", "--out", str(out), "--utterances", "3", "--workers", "1"])["n_utterances"] == 3
    with pytest.raises(SystemExit) as refused:  # an input error: one line, exit 2 (tests/test_hardening_data.py)
        cli.main(["--layout", "librispeech", "--out", str(out), "--utterances", "2"])
    assert refused.value.code == 2
    cli.main(["--layout", "librispeech", "--out", str(out), "--utterances", "2", "--overwrite", "--workers", "1"])
    assert len(read_librispeech(out)) == 2


def test_synthesize_from_a_script_without_a_main_guard_fails_with_the_fix_instead_of_hanging(tmp_path):
    # spawn re-imports the caller's script in each synthesis process, which then calls synthesize again
    script = tmp_path / "unguarded.py"
    script.write_text("from ctal.corpora.synthetic import synthesize\n"
                      f"synthesize('mosei', {str(tmp_path / 'out')!r}, 4, workers=2)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    got = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=env)
    assert got.returncode != 0
    assert 'if __name__ == "__main__":' in got.stderr.splitlines()[-1], got.stderr[-2000:]


# ------------------------------------------------------------------------------ hand-written layouts

def test_librispeech_missing_and_non_utf8_transcripts_mark_rows_only(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "train-clean-100" / "19" / "198"
    chapter.mkdir(parents=True)
    for utt in ("0000", "0001", "0002"):
        (chapter / f"19-198-{utt}.flac").write_bytes(b"")  # readers never open audio
    (chapter / "19-198.trans.txt").write_bytes(b"19-198-0000 CAF\xe9 AU LAIT\n19-198-0001 HELLO WORLD\n")
    other = tmp_path / "LibriSpeech" / "train-clean-100" / "19" / "227"
    other.mkdir()
    (other / "19-227-0000.flac").write_bytes(b"")  # chapter without any transcript file
    rows = {r["id"]: r for r in read_librispeech(tmp_path / "LibriSpeech")}
    assert (rows["19-198-0000"]["text"], rows["19-198-0000"]["text_error"]) == (None, "non_utf8_transcript")
    assert (rows["19-198-0001"]["text"], rows["19-198-0001"]["text_error"]) == ("HELLO WORLD", None)
    assert (rows["19-198-0002"]["text"], rows["19-198-0002"]["text_error"]) == (None, "missing_transcript")
    assert rows["19-227-0000"]["text_error"] == "missing_transcript"
    assert {r["split"] for r in rows.values()} == {"train-clean-100"}


@pytest.mark.parametrize("name, expected", [
    ("librispeech", "<speaker>-<chapter>.trans.txt"),
    ("iemocap", "Session*/dialog/EmoEvaluation/<dialog>.txt"),
    ("mosei", "<root>/wav/<video_id>_<clip_id>.wav"),
    ("csv", "audio_path, text"),
])
def test_unknown_directory_raises_layout_error_naming_the_expected_layout(tmp_path, name, expected):
    (tmp_path / "random_dir").mkdir()
    (tmp_path / "random_dir" / "readme.txt").write_text("hi")
    with pytest.raises(CorpusLayoutError, match="expected") as e:
        read_corpus(name, tmp_path / "random_dir")
    assert expected in str(e.value) and isinstance(e.value, ValueError)


def test_iemocap_hand_layout_merges_exc_drops_fru_and_flags_bad_text(tmp_path):
    s = tmp_path / "Session2"
    for d in ("sentences/wav/Ses02M_impro01", "dialog/transcriptions", "dialog/EmoEvaluation"):
        (s / d).mkdir(parents=True)
    utts = {"Ses02M_impro01_F000": "exc", "Ses02M_impro01_M000": "fru", "Ses02M_impro01_M001": "ang",
            "Ses02M_impro01_F001": "neu"}
    for u in list(utts) + ["Ses02M_impro01_F002"]:  # F002 has audio but no evaluation line
        (s / "sentences/wav/Ses02M_impro01" / f"{u}.wav").write_bytes(b"")
    (s / "dialog/EmoEvaluation/Ses02M_impro01.txt").write_text(
        "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n" + "".join(
            f"[{i}.0000 - {i}.5000]\t{u}\t{e}\t[2.5000, 2.5000, 2.5000]\nC-E1:\tX;\t()\n\n" for i, (u, e) in enumerate(utts.items())))
    (s / "dialog/EmoEvaluation/._Ses02M_impro01.txt").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    (s / "dialog/transcriptions/Ses02M_impro01.txt").write_bytes(
        b"Ses02M_impro01_F000 [000.0000-000.5000]: Great news!\n"
        b"Ses02M_impro01_M001 [002.0000-002.5000]: Caf\xe9.\nM: [LAUGHTER]\n")
    stats = {}
    rows = {r["id"]: r for r in read_iemocap(tmp_path, stats=stats)}
    assert set(rows) == {"Ses02M_impro01_F000", "Ses02M_impro01_M001", "Ses02M_impro01_F001"}
    assert (rows["Ses02M_impro01_F000"]["label_name"], rows["Ses02M_impro01_F000"]["label"]) == ("hap", 1.0)
    assert (rows["Ses02M_impro01_F000"]["text"], rows["Ses02M_impro01_F000"]["speaker"]) == ("Great news!", "Ses02_F")
    assert rows["Ses02M_impro01_M001"]["text_error"] == "non_utf8_transcript"
    assert rows["Ses02M_impro01_F001"]["text_error"] == "missing_transcript"
    assert stats == {"kept": 3, "merged_exc": 1, "dropped": {"fru": 1, "unlabeled": 1}}


def test_mosei_hand_layout_accepts_nested_wavs_and_flags_bad_text(tmp_path):
    (tmp_path / "wav" / "abc-XY_1").mkdir(parents=True)
    (tmp_path / "wav" / "abc-XY_1" / "3.wav").write_bytes(b"")
    (tmp_path / "label.csv").write_bytes(
        b"video_id,clip_id,text,label,annotation,mode\n"
        b"abc-XY_1,3,\"so, good\",2.4,Positive,valid\n"
        b"zz,0,na\xefve,-0.6,Negative,test\n"
        b"zz,1,,0,Neutral,train\n")
    rows = {r["id"]: r for r in read_mosei(tmp_path)}
    assert rows["abc-XY_1_3"]["audio_path"] == str(tmp_path / "wav" / "abc-XY_1" / "3.wav")
    assert (rows["abc-XY_1_3"]["text"], rows["abc-XY_1_3"]["label"], rows["abc-XY_1_3"]["split"]) == ("so, good", 2.4, "dev")
    assert rows["zz_0"]["audio_path"] == str(tmp_path / "wav" / "zz_0.wav")  # missing: the pipeline quarantines it
    assert (rows["zz_0"]["text_error"], rows["zz_1"]["text_error"]) == ("non_utf8_transcript", "missing_transcript")
    (tmp_path / "label.csv").write_text("video_id,clip_id,text,label,mode\nzz,0,hi,7,train\n")
    with pytest.raises(CorpusLayoutError, match="not a number in"):
        read_mosei(tmp_path)


def test_manifest_resolves_relative_paths_and_names_missing_columns(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.tsv").write_text("audio_path\ttext\tspeaker\tlabel\tlabel_name\n"
                                            "../a/x.wav\thello\ts1\t2\tang\n/abs/y.flac\t\t\t\t\n")
    rows = read_manifest(tmp_path / "sub" / "m.tsv")
    assert rows[0] == {"id": "../a/x", "corpus": "csv", "audio_path": str(tmp_path / "a" / "x.wav"), "text": "hello",
                       "text_error": None, "speaker": "s1", "split": "train", "label": 2.0, "label_name": "ang"}
    assert (rows[1]["audio_path"], rows[1]["text_error"], rows[1]["label"], rows[1]["speaker"]) == (
        "/abs/y.flac", "missing_transcript", None, "unknown")
    (tmp_path / "bad.csv").write_text("path,speaker\nx.wav,s\n")
    with pytest.raises(CorpusLayoutError, match="audio_path, text"):
        read_corpus("csv", tmp_path / "bad.csv")


def test_read_corpus_rejects_unknown_names_listing_the_known_ones():
    assert set(READERS) == {"librispeech", "iemocap", "mosei", "csv"}
    with pytest.raises(ValueError, match="csv, iemocap, librispeech, mosei"):
        read_corpus("voxceleb", "/nowhere")


# ------------------------------------------------------------------------------ trials

def test_trials_are_balanced_and_deterministic():
    rows = [{"id": f"s{s}_u{u}", "speaker": f"s{s}"} for s in range(10) for u in range(10)]
    trials = make_trials(rows, 100, seed=3)
    shuffled = random.Random(0).sample(rows, len(rows))
    assert make_trials(shuffled, 100, seed=3) == trials != make_trials(rows, 100, seed=4)
    assert sum(t[0] for t in trials) == 50 and len({t[1:] for t in trials}) == 100
    assert all((a.split("_")[0] == b.split("_")[0]) == bool(label) and a != b for label, a, b in trials)


def test_trials_on_held_out_synthetic_speakers_use_every_target_pair_when_asked(corpora):
    test_rows = [r for r in read_mosei(corpora["mosei"]) if r["split"] == "test"]
    n_target = sum(len(g) * (len(g) - 1) // 2 for g in
                   ({s: [r for r in test_rows if r["speaker"] == s] for s in {r["speaker"] for r in test_rows}}).values())
    trials = make_trials(test_rows, 2 * n_target, seed=0)
    assert sum(t[0] for t in trials) == n_target and {a for _, a, _ in trials} <= {r["id"] for r in test_rows}
    with pytest.raises(ValueError, match="target"):
        make_trials(test_rows, 2 * n_target + 2, seed=0)
