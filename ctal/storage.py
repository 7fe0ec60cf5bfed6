"""Local paths and pyarrow filesystem URIs (``s3://``, ``gs://``, ``file://``) in one place. No Ray.

On a cluster every node reads and writes data sets, checkpoints and results through the same URI;
a plain path means this machine's file system (on several nodes: a shared mount at the same path).
Every function here takes either, so callers need no branch of their own::

    storage.write_text(storage.join(out, "report.json"), text)   # out: a directory or s3://b/k

Object stores have no directory rename and no append, so the URI branch never relies on either:
a directory is published by uploading its files with a *marker file last* (``publish_dir``), and
readers treat a directory without its marker as incomplete (a local directory is renamed into
place instead). ``file://`` URIs take the object-store branch (pyarrow's LocalFileSystem), which is how the tests cover what S3 and GCS run.
Credentials are never handled here: pyarrow finds them as the AWS/GCP SDKs do (instance profile,
environment, ``~/.aws``).
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO, Optional

import pyarrow.fs as pafs

CACHE_ENV = "CTAL_CACHE_DIR"  # where downloaded tokenizers/checkpoints are kept (default ~/.cache/ctal)


def is_uri(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a filesystem by scheme (``s3://b/k``, ``file:///x``)."""
    return "://" in str(path)


def resolve(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow FileSystem, path inside it). A plain path resolves to the local filesystem and its
    absolute form. Raises ValueError naming the URI when pyarrow does not know its scheme or the
    scheme's support is missing (e.g. a pyarrow built without S3).

    One FileSystem per bucket and process is reused: creating an S3 filesystem looks the bucket's
    region up over the network, which must not happen for every file.
    """
    if not is_uri(path):
        return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    uri = str(path)
    scheme, rest = uri.split("://", 1)
    if scheme == "file" or "?" in rest:  # local (no set-up cost), or options only from_uri parses
        return _from_uri(uri)
    authority, _, key = rest.partition("/")
    fs, base = _filesystem(f"{scheme}://{authority}")
    key = key.strip("/")
    return fs, (posixpath.join(base, key) if key else base)


@functools.lru_cache(maxsize=64)
def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    return _from_uri(root)


def _from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{uri!r}: pyarrow cannot open this URI ({e}); use a local path, file://, "
                         "s3:// or gs://") from e


def normalize(path: str | os.PathLike) -> str:
    """A plain path made absolute (the form every Ray worker can use); a URI unchanged but for a
    trailing slash."""
    return str(path).rstrip("/") if is_uri(path) else str(Path(path).expanduser().resolve())


def local_path(path: str | os.PathLike, what: str = "path") -> Path:
    """A plain path or a ``file://`` URI as a local absolute Path; any other URI raises ValueError
    (for inputs that are read as files, e.g. a corpus root whose audio soundfile decodes)."""
    if not is_uri(path):
        return Path(path).expanduser().resolve()
    if str(path).startswith("file://"):
        return Path(resolve(path)[1])
    raise ValueError(f"{what} {str(path)!r}: only local paths and file:// are supported here; on a "
                     "cluster mount the bucket or a shared file system at the same path on every node "
                     "(e.g. EFS, or s3fs/gcsfuse) and pass that path")


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/parts…`` for a plain path or a URI (URIs always join with ``/``)."""
    if is_uri(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return str(Path(base, *parts))


def name(path: str | os.PathLike) -> str:
    """The last component of a path or URI."""
    return posixpath.basename(str(path).rstrip("/")) if is_uri(path) else Path(path).name


def parent(path: str | os.PathLike) -> str:
    if is_uri(path):
        scheme, rest = str(path).rstrip("/").split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest)}"
    return str(Path(path).parent)


# --------------------------------------------------------------------------------------------------
# single files and listings


def _info(path) -> pafs.FileInfo:
    fs, p = resolve(path)
    return fs.get_file_info(p)


def exists(path) -> bool:
    return _info(path).type != pafs.FileType.NotFound


def is_file(path) -> bool:
    return _info(path).type == pafs.FileType.File


def listdir(path) -> list[str]:
    """Names directly below ``path`` (files and directories), sorted; [] if it does not exist."""
    fs, p = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=False))
    return sorted(i.base_name for i in infos)


def glob(path, pattern: str) -> list[str]:
    """Files directly below ``path`` whose names match ``pattern`` (fnmatch), as full paths/URIs."""
    return [join(path, n) for n in listdir(path) if fnmatch.fnmatch(n, pattern)]


def open_input(path) -> IO[bytes]:
    """A seekable binary reader (pyarrow's), usable by pyarrow.parquet, json.load, safetensors."""
    fs, p = resolve(path)
    return fs.open_input_file(p)


def open_output(path) -> IO[bytes]:
    """A binary writer; on object stores the object appears (whole) only when it is closed."""
    fs, p = resolve(path)
    parent_dir = posixpath.dirname(p)
    if parent_dir:
        fs.create_dir(parent_dir, recursive=True)
    return fs.open_output_stream(p)


def read_text(path) -> str:
    with open_input(path) as f:
        return f.read().decode("utf-8")


