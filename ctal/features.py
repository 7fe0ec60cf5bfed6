"""Waveform → acoustic frames, as CTAL's released code feeds its audio stream.

Parquet stores 80-d Kaldi-style log-mel filterbanks (`compute_fbank`); at load time `model_frames`
appends first-order deltas and normalizes per utterance, giving the 160-d frames the model eats.

Waveform layout rule: a 1-D array is mono; a 2-D **numpy** array is soundfile's (frames, channels);
a 2-D **torch** tensor is torchaudio's (channels, frames). Floating-point samples are expected in
[-1, 1] (soundfile/torchaudio default); integer PCM is scaled to that range first.
"""

import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF

# Kaldi computes on int16-scaled samples; matching it keeps log energies (and dither=1.0) meaningful.
_INT16_SCALE = 32768.0


def _to_mono_tensor(waveform) -> torch.Tensor:
    """Return a float32 (N,) tensor, downmixed by mean, following the module's layout rule."""
    if isinstance(waveform, np.ndarray):
        x = waveform
        if np.issubdtype(x.dtype, np.integer):
            x = x.astype(np.float64) / float(np.iinfo(x.dtype).max + 1)
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if x.ndim == 2:
            x = x.T  # soundfile: (frames, channels) → (channels, frames)
    elif isinstance(waveform, torch.Tensor):
        x = waveform.detach().cpu()
        if not torch.is_floating_point(x):
            x = x.double() / float(torch.iinfo(x.dtype).max + 1)
        x = x.float()
    else:
        raise TypeError(f"waveform must be a numpy array or torch tensor, got {type(waveform).__name__}")
    if x.ndim == 2:
        x = x.mean(dim=0)
    elif x.ndim != 1:
        raise ValueError(f"waveform must be 1-D (N,) or 2-D, got shape {tuple(x.shape)}")
    return x


def compute_fbank(
    waveform,
    sample_rate: int,
    *,
    target_sample_rate: int = 16000,
    num_mel_bins: int = 80,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    dither: float = 0.0,
) -> np.ndarray:
    """Kaldi-compatible log-mel filterbank, float32 (T, num_mel_bins).

    Any sample rate is resampled to `target_sample_rate`; multi-channel input is averaged. With
    Kaldi's default snip_edges, T = 1 + (N - window) // shift, e.g. 98 frames for 1 s at 16 kHz.
    """
    if sample_rate <= 0 or int(sample_rate) != sample_rate:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate}")
    x = _to_mono_tensor(waveform)
    if x.numel() == 0:
        raise ValueError("waveform is empty")
    if not torch.isfinite(x).all():
        raise ValueError("waveform contains NaN or infinite samples")
    if int(sample_rate) != target_sample_rate:
        x = AF.resample(x, int(sample_rate), int(target_sample_rate))
    window = int(target_sample_rate * frame_length_ms / 1000)
    if x.numel() < window:
        raise ValueError(
            f"waveform too short: {x.numel()} samples at {target_sample_rate} Hz, "
            f"need at least one {frame_length_ms} ms window ({window} samples)"
        )
    fbank = kaldi.fbank(
        x.unsqueeze(0) * _INT16_SCALE,
        num_mel_bins=num_mel_bins,
        frame_length=frame_length_ms,
        frame_shift=frame_shift_ms,
        dither=dither,
        sample_frequency=float(target_sample_rate),
    )
    return fbank.numpy().astype(np.float32, copy=False)


def _as_frames(frames) -> tuple[torch.Tensor, bool]:
    is_numpy = isinstance(frames, np.ndarray)
    x = torch.from_numpy(frames) if is_numpy else frames
    if x.ndim != 2:
        raise ValueError(f"expected one utterance's frames (T, D), got shape {tuple(x.shape)}")
    return x.float(), is_numpy


def add_deltas(fbank, win_length: int = 5):
    """(T, D) → (T, 2D): fbank concatenated with its first-order delta over time."""
    x, is_numpy = _as_frames(fbank)
    delta = AF.compute_deltas(x.T, win_length=win_length).T  # deltas run along the last axis
    out = torch.cat([x, delta], dim=-1)
    return out.numpy() if is_numpy else out


def normalize_utterance(frames, eps: float = 1e-5):
    """Per-utterance mean/variance normalization of each dimension; constant dims map to 0."""
    x, is_numpy = _as_frames(frames)
    x = x.double()  # float32 mean of a constant dim is off by ~1 ulp, which eps would amplify
    mean = x.mean(dim=0, keepdim=True)
    var = x.var(dim=0, unbiased=False, keepdim=True)
    out = ((x - mean) / torch.sqrt(var + eps)).float()
    return out.numpy() if is_numpy else out


def model_frames(fbank80):
    """The audio stream's input: normalize_utterance(add_deltas(fbank)), float32 (T, 160).

    Returns numpy for numpy input and torch for torch input.
    """
    return normalize_utterance(add_deltas(fbank80))

