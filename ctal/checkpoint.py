"""One checkpoint format and one store for pretraining and fine-tuning, on local paths and URIs alike.

A checkpoint is a directory::

    config.json, model.safetensors   the model: ``from_pretrained`` loads the directory
    optimizer.safetensors            optimizer tensors, with the param groups and the scheduler state
                                     as JSON in its metadata: what a resume needs, never a pickle
    tokenizer/                       the tokenizer the model was trained with
    README.md                        the model card: what it is, data set, tokenizer hash, step or
                                     epoch, metrics, configuration, the command line that made it
    manifest.json                    the run manifest (ctal.manifest): code, versions, command,
                                     config, machine, when it was written and the run it belongs to
    checkpoint.json                  the state file, written last: kind, models, tokenizer hash, the
                                     sha256 of every other file, and what the loop records

A checkpoint of several models (fine-tuning emotion: one per fold) keeps each in a sub-directory
named after it (``Session1/config.json``, ``Session1/optimizer.safetensors``, ...), an ordinary model
directory; ``tokenizer/`` and the one state file at the top cover them all. A single model sits at
the top level. ``checkpoint.json["models"]`` maps each model's name to its directory.

``write`` stages a checkpoint aside (beside a local destination, else in a temporary directory) and
publishes it with ``storage.publish_dir``: a rename on a local disk, an upload with checkpoint.json
last on an object store. A directory holding checkpoint.json is therefore complete wherever it lies,
and ``CheckpointStore`` lists, writes, chooses, prunes and reads numbered checkpoints through the
same functions for a local path and an ``s3://``/``gs://``/``file://`` URI. What a checkpoint was
trained on, and the checks against a data set, are ``ctal.checkpoint_data``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import manifest, storage
from .data import TOKENIZER_DIR
from . import tokenizer as _tokenizer
from .manifest import COMMAND_ENV, record_command  # noqa: F401  (the recipes' import)
from .model_card import model_card
from .redact import redact, unlocal

STATE_FILE = "checkpoint.json"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT = 1
CARD_FILE = "README.md"  # the model card (Hugging Face's convention), covered by the file hashes


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete or damaged (a store then falls back to an older one)."""


@dataclass
class Part:
    """One model of a checkpoint, with the optimizer and scheduler a resume restores (if any)."""
    model: torch.nn.Module  # unwrapped (not DDP): saved with save_pretrained
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None


