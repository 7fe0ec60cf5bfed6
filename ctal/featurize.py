"""One utterance → a record of the Parquet contract (ctal.data.PARQUET_SCHEMA) or a quarantine entry
with its reason (ctal.data.QUARANTINE_REASONS): ``featurize_row``.

Plain Python (no Ray), so the Ray Data actors (ctal.distributed.preprocess), ``embed``, the
benchmarks and the tests all call the same code; the BPE a data set's transcripts train is here too.
"""
from __future__ import annotations

import errno
import functools
import math
import os
import stat
from pathlib import Path
from typing import Optional

import numpy as np

from .data import QUARANTINE_REASONS

# libsndfile's frame count for a stream whose header leaves the length open (a streamed FLAC)
_UNKNOWN_LENGTH = 2**63 - 1


@functools.lru_cache(maxsize=None)
def _audio_extensions() -> frozenset:
    """File extensions libsndfile decodes (its format names plus the usual aliases)."""
    import soundfile as sf

    exts = {f.lower() for f in sf.available_formats()} - {"raw"}  # raw needs a layout we lack
    exts |= {"wave", "oga", "opus", "aif", "aifc", "snd", "sph", "mat", "sf", "8svx"}
    return frozenset(exts)


def _wav_truncation(path: str) -> Optional[str]:
    """libsndfile silently reads what is left of a truncated RIFF/WAVE file, so compare the
    'data' chunk size its header declares with the bytes present."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        size = Path(path).stat().st_size
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None  # no data chunk: libsndfile will have refused the file already
            cid, clen = chunk[:4], int.from_bytes(chunk[4:], "little")
            if cid == b"data":
                if clen in (0, 0xFFFFFFFF):  # streaming writers leave the size unknown
                    return None
                have = size - f.tell()
                return (f"truncated: header declares {clen} audio bytes, file holds {have}"
                        if have < clen else None)
            f.seek(clen + (clen & 1), 1)  # chunks are word-aligned


def _quarantine(row: dict, reason: str, detail: str) -> tuple[None, dict]:
    if reason not in QUARANTINE_REASONS:  # the report counts by reason: no reason outside the list
        raise ValueError(f"unknown quarantine reason {reason!r}; known: {', '.join(QUARANTINE_REASONS)}")
    return None, {"id": str(row.get("id")), "audio_path": str(row.get("audio_path")),
                  "reason": reason, "detail": detail}


def encode_text(tokenizer, text: str, max_tokens: int) -> tuple[np.ndarray, bool]:
    """(token ids incl. special tokens, truncated to ``max_tokens``; whether the text was cut), from
    a transformers tokenizer or a bare ``tokenizers.Tokenizer`` from ``ctal.tokenizer.load_backend``
    (already set to truncate)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        enc = tokenizer.encode(text)
        ids, cut = enc.ids, bool(enc.overflowing)
    else:
        ids = tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"]
        # only ids that fill the limit can have been cut: encode those again, whole, to tell
        cut = len(ids) >= max_tokens and len(tokenizer(text, verbose=False)["input_ids"]) > max_tokens
    return np.asarray(ids, dtype=np.int32), cut


def _file_problem(p: Path) -> Optional[tuple[str, str]]:
    """(reason, detail) when ``p`` cannot be an audio file, else None; each cause its own reason
    (a symlink loop or a directory is not a "missing" file)."""
    try:
        st = p.stat()
    except (FileNotFoundError, NotADirectoryError):
        if p.is_symlink():
            return "missing_file", f"{p} is a symbolic link to {os.readlink(p)}, which does not exist"
        return "missing_file", f"{p} does not exist"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink_loop", f"{p}: symbolic links that loop ({e.strerror})"
        return "unreadable_file", f"{p}: {e.strerror or e}"
    if stat.S_ISDIR(st.st_mode):
        return "not_a_file", f"{p} is a directory"
    if not stat.S_ISREG(st.st_mode):
        return "not_a_file", f"{p} is not a regular file"
    if st.st_size == 0:
        return "empty_file", "file has 0 bytes"
    return None


