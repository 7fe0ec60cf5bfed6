"""What a checkpoint was trained on, and the checks that refuse other data: the front end (and for
SSL features the upstream's hash and layers: ``check_frontend``), the tokenizer (``check_tokenizer``),
the preprocessing settings new audio must go through (``trained_data_config``), and the entries a
checkpoint's state records of its data set (``frames_entry``, ``data_config_entry``).

Reads what ``ctal.checkpoint`` wrote; a local checkpoint, or a model directory of one (a fold's).
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Optional

from . import tokenizer as _tokenizer
from .checkpoint import STATE_FILE, read_state
from .config import DataConfig, FeatureConfig, from_dict
from .data import TOKENIZER_DIR, feature_frontend
from .tokenizer import TOKENIZER_FILES


def tokenizer_dir(checkpoint: str | Path) -> Optional[Path]:
    """The tokenizer saved with a local checkpoint, or with the checkpoint a model directory of it
    belongs to (a fold's sub-directory); None if there is none."""
    checkpoint = Path(checkpoint)
    candidates = [checkpoint / TOKENIZER_DIR]
    if (checkpoint.parent / STATE_FILE).is_file():
        candidates.append(checkpoint.parent / TOKENIZER_DIR)
    return next((c for c in candidates if any((c / f).is_file() for f in TOKENIZER_FILES)), None)


def check_tokenizer(checkpoint: str | Path, expected_hash: str, fix: str = "") -> None:
    """Refuse a checkpoint (pretraining or fine-tuned, local) whose tokenizer is not the expected one
    (the data set's): ValueError naming both hashes, and ``fix`` (what would mend it) when given.
    A checkpoint without a tokenizer is refused too, since nothing then shows that its token ids
    mean what the data's mean."""
    tok = tokenizer_dir(checkpoint)
    hint = f"; {fix}" if fix else ""
    if tok is None:
        raise ValueError(f"checkpoint {checkpoint} holds no {TOKENIZER_DIR}/, so it cannot be checked against "
                         f"the data set's tokenizer (sha256 {expected_hash[:12]}…){hint}")
    actual = _tokenizer.tokenizer_hash(tok)
    if actual != expected_hash:
        raise ValueError(f"tokenizer mismatch: checkpoint {checkpoint} was trained with tokenizer sha256 "
                         f"{actual[:12]}…, the data set's tokenizer is {expected_hash[:12]}…; refusing to use "
                         f"it{hint}")


def _owning_state(checkpoint: str | Path) -> dict:
    """The state of a local checkpoint, or of the checkpoint a model directory of it belongs to
    (a fold's sub-directory); {} for a bare model directory."""
    checkpoint = Path(checkpoint)
    for where in (checkpoint, checkpoint.parent):
        if (where / STATE_FILE).is_file():
            return read_state(where)
    return {}


def trained_frontend(checkpoint: str | Path) -> str:
    """The front end (ctal.features.FRONTENDS) whose frames a local checkpoint, or the checkpoint a
    model directory of it belongs to, was trained on; "kaldi" where none is recorded (checkpoints
    made before there was a choice)."""
    return _owning_state(checkpoint).get("frontend", "kaldi")


def trained_upstream(checkpoint: str | Path) -> Optional[dict]:
    """The upstream (ctal.upstream.UpstreamInfo.to_dict()) whose SSL features a local checkpoint was
    trained on, or None (log-mel)."""
    return _owning_state(checkpoint).get("upstream")


def data_config_entry(report: dict) -> dict:
    """What a checkpoint's state records of the data set it was trained on (its ``report.json``):
    the preprocessing settings (DataConfig, featurizer included) that new audio and text must go
    through to look like the training data. {} for data written without them (test data)."""
    entry = dict(report.get("data_config") or {})
    if report.get("features"):
        entry["features"] = report["features"]
    entry.pop("tokenizer", None)  # the tokenizer travels as files, tokenizer/
    return entry


def trained_data_config(checkpoint: str | Path):
    """The DataConfig (featurizer, duration limits, max_text_tokens) of the data a local checkpoint,
    or the checkpoint a model directory of it belongs to, was trained on; for one that recorded none,
    the defaults with its recorded front end. The text normalization is the tokenizer's
    (``ctal.tokenizer.read_normalization``), not set here."""
    state = _owning_state(checkpoint)
    recorded = state.get("data_config") or {}
    known = {f.name for f in fields(DataConfig)} - {"tokenizer", "text_normalization"}
    cfg = from_dict(DataConfig, {k: v for k, v in recorded.items() if k in known}, "data_config.")
    if "features" not in recorded:
        cfg.features = FeatureConfig(frontend=state.get("frontend", "kaldi"))
    return cfg


def frames_entry(report: dict) -> dict:
    """What a checkpoint's state records of the frames it was trained on (from the data set's
    ``report.json``): the front end and, for SSL features, the upstream (ctal.upstream.UpstreamInfo:
    architecture, hash of its files, kept layers)."""
    entry = {"frontend": feature_frontend(report)}
    if report.get("upstream"):
        entry["upstream"] = report["upstream"]
    return entry


def _frames_key(entry: dict) -> tuple:
    if entry.get("frontend") == "waveform":  # a model that runs its own upstream reads any waveforms
        return "waveform", None, ()
    up = entry.get("upstream") or {}
    return entry.get("frontend", "kaldi"), up.get("hash"), tuple(up.get("layers") or ())


def describe_frames(entry: dict) -> str:
    """``frames_entry`` in words, e.g. "features.frontend=ssl frames of wavlm sha256 1a2b3c4d5e6f…, layers [6]"."""
    frontend, digest, layers = _frames_key(entry)
    if frontend != "ssl":
        return f"features.frontend={frontend} frames"
    arch = (entry.get("upstream") or {}).get("architecture", "?")
    return f"features.frontend=ssl frames of {arch} sha256 {str(digest)[:12]}…, layers {list(layers)}"


def check_frontend(checkpoint: str | Path, report: dict, fix: str = "") -> None:
    """Refuse a checkpoint trained on other frames than the data set's (its ``report.json``): another
    front end, or SSL features of another upstream or other layers (ValueError naming both, and
    ``fix`` when given): the weights expect their own features."""
    state = _owning_state(checkpoint)
    actual = {"frontend": state.get("frontend", "kaldi"), "upstream": state.get("upstream")}
    expected = frames_entry(report)
    if _frames_key(actual) != _frames_key(expected):
        hint = f"; {fix}" if fix else ""
        raise ValueError(f"front end mismatch: checkpoint {checkpoint} was trained on {describe_frames(actual)}, "
                         f"the data set holds {describe_frames(expected)}; refusing to use it{hint}")


def preprocess_options(checkpoint: str | Path) -> str:
    """The ``features.*`` overrides that make preprocessing write the frames a local checkpoint was
    trained on (its recorded front end, and for SSL features the upstream folder and layers)."""
    features = (_owning_state(checkpoint).get("data_config") or {}).get("features") or {}
    frontend = features.get("frontend") or trained_frontend(checkpoint)
    opts = [f"features.frontend={frontend}"]
    if frontend == "ssl":
        opts += [f"features.ssl_model={features.get('ssl_model')}",
                 f"features.ssl_layers=[{','.join(map(str, features.get('ssl_layers') or []))}]"]
    return " ".join(opts)
