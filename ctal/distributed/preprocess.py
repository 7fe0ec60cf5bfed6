"""Corpus → Parquet data set with Ray Data (DESIGN.md, "Parquet data contract").

manifest rows (driver) → BPE training on the transcripts (driver, unless a tokenizer dir is given) →
the manifest, put into the object store once → ``ray.data.from_items`` of batch numbers → ``map_batches``
on an actor pool (manifest and tokenizer loaded once per actor) where each batch number becomes one
run of manifest rows and one zstd Parquet shard written by the actor itself → only a small per-row
summary travels back to the driver, which writes ``quarantine.parquet`` and ``report.json``.

Features never pass through the driver, so its memory does not grow with the corpus. Everything is
written into ``<out>.tmp-<uuid>`` and renamed to ``<out>`` at the end: a killed run leaves no
directory a reader would take as complete (``report.json`` is the completeness marker as well).

One run at a time per output: a run first takes an exclusive claim on ``<out>`` (``ctal.outputs``)
and a second run to the same output is refused while the first is alive. Holding the claim, a run
removes what killed runs left behind (``<out>.tmp-*``, ``<out>.old-*``, an unfinished URI prefix)
and says so.
An output URI (``s3://``, ``gs://``, ``file://``) runs the same pipeline; only where the files go differs
(``_preprocess_to_uri``: object stores have no rename).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from ctal import manifest as run_manifest, storage  # not the corpus manifest rows of this module
from ctal.console import Progress
from ctal.data import QUARANTINE_FILE, REPORT_FILE, TOKENIZER_DIR, audio_format, parquet_schema, records_to_table
from ctal.featurize import featurize_rows, load_upstream
from ctal.outputs import claim_output, release_output
from ctal.preprocess import (SUMMARY_SCHEMA, NothingToPublishError, check_inputs, check_output, finish, format_summary,
                             prepare_tokenizer, publish, rejected_quarantine, remove_leftovers, resolve_tokenizer,
                             resolve_upstream, say, uri_shards)
from ctal.tokenizer import load_backend, load_tokenizer


class _ShardWriter:
    """Actor-side featurizer: one batch number = one run of ``rows_per_batch`` manifest rows = (at
    most) one Parquet shard."""

    def __init__(self, manifest: list, rows_per_batch: int, tokenizer_dir: str, data_cfg, out_dir: str,
                 rows_per_row_group: int, bare_tokenizer: bool, upstream: Optional[dict] = None):
        import ray
        import torch

        # The manifest once per actor (from the object store): no JSON dump and Arrow block per row in
        # the driver, no JSON parse per row here
        self.manifest, self.rows_per_batch = ray.get(manifest[0]), rows_per_batch

        # Ray gives an actor its CPUs, not a thread count: avoid oversubscribing the node with torch.
        torch.set_num_threads(max(1, int(data_cfg.num_cpus_per_task)))
        # A URI output: the tokenizer comes from there, shards are written locally and uploaded.
        tokenizer_dir = storage.localize(tokenizer_dir, kind="tokenizers")
        self.out_uri = out_dir if storage.is_uri(out_dir) else None
        # The bare encoder spares each actor the transformers import (~0.7 s of start-up).
        self.tokenizer = (load_backend(tokenizer_dir, data_cfg.max_text_tokens) if bare_tokenizer
                          else load_tokenizer(tokenizer_dir))
        self.cfg, self.upstream = data_cfg, None
        if upstream is not None:  # SSL features: the encoder once per actor, on its GPU share if it has one
            self.upstream = load_upstream(data_cfg.features, upstream)
        self.format = audio_format({"features": asdict(data_cfg.features), "upstream": upstream})
        self.out_dir = (Path(tempfile.gettempdir()) / f"ctal-shards-{uuid.uuid4().hex[:12]}" if self.out_uri
                        else Path(out_dir))  # for a URI: made and removed by each call
        self.rows_per_row_group = rows_per_row_group

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.concat_tables([self._shard(int(k)) for k in batch["id"].to_pylist()])

    def _shard(self, k: int) -> pa.Table:
        idxs = list(range(k * self.rows_per_batch, min((k + 1) * self.rows_per_batch, len(self.manifest))))
        rows = self.manifest[idxs[0]:idxs[-1] + 1]
        name = f"part-{min(idxs):08d}.parquet"  # unique: every row lands in exactly one batch
        if self.out_uri:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / f".{name}.{uuid.uuid4().hex}.inprogress"
        writer, pending, summary = None, [], []
        schema = parquet_schema(self.format)
        try:
            step = self.rows_per_row_group  # bounded memory: featurized, and flushed, a row group at a time
            for start in range(0, len(rows), step):
                chunk = rows[start:start + step]
                done = featurize_rows(chunk, self.tokenizer, self.cfg, self.upstream)
                for idx, row, (record, bad) in zip(idxs[start:start + step], chunk, done):
                    if bad is not None:
                        summary.append({"idx": idx, **bad, "shard": None, "duration_s": None,
                                        "n_frames": None, "text_truncated": None})
                        continue
                    summary.append({"idx": idx, "id": record["id"], "audio_path": row["audio_path"],
                                    "reason": None, "detail": None, "shard": name,
                                    "duration_s": record["duration_s"], "n_frames": record["n_frames"],
                                    "text_truncated": record["text_truncated"]})
                    pending.append(record)
                    if len(pending) == self.rows_per_row_group:
                        writer = writer or pq.ParquetWriter(tmp, schema, compression="zstd")
                        writer.write_table(records_to_table(pending, self.format))
                        pending = []
            if pending:
                writer = writer or pq.ParquetWriter(tmp, schema, compression="zstd")
                writer.write_table(records_to_table(pending, self.format))
            if writer is not None:
                writer.close()
                writer = None
                os.replace(tmp, self.out_dir / name)  # a retried batch replaces, never duplicates
                if self.out_uri:  # uploaded whole under the same name: a retry replaces it there too
                    storage.upload_file(self.out_dir / name, storage.join(self.out_uri, name))
                    (self.out_dir / name).unlink()
        finally:
            if writer is not None:
                writer.close()
            tmp.unlink(missing_ok=True)
            if self.out_uri:
                shutil.rmtree(self.out_dir, ignore_errors=True)
        return pa.Table.from_pylist(summary, schema=SUMMARY_SCHEMA)


def run_preprocess(corpus: str, root: str | Path, out_dir: str | Path, data_cfg, overwrite: bool = False,
                   num_cpus: Optional[float] = None, *, rows: Optional[list[dict]] = None,
                   reader_kwargs: Optional[dict] = None, rows_per_row_group: int = 64,
                   verbose: bool = True, claim: Optional[str] = None) -> dict:
    """Featurize a corpus into the Parquet data set ``out_dir`` and return its report.

    ``rows``: a manifest already read with ``read_corpus`` (else it is read here). ``num_cpus``: CPUs
    the actor pool may use (default: the whole Ray cluster); each actor takes
    ``data_cfg.num_cpus_per_task``. Starts Ray (``ray.init()``, honouring RAY_ADDRESS) if needed.
    Holds the exclusive claim on ``out_dir`` while it runs: ``claim``, one the caller took with
    ``claim_output`` (to be refused before starting Ray), else its own; released at the end.
    """
    out = storage.normalize(out_dir) if storage.is_uri(out_dir) else Path(out_dir).resolve()
    claim = claim or claim_output(out, say)
    try:
        check_output(out, overwrite)
        data_cfg = resolve_tokenizer(data_cfg)
        data_cfg, upstream = resolve_upstream(data_cfg)  # SSL front end: its folder checked, hashed
        if rows is None:
            from ctal.corpora import read_corpus
            rows = read_corpus(corpus, str(root), **(reader_kwargs or {}))
        check_inputs(rows, corpus, root, data_cfg, num_cpus)
        if storage.is_uri(out):  # shards go straight to the object store
            report = _preprocess_to_uri(rows, corpus, root, out, data_cfg, num_cpus, rows_per_row_group, upstream)
        else:
            remove_leftovers(out)
            report = _preprocess_local(rows, corpus, root, out, data_cfg, num_cpus, rows_per_row_group, upstream)
    finally:
        release_output(claim)
    storage.delete(rejected_quarantine(out))  # an earlier refused run's report no longer applies
    if verbose:
        print(format_summary(report), flush=True)
    return report


def _preprocess_local(rows, corpus, root, out: Path, data_cfg, num_cpus, rows_per_row_group, upstream) -> dict:
    tmp = out.parent / f"{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    try:
        t_start = time.perf_counter()
        tok_report = prepare_tokenizer(rows, data_cfg, tmp / TOKENIZER_DIR)
        t_tok = time.perf_counter() - t_start
        summary, n_actors, t_feat = _featurize(rows, data_cfg, tmp, num_cpus, rows_per_row_group,
                                               tok_report["bare_encoder"], upstream)
        report = finish(summary, rows, corpus, root, out, tmp, data_cfg, tok_report, n_actors,
                         t_tok, t_feat, time.perf_counter() - t_start, upstream=upstream)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _featurize(rows, data_cfg, tmp: Path | str, num_cpus, rows_per_row_group, bare_tokenizer, upstream):
    import ray

    from .console import dropping_stderr_lines, init_ray

    init_ray()  # honours RAY_ADDRESS; no-op when Ray is up
    cpus = num_cpus if num_cpus is not None else ray.cluster_resources().get("CPU", 1.0)
    if cpus < data_cfg.num_cpus_per_task:  # one actor would wait for CPUs that never come
        raise ValueError(f"the Ray cluster has {cpus:g} CPUs, less than one actor needs "
                         f"(num_cpus_per_task={data_cfg.num_cpus_per_task:g})")
    n, gpus_each = len(rows), data_cfg.features.ssl_num_gpus if upstream else 0.0
    n_actors = max(1, int(cpus // data_cfg.num_cpus_per_task + 1e-9))
    if gpus_each:  # an encoder per GPU share (features.ssl_num_gpus; a fraction shares one)
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if gpus < gpus_each:
            raise ValueError(f"features.ssl_num_gpus={gpus_each:g}, but the Ray cluster has {gpus:g} GPUs; "
                             "use features.ssl_num_gpus=0 to run the encoder on CPUs")
        n_actors = min(n_actors, max(1, int(gpus // gpus_each + 1e-9)))
    # Several shards per actor keep the pool busy to the end; rows_per_shard bounds file size.
    rows_per_batch = max(1, min(data_cfg.rows_per_shard, math.ceil(n / (4 * n_actors))))
    n_batches = math.ceil(n / rows_per_batch)
    n_actors = min(n_actors, n_batches)
    t0 = time.perf_counter()
    # Only batch numbers travel through Ray Data; the manifest (in a list, so Ray passes the reference
    # and each actor fetches it itself) is in the object store once. from_items, not range: range's
    # read tasks would wait for a CPU that the actors hold.
    manifest = [ray.put(rows)]
    ds = ray.data.from_items([{"id": k} for k in range(n_batches)], override_num_blocks=n_batches).map_batches(
        _ShardWriter,
        fn_constructor_kwargs={"manifest": manifest, "rows_per_batch": rows_per_batch,
                               "tokenizer_dir": storage.join(tmp, TOKENIZER_DIR), "data_cfg": data_cfg,
                               "out_dir": str(tmp), "rows_per_row_group": rows_per_row_group,
                               "bare_tokenizer": bare_tokenizer, "upstream": upstream},
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=n_actors, max_tasks_in_flight_per_actor=1),
        num_cpus=data_cfg.num_cpus_per_task,
        num_gpus=gpus_each,
    )
    parts = []
    # Ray Data's own bars are off (console); so is Ray's line about its actors' constructor arguments
    with Progress(n, "preprocess", unit="utterances") as bar, dropping_stderr_lines():
        for part in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            parts.append(part)
            bar.update(part.num_rows)
    summary = pa.concat_tables(parts).sort_by("idx") if parts else SUMMARY_SCHEMA.empty_table()
    return summary, n_actors, time.perf_counter() - t0


def _preprocess_to_uri(rows: list[dict], corpus: str, root, out: str, data_cfg, num_cpus: Optional[float],
                      rows_per_row_group: int, upstream: Optional[dict]) -> dict:
    """Featurize ``rows`` into the data set at URI ``out``; returns its report.

    Object stores have no directory rename, so: the tokenizer is trained on the driver and uploaded to
    ``<out>/tokenizer/`` first (every actor, on any node, loads it from there); each actor uploads its
    shard whole to ``<out>/part-<first row>.parquet`` (a retried batch replaces the same object; names
    are not renumbered, which would copy every object again, but still sort in manifest order);
    ``quarantine.parquet`` and then ``report.json`` go last, so a prefix without ``report.json`` is
    incomplete. Replacing a data set deletes its ``report.json`` first, then the rest: unlike the local
    rename, the old data set is gone while the new one is written.
    """
    staging = Path(tempfile.mkdtemp(prefix="ctal-preprocess-"))  # tokenizer, quarantine, report
    try:
        if storage.exists(out):  # checked by check_output: ours, and overwrite asked for or unfinished
            if not storage.is_file(storage.join(out, REPORT_FILE)):
                say(f"removing {out}: the unfinished output of an earlier run (no {REPORT_FILE})")
            storage.delete(storage.join(out, REPORT_FILE))  # first: the old set stops counting as complete
            storage.delete(out)
        t_start = time.perf_counter()
        tok_report = prepare_tokenizer(rows, data_cfg, staging / TOKENIZER_DIR)
        storage.upload_dir(staging / TOKENIZER_DIR, storage.join(out, TOKENIZER_DIR))
        t_tok = time.perf_counter() - t_start
        summary, n_actors, t_feat = _featurize(rows, data_cfg, out, num_cpus, rows_per_row_group,
                                               tok_report["bare_encoder"], upstream)
        shards = uri_shards(summary, out)
        try:
            report = finish(summary, rows, corpus, root, out, staging, data_cfg, tok_report, n_actors,
                             t_tok, t_feat, time.perf_counter() - t_start, shards=shards, upstream=upstream)
        except NothingToPublishError:
            storage.delete(out)  # the tokenizer uploaded for the actors: an output that never was
            raise
        storage.upload_file(staging / QUARANTINE_FILE, storage.join(out, QUARANTINE_FILE))
        storage.upload_file(staging / run_manifest.MANIFEST_FILE, storage.join(out, run_manifest.MANIFEST_FILE))
        storage.upload_file(staging / REPORT_FILE, storage.join(out, REPORT_FILE))  # last: marks it complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


