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

import fnmatch
import math
import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctal import manifest as run_manifest, storage  # not the corpus manifest rows of this module
from ctal.console import Progress
from ctal.outputs import claim_output, release_output
from ctal.data import (PARQUET_SCHEMA, QUARANTINE_FILE, QUARANTINE_SCHEMA, REPORT_FILE, SHARD_GLOB, TOKENIZER_DIR,
                       records_to_table, tokenizer_entry, write_report)
from ctal.featurize import featurize_row, train_transcript_tokenizer
from ctal.tokenizer import (DEFAULT_NORMALIZATION, load_backend, load_tokenizer, read_normalization,
                            save_normalization)

# What a ctal data set holds at its top level: an overwrite may delete a URI prefix of only these.
_OURS = (SHARD_GLOB, QUARANTINE_FILE, REPORT_FILE, TOKENIZER_DIR, run_manifest.MANIFEST_FILE)


class NothingToPublishError(ValueError):
    """Every utterance was quarantined: no data set is published (the quarantine report is kept)."""


def rejected_quarantine(out) -> str:
    """Where a run that quarantined every utterance keeps its quarantine report: next to ``out``
    (``out`` itself stays as it was, so an existing data set is not replaced by an empty one)."""
    return storage.join(storage.parent(out), f"{storage.name(out)}.{QUARANTINE_FILE}")

# What each actor sends back per utterance: enough for counts, hours and quarantine, no features.
_SUMMARY_SCHEMA = pa.schema([
    ("idx", pa.int64()), ("id", pa.string()), ("audio_path", pa.string()), ("reason", pa.string()),
    ("detail", pa.string()), ("shard", pa.string()), ("duration_s", pa.float64()),
    ("n_frames", pa.int64()), ("text_truncated", pa.bool_()),
])


def check_inputs(rows: list[dict], corpus: str, root, data_cfg, num_cpus: Optional[float] = None) -> None:
    """What the run is asked to do, checked before Ray starts: a manifest with rows and unique ids,
    and CPUs enough for one actor (ValueError naming the value)."""
    if num_cpus is not None and not num_cpus >= data_cfg.num_cpus_per_task:
        raise ValueError(f"num_cpus={num_cpus:g} (--num-cpus) is less than one actor needs "
                         f"(num_cpus_per_task={data_cfg.num_cpus_per_task:g}); give it at least that")
    if not rows:
        raise ValueError(f"{corpus} reader found no utterances under {str(root)!r}")
    dup = [k for k, c in Counter(r["id"] for r in rows).items() if c > 1]
    if dup:
        raise ValueError(f"utterance ids must be unique; {len(dup)} repeat, e.g. {dup[0]!r}")


def _say(what: str) -> None:
    print(f"[preprocess] {what}", flush=True)


def _remove_leftovers(out: Path) -> None:
    """Delete ``<out>.tmp-*`` / ``<out>.old-*`` of killed runs (call with the claim held: no live run
    owns them). Actors of a killed driver may write into one for a few seconds more: retry."""
    for left in sorted(out.parent.glob(f"{out.name}.tmp-*")) + sorted(out.parent.glob(f"{out.name}.old-*")):
        for _ in range(5):
            shutil.rmtree(left, ignore_errors=True)
            if not left.exists():
                break
            time.sleep(0.5)
        _say(f"removed {left.name}, left by an earlier run that did not finish" if not left.exists()
             else f"could not remove {left} (left by an earlier run); delete it by hand")


