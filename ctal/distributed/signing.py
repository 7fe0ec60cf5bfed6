"""Signed sweep state: ``--resume`` loads only what this user's sweeps wrote (issue 15.1).

Ray Tune's restore unpickles files from the sweep's storage: ``tuner.pkl``, the newest
``experiment_state-*.json`` (trials embed cloudpickle blobs), the search algorithm's
``basic-variant-state-*.json`` / ``search_gen_state-*.json`` / ``searcher-state-*.pkl`` and the callbacks'
``callback-states-*.pkl`` (all cloudpickle, whatever their suffix). In a shared bucket anyone who can
write there could plant code that runs on the driver. So every such file (and our ``sweep.json``) is
covered by an HMAC-SHA256 under a key that lives outside the storage, and ``verify_state`` refuses a
sweep whose files it does not cover before anything is unpickled.

The signature file ``SIGNATURE_FILE`` at the sweep's top level maps each file name to the SHA-256 of
the versions this sweep wrote, with one HMAC over that map. It is written when the sweep is created
(``sign_sweep``) and, by the ``StateSigner`` Tune callback, each time the driver saves its state: Ray
calls ``get_state`` of every callback while it saves (after the experiment and searcher state, before
it uploads them), so the new versions are signed, in the storage itself, before the upload that
carries them starts; ``on_step_end`` and ``on_experiment_end`` sign whatever was written after that
(e.g. the callbacks' own state). Earlier versions stay accepted until the next resume, because an
upload in flight may still land one of them.

The key: ``CTAL_SWEEP_KEY`` (its text), else the file ``CTAL_SWEEP_KEY_FILE`` names, else
``~/.config/ctal/sweep.key``, created (mode 0600) with a random key on first use. Trial directories
need no signature: Ray reads a trial's ``error.pkl`` only when the signed experiment state names it
(and a resume clears those names), our checkpoints are safetensors and JSON, and Ray Train's run state
is JSON parsed by pydantic.
"""
from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import os
import secrets
import uuid
from pathlib import Path
from typing import Optional

import pyarrow.fs as pafs
from ray.tune import Callback

from ctal import storage

KEY_ENV = "CTAL_SWEEP_KEY"
KEY_FILE_ENV = "CTAL_SWEEP_KEY_FILE"
DEFAULT_KEY_FILE = "~/.config/ctal/sweep.key"
SIGNATURE_FILE = "ctal-state.hmac"  # neither .json nor .pkl: Ray's sync_down leaves it alone


class UntrustedStateError(ValueError):
    """A sweep's state is not signed with this user's key: resuming it could run foreign code."""


class UnreadableStateError(UntrustedStateError):
    """A sweep's state is missing or not regular files: a resume would start over in its directory."""


def ray_state_patterns() -> tuple[str, ...]:
    """The file names (fnmatch) at a sweep's top level that Ray Tune's restore unpickles, taken from
    Ray's own templates so that a Ray upgrade that renames one is followed."""
    from ray.tune.callback import CallbackList
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.impl.tuner_internal import _TUNER_PKL
    from ray.tune.search import BasicVariantGenerator, SearchGenerator, Searcher

    templates = (TuneController, Searcher, SearchGenerator, BasicVariantGenerator, CallbackList)
    return (_TUNER_PKL, *(cls.CKPT_FILE_TMPL.format("*") for cls in templates))


# --------------------------------------------------------------------------------------------------
# the key


def _key_file() -> Path:
    return Path(os.environ.get(KEY_FILE_ENV) or DEFAULT_KEY_FILE).expanduser()


def _key_source() -> str:
    return KEY_ENV if os.environ.get(KEY_ENV) else str(_key_file())


def sweep_key(create: bool = True) -> bytes:
    """This user's signing key: CTAL_SWEEP_KEY, else the key file (created 0600 on first use unless
    ``create`` is false: a resume checks with the key that signed, never a new one)."""
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].encode("utf-8")
    path = _key_file()
    if not path.exists() and not path.is_symlink():
        if not create:
            raise UntrustedStateError(
                f"there is no sweep key at {path} (nor {KEY_ENV}): the sweep was signed with a key this machine "
                f"does not have; copy that key there (mode 600), or set {KEY_ENV} or {KEY_FILE_ENV}")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)  # whole or not at all; another process that got there first wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    if not path.is_file():
        raise UntrustedStateError(f"{path}: the sweep key must be a regular file (it is not); "
                                  f"remove it, or point {KEY_FILE_ENV} at the key file")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:  # as ssh does: a key others can read signs nothing
        raise UntrustedStateError(f"{path}: the sweep key is readable by other users (mode {mode:o}); "
                                  f"run chmod 600 {path}")
    key = path.read_text(encoding="utf-8").strip()
    if not key:
        raise UntrustedStateError(f"{path}: the sweep key file is empty; delete it to make a new key")
    return key.encode("utf-8")


