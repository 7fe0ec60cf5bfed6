"""Waveforms in Parquet and the upstream inside the fine-tuning model (issue 28): tiny random encoders
(``ssl_models``), the synthetic corpus."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from ctal.config import ConfigError, DataConfig, load_config
from ctal.data import open_dataset

REPO = Path(__file__).resolve().parents[1]


def wave_config(*extra) -> DataConfig:
    return load_config(DataConfig, [], ["vocab_size=300", "features.frontend=waveform", *extra])


@pytest.fixture(scope="module")
def wave_data(synthetic_corpus, ray_local, tmp_path_factory) -> Path:
    """The synthetic MOSEI corpus preprocessed by Ray Data with the waveform front end."""
    from ctal.distributed.preprocess import run_preprocess

    out = tmp_path_factory.mktemp("wave-data") / "mosei"
    run_preprocess("mosei", synthetic_corpus("mosei"), out, wave_config(), verbose=False)
    return out


def test_preprocessing_stores_the_resampled_audio_as_int16_pcm(wave_data, synthetic_corpus):
    from ctal.corpora import read_corpus
    from ctal.data import TaskData, to_pcm16
    from ctal.features import to_waveform

    ds = open_dataset(wave_data)
    assert ds.frontend == "waveform" and ds.audio.column == "waveform"
    assert ds.report["counts"]["written"] > 0 and "upstream" not in ds.report
    table = ds.read()
    assert table.schema.field("waveform").type == pa.list_(pa.int16())
    assert "fbank" not in table.column_names
    first = table.slice(0, 1).to_pylist()[0]
    row = next(r for r in read_corpus("mosei", str(synthetic_corpus("mosei"))) if r["id"] == first["id"])
    wav, sr = sf.read(row["audio_path"], dtype="float32")
    expected = to_pcm16(to_waveform(wav, sr, 16000).numpy())
    np.testing.assert_array_equal(np.asarray(first["waveform"], dtype=np.int16), expected)
    assert first["n_frames"] == len(expected)  # a waveform's n_frames counts samples

    data = TaskData.load(wave_data)
    assert data.audio.dtype == np.int16 and data.audio.shape[1] == 1
    assert int(data.n_frames.sum()) == len(data.audio)


def test_collate_gives_float_samples_cropped_at_max_frames():
    from ctal.batching import collate

    rows = [{"input_ids": np.array([0, 5, 2]), "waveform": np.array([16384, -32768, 1, 2, 3], dtype=np.int16)},
            {"input_ids": np.array([0, 2]), "waveform": np.array([100, 200], dtype=np.int16)}]
    b = collate(rows, max_frames=4, pad_token_id=1, frontend="waveform")
    assert b["frames"].shape == (2, 4, 1) and b["frames"].dtype == torch.float32
    assert b["frames"][0, :2, 0].tolist() == [0.5, -1.0]
    assert b["frame_mask"].sum(1).tolist() == [4, 2]


def test_a_waveform_shorter_than_one_window_is_quarantined(tmp_path):
    from ctal.featurize import featurize_rows
    from ctal.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a cat sat on the mat"] * 4, 300, tmp_path / "tok", model_max_length=64)
    rows = []
    for i, seconds in enumerate((0.01, 0.5)):
        t = np.arange(int(seconds * 22050)) / 22050
        sf.write(tmp_path / f"u{i}.wav", (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 22050)
        rows.append({"id": f"u{i}", "audio_path": str(tmp_path / f"u{i}.wav"), "text": "a cat sat"})
    out = featurize_rows(rows, tok, wave_config("min_duration_s=0"))
    assert out[0][1]["reason"] == "too_short" and "window" in out[0][1]["detail"]
    rec = out[1][0]
    assert rec["waveform"].dtype == np.int16 and rec["n_frames"] == len(rec["waveform"]) == 8000


@pytest.mark.parametrize("extra, message", [
    (["features.dither=1"], "features.dither"),
    (["features.ssl_layers=[1]"], "features.ssl_layers is for features.frontend=ssl"),
])
def test_waveform_settings_are_checked_with_the_config(extra, message):
    with pytest.raises(ConfigError, match=message):
        wave_config(*extra)


def test_pretraining_refuses_waveforms_saying_what_to_pretrain_on(wave_data, tmp_path):
    from ctal.config import PretrainConfig
    from ctal.pretrain import prepare

    cfg = load_config(PretrainConfig, [REPO / "configs/pretrain.yaml"], [f"data={wave_data}", f"storage_path={tmp_path}"])
    with pytest.raises(ConfigError, match="features.frontend=ssl features of that upstream"):
        prepare(cfg)
