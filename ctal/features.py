"""Waveform → acoustic frames, as CTAL's released code feeds its audio stream.

Parquet stores 80-d log-mel frames (`compute_fbank`); at load time `model_frames` appends first-order
deltas and normalizes per utterance, giving the 160-d frames the model eats. Two front ends
(`FRONTENDS`, `features.frontend`), each a pair: the stored log-mel and its load-time rule.

- "kaldi" (default): Kaldi fbank (Povey window, pre-emphasis 0.97, 512-point FFT, HTK mel, uncentred
  frames, log with an energy floor); delta width 5 with replicated edges; CMVN with 1e-5 inside the root.
- "release": the authors' librosa features, for their released weights: Hann window, no pre-emphasis,
  an FFT as long as the window (400 points), Slaney mel with area norm from 0 Hz, centred frames
  (reflect padding, librosa 0.8's), power spectrum, `log(mel + 1e-6)`; delta width 9 with librosa's
  edges (a line fitted to the first / last 9 frames); CMVN dividing by std + 1e-16. The release, too,
  takes the delta before CMVN, so it fits the same contract. Its resampler (resampy) is not ours:
  16 kHz audio (LibriSpeech) is not resampled at all.

Waveform layout rule: a 1-D array is mono; a 2-D **numpy** array is soundfile's (frames, channels);
a 2-D **torch** tensor is torchaudio's (channels, frames). Floating-point samples are expected in
[-1, 1] (soundfile/torchaudio default); integer PCM is scaled to that range first.

Sample rates: any rate in SAMPLE_RATE_RANGE (4-192 kHz) is resampled to the target. A windowed-sinc resampler's
kernel grows with the reduced ratio's numerator times denominator (16001 → 16000 Hz would need a
16000 x 16001 kernel, gigabytes), so the ratio is rounded to the nearest one with both terms at most
MAX_RESAMPLE_TERM (``resample_ratio``): every usual rate (8, 11.025, 22.05, 44.1, 48 kHz, ...) is
exact, any other is off by at most 0.05 % (under a cent of pitch, the same in duration).
"""

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF
import torchaudio.transforms as AT

# Kaldi computes on int16-scaled samples; matching it keeps log energies (and dither=1.0) meaningful.
_INT16_SCALE = 32768.0


@dataclass(frozen=True)
class LoadRule:
    """How a front end's stored log-mel becomes the model's frames: delta, then per-utterance CMVN."""
    delta_width: int
    delta_edges: str  # "replicate" (torchaudio's compute_deltas) or "interp" (librosa's default)
    var_eps: float  # added to the variance under the square root
    std_eps: float  # added to the standard deviation


FRONTENDS = {
    "kaldi": LoadRule(delta_width=5, delta_edges="replicate", var_eps=1e-5, std_eps=0.0),
    "release": LoadRule(delta_width=9, delta_edges="interp", var_eps=0.0, std_eps=1e-16),
}
RELEASE_LOG_FLOOR = 1e-6  # the release's log(mel + 1e-6)
SAMPLE_RATE_RANGE = (4000, 192000)  # source rates accepted (Hz); others are refused, by name
MAX_RESAMPLE_TERM = 1000  # bounds the resampling kernel to ~1e6 taps (module docstring)


def resample_ratio(sample_rate: int, target_sample_rate: int) -> tuple[int, int]:
    """(orig, new) for ``torchaudio.functional.resample``: the reduced ratio ``target / sample_rate``,
    or, when one of its terms exceeds MAX_RESAMPLE_TERM, the nearest ratio whose terms do not."""
    lo, hi = sorted((int(sample_rate), int(target_sample_rate)))
    g = math.gcd(lo, hi)
    ratio = Fraction(lo // g, hi // g)  # <= 1, so limiting the denominator bounds both terms
    if ratio.denominator > MAX_RESAMPLE_TERM:
        ratio = ratio.limit_denominator(MAX_RESAMPLE_TERM)
    small, large = ratio.numerator, ratio.denominator
    return (large, small) if sample_rate > target_sample_rate else (small, large)


def _rule(frontend: str) -> LoadRule:
    if frontend not in FRONTENDS:
        raise ValueError(f"frontend={frontend!r} is not one of {list(FRONTENDS)}")
    return FRONTENDS[frontend]


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


def to_waveform(waveform, sample_rate: int, target_sample_rate: int = 16000) -> torch.Tensor:
    """Mono float32 (N,) at ``target_sample_rate`` (module docstring: layout, ``resample_ratio``): what
    every front end starts from. ValueError for an empty or non-finite waveform or a rate outside
    SAMPLE_RATE_RANGE."""
    if sample_rate <= 0 or int(sample_rate) != sample_rate:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate}")
    if not SAMPLE_RATE_RANGE[0] <= sample_rate <= SAMPLE_RATE_RANGE[1]:
        raise ValueError(f"sample rate {sample_rate} Hz is outside the supported "
                         f"{SAMPLE_RATE_RANGE[0]}-{SAMPLE_RATE_RANGE[1]} Hz")
    x = _to_mono_tensor(waveform)
    if x.numel() == 0:
        raise ValueError("waveform is empty")
    if not torch.isfinite(x).all():
        raise ValueError("waveform contains NaN or infinite samples")
    orig, new = resample_ratio(int(sample_rate), int(target_sample_rate))
    return AF.resample(x, orig, new) if orig != new else x


