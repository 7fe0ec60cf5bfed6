"""The YAML data that ships with ctal: model sizes and pipeline defaults (configs/) and Tune search
spaces (search_spaces/).

In a checkout the two folders sit at the top, beside ctal/; the wheel installs them as package data
inside ctal/ (pyproject.toml maps them there), and ``shipped`` finds them either way through
importlib.resources. The lookup belongs to the library rather than to the recipes because the
recipes are loaded four ways (``ctal <command>`` from ctal_pipelines, ``python pipelines/x.py``,
``import pipelines.x`` in a checkout, by file path in tests) and only ``ctal`` is importable in all.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

KINDS = ("configs", "search_spaces")


def folder(kind: str) -> Path:
    """The shipped folder ``kind`` (one of KINDS)."""
    if kind not in KINDS:
        raise ValueError(f"no shipped folder {kind!r}; there are {', '.join(KINDS)}")
    package = resources.files(__package__)
    installed = package / kind
    # An installed package holds the folder; a checkout keeps it beside ctal/ (see the docstring).
    return Path(str(installed if installed.is_dir() else Path(str(package)).parent / kind))


def shipped(kind: str, name: str) -> Path:
    """The file ``name`` of the shipped folder ``kind``, e.g. ``shipped("configs", "narrow.yaml")``;
    FileNotFoundError listing the folder's files if it has no such file."""
    where = folder(kind)
    path = where / name
    if not path.is_file():
        names = sorted(p.name for p in where.glob("*.yaml"))
        raise FileNotFoundError(f"{kind}/{name} is not shipped with ctal; {kind}/ holds {', '.join(names)}")
    return path
