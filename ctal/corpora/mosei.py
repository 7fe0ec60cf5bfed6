"""CMU-MOSEI reader (segment-level sentiment).

Layout (the MMSA-style label file plus one wav per segment)::

    <root>/label.csv                          # columns video_id, clip_id, text, label, mode
    <root>/wav/<video_id>_<clip_id>.wav       # or <root>/wav/<video_id>/<clip_id>.wav

label is the sentiment score in [-3, 3]; mode train/valid/test becomes split train/dev/test;
speaker = video_id (MOSEI has no speaker ids; one video is one speaker, near enough). Rows follow
label.csv: a wav without a label row is ignored, a label row without its wav still becomes a row so the
pipeline can quarantine it as missing audio.
"""

from __future__ import annotations

import math
from pathlib import Path

from ._common import CorpusLayoutError, audio_by_stem, is_audio, make_row, plain_field, read_table, transcript_field

LAYOUT = (
    "expected <root>/label.csv with columns video_id, clip_id, text, label, mode (train/valid/test) and "
    "<root>/wav/<video_id>_<clip_id>.wav (or <root>/wav/<video_id>/<clip_id>.wav)"
)
COLUMNS = ("video_id", "clip_id", "text", "label", "mode")
SPLITS = {"train": "train", "valid": "dev", "dev": "dev", "test": "test"}


def read_mosei(root) -> list[dict]:
    root = Path(root)
    label_csv, wav_dir = root / "label.csv", root / "wav"
    if not (label_csv.is_file() and wav_dir.is_dir()):
        raise CorpusLayoutError(f"{root} lacks label.csv or the wav/ directory; {LAYOUT}")
    header, records = read_table(label_csv)
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise CorpusLayoutError(f"{label_csv} lacks column(s) {', '.join(missing)}; {LAYOUT}")
    flat = audio_by_stem(wav_dir.glob("*"), ".wav")
    nested = {(p.parent.name, p.stem): p for p in wav_dir.glob("*/*") if is_audio(p, ".wav")}
    rows = []
    for line, rec in records:
        video, clip, mode = plain_field(rec.get("video_id")), plain_field(rec.get("clip_id")), plain_field(rec.get("mode"))
        if mode.lower() not in SPLITS:
            raise CorpusLayoutError(f"{label_csv}:{line}: mode {mode!r} is not one of train/valid/test")
        try:
            label = float(plain_field(rec.get("label")))
        except ValueError:
            label = math.nan
        if not -3.0 <= label <= 3.0:  # NaN fails too: a wrong column, not a row to quarantine
            raise CorpusLayoutError(f"{label_csv}:{line}: label {rec.get('label')!r} is not a number in [-3, 3]")
        audio = flat.get(f"{video}_{clip}") or nested.get((video, clip)) or wav_dir / f"{video}_{clip}.wav"
        rows.append(make_row(f"{video}_{clip}", "mosei", audio, *transcript_field(rec.get("text")),
                             speaker=video, split=SPLITS[mode.lower()], label=label))
    if not rows:
        raise CorpusLayoutError(f"{label_csv} has no rows; {LAYOUT}")
    return sorted(rows, key=lambda r: r["id"])