def compute_fbank(
    waveform,
    sample_rate: int,
    *,
    target_sample_rate: int = 16000,
    num_mel_bins: int = 80,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    dither: float = 0.0,
    frontend: str = "kaldi",
) -> np.ndarray:
    """Log-mel frames of `frontend` (module docstring), float32 (T, num_mel_bins).

    A sample rate in SAMPLE_RATE_RANGE is resampled to `target_sample_rate` (``resample_ratio``;
    another raises ValueError); multi-channel input is averaged. Kaldi's
    frames are uncentred (snip_edges): T = 1 + (N - window) // shift, e.g. 98 for 1 s at 16 kHz;
    the release's are centred: T = 1 + N // shift, 101 for 1 s. Both refuse less than one window.
    """
    _rule(frontend)
    x = to_waveform(waveform, sample_rate, target_sample_rate)
    window = int(target_sample_rate * frame_length_ms / 1000)
    shift = int(target_sample_rate * frame_shift_ms / 1000)
    if x.numel() < window:
        raise ValueError(
            f"waveform too short: {x.numel()} samples at {target_sample_rate} Hz, "
            f"need at least one {frame_length_ms} ms window ({window} samples)"
        )
    if frontend == "release":
        if dither:
            raise ValueError("the release front end has no dither (features.dither is for kaldi only)")
        mel = _release_mel(int(target_sample_rate), window, shift, num_mel_bins)(x)  # (num_mel_bins, T)
        return torch.log(mel + RELEASE_LOG_FLOOR).T.contiguous().numpy().astype(np.float32, copy=False)
    return _kaldi_fbank(x * _INT16_SCALE, int(target_sample_rate), window, shift, num_mel_bins, dither).numpy()


