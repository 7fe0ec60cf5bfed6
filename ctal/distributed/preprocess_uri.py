"""Preprocessing into a URI (``s3://``, ``gs://``, ``file://``): the object-store variant of publishing.

The pipeline is the one in ``preprocess.py`` (same tokenizer step, same actors, same report); only
where files go differs, because object stores have no directory rename:

- the tokenizer is trained on the driver and uploaded to ``<out>/tokenizer/`` first: every actor, on
  any node, loads it from there (``_ShardWriter`` caches it locally);
- each actor writes its shard to a local file and uploads it whole to ``<out>/part-<first row>.parquet``
  (a retried batch replaces the same object, never duplicates it); shard names are not renumbered,
  which would copy every object once more, but they still sort in manifest order;
- ``quarantine.parquet`` and then ``report.json`` are uploaded last. As for a local data set,
  ``report.json`` is what marks ``<out>`` complete: ``list_shards`` and pretraining refuse a prefix
  without it.

Replacing an existing data set (``overwrite``) deletes its ``report.json`` first, then the rest,
so no reader ever takes a half-replaced prefix as complete; unlike the local rename, the old data
set is gone while the new one is written.
"""
from __future__ import annotations

import fnmatch
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import pyarrow.parquet as pq

from ctal import storage
from ctal.data import QUARANTINE_FILE, REPORT_FILE, SHARD_GLOB, TOKENIZER_DIR

# What a ctal data set holds at its top level: an overwrite may delete a prefix of only these.
_OURS = (SHARD_GLOB, QUARANTINE_FILE, REPORT_FILE, TOKENIZER_DIR)


def check_output_uri(out: str, overwrite: bool = False) -> None:
    """``check_output`` for a URI: refuse an existing non-empty prefix unless ``overwrite``, and even
    then one holding anything a ctal data set does not (a half-written one of ours may be replaced)."""
    storage.resolve(out)  # an unknown scheme fails here, naming the URI
    names = storage.listdir(out)
    if not names:
        return
    if not overwrite:
        raise FileExistsError(f"output {out!r} already exists; pass overwrite=True (--overwrite) to replace it")
    foreign = [n for n in names if not any(fnmatch.fnmatch(n, p) for p in _OURS)]
    if foreign:
        raise FileExistsError(f"refusing to overwrite {out!r}: it is not a ctal data set (it holds {foreign[0]!r})")


def preprocess_to_uri(rows: list[dict], corpus: str, root, out: str, data_cfg, num_cpus: Optional[float],
                      rows_per_row_group: int) -> dict:
    """Featurize ``rows`` into the data set at URI ``out``; returns its report (see the module doc)."""
    from .preprocess import _featurize, _finish, _prepare_tokenizer

    staging = Path(tempfile.mkdtemp(prefix="ctal-preprocess-"))  # tokenizer, quarantine, report
    try:
        if storage.exists(out):  # checked by check_output_uri: ours, and overwrite was asked for
            storage.delete(storage.join(out, REPORT_FILE))  # first: the old set stops counting as complete
            storage.delete(out)
        t_start = time.perf_counter()
        tok_report = _prepare_tokenizer(rows, data_cfg, staging / TOKENIZER_DIR)
        storage.upload_dir(staging / TOKENIZER_DIR, storage.join(out, TOKENIZER_DIR))
        t_tok = time.perf_counter() - t_start
        summary, n_actors, t_feat = _featurize(rows, data_cfg, out, num_cpus, rows_per_row_group,
                                               tok_report["bare_encoder"])
        shards = _shards(summary, out)
        report = _finish(summary, rows, corpus, root, out, staging, data_cfg, tok_report, n_actors,
                         t_tok, t_feat, time.perf_counter() - t_start, shards=shards)
        storage.upload_file(staging / QUARANTINE_FILE, storage.join(out, QUARANTINE_FILE))
        storage.upload_file(staging / REPORT_FILE, storage.join(out, REPORT_FILE))  # last: marks it complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _shards(summary, out: str) -> list[dict]:
    """The shards the summary references (row counts from their footers); any other shard object
    under ``out`` (a retried batch whose rows went elsewhere) is deleted."""
    referenced = sorted({s for s in summary["shard"].to_pylist() if s is not None})
    for uri in storage.glob(out, SHARD_GLOB):
        if storage.name(uri) not in referenced:
            storage.delete(uri)
    fs, _ = storage.resolve(out)
    return [{"file": name, "rows": pq.ParquetFile(storage.resolve(storage.join(out, name))[1],
                                                   filesystem=fs).metadata.num_rows}
            for name in referenced]
