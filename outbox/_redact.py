"""Credentials in URLs, hidden: one rule for logs, reprs, error messages and stderr.

The user-info part of every ``scheme://user-info@host`` in a text is replaced: ``user:password``
shows as ``user:***``, and a part without a colon as ``***`` — NATS (``nats://TOKEN@host``) and
HTTP put tokens there, so a lone part is never shown. Works on one URL, on a comma-separated
server list and on free text (a log message, an exception's text).
"""

from __future__ import annotations

import re

__all__ = ["redact"]

# scheme://, then the authority up to its last "@" (a password may contain "@"; the authority
# ends at "/", "?", "#" or whitespace).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@")


def _hide(match: re.Match[str]) -> str:
    userinfo = match["userinfo"]
    if not userinfo:
        return match[0]
    user, colon, _ = userinfo.partition(":")
    return f"{match['scheme']}{user + ':***' if colon else '***'}@"


def redact(text: str) -> str:
    """``text`` with the credentials of the URLs in it replaced by ``***``."""
    return _USERINFO.sub(_hide, text) if "@" in text else text
