"""Preprocessing's Ray-free half (ctal.distributed.preprocess runs the Ray Data half): what a run checks
before it starts (its inputs, its output, the tokenizer it is asked to use), the tokenizer it trains
or copies, and, from the actors' per-row summary, the data set it publishes (``quarantine.parquet``,
``report.json`` last, the rename or the URI's shards) and the summary it prints.
"""
from __future__ import annotations

import fnmatch
import os
import shutil
import time
import uuid
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctal import manifest as run_manifest, storage  # not the corpus manifest rows preprocessing reads
from ctal.data import (QUARANTINE_FILE, QUARANTINE_SCHEMA, REPORT_FILE, SHARD_GLOB, TOKENIZER_DIR, tokenizer_entry,
                       write_report)
from ctal.featurize import train_transcript_tokenizer
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
SUMMARY_SCHEMA = pa.schema([
    ("idx", pa.int64()), ("id", pa.string()), ("audio_path", pa.string()), ("reason", pa.string()),
    ("detail", pa.string()), ("shard", pa.string()), ("duration_s", pa.float64()),
    ("n_frames", pa.int64()), ("text_truncated", pa.bool_()),
])


def check_inputs(rows: list[dict], corpus: str, root, data_cfg, num_cpus: Optional[float] = None) -> None:
    """What the run is asked to do, checked before Ray starts: a manifest with rows and unique ids,
    and CPUs enough for one actor (ValueError naming the value). An SSL front end's folder is
    ``resolve_upstream``'s to check."""
    if num_cpus is not None and not num_cpus >= data_cfg.num_cpus_per_task:
        raise ValueError(f"num_cpus={num_cpus:g} (--num-cpus) is less than one actor needs "
                         f"(num_cpus_per_task={data_cfg.num_cpus_per_task:g}); give it at least that")
    if not rows:
        raise ValueError(f"{corpus} reader found no utterances under {str(root)!r}")
    dup = [k for k, c in Counter(r["id"] for r in rows).items() if c > 1]
    if dup:
        raise ValueError(f"utterance ids must be unique; {len(dup)} repeat, e.g. {dup[0]!r}")


def say(what: str) -> None:
    print(f"[preprocess] {what}", flush=True)


def remove_leftovers(out: Path) -> None:
    """Delete ``<out>.tmp-*`` / ``<out>.old-*`` of killed runs (call with the claim held: no live run
    owns them). Actors of a killed driver may write into one for a few seconds more: retry."""
    for left in sorted(out.parent.glob(f"{out.name}.tmp-*")) + sorted(out.parent.glob(f"{out.name}.old-*")):
        for _ in range(5):
            shutil.rmtree(left, ignore_errors=True)
            if not left.exists():
                break
            time.sleep(0.5)
        say(f"removed {left.name}, left by an earlier run that did not finish" if not left.exists()
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


def resolve_tokenizer(data_cfg):
    """``data_cfg`` with ``tokenizer`` resolved to a local tokenizer folder and ``text_normalization``
    to the one it is used with. ``tokenizer=PATH`` may name a Hugging Face tokenizer folder, a ctal
    checkpoint (its ``tokenizer/``) or another data set (its verified tokenizer), each a path or URI;
    a normalization recorded with it is adopted, and a different one asked for explicitly is refused.
    Runs before anything is written or Ray starts."""
    from ctal import checkpoint, checkpoint_data
    from ctal.data import REPORT_FILE, open_dataset

    asked, saved, path = data_cfg.text_normalization, None, data_cfg.tokenizer
    if path:
        if storage.is_file(storage.join(path, REPORT_FILE)):  # a data set: one vocabulary across the journey
            tok = open_dataset(path).tokenizer
            path, saved = tok.dir, tok.text_normalization
        else:
            local = checkpoint.local_copy(path) if storage.is_uri(path) else Path(path)
            path = checkpoint_data.tokenizer_dir(local) or local  # a checkpoint, else a tokenizer folder
            saved = read_normalization(path)
        if asked is not None and saved is not None and asked != saved:
            raise ValueError(f"tokenizer {data_cfg.tokenizer} was made for text_normalization={saved}, "
                             f"this run asks for {asked}: drop text_normalization={asked} (or pass "
                             f"{saved}) to use it")
    return replace(data_cfg, tokenizer=str(path) if path else None,
                   text_normalization=asked or saved or DEFAULT_NORMALIZATION)


def resolve_upstream(data_cfg) -> tuple:
    """(``data_cfg`` with an SSL front end's folder absolute and its layers resolved, the upstream's
    record for ``report.json``: ``ctal.upstream.UpstreamInfo.to_dict()``), or (``data_cfg``, None)
    for log-mel. The folder is checked (UpstreamError naming what is wrong) before Ray starts."""
    fc = data_cfg.features
    if fc.frontend != "ssl":
        return data_cfg, None
    from ctal.upstream import inspect_upstream

    info = inspect_upstream(fc.ssl_model, fc.ssl_layers)
    fc = replace(fc, ssl_model=str(Path(fc.ssl_model).resolve()), ssl_layers=list(info.layers),
                 sample_rate=info.sample_rate)
    return replace(data_cfg, features=fc), info.to_dict()


def prepare_tokenizer(rows: list[dict], data_cfg, dest: Path) -> dict:
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


def finish(summary: pa.Table, rows, corpus, root, out: Path, tmp: Path, data_cfg, tok_report,
            n_actors, t_tok, t_feat, t_total, shards: Optional[list[dict]] = None,
            upstream: Optional[dict] = None) -> dict:
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
    # (``shards`` given: a URI output, where uri_shards did this without renames.)
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
        tmp, corpus=corpus, shards=shards, tokenizer=tok_report, features=asdict(data_cfg.features), upstream=upstream,
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


def uri_shards(summary, out: str) -> list[dict]:
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


def publish(tmp: Path, out: Path) -> None:
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
