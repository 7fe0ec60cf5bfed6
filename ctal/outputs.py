"""Who may write an output, and what may be removed: one run per output, nothing deleted that ctal
did not write (issue 30.2, 30.3).

A run first takes an exclusive *claim* on its output (``claimed``): a second run to the same output
is refused while the first is alive. A run that replaces an output (``--fresh``, ``--overwrite``) or
writes into an existing one checks first that it is its own kind of output (``check_own``): absent,
an empty directory, or a directory whose ``manifest.json`` names a ctal run of that kind
(``own_output`` writes that manifest as it creates the directory, so even a run killed in its first
seconds leaves an output its rerun recognises). A file, or a directory that is anything else, is
refused by name and left as it is. Works on local paths and URIs (``ctal.storage``).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from . import manifest, slurm, storage

CLAIMS_SUFFIX = ".claims"  # <out>.claims/<uuid>.json: who is writing <out>
CREATED = "created"  # the status of an own_output manifest that no run has filled in yet


# --------------------------------------------------------------------------------------------------
# claims: one writer per output


def _claim_is_stale(claim: dict) -> bool:
    """A claim by a process of this host that is gone, or by an earlier run of this requeued Slurm job
    (on any node: Slurm ended that run before starting this one), is stale; no other can be told."""
    if slurm.same_job_earlier_run(claim, os.environ):
        return True
    if claim.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(claim["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, KeyError):
        return False
    return False


def claim_output(out: str | Path, say: Callable[[str], None] = print) -> str:
    """Take the exclusive claim on the output ``out`` (a path or URI) for this process; returns the
    claim to pass to ``release_output``. Raises FileExistsError naming the run that holds it.

    A claim is an object ``<out>.claims/<uuid>.json`` (host, pid, time): object stores have no
    exclusive create, so a run writes its claim and then lists the claims, and proceeds only if
    its own is the only one. Two runs starting at the same moment may both be refused; never
    both let through. A claim whose process is gone (same host) is removed, and said so.
    """
    claims = storage.normalize(out) + CLAIMS_SUFFIX
    for name in storage.listdir(claims):
        where = storage.join(claims, name)
        try:
            holder = storage.read_json(where)
        except (OSError, ValueError):
            holder = {}
        if holder and _claim_is_stale(holder):
            storage.delete(where)
            say(f"removed the claim of an earlier run that is gone (pid {holder['pid']} on "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}): {where}")
            continue
        raise FileExistsError(
            f"output {str(out)!r} is being written by another run (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, started {holder.get('started', '?')}); wait for it to finish, "
            f"or, if no such run is alive, delete its claim {where}")
    mine = storage.join(claims, f"{uuid.uuid4().hex}.json")
    storage.write_text(mine, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                         "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                         "slurm": slurm.job_run(os.environ)}))
    if storage.listdir(claims) != [storage.name(mine)]:
        storage.delete(mine)
        raise FileExistsError(f"output {str(out)!r}: another run claimed it at the same moment "
                              f"(see {claims}); run one at a time")
    return mine


def release_output(claim: str) -> None:
    """Give up a claim from ``claim_output``; the claims folder goes once it is empty."""
    storage.delete(claim)
    claims = storage.parent(claim)
    if not storage.listdir(claims):
        storage.delete(claims)


@contextmanager
def claimed(out: str | Path, say: Callable[[str], None] = print) -> Iterator[str]:
    """Hold the claim on ``out`` for the block."""
    claim = claim_output(out, say)
    try:
        yield claim
    finally:
        release_output(claim)


# --------------------------------------------------------------------------------------------------
# ownership: nothing removed or written into that is not ours


def check_own(out: str | Path, kinds: tuple[str, ...], option: str = "--out") -> None:
    """FileExistsError unless ``out`` is absent, an empty directory, or the output of a ctal run of
    one of ``kinds`` (its manifest.json says so): what a run may write into, and ``--fresh`` or
    ``--overwrite`` remove."""
    out = storage.normalize(out)
    if not storage.exists(out):
        return
    if storage.is_file(out) or (not storage.is_uri(out) and not Path(out).is_dir()):
        raise FileExistsError(f"{option} {out} is a file, not a ctal output directory: refusing to touch it; "
                              f"give {option} a new or empty directory")
    if not storage.listdir(out):
        return
    try:
        kind = (manifest.read(out) or {}).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind not in kinds:
        found = (f"is the output of another kind of ctal run ({kind}, not {' or '.join(kinds)})" if kind else
                 "is not a ctal output (it has no manifest.json of a ctal run)")
        raise FileExistsError(f"{option} {out} {found}: refusing to write into or remove it; choose another "
                              f"{option} (or remove it yourself)")


def own_output(out: Path, kind: str, fresh: bool = False) -> Path:
    """Make the local directory ``out`` this run's output of ``kind``: checked (``check_own``),
    emptied first when ``fresh``, created with a manifest saying whose it is."""
    check_own(out, (kind,))
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if manifest.read(out) is None:
        manifest.write(out, {**manifest.collect(kind), "created_at": manifest.now(), "status": CREATED})
    return out
