"""Who may use the console, and proof that an action comes from its own pages.

- :class:`Credentials` — a token and/or a username + password (from the config or the
  environment), compared in constant time;
- :class:`Signer` — HMAC-SHA256 signatures for the session cookie and CSRF tokens, keyed by the
  configured ``secret`` (else a random key per process: sessions end when it restarts) and the
  credentials (sessions end when they change); sign-out revokes the session;
- :class:`Throttle` — failed sign-ins per client address, then 429 for a while;
- CSRF: a random nonce in a cookie, and in every form a token that is the signature of that
  nonce with the signed-in identity. A page of another site can make the browser send the
  cookie, but cannot read it to compute the form's token.

Nothing here prints or logs a secret: reprs say only which kinds of credentials are set.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["SESSION_MAX_AGE", "Credentials", "Signer", "Throttle", "parse_basic"]

#: A sign-in lasts this long (seconds).
SESSION_MAX_AGE = 12 * 3600


@dataclass(frozen=True)
class Credentials:
    """What a user may sign in with (``None``: that kind is not accepted)."""

    token: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # A secret read from a file or a YAML block scalar ends in a line break no browser or
        # header ever sends: it could never sign in.
        for name in ("token", "password"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, value.rstrip("\r\n"))
        if (self.username is None) != (self.password is None):
            raise ValueError("console credentials: set both username and password, or neither")
        for name in ("token", "password"):
            value = getattr(self, name)
            if value is not None and len(value) < 8:
                raise ValueError(f"console {name} is too short (at least 8 characters)")

    @property
    def configured(self) -> bool:
        return self.token is not None or self.username is not None

    @property
    def kinds(self) -> list[str]:
        """``token`` and/or ``password`` (for start-up messages)."""
        return [k for k, v in (("token", self.token), ("password", self.username)) if v]

    @property
    def fingerprint(self) -> str:
        """A digest of the credentials (never the credentials): sessions signed under other
        credentials — before a password change — are not valid."""
        material = "\0".join(v or "" for v in (self.token, self.username, self.password))
        return hashlib.sha256(b"outbox-console-credentials\0" + material.encode()).hexdigest()

    def check_token(self, token: str) -> bool:
        return self.token is not None and _equal(token, self.token)

    def check_password(self, username: str, password: str) -> bool:
        if self.username is None or self.password is None:
            return False
        # Both comparisons always run: the time does not tell which one failed.
        user_ok = _equal(username, self.username)
        return _equal(password, self.password) and user_ok


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def parse_basic(header: str) -> tuple[str, str] | None:
    """``(username, password)`` of an ``Authorization: Basic …`` value, ``None`` otherwise."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        text = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = text.partition(":")
    return (user, password) if sep else None


class Throttle:
    """Failed sign-ins per client address: after ``limit`` failures within ``window`` seconds
    the address is refused (429) until its oldest failure is ``window`` old. Covers the form and
    ``Authorization`` headers alike; a success clears the address. Kept in memory for at most
    ``max_clients`` addresses (the oldest forgotten first)."""

    def __init__(self, limit: int = 10, window: float = 60.0, *, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, client: str) -> deque[float] | None:
        times = self._failures.get(client)
        if times is None:
            return None
        horizon = self._clock() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        return times

    def wait(self, client: str) -> float:
        """Seconds until ``client`` may try again (0: now)."""
        times = self._recent(client)
        if times is None or len(times) < self.limit:
            return 0.0
        return max(0.0, times[0] + self.window - self._clock())

    def failed(self, client: str) -> int:
        """Record a failure; the failures of ``client`` within the window."""
        times = self._recent(client) or deque()
        times.append(self._clock())
        self._failures[client] = times
        self._failures.move_to_end(client)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)
        return len(times)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


class Signer:
    """Signs short texts with HMAC-SHA256 (session cookies, CSRF tokens).

    ``binding`` (the credentials' fingerprint) is part of the key: changing the credentials ends
    every session. :meth:`revoke` ends one session (sign-out) in this process.
    """

    def __init__(self, secret: str | None = None, binding: str = "") -> None:
        key = secret.encode("utf-8") if secret else secrets.token_bytes(32)
        self._key = hashlib.sha256(b"outbox-console\0" + key + b"\0" + binding.encode()).digest()
        self._revoked: dict[str, float] = {}  # session cookie's MAC → when it expires anyway

    def __repr__(self) -> str:
        return "Signer(***)"

    def _mac(self, purpose: str, text: str) -> str:
        mac = hmac.new(self._key, f"{purpose}\0{text}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode("ascii").rstrip("=")

    # -- sessions

    def session(self, identity: str, now: float | None = None) -> str:
        """A cookie value naming ``identity``, valid for :data:`SESSION_MAX_AGE`."""
        issued = int(now if now is not None else time.time())
        body = base64.urlsafe_b64encode(f"{issued}:{identity}".encode()).decode("ascii")
        return f"{body}.{self._mac('session', body)}"

    def identity(self, cookie: str, now: float | None = None) -> str | None:
        """The identity of a valid, unexpired, not signed-out session cookie, else ``None``."""
        body, _, mac = cookie.rpartition(".")
        if not body or not hmac.compare_digest(mac, self._mac("session", body)):
            return None
        if mac in self._revoked:
            return None
        try:
            issued, _, identity = base64.urlsafe_b64decode(body).decode().partition(":")
            age = (now if now is not None else time.time()) - int(issued)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        return identity if 0 <= age <= SESSION_MAX_AGE and identity else None

    def revoke(self, cookie: str, now: float | None = None) -> None:
        """End the session of ``cookie`` (sign-out). Held in this process until the cookie
        would have expired anyway; other processes serving the console do not see it."""
        clock = now if now is not None else time.time()
        self._revoked = {m: t for m, t in self._revoked.items() if t > clock}
        body, _, mac = cookie.rpartition(".")
        if body and hmac.compare_digest(mac, self._mac("session", body)):
            self._revoked[mac] = clock + SESSION_MAX_AGE

    # -- CSRF

    @staticmethod
    def nonce() -> str:
        return secrets.token_urlsafe(24)

    def csrf_token(self, nonce: str, identity: str) -> str:
        return self._mac("csrf", f"{nonce}\0{identity}")

    def check_csrf(self, nonce: str | None, identity: str, token: str | None) -> bool:
        if not nonce or not token:
            return False
        return hmac.compare_digest(token, self.csrf_token(nonce, identity))
