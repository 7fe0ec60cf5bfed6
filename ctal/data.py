"""The Parquet data contract (DESIGN.md), written once: schema, one-utterance featurizer, reader.

``featurize_row`` turns one manifest row into a record of ``PARQUET_SCHEMA`` or a quarantine entry;
it is plain Python (no Ray) so the pipeline, the benchmark and tests all call the same code.
Shards are ``part-*.parquet`` beside ``quarantine.parquet``, ``report.json`` and ``tokenizer/``;
``report.json`` is written last and marks a complete data set.
"""
from __future__ import annotations

import errno
import functools
import json
import math
import os
import stat
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .config import FBANK_DIM, ConfigError, FeatureConfig, from_dict

PARQUET_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("corpus", pa.string()),
    ("split", pa.string()),
    ("speaker", pa.string()),
    ("text", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("n_frames", pa.int32()),
    ("fbank", pa.list_(pa.list_(pa.float32(), FBANK_DIM))),
    ("label", pa.float64()),
    ("label_name", pa.string()),
    ("duration_s", pa.float32()),
    ("sample_rate", pa.int32()),
])

QUARANTINE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("audio_path", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
])

QUARANTINE_REASONS = (
    "missing_file", "not_a_file", "symlink_loop", "unreadable_file", "empty_file", "unknown_format",
    "corrupt_audio", "unsupported_sample_rate", "all_silent", "too_short", "too_long",
    "missing_transcript", "non_utf8_transcript",
)
# libsndfile's frame count for a stream whose header leaves the length open (a streamed FLAC)
_UNKNOWN_LENGTH = 2**63 - 1

SHARD_GLOB = "part-*.parquet"
QUARANTINE_FILE = "quarantine.parquet"
REPORT_FILE = "report.json"
TOKENIZER_DIR = "tokenizer"


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


def featurize_row(row: dict, tokenizer, data_cfg) -> tuple[Optional[dict], Optional[dict]]:
    """One manifest row → ``(record, None)`` for ``PARQUET_SCHEMA`` or ``(None, quarantine)``.
    ``tokenizer``: as for ``encode_text``.

    Checks run cheapest first; each failure is a reason from ``QUARANTINE_REASONS``. Stereo is
    downmixed and a sample rate in ``SAMPLE_RATE_RANGE`` resampled (by ``compute_fbank``). A stream
    whose header gives no length is decoded up to ``max_duration_s``. A transcript over
    ``max_text_tokens`` is cut, and the record says so (``text_truncated``).
    """
    import soundfile as sf

    from ctal.features import SAMPLE_RATE_RANGE, compute_fbank
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
    fc = data_cfg.features
    try:
        fbank = compute_fbank(wav, sr, target_sample_rate=fc.sample_rate, num_mel_bins=fc.num_mel_bins,
                              frame_length_ms=fc.frame_length_ms, frame_shift_ms=fc.frame_shift_ms,
                              dither=fc.dither, frontend=fc.frontend)
    except ValueError as e:  # compute_fbank refuses input shorter than one window
        return _quarantine(row, "too_short", str(e))
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
        "n_frames": int(fbank.shape[0]),
        "fbank": fbank,
        "label": None if label is None else float(label),
        "label_name": row.get("label_name"),
        "duration_s": float(duration),
        "sample_rate": int(sr),
        "text_truncated": text_truncated,  # not a Parquet column: counted in report.json
    }, None


def records_to_table(records: list[dict]) -> pa.Table:
    """Records from ``featurize_row`` → a table of exactly ``PARQUET_SCHEMA`` (numpy, no row loops
    over frames)."""
    if any(r["fbank"].ndim != 2 or r["fbank"].shape[1] != FBANK_DIM for r in records):
        raise ValueError(f"fbank must be (T, {FBANK_DIM})")

    def nested(arrays, dtype, inner=None):
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat = (np.concatenate(arrays) if arrays else np.zeros((0,) + (() if inner is None else (inner,))))
        values = pa.array(flat.reshape(-1).astype(dtype, copy=False))
        if inner is not None:
            values = pa.FixedSizeListArray.from_arrays(values, inner)
        return pa.ListArray.from_arrays(pa.array(offsets), values)

    cols = {}
    for field in PARQUET_SCHEMA:
        if field.name == "fbank":
            cols["fbank"] = nested([r["fbank"] for r in records], np.float32, FBANK_DIM)
        elif field.name == "input_ids":
            cols["input_ids"] = nested([r["input_ids"] for r in records], np.int32)
        else:
            cols[field.name] = pa.array([r[field.name] for r in records], type=field.type)
    return pa.Table.from_pydict(cols, schema=PARQUET_SCHEMA)


