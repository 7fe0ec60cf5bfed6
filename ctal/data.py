"""The Parquet data contract (DESIGN.md), written once: schema, writer, reader.

Records of ``PARQUET_SCHEMA`` come from ``ctal.featurize.featurize_row`` (one utterance) and become
tables here (``records_to_table``).
Shards are ``part-*.parquet`` beside ``quarantine.parquet``, ``report.json`` and ``tokenizer/``;
``report.json`` is written last and marks a complete data set.
"""
from __future__ import annotations

import functools
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .config import FBANK_DIM, ConfigError, FeatureConfig, from_dict

if TYPE_CHECKING:
    from .tasks import Meta


@dataclass(frozen=True)
class AudioFormat:
    """How a data set stores its audio frames: the column (``fbank``: 80 log-mel, float32, 10 ms;
    ``ssl``: the kept hidden states of an upstream side by side, float16, its frame shift; or
    ``waveform``: the decoded audio, int16 PCM, one "frame" per sample), the width of a stored frame,
    and what the model's audio input is made of (``model_dims``)."""
    column: str
    width: int
    layers: int = 1
    frame_shift_ms: float = 10.0
    upstream: Optional[dict] = None  # ctal.upstream.UpstreamInfo.to_dict() of an ssl data set

    @property
    def dtype(self):
        return {"ssl": pa.float16(), "waveform": pa.int16()}.get(self.column, pa.float32())

    @property
    def arrow_type(self) -> pa.DataType:
        """The column's type: a list of frames, each a fixed-size list; a waveform a plain list<int16>."""
        if self.column == "waveform":
            return pa.list_(pa.int16())
        return pa.list_(pa.list_(self.dtype, self.width))

    def model_dims(self) -> dict:
        """The ModelConfig fields the frames decide: log-mel gets its delta at load time; a waveform's
        are the upstream's the model runs (``model.audio_upstream``), set from it, not from the data."""
        if self.column == "waveform":
            return {}
        return {"audio_dim": self.width if self.column == "ssl" else 2 * self.width, "audio_layers": self.layers}


FBANK_FORMAT = AudioFormat("fbank", FBANK_DIM)
WAVEFORM_SCALE = 32768.0  # int16 PCM ↔ float in [-1, 1): stored round(x * 32768) clipped, read back / 32768


def waveform_format(sample_rate: int = 16000) -> AudioFormat:
    """A waveform data set's format. Its ``n_frames`` counts samples: budgets in the model's frames
    (max_frames, max_frames_per_batch) are turned into samples by the upstream's hop (ctal.finetune)."""
    return AudioFormat("waveform", 1, frame_shift_ms=1000.0 / sample_rate)