def _read_unknown_length(path: str, max_frames: int) -> np.ndarray:
    """Decode a stream whose header gives no length, at most ``max_frames`` + 1 frames (so a stream
    longer than allowed is told by its length, without decoding it all). libsndfile decodes into
    the buffer and then fails to seek past the stream's real end, so the frames it filled are
    counted from a NaN-filled buffer (decoded samples are finite; NaN ones are refused anyway)."""
    import soundfile as sf

    with sf.SoundFile(path) as f:
        buf = np.full((max_frames + 1, f.channels), np.nan, dtype=np.float32)
        try:
            f.read(out=buf)
        except sf.LibsndfileError:
            pass
    filled = ~np.isnan(buf).any(axis=1)
    n = int(filled.argmin()) if not filled.all() else len(buf)
    return buf[:n, 0] if buf.shape[1] == 1 else buf[:n]


def train_transcript_tokenizer(rows: list[dict], data_cfg, dest: str | Path):
    """Byte-level BPE (``data_cfg.vocab_size``) on the rows' usable transcripts, saved to ``dest``;
    returns (tokenizer, number of transcripts). Rows whose text the reader flagged are skipped."""
    from ctal.tokenizer import train_bpe_tokenizer

    from ctal.tokenizer import normalize_text, save_normalization

    texts = [normalize_text(r["text"], data_cfg.text_normalization)
             for r in rows if r.get("text") and not r.get("text_error")]
    if not texts:
        raise ValueError("no usable transcripts to train the BPE tokenizer on")
    tok = train_bpe_tokenizer(texts, data_cfg.vocab_size, dest, model_max_length=data_cfg.max_text_tokens)
    save_normalization(dest, data_cfg.text_normalization)
    return tok, len(texts)


def featurize_row(row: dict, tokenizer, data_cfg, upstream=None) -> tuple[Optional[dict], Optional[dict]]:
    """One manifest row → ``(record, None)`` for ``parquet_schema`` or ``(None, quarantine)``.
    ``tokenizer``: as for ``encode_text``; ``upstream``: the loaded ``ctal.upstream.Upstream`` of an
    SSL front end (``featurize_rows``).

    Checks run cheapest first; each failure is a reason from ``QUARANTINE_REASONS``. Stereo is
    downmixed and a sample rate in ``SAMPLE_RATE_RANGE`` resampled (``ctal.features.to_waveform``). A
    stream whose header gives no length is decoded up to ``max_duration_s``. A transcript over
    ``max_text_tokens`` is cut, and the record says so (``text_truncated``).
    """
    return featurize_rows([row], tokenizer, data_cfg, upstream)[0]


def featurize_rows(rows: list[dict], tokenizer, data_cfg, upstream=None) -> list[tuple[Optional[dict], Optional[dict]]]:
    """``featurize_row`` of each row, in order. Log-mel is computed utterance by utterance; an SSL
    front end (``features.frontend=ssl``, ``upstream`` loaded) runs its encoder on batches of
    similar length of at most ``features.ssl_batch_seconds`` of audio, its frames under ``ssl``; a
    waveform front end keeps the audio itself, int16 PCM under ``waveform``."""
    from ctal.features import compute_fbank

    fc = data_cfg.features
    read = [_read_row(row, tokenizer, data_cfg) for row in rows]
    if fc.frontend == "ssl":
        if upstream is None:
            raise ValueError("features.frontend=ssl: featurizing needs the loaded upstream (ctal.upstream.Upstream)")
        return _ssl_frames(rows, read, upstream)
    if fc.frontend == "waveform":
        return _waveforms(rows, read, fc)
    out = []
    for row, (utt, bad) in zip(rows, read):
        if bad is not None:
            out.append((None, bad))
            continue
        wav, sr = utt.pop("_wav"), utt.pop("_sr")
        try:
            fbank = compute_fbank(wav, sr, target_sample_rate=fc.sample_rate, num_mel_bins=fc.num_mel_bins,
                                  frame_length_ms=fc.frame_length_ms, frame_shift_ms=fc.frame_shift_ms,
                                  dither=fc.dither, frontend=fc.frontend)
        except ValueError as e:  # compute_fbank refuses input shorter than one window
            out.append(_quarantine(row, "too_short", str(e)))
            continue
        out.append(({**utt, "n_frames": int(fbank.shape[0]), "fbank": fbank}, None))
    return out


