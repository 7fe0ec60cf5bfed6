"""LibriSpeech reader.

Layout (as extracted from openslr.org/12)::

    <root>/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
    <root>/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt   # "<utt-id> <TEXT>" per line

`root` is the LibriSpeech directory or one subset directory (train-clean-100, dev-clean, ...);
split = subset name, speaker = the speaker directory.
"""

from __future__ import annotations

from pathlib import Path

from ._common import MISSING_TRANSCRIPT, CorpusLayoutError, audio_by_stem, decode_transcript, make_row, read_lines

LAYOUT = (
    "expected <root>/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac with "
    "<speaker>-<chapter>.trans.txt in each chapter directory, where <root> is the LibriSpeech "
    "directory or one subset directory such as train-clean-100"
)


def read_librispeech(root) -> list[dict]:
    root = Path(root)
    if not root.is_dir():
        raise CorpusLayoutError(f"{root} is not a directory; {LAYOUT}")
    subsets = [root] if _is_subset(root) else sorted(d for d in root.iterdir() if d.is_dir() and _is_subset(d))
    rows = []
    for subset in subsets:
        for chapter in sorted(subset.glob("*/*")):
            if chapter.is_dir() and chapter.name.isdigit() and chapter.parent.name.isdigit():
                rows += _read_chapter(chapter, split=subset.name)
    if not rows:
        raise CorpusLayoutError(f"no LibriSpeech utterances under {root}; {LAYOUT}")
    return sorted(rows, key=lambda r: r["id"])


def _is_subset(d: Path) -> bool:
    return any(c.is_dir() and c.name.isdigit() for c in d.iterdir())


def _read_chapter(chapter: Path, split: str) -> list[dict]:
    speaker = chapter.parent.name
    texts = {}
    trans = chapter / f"{speaker}-{chapter.name}.trans.txt"
    if trans.is_file():
        for line in read_lines(trans):
            parts = line.strip().split(None, 1)
            if parts:
                texts[parts[0].decode("utf-8", "replace")] = decode_transcript(parts[1] if len(parts) > 1 else b"")
    audio = audio_by_stem(chapter.iterdir(), ".flac")
    # A transcript line without its flac still becomes a row: the pipeline quarantines it as missing audio.
    return [
        make_row(utt, "librispeech", audio.get(utt, chapter / f"{utt}.flac"),
                 *texts.get(utt, (None, MISSING_TRANSCRIPT)), speaker=speaker, split=split)
        for utt in sorted(audio.keys() | texts.keys())
    ]
