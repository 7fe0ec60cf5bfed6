"""Real recorded human speech, not eSpeak: what synthesis never brings.

Sources are Debian packages (``.ci/run`` installs them where it can; the tests skip where none is):

- ``pocketsphinx-testdata``: LibriVox read speech (the source of LibriSpeech) and "cards" prompts,
  16 kHz, with transcriptions;
- ``asterisk-core-sounds-en-wav``: 8 kHz telephone prompts (the digits, whose transcripts their
  names give) and recorded line silence.

They are gathered into a LibriSpeech layout at test time (FLAC, as LibriSpeech ships), with two
clips made from them: one cut below ``min_duration_s`` and one padded with digital silence.
Features are held against references built without our featurizer: scipy's polyphase resampler
for the 8 kHz prompts, and the unpadded recording for the padded one.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from ctal.config import DataConfig, PretrainConfig, load_config
from ctal.data import QUARANTINE_FILE, open_dataset

REPO = Path(__file__).resolve().parents[1]
SHARE = Path(os.environ.get("CTAL_REAL_SPEECH_ROOT", "/usr/share"))
POCKETSPHINX = SHARE / "pocketsphinx/test/data"
ASTERISK = sorted((SHARE / "asterisk/sounds").glob("en*/digits"))
DIGITS = "zero one two three four five six seven eight nine".split()
PAD_S = 0.5  # digital silence before and after the padded clip: 50 frames exactly at 10 ms
INSTALL = "apt-get install pocketsphinx-testdata asterisk-core-sounds-en-wav"

pytestmark = pytest.mark.skipif(not POCKETSPHINX.is_dir() and not ASTERISK,
                                reason=f"no recorded speech on this machine ({INSTALL})")


def _transcripts(path: Path) -> dict[str, str]:
    """A Sphinx transcription file: ``<s> text </s> (utterance-id)`` per line."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*(?:<s>)?\s*(.*?)\s*(?:</s>)?\s*\((\S+)\)\s*$", line)
        if m:
            out[m.group(2)] = m.group(1)
    return out


