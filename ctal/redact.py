"""What leaves the process: credentials redacted everywhere, local paths and host names on request.

``redact`` is the one function every writer of a manifest, checkpoint state, model card, tracker
param and console or error line passes its text (or whole record) through: a URI's password
(``postgresql://alice:hunter2@host/db`` → ``postgresql://alice:***@host/db``) and the values of
query parameters that carry secrets (``?token=``, ``access_token``, ``password``, ``secret``,
``sig``/``signature``, ``X-Amz-Signature``, ``X-Amz-Credential``, ``api_key`` ...) become ``***``,
wherever in a string they stand (a command line holds URIs among other words). The in-process
config keeps the real values: only what is written or printed is redacted.

``unlocal`` is the sharing option (``share=true``, docs/tracking.md): absolute local paths become
their last component, so a checkpoint handed to someone names neither the machine's layout nor
(with the manifest's host left out) the machine. A leaf: imports nothing of ctal.
"""
from __future__ import annotations

import re
from typing import Any, Optional
from urllib.parse import unquote

MARK = "***"
# scheme://user:password@ — the password runs to the last @ before the path (passwords may hold @)
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#@\s'\"]*):(?P<pw>[^/?#\s'\"]*)@")
_QUERY = re.compile(r"(?P<head>[?&;](?P<name>[^=&#?;\s'\"]+)=)(?P<value>[^&#;\s'\"]*)")
_SECRET_NAME = re.compile(r"(^|[-_.])(sig|signature|token|password|passwd|pwd|secret|credential|key|apikey|auth)$",
                          re.IGNORECASE)


def _redact_text(text: str) -> str:
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MARK}@" if m["pw"] else m[0], text)
    return _QUERY.sub(lambda m: m["head"] + MARK if _SECRET_NAME.search(m["name"]) and m["value"] else m[0], text)


def redact(value: Any) -> Any:
    """``value`` with every credential in it replaced by ``***``: a string, or a dict/list/tuple
    of them (keys and values, recursively); anything else is returned as it is."""
    if isinstance(value, str):
        return _redact_text(value) if ("://" in value or "=" in value) else value
    if isinstance(value, dict):
        return {redact(k): redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def split_userinfo(uri: str) -> tuple[str, Optional[str], Optional[str]]:
    """(``uri`` without its ``user:password@``, the user, the password), percent-decoded; the
    last two None when the URI carries none."""
    m = re.match(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@(?P<rest>.*)", uri)
    if not m:
        return uri, None, None
    user, _, password = m["userinfo"].partition(":")
    return m["scheme"] + m["rest"], unquote(user) or None, unquote(password) if password else None


# an absolute path after a start, blank, quote, = or a SQLite URI's sqlite:/// (not a URI's //host/path)
_ABSOLUTE = re.compile(r"(?P<head>(?:^|[\s'\"=,(])(?:sqlite:///)?)"
                       r"(?P<path>/(?:[^\s'\"/,)]+/)*(?P<name>[^\s'\"/,)]+)/?)")


def unlocal(value: Any) -> Any:
    """``value`` with absolute local paths replaced by their last component (``/home/alice/data/ls``
    → ``ls``): strings, recursively in dicts/lists; URIs (``s3://bucket/x``) are left as they are."""
    if isinstance(value, str):
        return _ABSOLUTE.sub(lambda m: m["head"] + m["name"], value) if "/" in value else value
    if isinstance(value, dict):
        return {k: unlocal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(unlocal(v) for v in value)
    return value