# --------------------------------------------------------------------------------------------------
# the signature file: {name: [sha256, ...]} and one HMAC over it


def _mac(key: bytes, files: dict) -> str:
    return hmac.new(key, json.dumps(files, sort_keys=True).encode("utf-8"), hashlib.sha256).hexdigest()


def _state_infos(fs: pafs.FileSystem, d: str, patterns) -> list[pafs.FileInfo]:
    """Every entry at ``d`` named like a state file (``patterns``), of any kind, by name: one listing."""
    infos = fs.get_file_info(pafs.FileSelector(d, allow_not_found=True, recursive=False))
    return sorted((i for i in infos if any(fnmatch.fnmatch(i.base_name, p) for p in patterns)),
                  key=lambda i: i.base_name)


def _state_files(fs: pafs.FileSystem, d: str, patterns) -> list[str]:
    return [i.base_name for i in _state_infos(fs, d, patterns) if i.type == pafs.FileType.File]


def state_entries(where: str, ours: tuple[str, ...] = ()) -> list[str]:
    """Every entry at ``where`` named like a file Ray's restore reads, of any kind (a directory or a
    FIFO named like one counts too): what a new sweep or study must not find, or it would sign it."""
    fs, d = storage.resolve(where)
    return [i.base_name for i in _state_infos(fs, d, (*ray_state_patterns(), *ours))]