def _kaldi_fbank(x: torch.Tensor, sample_rate: int, window: int, shift: int, n_mels: int,
                 dither: float) -> torch.Tensor:
    """``torchaudio.compliance.kaldi.fbank`` at its defaults (povey window, pre-emphasis 0.97, DC
    removed, power spectrum, log mel floored at float32 eps), op for op, so bit-identical
    (tests/test_features.py), but with the window and the mel banks built once per shape rather
    than on every call (~1 ms, a fifth to a quarter of a 2 s utterance's featurizing) and without the frame
    log energies that fbank computes and drops. ``x``: (N,) float32 at int16 scale."""
    povey, mel_banks, padded = _kaldi_tables(sample_rate, window, n_mels)
    frames = x.as_strided((1 + (x.numel() - window) // shift, window), (shift * x.stride(0), x.stride(0)))
    if dither != 0.0:
        frames = frames + torch.randn(frames.shape, dtype=frames.dtype) * dither
    frames = frames - torch.mean(frames, dim=1).unsqueeze(1)
    previous = torch.nn.functional.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)
    frames = (frames - 0.97 * previous[:, :-1]) * povey
    frames = torch.nn.functional.pad(frames.unsqueeze(0), (0, padded - window), mode="constant",
                                     value=0).squeeze(0)
    power = torch.fft.rfft(frames).abs().pow(2.0)
    return torch.max(torch.mm(power, mel_banks.T), _FLOAT32_EPS).log()


_FLOAT32_EPS = torch.tensor(torch.finfo(torch.float32).eps)


@functools.lru_cache(maxsize=8)
def _kaldi_tables(sample_rate: int, window: int, n_mels: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Kaldi fbank's povey window (1, window), mel banks (n_mels, padded // 2 + 1) and FFT length."""
    padded = 1 << (window - 1).bit_length()  # round_to_power_of_two
    povey = torch.hann_window(window, periodic=False, dtype=torch.float32).pow(0.85).unsqueeze(0)
    banks, _ = kaldi.get_mel_banks(n_mels, padded, float(sample_rate), 20.0, 0.0, 100.0, -500.0, 1.0)
    return povey, torch.nn.functional.pad(banks.float(), (0, 1), mode="constant", value=0), padded


@functools.lru_cache(maxsize=8)
def _release_mel(sample_rate: int, window: int, hop: int, n_mels: int) -> AT.MelSpectrogram:
    # the release's settings (librosa.feature.melspectrogram's defaults, n_fft = window length)
    return AT.MelSpectrogram(sample_rate=sample_rate, n_fft=window, win_length=window, hop_length=hop,
                             f_min=0.0, f_max=None, n_mels=n_mels, window_fn=torch.hann_window, power=2.0,
                             center=True, pad_mode="reflect", norm="slaney", mel_scale="slaney")


def _as_frames(frames) -> tuple[np.ndarray, Optional[torch.device]]:
    """(T, D) float32 numpy frames, and the device to hand torch input back on (None: numpy input).
    The load-time rules run in numpy: per utterance, torch's per-call overhead and its strided
    reductions over time cost the feed several times more (benchmarks/feed_throughput.py)."""
    device = None
    if isinstance(frames, torch.Tensor):
        device, frames = frames.device, frames.detach().cpu().numpy()
    x = np.asarray(frames, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected one utterance's frames (T, D), got shape {tuple(x.shape)}")
    return x, device


def _returned(x: np.ndarray, device: Optional[torch.device]):
    return x if device is None else torch.from_numpy(x).to(device)


def _fitted_deltas(x: torch.Tensor, width: int) -> torch.Tensor:
    """librosa.feature.delta's default: the least-squares slope over ``width`` frames centred on each
    frame; the first and last width // 2 frames take the slope of the line fitted to the first /
    last ``width`` frames (scipy's savgol "interp" edges). Shorter utterances: one line over all."""
    T, half = x.shape[0], width // 2
    if T < width:  # librosa refuses these; a line over the whole utterance is the same rule, shrunk
        t = torch.arange(T, dtype=x.dtype) - (T - 1) / 2
        slope = (t[:, None] * x).sum(0) / (t.square().sum() if T > 1 else 1.0)
        return slope.expand(T, -1).clone()
    k = torch.arange(-half, half + 1, dtype=x.dtype)
    inner = x.unfold(0, width, 1) @ (k / k.square().sum())  # (T - 2 half, D)
    return torch.cat([inner[:1].expand(half, -1), inner, inner[-1:].expand(half, -1)])


def _replicated_deltas(x: np.ndarray, width: int) -> np.ndarray:
    """torchaudio's compute_deltas: sum_n n (c[t+n] - c[t-n]) / (2 sum_n n^2), n = 1..width // 2,
    the first / last frame repeated beyond the edges."""
    half, T = width // 2, len(x)
    padded = np.concatenate([np.repeat(x[:1], half, 0), x, np.repeat(x[-1:], half, 0)])
    delta = np.zeros_like(x)
    for n in range(1, half + 1):
        delta += n * (padded[half + n:half + n + T] - padded[half - n:half - n + T])
    return delta / np.float32(2 * sum(n * n for n in range(1, half + 1)))


def add_deltas(fbank, win_length: int = 5, edges: str = "replicate"):
    """(T, D) → (T, 2D): fbank concatenated with its first-order delta over time. ``edges``:
    "replicate" (torchaudio's compute_deltas) or "interp" (librosa's, ``_fitted_deltas``)."""
    x, device = _as_frames(fbank)
    if edges == "replicate":
        delta = _replicated_deltas(x, win_length) if len(x) else x
    elif edges == "interp":
        delta = _fitted_deltas(torch.from_numpy(x), win_length).numpy()
    else:
        raise ValueError(f"edges={edges!r} is not 'replicate' or 'interp'")
    return _returned(np.concatenate([x, delta], axis=1), device)


def normalize_utterance(frames, eps: float = 1e-5, std_eps: float = 0.0):
    """Per-utterance mean/variance normalization of each dimension, dividing by
    sqrt(var + eps) + std_eps; constant dims map to 0."""
    x, device = _as_frames(frames)
    # float64 sums: a float32 mean of a constant dim is off by ~1 ulp, which eps would amplify
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    centred = x - mean
    var = np.square(centred).mean(axis=0, dtype=np.float64)
    centred *= (1.0 / (np.sqrt(var + eps) + std_eps)).astype(np.float32)
    return _returned(centred, device)


def model_frames(fbank80, frontend: str = "kaldi"):
    """The audio stream's input from the stored log-mel of ``frontend``: its delta, then its
    per-utterance normalization (``FRONTENDS``), float32 (T, 160). SSL features (``frontend="ssl"``)
    are the input as stored, in float32: the model weighs and projects them; a waveform's int16
    samples (T, 1) become float32 in [-1, 1) for the model's own upstream.

    Returns numpy for numpy input and torch for torch input.
    """
    if frontend == "waveform":  # int16 PCM (T, 1) → float samples in [-1, 1): the model's upstream takes them
        from .data import WAVEFORM_SCALE
        if isinstance(fbank80, torch.Tensor):
            return fbank80.float() / WAVEFORM_SCALE
        return np.asarray(fbank80, dtype=np.float32) / np.float32(WAVEFORM_SCALE)
    if frontend == "ssl":
        return fbank80.float() if isinstance(fbank80, torch.Tensor) else np.asarray(fbank80, dtype=np.float32)
    rule = _rule(frontend)
    frames = add_deltas(fbank80, win_length=rule.delta_width, edges=rule.delta_edges)
    return normalize_utterance(frames, eps=rule.var_eps, std_eps=rule.std_eps)

