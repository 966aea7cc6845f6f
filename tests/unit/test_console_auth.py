"""The console's sign-in pieces and redaction (no web server needed)."""

from __future__ import annotations

import base64

import pytest

from outbox.console.auth import SESSION_MAX_AGE, Credentials, Signer, parse_basic
from outbox.console.redact import MASK, Redactor


def test_credentials_check_in_constant_time_and_hide_secrets() -> None:
    creds = Credentials(token="t0ken-value", username="ops", password="pass-word")
    assert creds.check_token("t0ken-value") and not creds.check_token("t0ken-valuX")
    assert creds.check_password("ops", "pass-word")
    assert not creds.check_password("ops", "wrong-pass")
    assert not creds.check_password("root", "pass-word")
    assert "t0ken" not in repr(creds) and "pass-word" not in repr(creds)
    assert creds.kinds == ["token", "password"]
    assert not Credentials().configured
    assert not Credentials().check_token("") and not Credentials().check_password("", "")


@pytest.mark.parametrize("kwargs", [{"username": "ops"}, {"password": "long-enough"},
                                    {"token": "short"}, {"username": "a", "password": "short"}])
def test_incomplete_or_weak_credentials_are_refused(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        Credentials(**kwargs)


def test_basic_header() -> None:
    header = "Basic " + base64.b64encode(b"ops:pa:ss").decode()
    assert parse_basic(header) == ("ops", "pa:ss")
    assert parse_basic("Bearer abc") is None
    assert parse_basic("Basic !!!") is None
    assert parse_basic("Basic " + base64.b64encode(b"nocolon").decode()) is None


def test_sessions_are_signed_and_expire() -> None:
    signer = Signer("a-secret")
    cookie = signer.session("ops", now=1000.0)
    assert signer.identity(cookie, now=1000.0 + 60) == "ops"
    assert signer.identity(cookie, now=1000.0 + SESSION_MAX_AGE + 1) is None
    _, mac = cookie.rsplit(".", 1)
    forged = base64.urlsafe_b64encode(b"1000:admin").decode() + "." + mac
    assert signer.identity(forged, now=1001.0) is None
    assert Signer("another").identity(cookie, now=1001.0) is None
    assert signer.identity("garbage", now=1001.0) is None
    assert "a-secret" not in repr(signer)
    # Without a configured secret each process has its own key.
    assert Signer().identity(Signer().session("ops")) is None


def test_csrf_tokens_bind_the_nonce_and_the_identity() -> None:
    signer = Signer("a-secret")
    nonce = signer.nonce()
    token = signer.csrf_token(nonce, "ops")
    assert signer.check_csrf(nonce, "ops", token)
    assert not signer.check_csrf(nonce, "eve", token)
    assert not signer.check_csrf(signer.nonce(), "ops", token)
    assert not signer.check_csrf(nonce, "ops", None)
    assert not signer.check_csrf(None, "ops", token)


def test_redaction_paths() -> None:
    r = Redactor(["payload.password", "payload.card.number", "payload.items.*.token",
                  "metadata.auth"])
    payload = {"password": "x", "card": {"number": "4111", "brand": "visa"},
               "items": [{"token": "a", "n": 1}, {"n": 2}], "name": "ada"}
    out = r("payload", payload)
    assert out == {"password": MASK, "card": {"number": MASK, "brand": "visa"},
                   "items": [{"token": MASK, "n": 1}, {"n": 2}], "name": "ada"}
    assert payload["password"] == "x"  # a copy was masked
    meta = {"auth": {"k": 1}, "changes": {"password": {"old": "a", "new": "b"},
                                          "name": {"old": "x", "new": "y"}}}
    assert r("metadata", meta) == {"auth": MASK, "changes": {
        "password": {"old": MASK, "new": MASK}, "name": {"old": "x", "new": "y"}}}
    assert r.changes({"card": {"old": {"number": "1"}, "new": {"number": "2"}}}) == {
        "card": {"old": {"number": MASK}, "new": {"number": MASK}}}
    assert Redactor()("payload", payload) is payload
    assert r("payload", ["not", "a", "dict"]) == ["not", "a", "dict"]


@pytest.mark.parametrize("path", ["password", "payload", "body.x", "payload..x", "payload."])
def test_bad_redaction_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="redaction path"):
        Redactor([path])