def to_pcm16(wav: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] → int16 PCM (clipped): how a waveform data set stores its audio."""
    return np.clip(np.rint(np.asarray(wav, dtype=np.float32) * WAVEFORM_SCALE), -32768, 32767).astype(np.int16)


def audio_column(frontend: str) -> str:
    """The column (and a row's key) holding the frames of a ``frontend`` data set."""
    return frontend if frontend in ("ssl", "waveform") else "fbank"


def audio_format(report: dict) -> AudioFormat:
    """A data set's AudioFormat from its ``report.json`` (an ssl data set records its upstream)."""
    frontend = feature_frontend(report)
    if frontend == "waveform":
        return waveform_format(int((report.get("features") or {}).get("sample_rate", 16000)))
    if frontend != "ssl":
        return FBANK_FORMAT
    up = report.get("upstream") or {}
    try:
        return AudioFormat("ssl", len(up["layers"]) * int(up["hidden_size"]), len(up["layers"]),
                           float(up["frame_shift_ms"]), dict(up))
    except (KeyError, TypeError) as e:
        raise ValueError(f"report.json says features.frontend=ssl but records no complete upstream ({e!r})") from None


def parquet_schema(fmt: AudioFormat = FBANK_FORMAT) -> pa.Schema:
    """The shards' schema: the same columns whatever the front end, but for the audio frames'."""
    return pa.schema([
        ("id", pa.string()),
        ("corpus", pa.string()),
        ("split", pa.string()),
        ("speaker", pa.string()),
        ("text", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("n_frames", pa.int32()),
        (fmt.column, fmt.arrow_type),
        ("label", pa.float64()),
        ("label_name", pa.string()),
        ("duration_s", pa.float32()),
        ("sample_rate", pa.int32()),
    ])


PARQUET_SCHEMA = parquet_schema()  # a filterbank data set's

QUARANTINE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("audio_path", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
])

QUARANTINE_REASONS = (
    "missing_file", "not_a_file", "symlink_loop", "unreadable_file", "empty_file", "unknown_format",
    "corrupt_audio", "unsupported_sample_rate", "all_silent", "too_short", "too_long",
    "missing_transcript", "non_utf8_transcript", "upstream_failed",
)

SHARD_GLOB = "part-*.parquet"
QUARANTINE_FILE = "quarantine.parquet"
REPORT_FILE = "report.json"
TOKENIZER_DIR = "tokenizer"


def records_to_table(records: list[dict], fmt: AudioFormat = FBANK_FORMAT) -> pa.Table:
    """Records from ``featurize_row`` (their frames under ``fmt.column``) → a table of exactly
    ``parquet_schema(fmt)`` (numpy, no row loops over frames)."""
    col, schema = fmt.column, parquet_schema(fmt)
    flat = col == "waveform"  # 1-D samples, list<int16>
    if any((r[col].ndim != 1) if flat else (r[col].ndim != 2 or r[col].shape[1] != fmt.width) for r in records):
        raise ValueError(f"{col} must be " + ("1-D samples" if flat else f"(T, {fmt.width})"))

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
    for column in schema:
        if column.name == col:
            cols[col] = nested([r[col] for r in records], fmt.dtype.to_pandas_dtype(), None if flat else fmt.width)
        elif column.name == "input_ids":
            cols["input_ids"] = nested([r["input_ids"] for r in records], np.int32)
        else:
            cols[column.name] = pa.array([r[column.name] for r in records], type=column.type)
    return pa.Table.from_pydict(cols, schema=schema)


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


class _Recorded:
    """What a data set's ``report.json`` says of its frames, for ``DataSet`` and ``TaskData`` alike."""
    report: dict

    @property
    def frontend(self) -> str:
        """The front end its frames came from: what ``model_frames`` needs at load time."""
        return feature_frontend(self.report)

    @property
    def audio_format(self) -> AudioFormat:
        """Its frames' column, dtype and width, and what the model's audio input is made of."""
        return audio_format(self.report)


@dataclass(frozen=True)
class DataSet(_Recorded):
    """A complete preprocessed data set (``open_dataset``): where it is, what ``report.json`` says, its
    verified tokenizer and featurizer settings. Reading rows goes through ``read`` or ``shards``."""
    path: str  # absolute local path, or the URI as given (normalized)
    report: dict
    tokenizer: TokenizerInfo
    features: Optional[FeatureConfig]  # None for a data set written without featurizing (test data)
    shards: tuple  # Paths, or URI strings for a URI data set, in order

    @functools.cached_property
    def splits(self) -> dict[str, int]:
        """split name → rows (read from the small ``split`` column only)."""
        col = self.read(columns=["split"]).column("split").to_pylist()
        return dict(sorted(Counter(col).items()))

    def read(self, split: Optional[str] = None, columns: Optional[list[str]] = None) -> pa.Table:
        """All shards as one table of ``PARQUET_SCHEMA`` (plain pyarrow, no Ray), optionally one split."""
        return _read_shards(self.shards, split, columns, parquet_schema(self.audio_format))


def feature_frontend(report: dict) -> str:
    """The front end (ctal.features.FRONTENDS) recorded in a data set's ``report.json``; data sets
    written before there was a choice, or without featurizing (test data), hold Kaldi frames."""
    return (report.get("features") or {}).get("frontend", "kaldi")


def _read_shards(shards, split: Optional[str], columns: Optional[list[str]], schema: pa.Schema) -> pa.Table:
    filters = None if split is None else [("split", "==", split)]
    tables = [pq.read_table(s, columns=columns, filters=filters, schema=schema) for s in shards]
    if not tables:
        fields = schema if columns is None else [schema.field(c) for c in columns]
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
# a task's data set in memory: what fine-tuning, sweeps, ablations and evaluation hold


@dataclass
class TaskData(_Recorded):
    """A preprocessed data set held in memory: the protocol columns plus flat feature arrays.

    Plain numpy, so it pickles without copies through Ray's object store (every trial on a node then
    shares one copy).
    """
    meta: Meta
    n_frames: np.ndarray
    input_ids: np.ndarray  # flat int32
    input_ids_offsets: np.ndarray
    audio: np.ndarray  # (total frames, AudioFormat.width): float32 log-mel, float16 SSL features, int16 samples
    audio_offsets: np.ndarray
    tokenizer: TokenizerInfo  # the data set's (verified) tokenizer
    data_dir: str = ""  # absolute path, or the URI as given
    report: dict = field(default_factory=dict)  # its report.json

    @classmethod
    def load(cls, data_dir: str | Path) -> "TaskData":
        from .tasks import Meta  # the task protocol's columns (and sklearn): not for featurizing actors

        ds = open_dataset(data_dir)
        fmt = ds.audio_format
        table = ds.read(columns=["id", "split", "speaker", "label", "input_ids", "n_frames", fmt.column]).combine_chunks()
        if table.num_rows == 0:
            raise ValueError(f"{ds.path!r} holds no utterances")

        def flat(name, inner=False):
            col = table.column(name).chunk(0)
            values = col.flatten()  # honours the column's offset, unlike .values
            values = values.flatten() if inner else values
            offsets = col.offsets.to_numpy().astype(np.int64)
            return values.to_numpy(zero_copy_only=False), offsets - offsets[0]

        ids, ids_off = flat("input_ids")
        audio, audio_off = flat(fmt.column, inner=fmt.column != "waveform")  # a waveform: (samples, 1)
        return cls(meta=Meta.from_table(table), n_frames=table.column("n_frames").to_numpy().astype(np.int64),
                   input_ids=ids, input_ids_offsets=ids_off, audio=audio.reshape(-1, fmt.width),
                   audio_offsets=audio_off, tokenizer=ds.tokenizer, data_dir=ds.path, report=ds.report)

    def rows(self, idx, targets=None) -> list[dict]:
        """Rows for ``collate``: their frames under the data set's column name (``fbank``/``ssl``/``waveform``)."""
        out, col = [], self.audio_format.column
        for k, i in enumerate(idx):
            a, b = self.input_ids_offsets[i], self.input_ids_offsets[i + 1]
            c, d = self.audio_offsets[i], self.audio_offsets[i + 1]
            out.append({"input_ids": self.input_ids[a:b], col: self.audio[c:d],
                        "label": None if targets is None else targets[k]})
        return out


# --------------------------------------------------------------------------------------------------
# writing report.json: preprocessing, test fixtures and benchmarks describe a data set the same way


def tokenizer_entry(tokenizer, tokenizer_dir: str | Path, source: str, **extra) -> dict:
    """``report.json``'s tokenizer entry for ``tokenizer`` saved at ``<data set>/tokenizer``."""
    from .tokenizer import read_normalization, tokenizer_hash, tokenizer_info

    return {"path": TOKENIZER_DIR, "source": source, "hash": tokenizer_hash(tokenizer_dir),
            "text_normalization": read_normalization(tokenizer_dir) or "none", **tokenizer_info(tokenizer),
            **extra}


def write_report(out_dir: str | Path, *, corpus: str, counts: dict, shards: list[dict], tokenizer: dict,
                 features: Optional[dict] = None, upstream: Optional[dict] = None, **extra) -> dict:
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
              "features": features, "tokenizer": tokenizer, **({"upstream": upstream} if upstream else {}),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
    report["schema"] = parquet_schema(audio_format(report)).to_string(show_field_metadata=False)
    storage.write_text(storage.join(out_dir, REPORT_FILE), json.dumps(report, indent=2))
    return report


def write_dataset(out_dir: str | Path, records: list[dict], tokenizer, *, corpus: str, source: str,
                  rows_per_shard: int = 2000, row_group_size: int = 64,
                  features: Optional[dict] = None, upstream: Optional[dict] = None) -> DataSet:
    """A data set from records already in memory (tests, benchmarks): zstd shards, the tokenizer saved to
    ``tokenizer/`` (unless already there) and ``report.json`` last. Preprocessing writes its shards from
    Ray actors instead, and the same ``write_report``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / TOKENIZER_DIR).is_dir():
        tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    shards, fmt = [], audio_format({"features": features, "upstream": upstream})
    for k, start in enumerate(range(0, len(records), rows_per_shard)):
        chunk = records[start:start + rows_per_shard]
        name = f"part-{k:05d}.parquet"
        pq.write_table(records_to_table(chunk, fmt), out / name, compression="zstd", row_group_size=row_group_size)
        shards.append({"file": name, "rows": len(chunk)})
    write_report(out, corpus=corpus, counts={"in": len(records), "written": len(records)}, shards=shards,
                 tokenizer=tokenizer_entry(tokenizer, out / TOKENIZER_DIR, source), features=features,
                 upstream=upstream)
    return open_dataset(out)

