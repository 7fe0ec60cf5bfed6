"""Generic CSV/TSV manifest reader, for corpora without a reader of their own.

Columns: audio_path and text (required); id, speaker, split, label, label_name (optional). Relative
audio paths are resolved against the manifest's directory. Defaults: id = audio_path without its
suffix, speaker = "unknown", split = "train", label / label_name = None. TSV when the file ends in
.tsv or its header has tabs and no commas.
"""

from __future__ import annotations

from pathlib import Path

from ._common import CorpusLayoutError, make_row, plain_field, read_table, transcript_field

REQUIRED = ("audio_path", "text")
OPTIONAL = ("id", "speaker", "split", "label", "label_name")


def read_manifest(path, *, corpus: str = "csv") -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise CorpusLayoutError(f"{path} is not a file; expected a CSV/TSV manifest with columns "
                                f"{', '.join(REQUIRED)} and optionally {', '.join(OPTIONAL)}")
    header, records = read_table(path)
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise CorpusLayoutError(f"{path} lacks required column(s) {', '.join(missing)} (header: {header}); "
                                f"expected {', '.join(REQUIRED)} and optionally {', '.join(OPTIONAL)}")
    rows, seen = [], {}
    for line, rec in records:
        audio = plain_field(rec.get("audio_path"))
        if not audio:
            raise CorpusLayoutError(f"{path}:{line}: empty audio_path")
        uid = plain_field(rec.get("id")) or str(Path(audio).with_suffix(""))
        if uid in seen:
            raise CorpusLayoutError(f"{path}:{line}: id {uid!r} repeats line {seen[uid]}")
        seen[uid] = line
        label = plain_field(rec.get("label"))
        try:
            label = float(label) if label else None
        except ValueError:
            raise CorpusLayoutError(f"{path}:{line}: label {label!r} is not a number "
                                    "(put class names in label_name and class indices in label)") from None
        rows.append(make_row(uid, corpus, path.parent / Path(audio).expanduser(), *transcript_field(rec.get("text")),
                             speaker=plain_field(rec.get("speaker")) or "unknown",
                             split=plain_field(rec.get("split")) or "train",
                             label=label, label_name=plain_field(rec.get("label_name")) or None))
    return rows