def _as_location(path: str | os.PathLike) -> Path | str:
    return path if storage.is_uri(path) else Path(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# writing


def write(dest: str | os.PathLike, kind: str, models: dict[str, Part], *, tokenizer_dir: str | Path,
          tokenizer_hash: str, state: dict) -> Path | str:
    """Write a checkpoint of ``kind`` ("pretraining" or "finetuning") to ``dest`` (a path or URI),
    replacing one there. ``tokenizer_dir`` is copied into it and must hash to ``tokenizer_hash``
    (ValueError otherwise: a checkpoint never carries a tokenizer other than the one it records).
    ``state`` (JSON) is what the loop records; returns ``dest``. Credentials in it are redacted
    (ctal.redact); a recorded config with ``share=true`` writes the checkpoint for sharing: no host
    name, no absolute paths, in checkpoint.json, manifest.json and the model card."""
    share = bool((state.get("config") or {}).get("share"))
    state = redact(json.loads(json.dumps(state, default=float)))
    state = unlocal(state) if share else state
    local = not storage.is_uri(dest)
    if local:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
    # Beside a local destination, so publishing is a rename; a leftover is named .<dest>.staging-*
    staging = Path(tempfile.mkdtemp(prefix=f".{storage.name(dest)}.staging-",
                                    dir=storage.parent(dest) if local else None))
    try:
        dirs = {name: "." if len(models) == 1 else name for name in models}
        for name, part in models.items():
            part.model.save_pretrained(staging / dirs[name])
            if part.optimizer is not None:
                _save_training_state(staging / dirs[name], part.optimizer, part.scheduler)
        shutil.copytree(tokenizer_dir, staging / TOKENIZER_DIR)
        copied = _tokenizer.tokenizer_hash(staging / TOKENIZER_DIR)
        if copied != tokenizer_hash:
            raise ValueError(f"tokenizer {tokenizer_dir} hashes to {copied[:12]}…, expected "
                             f"{tokenizer_hash[:12]}… (a stale copy?); not writing {dest}")
        manifest.write(staging, manifest.for_checkpoint(kind, state.get("config"), share=share))
        card = redact(_card(kind, state, models, tokenizer_hash, staging))  # the command line is in it
        (staging / CARD_FILE).write_text(unlocal(card) if share else card, encoding="utf-8")
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        full = {"format": FORMAT, "kind": kind, **state, "models": dirs, "tokenizer_hash": tokenizer_hash,
                "files": {f: _sha256(staging / f) for f in files}}
        with open(staging / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump(full, f, indent=1, default=float)  # numpy scalars in metrics
            f.flush()
            os.fsync(f.fileno())
        storage.publish_dir(staging, dest, marker=STATE_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _as_location(dest)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif v is None or isinstance(v, (str, int, float, bool)):
            out[f"{prefix}{k}"] = v
    return out


def _card(kind: str, state: dict, models: dict[str, Part], tokenizer_hash: str, staging: Path) -> str:
    """The checkpoint's README.md (ctal.model_card) from what the loop records."""
    cfg = state.get("config") or {}
    first = next(iter(models.values())).model
    metrics = {k: v for k, v in (state.get("metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    facts = {"kind": "pretraining" if kind == "pretraining" else "fine-tuned",
             "data": state.get("data") or cfg.get("data") or "(not recorded)", "tokenizer_hash": tokenizer_hash,
             "task": state.get("task"), "fusion": None if kind == "pretraining" else first.config.fusion,
             "parameters": first.count_parameters(), "step": state.get("step"), "epoch": state.get("epoch"),
             "metrics": metrics, "config": _flat(cfg),
             "text_normalization": _tokenizer.read_normalization(staging / TOKENIZER_DIR),
             # never a Ray worker's own command line: only what the recipe recorded
             "command": manifest.command_line(), "manifest": manifest.MANIFEST_FILE}
    return model_card({k: v for k, v in facts.items() if v not in (None, {}, "")})


def _save_training_state(model_dir: Path, optimizer, scheduler) -> None:
    opt = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().contiguous().cpu()
               for i, s in opt["state"].items() for k, v in s.items()}
    meta = {"param_groups": json.dumps(opt["param_groups"])}
    if scheduler is not None:  # its lr_lambdas are functions: rebuilt from the config on resume
        meta["scheduler"] = json.dumps({k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"})
    save_file(tensors, str(model_dir / OPTIMIZER_FILE), metadata=meta)


# --------------------------------------------------------------------------------------------------
# reading


def read_state(path: str | os.PathLike) -> dict:
    """The state file of checkpoint ``path`` (a path or URI), unverified; FileNotFoundError if none,
    CheckpointError naming the file if it is not a JSON object."""
    marker = storage.join(path, STATE_FILE)
    if not storage.is_file(marker):
        raise FileNotFoundError(f"{str(path)!r} is not a complete ctal checkpoint (no {STATE_FILE})")
    try:
        state = storage.read_json(marker)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{marker}: damaged, not JSON ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{marker}: damaged, not a JSON object")
    return state


def verify(path: str | Path) -> dict:
    """The state of the local checkpoint ``path`` after checking every file against its recorded
    sha256; raises CheckpointError if anything is missing or damaged."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        files = state["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path / STATE_FILE}: damaged, unreadable ({e})") from e
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{f} does not match its recorded sha256 (damaged)")
        check_readable(f)  # a damaged file re-hashed into the state file still fails here
    return state


def check_readable(f: Path) -> None:
    """CheckpointError naming ``f`` unless it parses as what its name says (safetensors header, JSON),
    so a damaged file fails with its name instead of a loader's bare error."""
    try:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        elif f.suffix == ".json":
            json.loads(f.read_text(encoding="utf-8"))
    except Exception as e:  # safetensors raises its own SafetensorError, JSON a ValueError
        raise CheckpointError(f"{f}: damaged, not a readable {f.suffix[1:]} file ({e})") from None


def check_model_dir(model_dir: str | Path) -> None:
    """A model directory (``from_pretrained``'s) with readable config.json and model.safetensors, or
    CheckpointError naming the damaged file; a missing one is left to ``from_pretrained`` to name."""
    for name in ("config.json", "model.safetensors"):
        if (Path(model_dir) / name).is_file():
            check_readable(Path(model_dir) / name)


def model_dirs(path: str | Path, state: Optional[dict] = None) -> dict[str, Path]:
    """Model name (a fold's) → its directory in the local checkpoint ``path``."""
    state = state if state is not None else read_state(path)
    return {name: Path(path) / rel for name, rel in state["models"].items()}


def load_training_state(model_dir: str | Path, optimizer, scheduler=None) -> None:
    """Restore ``optimizer`` (and ``scheduler``) from ``model_dir/optimizer.safetensors``."""
    with safe_open(str(Path(model_dir) / OPTIMIZER_FILE), framework="pt") as f:
        meta = f.metadata()
        flat = {k: f.get_tensor(k) for k in f.keys()}
    opt_state: dict = {}
    for key, value in flat.items():
        _, idx, name = key.split(".", 2)
        opt_state.setdefault(int(idx), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in json.loads(meta["param_groups"])]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})  # moved to the params' device
    if scheduler is not None:
        scheduler.load_state_dict({**json.loads(meta["scheduler"]),
                                   "lr_lambdas": [None] * len(optimizer.param_groups)})


def local_copy(path: str | os.PathLike) -> Path:
    """A local directory holding checkpoint ``path``: the directory itself, or for a URI a download
    into the local cache keyed by the URI and its state file, so a checkpoint rewritten at the same
    URI is downloaded again and ranks on one node share one copy."""
    if not storage.is_uri(path):
        return Path(path)
    marker = storage.join(path, STATE_FILE)
    version = hashlib.sha256(storage.read_text(marker).encode()).hexdigest()[:12] if storage.is_file(marker) else ""
    return storage.localize(path, kind="checkpoints", version=version)


# --------------------------------------------------------------------------------------------------
# a store of numbered checkpoints (a pretraining run's step-NNNNNNNN)


CHECKPOINTS = "checkpoints"  # a run directory's checkpoints: <run_dir>/checkpoints/step-NNNNNNNN


def latest_checkpoint(run_dir: str | Path) -> Optional[Path | str]:
    """The newest checkpoint of a run directory (or None); it loads with ``from_pretrained``, for a
    URI after ``local_copy``."""
    return CheckpointStore(storage.join(run_dir, CHECKPOINTS)).latest()


class CheckpointStore:
    """The checkpoints ``<root>/<prefix>NNNNNNNN`` below a local directory or a URI.

    A checkpoint counts once its state file is there (``write`` puts it last); ``choose`` picks the
    newest intact one, moving damaged ones aside as ``corrupt-<name>-<id>`` with a warning.
    """

    def __init__(self, root: str | os.PathLike, keep: int = 0, prefix: str = "step-"):
        self.root, self.keep, self.prefix = storage.normalize(root), keep, prefix
        self._name = re.compile(rf"^{re.escape(prefix)}(\d{{8}})$")

    def path(self, number: int) -> Path | str:
        return _as_location(storage.join(self.root, f"{self.prefix}{number:08d}"))

    def list(self) -> list[tuple[int, Path | str]]:
        """(number, path or URI) of the complete checkpoints, oldest first."""
        found = []
        for n in storage.listdir(self.root):
            if (m := self._name.match(n)) and storage.is_file(storage.join(self.root, n, STATE_FILE)):
                found.append((int(m.group(1)), self.path(int(m.group(1)))))
        return sorted(found)

    def latest(self) -> Optional[Path | str]:
        """The newest complete checkpoint (not verified), or None."""
        found = self.list()
        return found[-1][1] if found else None

    def save(self, number: int, kind: str, models: dict[str, Part], **kwargs) -> Path | str:
        """``write`` checkpoint ``number``, then prune to the newest ``keep`` (0: keep all)."""
        dest = write(self.path(number), kind, models, **kwargs)
        self.prune()
        return dest

    def prune(self) -> None:
        for _, old in self.list()[:-self.keep] if self.keep > 0 else []:
            storage.delete(old)

    def choose(self, log: Callable[[str], None] = print) -> Optional[tuple[int, Path]]:
        """(number, local copy) of the newest intact checkpoint, or None. Leftovers of interrupted
        writes (staging directories, numbered ones without a state file) and the damaged checkpoints
        earlier runs set aside (``corrupt-*``, logged) are deleted first."""
        for n in storage.listdir(self.root):
            incomplete = self._name.match(n) and not storage.is_file(storage.join(self.root, n, STATE_FILE))
            if n.startswith("." + self.prefix) or incomplete:
                storage.delete(storage.join(self.root, n))
            elif n.startswith(f"corrupt-{self.prefix}"):  # set aside by an earlier run, which said so
                storage.delete(storage.join(self.root, n))
                log(f"deleted {n}, a damaged checkpoint an earlier run set aside")
        for number, where in reversed(self.list()):
            local = local_copy(where)
            try:
                verify(local)
                return number, local
            except CheckpointError as e:
                aside = storage.join(self.root, f"corrupt-{storage.name(where)}-{uuid.uuid4().hex[:6]}")
                storage.move(where, aside)
                if storage.is_uri(where):  # drop the cached download of the damaged one too
                    shutil.rmtree(local, ignore_errors=True)
                msg = (f"checkpoint {storage.name(where)} is damaged ({e}); falling back to an older one "
                       f"(moved to {storage.name(aside)})")
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                log(f"WARNING: {msg}")
        return None