def _sha256(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return hashlib.sha256(f.readall()).hexdigest()


def _write_signature(fs: pafs.FileSystem, d: str, files: dict, key: bytes) -> None:
    text = json.dumps({"files": files, "hmac": _mac(key, files)}, sort_keys=True)
    if isinstance(fs, pafs.LocalFileSystem):
        storage.write_text(os.path.join(d, SIGNATURE_FILE), text)  # tmp + rename: never half a file
        return
    with fs.open_output_stream(f"{d}/{SIGNATURE_FILE}") as f:  # an object store PUT is whole
        f.write(text.encode("utf-8"))


def _read_signature(fs: pafs.FileSystem, d: str, key: bytes, where: str) -> Optional[dict]:
    """The signed map, None when there is no signature file; UntrustedStateError when it is not ours."""
    path = f"{d}/{SIGNATURE_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        raw = f.readall()
    try:
        doc = json.loads(raw)
        files, mac = doc["files"], doc["hmac"]
    except (ValueError, KeyError, TypeError):
        files, mac = None, ""
    if not isinstance(files, dict) or not hmac.compare_digest(str(mac), _mac(key, files)):
        raise UntrustedStateError(
            f"refusing to resume {where}: {SIGNATURE_FILE} was not made with your sweep key "
            f"({_key_source()}), so Ray's state files there may run foreign code when loaded; resume it "
            f"with the key that started it ({KEY_ENV}), or start a new sweep (another --name)")
    return files


_KINDS = {pafs.FileType.Directory: "a directory", pafs.FileType.NotFound: "gone"}  # else FIFO, socket, device


def _check_readable(infos: list[pafs.FileInfo], where: str) -> list[str]:
    """Ray's restore needs ``tuner.pkl`` and an ``experiment_state-*.json``, as regular files: without
    the experiment state it logs a warning, starts a new empty sweep in the same directory under the
    same trial ids and overwrites the old trials (issue 30.2); a FIFO named like a state file hangs
    whoever reads it, a directory named like one breaks the results. Refuse all of them by name.
    ``infos``: the sweep's state entries (``_state_infos``); returns their names, all regular files."""
    for i in infos:
        if i.type != pafs.FileType.File:
            raise UnreadableStateError(
                f"cannot resume {where}: {i.base_name} is {_KINDS.get(i.type, 'not a regular file')}, not a state "
                "file Ray wrote; remove it and put back the file, or start a new sweep (another --name)")
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.impl.tuner_internal import _TUNER_PKL

    names = [i.base_name for i in infos]
    needed = [p for p in (_TUNER_PKL, TuneController.CKPT_FILE_TMPL.format("*")) if not fnmatch.filter(names, p)]
    if needed:
        raise UnreadableStateError(
            f"cannot resume {where}: its {' and '.join(needed)} is missing (a partial copy or sync?), and Ray "
            "would start a new sweep over the old trials; copy the whole sweep back, or start a new one "
            "(another --name)")
    return names


def verify_state(where: str, ours: tuple[str, ...] = ()) -> dict:
    """Check, before anything there is unpickled, that every file Ray's restore reads at the sweep
    ``where`` (a directory or URI; plus the names ``ours``) is a version this user's sweep signed, and
    that the state a restore needs is there as regular files (``_check_readable``).
    Returns the signed map reduced to the files as they are now; raises UntrustedStateError naming the
    first file that is not covered, UnreadableStateError for state that is missing or not a file."""
    fs, d = storage.resolve(where)
    names = _check_readable(_state_infos(fs, d, (*ray_state_patterns(), *ours)), where)
    key = sweep_key(create=False)
    files = _read_signature(fs, d, key, where)
    if files is None:
        raise UntrustedStateError(
            f"refusing to resume {where}: it has no {SIGNATURE_FILE}, so nothing shows that this user's sweep "
            "wrote the Ray state there (Ray unpickles it: code); start a new sweep (another --name), or if you "
            "wrote every file there yourself, sign it: ctal.distributed.signing.sign_sweep(DIR)")
    current = {}
    for name in names:
        digest = _sha256(fs, f"{d}/{name}")
        if digest not in files.get(name, ()):
            raise UntrustedStateError(
                f"refusing to resume {where}: {name} is not a version this sweep signed (changed or added "
                "since it was written) and Ray would unpickle it; put back a copy you trust, or start a new "
                "sweep (another --name)")
        current[name] = [digest]
    return current


def sign_sweep(where: str, ours: tuple[str, ...] = (), files: Optional[dict] = None) -> None:
    """Write the signature file of the sweep ``where``: the signed map ``files`` (from
    ``verify_state``), or by default, for a sweep just created, ``tuner.pkl`` (as ``Tuner()`` wrote it)
    and the files ``ours``. Anything else named like Ray state there was not written by this sweep:
    it is refused, never signed (issue 30.1)."""
    from ray.tune.impl.tuner_internal import _TUNER_PKL

    key = sweep_key()
    fs, d = storage.resolve(where)
    if files is None:
        mine = (_TUNER_PKL, *ours)
        foreign = [i.base_name for i in _state_infos(fs, d, (*ray_state_patterns(), *ours))
                   if i.base_name not in mine or i.type != pafs.FileType.File]
        if foreign:
            raise UntrustedStateError(f"{where}: {', '.join(foreign)} appeared beside the new sweep's own state; "
                                      "it was not written by this sweep and is not signed: remove it")
        files = {n: [_sha256(fs, f"{d}/{n}")] for n in mine}
    _write_signature(fs, d, files, key)


class StateSigner(Callback):
    """Tune callback on the driver: signs each version of Ray's state files as the driver writes
    them (module docstring). Where the sweep lives comes from Ray's trials (their storage), which a
    restore points at the sweep's new location: nothing about the location or the key is pickled."""

    def __init__(self, ours: tuple[str, ...] = ()):
        self.ours = tuple(ours)
        self._trials: Optional[list] = None
        self._files: Optional[dict] = None  # the signed map, loaded from the storage on first use
        self._stat: dict[str, tuple[int, int]] = {}  # staging file → (mtime_ns, size) last signed
        self._where = None
        self._key: Optional[bytes] = None

    def __getstate__(self):  # Tune pickles its callbacks into tuner.pkl
        return {"ours": self.ours}

    def __setstate__(self, state):
        self.__init__(**state)

    def on_step_begin(self, iteration, trials, **info):
        self._trials = trials

    def get_state(self):
        self._sign()  # called while Ray saves its state, before the upload (module docstring)
        return None  # nothing of ours to restore

    def on_step_end(self, iteration, trials, **info):
        self._trials = trials
        self._sign()

    def on_experiment_end(self, trials, **info):
        self._trials = trials
        self._sign()

    def _sign(self) -> None:
        if not self._trials:  # no trial yet: Ray has saved nothing worth resuming
            return
        st = self._trials[0].storage
        fs, d, staging = st.storage_filesystem, st.experiment_fs_path, st.experiment_driver_staging_path
        key = self._key = self._key or sweep_key()
        if self._files is None or self._where != (fs.type_name, d):
            self._where = (fs.type_name, d)
            self._files = _read_signature(fs, d, key, d) or {}
        changed = False
        for name in _state_files(pafs.LocalFileSystem(), staging, (*ray_state_patterns(), *self.ours)):
            path = os.path.join(staging, name)
            s = os.stat(path)
            if self._stat.get(name) == (s.st_mtime_ns, s.st_size):
                continue
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            self._stat[name] = (s.st_mtime_ns, s.st_size)
            if digest not in self._files.setdefault(name, []):
                self._files[name].append(digest)
                changed = True
        if changed:
            _write_signature(fs, d, self._files, key)
