"""Names that look like secrets: capture's default exclusions and URL query redaction.

A name is split into lower-case words (``hashed_password`` → hashed, password; ``apiKey`` → api,
key) and looks like a secret when a word is one of :data:`SECRET_WORDS` or two neighbouring words
are one of :data:`SECRET_PAIRS`. Such columns are treated as if listed in ``capture(exclude=…)``
unless listed in ``capture(include=…)``: a password hash or an API token never reaches an event
(nor the bus, nor the audit log) because someone forgot to exclude it. URL query parameters with
such names (``?password=…``) are hidden in every text outbox prints (:mod:`outbox._redact`).
"""

from __future__ import annotations

import itertools
import re

__all__ = ["SECRET_PAIRS", "SECRET_WORDS", "looks_secret"]

#: Words that make a column name look like a secret.
SECRET_WORDS = frozenset({
    "password", "passwd", "passphrase", "pwd", "secret", "secrets", "token", "salt",
    "otp", "totp", "hotp", "mfa", "credential", "credentials", "apikey", "cvv", "cvc",
})
#: Neighbouring words that do (``api_key``, ``private_key``, ``session_key``, …).
SECRET_PAIRS = frozenset({
    ("api", "key"), ("private", "key"), ("access", "key"), ("signing", "key"),
    ("encryption", "key"), ("session", "key"), ("client", "key"), ("auth", "key"),
})

_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


def looks_secret(name: str) -> bool:
    """True when the column or attribute ``name`` looks like it holds a secret."""
    words = [w.lower() for w in _WORDS.findall(name)]
    if any(w in SECRET_WORDS for w in words):
        return True
    return any(pair in SECRET_PAIRS for pair in itertools.pairwise(words))