def write_text(path, text: str) -> None:
    """Write a whole file: atomically (tmp + rename) on a local disk; one PUT on an object store."""
    if not is_uri(path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        return
    with open_output(path) as f:
        f.write(text.encode("utf-8"))


def move(src, dst) -> None:
    """Rename a file or directory. Object stores cannot rename a prefix: its files are copied
    (server-side) and then deleted, so this is not atomic there."""
    if not is_uri(src):
        os.replace(src, dst)
        return
    fs, s = resolve(src)
    _, d = resolve(dst)
    if fs.get_file_info(s).type == pafs.FileType.File:
        fs.move(s, d)
        return
    for rel in _files_below(fs, s):
        fs.create_dir(posixpath.dirname(posixpath.join(d, rel)), recursive=True)
        fs.copy_file(posixpath.join(s, rel), posixpath.join(d, rel))
    fs.delete_dir(s)


def read_json(path) -> dict:
    return json.loads(read_text(path))


def delete(path, missing_ok: bool = True) -> None:
    """Delete a file or a whole directory (prefix)."""
    fs, p = resolve(path)
    t = fs.get_file_info(p).type
    if t == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif t == pafs.FileType.File:
        fs.delete_file(p)
    elif not missing_ok:
        raise FileNotFoundError(path)


# --------------------------------------------------------------------------------------------------
# directories: upload, download, publish


def _files_below(fs: pafs.FileSystem, root: str) -> list[str]:
    """Relative paths of the files below ``root`` (recursive), sorted."""
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=True))
    return sorted(posixpath.relpath(i.path, root) for i in infos if i.type == pafs.FileType.File)


def upload_dir(local_dir: str | Path, dest, last: Optional[str] = None) -> None:
    """Copy the files of ``local_dir`` to ``dest`` (overwriting), the file ``last`` (a relative
    path) after all others, so its presence means the rest is there."""
    src_fs, src = pafs.LocalFileSystem(), str(Path(local_dir).resolve())
    fs, d = resolve(dest)
    files = _files_below(src_fs, src)
    if last is not None:
        files = [f for f in files if f != last] + ([last] if last in files else [])
    for rel in files:
        target = posixpath.join(d, rel)
        fs.create_dir(posixpath.dirname(target), recursive=True)
        pafs.copy_files(posixpath.join(src, rel), target, source_filesystem=src_fs, destination_filesystem=fs)


def download_dir(src, local_dir: str | Path) -> Path:
    """Copy the files below ``src`` into ``local_dir`` (created); returns ``local_dir``."""
    fs, s = resolve(src)
    local_dir = Path(local_dir)
    files = _files_below(fs, s)
    if not files:
        raise FileNotFoundError(f"{src!r} holds no files")
    for rel in files:
        target = local_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(posixpath.join(s, rel), str(target), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
    return local_dir


def download_file(src, local_file: str | Path) -> Path:
    """Copy one file to ``local_file`` (replaced whole: downloaded beside it, then renamed)."""
    fs, s = resolve(src)
    local_file = Path(local_file)
    local_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = local_file.with_name(f".{local_file.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pafs.copy_files(s, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        os.replace(tmp, local_file)
    finally:
        tmp.unlink(missing_ok=True)
    return local_file


def upload_file(local_file: str | Path, dest) -> None:
    fs, d = resolve(dest)
    fs.create_dir(posixpath.dirname(d), recursive=True)
    pafs.copy_files(str(Path(local_file).resolve()), d, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def publish_dir(local_dir: str | Path, dest, marker: str) -> None:
    """Make the finished ``local_dir`` appear at ``dest`` as a whole.

    Local ``dest``: rename (same file system) or copy to a temporary sibling and rename, so a
    directory named ``dest`` is always complete. URI ``dest``: the files are uploaded with
    ``marker`` last; a reader must treat ``dest`` without ``marker`` as incomplete. An existing
    ``dest`` is replaced (for a URI its marker goes first, so it is never half old, half new and
    marked complete).
    """
    local_dir = Path(local_dir)
    if not is_uri(dest):
        dest = Path(dest)
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            try:
                local_dir.rename(tmp)
            except OSError:  # another device: copy next to dest first, so the last step is a rename
                shutil.copytree(local_dir, tmp)
            if dest.exists():
                old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
                dest.rename(old)
                tmp.rename(dest)
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old, ignore_errors=True)
                else:  # a file or a link where the directory goes: rmtree would leave it behind
                    old.unlink(missing_ok=True)
            else:
                tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    if exists(dest):
        delete(join(dest, marker))
        delete(dest)
    upload_dir(local_dir, dest, last=marker)


# --------------------------------------------------------------------------------------------------
# a local cache of remote directories (tokenizers, checkpoints)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ctal")


def localize(path, *, kind: str = "dirs", refresh: bool = False, version: str = "") -> Path:
    """A local directory holding what ``path`` holds: ``path`` itself when it is a plain path, else
    a download into ``<cache>/<kind>/<hash of the URI and version>`` (reused unless ``refresh``; a
    new ``version`` makes a new copy). The download lands in a temporary sibling first and is
    renamed, so concurrent workers on one node never see half a copy. Use it for small directories
    read whole: tokenizers, checkpoints."""
    if not is_uri(path):
        return Path(path)
    key = hashlib.sha256((normalize(path) + version).encode()).hexdigest()[:20]
    final = cache_root() / kind / f"{key}-{name(path)}"
    if final.is_dir() and not refresh:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        download_dir(path, tmp)
        if refresh and final.is_dir():  # aside first: a reader of the old copy keeps its open files
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(final)
        except OSError:  # another worker on this node renamed its copy first: keep theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
