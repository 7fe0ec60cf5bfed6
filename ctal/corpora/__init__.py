"""Corpus readers: each turns a directory in a corpus's own on-disk layout into manifest rows.

A row is a dict with exactly the keys in ROW_KEYS. Readers list files and parse text/label files but
never open audio: decoding, and quarantining bad or missing audio, is the preprocessing pipeline's job.
Transcript problems are recorded in `text_error` ("missing_transcript", "non_utf8_transcript"), never
raised; a root that does not fit the layout raises CorpusLayoutError naming the expected layout.
"""

from ._common import MISSING_TRANSCRIPT, NON_UTF8_TRANSCRIPT, ROW_KEYS, CorpusLayoutError
from .iemocap import EMOTION_CLASSES, read_iemocap
from .librispeech import read_librispeech
from .manifest import read_manifest
from .mosei import read_mosei
from .trials import make_trials

READERS = {
    "librispeech": read_librispeech,
    "iemocap": read_iemocap,
    "mosei": read_mosei,
    "csv": read_manifest,
}


def read_corpus(name: str, root, **kw) -> list[dict]:
    """Rows of corpus `name` at `root` (for "csv", the manifest file)."""
    if name not in READERS:
        raise ValueError(f"unknown corpus {name!r}; known: {', '.join(sorted(READERS))}")
    return READERS[name](root, **kw)


__all__ = [
    "CorpusLayoutError", "EMOTION_CLASSES", "MISSING_TRANSCRIPT", "NON_UTF8_TRANSCRIPT", "READERS", "ROW_KEYS",
    "make_trials", "read_corpus", "read_iemocap", "read_librispeech", "read_manifest", "read_mosei",
]
