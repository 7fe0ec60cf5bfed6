"""The run manifest: which code, versions, command, config and machine produced a run or a checkpoint.

Every run (pretraining, a sweep, preprocessing, evaluation, embedding, the demo) writes
``manifest.json`` into its output when it starts and again, with the end time and outcome, when it
ends; the checkpoint store writes one into every checkpoint. A manifest holds::

    ctal        version; commit and dirty flag when ctal runs from a git checkout, else "no git"
    versions    Python, torch, Ray (if installed: ctal/ itself never imports it), transformers
    command     the command line the recipe recorded (``record_command``)
    config      the resolved config
    machine     host, platform, CPU model and cores, GPUs
    started_at, ended_at, status      (a checkpoint: written_at, and the run it belongs to)

It is written through ``ctal.storage``, so a run on ``s3://`` keeps its manifest there too. A rerun
of the same run (a resume) keeps the earlier attempts under ``previous``: a resume on other code or
another machine stays visible. Ray workers learn the driver's run (``run_link``, ``adopt``) so the
checkpoints they write name its manifest and command line.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Optional

from . import storage
from .redact import redact, unlocal

MANIFEST_FILE = "manifest.json"
COMMAND_ENV = "CTAL_COMMAND"  # the recipe's command line, for manifests and model cards
RUN_ENV = "CTAL_RUN"  # JSON: the driver's run (run_link), inherited by its workers
NO_GIT = "no git"
LIBRARIES = ("torch", "ray", "transformers")
PACKAGE_ROOT = Path(__file__).resolve().parent  # ctal/: a checkout's if its parent is the git top level


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record_command(argv: Optional[list[str]] = None) -> None:
    """Remember this process's command line (``argv``, default ``python`` + sys.argv) for the
    manifests and model cards of what it writes. Recipes call it on the driver; Ray workers on this
    machine inherit it through the environment, workers elsewhere through ``adopt``. The first call
    wins, so the ``ctal`` command's own line is not replaced by the recipe it dispatches to."""
    os.environ.setdefault(COMMAND_ENV, shlex.join(argv if argv is not None else ["python", *sys.argv]))


def command_line() -> Optional[str]:
    return os.environ.get(COMMAND_ENV)


