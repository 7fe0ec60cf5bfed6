"""IEMOCAP reader for the 4-class emotion protocol.

Layout (IEMOCAP_full_release)::

    <root>/Session{1..5}/sentences/wav/<dialog>/<utt>.wav
    <root>/Session{1..5}/dialog/transcriptions/<dialog>.txt   # "Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me."
    <root>/Session{1..5}/dialog/EmoEvaluation/<dialog>.txt    # "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5, 2.5, 2.5]"

Classes neu, hap (hap + exc merged), ang, sad; label = index in EMOTION_CLASSES. Utterances with other
labels (fru, sur, xxx, ...) or none are outside the protocol: dropped, counted, logged, not quarantined.
split = "Session1".."Session5" (leave-one-session-out folds); speaker = session + the utterance's gender
letter, e.g. "Ses01_F".
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

from ._common import MISSING_TRANSCRIPT, CorpusLayoutError, audio_by_stem, decode_transcript, make_row, read_lines

EMOTION_CLASSES = ("neu", "hap", "ang", "sad")
MERGED = {"exc": "hap"}

LAYOUT = (
    "expected <root>/Session{1..5}/sentences/wav/<dialog>/<utt>.wav with transcripts in "
    "Session*/dialog/transcriptions/<dialog>.txt and labels in Session*/dialog/EmoEvaluation/<dialog>.txt"
)

_EVAL_LINE = re.compile(rb"^\[\s*[\d.]+\s*-\s*[\d.]+\s*\]\s+(\S+)\s+(\S+)")
_TRANS_LINE = re.compile(rb"^(\S+)\s+\[[^\]]*\]:\s?(.*)$")

log = logging.getLogger(__name__)


def read_iemocap(root, *, stats: dict | None = None) -> list[dict]:
    """Rows of the 4-class protocol; `stats`, if given, receives kept / merged / dropped counts."""
    root = Path(root)
    sessions = sorted(d for d in root.glob("Session[1-5]") if d.is_dir()) if root.is_dir() else []
    if not sessions:
        raise CorpusLayoutError(f"no Session1..Session5 directories in {root}; {LAYOUT}")
    rows, dropped, merged = [], Counter(), 0
    for session in sessions:
        labels = _parse(session / "dialog" / "EmoEvaluation", _EVAL_LINE)
        texts = _parse(session / "dialog" / "transcriptions", _TRANS_LINE)
        wav_dir = session / "sentences" / "wav"
        wavs = audio_by_stem(wav_dir.glob("*/*"), ".wav")
        if not labels and not wavs:
            raise CorpusLayoutError(f"{session} has neither wav files nor EmoEvaluation labels; {LAYOUT}")
        for utt in sorted(labels.keys() | wavs.keys()):
            raw = labels.get(utt, b"unlabeled").decode("ascii", "replace").lower()
            name = MERGED.get(raw, raw)
            if name not in EMOTION_CLASSES:
                dropped[raw] += 1
                continue
            merged += raw != name
            audio = wavs.get(utt, wav_dir / utt.rsplit("_", 1)[0] / f"{utt}.wav")
            text, error = decode_transcript(texts[utt]) if utt in texts else (None, MISSING_TRANSCRIPT)
            rows.append(make_row(utt, "iemocap", audio, text, error, speaker=_speaker(utt), split=session.name,
                                 label=EMOTION_CLASSES.index(name), label_name=name))
    if not rows:
        raise CorpusLayoutError(f"no utterance under {root} carries one of {EMOTION_CLASSES} (or exc); {LAYOUT}")
    log.info("IEMOCAP: kept %d utterances (%d exc merged into hap), dropped %d outside the 4 classes: %s",
             len(rows), merged, sum(dropped.values()), dict(sorted(dropped.items())))
    if stats is not None:
        stats.update(kept=len(rows), merged_exc=merged, dropped=dict(sorted(dropped.items())))
    return rows


def _parse(directory: Path, pattern: re.Pattern) -> dict[str, bytes]:
    """utt id -> second capture of `pattern` over <directory>/*.txt; other lines (annotator, header) skipped."""
    out = {}
    for f in sorted(directory.glob("*.txt")):
        if f.name.startswith("."):  # macOS "._" resource forks ship inside the official archive
            continue
        for line in read_lines(f):
            m = pattern.match(line.strip())
            if m:
                out[m[1].decode("utf-8", "replace")] = m[2]
    return out


def _speaker(utt: str) -> str:
    # Ses01F_impro01_F000 -> Ses01_F: the letter before the turn number is the speaker's gender.
    return f"{utt[:5]}_{utt.rsplit('_', 1)[-1][:1]}"