def _chapter(root: Path, speaker: int, clips: list[tuple[np.ndarray, int, str]]) -> list[str]:
    """Write ``(waveform, rate, text)`` clips as one LibriSpeech chapter; returns their ids."""
    d = root / "dev-clean" / str(speaker) / "1"
    d.mkdir(parents=True)
    ids, lines = [], []
    for k, (wav, sr, text) in enumerate(clips):
        uid = f"{speaker}-1-{k:04d}"
        sf.write(d / f"{uid}.flac", wav, sr, subtype="PCM_16")  # lossless from the 16-bit sources
        ids.append(uid)
        lines.append(f"{uid} {text.upper()}")  # LibriSpeech transcripts are upper case
    (d / f"{speaker}-1.trans.txt").write_text("\n".join(lines) + "\n")
    return ids


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The recordings in LibriSpeech layout, and what each id should become (reason or None)."""
    root = tmp_path_factory.mktemp("real") / "LibriSpeech"
    expect, source = {}, {}
    if POCKETSPHINX.is_dir():
        for speaker, sub, trans in [(1000, "librivox", "transcription"), (2000, "cards", "cards.transcription")]:
            texts = _transcripts(POCKETSPHINX / sub / trans)
            clips = []
            for name, text in sorted(texts.items()):
                wav, sr = sf.read(POCKETSPHINX / sub / f"{name}.wav", dtype="int16")
                clips.append((wav, sr, text))
            for uid, clip in zip(_chapter(root, speaker, clips), clips):
                expect[uid], source[uid] = None, clip
        # A real recording padded with digital zeros (many corpora are cut that way) and one cut
        # below the minimum duration.
        wav, sr, text = source["1000-1-0001"]
        pad = np.zeros(int(PAD_S * sr), dtype=np.int16)
        cut = wav[: int(0.15 * sr)]
        padded_id, cut_id = _chapter(root, 1001, [(np.concatenate([pad, wav, pad]), sr, text),
                                                  (cut, sr, text.split()[0])])
        expect[padded_id], expect[cut_id] = None, "too_short"
    if ASTERISK:
        digits = ASTERISK[0]
        clips = [(*sf.read(digits / f"{n}.wav", dtype="int16"), word) for n, word in enumerate(DIGITS)]
        silence = digits.parent / "silence" / "1.wav"
        ids = _chapter(root, 3000, clips + ([(*sf.read(silence, dtype="int16"), "silence")]
                                            if silence.is_file() else []))
        for uid, clip in zip(ids, clips):
            expect[uid], source[uid] = None, clip
        if silence.is_file():  # recorded line silence: a peak of 2 LSB, below silence_peak
            expect[ids[-1]] = "all_silent"
    return root, expect, source


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory, ray_local):
    from ctal.distributed.preprocess import run_preprocess

    root, _, _ = corpus
    out = tmp_path_factory.mktemp("real-data") / "data"
    report = run_preprocess("librispeech", root, out, DataConfig(vocab_size=300), verbose=False)
    return report, out


def test_every_recording_is_written_or_quarantined_with_its_reason(corpus, prepared):
    _, expect, _ = corpus
    report, out = prepared
    ds = open_dataset(out)
    written = set(ds.read(columns=["id"]).column("id").to_pylist())
    q = pq.read_table(out / QUARANTINE_FILE)
    quarantined = dict(zip(q.column("id").to_pylist(), q.column("reason").to_pylist()))
    assert written | set(quarantined) == set(expect) and not written & set(quarantined)
    assert {u: quarantined.get(u) for u in expect} == expect
    counts = report["counts"]
    assert counts["in"] == len(expect) == counts["written"] + counts["quarantined"]


def test_8khz_telephone_speech_matches_an_independent_resampler(corpus, prepared):
    """The prompts are 8 kHz: resampled to 16 kHz, not rejected, and nothing above 4 kHz appears."""
    import torch
    import torchaudio.compliance.kaldi as kaldi
    from scipy.signal import resample_poly

    _, _, source = corpus
    ids = [u for u in source if u.startswith("3000-")]
    if not ids:
        pytest.skip(f"no 8 kHz prompts ({INSTALL})")
    table = open_dataset(prepared[1]).read().to_pandas().set_index("id")
    mel_hz = _mel_centres(80, 16000)
    low, high = mel_hz < 3400, mel_hz > 4400
    for uid in ids:
        wav, sr, _ = source[uid]
        row = table.loc[uid]
        assert sr == 8000 and row["sample_rate"] == 8000
        assert row["duration_s"] == pytest.approx(len(wav) / sr)
        fbank = np.stack(row["fbank"])
        ref = kaldi.fbank(torch.from_numpy(resample_poly(wav.astype(np.float64), 2, 1)).float()[None],
                          num_mel_bins=80, dither=0.0, sample_frequency=16000.0).numpy()
        assert fbank.shape == ref.shape == (row["n_frames"], 80)
        speech = ref[:, low].mean(axis=1) > np.percentile(ref[:, low].mean(axis=1), 50)  # louder half
        # Two different resampling filters: the speech band agrees closely, frame by frame.
        assert np.abs(fbank[speech][:, low] - ref[speech][:, low]).mean() < 0.15, uid
        assert np.corrcoef(fbank[speech][:, low].ravel(), ref[speech][:, low].ravel())[0, 1] > 0.995
        # No imaging above the source's Nyquist: those bands stay far below the speech band.
        assert fbank[speech][:, high].mean() < fbank[speech][:, low].mean() - 5.0, uid


def _mel_centres(n: int, sr: int, low: float = 20.0) -> np.ndarray:
    """Centre frequencies (Hz) of Kaldi's mel bins (1127 ln(1 + f/700), 20 Hz to Nyquist)."""
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    edges = np.linspace(mel(low), mel(sr / 2), n + 2)
    return 700.0 * (np.exp(edges[1:-1] / 1127.0) - 1.0)


def test_digital_silence_padding_shifts_the_frames_and_changes_none(corpus, prepared):
    """Frames of the padded clip over the speech are the unpadded clip's, bit for bit; the zero
    frames are finite (Kaldi's log floor), so silence never turns into -inf or NaN downstream."""
    _, _, source = corpus
    if "1000-1-0001" not in source:
        pytest.skip(f"no LibriVox recordings ({INSTALL})")
    table = open_dataset(prepared[1]).read().to_pandas().set_index("id")
    plain, padded = np.stack(table.loc["1000-1-0001", "fbank"]), np.stack(table.loc["1001-1-0000", "fbank"])
    shift = round(PAD_S * 100)  # 10 ms frames
    assert padded.shape[0] == plain.shape[0] + 2 * shift
    np.testing.assert_array_equal(padded[shift:shift + plain.shape[0]], plain)
    assert np.isfinite(padded).all()
    assert padded[:shift - 3].max() < plain.min()  # zero frames sit below every speech frame


def test_pretraining_runs_on_the_recordings_without_ray(prepared, tmp_path):
    from ctal.pretrain import pretrain_loop

    narrow = ["model.hidden_size=32", "model.num_attention_heads=4", "model.intermediate_size=64",
              "model.num_text_layers=1", "model.num_audio_layers=1"]
    cfg = load_config(PretrainConfig, [REPO / "configs/pretrain.yaml"],
                      [*narrow, f"data={prepared[1]}", "max_steps=3", "checkpoint_every=3", "batch_size=4",
                       "log_every=1", "bucket_pool_rows=8", "split=dev-clean"])
    last = pretrain_loop(cfg, run_dir=tmp_path / "run", log=lambda _: None)
    assert last["step"] == 3 and np.isfinite(last["metrics"]["loss"]) and last["metrics"]["loss"] > 0
