"""Tokenizers: the paper's byte-level BPE (trained on the corpus transcripts) or any local HF tokenizer.

A tokenizer travels with the data set (``<data>/tokenizer/``) and is identified by ``tokenizer_hash``,
so pretraining and fine-tuning can refuse data tokenized differently from their model. The text
normalization applied before tokenizing is saved beside it (``NORMALIZATION_FILE``) and is part of
the hash: a tokenizer is never used with another normalization than the one it was made for.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Optional

# What is done to a transcript before it is tokenized (the Parquet ``text`` column keeps it as read).
# "release": the authors' fine-tuning rule, applied everywhere: `.,?!` become spaces, runs of spaces
#   become one, then lower case (on LibriSpeech, which has no punctuation, this is their pretraining
#   rule: lower case). "lower": lower case only. "none": as read.
TEXT_NORMALIZATIONS = ("release", "lower", "none")
DEFAULT_NORMALIZATION = "release"  # where neither the config nor the tokenizer says otherwise
NORMALIZATION_FILE = "text_normalization.json"

# RoBERTa's special tokens and ids (the paper's byte-level BPE follows RoBERTa).
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")

# Files that define a tokenizer (others in a model dir, e.g. weights, are not part of its identity).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
    NORMALIZATION_FILE,
)
# Keys that transformers writes into tokenizer_config.json about *how* it was loaded, not what it is;
# they change on a load → save round trip and must not change the hash.
_VOLATILE_CONFIG_KEYS = frozenset({
    "is_local", "local_files_only", "name_or_path", "_commit_hash", "cache_dir", "revision",
    "subfolder", "token", "trust_remote_code", "_from_auto",
})


def normalize_text(text: str, mode: Optional[str]) -> str:
    """``text`` as it is tokenized under normalization ``mode`` (one of TEXT_NORMALIZATIONS; None:
    the default)."""
    mode = mode or DEFAULT_NORMALIZATION
    if mode == "release":
        return re.sub(" +", " ", re.sub(r"[.,?!]", " ", text)).lower()
    if mode == "lower":
        return text.lower()
    if mode == "none":
        return text
    raise ValueError(f"text_normalization={mode!r} is not one of {', '.join(TEXT_NORMALIZATIONS)}")


def save_normalization(tokenizer_dir: str | Path, mode: Optional[str]) -> None:
    mode = mode or DEFAULT_NORMALIZATION
    normalize_text("", mode)  # refuses an unknown mode
    Path(tokenizer_dir, NORMALIZATION_FILE).write_text(json.dumps({"text_normalization": mode}) + "\n")


def read_normalization(tokenizer_dir: str | Path) -> Optional[str]:
    """The normalization saved with a tokenizer, or None where none was recorded (a Hugging Face
    tokenizer folder, or a ctal tokenizer made before normalization was recorded)."""
    f = Path(tokenizer_dir, NORMALIZATION_FILE)
    return json.loads(f.read_text(encoding="utf-8"))["text_normalization"] if f.is_file() else None


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path,
                        *, min_frequency: int = 2, model_max_length: int = 512):
    """Train a byte-level BPE (RoBERTa-style: <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4, encodings
    wrapped as ``<s> … </s>``), save it to ``out_dir`` with ``save_pretrained`` and return it.

    The vocabulary is at most ``vocab_size``: a small corpus yields fewer merges.
    """
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    backend = bpe._tokenizer  # the underlying tokenizers.Tokenizer; the wrapper adds nothing we keep
    backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    for i, tok in enumerate(SPECIAL_TOKENS):  # the model and masking rely on these ids (RoBERTa's)
        if backend.token_to_id(tok) != i:
            raise RuntimeError(f"BPE training gave {tok} id {backend.token_to_id(tok)}, expected {i}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", cls_token="<s>", eos_token="</s>",
        sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
        model_max_length=model_max_length,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(path: str | Path):
    """Load a tokenizer saved by ``train_bpe_tokenizer`` or any local HF tokenizer dir (never downloads)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{str(path)!r} holds no tokenizer files (expected one of "
                                f"{', '.join(TOKENIZER_FILES)})")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_backend(path: str | Path, max_length: int):
    """The bare ``tokenizers`` encoder of a saved fast tokenizer, set to truncate like
    ``tokenizer(text, truncation=True, max_length=max_length)``. Loads in milliseconds without
    importing transformers (the preprocessing actors use it)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def tokenizer_hash(path: str | Path) -> str:
    """sha256 over the tokenizer files of ``path`` (sorted by name). JSON files are hashed in canonical
    form without load-time keys, so a load → ``save_pretrained`` round trip keeps the hash."""
    path = Path(path)
    h = hashlib.sha256()
    found = False
    for name in sorted(TOKENIZER_FILES):
        f = path / name
        if not f.is_file():
            continue
        found = True
        data = f.read_bytes()
        if name.endswith(".json"):
            obj = json.loads(data)
            if name == "tokenizer_config.json":
                obj = {k: v for k, v in obj.items() if k not in _VOLATILE_CONFIG_KEYS}
            data = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
        h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    if not found:
        raise FileNotFoundError(f"{str(path)!r} holds no tokenizer files")
    return h.hexdigest()


def tokenizer_info(tokenizer) -> dict:
    """What the model and masking need from a tokenizer: vocab size and the special ids."""
    return {
        "vocab_size": len(tokenizer),  # includes added tokens, unlike tokenizer.vocab_size
        "pad_token_id": tokenizer.pad_token_id,
        "mask_token_id": tokenizer.mask_token_id,
        "special_token_ids": sorted(set(tokenizer.all_special_ids)),
    }