# --------------------------------------------------------------------------------------------------
# a data set on disk or behind a URI: the one object every stage opens


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer a data set was tokenized with, as ``report.json`` records it; ``dir`` is a local
    directory holding its files (for a URI data set: a cached download) whose hash was checked."""
    dir: Path
    hash: str
    vocab_size: int
    pad_token_id: int
    mask_token_id: int
    special_token_ids: tuple[int, ...]
    text_normalization: str = "none"  # what transcripts went through before tokenizing
    source: str = ""


@dataclass(frozen=True)
class DataSet:
    """A complete preprocessed data set (``open_dataset``): where it is, what ``report.json`` says, its
    verified tokenizer and featurizer settings. Reading rows goes through ``read`` or ``shards``."""
    path: str  # absolute local path, or the URI as given (normalized)
    report: dict
    tokenizer: TokenizerInfo
    features: Optional[FeatureConfig]  # None for a data set written without featurizing (test data)
    shards: tuple  # Paths, or URI strings for a URI data set, in order

    @property
    def frontend(self) -> str:
        """The front end its ``fbank`` column came from: what ``model_frames`` needs at load time."""
        return feature_frontend(self.report)

    @functools.cached_property
    def splits(self) -> dict[str, int]:
        """split name → rows (read from the small ``split`` column only)."""
        col = self.read(columns=["split"]).column("split").to_pylist()
        return dict(sorted(Counter(col).items()))

    def read(self, split: Optional[str] = None, columns: Optional[list[str]] = None) -> pa.Table:
        """All shards as one table of ``PARQUET_SCHEMA`` (plain pyarrow, no Ray), optionally one split."""
        return _read_shards(self.shards, split, columns)


def feature_frontend(report: dict) -> str:
    """The front end (ctal.features.FRONTENDS) recorded in a data set's ``report.json``; data sets
    written before there was a choice, or without featurizing (test data), hold Kaldi frames."""
    return (report.get("features") or {}).get("frontend", "kaldi")


def _read_shards(shards, split: Optional[str], columns: Optional[list[str]]) -> pa.Table:
    filters = None if split is None else [("split", "==", split)]
    tables = [pq.read_table(s, columns=columns, filters=filters, schema=PARQUET_SCHEMA) for s in shards]
    if not tables:
        fields = PARQUET_SCHEMA if columns is None else [PARQUET_SCHEMA.field(c) for c in columns]
        return pa.schema(fields).empty_table()
    return pa.concat_tables(tables)


def _require_complete(data_dir) -> None:
    if not storage.is_file(storage.join(data_dir, REPORT_FILE)):
        raise FileNotFoundError(f"{str(data_dir)!r} has no {REPORT_FILE}: not a complete preprocessed "
                                "data set (missing, or a run that did not finish); run pipelines/preprocess.py")


def check_vocabulary(model_cfg, tok: TokenizerInfo) -> None:
    """A text stream adopted from ``model.text_init`` must read the data set's token ids: same
    vocabulary size and pad id (preprocess with ``tokenizer=<that folder>`` to get them). Raises
    ConfigError before any worker starts; without text_init the model takes the data's vocabulary."""
    if not model_cfg.text_init:
        return
    ours, theirs = (model_cfg.vocab_size, model_cfg.pad_token_id), (tok.vocab_size, tok.pad_token_id)
    if ours != theirs:
        raise ConfigError(f"model.text_init={model_cfg.text_init} has vocab_size={ours[0]}, pad id {ours[1]}, "
                          f"but the data set's tokenizer has vocab_size={theirs[0]}, pad id {theirs[1]}: "
                          f"preprocess the corpus with tokenizer={model_cfg.text_init}")


def list_shards(data_dir: str | Path) -> list:
    """The feature shards of a complete data set, in order; refuses an incomplete one.
    For a URI data set (``s3://``, ``file://``; see ctal.storage) the shards are URI strings."""
    _require_complete(data_dir)
    if storage.is_uri(data_dir):
        return storage.glob(data_dir, SHARD_GLOB)
    return sorted(Path(data_dir).glob(SHARD_GLOB))


def read_report(data_dir: str | Path) -> dict:
    return storage.read_json(storage.join(data_dir, REPORT_FILE))


