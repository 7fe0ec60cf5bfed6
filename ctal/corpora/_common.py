"""Pieces every corpus reader shares: the manifest row, the layout error, tolerant text decoding,
audio files in any letter case and text files with or without a byte-order mark."""

from __future__ import annotations

import codecs
import csv
import io
import os
from pathlib import Path
from typing import Iterable

ROW_KEYS = ("id", "corpus", "audio_path", "text", "text_error", "speaker", "split", "label", "label_name")

MISSING_TRANSCRIPT = "missing_transcript"
NON_UTF8_TRANSCRIPT = "non_utf8_transcript"


class CorpusLayoutError(ValueError):
    """A corpus root that does not fit its reader's layout; the message says which layout was expected."""


def make_row(id, corpus, audio_path, text, text_error, speaker, split, label=None, label_name=None) -> dict:
    return {
        "id": id,
        "corpus": corpus,
        "audio_path": os.path.abspath(os.path.expanduser(str(audio_path))),
        "text": text,
        "text_error": text_error,
        "speaker": speaker,
        "split": split,
        "label": None if label is None else float(label),
        "label_name": label_name,
    }


def is_audio(path: Path, suffix: str) -> bool:
    """``path`` ends in ``suffix`` in any letter case (.flac, .FLAC) and is not hidden (macOS "._" forks)."""
    return path.suffix.lower() == suffix and not path.name.startswith(".")


def audio_by_stem(paths: Iterable[Path], suffix: str) -> dict[str, Path]:
    """stem → path of the ``paths`` that are audio files with ``suffix`` (``is_audio``)."""
    return {p.stem: p for p in paths if is_audio(p, suffix)}


def read_lines(path: Path) -> list[bytes]:
    """A text file's lines as bytes, without a UTF-8 byte-order mark (Windows editors add one; it
    would become part of the first utterance id)."""
    return path.read_bytes().removeprefix(codecs.BOM_UTF8).splitlines()


def decode_transcript(raw: bytes) -> tuple[str | None, str | None]:
    """(text, text_error) for one transcript's bytes; a bad one marks only its own row."""
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, NON_UTF8_TRANSCRIPT
    return (text, None) if text else (None, MISSING_TRANSCRIPT)


def transcript_field(value: str | None) -> tuple[str | None, str | None]:
    """(text, text_error) for a CSV field decoded with surrogateescape (see `read_table`)."""
    if value is None:
        return None, MISSING_TRANSCRIPT
    return decode_transcript(value.encode("utf-8", "surrogateescape"))


def plain_field(value: str | None) -> str:
    """An id-like CSV field; undecodable bytes become U+FFFD rather than surrogates Arrow would reject."""
    return (value or "").encode("utf-8", "surrogateescape").decode("utf-8", "replace").strip()


def read_table(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header (lower-cased) and (line number, record) pairs of a CSV or TSV file.

    Decoded with surrogateescape so that one non-UTF-8 cell does not fail the file; `transcript_field`
    later turns such a cell into a quarantinable row. TSV when the suffix is .tsv or the header has tabs
    and no commas.
    """
    text = path.read_bytes().decode("utf-8", "surrogateescape").lstrip("\ufeff")
    first = text.split("\n", 1)[0]
    tab = path.suffix.lower() == ".tsv" or ("\t" in first and "," not in first)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tab else ",")
    header = [h.strip().lower() for h in next(reader, [])]
    records = []
    for cells in reader:
        if not any(c.strip() for c in cells):
            continue
        records.append((reader.line_num, dict(zip(header, cells))))
    return header, records
