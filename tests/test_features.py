import numpy as np
import pytest
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF

from ctal.features import add_deltas, compute_fbank, model_frames, normalize_utterance


def _tone(sample_rate: int, seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    noise = np.random.default_rng(seed).normal(0, 0.01, t.shape)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + noise).astype(np.float32)


def test_one_second_at_16k_gives_98_frames():
    fbank = compute_fbank(_tone(16000), 16000)
    assert fbank.shape == (98, 80) and fbank.dtype == np.float32


def test_8k_input_is_resampled_to_same_frame_count():
    assert compute_fbank(_tone(8000), 8000).shape == (98, 80)


def test_stereo_equals_mono_of_mean():
    left, right = _tone(16000, seed=1), _tone(16000, seed=2)
    stereo = np.stack([left, right], axis=1)  # soundfile layout (frames, channels)
    mono = compute_fbank((left + right) / 2, 16000)
    np.testing.assert_allclose(compute_fbank(stereo, 16000), mono, rtol=1e-5, atol=1e-4)
    # torch layout is (channels, frames)
    np.testing.assert_allclose(compute_fbank(torch.from_numpy(stereo.T.copy()), 16000), mono,
                               rtol=1e-5, atol=1e-4)


def test_int16_pcm_matches_float():
    x = _tone(16000)
    pcm = np.round(x * 32767).astype(np.int16)
    np.testing.assert_allclose(compute_fbank(pcm, 16000), compute_fbank(pcm / 32768.0, 16000),
                               rtol=1e-5, atol=1e-4)


def test_matches_kaldi_fbank_on_reference_resampled_waveform():
    x = _tone(22050, seconds=0.5)
    ref_wave = AF.resample(torch.from_numpy(x).unsqueeze(0), 22050, 16000) * 32768.0
    ref = kaldi.fbank(ref_wave, num_mel_bins=80, frame_length=25.0, frame_shift=10.0, dither=0.0,
                      sample_frequency=16000.0).numpy()
    np.testing.assert_allclose(compute_fbank(x, 22050), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target, n_mels, dither", [(16000, 80, 0.0), (16000, 40, 0.0), (8000, 80, 0.0),
                                                   (16000, 80, 1.0)])
def test_fbank_is_torchaudio_kaldi_fbank_bit_for_bit(target, n_mels, dither):
    """Our fbank caches the window and mel banks; it must stay torchaudio's Kaldi fbank exactly."""
    rng = np.random.default_rng(7)
    for n in (int(target * 0.025), int(target * 0.025) + 1, target + 37, 3 * target + 1234):
        x = (rng.normal(size=n) * 0.1 + 0.3 * np.sin(np.arange(n) / 9.0)).astype(np.float32)
        torch.manual_seed(3)
        ref = kaldi.fbank(torch.from_numpy(x).unsqueeze(0) * 32768.0, num_mel_bins=n_mels, frame_length=25.0,
                          frame_shift=10.0, dither=dither, sample_frequency=float(target)).numpy()
        torch.manual_seed(3)
        got = compute_fbank(x, target, target_sample_rate=target, num_mel_bins=n_mels, dither=dither)
        assert got.shape == ref.shape and got.dtype == np.float32
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("n", [0, 399])
def test_too_short_waveform_raises(n):
    with pytest.raises(ValueError, match="empty|too short"):
        compute_fbank(np.zeros(n, np.float32), 16000)


def test_non_finite_waveform_raises():
    x = _tone(16000)
    x[10] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        compute_fbank(x, 16000)


def test_add_deltas_appends_torchaudio_delta():
    fbank = np.random.default_rng(0).normal(size=(30, 80)).astype(np.float32)
    out = add_deltas(fbank)
    assert out.shape == (30, 160)
    np.testing.assert_array_equal(out[:, :80], fbank)
    # interior frame of the regression delta: sum_n n (c[t+n] - c[t-n]) / (2 sum_n n^2), N = 2
    t = 10
    expected = (fbank[t + 1] - fbank[t - 1] + 2 * (fbank[t + 2] - fbank[t - 2])) / 10
    np.testing.assert_allclose(out[t, 80:], expected, rtol=1e-5, atol=1e-6)


def test_normalize_utterance_zero_mean_unit_std_and_constant_dims_stay_finite():
    rng = np.random.default_rng(0)
    frames = rng.normal(5.0, 3.0, size=(200, 160)).astype(np.float32)
    frames[:, 7] = 4.2  # constant dimension
    out = normalize_utterance(frames)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-4)
    std = out.std(0)
    np.testing.assert_allclose(np.delete(std, 7), 1, atol=1e-3)
    np.testing.assert_allclose(out[:, 7], 0, atol=1e-6)


def test_model_frames_keeps_array_kind():
    fbank = compute_fbank(_tone(16000, seconds=0.3), 16000)
    out_np = model_frames(fbank)
    out_t = model_frames(torch.from_numpy(fbank))
    assert isinstance(out_np, np.ndarray) and out_np.shape == (fbank.shape[0], 160)
    assert out_np.dtype == np.float32
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    np.testing.assert_allclose(out_t.numpy(), out_np)