def load_upstream(fc, expected: Optional[dict] = None, device: Optional[str] = None):
    """The ``ctal.upstream.Upstream`` of FeatureConfig ``fc`` (features.frontend=ssl) for featurizing:
    on ``device``, by default a GPU when ``fc.ssl_num_gpus`` asks for one and there is one (on a GPU:
    bf16 autocast where it has it, else fp16), else the CPU; refused (UpstreamError) when its files no longer hash to
    ``expected["hash"]`` (what the run checked before it started, what a data set or checkpoint records)."""
    import torch

    from ctal.upstream import Upstream

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" bar, per actor: our console counts rows
    gpu = (fc.ssl_num_gpus > 0 and torch.cuda.is_available()) if device is None else str(device).startswith("cuda")
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if gpu else None
    batch_seconds = fc.ssl_batch_seconds if fc.ssl_batch_seconds is not None else 60.0 if gpu else 0.0
    up = Upstream(fc.ssl_model, fc.ssl_layers, device=device or ("cuda" if gpu else "cpu"), autocast_dtype=dtype,
                  max_batch_samples=max(1, int(batch_seconds * fc.sample_rate)))
    if expected is not None:
        check_upstream_hash(fc.ssl_model, up.info.hash, expected)
    return up


def check_upstream_hash(path, actual: str, expected: dict) -> None:
    from ctal.upstream import UpstreamError

    if actual != expected["hash"]:
        raise UpstreamError(f"features.ssl_model={path} hashes to {actual[:12]}… here, not {expected['hash'][:12]}… "
                            "as recorded (by the data set, the checkpoint, or this run when it started): the "
                            "folder changed, or is another one on this node; the features need that upstream")


def _ssl_frames(rows, read, upstream) -> list:
    """The SSL half of ``featurize_rows``: waveforms at the upstream's rate, an utterance shorter
    than one frame or one the encoder fails on (alone: a failing call is retried utterance by
    utterance) quarantined with its reason."""
    from ctal.features import to_waveform
    from ctal.upstream import UpstreamError

    info = upstream.info
    out: list = [None] * len(rows)
    waves = {}
    for i, (row, (utt, bad)) in enumerate(zip(rows, read)):
        if bad is not None:
            out[i] = (None, bad)
            continue
        wav = to_waveform(utt.pop("_wav"), utt.pop("_sr"), info.sample_rate).numpy()
        if len(wav) < info.min_samples:
            out[i] = _quarantine(row, "too_short", f"{len(wav)} samples at {info.sample_rate} Hz give no "
                                                   f"{info.architecture} frame (needs {info.min_samples})")
            continue
        waves[i] = wav
    failures = (UpstreamError, RuntimeError, MemoryError)  # torch's out-of-memory is a RuntimeError
    try:  # the upstream batches them by length under its budget (features.ssl_batch_seconds)
        feats = list(zip(waves, upstream(list(waves.values())))) if waves else []
    except failures:  # one utterance at a time: only the one(s) the encoder cannot take are lost
        feats = []
        for i in waves:
            try:
                feats.append((i, upstream([waves[i]])[0]))
            except failures as e:
                out[i] = _quarantine(rows[i], "upstream_failed", f"{type(e).__name__}: {e}"[:500])
    for i, x in feats:
        if not np.isfinite(x).all():  # float16 storage: an activation beyond 65504 would be stored as inf
            out[i] = _quarantine(rows[i], "upstream_failed", "the encoder's features are not finite in float16")
            continue
        out[i] = ({**read[i][0], "n_frames": int(x.shape[0]), "ssl": x}, None)
    return out


def _waveforms(rows, read, fc) -> list:
    """The waveform half of ``featurize_rows``: mono at ``features.sample_rate`` as int16 PCM, its
    ``n_frames`` the number of samples; shorter than one analysis window (``frame_length_ms``: 400
    samples, the shortest any supported encoder takes) is too short, as for log-mel."""
    from ctal.data import to_pcm16
    from ctal.features import to_waveform

    window = int(round(fc.frame_length_ms * fc.sample_rate / 1000))
    out = []
    for row, (utt, bad) in zip(rows, read):
        if bad is not None:
            out.append((None, bad))
            continue
        wav = to_pcm16(to_waveform(utt.pop("_wav"), utt.pop("_sr"), fc.sample_rate).numpy())
        if len(wav) < window:
            out.append(_quarantine(row, "too_short", f"{len(wav)} samples at {fc.sample_rate} Hz < one "
                                                     f"{fc.frame_length_ms:g} ms window ({window})"))
            continue
        out.append(({**utt, "n_frames": len(wav), "waveform": wav}, None))
    return out