def _tokenizer_info(data_dir: str, report: dict) -> TokenizerInfo:
    """The report's tokenizer entry, after checking that the tokenizer saved with the data is the one
    it was tokenized with (same hash): a data set whose tokenizer/ was swapped is refused."""
    from .tokenizer import tokenizer_hash

    tok = dict(report.get("tokenizer") or {})
    missing = [k for k in ("hash", "vocab_size", "pad_token_id", "mask_token_id", "special_token_ids")
               if tok.get(k) is None]
    if missing:
        raise ValueError(f"{data_dir}/{REPORT_FILE} records no tokenizer {', '.join(missing)}")
    where = storage.join(data_dir, tok.get("path", TOKENIZER_DIR))
    if storage.is_uri(data_dir):  # a local copy: checkpoints include it and the hash is computed from files
        tok_dir = storage.localize(where, kind="tokenizers")
        if tokenizer_hash(tok_dir) != tok["hash"]:  # the cache may predate a rewritten data set
            tok_dir = storage.localize(where, kind="tokenizers", refresh=True)
    else:
        tok_dir = Path(where)
    try:
        actual = tokenizer_hash(tok_dir)
    except FileNotFoundError as e:
        raise ValueError(f"{data_dir}: the tokenizer recorded in {REPORT_FILE} is missing ({e})") from e
    if actual != tok["hash"]:
        raise ValueError(f"tokenizer mismatch: {tok_dir} hashes to {actual[:12]}…, but the data set was "
                         f"tokenized with {tok['hash'][:12]}… ({REPORT_FILE}); refusing to use it")
    return TokenizerInfo(dir=Path(tok_dir), hash=tok["hash"], vocab_size=int(tok["vocab_size"]),
                         pad_token_id=int(tok["pad_token_id"]), mask_token_id=int(tok["mask_token_id"]),
                         special_token_ids=tuple(int(i) for i in tok["special_token_ids"]),
                         # data sets written before normalization was recorded tokenized text as read
                         text_normalization=tok.get("text_normalization", "none"),
                         source=str(tok.get("source", "")))


def open_dataset(data_dir: str | Path) -> DataSet:
    """Open the preprocessed data set at ``data_dir`` (a path or URI): refuses an incomplete one
    (no ``report.json``) and one whose tokenizer does not hash to what the report recorded."""
    path = storage.normalize(data_dir)
    shards = tuple(list_shards(path))
    report = read_report(path)
    features = report.get("features")
    return DataSet(path=path, report=report, tokenizer=_tokenizer_info(path, report),
                   features=from_dict(FeatureConfig, features) if features else None, shards=shards)


# --------------------------------------------------------------------------------------------------
# writing report.json: preprocessing, test fixtures and benchmarks describe a data set the same way


def tokenizer_entry(tokenizer, tokenizer_dir: str | Path, source: str, **extra) -> dict:
    """``report.json``'s tokenizer entry for ``tokenizer`` saved at ``<data set>/tokenizer``."""
    from .tokenizer import read_normalization, tokenizer_hash, tokenizer_info

    return {"path": TOKENIZER_DIR, "source": source, "hash": tokenizer_hash(tokenizer_dir),
            "text_normalization": read_normalization(tokenizer_dir) or "none", **tokenizer_info(tokenizer),
            **extra}


def write_report(out_dir: str | Path, *, corpus: str, counts: dict, shards: list[dict], tokenizer: dict,
                 features: Optional[dict] = None, **extra) -> dict:
    """Write ``report.json`` (the completeness marker: call it last) and return the report.

    ``counts`` must satisfy in == written + quarantined; ``shards`` are {"file", "rows"} entries whose
    rows add up to written; ``tokenizer`` is a ``tokenizer_entry``.
    """
    n_in, n_written = counts["in"], counts["written"]
    if n_in != n_written + counts.get("quarantined", 0):
        raise ValueError(f"counts do not add up: {counts}")
    if sum(s["rows"] for s in shards) != n_written:
        raise ValueError(f"shard row counts add up to {sum(s['rows'] for s in shards)}, not {n_written}")
    report = {"corpus": corpus, "counts": {"quarantined": 0, **counts}, "shards": shards,
              "features": features, "tokenizer": tokenizer,
              "schema": PARQUET_SCHEMA.to_string(show_field_metadata=False),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
    storage.write_text(storage.join(out_dir, REPORT_FILE), json.dumps(report, indent=2))
    return report


def write_dataset(out_dir: str | Path, records: list[dict], tokenizer, *, corpus: str, source: str,
                  rows_per_shard: int = 2000, row_group_size: int = 64,
                  features: Optional[dict] = None) -> DataSet:
    """A data set from records already in memory (tests, benchmarks): zstd shards, the tokenizer saved to
    ``tokenizer/`` (unless already there) and ``report.json`` last. Preprocessing writes its shards from
    Ray actors instead, and the same ``write_report``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / TOKENIZER_DIR).is_dir():
        tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    shards = []
    for k, start in enumerate(range(0, len(records), rows_per_shard)):
        chunk = records[start:start + rows_per_shard]
        name = f"part-{k:05d}.parquet"
        pq.write_table(records_to_table(chunk), out / name, compression="zstd", row_group_size=row_group_size)
        shards.append({"file": name, "rows": len(chunk)})
    write_report(out, corpus=corpus, counts={"in": len(records), "written": len(records)}, shards=shards,
                 tokenizer=tokenizer_entry(tokenizer, out / TOKENIZER_DIR, source), features=features)
    return open_dataset(out)


# --------------------------------------------------------------------------------------------------
# loading for training: length-bucketed batches and collate (below)