def _git(root: Path, *args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):  # no git binary, or a hung file system
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version(package_root: Path = PACKAGE_ROOT) -> dict:
    """ctal's version, and the commit and dirty flag (a tracked file changed) when ``package_root``
    (the ctal/ folder) sits at the top of a git checkout. An installed wheel is not a checkout even
    inside one (a venv in the work tree), so the top level must be the folder above ctal/."""
    try:
        version = metadata.version("ctal")
    except metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, never installed
        version = None
    top = _git(package_root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != package_root.parent.resolve():
        return {"version": version, "commit": NO_GIT, "dirty": None}
    status = _git(package_root, "status", "--porcelain", "--untracked-files=no")
    return {"version": version, "commit": _git(package_root, "rev-parse", "HEAD"),
            "dirty": None if status is None else bool(status)}


def library_versions() -> dict:
    """Installed versions (None where not installed), read from the package metadata so that
    nothing is imported: ctal/ stays Ray-free."""
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[str]:
    """GPU names from nvidia-smi, without initializing CUDA in this process (a driver that forks
    workers afterwards must not hold a CUDA context)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def machine() -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"host": platform.node(), "platform": platform.platform(), "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(), "cpus_usable": cores, "gpus": _gpus()}


def _plain(config: Any) -> Any:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, dict):
        return {k: _plain(v) for k, v in config.items()}
    return config


def collect(kind: str, config: Any = None) -> dict:
    """A manifest of this process for a run of ``kind``, without times: code, versions, command,
    ``config`` (a dataclass, or a dict of them), machine."""
    return {"kind": kind, "ctal": code_version(), "versions": library_versions(), "command": command_line(),
            "config": _plain(config), "machine": machine()}


def write(location: str | os.PathLike, record: dict, file: str = MANIFEST_FILE) -> None:
    """``record`` as ``location``/``file``, credentials redacted (a tracking_uri's password, a
    signed URL's token: in the config, the command line, an error)."""
    record = redact(json.loads(json.dumps(record, default=str)))
    storage.write_text(storage.join(location, file), json.dumps(record, indent=1, default=str) + "\n")


def read(location: str | os.PathLike, file: str = MANIFEST_FILE) -> Optional[dict]:
    """The manifest in ``location`` (a run directory or checkpoint), or None if it has none."""
    path = storage.join(location, file)
    return storage.read_json(path) if storage.is_file(path) else None


@contextmanager
def recorded_run(location: str | os.PathLike, kind: str, config: Any = None,
                 file: str = MANIFEST_FILE) -> Iterator[dict]:
    """Write ``location``/``file`` now (started_at, status "running") and again when the block ends:
    ended_at and status "finished", or "failed" with the error's first line. Yields the manifest;
    what the block adds to it (e.g. ``outputs``) is written at the end. While the block runs,
    checkpoints this process and its Ray workers write name this run. ``file``: for a run whose
    output is one file among others (embed), a name of its own beside it."""
    location = storage.normalize(location)
    earlier = read(location, file)
    record = {**collect(kind, config), "started_at": now(), "ended_at": None, "status": "running"}
    if earlier and earlier.get("status") != "created":  # "created": ctal.outputs.own_output's, not a run
        record["previous"] = [*earlier.pop("previous", []), earlier]
    write(location, record, file)
    outer = os.environ.get(RUN_ENV)
    os.environ[RUN_ENV] = json.dumps(run_link(location, kind, file))
    try:
        yield record
    except BaseException as e:
        first = str(e).splitlines()[0] if str(e) else ""
        record.update(ended_at=now(), status="failed", error=f"{type(e).__name__}: {first}".rstrip(": "))
        write(location, record, file)
        raise
    finally:
        if outer is None:
            os.environ.pop(RUN_ENV, None)
        else:
            os.environ[RUN_ENV] = outer
    record.update(ended_at=now(), status="finished")
    write(location, record, file)


def finished(kind: str, config: Any, wall_s: float) -> dict:
    """The manifest of a run that took ``wall_s`` seconds and writes it once, at its end, into an
    output published whole (a data set: written aside, then renamed or uploaded with it)."""
    end = datetime.now(timezone.utc)
    return {**collect(kind, config), "started_at": (end - timedelta(seconds=wall_s)).isoformat(timespec="seconds"),
            "ended_at": end.isoformat(timespec="seconds"), "status": "finished"}


def run_link(location: str | os.PathLike, kind: str, file: str = MANIFEST_FILE) -> dict:
    """What a checkpoint records of the run it belongs to: that run's manifest and command line."""
    return {"manifest": storage.join(location, file), "kind": kind, "command": command_line()}


def run_info() -> Optional[dict]:
    """The run this process is in (``recorded_run``), to hand to Ray workers; None outside one."""
    raw = os.environ.get(RUN_ENV)
    return json.loads(raw) if raw else None


def adopt(info: Optional[dict]) -> None:
    """In a Ray worker: take the driver's run (``run_info``) and command line as this process's."""
    if info:
        os.environ[RUN_ENV] = json.dumps(info)
        if info.get("command"):
            os.environ.setdefault(COMMAND_ENV, info["command"])


def for_checkpoint(kind: str, config: Any = None, share: bool = False) -> dict:
    """The manifest a checkpoint carries: this (writing) process's code, versions and machine, the
    config the loop recorded, the time of writing, and the run it belongs to when known. ``share``:
    without the host name and with absolute paths cut to their last component (ctal.redact.unlocal)."""
    record = {**collect(kind, config), "written_at": now(), "run": run_info()}
    if share:
        record["machine"].pop("host")
        record = unlocal(record)
    return record
