"""Credentials in URLs, hidden: one rule for logs, reprs, error messages and stderr.

Two places of a URL can hold a secret, and both are hidden wherever a URL appears in a text:

- the user-info part of ``scheme://user-info@host``: ``user:password`` shows as ``user:***``.
  A part without a colon is a user name for SQL databases (``postgresql://app@db/shop``: libpq
  has no tokens there) and is shown; for every other scheme it is hidden (``***``), since NATS
  (``nats://TOKEN@host``) and HTTP put tokens there;
- query parameters whose names look like secrets (``?password=…``, ``sslpassword``, ``token``,
  ``api_key``, … — the words that keep a column out of events, also inside a longer name): the
  value shows as ``***``.

Works on one URL, on a comma-separated server list and on free text (a log message, an
exception's text).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from outbox._secret_names import looks_secret

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

__all__ = ["redact", "url_text"]

# scheme://, then the authority up to its last "@" (a password may contain "@"; the authority
# ends at "/", "?", "#" or whitespace).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@")
# A query parameter of a URL in the text: "?" or "&", a name, "=", the value up to the next
# parameter, fragment or white space (trailing punctuation of the sentence around it excluded).
_PARAM = re.compile(r"(?P<lead>[?&])(?P<name>[A-Za-z0-9_.-]+)=(?P<value>[^&#\s]*?)"
                    r"(?=[:,;)]*(?:[&#\s]|$))")
# Schemes whose lone user-info part is a user name, never a token (SQLAlchemy URLs of SQL
# databases, with or without a +driver).
_SQL_SCHEMES = re.compile(r"(?:postgres(?:ql)?|mysql|mariadb|sqlite|mssql|oracle|cockroachdb)"
                          r"(?:\+[A-Za-z0-9_]+)?://", re.IGNORECASE)


def _hide_userinfo(match: re.Match[str]) -> str:
    userinfo = match["userinfo"]
    if not userinfo:
        return match[0]
    user, colon, _ = userinfo.partition(":")
    scheme = match["scheme"]
    if colon:
        return f"{scheme}{user}:***@"
    return match[0] if _SQL_SCHEMES.fullmatch(scheme) else f"{scheme}***@"


# Query parameters glue words together (libpq's ``sslpassword``): these parts anywhere in a name
# make it secret too. Hiding a harmless value costs nothing; showing a secret one is a leak.
_SECRET_PARTS = ("pass", "pwd", "secret", "token", "apikey", "api_key", "credential", "auth")


def _secret_param(name: str) -> bool:
    lowered = name.lower()
    return looks_secret(name) or any(part in lowered for part in _SECRET_PARTS)


def _hide_param(match: re.Match[str]) -> str:
    if not match["value"] or not _secret_param(match["name"]):
        return match[0]
    return f"{match['lead']}{match['name']}=***"


def redact(text: str) -> str:
    """``text`` with the credentials of the URLs in it replaced by ``***``."""
    if "@" in text:
        text = _USERINFO.sub(_hide_userinfo, text)
    if "=" in text and "://" in text:
        text = _PARAM.sub(_hide_param, text)
    return text


def url_text(url: URL) -> str:
    """A SQLAlchemy URL as text for messages and reprs: password and secret query values hidden."""
    return redact(url.render_as_string(hide_password=True))