def _read_row(row: dict, tokenizer, data_cfg) -> tuple[Optional[dict], Optional[dict]]:
    """A manifest row → (its record without frames, with the decoded waveform under ``_wav`` and its
    rate under ``_sr``, None) or (None, quarantine): every check but the front end's own."""
    import soundfile as sf

    from ctal.features import SAMPLE_RATE_RANGE
    from ctal.tokenizer import normalize_text

    text = row.get("text")
    if row.get("text_error") == "non_utf8_transcript" or isinstance(text, bytes):
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                return _quarantine(row, "non_utf8_transcript", str(e))
        else:
            return _quarantine(row, "non_utf8_transcript", "transcript is not valid UTF-8")
    if row.get("text_error") == "missing_transcript" or text is None or not str(text).strip():
        return _quarantine(row, "missing_transcript", "no transcript for this utterance")

    path = str(row["audio_path"])
    p = Path(path)
    problem = _file_problem(p)
    if problem:
        return _quarantine(row, *problem)
    ext = p.suffix.lower().lstrip(".")
    if ext and ext not in _audio_extensions():
        return _quarantine(row, "unknown_format", f"extension .{ext} is not an audio format "
                                                  "soundfile decodes")
    try:
        info = sf.info(path)
    except Exception as e:  # libsndfile's messages name the problem; keep them
        # Without an extension the format was only a guess: say so rather than "corrupt".
        return _quarantine(row, "corrupt_audio" if ext else "unknown_format", str(e))
    if info.frames <= 0 or info.samplerate <= 0:
        return _quarantine(row, "empty_file", "file holds no audio frames")
    lo, hi = SAMPLE_RATE_RANGE
    if not lo <= info.samplerate <= hi:
        return _quarantine(row, "unsupported_sample_rate", f"{info.samplerate} Hz is outside {lo}-{hi} Hz")
    known_length = info.frames < _UNKNOWN_LENGTH
    max_frames = int(math.ceil(data_cfg.max_duration_s * info.samplerate))
    if known_length and info.frames > max_frames:
        duration = info.frames / info.samplerate
        return _quarantine(row, "too_long", f"{duration:.2f} s > max_duration_s={data_cfg.max_duration_s}")
    try:
        trunc = _wav_truncation(path)
        if trunc:
            return _quarantine(row, "corrupt_audio", trunc)
        if known_length:
            wav, sr = sf.read(path, dtype="float32", always_2d=False)
        else:
            wav, sr = _read_unknown_length(path, max_frames), info.samplerate
    except Exception as e:
        return _quarantine(row, "corrupt_audio", f"decoding failed: {e}")
    if not known_length and len(wav) > max_frames:
        return _quarantine(row, "too_long", f"over max_duration_s={data_cfg.max_duration_s} (the header "
                                            "gives no length; decoding stopped there)")
    if known_length and len(wav) < info.frames:
        return _quarantine(row, "corrupt_audio", f"truncated: decoded {len(wav)} of {info.frames} frames")
    if len(wav) == 0:
        return _quarantine(row, "empty_file", "file holds no audio frames")
    if not np.isfinite(wav).all():
        return _quarantine(row, "corrupt_audio", "NaN or infinite samples")
    duration = len(wav) / sr
    if duration < data_cfg.min_duration_s:
        return _quarantine(row, "too_short", f"{duration:.3f} s < min_duration_s={data_cfg.min_duration_s}")
    peak = float(np.abs(wav).max())
    if peak < data_cfg.silence_peak:
        return _quarantine(row, "all_silent", f"peak {peak:.2e} < silence_peak={data_cfg.silence_peak}")
    input_ids, text_truncated = encode_text(tokenizer, normalize_text(text, data_cfg.text_normalization),
                                            data_cfg.max_text_tokens)
    label = row.get("label")
    return {
        "id": str(row["id"]),
        "corpus": row.get("corpus"),
        "split": row.get("split"),
        "speaker": None if row.get("speaker") is None else str(row["speaker"]),
        "text": text,
        "input_ids": input_ids,
        "label": None if label is None else float(label),
        "label_name": row.get("label_name"),
        "duration_s": float(duration),
        "sample_rate": int(sr),
        "text_truncated": text_truncated,  # not a Parquet column: counted in report.json
        "_wav": wav, "_sr": int(sr),
    }, None