def check_output(out_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse an existing output unless ``overwrite``; never replace a directory (or URI prefix) that
    is not ours. A URI prefix of ours without report.json (a killed run's) is
    replaced without ``overwrite``."""
    if storage.is_uri(out_dir):
        storage.resolve(out_dir)  # an unknown scheme fails here, naming the URI
        names = storage.listdir(out_dir)
        if not names:
            return
        foreign = [n for n in names if not any(fnmatch.fnmatch(n, p) for p in _OURS)]
        if not overwrite and (foreign or REPORT_FILE in names):
            raise FileExistsError(f"output {out_dir!r} already exists; pass overwrite=True (--overwrite) to replace it")
        if foreign:
            raise FileExistsError(f"refusing to overwrite {out_dir!r}: it is not a ctal data set "
                                  f"(it holds {foreign[0]!r})")
        return
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"output {str(out)!r} already exists; pass overwrite=True "
                                  "(--overwrite) to replace it")
        if not (out / REPORT_FILE).is_file():
            raise FileExistsError(f"refusing to overwrite {str(out)!r}: it is not a ctal data set "
                                  f"(no {REPORT_FILE})")


class _ShardWriter:
    """Actor-side featurizer: one batch number = one run of ``rows_per_batch`` manifest rows = (at
    most) one Parquet shard."""

    def __init__(self, manifest: list, rows_per_batch: int, tokenizer_dir: str, data_cfg, out_dir: str,
                 rows_per_row_group: int, bare_tokenizer: bool):
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
        self.cfg = data_cfg
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
        try:
            for idx, row in zip(idxs, rows):
                record, bad = featurize_row(row, self.tokenizer, self.cfg)
                if bad is not None:
                    summary.append({"idx": idx, **bad, "shard": None, "duration_s": None,
                                    "n_frames": None, "text_truncated": None})
                    continue
                summary.append({"idx": idx, "id": record["id"], "audio_path": row["audio_path"],
                                "reason": None, "detail": None, "shard": name,
                                "duration_s": record["duration_s"], "n_frames": record["n_frames"],
                                "text_truncated": record["text_truncated"]})
                pending.append(record)
                if len(pending) == self.rows_per_row_group:  # bounded memory: flush a row group
                    writer = writer or pq.ParquetWriter(tmp, PARQUET_SCHEMA, compression="zstd")
                    writer.write_table(records_to_table(pending))
                    pending = []
            if pending:
                writer = writer or pq.ParquetWriter(tmp, PARQUET_SCHEMA, compression="zstd")
                writer.write_table(records_to_table(pending))
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
        return pa.Table.from_pylist(summary, schema=_SUMMARY_SCHEMA)


def resolve_tokenizer(data_cfg):
    """``data_cfg`` with ``tokenizer`` resolved to a local tokenizer folder and ``text_normalization``
    to the one it is used with. ``tokenizer=PATH`` may name a Hugging Face tokenizer folder, a ctal
    checkpoint (its ``tokenizer/``) or another data set (its verified tokenizer), each a path or URI;
    a normalization recorded with it is adopted, and a different one asked for explicitly is refused.
    Runs before anything is written or Ray starts."""
    from ctal import checkpoint
    from ctal.data import REPORT_FILE, open_dataset

    asked, saved, path = data_cfg.text_normalization, None, data_cfg.tokenizer
    if path:
        if storage.is_file(storage.join(path, REPORT_FILE)):  # a data set: one vocabulary across the journey
            tok = open_dataset(path).tokenizer
            path, saved = tok.dir, tok.text_normalization
        else:
            local = checkpoint.local_copy(path) if storage.is_uri(path) else Path(path)
            path = checkpoint.tokenizer_dir(local) or local  # a checkpoint, else a tokenizer folder
            saved = read_normalization(path)
        if asked is not None and saved is not None and asked != saved:
            raise ValueError(f"tokenizer {data_cfg.tokenizer} was made for text_normalization={saved}, "
                             f"this run asks for {asked}: drop text_normalization={asked} (or pass "
                             f"{saved}) to use it")
    return replace(data_cfg, tokenizer=str(path) if path else None,
                   text_normalization=asked or saved or DEFAULT_NORMALIZATION)


def _prepare_tokenizer(rows: list[dict], data_cfg, dest: Path) -> dict:
    """Train the BPE on the normalized transcripts (or copy ``data_cfg.tokenizer``, resolved by
    ``resolve_tokenizer``) and save it, with its text normalization, to ``dest``; decide whether the
    actors may use the bare ``tokenizers`` encoder (only if it gives the same ids)."""
    if data_cfg.tokenizer:
        tok = load_tokenizer(data_cfg.tokenizer)
        tok.save_pretrained(str(dest))
        save_normalization(dest, data_cfg.text_normalization)
        source = str(Path(data_cfg.tokenizer).resolve())
    else:
        tok, n_texts = train_transcript_tokenizer(rows, data_cfg, dest)
        source = f"byte-level BPE trained on {n_texts} transcripts (vocab_size={data_cfg.vocab_size})"
    return tokenizer_entry(tok, dest, source,
                           bare_encoder=_bare_encoder_agrees(tok, dest, rows, data_cfg.max_text_tokens))


def _bare_encoder_agrees(tok, tok_dir: Path, rows: list[dict], max_tokens: int) -> bool:
    """Some transformers tokenizer classes add Python-side behaviour; check, don't assume."""
    if not (tok_dir / "tokenizer.json").is_file():
        return False
    bare = load_backend(tok_dir, max_tokens)
    texts = [r["text"] for r in rows[:500] if r.get("text") and not r.get("text_error")]
    texts += ["", "Mixed CASE, punctuation!  and   spaces", "word " * (2 * max_tokens)]  # + truncation
    return all(bare.encode(t).ids == tok(t, truncation=True, max_length=max_tokens)["input_ids"]
               for t in texts)


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
    claim = claim or claim_output(out, _say)
    try:
        check_output(out, overwrite)
        data_cfg = resolve_tokenizer(data_cfg)
        if rows is None:
            from ctal.corpora import read_corpus
            rows = read_corpus(corpus, str(root), **(reader_kwargs or {}))
        check_inputs(rows, corpus, root, data_cfg, num_cpus)
        if storage.is_uri(out):  # shards go straight to the object store
            report = _preprocess_to_uri(rows, corpus, root, out, data_cfg, num_cpus, rows_per_row_group)
        else:
            _remove_leftovers(out)
            report = _preprocess_local(rows, corpus, root, out, data_cfg, num_cpus, rows_per_row_group)
    finally:
        release_output(claim)
    storage.delete(rejected_quarantine(out))  # an earlier refused run's report no longer applies
    if verbose:
        print(format_summary(report), flush=True)
    return report


def _preprocess_local(rows, corpus, root, out: Path, data_cfg, num_cpus, rows_per_row_group) -> dict:
    tmp = out.parent / f"{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    try:
        t_start = time.perf_counter()
        tok_report = _prepare_tokenizer(rows, data_cfg, tmp / TOKENIZER_DIR)
        t_tok = time.perf_counter() - t_start
        summary, n_actors, t_feat = _featurize(rows, data_cfg, tmp, num_cpus, rows_per_row_group,
                                               tok_report["bare_encoder"])
        report = _finish(summary, rows, corpus, root, out, tmp, data_cfg, tok_report, n_actors,
                         t_tok, t_feat, time.perf_counter() - t_start)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _featurize(rows, data_cfg, tmp: Path | str, num_cpus, rows_per_row_group, bare_tokenizer):
    import ray

    from .console import init_ray

    init_ray()  # honours RAY_ADDRESS; no-op when Ray is up
    cpus = num_cpus if num_cpus is not None else ray.cluster_resources().get("CPU", 1.0)
    if cpus < data_cfg.num_cpus_per_task:  # one actor would wait for CPUs that never come
        raise ValueError(f"the Ray cluster has {cpus:g} CPUs, less than one actor needs "
                         f"(num_cpus_per_task={data_cfg.num_cpus_per_task:g})")
    n = len(rows)
    n_actors = max(1, int(cpus // data_cfg.num_cpus_per_task + 1e-9))
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
                               "bare_tokenizer": bare_tokenizer},
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=n_actors, max_tasks_in_flight_per_actor=1),
        num_cpus=data_cfg.num_cpus_per_task,
    )
    parts = []
    with Progress(n, "preprocess", unit="utterances") as bar:  # Ray Data's own bars are off (console)
        for part in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            parts.append(part)
            bar.update(part.num_rows)
    summary = pa.concat_tables(parts).sort_by("idx") if parts else _SUMMARY_SCHEMA.empty_table()
    return summary, n_actors, time.perf_counter() - t0


def _finish(summary: pa.Table, rows, corpus, root, out: Path, tmp: Path, data_cfg, tok_report,
            n_actors, t_tok, t_feat, t_total, shards: Optional[list[dict]] = None) -> dict:
    n_in = len(rows)
    idx = summary["idx"].to_pylist()
    if idx != list(range(n_in)):  # every manifest row must come back exactly once
        raise RuntimeError(f"{n_in} rows in, {len(idx)} accounted for ({len(set(idx))} distinct): "
                           "rows were lost or duplicated")
    reasons = summary["reason"].to_pylist()
    written_mask = [r is None for r in reasons]
    n_written = sum(written_mask)
    n_truncated = sum(bool(t) for t in summary["text_truncated"].to_pylist())

    # Shards referenced by the summary are the data set; anything else (a retried batch's leftovers)
    # goes. Renaming to part-00000.. gives a stable order that follows the manifest.
    # (``shards`` given: a URI output, where _uri_shards did this without renames.)
    referenced = sorted({s for s in summary["shard"].to_pylist() if s is not None})
    if shards is None:
        for f in tmp.iterdir():
            if f.is_file() and f.name not in referenced and f.name.endswith((".parquet", ".inprogress")):
                f.unlink()
        shards = []
        for k, name in enumerate(referenced):
            final = f"part-{k:05d}.parquet"
            os.replace(tmp / name, tmp / final)
            shards.append({"file": final, "rows": pq.ParquetFile(tmp / final).metadata.num_rows})

    q = summary.filter(pc.invert(pa.array(written_mask)))
    pq.write_table(q.select([f.name for f in QUARANTINE_SCHEMA]).cast(QUARANTINE_SCHEMA),
                   tmp / QUARANTINE_FILE, compression="zstd")
    if not n_written:  # an empty data set would only fail later, in training: refuse it here
        kept = rejected_quarantine(out)
        storage.upload_file(tmp / QUARANTINE_FILE, kept)
        why = ", ".join(f"{r}: {k}" for r, k in sorted(Counter(reasons).items()))
        raise NothingToPublishError(f"all {n_in} utterances were quarantined ({why}); nothing was published "
                                    f"to {out}. Each utterance's reason is in {kept}")

    audio_s = float(sum(d for d, w in zip(summary["duration_s"].to_pylist(), written_mask) if w))
    # beside the report, which links it: the data set's code, versions, machine and times
    run_manifest.write(tmp, run_manifest.finished(
        "preprocessing", {"corpus": corpus, "root": str(root), "out": str(out), "data_config": data_cfg}, t_total))
    # Written last (write_report checks the counts): its presence marks the directory complete.
    return write_report(
        tmp, corpus=corpus, shards=shards, tokenizer=tok_report, features=asdict(data_cfg.features),
        counts={"in": n_in, "written": n_written, "quarantined": n_in - n_written,
                "quarantined_by_reason": dict(sorted(Counter(r for r in reasons if r).items())),
                # written rows whose token ids stop at max_text_tokens (the text goes on)
                "text_truncated": n_truncated},
        root=str(Path(root).resolve()), hours=audio_s / 3600.0, manifest=run_manifest.MANIFEST_FILE,
        n_frames=int(sum(n for n in summary["n_frames"].to_pylist() if n is not None)),
        data_config=asdict(data_cfg),
        throughput={"featurize_wall_s": t_feat, "tokenizer_s": t_tok, "total_wall_s": t_total,
                    "utterances_per_s": n_in / t_feat, "realtime_factor": audio_s / t_feat,
                    "actors": n_actors, "cpus_per_actor": data_cfg.num_cpus_per_task})


def _preprocess_to_uri(rows: list[dict], corpus: str, root, out: str, data_cfg, num_cpus: Optional[float],
                      rows_per_row_group: int) -> dict:
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
                _say(f"removing {out}: the unfinished output of an earlier run (no {REPORT_FILE})")
            storage.delete(storage.join(out, REPORT_FILE))  # first: the old set stops counting as complete
            storage.delete(out)
        t_start = time.perf_counter()
        tok_report = _prepare_tokenizer(rows, data_cfg, staging / TOKENIZER_DIR)
        storage.upload_dir(staging / TOKENIZER_DIR, storage.join(out, TOKENIZER_DIR))
        t_tok = time.perf_counter() - t_start
        summary, n_actors, t_feat = _featurize(rows, data_cfg, out, num_cpus, rows_per_row_group,
                                               tok_report["bare_encoder"])
        shards = _uri_shards(summary, out)
        try:
            report = _finish(summary, rows, corpus, root, out, staging, data_cfg, tok_report, n_actors,
                             t_tok, t_feat, time.perf_counter() - t_start, shards=shards)
        except NothingToPublishError:
            storage.delete(out)  # the tokenizer uploaded for the actors: an output that never was
            raise
        storage.upload_file(staging / QUARANTINE_FILE, storage.join(out, QUARANTINE_FILE))
        storage.upload_file(staging / run_manifest.MANIFEST_FILE, storage.join(out, run_manifest.MANIFEST_FILE))
        storage.upload_file(staging / REPORT_FILE, storage.join(out, REPORT_FILE))  # last: marks it complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _uri_shards(summary, out: str) -> list[dict]:
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


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished data set into place; an existing one (checked earlier) is replaced."""
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            old = out.parent / f"{out.name}.old-{uuid.uuid4().hex[:12]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
            return
    tmp.rename(out)


def format_summary(report: dict) -> str:
    c, t = report["counts"], report["throughput"]
    lines = [
        f"{report['corpus']}: {c['in']} utterances in, {c['written']} written "
        f"({report['hours']:.3f} h of audio in {len(report['shards'])} shards), "
        f"{c['quarantined']} quarantined",
    ]
    for reason, k in c["quarantined_by_reason"].items():
        lines.append(f"  quarantined {reason}: {k}")
    if c.get("text_truncated"):
        lines.append(f"  {c['text_truncated']} transcripts cut to max_text_tokens="
                     f"{report['data_config']['max_text_tokens']} tokens")
    lines.append(f"featurized in {t['featurize_wall_s']:.1f} s on {t['actors']} actors: "
                 f"{t['utterances_per_s']:.1f} utt/s, {t['realtime_factor']:.0f}x realtime")
    lines.append(f"tokenizer: {report['tokenizer']['source']} (vocab {report['tokenizer']['vocab_size']}, "
                 f"sha256 {report['tokenizer']['hash'][:12]})")
    return "\n".join(lines)
